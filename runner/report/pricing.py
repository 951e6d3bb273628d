"""Prices: per-model rates from the spec's override table or genai-prices, and costs from tokens.

Costs are computed at report time from stored token counts, so re-pricing never needs a re-run.
A rate comes from, in order: the override table (`[prices."model"]` in a spec or a price
file), zero for `:free` ids, then the genai-prices bundled snapshot. A model found nowhere is
*unpriced* (None), never $0; so is a row whose usage is unknown.

This module is the one home of genai-prices, which is imported lazily (with its first lookup it
costs ~100 ms) and only ever reads its bundled snapshot: nothing here updates prices or touches
the network. What a lookup found is kept in a small per-user cache (`_TableCache`), so that a
run whose models were priced before does not import genai-prices at all. Validates override
entries with pydantic, as `spec` does specs. Imports only `errors` from the package.

Simplifications of the table's rates (one rate per model, so SQL can join on it):
- the base tier of tiered prices: long-prompt surcharges (e.g. above 200k prompt tokens on
  Gemini 2.5 Pro or Claude Sonnet 4.5) are not applied, so such rows are understated;
- prices in force today (UTC; `PriceSource(at=...)` picks another day); time-of-day prices
  (DeepSeek off-peak) fold into the day's highest rate, so a report does not change with the
  hour it is run at;
- the standard service tier (no flex/priority/batch discounts), text tokens only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, time
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationError

from runner.errors import SpecError
from runner.records import ResultRecord, WorkItem
from runner.spec import read_text, short_repr

if TYPE_CHECKING:
    from genai_prices.types import ModelInfo

MTOK = Decimal(1_000_000)
ZERO = Decimal(0)

# Bare TOML keys need no quotes in a dotted field name; others are shown quoted.
_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")

# Model families whose first-party provider genai-prices knows, for ids that carry no
# `vendor/` prefix. genai-prices also matches by name on its own; this list comes first so
# that e.g. glm-* reaches z.ai (whose table has GLM-4.6) rather than zhipuai.
_FAMILIES: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern, re.IGNORECASE), provider)
    for pattern, provider in (
        (r"gpt-|chatgpt-|o[134](?:-|$)", "openai"),
        (r"claude-", "anthropic"),
        (r"gemini-|gemma-", "google"),
        (r"deepseek", "deepseek"),
        (r"(?:mi|code|dev|magi|mini|pix|vox)stral|mixtral|open-mi[sx]tral", "mistral"),
        (r"grok-", "x-ai"),
        (r"kimi-|moonshot", "moonshotai"),
        (r"glm-", "zai"),
        (r"command-", "cohere"),
    )
)
# Open-weight families have no first-party price list; an aggregator's (OpenRouter's, keyed
# `vendor/model`) is the closest to what a router charges.
_AGGREGATOR = "openrouter"
_OPEN_WEIGHT_VENDORS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"llama-", re.IGNORECASE), "meta-llama"),
    (re.compile(r"qwen", re.IGNORECASE), "qwen"),
)


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """USD per million tokens for one model, and where the rates came from.

    `provenance` is "override" (spec or price file), "price-table" (genai-prices) or "free"
    (a `:free` id). `table_ref` names the genai-prices entry used ("provider/model").
    """

    input_per_mtok: Decimal
    cached_input_per_mtok: Decimal
    output_per_mtok: Decimal
    provenance: str
    table_ref: str | None = None


FREE = ModelPrice(ZERO, ZERO, ZERO, "free")


def _number(value: object) -> object:
    # bool is an int to Python and a string would parse; a price must be a TOML number.
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal):
        raise ValueError(f"must be a number (got {value!r})")
    return value


def _rate(value: Decimal) -> Decimal:
    # NaN and infinities are refused by pydantic's Decimal itself (finite_number).
    if value < 0:
        raise ValueError(f"must be at least 0 (got {value})")
    return value


Rate = Annotated[Decimal, BeforeValidator(_number), AfterValidator(_rate)]


class PriceOverride(BaseModel):
    """One `[prices."model"]` entry: USD per million tokens; cached_input defaults to input."""

    # extra="forbid" turns a typo (`ouput`) into an error instead of an ignored key.
    model_config = ConfigDict(extra="forbid", frozen=True, defer_build=True)

    input: Rate
    output: Rate
    cached_input: Rate | None = None

    def to_price(self) -> ModelPrice:
        cached = self.input if self.cached_input is None else self.cached_input
        return ModelPrice(self.input, cached, self.output, "override")


def parse_price_table(
    data: object, *, path: str, where: str = "prices"
) -> dict[str, PriceOverride]:
    """Validate a table of model -> rates; raises SpecError naming `prices.<model>.<field>`."""
    if not isinstance(data, dict):
        raise SpecError(path, where, f"must be a table of models (got {short_repr(data)})")
    table: dict[str, PriceOverride] = {}
    for model, entry in data.items():
        field = _join(where, str(model))
        if not str(model).strip():
            raise SpecError(path, field, "a model name cannot be empty")
        if not isinstance(entry, dict):
            raise SpecError(
                path,
                field,
                "must be a table of input, output and optional cached_input "
                f"(USD per million tokens; got {short_repr(entry)})",
            )
        try:
            table[str(model)] = PriceOverride.model_validate(entry)
        except ValidationError as exc:
            raise _first_error(exc, path, field) from None
    return table


def load_price_file(path: str | Path) -> dict[str, PriceOverride]:
    """Read a TOML price file: `[prices."model"]` tables, or the same tables at top level."""
    shown = str(path)
    text = read_text(Path(path), shown, "a price file")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(shown, "", f"invalid TOML: {exc}") from None
    if "prices" not in data:
        return parse_price_table(data, path=shown, where="")
    for key in data:
        if key != "prices":
            raise SpecError(shown, key, 'unknown key (a price file holds [prices."model"] tables)')
    return parse_price_table(data["prices"], path=shown)


def _join(where: str, key: str) -> str:
    # A key that is not a bare TOML key is shown quoted, escaped onto one line.
    part = key if _BARE_KEY.fullmatch(key) else json.dumps(key, ensure_ascii=False)
    return f"{where}.{part}" if where else part


def _first_error(exc: ValidationError, path: str, where: str) -> SpecError:
    err = exc.errors(include_url=False)[0]
    # The entry is flat: the first part of the location is the key (pydantic may append
    # the union member or validator after it).
    name = str(err["loc"][0])
    field = _join(where, name)
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        import difflib  # an error message's only: not on every run's start-up

        close = difflib.get_close_matches(name, list(PriceOverride.model_fields), n=1)
        known = f"did you mean {close[0]!r}?" if close else "known: input, cached_input, output"
        message = f"unknown key ({known})"
    elif kind == "missing":
        message = "is required"
    elif kind == "finite_number":
        message = f"must be a finite number (got {short_repr(err.get('input'))})"
    elif kind == "value_error" and "error" in ctx:
        message = str(ctx["error"])
    else:
        message = f"must be a number (got {short_repr(err.get('input'))})"
    return SpecError(path, field, message)


def _split(model_id: str) -> tuple[str | None, str, bool]:
    """(vendor prefix or None, base id, is_free) of a routed model id."""
    name, _, suffix = model_id.partition(":")
    is_free = "free" in suffix.lower().split(":")
    prefix, slash, base = name.rpartition("/")
    return (prefix if slash and prefix else None), base, is_free


def normalize_model(model_id: str) -> tuple[str, bool]:
    """The id a price is looked up by, and whether the id is a `:free` variant.

    Strips router suffixes (`:free`, `:thinking`, `:thinking:high`, anything after the first
    `:`) and a vendor prefix (`openai/gpt-4o-mini` -> `gpt-4o-mini`).
    """
    _, base, is_free = _split(model_id)
    return base, is_free


class PriceSource:
    """Rates per model id: overrides first, then `:free`, then the genai-prices table.

    Lookups are cached per id (a report prices millions of rows of a few models). A fresh
    source never reads the network: genai-prices' bundled snapshot is the table.
    """

    def __init__(
        self, overrides: Mapping[str, PriceOverride] | None = None, *, at: datetime | None = None
    ) -> None:
        """`at` is the day whose table prices apply (default: today, UTC; naive means UTC)."""
        self._overrides = {model: o.to_price() for model, o in (overrides or {}).items()}
        self._cache: dict[str, ModelPrice | None] = {}
        at = at or datetime.now(tz=UTC)
        self._at = at if at.tzinfo else at.replace(tzinfo=UTC)

    def price(self, model: str) -> ModelPrice | None:
        """The rates for a model id as requested (suffixes and prefixes allowed), or None."""
        try:
            return self._cache[model]
        except KeyError:
            found = self._cache[model] = self._lookup(model)
            return found

    def _lookup(self, model: str) -> ModelPrice | None:
        if model in self._overrides:
            return self._overrides[model]
        prefix, base, is_free = _split(model)
        # A `:free` id costs nothing even if its paid sibling has an override.
        if is_free:
            return FREE
        name = f"{prefix}/{base}" if prefix else base
        for key in (name, base):
            if key in self._overrides:
                return self._overrides[key]
        return _table_price(prefix, base, self._at)


def _candidates(prefix: str | None, base: str) -> list[tuple[str | None, str]]:
    """(provider id, model ref) pairs to try in genai-prices, best first."""
    tries: list[tuple[str | None, str]] = []
    if prefix:
        tries.append((prefix.split("/")[0], base))
    tries += [(provider, base) for pattern, provider in _FAMILIES if pattern.match(base)]
    tries.append((None, base))  # genai-prices matches providers by model name
    if prefix:
        tries.append((_AGGREGATOR, f"{prefix}/{base}"))
    tries += [
        (_AGGREGATOR, f"{vendor}/{base}")
        for pattern, vendor in _OPEN_WEIGHT_VENDORS
        if pattern.match(base)
    ]
    return list(dict.fromkeys(tries))


def _table_price(prefix: str | None, base: str, now: datetime) -> ModelPrice | None:
    if not base:
        return None
    cache = _TableCache.open()
    key = f"{now.astimezone(UTC).date().isoformat()}|{prefix or ''}|{base}"
    if cache is not None and (known := cache.get(key)) is not None:
        return known[0]
    found = _price_from_table(prefix, base, now)
    if cache is not None:
        cache.put(key, found)
    return found


class _TableCache:
    """Prices already resolved from genai-prices, kept in a small JSON file per user.

    Importing genai-prices (and httpx2 with it) and its first lookup cost ~100 ms of every
    short run's start-up; the answer only changes with the table, the day and this module.
    So a lookup's result (a price, or none) is kept under the UTC day and the id asked for,
    in `$RUNNER_CACHE_DIR/prices.json` (default: `$XDG_CACHE_HOME/runner`, else
    `~/.cache/runner`), with the identity of the installed genai-prices and of this module
    (path, size and mtime of their files, found without importing genai-prices): another
    version of either starts afresh. A cache that cannot be read or written is ignored.
    """

    LIMIT = 512  # entries kept; the oldest go first

    def __init__(self, path: Path, identity: str, entries: dict[str, object]) -> None:
        self.path = path
        self.identity = identity
        self.entries = entries

    @classmethod
    def open(cls) -> _TableCache | None:
        identity = _table_identity()
        if identity is None:
            return None
        folder = os.environ.get("RUNNER_CACHE_DIR") or os.path.join(
            os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "runner"
        )
        path = Path(folder) / "prices.json"
        entries: dict[str, object] = {}
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(path.read_bytes())
            if isinstance(data, dict) and data.get("identity") == identity:
                kept = data.get("prices")
                entries = kept if isinstance(kept, dict) else {}
        return cls(path, identity, entries)

    def get(self, key: str) -> tuple[ModelPrice | None] | None:
        """(the price or None for unpriced,), or None when the cache does not know."""
        value = self.entries.get(key, ())
        if value is None:
            return (None,)
        if isinstance(value, list) and len(value) == 4 and all(isinstance(v, str) for v in value):
            with contextlib.suppress(ArithmeticError, ValueError):
                inp, cached, out = (Decimal(v) for v in value[:3])
                if all(r.is_finite() and r >= 0 for r in (inp, cached, out)):
                    return (ModelPrice(inp, cached, out, "price-table", value[3]),)
        return None

    def put(self, key: str, price: ModelPrice | None) -> None:
        self.entries.pop(key, None)
        self.entries[key] = (
            None
            if price is None
            else [
                str(price.input_per_mtok),
                str(price.cached_input_per_mtok),
                str(price.output_per_mtok),
                price.table_ref or "",
            ]
        )
        while len(self.entries) > self.LIMIT:
            del self.entries[next(iter(self.entries))]
        data = json.dumps({"identity": self.identity, "prices": self.entries}).encode()
        import tempfile  # ~5 ms of start-up, for a lookup the cache did not know only

        with contextlib.suppress(OSError):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".prices-", suffix=".tmp")
            try:
                with os.fdopen(fd, "wb") as handle:
                    handle.write(data)
                os.replace(tmp, self.path)
            except OSError:
                os.unlink(tmp)
                raise


def _table_identity() -> str | None:
    """The installed genai-prices and this module, as files on disk (none if not found)."""
    from importlib.util import find_spec

    try:
        spec = find_spec("genai_prices")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    package = Path(spec.origin).parent
    parts = [str(package)]
    try:
        for path in (package / "__init__.py", package / "data.py", package / "types.py"):
            stat = path.stat()
            parts.append(f"{stat.st_size}:{stat.st_mtime_ns}")
        stat = Path(__file__).stat()
    except OSError:
        return None
    parts.append(f"{stat.st_size}:{stat.st_mtime_ns}")
    return "|".join(parts)


def _price_from_table(prefix: str | None, base: str, now: datetime) -> ModelPrice | None:
    import genai_prices  # ~100 ms with its first lookup: only when the cache does not know

    usage = genai_prices.Usage(input_tokens=0, output_tokens=0)
    for provider_id, ref in _candidates(prefix, base):
        try:
            found = genai_prices.calc_price(
                usage, ref, provider_id=provider_id, genai_request_timestamp=now
            )
        except LookupError:
            continue
        price = _rates_today(found.model, now)
        if price is not None:
            return ModelPrice(*price, "price-table", f"{found.provider.id}/{found.model.id}")
    return None


def _rates_today(model: ModelInfo, now: datetime) -> tuple[Decimal, Decimal, Decimal] | None:
    """(input, cached input, output) in force today: base tier, highest rate of the day."""
    from genai_prices.types import TieredPrices, TimeOfDateConstraint

    moments = [now]
    if isinstance(model.prices, list):
        # Sample every segment of today's time-of-day windows: each begins at a start or end.
        for conditional in model.prices:
            window = conditional.constraint
            if isinstance(window, TimeOfDateConstraint):
                moments += [_at(now, window.start_time), _at(now, window.end_time)]
    rates: list[tuple[Decimal, Decimal, Decimal]] = []
    for moment in moments:
        prices = model.get_prices(moment)
        values = [getattr(prices, key) for key in ("input_mtok", "cache_read_mtok", "output_mtok")]
        inp, cached, out = (v.base if isinstance(v, TieredPrices) else v for v in values)
        if inp is None or out is None:
            return None  # not priced per text token (images, audio, per request)
        rates.append((inp, inp if cached is None else cached, out))
    return (
        max(r[0] for r in rates),
        max(r[1] for r in rates),
        max(r[2] for r in rates),
    )


def _at(now: datetime, moment: time) -> datetime:
    stamp = datetime.combine(now.date(), moment)
    return stamp.replace(tzinfo=UTC) if stamp.tzinfo is None else stamp


def cost(
    price: ModelPrice,
    *,
    prompt_tokens: int | None,
    completion_tokens: int | None,
    cached_tokens: int | None,
) -> Decimal | None:
    """USD for one answer; None when prompt or completion tokens are unknown (never 0).

    OpenAI semantics: cached tokens are part of prompt_tokens and priced at the cached rate;
    reasoning tokens are part of completion_tokens and priced as output.
    """
    if prompt_tokens is None or completion_tokens is None:
        return None
    cached = min(max(cached_tokens or 0, 0), prompt_tokens)
    total = (
        (prompt_tokens - cached) * price.input_per_mtok
        + cached * price.cached_input_per_mtok
        + completion_tokens * price.output_per_mtok
    )
    return total / MTOK


def estimate_range(
    price: ModelPrice, *, prompt_tokens: int, max_completion_tokens: int
) -> tuple[Decimal, Decimal]:
    """Dry-run bounds in USD: (the prompt alone, the prompt plus a full-length answer).

    The prompt is priced uncached: the cache hit rate is unknown before a run.
    """
    low = cost(price, prompt_tokens=prompt_tokens, completion_tokens=0, cached_tokens=None)
    high = cost(
        price,
        prompt_tokens=prompt_tokens,
        completion_tokens=max_completion_tokens,
        cached_tokens=None,
    )
    assert low is not None and high is not None  # known token counts always give a cost
    return low, high


PriceRow = tuple[str, float | None, float | None, float | None, str]

# Columns of the rows below, and the cost of one result row against them in SQL (the same
# arithmetic as `cost`; NULL when usage or the price is unknown).
PRICE_COLUMNS = (
    "model",
    "input_per_mtok",
    "cached_input_per_mtok",
    "output_per_mtok",
    "provenance",
)
COST_SQL = (
    "((prompt_tokens - least(greatest(coalesce(cached_tokens, 0), 0), prompt_tokens))"
    " * input_per_mtok"
    " + least(greatest(coalesce(cached_tokens, 0), 0), prompt_tokens) * cached_input_per_mtok"
    " + completion_tokens * output_per_mtok) / 1e6"
)


def price_sql_table(
    prices: Mapping[str, ModelPrice | None], models: Iterable[str]
) -> list[PriceRow]:
    """Rows of a `prices` table for SQL: one per model, NULL rates and "unpriced" if unknown."""
    rows: list[PriceRow] = []
    for model in dict.fromkeys(models):
        price = prices.get(model)
        if price is None:
            rows.append((model, None, None, None, "unpriced"))
        else:
            rows.append(
                (
                    model,
                    float(price.input_per_mtok),
                    float(price.cached_input_per_mtok),
                    float(price.output_per_mtok),
                    price.provenance,
                )
            )
    return rows


# The budget counts in atto-dollars (10**-18 USD), as Python ints: exact like Decimal for
# any price of up to 12 decimal places per million tokens, and ~10 us a row cheaper (a
# reservation and a settlement, each a few Decimal operations, were the pool's costliest
# arithmetic on bench/run.py W1).
ATTO = 10**18
# Amounts past this are clamped (a provider's absurd `usage.cost`, spend summed to infinity):
# still past any budget, and their sums stay within a float when turned back into USD.
_MAX_USD = Decimal(10**18)


def atto(usd: Decimal | float | int, *, down: bool = False) -> int:
    """USD in atto-dollars, rounded up (spending: a budget never counts less than was spent)
    or, `down`, rounded down (a limit: never more room than was given); clamped to
    [0, 10**18] USD, +infinity included."""
    exact = usd if isinstance(usd, Decimal) else Decimal(str(usd))
    if exact.is_nan():
        raise ValueError(f"not an amount of USD: {usd!r}")
    exact = min(max(exact, Decimal(0)), _MAX_USD)
    rounding = ROUND_FLOOR if down else ROUND_CEILING
    return int((exact * ATTO).to_integral_value(rounding=rounding))


def usd(units: int) -> Decimal:
    """Atto-dollars as USD, exactly."""
    return Decimal(units).scaleb(-18)


@dataclass(frozen=True, slots=True)
class _Rates:
    """A model's prices in atto-dollars per token."""

    input: int
    cached_input: int
    output: int
    # What a prompt token may cost: a table may price cached tokens above uncached ones.
    prompt_worst: int

    @classmethod
    def of(cls, price: ModelPrice) -> _Rates:
        uncached = atto(price.input_per_mtok / MTOK)
        cached = atto(price.cached_input_per_mtok / MTOK)
        return cls(uncached, cached, atto(price.output_per_mtok / MTOK), max(uncached, cached))

    def cost(self, prompt: int, completion: int, cached: int | None) -> int:
        """One answer's cost (OpenAI semantics, as `cost`): cached tokens are part of the
        prompt, at the cached rate."""
        cached = min(max(cached or 0, 0), prompt)
        return (
            (prompt - cached) * self.input + cached * self.cached_input + completion * self.output
        )


class Budget:
    """Cost keeping for a run: worst-case reservations against an optional USD budget.

    Before a row is sent, its worst case (estimated prompt + max_tokens, at the model's
    price) is reserved; scheduling stops when spent + reserved would pass the budget. When
    the row settles, the reservation is replaced by what it actually cost. Implements the
    pool's `Spender` protocol; a reservation is an int of atto-dollars (see ATTO).
    """

    def __init__(
        self,
        prices: PriceSource,
        *,
        limit_usd: float | None,
        spent_usd: float = 0.0,
        default_completion: int = 0,
    ) -> None:
        self.prices = prices
        # An infinite budget (`budget_usd = inf` is a non-negative float) is no limit.
        self.limit_units: int | None = None
        if limit_usd is not None and limit_usd != math.inf:
            self.limit_units = atto(limit_usd, down=True)
        self.spent_units = atto(spent_usd)
        self.reserved_units = 0
        self.default_completion = default_completion
        self.unknown = 0  # settled rows whose cost is unknown (unpriced, or no usage)
        self._rates: dict[str, _Rates | None] = {}

    @property
    def spent(self) -> Decimal:
        """USD spent (settled rows, paid re-asks, unknown usage at its worst case)."""
        return usd(self.spent_units)

    @property
    def reserved(self) -> Decimal:
        """USD reserved for rows on the wire."""
        return usd(self.reserved_units)

    def rates(self, model: str) -> _Rates | None:
        try:
            return self._rates[model]
        except KeyError:
            price = self.prices.price(model)
            found = self._rates[model] = None if price is None else _Rates.of(price)
            return found

    def worst(self, item: WorkItem) -> int:
        """A row's worst case: its estimated prompt and its completion cap at full price."""
        rates = self.rates(item.model)
        if rates is None:
            return 0  # only possible without a budget: prepare refuses unpriced models
        cap = item.max_tokens if item.max_tokens is not None else self.default_completion
        return item.est_prompt_tokens * rates.prompt_worst + cap * rates.output

    def reserve(self, item: WorkItem) -> object | None:
        worst = self.worst(item)
        limit = self.limit_units
        if limit is not None and self.spent_units + self.reserved_units + worst > limit:
            return None
        self.reserved_units += worst
        return worst

    def settle(self, reservation: object, record: ResultRecord) -> float | None:
        """Replace the reservation with the row's cost; an unknown cost spends the reservation.

        Unknown usage (missing, or not non-negative integers) may have been billed at up to
        the worst case, so that is what the budget counts; the returned cost is None.
        """
        assert isinstance(reservation, int)
        self.reserved_units -= reservation
        prompt, completion = record.prompt_tokens, record.completion_tokens
        if (
            record.status == "ok"
            and not record.reused
            and record.provider_cost is None
            and prompt is not None
            and completion is not None
            and (rates := self.rates(record.model)) is not None
        ):
            actual: int | None = rates.cost(prompt, completion, record.cached_tokens)
        else:
            actual = self._actual(record, reservation)
        if actual is None:
            self.unknown += 1
            self.spent_units += reservation
            return None
        self.spent_units += actual
        return actual / ATTO

    def _actual(self, record: ResultRecord, reservation: int) -> int | None:
        if record.reused or record.status == "skipped":
            return 0
        if record.provider_cost is not None and record.provider_cost >= 0:
            return atto(record.provider_cost)
        rates = self.rates(record.model)
        if rates is None:
            return None
        if record.status == "failed":
            # Possibly billed without an answer: keep the worst case; otherwise nothing.
            return reservation if record.possibly_billed else 0
        if record.prompt_tokens is None or record.completion_tokens is None:
            return None
        return rates.cost(record.prompt_tokens, record.completion_tokens, record.cached_tokens)

    def release(self, reservation: object) -> None:
        """Drop a reservation whose row stays pending (a refused key: nothing billed)."""
        assert isinstance(reservation, int)
        self.reserved_units -= reservation

    def charged(
        self, reservation: object, record: ResultRecord, *, answered: bool = False
    ) -> float | None:
        """What settling (or, `answered`, paying for) `record` charges that its stored tokens
        and cost cannot tell: the worst case of an attempt of unknown usage, or of one possibly
        billed without an answer. Journaled with the record (`charged_usd`), it is counted
        again after a crash (state.Settled.usage); None when the record's usage tells.
        """
        assert isinstance(reservation, int)
        if (record.prompt_tokens is not None and record.completion_tokens is not None) or (
            record.provider_cost is not None and record.provider_cost >= 0
        ):
            return None  # the usual answer: its tokens or its cost tell
        probe = dataclasses.replace(record, status="ok") if answered else record
        actual = self._actual(probe, reservation)
        told = record.prompt_tokens is not None or record.provider_cost is not None
        if actual is not None and (told or actual == 0):
            return None
        charge = reservation if actual is None else actual
        return charge / ATTO if charge > 0 else None

    def worst_usd(self, reservation: object) -> float:
        """A reservation in USD (what a request on the wire may cost)."""
        assert isinstance(reservation, int)
        return reservation / ATTO

    async def more_room(self, item: WorkItem) -> bool:
        """No more room comes to a run's own budget (a cluster's shards lease theirs:
        runner/cluster/budget.py)."""
        return False

    def room_to_reask(self, reservation: object, record: ResultRecord) -> bool:
        """Whether paying for a re-asked answer (its cost, or the worst case when unknown)
        still leaves the row's reservation within the budget for its next attempt."""
        assert isinstance(reservation, int)
        if self.limit_units is None:
            return True
        actual = self._actual(dataclasses.replace(record, status="ok"), 0)
        cost_now = reservation if actual is None else actual
        return self.spent_units + self.reserved_units + cost_now <= self.limit_units

    def paid(self, reservation: object, record: ResultRecord) -> float | None:
        """Count an answer that was paid for but did not settle its row (it was re-asked);
        unknown usage counts at the row's worst case (`reservation`)."""
        assert isinstance(reservation, int)
        actual = self._actual(dataclasses.replace(record, status="ok"), 0)
        if actual is None:
            self.unknown += 1
            self.spent_units += reservation
            return None
        self.spent_units += actual
        return actual / ATTO

    def reached(self) -> str:
        limit = usd(self.limit_units or 0)
        return (
            f"budget reached: ${self.spent:.4f} of ${limit:.2f}; "
            "resume with --budget-usd to continue"
        )


def spent_before(prices: PriceSource, usage: Mapping[str, tuple[int, int, int, float]]) -> float:
    """What earlier sessions spent, from token sums per model (cost is linear in tokens).

    `usage[model] = (prompt, cached, completion, usd)`, the last summed over rows whose
    provider reported a cost and over what the budget charged for rows whose usage was
    unknown (`charged_usd`); the tokens of those rows are not in the first three.
    """
    total = ZERO
    for model, (prompt, cached, completion, provider) in usage.items():
        total += Decimal(str(provider))
        price = prices.price(model)
        if price is not None and (prompt or completion):
            spent = cost(
                price, prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached
            )
            total += spent or ZERO
    return float(total)

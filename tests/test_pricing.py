"""Prices and costs: overrides win, `:free` is 0, unknown is None (never $0), all offline."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
import textwrap
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import duckdb
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.errors import SpecError
from runner.records import ResultRecord, WorkItem, untrusted_usage
from runner.report.pricing import (
    ATTO,
    COST_SQL,
    PRICE_COLUMNS,
    Budget,
    ModelPrice,
    PriceOverride,
    PriceSource,
    cost,
    estimate_range,
    load_price_file,
    normalize_model,
    parse_price_table,
    price_sql_table,
    usd,
)

ROOT = Path(__file__).resolve().parent.parent
FILE = "jobs/x.toml"
D = Decimal

OVERRIDES = parse_price_table(
    {
        "gpt-4o-mini": {"input": 2, "cached_input": 0.5, "output": 8},
        "house-model": {"input": 1.25, "output": 10},
    },
    path=FILE,
)


def price(input_: str, cached: str, output: str) -> ModelPrice:
    return ModelPrice(D(input_), D(cached), D(output), "override")


def usage_cost(
    p: ModelPrice, prompt: int | None, completion: int | None, cached: int | None
) -> Any:
    return cost(p, prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached)


# --- costs by hand --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "prompt", "completion", "cached", "expected"),
    [
        # 1M prompt at $2 + 1M completion at $8
        ("gpt-4o-mini", 1_000_000, 1_000_000, None, "10"),
        # 600k at $2 + 400k cached at $0.50 + 0 completion
        ("gpt-4o-mini", 1_000_000, 0, 400_000, "1.4"),
        # 800 x 2 + 200 x 0.5 + 500 x 8 = 5700 per million
        ("gpt-4o-mini", 1000, 500, 200, "0.0057"),
        # no cached_input in the table: cached tokens cost the input rate
        ("house-model", 1000, 500, 200, "0.00625"),
        ("house-model", 0, 0, 0, "0"),
    ],
)
def test_override_costs_by_hand(
    model: str, prompt: int, completion: int, cached: int | None, expected: str
) -> None:
    """Costs from an override table match hand-computed dollars exactly."""
    p = PriceSource(OVERRIDES).price(model)
    assert p is not None and p.provenance == "override"
    assert usage_cost(p, prompt, completion, cached) == D(expected)


def test_table_gpt_4o_mini_matches_facts() -> None:
    """genai-prices' gpt-4o-mini: 1000 prompt (200 cached) and 500 completion cost $0.000435."""
    p = PriceSource().price("gpt-4o-mini")
    assert p == ModelPrice(D("0.15"), D("0.075"), D("0.6"), "price-table", "openai/gpt-4o-mini")
    assert usage_cost(p, 1000, 500, 200) == D("0.000435")


@pytest.mark.parametrize(
    "model",
    ["deepseek-r1", "gpt-4o", "deepseek-r1:thinking:high", "openai/gpt-4o", "claude-sonnet-4-5",
     "gemini-2.5-flash", "meta-llama/llama-3.3-70b-instruct", "gpt-5"],
)  # fmt: skip
def test_table_prices_known_models(model: str) -> None:
    """Common routed models are priced by the table with positive rates, cached <= input."""
    p = PriceSource().price(model)
    assert p is not None and p.provenance == "price-table" and p.table_ref
    assert p.input_per_mtok > 0 and p.output_per_mtok > 0
    assert 0 <= p.cached_input_per_mtok <= p.input_per_mtok


def test_tiered_price_uses_the_base_tier() -> None:
    """A tiered table price (Claude Sonnet 4.5 above 200k tokens) resolves to its base tier."""
    p = PriceSource().price("claude-sonnet-4-5")
    assert p is not None
    assert (p.input_per_mtok, p.cached_input_per_mtok, p.output_per_mtok) == (D(3), D("0.3"), D(15))


@pytest.mark.parametrize("hour", [0, 3, 8, 12, 17, 23])
def test_time_of_day_prices_do_not_depend_on_the_hour(hour: int) -> None:
    """DeepSeek's off-peak discount is folded into the day's highest rate at every hour."""
    day = datetime(2026, 11, 24, tzinfo=UTC)
    at_noon = PriceSource(at=day.replace(hour=12)).price("deepseek-chat")
    p = PriceSource(at=day.replace(hour=hour)).price("deepseek-chat")
    assert p == at_noon
    assert p is not None and p.input_per_mtok == D("0.27")  # the peak (standard) rate


def test_dated_prices_follow_the_day_asked_for() -> None:
    """A price change in the table (o3, June 2025) applies from its date on, not before."""
    before = PriceSource(at=datetime(2025, 6, 1)).price("o3")
    after = PriceSource(at=datetime(2025, 6, 11)).price("o3")
    assert before is not None and after is not None
    assert after.input_per_mtok < before.input_per_mtok


# --- overrides, free, unknown ---------------------------------------------------------------


@pytest.mark.parametrize(
    "model",
    ["gpt-4o-mini", "gpt-4o-mini:thinking", "gpt-4o-mini:thinking:high", "openai/gpt-4o-mini"],
)
def test_override_beats_the_table(model: str) -> None:
    """An override for gpt-4o-mini prices every routed spelling of it, not the table."""
    p = PriceSource(OVERRIDES).price(model)
    assert p == price("2", "0.5", "8")


def test_exact_override_beats_normalized_override() -> None:
    """An override for the exact suffixed id wins over the one for its base id."""
    table = parse_price_table(
        {"gpt-4o": {"input": 1, "output": 2}, "gpt-4o:thinking": {"input": 3, "output": 4}},
        path=FILE,
    )
    source = PriceSource(table)
    assert source.price("gpt-4o:thinking") == price("3", "3", "4")
    assert source.price("gpt-4o:thinking:low") == price("1", "1", "2")


@pytest.mark.parametrize(
    "model",
    ["gpt-4o-mini:free", "openai/gpt-4o-mini:free", "no-such-model:free", "x:thinking:free"],
)
def test_free_models_cost_exactly_zero(model: str) -> None:
    """A `:free` id costs exactly 0 with provenance "free", even when its base has an override."""
    p = PriceSource(OVERRIDES).price(model)
    assert p is not None and p.provenance == "free"
    assert usage_cost(p, 12_345, 678, 90) == 0
    assert estimate_range(p, prompt_tokens=10, max_completion_tokens=10) == (D(0), D(0))


def test_an_exact_override_can_price_a_free_id() -> None:
    """An override written for the `:free` id itself is honoured (the user said so)."""
    table = parse_price_table({"m:free": {"input": 1, "output": 1}}, path=FILE)
    p = PriceSource(table).price("m:free")
    assert p is not None and p.provenance == "override"


@pytest.mark.parametrize(
    "model",
    [
        "no-such-model-x",
        "acme/secret-model:thinking",
        "",
        ":thinking",
        "whisper-1",  # in the table, but priced per audio hour: not per token
    ],
)
def test_unknown_models_are_unpriced(model: str) -> None:
    """A model found nowhere is None (unpriced) and becomes NULL rates in SQL, never $0."""
    source = PriceSource()
    assert source.price(model) is None
    assert price_sql_table({model: None}, [model]) == [(model, None, None, None, "unpriced")]


def test_lookups_are_cached_per_id(monkeypatch: pytest.MonkeyPatch) -> None:
    """A second lookup of the same id does not go back to the table."""
    import runner.report.pricing as pricing

    calls: list[str] = []
    real = pricing._table_price

    def counting(prefix: str | None, base: str, now: datetime) -> ModelPrice | None:
        calls.append(base)
        return real(prefix, base, now)

    monkeypatch.setattr(pricing, "_table_price", counting)
    source = PriceSource()
    first = [source.price("gpt-4o") for _ in range(3)]
    second = [source.price("nope-nope") for _ in range(3)]
    assert calls == ["gpt-4o", "nope-nope"]
    assert first[0] is first[2] and second == [None] * 3


# --- costs: unknown usage, estimates --------------------------------------------------------


@pytest.mark.parametrize(("prompt", "completion"), [(None, 10), (10, None), (None, None)])
@pytest.mark.parametrize("cached", [None, 0, 5])
def test_unknown_usage_has_no_cost(
    prompt: int | None, completion: int | None, cached: int | None
) -> None:
    """When prompt or completion tokens are unknown the cost is None, never 0."""
    assert usage_cost(price("1", "1", "1"), prompt, completion, cached) is None
    assert usage_cost(price("0", "0", "0"), prompt, completion, cached) is None


def test_cached_above_prompt_is_clamped() -> None:
    """Cached tokens a provider over-reports count at most as the whole prompt."""
    p = price("2", "1", "0")
    assert usage_cost(p, 100, 0, 500) == usage_cost(p, 100, 0, 100) == D("0.0001")


def test_estimate_range_by_hand() -> None:
    """A dry-run range is (the prompt alone, the prompt plus a full answer), prompt uncached."""
    p = price("0.15", "0.075", "0.6")
    low, high = estimate_range(p, prompt_tokens=2000, max_completion_tokens=1000)
    assert (low, high) == (D("0.0003"), D("0.0009"))


# --- normalize_model ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        ("gpt-4o-mini", ("gpt-4o-mini", False)),
        ("gpt-4o-mini:free", ("gpt-4o-mini", True)),
        ("openai/gpt-4o-mini", ("gpt-4o-mini", False)),
        ("openai/gpt-4o-mini:free", ("gpt-4o-mini", True)),
        ("deepseek-r1:thinking", ("deepseek-r1", False)),
        ("deepseek-r1:thinking:high", ("deepseek-r1", False)),
        ("deepseek-r1:thinking:free", ("deepseek-r1", True)),
        ("meta-llama/llama-3.3-70b-instruct:free", ("llama-3.3-70b-instruct", True)),
        ("accounts/fireworks/models/qwen3:nitro", ("qwen3", False)),
        ("claude-3.5-sonnet:beta", ("claude-3.5-sonnet", False)),
        ("free-model", ("free-model", False)),
    ],
)
def test_normalize_model(model: str, expected: tuple[str, bool]) -> None:
    """Router suffixes and vendor prefixes are stripped; `:free` is reported."""
    assert normalize_model(model) == expected


_part = st.text(st.sampled_from("abcxyz019.-_"), min_size=1, max_size=12)


@given(
    base=_part,
    prefix=st.none() | _part,
    suffixes=st.lists(st.sampled_from(["thinking", "high", "low", "free", "beta"]), max_size=3),
)
def test_normalize_model_property(base: str, prefix: str | None, suffixes: list[str]) -> None:
    """Any vendor/base:suffix... id normalises to its base; free iff a suffix says free."""
    model = (f"{prefix}/" if prefix else "") + base + "".join(f":{s}" for s in suffixes)
    assert normalize_model(model) == (base, "free" in suffixes)


# --- parsing the table ----------------------------------------------------------------------


def bad(entry: Any, field: str, message: str, model: str = "gpt-4o") -> Any:
    return pytest.param({model: entry}, f"prices.{field}", message, id=f"{field}: {message}")


BAD_TABLES = [
    bad({"input": 1, "output": -1}, "gpt-4o.output", "must be at least 0 (got -1)"),
    bad({"input": -0.5, "output": 1}, "gpt-4o.input", "must be at least 0 (got -0.5)"),
    bad({"input": 1, "output": 1, "cached_input": -2}, "gpt-4o.cached_input",
        "must be at least 0 (got -2)"),
    bad({"input": 1}, "gpt-4o.output", "is required"),
    bad({"output": 1}, "gpt-4o.input", "is required"),
    bad({"input": 1, "output": 1, "ouput": 2}, "gpt-4o.ouput",
        "unknown key (did you mean 'output'?)"),
    bad({"input": 1, "output": 1, "currency": "EUR"}, "gpt-4o.currency",
        "unknown key (known: input, cached_input, output)"),
    bad({"input": "cheap", "output": 1}, "gpt-4o.input", "must be a number (got 'cheap')"),
    bad({"input": True, "output": 1}, "gpt-4o.input", "must be a number (got True)"),
    bad({"input": float("nan"), "output": 1}, "gpt-4o.input", "must be a finite number (got nan)"),
    bad({"input": 1, "output": float("inf")}, "gpt-4o.output",
        "must be a finite number (got inf)"),
    bad({"input": 1, "output": -1}, '"gpt-4.1".output', "must be at least 0 (got -1)", "gpt-4.1"),
    # a key that needs quoting is shown escaped, still on one line
    bad({"input": 1, "output": -1}, '"a\\nb".output', "must be at least 0 (got -1)", "a\nb"),
    bad(0.15, "gpt-4o", "must be a table of input, output and optional cached_input "
        "(USD per million tokens; got 0.15)"),
    bad({"input": 1, "output": 1}, '""', "a model name cannot be empty", ""),
    pytest.param([1, 2], "prices", "must be a table of models (got [1, 2])", id="not-a-table"),
]  # fmt: skip


@pytest.mark.parametrize(("table", "field", "message"), BAD_TABLES)
def test_parse_errors_name_the_field(table: Any, field: str, message: str) -> None:
    """Each bad entry raises one SpecError line naming prices.<model>.<field>."""
    with pytest.raises(SpecError) as info:
        parse_price_table(table, path=FILE)
    assert (info.value.field, info.value.message) == (field, message)
    assert str(info.value) == f"{FILE}: {field}: {message}"


def test_parse_keeps_decimal_rates() -> None:
    """TOML floats become the decimals they spell (0.15 stays 0.15, not 0.1499...)."""
    entry = parse_price_table({"m": {"input": 0.15, "output": 0.6}}, path=FILE)["m"]
    assert entry == PriceOverride(input=D("0.15"), output=D("0.6"))
    assert entry.to_price() == price("0.15", "0.15", "0.6")


_values = st.none() | st.booleans() | st.integers(-5, 5) | st.floats() | st.text(max_size=3)
_entries = st.dictionaries(
    st.sampled_from(["input", "output", "cached_input", "ouput"]) | st.text(max_size=5), _values
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(max_size=5), _entries | _values, max_size=3))
def test_random_tables_parse_or_raise_spec_error(table: dict[str, Any]) -> None:
    """Random tables either parse or raise SpecError, never anything else."""
    try:
        parsed = parse_price_table(table, path=FILE)
    except SpecError as exc:
        assert "\n" not in str(exc)
    else:
        assert set(parsed) == set(table)


# --- price files ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        '[prices."gpt-4o-mini"]\ninput = 0.15\ncached_input = 0.075\noutput = 0.60\n',
        '["gpt-4o-mini"]\ninput = 0.15\ncached_input = 0.075\noutput = 0.60\n',
    ],
    ids=["wrapped", "bare"],
)
def test_load_price_file_both_forms(tmp_path: Path, text: str) -> None:
    """A price file may hold [prices."model"] tables or the same tables at its top level."""
    path = tmp_path / "prices.toml"
    path.write_text(text)
    table = load_price_file(path)
    assert PriceSource(table).price("gpt-4o-mini") == price("0.15", "0.075", "0.60")


@pytest.mark.parametrize(
    ("text", "field", "message"),
    [
        ('[prices.m]\ninput = 1\noutput = -1\n', "prices.m.output", "must be at least 0 (got -1)"),
        ("[m]\ninput = 1\n", "m.output", "is required"),
        ('name = "x"\n[prices.m]\ninput = 1\noutput = 1\n', "name",
         'unknown key (a price file holds [prices."model"] tables)'),
        ("prices = 3\n", "prices", "must be a table of models (got 3)"),
    ],
)  # fmt: skip
def test_load_price_file_errors_name_the_field(
    tmp_path: Path, text: str, field: str, message: str
) -> None:
    """Errors in a price file name the file and the field."""
    path = tmp_path / "p.toml"
    path.write_text(text)
    with pytest.raises(SpecError) as info:
        load_price_file(path)
    assert str(info.value) == f"{path}: {field}: {message}"


def test_load_price_file_unreadable(tmp_path: Path) -> None:
    """A missing file, a folder and invalid TOML are one-line errors naming the path."""
    for path, message in [
        (tmp_path / "missing.toml", "no such file"),
        (tmp_path, "is a directory, not a price file"),
    ]:
        with pytest.raises(SpecError, match=f"^{path}: {message}$"):
            load_price_file(path)
    bad = tmp_path / "bad.toml"
    bad.write_text("[prices\n")
    with pytest.raises(SpecError, match=r": invalid TOML: "):
        load_price_file(bad)
    bad.write_bytes(b"\xff\xfe[prices]\n")
    with pytest.raises(SpecError, match=r": is not UTF-8 text$"):
        load_price_file(bad)


# --- the SQL table --------------------------------------------------------------------------


def test_price_sql_table_rows() -> None:
    """One row per model (first seen order, no duplicates), floats, NULL rates when unpriced."""
    source = PriceSource(OVERRIDES)
    models = ["gpt-4o-mini", "nope-x", "gpt-4o-mini", "y:free"]
    rows = price_sql_table({m: source.price(m) for m in models}, models)
    assert rows == [
        ("gpt-4o-mini", 2.0, 0.5, 8.0, "override"),
        ("nope-x", None, None, None, "unpriced"),
        ("y:free", 0.0, 0.0, 0.0, "free"),
    ]


def test_cost_sql_matches_cost() -> None:
    """COST_SQL over the prices table gives the same dollars as cost(), NULL when unknown."""
    source = PriceSource(OVERRIDES)
    results = [
        ("gpt-4o-mini", 1000, 500, 200),
        ("gpt-4o-mini", 100, 5, 500),  # cached over-reported: clamped
        ("house-model", 1000, 500, None),
        ("gpt-4o-mini", None, 500, None),
        ("nope-x", 1000, 500, 0),
    ]
    models = [r[0] for r in results]
    con = duckdb.connect()
    con.execute(
        "CREATE TABLE prices (model VARCHAR, input_per_mtok DOUBLE, "
        "cached_input_per_mtok DOUBLE, output_per_mtok DOUBLE, provenance VARCHAR)"
    )
    con.executemany(
        "INSERT INTO prices VALUES (?, ?, ?, ?, ?)",
        price_sql_table({m: source.price(m) for m in models}, models),
    )
    con.execute(
        "CREATE TABLE results (i INT, model VARCHAR, prompt_tokens BIGINT, "
        "completion_tokens BIGINT, cached_tokens BIGINT)"
    )
    con.executemany(
        "INSERT INTO results VALUES (?, ?, ?, ?, ?)", [(i, *r) for i, r in enumerate(results)]
    )
    got = con.execute(
        f"SELECT {COST_SQL} FROM results LEFT JOIN prices USING (model) ORDER BY i"
    ).fetchall()
    for (sql_cost,), (model, prompt, completion, cached) in zip(got, results, strict=True):
        p = source.price(model)
        expected = None if p is None else usage_cost(p, prompt, completion, cached)
        assert (sql_cost is None) == (expected is None)
        if expected is not None:
            assert sql_cost == pytest.approx(float(expected), rel=1e-12)
    assert PRICE_COLUMNS[0] == "model" and len(PRICE_COLUMNS) == 5


# --- properties -----------------------------------------------------------------------------

_rate = st.decimals(min_value=0, max_value=1000, places=4)
_tokens = st.integers(min_value=0, max_value=10**8)


@given(_rate, _rate, _rate, _tokens, _tokens, _tokens, st.integers(0, 10**6))
def test_cost_is_monotone_in_each_token_count(
    input_: Decimal,
    cached_rate: Decimal,
    output: Decimal,
    prompt: int,
    completion: int,
    cached: int,
    more: int,
) -> None:
    """More prompt or completion tokens never cost less; cached tokens never cost more."""
    cached_rate = min(cached_rate, input_)
    p = ModelPrice(input_, cached_rate, output, "override")
    base = usage_cost(p, prompt, completion, cached)
    assert base is not None and base >= 0
    assert usage_cost(p, prompt + more, completion, cached) >= base
    assert usage_cost(p, prompt, completion + more, cached) >= base
    assert usage_cost(p, prompt, completion, cached + more) <= base
    assert usage_cost(p, prompt, completion, None) >= base  # uncached costs at least as much
    assert usage_cost(p, prompt, completion, min(cached, prompt)) == base
    low, high = estimate_range(p, prompt_tokens=prompt, max_completion_tokens=completion)
    assert low <= high and high == usage_cost(p, prompt, completion, None)  # fmt: skip


# --- offline and lazy -----------------------------------------------------------------------


def test_table_lookup_makes_no_network_access(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh source prices from the bundled snapshot with every socket connection refused."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access during a price lookup")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    source = PriceSource()
    for model in ("gpt-4o", "deepseek-r1", "qwen/qwen3-235b-a22b", "no-such-model-q"):
        source.price(model)
    assert source.price("gpt-4o") is not None


def test_import_is_lazy_and_offline() -> None:
    """Importing runner.report.pricing does not load genai-prices; a first lookup is offline."""
    script = textwrap.dedent(
        """
        import socket, sys

        def refuse(*args, **kwargs):
            raise OSError("network access")

        socket.socket.connect = socket.socket.connect_ex = refuse
        socket.create_connection = socket.getaddrinfo = refuse
        import runner.report.pricing
        assert "genai_prices" not in sys.modules, "genai_prices imported eagerly"
        p = runner.report.pricing.PriceSource().price("gpt-4o-mini")
        assert p is not None and p.provenance == "price-table", p
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


_LOOKUP = """
import json, sys
from runner.report.pricing import PriceSource
models = sys.argv[1:]
prices = [PriceSource().price(m) for m in models]
print(json.dumps({"imported": "genai_prices" in sys.modules,
                  "prices": [p and [str(p.input_per_mtok), str(p.cached_input_per_mtok),
                                    str(p.output_per_mtok), p.provenance, p.table_ref]
                             for p in prices]}))
"""


def _lookup(cache: Path, *models: str) -> dict[str, Any]:
    """Prices of `models` in a fresh process whose price cache is `cache`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}
    env["RUNNER_CACHE_DIR"] = str(cache)
    done = subprocess.run(
        [sys.executable, "-c", _LOOKUP, *models],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    return result


def test_table_prices_are_cached_across_processes(tmp_path: Path) -> None:
    """A second process prices the same models without importing genai-prices (~100 ms of
    start-up): the first one's lookups, unpriced ids included, are kept on disk."""
    models = ("gpt-4o-mini", "openai/gpt-4o", "no-such-model-q")
    first = _lookup(tmp_path, *models)
    assert first["imported"]
    assert first["prices"][0] == ["0.15", "0.075", "0.6", "price-table", "openai/gpt-4o-mini"]
    assert first["prices"][2] is None
    second = _lookup(tmp_path, *models)
    assert not second["imported"]
    assert second["prices"] == first["prices"]


def test_price_cache_of_another_table_or_garbled_is_ignored(tmp_path: Path) -> None:
    """The cache is used only for the genai-prices (and runner) it was made with; a file
    that is not a cache, or entries that are not prices, are looked up in the table again."""
    _lookup(tmp_path, "gpt-4o-mini")
    path = tmp_path / "prices.json"
    data = json.loads(path.read_text())
    (key,) = data["prices"]
    data["prices"][key] = ["9", "9", "9", "made/up"]
    path.write_text(json.dumps(data))
    used = _lookup(tmp_path, "gpt-4o-mini")
    assert not used["imported"] and used["prices"][0] == ["9", "9", "9", "price-table", "made/up"]
    for garbled in (
        {**data, "identity": data["identity"] + "x"},  # another genai-prices or runner
        {**data, "prices": {key: ["-1", "1", "1", "x"]}},
        {**data, "prices": {key: ["NaN", "1", "1", "x"]}},
        {**data, "prices": {key: [1, 2, 3, "x"]}},
        {**data, "prices": {key: "0.15"}},
        {**data, "prices": []},
        [],
    ):
        path.write_text(json.dumps(garbled))
        again = _lookup(tmp_path, "gpt-4o-mini")
        assert again["imported"], garbled
        assert again["prices"][0] == ["0.15", "0.075", "0.6", "price-table", "openai/gpt-4o-mini"]
    path.write_bytes(b"\xff not json")
    assert _lookup(tmp_path, "gpt-4o-mini")["prices"][0][0] == "0.15"
    json.loads(path.read_text())  # rewritten whole


def test_an_unwritable_price_cache_is_no_error(tmp_path: Path) -> None:
    """A cache folder that cannot be made (a file is in the way) only costs the lookup."""
    blocked = tmp_path / "file"
    blocked.write_text("")
    for _ in range(2):
        found = _lookup(blocked / "cache", "gpt-4o-mini")
        assert found["imported"] and found["prices"][0][0] == "0.15"


def _item() -> WorkItem:
    return WorkItem(
        row_index=0,
        row_id="r0",
        model="m",
        body=b"{}",
        request_hash="0" * 64,
        est_prompt_tokens=100,
        max_tokens=50,
    )


def _answered(**usage: Any) -> ResultRecord:
    return ResultRecord(
        row_id="r0",
        row_index=0,
        model="m",
        request_hash="0" * 64,
        status="ok",
        final=True,
        attempts=1,
        started_at=0.0,
        finished_at=0.0,
        latency_ms=0.0,
        **usage,
    )


@pytest.mark.parametrize(
    "usage",
    [
        {},
        {"prompt_tokens": 10},
        {"usage_raw": '{"prompt_tokens": -5}'},
        {"provider_cost": -1.0},
    ],
)
def test_budget_counts_an_answer_of_unknown_usage_at_its_worst_case(usage: dict[str, Any]) -> None:
    """Missing or untrustworthy usage (or a negative provider cost) spends the reservation."""
    budget = Budget(
        PriceSource({"m": PriceOverride(input=Decimal(1), output=Decimal(2))}), limit_usd=1.0
    )
    reservation = budget.reserve(_item())
    assert isinstance(reservation, int)
    assert usd(reservation) == Decimal(100 + 2 * 50) / 1_000_000
    assert budget.settle(reservation, _answered(**usage)) is None
    assert (budget.spent, budget.reserved) == (usd(reservation), 0)
    assert budget.paid(reservation, _answered(**usage)) is None
    assert budget.spent == 2 * usd(reservation)


@pytest.mark.parametrize(
    ("usage", "trusted"),
    [
        ({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}, True),
        ({"prompt_tokens": 1, "completion_tokens": 2, "cost": 0.5}, True),
        ({"prompt_tokens": 1, "completion_tokens": 2, "prompt_tokens_details": None}, True),
        ({"prompt_tokens": -1, "completion_tokens": 2}, False),
        ({"prompt_tokens": "1", "completion_tokens": 2}, False),
        ({"prompt_tokens": 1.0, "completion_tokens": 2}, False),
        ({"prompt_tokens": True, "completion_tokens": 2}, False),
        ({"prompt_tokens": 2**63, "completion_tokens": 2}, False),
        ({"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": "3"}, False),
        ({"prompt_tokens": 1, "completion_tokens": 2, "cost": -0.5}, False),
        ({"prompt_tokens": 1, "completion_tokens": 2, "cost": float("nan")}, False),
        ({"prompt_tokens": 1, "completion_tokens": 2, "cost": 10**400}, False),
        (
            {
                "prompt_tokens": 1,
                "completion_tokens": 2,
                "prompt_tokens_details": {"cached_tokens": -1},
            },
            False,
        ),
        ({"completion_tokens": 2}, False),
        ([1, 2], False),
        ("lots", False),
    ],
)
def test_untrusted_usage_keeps_anything_but_non_negative_integers_raw(
    usage: Any, trusted: bool
) -> None:
    """Usage is trusted only when every count is a non-negative int64 and any cost a finite
    non-negative number; otherwise its JSON text is kept."""
    raw = untrusted_usage(usage)
    assert (raw is None) == trusted
    if raw is not None:
        assert len(raw) <= 2003


def test_budget_release_gives_back_a_pending_rows_reservation() -> None:
    """A row left pending (its key refused, nothing billed) gives its reservation back."""
    budget = Budget(
        PriceSource({"m": PriceOverride(input=Decimal(1), output=Decimal(2))}), limit_usd=1.0
    )
    reservation = budget.reserve(_item())
    budget.release(reservation)
    assert (budget.spent, budget.reserved) == (0, 0)


_PRICE = st.decimals(min_value=0, max_value=1000, places=6, allow_nan=False, allow_infinity=False)
_TOKENS = st.integers(min_value=0, max_value=10**7)


@settings(max_examples=200, deadline=None)
@given(
    rates=st.tuples(_PRICE, _PRICE, _PRICE),
    answers=st.lists(st.tuples(_TOKENS, _TOKENS, st.none() | _TOKENS), min_size=1, max_size=8),
    est=_TOKENS,
    cap=_TOKENS,
)
def test_the_budget_counts_exactly_what_cost_computes(
    rates: tuple[Decimal, Decimal, Decimal],
    answers: list[tuple[int, int, int | None]],
    est: int,
    cap: int,
) -> None:
    """The budget's integer arithmetic (atto-dollars) equals the Decimal one, to the last
    digit, for reservations and settlements (`cost`) alike; `settle` returns that cost."""
    price_in, price_cached, price_out = rates
    override = PriceOverride(input=price_in, cached_input=price_cached, output=price_out)
    prices = PriceSource({"m": override})
    price = prices.price("m")
    assert price is not None
    budget = Budget(prices, limit_usd=None)
    item = dataclasses.replace(_item(), est_prompt_tokens=est, max_tokens=cap)
    expected_spent = Decimal(0)
    for prompt, completion, cached in answers:
        reservation = budget.reserve(item)
        assert isinstance(reservation, int)
        # The prompt at the higher of the two rates: it may all come from the cache.
        worst = (est * max(price_in, price_cached) + cap * price_out) / 1_000_000
        assert usd(reservation) == worst
        assert budget.reserved == worst
        record = _answered(prompt_tokens=prompt, completion_tokens=completion, cached_tokens=cached)
        actual = cost(price, prompt_tokens=prompt, completion_tokens=completion,
                      cached_tokens=cached)  # fmt: skip
        assert actual is not None
        assert budget.settle(reservation, record) == float(actual)
        expected_spent += actual
        assert (budget.spent, budget.reserved) == (expected_spent, 0)


def test_a_budget_stops_at_its_limit_to_the_atto_dollar() -> None:
    """Room is judged exactly: a row whose worst case fills the budget to the cent is let
    through; one atto-dollar more is not (a float sum would drift either way)."""
    prices = PriceSource({"m": PriceOverride(input=Decimal("0.1"), output=Decimal("0.2"))})
    item = _item()  # 100 prompt + 50 completion tokens: $0.00002 worst case
    budget = Budget(prices, limit_usd=0.0002)
    taken = [budget.reserve(item) for _ in range(11)]
    assert taken.count(None) == 1 and taken[-1] is None
    assert budget.reserved == Decimal("0.0002")


def _fixed(input_: str, cached: str, output: str) -> PriceSource:
    return PriceSource(
        {"m": PriceOverride(input=D(input_), cached_input=D(cached), output=D(output))}
    )


def test_an_infinite_budget_is_no_limit() -> None:
    """`budget_usd = inf` passes the spec (a non-negative float): it means no limit, never an
    internal error."""
    budget = Budget(_fixed("1", "1", "1"), limit_usd=float("inf"))
    assert budget.limit_units is None
    assert budget.reserve(_item()) is not None


def test_absurd_provider_costs_neither_crash_nor_lose_the_stop() -> None:
    """A provider reporting `usage.cost` near the float maximum on every row: the budget
    counts it (clamped, still past any limit), the session's spend stays a float, and a
    resume from an infinite sum of such costs stops at the budget instead of failing."""
    budget = Budget(_fixed("1", "1", "1"), limit_usd=10.0)
    reservations = [budget.reserve(_item()) for _ in range(4)]
    for reservation in reservations:
        cost_usd = budget.settle(reservation, _answered(prompt_tokens=10, completion_tokens=2,
                                                        provider_cost=1e308))  # fmt: skip
        assert cost_usd is not None and cost_usd > 10
    assert (budget.spent_units + budget.reserved_units) / ATTO > 10
    assert budget.reserve(_item()) is None
    resumed = Budget(_fixed("1", "1", "1"), limit_usd=20.0, spent_usd=float("inf"))
    assert resumed.reserve(_item()) is None
    assert "budget reached" in resumed.reached()


def test_the_limit_is_rounded_down_and_spending_up() -> None:
    """A limit finer than an atto-dollar is rounded down, never up: a row costing more than
    the budget never fits it."""
    budget = Budget(_fixed("1e-12", "1e-12", "1e-12"), limit_usd=1.5e-18)
    item = dataclasses.replace(_item(), est_prompt_tokens=2, max_tokens=0)
    assert budget.reserve(item) is None  # 2e-18 USD does not fit 1.5e-18


def test_a_cached_rate_above_the_input_rate_is_reserved_for() -> None:
    """A price table whose cached rate is above its input rate: a row's reservation covers a
    prompt read wholly from the cache, so the budget holds however the rows settle."""
    budget = Budget(_fixed("1", "100", "1"), limit_usd=0.011)
    reservations = [budget.reserve(_item()) for _ in range(2)]  # 100 prompt + 50 completion
    for reservation in reservations:
        if reservation is not None:
            budget.settle(reservation, _answered(prompt_tokens=100, completion_tokens=50,
                                                 cached_tokens=100))  # fmt: skip
    assert budget.spent <= D("0.011")
    assert budget.spent == D(100 * 100 + 50) / 1_000_000  # one row fitted

"""Job specs: the TOML schema, its validation, and one-line errors that name the field.

Owns pydantic (spec validation). Must not import anything above `records` in the module
map: it knows nothing of files other than the spec itself, HTTP or runs.
"""

from __future__ import annotations

import codecs
import difflib
import hashlib
import ipaddress
import json
import math
import os
import re
import stat
import tomllib
import typing
import urllib.parse
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from runner.errors import SpecError

SIMULATOR = "simulator"

# Strings that look like a credential. Used to refuse a key pasted into a spec; the match
# itself is never echoed back.
_SECRET_RE = re.compile(
    r"(sk-[A-Za-z0-9_\-]{12,}|\bBearer\s+\S{8,}|\b(?:rk|pk|ak)-[A-Za-z0-9_\-]{20,})"
)
_TYPE_TAG = re.compile(r"function-\w+\[.*\]|str|int|float|bool|list\[.*\]|dict\[.*\]")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# What an API key's value may hold: printable ASCII without spaces.
_KEY_VALUE_RE = re.compile(r"[\x21-\x7e]+")


def is_loopback_url(url: str) -> bool:
    """True when the URL's host is this machine (localhost or a loopback address)."""
    try:
        return is_loopback_host(urllib.parse.urlsplit(url).hostname)
    except ValueError:
        return False


def is_loopback_host(host: str | None) -> bool:
    """True for localhost and loopback addresses (a URL's `hostname`: lower case, no [])."""
    if host is None:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _between(lo: float, hi: float) -> AfterValidator:
    def check(value: float) -> float:
        if not (lo <= value <= hi) or math.isnan(value):
            raise ValueError(f"must be between {_num(lo)} and {_num(hi)} (got {_num(value)})")
        return value

    return AfterValidator(check)


def _at_least(lo: float) -> AfterValidator:
    def check(value: float) -> float:
        if value < lo or math.isnan(value):
            raise ValueError(f"must be at least {_num(lo)} (got {_num(value)})")
        return value

    return AfterValidator(check)


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


Temperature = Annotated[float, _between(0, 2)]
TopP = Annotated[float, _between(0, 1)]
Penalty = Annotated[float, _between(-2, 2)]
PositiveInt = Annotated[int, _at_least(1)]
PositiveFloat = Annotated[float, _at_least(0.001)]
NonNegativeFloat = Annotated[float, _at_least(0)]


class _Strict(BaseModel):
    # extra="forbid" turns a typo into an error instead of a silently ignored key.
    # defer_build: each model's validator is built when first used, as part of the spec's
    # one schema, rather than one by one at import (~15 ms less CPU on every start-up).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, defer_build=True)


class CsvOptions(_Strict):
    """How a CSV input is written (`[input] csv = { delimiter = ";", encoding = "latin-1" }`)."""

    delimiter: str = ","
    quote_char: str = '"'
    # Any Python codec name: utf-8, utf-8-sig, latin-1, cp1252, utf-16, ...
    encoding: str = "utf-8"

    @field_validator("delimiter", "quote_char")
    @classmethod
    def _one_character(cls, value: str) -> str:
        if len(value) != 1 or value in "\r\n":
            raise ValueError(f"must be one character, not a line break (got {value!r})")
        return value

    @field_validator("encoding")
    @classmethod
    def _known_encoding(cls, value: str) -> str:
        try:
            text = codecs.lookup(value)._is_text_encoding
        except LookupError:
            text = False
        if not text:
            raise ValueError(
                f"unknown encoding {value!r} (e.g. utf-8, utf-8-sig, latin-1, cp1252, utf-16)"
            )
        return value

    @model_validator(mode="after")
    def _distinct(self) -> CsvOptions:
        if self.delimiter == self.quote_char:
            raise ValueError("delimiter and quote_char must differ")
        return self


class InputSpec(_Strict):
    path: str
    format: Literal["auto", "parquet", "jsonl", "csv", "openai-batch"] = "auto"
    id_column: str | None = None
    prompt_column: str | None = None
    messages_column: str | None = None
    template: str | None = None
    system: str | None = None
    # The whole file is checked before anything is spent; off for huge trusted inputs.
    check_whole_file: bool = True
    # A row whose prompt is estimated above this many tokens fails without being sent.
    max_prompt_tokens: PositiveInt | None = None
    # CSV dialect and encoding; only for CSV input.
    csv: CsvOptions = Field(default_factory=CsvOptions)

    @model_validator(mode="after")
    def _one_prompt_source(self) -> InputSpec:
        given = [
            name
            for name in ("prompt_column", "messages_column", "template")
            if getattr(self, name) is not None
        ]
        if "csv" in self.model_fields_set and self.format not in ("auto", "csv"):
            raise ValueError(f"csv options are for CSV input only (format = {self.format!r})")
        if self.format == "openai-batch":
            if given:
                raise ValueError(f"{given[0]} cannot be used with format = 'openai-batch'")
        elif len(given) != 1:
            raise ValueError(
                "exactly one of prompt_column, messages_column, template is required"
                + (f" (got {', '.join(given)})" if given else "")
            )
        return self


class EndpointSpec(_Strict):
    # Declared before base_url so the base_url check can see it.
    allow_insecure: bool = False
    base_url: str = SIMULATOR
    api_key_env: str | None = None
    timeout_s: PositiveFloat = 120.0
    connect_timeout_s: PositiveFloat = 10.0
    headers: dict[str, str] = Field(default_factory=dict)
    # An answer body (raw or decompressed) above this fails its row, not retried.
    max_response_bytes: Annotated[int, _between(1024, 2**40)] = 32 * 1024 * 1024
    # PEM certificates to trust instead of the system store (a path relative to the spec).
    ca_bundle: str | None = None
    # Switches for the built-in simulator when base_url = "simulator" (see runner simulate).
    simulator: dict[str, Any] = Field(default_factory=dict)

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str, info: ValidationInfo) -> str:
        if value == SIMULATOR:
            return value
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"must be an http(s) URL or {SIMULATOR!r} (got {value!r})")
        if _CONTROL_RE.search(value) or " " in value:
            raise ValueError("must not contain spaces or control characters")
        try:
            parts = urllib.parse.urlsplit(value)
            port = parts.port
        except ValueError:
            # Never echo it: the bad part may be a password.
            raise ValueError(
                "is not a valid URL (its port must be a number 1-65535, an IPv6 address "
                "goes in [brackets])"
            ) from None
        if "@" in parts.netloc:
            raise ValueError("must not carry credentials (user:password@): set api_key_env instead")
        if not parts.hostname:
            raise ValueError(f"has no host (got {value!r})")
        if port is not None and not 1 <= port <= 65535:
            raise ValueError(f"port must be 1-65535 (got {port})")
        if (
            value.startswith("http://")
            and not info.data.get("allow_insecure")
            and not is_loopback_host(parts.hostname)
        ):
            raise ValueError(
                "uses http:// for a non-loopback host; use https:// or set allow_insecure = true"
            )
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_NAME_RE.match(value):
            raise ValueError(
                "must be the NAME of an environment variable holding the key, not the key itself"
            )
        return value

    @field_validator("headers")
    @classmethod
    def _safe_headers(cls, value: dict[str, str]) -> dict[str, str]:
        for name, text in value.items():
            if not _TOKEN_RE.fullmatch(name):
                raise ValueError(
                    f"header name {short_repr(name)} must be letters, digits and !#$%&'*+-.^_`|~"
                )
            lowered = name.lower()
            if lowered in ("authorization", "api-key", "x-api-key"):
                raise ValueError(
                    f"the {name} header carries a secret: set api_key_env to the name of an "
                    "environment variable instead"
                )
            if lowered in _MANAGED_HEADERS:
                raise ValueError(f"the {name} header is set by the runner; remove it")
            if _CONTROL_RE.search(text):
                raise ValueError(
                    f"the value of header {name} holds a control character (CR, LF, NUL...)"
                )
        return value

    @field_validator("ca_bundle")
    @classmethod
    def _ca_path(cls, value: str | None) -> str | None:
        if value is not None and (not value or _CONTROL_RE.search(value)):
            raise ValueError("must be the path of a PEM file")
        return value


# Header names are RFC 9110 tokens; values may hold no control character but tab.
_TOKEN_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CONTROL_RE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Headers the HTTP layer owns: a second copy would split or smuggle the request.
_MANAGED_HEADERS = frozenset(
    ("host", "content-length", "transfer-encoding", "connection", "te", "upgrade", "trailer",
     "keep-alive", "proxy-authorization", "proxy-connection", "expect", "accept-encoding")
)  # fmt: skip


ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]


class RequestSpec(_Strict):
    """Chat-completions fields sent with every request (validated before sending)."""

    model: str | list[str] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    stop: str | list[str] | None = None
    max_tokens: PositiveInt | None = None
    max_completion_tokens: PositiveInt | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: dict[str, Annotated[float, _between(-100, 100)]] | None = None
    reasoning_effort: ReasoningEffort | None = None
    seed: int | None = None
    n: Annotated[int, _between(1, 1)] | None = None  # one answer per row: n > 1 is refused
    user: str | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, _between(0, 20)] | None = None
    service_tier: str | None = None
    verbosity: Literal["low", "medium", "high"] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    # Provider-specific fields, merged into the body as they are.
    extra_body: dict[str, Any] = Field(default_factory=dict)

    @field_validator("model")
    @classmethod
    def _models(cls, value: str | list[str] | None) -> str | list[str] | None:
        if value is None:
            return value
        models = [value] if isinstance(value, str) else value
        if not models or any(not m.strip() for m in models):
            raise ValueError("must be a model name or a non-empty list of model names")
        if len(set(models)) != len(models):
            raise ValueError("lists a model twice")
        return value

    @property
    def models(self) -> list[str]:
        if self.model is None:
            return []
        return [self.model] if isinstance(self.model, str) else list(self.model)

    def body_fields(self) -> dict[str, Any]:
        """The fields every request body carries besides `model` and `messages`."""
        fields = self.model_dump(exclude_none=True, exclude={"model", "extra_body"})
        fields.update(self.extra_body)
        return fields

    @property
    def answer_cap(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class ModelLimits(_Strict):
    """Client-side limits for one model (`[run.limits."gpt-4o"]`)."""

    requests_per_minute: PositiveFloat | None = None
    tokens_per_minute: PositiveFloat | None = None
    concurrency: Annotated[int, _between(1, 10_000)] | None = None


class RunSpec(_Strict):
    concurrency: Annotated[int, _between(1, 10_000)] = 64
    # Client-side limits (token buckets); the provider's x-ratelimit-* headers are also obeyed.
    requests_per_minute: PositiveFloat | None = None
    tokens_per_minute: PositiveFloat | None = None
    # Halve concurrency on a burst of 429s, grow back by one per window of clean answers.
    adaptive_concurrency: bool = True
    limits: dict[str, ModelLimits] = Field(default_factory=dict)
    # Stop scheduling before spent + reserved worst-case cost would pass this (USD).
    budget_usd: NonNegativeFloat | None = None
    max_attempts: Annotated[int, _between(1, 100)] = 6
    # Total time a row may take across all its attempts and waits.
    row_deadline_s: PositiveFloat = 900.0
    backoff_base_s: NonNegativeFloat = 0.5
    backoff_max_s: NonNegativeFloat = 60.0
    max_retry_after_s: NonNegativeFloat = 120.0
    # Time in-flight requests get to finish after the first SIGINT/SIGTERM.
    grace_s: NonNegativeFloat = 30.0
    # finish_reason values that are re-asked instead of kept (off by default: they were paid for).
    retry_finish_reasons: list[Literal["length", "content_filter"]] = Field(default_factory=list)
    # How many failures of every request at the start (401/403/unreachable) stop the run.
    auth_failures_to_stop: Annotated[int, _between(1, 1000)] = 3


class OutputSpec(_Strict):
    """How answers are checked (`[output]`): a JSON Schema, and re-asks of invalid answers."""

    # Attribute `schema_file`: `schema` would shadow a pydantic BaseModel method.
    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=False, defer_build=True, populate_by_name=False
    )

    # A JSON Schema file, relative to the spec; else request.response_format's json_schema.
    schema_file: str | None = Field(default=None, alias="schema")
    # Tolerate one fenced ```json block and prose around the JSON.
    lenient: bool = False
    # Re-asks of an invalid answer after the first (0: keep the first answer, valid or not).
    max_invalid_attempts: Annotated[int, _between(0, 20)] = 2
    # resend: the same request again; feedback: the answer and its error as a follow-up.
    repair: Literal["resend", "feedback"] = "resend"

    @field_validator("schema_file")
    @classmethod
    def _schema_path(cls, value: str | None) -> str | None:
        if value is not None and (not value.strip() or _CONTROL_RE.search(value)):
            raise ValueError("must be the path of a JSON Schema file, relative to the spec")
        return value


class JobSpec(_Strict):
    name: str
    input: InputSpec
    endpoint: EndpointSpec = Field(default_factory=EndpointSpec)
    # Optional only for format = "openai-batch", whose lines carry their own bodies.
    request: RequestSpec | None = None
    run: RunSpec = Field(default_factory=RunSpec)
    output: OutputSpec = Field(default_factory=OutputSpec)
    # USD per million tokens by model; validated by runner.report.pricing.parse_price_table.
    prices: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}", value):
            raise ValueError(
                "must be 1-64 characters of letters, digits, '_', '-', '.', "
                "starting with a letter or digit"
            )
        return value


class LoadedSpec:
    """A validated spec plus where it came from (paths resolve against its folder)."""

    __slots__ = ("hash", "job", "path", "text")

    def __init__(self, job: JobSpec, path: Path, text: str) -> None:
        self.job = job
        self.path = path
        self.text = text
        self.hash = hashlib.sha256(text.encode()).hexdigest()

    @property
    def input_path(self) -> Path:
        return (self.path.parent / self.job.input.path).resolve()

    @property
    def ca_bundle(self) -> Path | None:
        """endpoint.ca_bundle, resolved against the spec's folder."""
        ca = self.job.endpoint.ca_bundle
        return None if ca is None else (self.path.parent / Path(ca).expanduser()).resolve()

    @property
    def schema_path(self) -> Path | None:
        """output.schema, resolved against the spec's folder."""
        name = self.job.output.schema_file
        return None if name is None else (self.path.parent / Path(name).expanduser()).resolve()


def read_text(path: Path, shown: str, what: str) -> str:
    """A UTF-8 text file's contents, or a one-line SpecError saying why not."""
    try:
        if not path.is_dir() and not stat.S_ISREG(path.stat().st_mode):
            # /dev/zero or a FIFO: read forever, or wait for a writer
            raise SpecError(shown, "", f"is not a regular file, so not {what}")
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(shown, "", "no such file") from None
    except IsADirectoryError:
        raise SpecError(shown, "", f"is a directory, not {what}") from None
    except UnicodeDecodeError:
        raise SpecError(shown, "", "is not UTF-8 text") from None
    except OSError as exc:
        raise SpecError(shown, "", f"cannot be read ({exc.strerror})") from None


def load_spec(path: str | Path, *, display: str | None = None) -> LoadedSpec:
    """Read and validate a job spec; raises SpecError naming the file and field."""
    path = Path(path)
    shown = display or str(path)
    return parse_spec(read_text(path, shown, "a job spec"), path=path, display=shown)


def parse_spec(text: str, *, path: Path, display: str) -> LoadedSpec:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(display, "", f"invalid TOML: {exc}") from None
    _refuse_secrets(data, display)
    try:
        job = JobSpec.model_validate(data)
    except ValidationError as exc:
        raise _first_error(exc, display) from None
    if job.input.format != "openai-batch" and (job.request is None or not job.request.models):
        raise SpecError(display, "request.model", "is required")
    return LoadedSpec(job, path.resolve(), text)


def input_spec_of(text: str, path: str) -> InputSpec | None:
    """The [input] table of a spec's text, read from `path`; None when it is not valid
    (a frozen spec of an older version, say)."""
    try:
        table = tomllib.loads(text).get("input")
        if not isinstance(table, dict):
            return None
        return InputSpec.model_validate({**table, "path": path})
    except (tomllib.TOMLDecodeError, ValidationError):
        return None


# What a resume may take from an edited spec: how to reach the endpoint, how fast and how
# long to run, and at what prices. Everything else (the request, how prompts are read from
# the input, the name) decides what is sent, and answers already stored were asked that way.
RESUME_MAY_CHANGE = frozenset({"endpoint", "run", "prices"})
# [input] keys that change nothing that is sent (the path is compared resolved).
_INPUT_FREE = frozenset({"path", "check_whole_file"})
# The schema file is compared by content, not by path (runner/output/schema.py freezes it).
_OUTPUT_FREE = frozenset({"schema_file"})


def sent_fields_changed(old: LoadedSpec, new: LoadedSpec) -> str | None:
    """The dotted name of the first field that differs between two specs and would change
    what is sent, or None when only endpoint, [run] and [prices] settings differ."""
    a, b = old.job.model_dump(), new.job.model_dump()
    for section in JobSpec.model_fields:
        if section in RESUME_MAY_CHANGE:
            continue
        if section == "input":
            if old.input_path != new.input_path:
                return "input.path"
            for key in a["input"]:
                if key not in _INPUT_FREE and not _same(a["input"][key], b["input"].get(key)):
                    return f"input.{key}"
            continue
        if section == "output":
            for key in a["output"]:
                x, y = a["output"][key], b["output"].get(key)
                if key in _OUTPUT_FREE and (x is None) == (y is None):
                    continue
                if not _same(x, y):
                    return "output.schema" if key == "schema_file" else f"output.{key}"
            continue
        if _same(a[section], b[section]):
            continue
        if isinstance(a[section], dict) and isinstance(b[section], dict):
            for key in sorted(set(a[section]) | set(b[section])):
                if not _same(a[section].get(key), b[section].get(key)):
                    return f"{section}.{key}"
        return section
    return None


def _same(a: Any, b: Any) -> bool:
    """Equal as sent: `true`, `1` and `1.0` are equal in Python, not on the wire (nor in
    the request hash). Key order does not matter."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


def check_environment(spec: LoadedSpec, environ: dict[str, str] | None = None) -> None:
    """Checks that need the world outside the spec text: the API key variable."""
    env = os.environ if environ is None else environ
    name = spec.job.endpoint.api_key_env
    if name is not None and not env.get(name):
        raise SpecError(
            str(spec.path), "endpoint.api_key_env", f"environment variable {name} is not set"
        )
    if name is not None and not _KEY_VALUE_RE.fullmatch(env[name]):
        # Names the variable, never the value: it is the key.
        raise SpecError(
            str(spec.path),
            "endpoint.api_key_env",
            f"environment variable {name} holds whitespace, control or non-ASCII characters; "
            "a key is one printable word",
        )
    ca = spec.ca_bundle
    if ca is not None and not ca.is_file():
        raise SpecError(str(spec.path), "endpoint.ca_bundle", f"no such file: {ca}")


def _refuse_secrets(data: Any, display: str, where: str = "") -> None:
    if isinstance(data, dict):
        for key, value in data.items():
            if _SECRET_RE.search(str(key)):
                raise SpecError(display, where, _SECRET_HELP)
            field = f"{where}.{key}" if where else str(key)
            if str(key).lower() in ("api_key", "apikey", "key", "token", "secret", "password"):
                if isinstance(value, str) and value:
                    raise SpecError(display, field, _SECRET_HELP)
            _refuse_secrets(value, display, field)
    elif isinstance(data, list):
        for i, value in enumerate(data):
            _refuse_secrets(value, display, f"{where}[{i}]")
    elif isinstance(data, str) and _SECRET_RE.search(data):
        raise SpecError(display, where, _SECRET_HELP)


_SECRET_HELP = (
    "looks like an API key; never write a key in a spec: put it in an environment "
    "variable and name that variable in endpoint.api_key_env"
)


def _first_error(exc: ValidationError, display: str) -> SpecError:
    err = exc.errors(include_url=False)[0]
    # pydantic appends the union member or the validator to the location; keep the field path.
    loc = [str(part) for part in err["loc"] if not _TYPE_TAG.fullmatch(str(part))]
    field = ".".join(loc)
    kind = err["type"]
    ctx = err.get("ctx") or {}
    if kind == "extra_forbidden":
        message = "unknown key" + _did_you_mean(loc)
    elif kind == "missing":
        message = "is required"
    elif kind == "value_error" and "error" in ctx:
        message = str(ctx["error"])
    elif kind == "literal_error":
        message = f"must be one of {ctx.get('expected', '')} (got {err['input']!r})"
    else:
        message = f"{err['msg'][0].lower()}{err['msg'][1:]} (got {short_repr(err.get('input'))})"
    return SpecError(display, field, message)


def short_repr(value: Any) -> str:
    """A value as it may appear in a one-line error: its repr, cut at 60 characters."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _did_you_mean(loc: list[str]) -> str:
    if not loc:
        return ""
    model: type[BaseModel] | None = JobSpec
    for part in loc[:-1]:
        info = model.model_fields.get(part) if model else None
        annotation = info.annotation if info else None
        # Optional tables are `Model | None`: look through the union for the model.
        candidates = [annotation, *typing.get_args(annotation)]
        model = next(
            (a for a in candidates if isinstance(a, type) and issubclass(a, BaseModel)), None
        )
    if model is None:
        return ""
    names = [info.alias or name for name, info in model.model_fields.items()]
    close = difflib.get_close_matches(loc[-1], names, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""

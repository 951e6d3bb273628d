"""Job specs: every validation error is one line naming the field; valid specs load whole."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.errors import SpecError
from runner.spec import check_environment, load_spec, parse_spec

from .conftest import run_cli, spec_text, write_spec

DISPLAY = "jobs/x.toml"
KEY = "sk-proj-SENTINEL0123456789abcdef"
SECRET_HELP = (
    "looks like an API key; never write a key in a spec: put it in an environment "
    "variable and name that variable in endpoint.api_key_env"
)
BASE = spec_text()


def parse(text: str) -> Any:
    return parse_spec(text, path=Path(DISPLAY), display=DISPLAY)


def fails(text: str) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse(text)
    return info.value


def swap(old: str, new: str) -> str:
    """The default test spec with one line replaced (the line must be there)."""
    assert old in BASE
    return BASE.replace(old, new)


# (spec text, field, exact message or a pattern the message must match in full)
INVALID: list[Any] = [
    pytest.param(
        spec_text(request_extra="temperature = 3"),
        "request.temperature",
        "must be between 0 and 2 (got 3)",
        id="temperature-high",
    ),
    pytest.param(
        spec_text(request_extra="temperature = -0.5"),
        "request.temperature",
        "must be between 0 and 2 (got -0.5)",
        id="temperature-negative",
    ),
    pytest.param(
        spec_text(request_extra="temperature = nan"),
        "request.temperature",
        "must be between 0 and 2 (got nan)",
        id="temperature-nan",
    ),
    pytest.param(
        spec_text(request_extra="top_p = 1.5"),
        "request.top_p",
        "must be between 0 and 1 (got 1.5)",
        id="top_p",
    ),
    pytest.param(
        spec_text(request_extra="presence_penalty = -2.5"),
        "request.presence_penalty",
        "must be between -2 and 2 (got -2.5)",
        id="presence_penalty",
    ),
    pytest.param(
        spec_text(request_extra="frequency_penalty = 2.1"),
        "request.frequency_penalty",
        "must be between -2 and 2 (got 2.1)",
        id="frequency_penalty",
    ),
    pytest.param(
        spec_text(request_extra='reasoning_effort = "extreme"'),
        "request.reasoning_effort",
        "must be one of 'none', 'minimal', 'low', 'medium', 'high' or 'xhigh' (got 'extreme')",
        id="reasoning_effort",
    ),
    pytest.param(
        swap("max_tokens = 64", "max_tokens = 0"),
        "request.max_tokens",
        "must be at least 1 (got 0)",
        id="max_tokens",
    ),
    pytest.param(
        spec_text(request_extra="max_completion_tokens = 0"),
        "request.max_completion_tokens",
        "must be at least 1 (got 0)",
        id="max_completion_tokens",
    ),
    pytest.param(
        spec_text(request_extra="n = 2"),
        "request.n",
        "must be between 1 and 1 (got 2)",
        id="n-above-one",
    ),
    pytest.param(
        swap('model = "gpt-4o-mini"', 'model = ["a", "a"]'),
        "request.model",
        "lists a model twice",
        id="model-twice",
    ),
    pytest.param(
        swap('model = "gpt-4o-mini"', "model = []"),
        "request.model",
        "must be a model name or a non-empty list of model names",
        id="model-empty-list",
    ),
    pytest.param(
        spec_text(request_extra='temperature = "hot"'),
        "request.temperature",
        re.compile(r"input should be a valid number.* \(got 'hot'\)"),
        id="temperature-string",
    ),
    pytest.param(
        swap("concurrency = 16", 'concurrency = "many"'),
        "run.concurrency",
        re.compile(r"input should be a valid integer.* \(got 'many'\)"),
        id="concurrency-string",
    ),
    pytest.param(
        swap("timeout_s = 10", "timeout_s = [10]"),
        "endpoint.timeout_s",
        re.compile(r"input should be a valid number.* \(got \[10\]\)"),
        id="timeout-list",
    ),
    pytest.param(
        'name = "x"\ninput = "data.jsonl"\n',
        "input",
        re.compile(r"input should be a valid dictionary.* \(got 'data.jsonl'\)"),
        id="section-not-a-table",
    ),
    pytest.param(
        'nmae = "x"\n' + BASE,
        "nmae",
        "unknown key (did you mean 'name'?)",
        id="unknown-top-level",
    ),
    pytest.param(
        spec_text(run_extra="concurency = 4"),
        "run.concurency",
        "unknown key (did you mean 'concurrency'?)",
        id="unknown-run",
    ),
    pytest.param(
        spec_text(input_extra='prompt_column = "text"\nformt = "csv"'),
        "input.formt",
        "unknown key (did you mean 'format'?)",
        id="unknown-input",
    ),
    pytest.param(
        spec_text(endpoint_extra="zzzz = 1"),
        "endpoint.zzzz",
        "unknown key",
        id="unknown-no-suggestion",
    ),
    pytest.param(
        spec_text(request_extra="temprature = 1"),
        "request.temprature",
        "unknown key (did you mean 'temperature'?)",
        id="unknown-request",
    ),
    pytest.param(swap('name = "t"', ""), "name", "is required", id="missing-name"),
    pytest.param(
        swap('path = "data.jsonl"', ""), "input.path", "is required", id="missing-input-path"
    ),
    pytest.param(
        swap('model = "gpt-4o-mini"', ""), "request.model", "is required", id="missing-model"
    ),
    pytest.param(
        'name = "t"\n[input]\npath = "d.jsonl"\nprompt_column = "text"\n',
        "request.model",
        "is required",
        id="missing-request-table",
    ),
    pytest.param(
        spec_text(input_extra='id_column = "id"'),
        "input",
        "exactly one of prompt_column, messages_column, template is required",
        id="no-prompt-source",
    ),
    pytest.param(
        spec_text(input_extra='prompt_column = "a"\ntemplate = "{b}"'),
        "input",
        "exactly one of prompt_column, messages_column, template is required "
        "(got prompt_column, template)",
        id="two-prompt-sources",
    ),
    pytest.param(
        spec_text(input_extra='format = "openai-batch"\nprompt_column = "a"'),
        "input",
        "prompt_column cannot be used with format = 'openai-batch'",
        id="prompt-source-with-batch",
    ),
    pytest.param(
        spec_text(input_extra='prompt_column = "a"\nformat = "xml"'),
        "input.format",
        "must be one of 'auto', 'parquet', 'jsonl', 'csv' or 'openai-batch' (got 'xml')",
        id="input-format",
    ),
    pytest.param(
        spec_text(name="bad name!"),
        "name",
        "must be 1-64 characters of letters, digits, '_', '-', '.', "
        "starting with a letter or digit",
        id="job-name-characters",
    ),
    pytest.param(
        spec_text(name="x" * 65),
        "name",
        "must be 1-64 characters of letters, digits, '_', '-', '.', "
        "starting with a letter or digit",
        id="job-name-too-long",
    ),
    pytest.param(
        swap("concurrency = 16", "concurrency = 0"),
        "run.concurrency",
        "must be between 1 and 10000 (got 0)",
        id="concurrency-zero",
    ),
    pytest.param(
        swap("concurrency = 16", "concurrency = 10001"),
        "run.concurrency",
        "must be between 1 and 10000 (got 10001)",
        id="concurrency-too-high",
    ),
    pytest.param(
        spec_text(run_extra='retry_finish_reasons = ["stop"]'),
        "run.retry_finish_reasons.0",
        "must be one of 'length' or 'content_filter' (got 'stop')",
        id="retry-finish-reasons",
    ),
    pytest.param(
        spec_text(base_url="http://api.example.com/v1"),
        "endpoint.base_url",
        "uses http:// for a non-loopback host; use https:// or set allow_insecure = true",
        id="http-remote",
    ),
    pytest.param(
        spec_text(base_url="ftp://example.com"),
        "endpoint.base_url",
        "must be an http(s) URL or 'simulator' (got 'ftp://example.com')",
        id="not-http",
    ),
    pytest.param(
        spec_text(endpoint_extra='api_key_env = "my key"'),
        "endpoint.api_key_env",
        "must be the NAME of an environment variable holding the key, not the key itself",
        id="api-key-env-not-a-name",
    ),
]


@pytest.mark.parametrize(("text", "field", "message"), INVALID)
def test_invalid_spec_is_one_line_naming_the_field(
    text: str, field: str, message: str | re.Pattern[str]
) -> None:
    """Each invalid spec raises SpecError whose single line is `path: field: message`."""
    err = fails(text)
    assert (err.path, err.field) == (DISPLAY, field)
    if isinstance(message, str):
        assert err.message == message
    else:
        assert message.fullmatch(err.message), err.message
    assert str(err) == f"{DISPLAY}: {field}: {err.message}"
    assert "\n" not in str(err)


def test_invalid_toml_is_reported_with_its_position() -> None:
    """Text that is not TOML is refused as `path: invalid TOML: ...` with line and column."""
    err = fails(BASE + "\n[[[\n")
    assert err.field == ""
    assert re.fullmatch(rf"{DISPLAY}: invalid TOML: .*\(at line \d+, column \d+\)", str(err))


@pytest.mark.parametrize(
    ("text", "field"),
    [
        pytest.param("strange = 1\n" + BASE, "strange", id="top-level"),
        pytest.param(spec_text(run_extra="integer = 1"), "run.integer", id="nested"),
    ],
)
def test_unknown_key_named_like_a_type_is_a_spec_error(text: str, field: str) -> None:
    """An unknown key whose name starts like a type name is still reported under its own name."""
    err = fails(text)
    assert err.field == field
    assert err.message.startswith("unknown key")


# -- secrets ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "field"),
    [
        pytest.param(
            spec_text(endpoint_extra=f'api_key = "{KEY}"'), "endpoint.api_key", id="api_key"
        ),
        pytest.param(
            spec_text(endpoint_extra=f'api_key_env = "{KEY}"'),
            "endpoint.api_key_env",
            id="api_key_env",
        ),
        pytest.param(
            spec_text(endpoint_extra=f'headers = {{ Authorization = "Bearer {KEY}" }}'),
            "endpoint.headers.Authorization",
            id="authorization-header",
        ),
        pytest.param(
            spec_text(endpoint_extra=f'headers = {{ "X-Custom" = "{KEY}" }}'),
            "endpoint.headers.X-Custom",
            id="any-header",
        ),
        pytest.param(
            spec_text(request_extra=f'extra_body = {{ provider = {{ token = "{KEY[:12]}" }} }}'),
            "request.extra_body.provider.token",
            id="nested-token-key",
        ),
        pytest.param(
            spec_text(request_extra=f'stop = ["END", "{KEY}"]'),
            "request.stop[1]",
            id="in-a-list",
        ),
        pytest.param(
            spec_text(input_extra=f'prompt_column = "text"\nsystem = "use {KEY} please"'),
            "input.system",
            id="inside-text",
        ),
        pytest.param(
            f'"{KEY}" = 1\n' + BASE,
            "",
            id="as-a-key-name",
        ),
    ],
)
def test_literal_api_key_is_refused_without_echoing_it(text: str, field: str) -> None:
    """A key pasted anywhere in a spec is refused, pointing at an environment variable, and the
    message holds no 6+ character piece of the key."""
    err = fails(text)
    if field:
        assert err.field == field
    assert err.message == SECRET_HELP
    pieces = {KEY[i : i + 6] for i in range(len(KEY) - 5)}
    assert not [p for p in pieces if p in str(err)]


@pytest.mark.parametrize("header", ["Authorization", "api-key", "X-API-Key"])
def test_credential_header_is_refused_even_without_a_key_shaped_value(header: str) -> None:
    """A header that carries credentials is refused whatever its value, naming endpoint.headers."""
    err = fails(spec_text(endpoint_extra=f'headers = {{ "{header}" = "abc" }}'))
    assert err.field == "endpoint.headers"
    assert err.message == (
        f"the {header} header carries a secret: set api_key_env to the name of an "
        "environment variable instead"
    )


# -- base_url --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base_url", "extra", "expected"),
    [
        ("http://127.0.0.1:8080/v1", "", "http://127.0.0.1:8080/v1"),
        ("http://localhost:8080/v1/", "", "http://localhost:8080/v1"),
        ("http://[::1]:8080/v1", "", "http://[::1]:8080/v1"),
        ("https://api.example.com/v1/", "", "https://api.example.com/v1"),
        ("http://api.example.com/v1", "allow_insecure = true", "http://api.example.com/v1"),
        ("simulator", "", "simulator"),
    ],
)
def test_base_url_accepted(base_url: str, extra: str, expected: str) -> None:
    """https, loopback http, opted-in insecure http and the simulator are accepted as given."""
    job = parse(spec_text(base_url=base_url, endpoint_extra=extra)).job
    assert job.endpoint.base_url == expected


@pytest.mark.parametrize(
    ("base_url", "message"),
    [
        ("http://localhost.evil.example/v1", "uses http:// for a non-loopback host"),
        ("http://127.evil.example/v1", "uses http:// for a non-loopback host"),
        # "localhost" is the user part here, the host evil.example.
        ("http://localhost@evil.example/v1", "must not carry credentials"),
        ("http://localhostevil.example/v1", "uses http:// for a non-loopback host"),
    ],
)
def test_look_alike_loopback_host_over_http_is_refused(base_url: str, message: str) -> None:
    """A remote host that only starts like a loopback name still needs https."""
    err = fails(spec_text(base_url=base_url))
    assert err.field == "endpoint.base_url"
    assert err.message.startswith(message), err.message


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        (
            '{ "X-Team" = "a\\r\\nHost: evil.example" }',
            "the value of header X-Team holds a control",
        ),
        ('{ "X-Team" = "a\\u0000b" }', "the value of header X-Team holds a control"),
        ('{ "X-Team" = "a\\nb" }', "the value of header X-Team holds a control"),
        ('{ "X-Te\\r\\nam" = "a" }', "header name 'X-Te\\r\\nam' must be"),
        ('{ "X Team" = "a" }', "header name 'X Team' must be"),
        ('{ "Host" = "evil.example" }', "the Host header is set by the runner"),
        ('{ "content-length" = "5" }', "the content-length header is set by the runner"),
        ('{ "Transfer-Encoding" = "chunked" }', "the Transfer-Encoding header is set by"),
        ('{ "Connection" = "close" }', "the Connection header is set by the runner"),
    ],
)
def test_headers_that_would_split_or_smuggle_a_request_are_refused(
    headers: str, message: str
) -> None:
    err = fails(spec_text(endpoint_extra=f"headers = {headers}"))
    assert err.field == "endpoint.headers"
    assert err.message.startswith(message), err.message
    assert "\n" not in str(err) and "\r" not in str(err)


@pytest.mark.parametrize(
    ("base_url", "message"),
    [
        ("https://user:secret-pass@api.example.com/v1", "must not carry credentials"),
        ("https://token@api.example.com/v1", "must not carry credentials"),
        ("http://127.0.0.1:0/v1", "port must be 1-65535 (got 0)"),
        ("http://127.0.0.1:70000/v1", "is not a valid URL"),
        ("http://127.0.0.1:99999999999/v1", "is not a valid URL"),
        ("http://127.0.0.1:port/v1", "is not a valid URL"),
        ("https:///v1", "has no host"),
        # An http:// URL is checked as a URL before the loopback rule: the reason named is
        # the URL's own fault, not "non-loopback".
        ("http://[::1/v1", "is not a valid URL"),
        ("http:///v1", "has no host"),
        ("http://user:secret-pass@api.example.com/v1", "must not carry credentials"),
    ],
)
def test_base_url_credentials_and_bad_ports_are_refused(base_url: str, message: str) -> None:
    err = fails(spec_text(base_url=base_url))
    assert err.field == "endpoint.base_url"
    assert err.message.startswith(message), err.message
    assert "secret-pass" not in str(err)


@pytest.mark.parametrize("value", ["sk-abc def", "sk-abc\n", "\tsk-abc", "sk-abc\x00", "sk-é"])
def test_a_key_variable_holding_whitespace_or_controls_is_refused(value: str) -> None:
    spec = parse(spec_text(endpoint_extra='api_key_env = "MY_KEY"'))
    with pytest.raises(SpecError) as info:
        check_environment(spec, {"MY_KEY": value})
    assert info.value.field == "endpoint.api_key_env"
    assert "MY_KEY" in info.value.message
    assert "sk-abc" not in str(info.value)


def test_max_response_bytes_and_ca_bundle(tmp_path: Path) -> None:
    job = parse(spec_text()).job
    assert job.endpoint.max_response_bytes == 32 * 1024 * 1024
    assert job.endpoint.ca_bundle is None
    err = fails(spec_text(endpoint_extra="max_response_bytes = 10"))
    assert err.field == "endpoint.max_response_bytes"
    spec_path = tmp_path / "sub" / "job.toml"
    spec_path.parent.mkdir()
    text = spec_text(endpoint_extra='ca_bundle = "../pki/ca.pem"')
    loaded = parse_spec(text, path=spec_path, display="job.toml")
    assert loaded.ca_bundle == (tmp_path / "pki" / "ca.pem").resolve()
    with pytest.raises(SpecError) as info:
        check_environment(loaded, {})
    assert info.value.field == "endpoint.ca_bundle"
    (tmp_path / "pki").mkdir()
    (tmp_path / "pki" / "ca.pem").write_text("pem")
    check_environment(loaded, {})


# -- valid specs -----------------------------------------------------------------------------

FULL = """\
name = "full-spec_1.0"

[input]
path = "data/rows.parquet"
format = "parquet"
id_column = "id"
prompt_column = "text"
system = "Be brief."
check_whole_file = false
max_prompt_tokens = 1000

[endpoint]
base_url = "https://api.routeway.ai/v1/"
api_key_env = "ROUTEWAY_API_KEY"
timeout_s = 30
connect_timeout_s = 5
allow_insecure = false
headers = { "X-Title" = "tests" }

[endpoint.simulator]
latency_ms = 5

[request]
model = ["gpt-4o-mini", "gpt-4o"]
tools = [{ type = "function", function = { name = "lookup" } }]
tool_choice = "auto"
parallel_tool_calls = false
response_format = { type = "json_object" }
temperature = 0.2
top_p = 0.9
stop = ["END"]
max_tokens = 100
max_completion_tokens = 200
presence_penalty = -1.5
frequency_penalty = 1.5
logit_bias = { "50256" = -100 }
reasoning_effort = "xhigh"
seed = 7
n = 1
user = "tester"
logprobs = true
top_logprobs = 5
service_tier = "flex"
verbosity = "low"
metadata = { team = "ml" }
store = false
extra_body = { provider = { sort = "price" } }

[run]
concurrency = 10000
max_attempts = 100
row_deadline_s = 60
backoff_base_s = 0
backoff_max_s = 5
max_retry_after_s = 30
grace_s = 0
retry_finish_reasons = ["length", "content_filter"]
auth_failures_to_stop = 1
"""


def test_every_documented_field_loads(tmp_path: Path) -> None:
    """A spec using every field loads, keeps each value and builds the request fields from them."""
    spec = load_spec(write_spec(tmp_path, FULL))
    job = spec.job
    assert spec.hash == hashlib.sha256(FULL.encode()).hexdigest()
    assert spec.text == FULL
    assert spec.input_path == (tmp_path / "data" / "rows.parquet").resolve()
    assert job.name == "full-spec_1.0"
    assert job.input.max_prompt_tokens == 1000 and job.input.check_whole_file is False
    assert job.endpoint.base_url == "https://api.routeway.ai/v1"
    assert job.endpoint.headers == {"X-Title": "tests"}
    assert job.endpoint.simulator == {"latency_ms": 5}
    assert job.run.concurrency == 10000 and job.run.retry_finish_reasons == [
        "length",
        "content_filter",
    ]
    assert job.request is not None
    assert job.request.models == ["gpt-4o-mini", "gpt-4o"]
    assert job.request.answer_cap == 200
    assert job.request.body_fields() == {
        "tools": [{"type": "function", "function": {"name": "lookup"}}],
        "tool_choice": "auto",
        "parallel_tool_calls": False,
        "response_format": {"type": "json_object"},
        "temperature": 0.2,
        "top_p": 0.9,
        "stop": ["END"],
        "max_tokens": 100,
        "max_completion_tokens": 200,
        "presence_penalty": -1.5,
        "frequency_penalty": 1.5,
        "logit_bias": {"50256": -100},
        "reasoning_effort": "xhigh",
        "seed": 7,
        "n": 1,
        "user": "tester",
        "logprobs": True,
        "top_logprobs": 5,
        "service_tier": "flex",
        "verbosity": "low",
        "metadata": {"team": "ml"},
        "store": False,
        "provider": {"sort": "price"},
    }


def test_minimal_spec_gets_defaults() -> None:
    """A spec with only the required keys loads with the simulator endpoint and default run."""
    job = parse('name = "m"\n[input]\npath = "d.jsonl"\nprompt_column = "p"\n[request]\n'
                'model = "gpt-4o-mini"\n').job  # fmt: skip
    assert job.endpoint.base_url == "simulator" and job.endpoint.api_key_env is None
    assert (job.run.concurrency, job.run.max_attempts) == (64, 6)
    assert job.request is not None and job.request.body_fields() == {}


@pytest.mark.parametrize("request_table", ["", '[request]\nmodel = "gpt-4o"\n'])
def test_openai_batch_spec_needs_no_prompt_source_or_request(request_table: str) -> None:
    """format = 'openai-batch' loads without a prompt source, with or without [request]."""
    job = parse(
        f'name = "b"\n[input]\npath = "b.jsonl"\nformat = "openai-batch"\n{request_table}'
    ).job
    assert job.input.format == "openai-batch"
    assert (job.request is None) == (request_table == "")


# -- files and environment ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("nope.toml", None, "no such file"),
        (".", None, "is a directory, not a job spec"),
        ("latin1.toml", b'name = "caf\xe9"\n', "is not UTF-8 text"),
    ],
)
def test_load_spec_unreadable_file(
    tmp_path: Path, name: str, content: bytes | None, message: str
) -> None:
    """A spec path that cannot be read as text gives one line `shown: message`."""
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SpecError) as info:
        load_spec(path, display="shown.toml")
    assert str(info.value) == f"shown.toml: {message}"


@pytest.mark.parametrize("environ", [{}, {"MY_KEY": ""}])
def test_check_environment_names_the_missing_variable(environ: dict[str, str]) -> None:
    """An unset or empty API key variable fails naming endpoint.api_key_env and the variable."""
    spec = parse(spec_text(endpoint_extra='api_key_env = "MY_KEY"'))
    with pytest.raises(SpecError) as info:
        check_environment(spec, environ)
    assert info.value.field == "endpoint.api_key_env"
    assert info.value.message == "environment variable MY_KEY is not set"


def test_check_environment_reads_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the variable set in os.environ (or no key needed) the environment check passes."""
    spec = parse(spec_text(endpoint_extra='api_key_env = "MY_KEY"'))
    with pytest.raises(SpecError):
        check_environment(spec)
    monkeypatch.setenv("MY_KEY", "sk-anything")
    check_environment(spec)
    check_environment(parse(BASE), {})


# -- through the CLI -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "env", "field"),
    [
        pytest.param(
            spec_text(request_extra="temperature = 3"), {}, "request.temperature", id="spec"
        ),
        pytest.param(
            spec_text(endpoint_extra='api_key_env = "MY_KEY"'),
            {},
            "endpoint.api_key_env",
            id="environment",
        ),
    ],
)
def test_cli_bad_spec_exits_2_with_one_line(
    tmp_path: Path, spec: str, env: dict[str, str], field: str
) -> None:
    """`runner submit` on a bad spec exits 2 with one stderr line naming the field, no traceback
    and no run folder."""
    (tmp_path / "data.jsonl").write_text('{"id": 1, "text": "hi"}\n')
    path = write_spec(tmp_path, spec)
    done = run_cli("submit", str(path), "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path, env=env)
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    assert f"{path}: {field}: " in lines[0]
    assert "Traceback" not in done.stderr + done.stdout
    assert not (tmp_path / "runs").exists()


# -- property: anything in, a spec or a SpecError out ---------------------------------------

_FIELDS = [
    "name", "input", "endpoint", "request", "run", "path", "format", "prompt_column", "template",
    "messages_column", "id_column", "system", "base_url", "api_key_env", "headers", "timeout_s",
    "model", "temperature", "top_p", "max_tokens", "reasoning_effort", "tools", "extra_body",
    "concurrency", "max_attempts", "simulator", "stop", "n", "logit_bias", "metadata",
]  # fmt: skip
# Keys that look like pydantic's type tags ("str", "int") are included on purpose.
_keys = st.sampled_from(_FIELDS) | st.text(max_size=12)
_scalars = (
    st.none()  # dropped by the writer: TOML has no null
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.sampled_from(["simulator", "http://example.com", "gpt-4o", "data.jsonl", "auto"])
)


def _nest_values(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    # A named function: hypothesis inspects `extend`'s source, which is unreliable for lambdas.
    return st.lists(inner, max_size=4) | st.dictionaries(_keys, inner, max_size=5)


_values = st.recursive(_scalars, _nest_values, max_leaves=20)


def _toml_string(text: str) -> str:
    escaped = "".join(
        f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F or c in '"\\' else c for c in text
    )
    return f'"{escaped}"'


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value in (float("inf"), float("-inf")):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value if v is not None) + "]"
    pairs = (f"{_toml_string(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None)
    return "{ " + ", ".join(pairs) + " }"


def _toml_document(data: dict[str, Any]) -> str:
    return "".join(
        f"{_toml_string(k)} = {_toml_value(v)}\n" for k, v in data.items() if v is not None
    )


def _parses_or_spec_error(text: str) -> None:
    try:
        parse(text)
    except SpecError as err:
        assert str(err).startswith(f"{DISPLAY}: ")
        assert "\n" not in err.message


@settings(max_examples=150, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "name": _values | st.just("job-1"),
            "input": st.dictionaries(_keys, _values, max_size=6)
            | st.just({"path": "d.jsonl", "prompt_column": "p"}),
            "endpoint": st.dictionaries(_keys, _values, max_size=4),
            "request": st.dictionaries(_keys, _values, max_size=6) | st.just({"model": "gpt-4o"}),
            "run": st.dictionaries(_keys, _values, max_size=4),
        },
    ),
    st.dictionaries(_keys, _values, max_size=2),
)
def test_random_spec_dicts_load_or_raise_spec_error(
    sections: dict[str, Any], extra: dict[str, Any]
) -> None:
    """Random specs written as TOML either load or raise SpecError, never anything else."""
    text = _toml_document({**sections, **extra})
    _parses_or_spec_error(text)


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200) | st.lists(st.sampled_from(BASE.splitlines())).map("\n".join))
def test_random_text_loads_or_raises_spec_error(text: str) -> None:
    """Random text and shuffled spec lines either load or raise SpecError, never anything else."""
    _parses_or_spec_error(text)


def test_toml_writer_round_trips() -> None:
    """The tiny TOML writer the property tests use produces what tomllib reads back."""
    import tomllib

    data = {"a": 'x"\\\n\x7f', "b": [1, 2.5, True], "c": {"d": {"e": "f"}}, "": -3}
    assert tomllib.loads(_toml_document(data)) == json.loads(json.dumps(data))

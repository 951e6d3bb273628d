"""The HTTP client over real loopback sockets: every outcome becomes a Completion or a typed error,
and the API key never leaks into a message."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import socket
import string
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.errors import (
    AttemptError,
    ConnectFailure,
    KeyRejected,
    MalformedResponse,
    ModelNotFound,
    ProtocolFailure,
    QuotaDenied,
    RateLimited,
    RequestRejected,
    ServerFailure,
    TimeoutFailure,
)
from runner.http.client import ChatClient, Secret, scrub
from runner.http.retry import RetryPolicy, parse_retry_after
from runner.records import Completion
from runner.sim.server import SimulatorThread

from .conftest import run_cli, spec_text

KEY = "sk-SENTINEL-0123456789abcdefXYZ"


def chat(text: str, model: str = "gpt-4o-mini", **fields: Any) -> bytes:
    return json.dumps(
        {"model": model, "messages": [{"role": "user", "content": text}], **fields}
    ).encode()


async def send(
    base_url: str, body: bytes, *, api_key: Secret | None = None, timeout_s: float = 5.0
) -> Completion:
    """One attempt through a fresh ChatClient, closed afterwards."""
    client = ChatClient(
        base_url=base_url,
        api_key=api_key,
        timeout_s=timeout_s,
        connect_timeout_s=2.0,
        concurrency=2,
    )
    try:
        return await client.complete(body)
    finally:
        await client.aclose()


async def fails(base_url: str, body: bytes, kind: type[AttemptError], **options: Any) -> Any:
    with pytest.raises(kind) as info:
        await send(base_url, body, **options)
    assert type(info.value) is kind
    return info.value


# -- a tiny raw HTTP server for what the simulator cannot say -------------------------------


@dataclass
class RawServer:
    url: str
    requests: list[bytes] = field(default_factory=list)


@asynccontextmanager
async def raw_server(
    status: int, body: bytes = b"", headers: dict[str, str] | None = None
) -> AsyncIterator[RawServer]:
    """Answer every request with one canned response (and close the connection)."""
    head = [f"HTTP/1.1 {status} Canned", f"content-length: {len(body)}", "connection: close"]
    head += [f"{k}: {v}" for k, v in (headers or {}).items()]
    response = ("\r\n".join(head) + "\r\n\r\n").encode() + body
    server_box: list[RawServer] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":", 1)[1])
                    for line in request.split(b"\r\n")
                    if line.lower().startswith(b"content-length:")
                ),
                0,
            )
            request += await reader.readexactly(length)
            server_box[0].requests.append(request)
            writer.write(response)
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
            try:
                await writer.wait_closed()
            except ConnectionError:
                pass

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server_box.append(RawServer(f"http://127.0.0.1:{port}/v1"))
    try:
        yield server_box[0]
    finally:
        server.close()
        await server.wait_closed()


# -- error statuses --------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, RequestRejected),
        (401, KeyRejected),
        (402, QuotaDenied),
        (403, KeyRejected),
        (404, ModelNotFound),
        (408, ServerFailure),
        (409, ServerFailure),
        (418, RequestRejected),
        (422, RequestRejected),
        (429, RateLimited),
        (500, ServerFailure),
        (502, ServerFailure),
        (503, ServerFailure),
        (504, ServerFailure),
        (529, ServerFailure),
    ],
)
async def test_status_maps_to_its_error(
    simulator: SimulatorThread, status: int, kind: type[AttemptError]
) -> None:
    """Each error status becomes its typed error carrying the status and the provider's text."""
    exc = await fails(simulator.base_url, chat(f"hi [[sim:{status}]]"), kind)
    assert exc.status == status
    assert exc.message.startswith(f"{status} ")
    assert exc.message.endswith(f"Simulated {status} error.")


@pytest.mark.anyio
@pytest.mark.parametrize("fmt", ["seconds", "ms", "date"])
async def test_rate_limited_keeps_the_retry_after_headers(
    simulator: SimulatorThread, fmt: str
) -> None:
    """A 429 keeps its Retry-After header (seconds, ms or date) for the retry policy."""
    simulator.set_config(retry_after_s=30, retry_after_format=fmt)
    exc = await fails(simulator.base_url, chat("hi [[sim:429]]"), RateLimited)
    name = "retry-after-ms" if fmt == "ms" else "retry-after"
    assert list(exc.headers) == [name]
    wait = parse_retry_after(exc.headers)
    assert wait is not None and 28 <= wait <= 30


@pytest.mark.anyio
async def test_rate_limit_headers_are_kept(simulator: SimulatorThread) -> None:
    """x-ratelimit-* headers reach the error, lower-cased; unrelated headers do not."""
    simulator.set_config(rpm_limit=1)
    await send(simulator.base_url, chat("first"))
    exc = await fails(simulator.base_url, chat("second"), RateLimited)
    assert exc.headers["x-ratelimit-limit-requests"] == "1"
    assert exc.headers["x-ratelimit-remaining-requests"] == "0"
    assert "retry-after" in exc.headers and "x-request-id" not in exc.headers


@pytest.mark.anyio
async def test_insufficient_quota_is_a_quota_failure(simulator: SimulatorThread) -> None:
    """A 429 whose code is insufficient_quota stops the run instead of being retried."""
    simulator.set_config(insufficient_quota=True)
    exc = await fails(simulator.base_url, chat("hi"), QuotaDenied)
    assert exc.status == 429
    assert exc.message.startswith("429 insufficient_quota: You exceeded your current quota")
    assert not RetryPolicy().is_retryable(exc)


# -- transport faults ------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("switch", "kind", "status", "text"),
    [
        ("rate_drop", ProtocolFailure, None, "connection failed mid-answer"),
        ("rate_reset_mid_body", ProtocolFailure, None, "connection failed mid-answer"),
        ("rate_malformed", MalformedResponse, 200, "200 with a body that is not JSON"),
        ("rate_html", ServerFailure, 502, "502 Bad Gateway (text/html body)"),
    ],
)
async def test_faults_map_to_their_errors(
    simulator: SimulatorThread,
    switch: str,
    kind: type[AttemptError],
    status: int | None,
    text: str,
) -> None:
    """Dropped and reset connections, broken JSON and HTML error pages get their typed errors."""
    simulator.set_config(**{switch: 1.0})
    exc = await fails(simulator.base_url, chat("hi"), kind)
    assert exc.status == status
    assert exc.message.startswith(text)
    assert RetryPolicy().is_retryable(exc)


@pytest.mark.anyio
async def test_closed_port_is_a_connect_failure() -> None:
    """Nothing listening on the port is a ConnectFailure (never sent, so never billed)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    exc = await fails(f"http://127.0.0.1:{port}/v1", chat("hi"), ConnectFailure)
    assert exc.message.startswith("cannot connect")
    assert not exc.possibly_billed


@pytest.mark.anyio
async def test_slow_drip_hits_the_total_deadline(simulator: SimulatorThread) -> None:
    """An answer trickling in byte by byte is cut off by timeout_s for the whole exchange."""
    started = time.monotonic()
    exc = await fails(
        simulator.base_url, chat("hi [[sim:slow_drip]]"), TimeoutFailure, timeout_s=0.4
    )
    assert exc.message == "no complete answer within 0.4 s"
    assert time.monotonic() - started < 3


# -- raw server: redirects, HTML, x-should-retry, odd 200s -----------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_redirect_is_rejected_and_not_followed(status: int) -> None:
    """A redirect is a RequestRejected naming the target, which never sees a request."""
    async with raw_server(200, b"{}") as target:
        location = target.url + "/chat/completions"
        async with raw_server(status, headers={"location": location}) as origin:
            exc = await fails(origin.url, chat("hi"), RequestRejected, api_key=Secret(KEY))
        assert len(origin.requests) == 1
        assert origin.requests[0].startswith(b"POST /v1/chat/completions HTTP/1.1")
    assert target.requests == []
    assert exc.status == status
    assert exc.message == f"{status} redirect to {location} not followed"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "kind"),
    [(403, KeyRejected), (404, ModelNotFound), (503, ServerFailure), (429, RateLimited)],
)
async def test_html_error_page_is_classified_by_status(
    status: int, kind: type[AttemptError]
) -> None:
    """An HTML error page (a proxy's, not the API's) is classified by its status code alone."""
    page = b"<html><body><h1>Error</h1></body></html>"
    async with raw_server(status, page, {"content-type": "text/html"}) as server:
        exc = await fails(server.url, chat("hi"), kind)
    assert exc.message == f"{status} Canned (text/html body)"


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("status", "header", "kind", "retryable"),
    [
        (400, "true", RequestRejected, True),
        (503, "false", ServerFailure, False),
        (409, "false", ServerFailure, False),
    ],
)
async def test_x_should_retry_reaches_the_policy(
    status: int, header: str, kind: type[AttemptError], retryable: bool
) -> None:
    """The x-should-retry header is kept on the error and overrides the class's default."""
    error = json.dumps({"error": {"message": "nope", "code": "some_code"}}).encode()
    async with raw_server(status, error, {"x-should-retry": header}) as server:
        exc = await fails(server.url, chat("hi"), kind)
    assert exc.headers == {"x-should-retry": header}
    assert exc.message == f"{status} some_code: nope"
    assert RetryPolicy().is_retryable(exc) is retryable


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (b"[]", "200 with a body that is not a JSON object"),
        (b'{"choices": []}', "200 without choices"),
        (
            b'{"error": {"message": "upstream overloaded"}}',
            "200 without choices upstream overloaded",
        ),
        (b"", "200 with a body that is not JSON"),
    ],
)
async def test_200_that_is_not_a_completion_is_malformed(payload: bytes, message: str) -> None:
    """A 200 whose body is not a chat completion is a (retryable) MalformedResponse."""
    async with raw_server(200, payload) as server:
        exc = await fails(server.url, chat("hi"), MalformedResponse)
    assert exc.message == message
    assert exc.status == 200


@pytest.mark.anyio
async def test_200_with_content_parts_and_partial_usage() -> None:
    """Content parts are joined, and token fields the provider leaves out (or sends as
    non-integers) are None, never 0."""
    answer = {
        "id": "x1",
        "model": "m",
        "choices": [
            {
                "message": {"content": [{"type": "text", "text": "a"}, {"text": "b"}, "junk"]},
                "finish_reason": "length",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": True, "cost": 2},
    }
    async with raw_server(200, json.dumps(answer).encode()) as server:
        done = await send(server.url, chat("hi"))
    assert done == Completion(
        content="ab",
        refusal=None,
        tool_calls=None,
        finish_reason="length",
        response_model="m",
        response_id="x1",
        system_fingerprint=None,
        prompt_tokens=3,
        completion_tokens=None,
        total_tokens=None,
        cached_tokens=None,
        reasoning_tokens=None,
        provider_cost=2.0,
        usage_raw='{"prompt_tokens": 3, "completion_tokens": true, "cost": 2}',
    )


# -- 200 answers from the simulator ----------------------------------------------------------


@pytest.mark.anyio
async def test_answer_is_parsed_into_a_completion(simulator: SimulatorThread) -> None:
    """A plain 200 gives content, ids and usage exactly as the simulator counted it."""
    done = await send(simulator.base_url, chat("Tell me about tokens"))
    stats = simulator.stats
    assert done.content is not None
    assert done.content.startswith("Simulated answer to: Tell me about tokens.")
    assert (done.refusal, done.tool_calls, done.finish_reason) == (None, None, "stop")
    assert (done.response_model, done.system_fingerprint) == ("gpt-4o-mini", "fp_sim")
    assert done.response_id is not None and done.response_id.startswith("chatcmpl-")
    assert (done.prompt_tokens, done.completion_tokens, done.total_tokens) == (
        stats.prompt_tokens,
        stats.completion_tokens,
        stats.total_tokens,
    )
    assert (done.cached_tokens, done.reasoning_tokens) == (0, 0)
    assert done.provider_cost is None and done.http_status == 200


@pytest.mark.anyio
async def test_cached_and_reasoning_tokens(simulator: SimulatorThread) -> None:
    """Cached prompt tokens and reasoning tokens come from the usage details."""
    done = await send(simulator.base_url, chat("x" * 400, model="deepseek-r1"))
    stats = simulator.stats
    assert done.cached_tokens == stats.cached_tokens > 0
    assert done.reasoning_tokens == stats.reasoning_tokens > 0


@pytest.mark.anyio
async def test_refusal(simulator: SimulatorThread) -> None:
    """A refusal is kept apart from the (null) content."""
    done = await send(simulator.base_url, chat("hi [[sim:refusal]]"))
    assert done.content is None
    assert done.refusal == "I'm sorry, but I can't help with that request."


@pytest.mark.anyio
async def test_tool_calls_are_json_text(simulator: SimulatorThread) -> None:
    """Tool calls are stored as JSON text of the provider's list, with finish_reason tool_calls."""
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]
    done = await send(simulator.base_url, chat("Paris today [[sim:tool_calls]]", tools=tools))
    assert done.content is None and done.finish_reason == "tool_calls"
    assert done.tool_calls is not None
    calls = json.loads(done.tool_calls)
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"query": "Paris today"}


@pytest.mark.anyio
async def test_missing_usage_gives_null_tokens(simulator: SimulatorThread) -> None:
    """Without usage every token field is None, not 0."""
    done = await send(simulator.base_url, chat("hi [[sim:no_usage]]"))
    assert done.content is not None
    tokens = (done.prompt_tokens, done.completion_tokens, done.total_tokens)
    assert (*tokens, done.cached_tokens, done.reasoning_tokens, done.provider_cost) == (None,) * 6


@pytest.mark.anyio
async def test_provider_cost_from_usage(simulator: SimulatorThread) -> None:
    """A router's usage.cost becomes provider_cost."""
    done = await send(simulator.base_url, chat("hi [[sim:cost]]"))
    assert done.provider_cost is not None
    assert done.provider_cost == pytest.approx(simulator.stats.cost) and done.provider_cost > 0


# -- secrets ---------------------------------------------------------------------------------


def pieces(key: str, size: int = 6) -> set[str]:
    return {key[i : i + size] for i in range(len(key) - size + 1)}


@pytest.mark.anyio
async def test_right_key_is_sent_as_bearer(simulator: SimulatorThread) -> None:
    """The key travels as `Authorization: Bearer KEY`, which the simulator accepts."""
    simulator.set_config(api_key=KEY)
    done = await send(simulator.base_url, chat("hi"), api_key=Secret(KEY))
    assert done.content is not None


@pytest.mark.anyio
async def test_key_echoed_on_401_is_scrubbed(simulator: SimulatorThread) -> None:
    """When the provider quotes the wrong key back, the KeyRejected holds no 6+ character
    piece of it."""
    simulator.set_config(api_key="the-right-key-000000", echo_key_on_401=True)
    exc = await fails(simulator.base_url, chat("hi"), KeyRejected, api_key=Secret(KEY))
    assert exc.status == 401
    assert exc.message.startswith("401 invalid_api_key: Incorrect API key provided: ")
    shown = " ".join([str(exc), repr(exc), exc.message, *map(str, exc.args)])
    assert not [p for p in pieces(KEY) if p in shown]


def test_secret_never_shows_itself() -> None:
    """repr, str and formatting of a Secret hide the key; reveal() gives it back."""
    secret = Secret(KEY)
    for shown in (repr(secret), str(secret), f"{secret}", f"{secret!r}", repr([secret])):
        assert KEY not in shown and "SENTINEL" not in shown
    assert secret.reveal() == KEY


def test_scrub_removes_key_shaped_text_without_a_secret() -> None:
    """Anything shaped like sk-/rk-/pk- keys is masked even when the key is unknown."""
    text = "bad key sk-abcd1234 (and pk-zzzzzz), not sk-ab"
    assert scrub(text, None) == "bad key sk-*** (and pk-***), not sk-ab"


def test_scrub_removes_every_prefix_of_the_key() -> None:
    """Two different 6+ character prefixes of the key in one text are both removed."""
    key = "ABCDEFGHIJKLMNOP"
    out = scrub("first ABCDEFGHIJ then ABCDEFG", Secret(key))
    assert "ABCDEF" not in out


_KEY_ALPHABET = string.ascii_letters + string.digits + "_-"


@settings(max_examples=200)
@given(
    st.text(_KEY_ALPHABET, min_size=8, max_size=60),
    st.lists(st.text(max_size=30), min_size=1, max_size=4),
)
def test_scrub_never_leaves_the_key(key: str, around: list[str]) -> None:
    """A key of 8+ characters embedded anywhere in random text never survives scrub."""
    text = key.join(around) + key
    assert key not in scrub(text, Secret(key))


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("raw", "kept"),
    [
        (b'"half an emoji: \\ud83d"', "half an emoji: \ufffd"),
        (b'"\\ude00 then \\ud83d\\ude00"', "\ufffd then \U0001f600"),
        (b'"bad utf-8: \xff"', "bad utf-8: \ufffd"),
    ],
)
async def test_a_paid_200_with_lone_surrogates_is_kept(raw: bytes, kept: str) -> None:
    """orjson refuses a lone surrogate escape (a cut emoji, as models emit) and invalid UTF-8;
    the answer was paid for, so it is kept, the bad piece replaced by U+FFFD."""
    body = (
        b'{"id": "s1", "choices": [{"message": {"content": ' + raw + b'}, "finish_reason": '
        b'"stop"}], "usage": {"prompt_tokens": 1, "completion_tokens": 2}}'
    )
    async with raw_server(200, body) as server:
        done = await send(server.url, chat("hi"))
    assert done.content == kept
    assert done.completion_tokens == 2


def test_a_submit_stopped_with_connections_open_prints_no_traceback(
    simulator: SimulatorThread, tmp_path: Path
) -> None:
    """A malformed JSONL line stops the submit while 64 requests are on the wire: one line on
    stderr, exit 2, and no asyncio traceback from connections torn down mid-request."""
    simulator.set_config(latency_ms=300)
    lines = [json.dumps({"id": f"r{i}", "text": f"hello {i}"}) for i in range(300)]
    (tmp_path / "data.jsonl").write_text("\n".join([*lines, "{not json", *lines[:5]]) + "\n")
    (tmp_path / "job.toml").write_text(
        spec_text(
            base_url=simulator.base_url,
            input_extra='id_column = "id"\nprompt_column = "text"\ncheck_whole_file = false',
            concurrency=64,
        )
    )
    done = run_cli("submit", "job.toml", "--runs-dir", "runs", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert simulator.stats.requests >= 64  # connections were open when it stopped
    assert "Traceback" not in done.stderr and "Error:" not in done.stderr, done.stderr
    assert "data.jsonl:301" in done.stderr


_GOOD_COUNT = st.integers(min_value=0, max_value=10**6)
_COUNT_VALUES = st.one_of(
    _GOOD_COUNT,
    st.none(),
    st.booleans(),
    st.integers(min_value=-3, max_value=3),
    st.sampled_from([2**63 - 1, 2**63, -(2**63), 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=3),
    st.lists(st.integers(), max_size=2),
)
_DETAILS = st.one_of(
    st.none(),
    st.integers(),
    st.text(max_size=2),
    st.dictionaries(
        st.sampled_from(["cached_tokens", "reasoning_tokens", "audio_tokens"]), _COUNT_VALUES
    ),
)
_USAGE_FIELDS = {
    "total_tokens": _COUNT_VALUES,
    "prompt_tokens_details": _DETAILS,
    "completion_tokens_details": _DETAILS,
    "cost": st.one_of(st.none(), st.floats(min_value=0, max_value=1), _COUNT_VALUES),
    "other": _COUNT_VALUES,
}
_USAGE = st.one_of(
    st.none(),
    st.integers(),
    st.text(max_size=3),
    st.lists(st.integers(), max_size=2),
    st.fixed_dictionaries(
        {},
        optional={"prompt_tokens": _COUNT_VALUES, "completion_tokens": _COUNT_VALUES}
        | _USAGE_FIELDS,
    ),
    # The usual answer: good prompt and completion counts, the rest drawn.
    st.fixed_dictionaries(
        {"prompt_tokens": _GOOD_COUNT, "completion_tokens": _GOOD_COUNT}, optional=_USAGE_FIELDS
    ),
)


@settings(max_examples=400, deadline=None)
@given(usage=_USAGE)
def test_answer_usage_is_read_as_the_record_rules_say(usage: Any) -> None:
    """The client's one-pass reading of `usage` keeps exactly the counts `token_count` and
    the cost `usage_cost` trust, and the raw usage exactly when `untrusted_usage` keeps it."""
    from runner.records import token_count, untrusted_usage, usage_cost

    body = {"id": "x", "choices": [{"message": {"content": "hi"}, "finish_reason": "stop"}]}
    if usage is not None:
        body["usage"] = usage
    try:
        content = json.dumps(body, allow_nan=True).encode()
    except ValueError:
        return
    client = _unconnected_client()
    answer = client._completion(content, {})
    import orjson

    try:
        parsed = orjson.loads(content)  # as the client reads it (orjson's numbers)
    except orjson.JSONDecodeError:
        parsed = json.loads(content)
    read = parsed.get("usage")
    fields = read if isinstance(read, dict) else {}
    prompt_details = fields.get("prompt_tokens_details")
    completion_details = fields.get("completion_tokens_details")
    prompt_details = prompt_details if isinstance(prompt_details, dict) else {}
    completion_details = completion_details if isinstance(completion_details, dict) else {}
    assert answer.prompt_tokens == token_count(fields.get("prompt_tokens"))
    assert answer.completion_tokens == token_count(fields.get("completion_tokens"))
    assert answer.total_tokens == token_count(fields.get("total_tokens"))
    assert answer.cached_tokens == token_count(prompt_details.get("cached_tokens"))
    assert answer.reasoning_tokens == token_count(completion_details.get("reasoning_tokens"))
    expected_cost = usage_cost(fields.get("cost"))
    assert answer.provider_cost == expected_cost or (
        answer.provider_cost is not None and expected_cost is not None
    )
    assert answer.usage_raw == untrusted_usage(read)


def _unconnected_client() -> ChatClient:
    """A client whose answers are parsed here, never sent for (port 1: nothing listens)."""
    return ChatClient(
        base_url="http://127.0.0.1:1/v1",
        api_key=None,
        timeout_s=5,
        connect_timeout_s=5,
        concurrency=1,
    )


def test_every_answer_field_comes_from_its_own_place() -> None:
    """Each field of a Completion is read from its own place in the answer (the answer is
    built by position: two fields swapped would show here)."""
    body = {
        "id": "answer-id",
        "model": "served-model",
        "system_fingerprint": "fp-1",
        "choices": [
            {
                "message": {
                    "content": "the text",
                    "refusal": "no way",
                    "tool_calls": [{"id": "call-1"}],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {
            "prompt_tokens": 11,
            "completion_tokens": 12,
            "total_tokens": 23,
            "prompt_tokens_details": {"cached_tokens": 4},
            "completion_tokens_details": {"reasoning_tokens": 5},
            "cost": 0.25,
        },
    }
    client = _unconnected_client()
    kept = {"x-ratelimit-remaining-requests": "9"}
    answer = client._completion(json.dumps(body).encode(), kept)
    assert dataclasses.asdict(answer) == {
        "content": "the text",
        "refusal": "no way",
        "tool_calls": '[{"id":"call-1"}]',
        "finish_reason": "tool_calls",
        "response_model": "served-model",
        "response_id": "answer-id",
        "system_fingerprint": "fp-1",
        "prompt_tokens": 11,
        "completion_tokens": 12,
        "total_tokens": 23,
        "cached_tokens": 4,
        "reasoning_tokens": 5,
        "provider_cost": 0.25,
        "http_status": 200,
        "headers": kept,
        "usage_raw": None,
    }

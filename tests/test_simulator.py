"""The simulator over real loopback sockets: answers, directives, faults, limits and control."""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

import anyio
import httpx2
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from runner.sim import answers as sim_answers
from runner.sim import http as sim_http
from runner.sim.answers import go_duration
from runner.sim.server import (
    MODELS,
    Simulator,
    SimulatorConfig,
    SimulatorStats,
    SimulatorThread,
)

KEY = "sk-test-0123456789abcdefghij"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def sim() -> Iterator[SimulatorThread]:
    with SimulatorThread() as running:
        yield running


@pytest.fixture
def client(sim: SimulatorThread) -> Iterator[httpx2.Client]:
    with httpx2.Client(base_url=sim.base_url, timeout=5) as http:
        yield http


def chat(text: str, model: str = "gpt-4o-mini", **extra: Any) -> dict[str, Any]:
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": text}]
    return {"model": model, "messages": messages, **extra}


def canonical_digest(body: dict[str, Any]) -> bytes:
    return hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).digest()


def sim_url(base_url: str, path: str) -> str:
    return base_url.removesuffix("/v1") + path


@pytest.mark.anyio
async def test_same_body_same_answer_and_usage() -> None:
    """A body sent twice gets the same bytes, the usage follows the documented formulas and the
    stats sum exactly the usage that was sent."""
    sim = Simulator()
    await sim.start()
    try:
        body = chat("Summarise the quarterly report on café revenue in two lines")
        async with httpx2.AsyncClient(base_url=sim.base_url, timeout=5) as http:
            first = await http.post("/chat/completions", json=body)
            second = await http.post("/chat/completions", json=body)
    finally:
        await sim.stop()
    assert first.status_code == second.status_code == 200
    assert first.content == second.content
    assert first.headers["content-type"] == "application/json"
    assert first.headers["x-request-id"] != second.headers["x-request-id"]
    answer = first.json()
    content = answer["choices"][0]["message"]["content"]
    assert content.startswith("Simulated answer to: Summarise the quarterly report")
    prompt = sum(len(m["content"].encode()) // 4 + 4 for m in body["messages"])
    completion = max(1, len(content.encode()) // 4)
    assert answer["id"] == "chatcmpl-" + canonical_digest(body).hex()[:24]
    assert answer["model"] == "gpt-4o-mini"
    assert answer["object"] == "chat.completion"
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
    stats = sim.stats
    assert (stats.requests, stats.ok, stats.resent_after_ok, stats.distinct_ok_bodies) == (
        2,
        2,
        1,
        1,
    )
    assert (stats.prompt_tokens, stats.completion_tokens) == (2 * prompt, 2 * completion)
    assert stats.total_tokens == 2 * (prompt + completion)


def test_prompt_tokens_count_text_parts(client: httpx2.Client) -> None:
    """Content given as a list of parts counts its text parts only."""
    parts = [
        {"type": "text", "text": "Describe this picture of a harbour"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
        {"type": "text", "text": "in one line"},
    ]
    messages = [{"role": "assistant", "content": None}, {"role": "user", "content": parts}]
    body = {"model": "gpt-4o", "messages": messages}
    usage = client.post("/chat/completions", json=body).json()["usage"]
    text = "Describe this picture of a harbour\nin one line"
    assert usage["prompt_tokens"] == 4 + len(text.encode()) // 4 + 4


@pytest.mark.parametrize("cap_field", ["max_tokens", "max_completion_tokens"])
def test_token_cap_truncates_the_answer(client: httpx2.Client, cap_field: str) -> None:
    """A completion cap truncates the content and ends it with finish_reason "length"."""
    answer = client.post("/chat/completions", json=chat("Write a long essay", **{cap_field: 3}))
    choice = answer.json()["choices"][0]
    assert answer.json()["usage"]["completion_tokens"] == 3
    assert len(choice["message"]["content"].encode()) <= 12
    assert choice["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("model", "extra", "reasoning"),
    [
        ("gpt-4o", {}, False),
        ("deepseek-r1", {}, True),
        ("claude-sonnet:thinking", {}, True),
        ("gpt-4o", {"reasoning_effort": "low"}, True),
    ],
)
def test_reasoning_tokens(
    client: httpx2.Client, model: str, extra: dict[str, Any], reasoning: bool
) -> None:
    """Reasoning models and requests with reasoning_effort report a third of the completion."""
    usage = client.post("/chat/completions", json=chat("Think hard", model, **extra)).json()[
        "usage"
    ]
    expected = usage["completion_tokens"] // 3 if reasoning else 0
    assert usage["completion_tokens_details"]["reasoning_tokens"] == expected


def test_cached_tokens_follow_the_body_hash(client: httpx2.Client) -> None:
    """Long prompts report half their tokens, in blocks of 16, as cached when the hash is even."""
    seen = set()
    for row in range(12):
        body = chat(f"Row {row}: " + "a long shared preamble about the dataset " * 10)
        usage = client.post("/chat/completions", json=body).json()["usage"]
        prompt, even = usage["prompt_tokens"], canonical_digest(body)[0] % 2 == 0
        assert prompt >= 64
        expected = (prompt // 2) // 16 * 16 if even else 0
        assert usage["prompt_tokens_details"]["cached_tokens"] == expected
        seen.add(even)
    assert seen == {True, False}


def test_sim_echo_repeats_the_user_message(client: httpx2.Client) -> None:
    """The sim-echo model answers with the last user message, directives removed."""
    body = chat("echo me back [[sim:cost]]", "sim-echo")
    answer = client.post("/chat/completions", json=body).json()
    assert answer["choices"][0]["message"]["content"] == "echo me back"


def _tool_call_arguments(answer: dict[str, Any]) -> dict[str, Any]:
    call = answer["choices"][0]["message"]["tool_calls"][0]
    assert call["type"] == "function"
    assert call["function"]["name"] == "lookup"
    return dict(orjson.loads(call["function"]["arguments"]))


@pytest.mark.parametrize(
    ("directive", "status", "check"),
    [
        ("[[sim:404]]", 404, lambda a: "404" in a["error"]["message"]),
        ("[[sim:503]]", 503, lambda a: a["error"]["type"] == "server_error"),
        ("[[sim:429]]", 429, lambda a: a["error"]["type"] == "rate_limit_error"),
        (
            "[[sim:context_length_exceeded]]",
            400,
            lambda a: a["error"]["code"] == "context_length_exceeded",
        ),
        (
            "[[sim:refusal]]",
            200,
            lambda a: (
                a["choices"][0]["message"]["content"] is None
                and a["choices"][0]["message"]["refusal"]
                and a["choices"][0]["finish_reason"] == "stop"
            ),
        ),
        (
            "[[sim:content_filter]]",
            200,
            lambda a: a["choices"][0]["finish_reason"] == "content_filter",
        ),
        ("[[sim:length]]", 200, lambda a: a["choices"][0]["finish_reason"] == "length"),
        ("[[sim:no_usage]]", 200, lambda a: "usage" not in a),
        (
            "[[sim:tool_calls]]",
            200,
            lambda a: (
                a["choices"][0]["message"]["content"] is None
                and a["choices"][0]["finish_reason"] == "tool_calls"
                and "query" in _tool_call_arguments(a)
            ),
        ),
        ("[[sim:cost]]", 200, lambda a: a["usage"]["cost"] > 0),
    ],
)
def test_directive(
    sim: SimulatorThread, client: httpx2.Client, directive: str, status: int, check: Any
) -> None:
    """Each per-row directive produces its status and answer shape, and the stats sum the usage."""
    answer = client.post("/chat/completions", json=chat(f"Summarise row 7 {directive}"))
    assert answer.status_code == status
    assert check(answer.json())
    stats = sim.stats
    usage = answer.json().get("usage", {}) if status == 200 else {}
    assert stats.by_status == {status: 1}
    assert stats.ok == (status == 200)
    assert stats.prompt_tokens == usage.get("prompt_tokens", 0)
    assert stats.completion_tokens == usage.get("completion_tokens", 0)
    assert stats.cost == usage.get("cost", 0.0)


@pytest.mark.parametrize(
    ("tools", "name"),
    [
        (
            [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}],
            "get_weather",
        ),
        (["not a tool"], "lookup"),
        ([{"type": "function", "function": "get_weather"}], "lookup"),
    ],
)
def test_tool_calls_name_the_first_tool(client: httpx2.Client, tools: list[Any], name: str) -> None:
    """A tool_calls answer calls the first function the request offers, else "lookup"."""
    body = chat("Weather in Oslo? [[sim:tool_calls]]", tools=tools)
    message = client.post("/chat/completions", json=body).json()["choices"][0]["message"]
    assert message["tool_calls"][0]["function"]["name"] == name
    assert orjson.loads(message["tool_calls"][0]["function"]["arguments"]) == {
        "query": "Weather in Oslo?"
    }


def test_fail_first_fails_then_succeeds(sim: SimulatorThread, client: httpx2.Client) -> None:
    """fail_first=N answers 500 to the first N copies of a body; retries after a 500 are not
    counted as re-sent, a copy after the 200 is."""
    body = chat("Flaky row [[sim:fail_first=2]]")
    statuses = [client.post("/chat/completions", json=body).status_code for _ in range(3)]
    assert statuses == [500, 500, 200]
    assert sim.stats.resent_after_ok == 0
    assert client.post("/chat/completions", json=body).status_code == 200
    assert sim.stats.resent_after_ok == 1
    assert sim.stats.distinct_ok_bodies == 1


def test_resent_after_ok_counts_only_bodies_already_answered(
    sim: SimulatorThread, client: httpx2.Client
) -> None:
    """A retry after a random 5xx is not a re-send of a paid answer; a copy after a 200 is."""
    body = chat("Row 12")
    sim.set_config(rate_500=1.0)
    assert client.post("/chat/completions", json=body).status_code >= 500
    sim.set_config(rate_500=0.0)
    assert client.post("/chat/completions", json=body).status_code == 200
    assert sim.stats.resent_after_ok == 0
    client.post("/chat/completions", json=chat("Row 13"))
    client.post("/chat/completions", json=body)
    stats = sim.stats
    assert (stats.resent_after_ok, stats.distinct_ok_bodies, stats.ok) == (1, 2, 3)


@pytest.mark.parametrize("fault", ["rate_429", "rate_500", "rate_drop"])
def test_resent_after_ok_counts_only_copies_sold_again(
    sim: SimulatorThread, client: httpx2.Client, fault: str
) -> None:
    """A copy of an answered body that is refused (429), fails (5xx) or is dropped was not
    bought again: it is not counted; the copy that is answered 200 is, once. (A killed
    session's row retried after a resume met a 429 first: counted three times, bought once.)"""
    body = chat("Row 14")
    assert client.post("/chat/completions", json=body).status_code == 200
    sim.set_config(**{fault: 1.0})
    for _ in range(2):
        with contextlib.suppress(httpx2.TransportError):
            assert client.post("/chat/completions", json=body).status_code != 200
    sim.set_config(**{fault: 0.0})
    assert sim.stats.resent_after_ok == 0
    assert client.post("/chat/completions", json=body).status_code == 200
    assert (sim.stats.resent_after_ok, sim.stats.ok) == (1, 2)


@pytest.mark.anyio
async def test_slow_drip_outlives_per_read_timeouts() -> None:
    """A slow-drip answer sends its headers, then a byte every 200 ms: a 0.5 s read timeout
    never fires, only an overall deadline ends the wait."""
    sim = Simulator()
    await sim.start()
    received = b""
    try:
        async with httpx2.AsyncClient(base_url=sim.base_url, timeout=0.5) as http:
            request = http.build_request(
                "POST", "/chat/completions", json=chat("[[sim:slow_drip]]")
            )
            response = await http.send(request, stream=True)
            try:
                assert response.status_code == 200
                with anyio.move_on_after(1.1):
                    async for chunk in response.aiter_raw():
                        received += chunk
            finally:
                await response.aclose()
    finally:
        await sim.stop()
    assert 2 <= len(received) < int(response.headers["content-length"])
    assert sim.stats.ok == 0


def test_slow_drip_completes(
    monkeypatch: pytest.MonkeyPatch, sim: SimulatorThread, client: httpx2.Client
) -> None:
    """A slow drip ends with the complete answer, counted once it is fully written; the next
    request on the same connection waits for it."""
    monkeypatch.setattr(sim_http, "DRIP_INTERVAL_S", 0.0)
    body = chat("Row 3 [[sim:slow_drip]]")
    dripped = client.post("/chat/completions", json=body)
    assert dripped.json()["usage"]["total_tokens"] > 0
    assert client.post("/chat/completions", json=chat("Row 4")).status_code == 200
    stats = sim.stats
    assert (stats.ok, stats.connections) == (2, 1)
    assert stats.prompt_tokens > dripped.json()["usage"]["prompt_tokens"]


@pytest.mark.parametrize(
    ("switches", "outcome"),
    [
        ({"rate_drop": 1.0}, "protocol_error"),
        ({"rate_reset_mid_body": 1.0}, "protocol_error"),
        ({"rate_malformed": 1.0}, "invalid_json"),
        ({"rate_html": 1.0}, "html"),
        ({"rate_500": 1.0, "error_statuses": (503,)}, 503),
        ({"rate_429": 1.0}, 429),
        ({"insufficient_quota": True}, "quota"),
    ],
)
def test_fault_switch(sim: SimulatorThread, switches: dict[str, Any], outcome: Any) -> None:
    """Each fault switch set to 1.0 produces its fault, and no fault adds to the success sums."""
    sim.set_config(**switches)
    with httpx2.Client(base_url=sim.base_url, timeout=5) as http:
        if outcome == "protocol_error":
            with pytest.raises((httpx2.RemoteProtocolError, httpx2.ReadError)):
                http.post("/chat/completions", json=chat("Row 1"))
        else:
            answer = http.post("/chat/completions", json=chat("Row 1"))
            if outcome == "invalid_json":
                assert answer.status_code == 200
                with pytest.raises(orjson.JSONDecodeError):
                    orjson.loads(answer.content)
            elif outcome == "html":
                assert answer.status_code == 502
                assert answer.headers["content-type"].startswith("text/html")
            elif outcome == "quota":
                assert answer.status_code == 429
                assert answer.json()["error"]["code"] == "insufficient_quota"
                assert answer.json()["error"]["type"] == "insufficient_quota"
            else:
                assert answer.status_code == outcome
    stats = sim.stats
    assert (stats.requests, stats.ok, stats.total_tokens) == (1, 0, 0)
    assert stats.dropped == ("rate_drop" in switches)
    assert stats.reset_mid_body == ("rate_reset_mid_body" in switches)
    assert stats.malformed == ("rate_malformed" in switches)


@pytest.mark.parametrize("fmt", ["seconds", "ms", "date"])
def test_random_429_retry_after_formats(
    sim: SimulatorThread, client: httpx2.Client, fmt: str
) -> None:
    """A random 429 carries its delay as seconds, milliseconds or an HTTP date."""
    sim.set_config(
        rate_429=1.0, retry_after_s=2.5 if fmt != "date" else 30.0, retry_after_format=fmt
    )
    answer = client.post("/chat/completions", json=chat("Row 1"))
    assert answer.status_code == 429
    assert answer.json()["error"]["code"] == "rate_limit_exceeded"
    if fmt == "seconds":
        assert answer.headers["retry-after"] == "2.5"
    elif fmt == "ms":
        assert answer.headers["retry-after-ms"] == "2500"
        assert "retry-after" not in answer.headers
    else:
        delay = parsedate_to_datetime(answer.headers["retry-after"]).timestamp() - time.time()
        assert 28 <= delay <= 31
    assert sim.stats.rate_limited == 1


def test_fault_sequence_depends_only_on_the_seed(
    sim: SimulatorThread, client: httpx2.Client
) -> None:
    """The same seed gives the same sequence of faults after a reset; another seed another one."""

    def run() -> list[int]:
        return [
            client.post("/chat/completions", json=chat(f"Row {i}")).status_code for i in range(24)
        ]

    sim.set_config(rate_500=0.5, seed=7)
    first = run()
    sim.reset()
    assert run() == first
    assert 200 in first and any(s >= 500 for s in first)
    sim.set_config(seed=8)
    assert run() != first


@pytest.mark.parametrize(
    ("authorization", "echo", "status"),
    [
        (None, False, 401),
        (f"Bearer {KEY[:-1]}X", False, 401),
        (f"Bearer {KEY[:-1]}X", True, 401),
        (f"Bearer {KEY}", False, 200),
    ],
    ids=["missing", "wrong", "wrong-echoed", "right"],
)
def test_api_key(sim: SimulatorThread, authorization: str | None, echo: bool, status: int) -> None:
    """With api_key set only the right bearer token passes; echo_key_on_401 quotes 12 chars of
    the offered key, as some providers do."""
    sim.set_config(api_key=KEY, echo_key_on_401=echo)
    headers = {"authorization": authorization} if authorization else {}
    with httpx2.Client(base_url=sim.base_url, timeout=5, headers=headers) as http:
        answer = http.post("/chat/completions", json=chat("Row 1"))
        models = http.get("/models")
    assert answer.status_code == models.status_code == status
    if status == 401:
        message = answer.json()["error"]["message"]
        assert (KEY[:12] in message) is echo
        assert KEY[:13] not in message
    assert sim.stats.by_status == {status: 1}


def _parse_go_duration(text: str) -> float:
    parts = re.fullmatch(r"(?:(\d+)m)?(?:([\d.]+)s)?|(\d+)ms", text)
    assert parts is not None, text
    if parts[3] is not None:
        return int(parts[3]) / 1000
    return int(parts[1] or 0) * 60 + float(parts[2] or 0)


def test_rpm_limit(sim: SimulatorThread, client: httpx2.Client) -> None:
    """With rpm_limit=5 the remaining count goes down to 0 and the 6th request in quick
    succession gets a 429 with Retry-After and limit headers; it does not enter the window."""
    sim.set_config(rpm_limit=5)
    remaining = []
    for row in range(5):
        answer = client.post("/chat/completions", json=chat(f"Row {row}"))
        assert answer.status_code == 200
        assert answer.headers["x-ratelimit-limit-requests"] == "5"
        assert answer.headers["x-ratelimit-limit-minute"] == "5"
        remaining.append(int(answer.headers["x-ratelimit-remaining-requests"]))
        assert answer.headers["x-ratelimit-remaining-minute"] == str(remaining[-1])
        assert "x-ratelimit-limit-tokens" not in answer.headers
    assert remaining == [4, 3, 2, 1, 0]
    for _ in range(2):
        refused = client.post("/chat/completions", json=chat("Row 5"))
        assert refused.status_code == 429
        assert refused.json()["error"] == {
            "message": "Rate limit reached for requests",
            "type": "rate_limit_error",
            "param": None,
            "code": "rate_limit_exceeded",
        }
        assert 59 <= int(refused.headers["retry-after"]) <= 60
        assert 58_000 < int(refused.headers["retry-after-ms"]) <= 60_000
        assert 58 < _parse_go_duration(refused.headers["x-ratelimit-reset-requests"]) <= 60
        assert 59 <= int(refused.headers["x-ratelimit-reset-minute"]) <= 60
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    stats = sim.stats
    assert (stats.ok, stats.rate_limited) == (5, 2)


def test_rpm_window_slides(
    monkeypatch: pytest.MonkeyPatch, sim: SimulatorThread, client: httpx2.Client
) -> None:
    """Requests leave the window when it has slid past them, and Retry-After says when."""
    monkeypatch.setattr(sim_answers, "WINDOW_S", 0.5)
    sim.set_config(rpm_limit=2)
    statuses = [client.post("/chat/completions", json=chat("Row 1")).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    refused = client.post("/chat/completions", json=chat("Row 1"))
    wait = int(refused.headers["retry-after-ms"]) / 1000
    assert refused.headers["retry-after"] == "1"
    assert 0 < wait <= 0.5
    time.sleep(wait + 0.02)
    answer = client.post("/chat/completions", json=chat("Row 1"))
    assert answer.status_code == 200
    assert answer.headers["x-ratelimit-remaining-requests"] in ("0", "1")


def test_ratelimit_headers_can_be_switched_off(sim: SimulatorThread, client: httpx2.Client) -> None:
    """With ratelimit_headers=False the limit still applies but no x-ratelimit-* header is sent."""
    sim.set_config(rpm_limit=1, tpm_limit=100_000, ratelimit_headers=False)
    answers = [client.post("/chat/completions", json=chat("Row 1")) for _ in range(2)]
    assert [a.status_code for a in answers] == [200, 429]
    assert "retry-after" in answers[1].headers
    for answer in answers:
        assert not [name for name in answer.headers if name.startswith("x-ratelimit")]


def test_tpm_limit(sim: SimulatorThread, client: httpx2.Client) -> None:
    """Admission counts prompt + max_tokens, the window then keeps the real usage, and a request
    whose estimate does not fit gets a 429 for tokens."""
    sim.set_config(tpm_limit=1000)
    first = client.post("/chat/completions", json=chat("Row 1", max_tokens=500))
    usage = first.json()["usage"]
    assert first.headers["x-ratelimit-limit-tokens"] == "1000"
    estimate = usage["prompt_tokens"] + 500
    assert first.headers["x-ratelimit-remaining-tokens"] == str(1000 - estimate)
    assert "x-ratelimit-limit-requests" not in first.headers
    refused = client.post("/chat/completions", json=chat("Row 1", max_tokens=990))
    assert refused.status_code == 429
    assert refused.json()["error"]["message"] == "Rate limit reached for tokens"
    assert refused.headers["x-ratelimit-remaining-tokens"] == str(1000 - usage["total_tokens"])
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert client.post("/chat/completions", json=chat("Row 2")).status_code == 200


def test_sim_control_endpoints(sim: SimulatorThread, client: httpx2.Client) -> None:
    """/_sim/stats reports the counters, /_sim/config changes settings live, /_sim/reset zeroes."""
    client.post("/chat/completions", json=chat("Row 1"))
    stats = SimulatorStats.from_dict(client.get(sim_url(sim.base_url, "/_sim/stats")).json())
    assert stats == sim.stats
    assert stats.by_status == {200: 1}
    changed = client.post(sim_url(sim.base_url, "/_sim/config"), json={"rate_500": 1.0})
    assert changed.status_code == 200
    assert changed.json()["rate_500"] == 1.0
    assert client.post("/chat/completions", json=chat("Row 2")).status_code >= 500
    for bad in ({"no_such_switch": 1}, {"rate_500": 2}, {"error_statuses": [200]}, [1]):
        refused = client.post(sim_url(sim.base_url, "/_sim/config"), json=bad)
        assert refused.status_code == 400
    assert client.get(sim_url(sim.base_url, "/_sim/config")).json()["rate_500"] == 1.0
    assert client.post(sim_url(sim.base_url, "/_sim/reset")).status_code == 200
    assert sim.stats == SimulatorStats()


def test_models_and_unknown_paths(client: httpx2.Client) -> None:
    """GET /v1/models lists the simulated models; an unknown path is a 404, a wrong method a 405."""
    models = client.get("/models").json()
    assert [m["id"] for m in models["data"]] == list(MODELS)
    assert {"gpt-4o", "gpt-4o-mini", "deepseek-r1", "sim-echo"} <= set(MODELS)
    missing = client.get("/embeddings")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "invalid_request_error"
    assert client.get("/chat/completions").status_code == 405


@pytest.mark.parametrize(
    "content",
    [
        b"not json",
        orjson.dumps([1, 2]),
        orjson.dumps({"messages": [{"role": "user", "content": "hi"}]}),
        orjson.dumps({"model": "gpt-4o"}),
        orjson.dumps({"model": "gpt-4o", "messages": []}),
        orjson.dumps({"model": "gpt-4o", "messages": ["hi"]}),
        orjson.dumps({"model": "gpt-4o", "messages": [{"content": "hi"}], "stream": True}),
    ],
)
def test_invalid_request_body(sim: SimulatorThread, client: httpx2.Client, content: bytes) -> None:
    """A body that is not JSON, or lacks model or messages, gets an OpenAI-style 400."""
    answer = client.post("/chat/completions", content=content)
    assert answer.status_code == 400
    assert answer.json()["error"]["type"] == "invalid_request_error"
    assert answer.json()["error"]["code"] is None
    assert sim.stats.by_status == {400: 1}


def _raw_exchange(port: int, payload: bytes) -> bytes:
    """Send bytes on one socket and read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(payload)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _split_responses(data: bytes) -> list[tuple[int, dict[str, str], bytes]]:
    responses = []
    while data:
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        length = int(headers["content-length"])
        responses.append((int(lines[0].split()[1]), headers, rest[:length]))
        data = rest[length:]
    return responses


def _request(method: str, path: str, body: bytes = b"", close: bool = False) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nhost: sim\r\ncontent-length: {len(body)}\r\n"
    return (head + ("connection: close\r\n" if close else "") + "\r\n").encode() + body


def test_pipelined_requests_are_answered_in_order(sim: SimulatorThread) -> None:
    """Requests pipelined in one write on one keep-alive socket are answered in order, even when
    jitter makes later answers ready first, and Connection: close ends the exchange."""
    sim.set_config(latency_ms=20, jitter_ms=15)
    rows = [orjson.dumps(chat(f"Pipelined row {i}")) for i in range(5)]
    payload = b"".join(_request("POST", "/v1/chat/completions", row) for row in rows)
    payload += _request("GET", "/v1/models", close=True)
    payload += _request("GET", "/v1/models")  # after close: never answered
    responses = _split_responses(_raw_exchange(sim.port, payload))
    assert [status for status, _, _ in responses] == [200] * 6
    for i, (_, _, body) in enumerate(responses[:5]):
        assert f"Pipelined row {i}" in orjson.loads(body)["choices"][0]["message"]["content"]
    ids = [headers["x-request-id"] for _, headers, _ in responses[:5]]
    assert ids == sorted(ids)
    assert responses[-1][1]["connection"] == "close"
    stats = sim.stats
    assert (stats.ok, stats.connections) == (5, 1)


def test_body_split_across_reads(sim: SimulatorThread) -> None:
    """A request whose head and body arrive in several small writes is still parsed."""
    payload = _request("POST", "/v1/chat/completions", orjson.dumps(chat("Split row")), close=True)
    with socket.create_connection(("127.0.0.1", sim.port), timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for start in range(0, len(payload), 17):
            sock.sendall(payload[start : start + 17])
            time.sleep(0.001)
        data = b"".join(iter(lambda: sock.recv(65536), b""))
    [(status, _, body)] = _split_responses(data)
    assert status == 200
    assert "Split row" in orjson.loads(body)["choices"][0]["message"]["content"]


@pytest.mark.parametrize(
    "payload",
    [
        b"GARBAGE\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: nope\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\ncontent-length: -1\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
        b"GET /v1/models HTTP/1.1\r\nno-colon-here\r\n\r\n",
        b"GET /v1/models HTTP/2.0\r\n\r\n",
    ],
)
def test_unparseable_http_gets_400_and_close(sim: SimulatorThread, payload: bytes) -> None:
    """A request that is not parseable HTTP/1.1 is answered 400 and the connection closed."""
    [(status, headers, body)] = _split_responses(_raw_exchange(sim.port, payload))
    assert status == 400
    assert headers["connection"] == "close"
    assert orjson.loads(body)["error"]["type"] == "invalid_request_error"


def test_set_config_live_and_stats_snapshot(sim: SimulatorThread, client: httpx2.Client) -> None:
    """set_config flips switches between requests, rejects bad settings, and stats is a copy."""
    sim.set_config(rate_500=1.0, error_statuses=(502,))
    assert client.post("/chat/completions", json=chat("Row 1")).status_code == 502
    snapshot = sim.stats
    sim.set_config(rate_500=0.0)
    assert client.post("/chat/completions", json=chat("Row 1")).status_code == 200
    assert snapshot.by_status == {502: 1}
    assert sim.stats.by_status == {502: 1, 200: 1}
    assert sim.config.rate_500 == 0.0
    for bad in ({"rate_500": 1.5}, {"latency": 1}, {"retry_after_format": "hours"}):
        with pytest.raises(ValueError):
            sim.set_config(**bad)


@pytest.mark.parametrize(
    "switches",
    [
        {"rate_500": 2.0},
        {"error_statuses": (200,)},
        {"retry_after_format": "hours"},
        {"rpm_limit": 0},
    ],
)
def test_config_rejects_bad_switches(switches: dict[str, Any]) -> None:
    """A config built with an impossible switch fails at once with a ValueError naming it."""
    with pytest.raises(ValueError, match=next(iter(switches))):
        SimulatorConfig(**switches)


def test_config_accepts_lists_for_tuples() -> None:
    """Switches read from TOML or JSON may give error_statuses as a list."""
    assert SimulatorConfig(error_statuses=[503]).error_statuses == (503,)  # type: ignore[arg-type]


@pytest.mark.anyio
async def test_stop_closes_waiting_connections() -> None:
    """stop() returns at once and closes connections whose answer is still delayed."""
    sim = Simulator(SimulatorConfig(latency_ms=10_000))
    await sim.start()
    stream = await anyio.connect_tcp("127.0.0.1", sim.port)
    try:
        await stream.send(_request("POST", "/v1/chat/completions", orjson.dumps(chat("Row 1"))))
        await anyio.sleep(0.05)
        with anyio.fail_after(2):
            await sim.stop()
            with pytest.raises((anyio.EndOfStream, anyio.BrokenResourceError, ConnectionError)):
                await stream.receive()
    finally:
        await stream.aclose()
    assert sim.stats.ok == 0


def test_thread_start_fails_on_a_busy_port() -> None:
    """SimulatorThread raises the bind error when the port is taken; stop is then harmless and
    settings and stats stay usable without a running loop."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        thread = SimulatorThread(port=busy.getsockname()[1])
        with pytest.raises(OSError):
            thread.start()
        thread.stop()
    thread.set_config(rate_500=1.0)
    assert thread.config.rate_500 == 1.0
    assert thread.stats == SimulatorStats()


def test_serve_reports_its_url_and_stops_on_sigterm() -> None:
    """serve() calls ready(base_url) once listening, answers, and exits cleanly on SIGTERM."""
    code = (
        "import sys\n"
        "from runner.sim.server import SimulatorConfig, serve\n"
        "serve('127.0.0.1', 0, SimulatorConfig(), "
        "ready=lambda url: (sys.stdout.write(url + '\\n'), sys.stdout.flush()))\n"
    )
    with subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            base_url = proc.stdout.readline().strip()
            assert re.fullmatch(r"http://127\.0\.0\.1:\d+/v1", base_url)
            with httpx2.Client(base_url=base_url, timeout=5) as http:
                assert http.get("/models").status_code == 200
            proc.terminate()
            assert proc.wait(timeout=5) == 0
        finally:
            if proc.poll() is None:
                proc.kill()


@given(st.floats(min_value=0, max_value=600, allow_nan=False))
def test_go_duration_round_trips(seconds: float) -> None:
    """Reset durations are Go durations that parse back to the value, to the millisecond."""
    text = go_duration(seconds)
    assert math.isclose(_parse_go_duration(text), round(seconds * 1000) / 1000, abs_tol=1e-9)


# -- transport: TLS and the latency distribution -------------------------------------------


def test_lognormal_latency_has_the_median_and_tail_asked_for() -> None:
    """latency_sigma draws each delay from a lognormal whose median is latency_ms: with sigma
    0.72 and 1,500 ms, p99 is about 8 s (W5's heavy tail)."""
    sim = Simulator(SimulatorConfig(latency_ms=1500, latency_sigma=0.72, seed=3))
    body = orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x"}]})
    delays = sorted(sim.dispatch(b"POST", b"/v1/chat/completions", None, body)[1]
                    for _ in range(4000))  # fmt: skip
    assert 1.35 < delays[2000] < 1.65
    assert 6.5 < delays[3960] < 10.0
    assert min(delays) > 0


def test_the_simulator_serves_https(tmp_path: Path) -> None:
    ca, cert, key = sim_http.make_test_certificate(tmp_path)
    with SimulatorThread(SimulatorConfig(), tls=sim_http.server_tls(str(cert), str(key))) as sim:
        assert sim.base_url.startswith("https://127.0.0.1:")
        with httpx2.Client(verify=ssl.create_default_context(cafile=str(ca))) as client:
            answer = client.post(
                f"{sim.base_url}/chat/completions",
                json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            )
        assert answer.status_code == 200
        assert sim.stats.ok == 1
        with pytest.raises(httpx2.ConnectError), httpx2.Client() as untrusting:
            untrusting.get(f"{sim.base_url}/models")

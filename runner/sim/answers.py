"""The simulator's answers: deterministic completions and usage, and sliding rate-limit windows.

An answer is a pure function of the request, so a re-sent body gets the same bytes (which is
how runner/sim/server.py counts answers paid for twice).
"""

from __future__ import annotations

import hashlib
import re
from collections import deque
from typing import Any

import orjson

from runner.sim.http import Success
from runner.sim.structured import render

CREATED = 1_700_000_000
WINDOW_S = 60.0
DIRECTIVE_RE = re.compile(r"\[\[sim:([a-z_]+|\d{3})(?:=(\d+))?\]\]")
REFUSAL = "I'm sorry, but I can't help with that request."
_FILLER = (
    "batch", "token", "latency", "answer", "model", "prompt", "budget", "quota", "retry",
    "journal", "parquet", "window", "limit", "router", "worker", "stream", "result", "cost",
    "usage", "cache", "signal", "resume", "report", "column", "schema", "hash", "deadline",
    "backoff", "socket", "buffer", "queue", "commit",
)  # fmt: skip


def go_duration(seconds: float) -> str:
    """Format like Go's time.Duration.String(), as OpenAI's x-ratelimit-reset-* headers do."""
    ms = max(0, round(seconds * 1000))
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    minutes, rest = divmod(ms, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    return f"{minutes}m{secs}s" if minutes else f"{secs}s"


class Entry:
    __slots__ = ("amount", "at")

    def __init__(self, at: float, amount: int) -> None:
        self.at = at
        self.amount = amount


class Window:
    """Amounts admitted in the last WINDOW_S seconds, oldest first; O(1) amortised per request."""

    __slots__ = ("entries", "total")

    def __init__(self) -> None:
        self.entries: deque[Entry] = deque()
        self.total = 0

    def prune(self, now: float) -> None:
        entries, cutoff = self.entries, now - WINDOW_S
        while entries and entries[0].at <= cutoff:
            self.total -= entries.popleft().amount

    def wait(self, now: float, amount: int, limit: int) -> float:
        """Seconds until `amount` more fits under `limit` (0.0: it fits now)."""
        excess = self.total + amount - limit
        if excess <= 0:
            return 0.0
        for entry in self.entries:  # only walked when refusing, which clients answer by pausing
            excess -= entry.amount
            if excess <= 0:
                return entry.at + WINDOW_S - now
        return (
            WINDOW_S  # larger than the limit itself: never fits, like OpenAI's "request too large"
        )

    def add(self, now: float, amount: int) -> Entry:
        entry = Entry(now, amount)
        self.entries.append(entry)
        self.total += amount
        return entry

    def reset_in(self, now: float) -> float:
        """Seconds until the oldest entry leaves, freeing room (0.0 when the window is empty)."""
        return self.entries[0].at + WINDOW_S - now if self.entries else 0.0

    def headers(self, now: float, limit: int, unit: bytes) -> bytes:
        left, reset = max(0, limit - self.total), go_duration(self.reset_in(now)).encode()
        return (
            b"x-ratelimit-limit-%s: %d\r\nx-ratelimit-remaining-%s: %d\r\n"
            b"x-ratelimit-reset-%s: %s\r\n" % (unit, limit, unit, left, unit, reset)
        )


def text_of(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            p["text"]
            for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        )
    return ""


def invalid_reason(body: object) -> str | None:
    if not isinstance(body, dict):
        return "The request body must be a JSON object."
    if not isinstance(body.get("model"), str):
        return "You must provide a model parameter."
    messages = body.get("messages")
    if (
        not isinstance(messages, list)
        or not messages
        or not all(isinstance(m, dict) for m in messages)
    ):
        return "'messages' must be a non-empty array of objects."
    if body.get("stream"):
        return "The simulator does not support stream=true."
    return None


def completion_cap(body: dict[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def request_tag(model: str, messages: object) -> str:
    """A short digest of what a request asks (its model and messages), carried in the answer.

    Every simulated answer (but sim-echo's) names the request it answers, so a test can tell
    an answer put on the wrong row: `[req <tag>]` follows the echoed prompt words.
    """
    data = orjson.dumps({"messages": messages, "model": model}, option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(data).hexdigest()[:12]


def count_tokens(text: str) -> int:
    return max(1, len(text.encode()) // 4)


def answer_for(
    body: dict[str, Any],
    text: str,
    directives: dict[str, str | None],
    digest: bytes,
    prompt: int,
    cap: int | None,
    structured: tuple[str, Any, str] | None = None,
) -> tuple[bytes, Success, int]:
    """The 200 answer for a request: a pure function of it (and of `structured`), so a
    re-sent body gets the same bytes.

    `structured`: (target, schema, mode) for a request that asks for JSON (see
    runner/sim/structured.py): the content, or a call of the tool `target` names, is JSON for
    the schema, valid or not as `mode` says. Returns the JSON, what it adds to the stats, and
    the tokens it really used.
    """
    model: str = body["model"]
    words = DIRECTIVE_RE.sub("", text).split()
    if model == "sim-echo":
        content = " ".join(words)
    else:
        count = 4 + digest[1] % 40  # so answer lengths, and usage, vary from row to row
        filler = " ".join(_FILLER[(digest[2 + i % 30] + i) % len(_FILLER)] for i in range(count))
        asked = " ".join(words[:12]) or "(no user message)"
        tag = request_tag(model, body["messages"])
        content = f"Simulated answer to: {asked}. [req {tag}] {filler}."
    call: dict[str, Any] | None = None
    if structured is not None:
        target, schema, mode = structured
        text_json = render(schema, mode, digest, words, request_tag(model, body["messages"]))
        if target.startswith("tool:"):
            call = {"name": target[5:], "arguments": text_json}
        else:
            content = text_json
    completion, finish = count_tokens(content), "stop"
    if cap is not None and completion > cap:
        content, completion = content.encode()[: cap * 4].decode(errors="ignore"), cap
        finish = "length"
    message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
    if "refusal" in directives:
        message.update(content=None, refusal=REFUSAL)
        completion, finish = count_tokens(REFUSAL), "stop"
    elif call is not None:
        message.update(
            content=None,
            tool_calls=[{"id": "call_" + digest.hex()[:24], "type": "function", "function": call}],
        )
        completion, finish = count_tokens(call["name"] + call["arguments"]), "tool_calls"
    elif "tool_calls" in directives:
        tools = body.get("tools")
        first = tools[0] if isinstance(tools, list) and tools else None
        offered = first.get("function") if isinstance(first, dict) else None
        name = (
            str(offered["name"]) if isinstance(offered, dict) and offered.get("name") else "lookup"
        )
        arguments = orjson.dumps({"query": " ".join(words[:12])}).decode()
        function = {"name": name, "arguments": arguments}
        message.update(
            content=None,
            tool_calls=[
                {"id": "call_" + digest.hex()[:24], "type": "function", "function": function}
            ],
        )
        completion, finish = count_tokens(name + arguments), "tool_calls"
    if "content_filter" in directives:
        finish = "content_filter"
    elif "length" in directives:
        finish = "length"
    thinking = "r1" in model or "thinking" in model or "reasoning_effort" in body
    reasoning = completion // 3 if thinking else 0
    cached = (prompt // 2) // 16 * 16 if prompt >= 64 and digest[0] % 2 == 0 else 0
    usage: dict[str, Any] = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "completion_tokens_details": {"reasoning_tokens": reasoning},
    }
    cost = 0.0
    if "cost" in directives:  # OpenRouter-style routers report a price in usage
        cost = usage["cost"] = round((prompt * 0.15 + completion * 0.6) / 1_000_000, 12)
    answer: dict[str, Any] = {
        "id": "chatcmpl-" + digest.hex()[:24],
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "system_fingerprint": "fp_sim",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
    }
    success: Success = (digest, 0, 0, 0, 0, 0.0)
    if "no_usage" not in directives:
        answer["usage"] = _garble(usage, directives)
        success = (digest, prompt, completion, cached, reasoning, cost)
    return orjson.dumps(answer), success, prompt + completion


# Usage a hostile or buggy server might report; the stats still count what was really served.
_BAD_USAGE: dict[str, Any] = {
    "usage_negative": lambda n: -n,
    "usage_string": str,
    "usage_float": lambda n: n + 0.5,
    "usage_bool": lambda n: True,
    "usage_huge": lambda n: 2**63 + n,  # past int64, still a JSON integer orjson writes
}


def _garble(usage: dict[str, Any], directives: dict[str, str | None]) -> dict[str, Any]:
    """`[[sim:usage_negative]]` and its kin: the counts replaced; `[[sim:cost_negative]]`: a
    negative `usage.cost`."""
    for name, change in _BAD_USAGE.items():
        if name in directives:
            for key in ("prompt_tokens", "completion_tokens", "total_tokens"):
                usage[key] = change(usage[key])
    if "cost_negative" in directives:
        usage["cost"] = -abs(usage.get("cost") or 0.001)
    return usage

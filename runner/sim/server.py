"""An OpenAI-compatible chat-completion server on loopback for demos, end-to-end tests, benchmarks.

Owns: routing and auth, per-row directives and random fault switches, real sliding-window
RPM/TPM limits with OpenAI- and routeway-style headers, and the counters tests measure clients
with (above all `resent_after_ok`: requests that were paid for twice, a body answered 200 again;
a copy refused or failed is not counted). The HTTP/1.1 side is runner/sim/http.py; the answers
and the rate windows are runner/sim/answers.py.

Must not import anyio, an HTTP library or any runner module but those two: only the standard
library and orjson, so it serves any client under test and starts fast in a bare subprocess.

Speed matters (the benchmark measures the client, not this).

Per-row directives, read from the last user message: `[[sim:NNN]]` (any status 400-599),
`[[sim:context_length_exceeded]]`, `[[sim:refusal]]`, `[[sim:content_filter]]`,
`[[sim:length]]`, `[[sim:no_usage]]`, `[[sim:tool_calls]]`, `[[sim:fail_first=N]]`,
`[[sim:cost]]`, `[[sim:slow_drip]]`, and usage that cannot be trusted: `[[sim:usage_negative]]`,
`usage_string`, `usage_float`, `usage_bool`, `usage_huge` (> 2^63), `cost_negative`. They act
after auth and rate limits, before random faults.

Structured answers (runner/sim/structured.py): a request with `response_format` json_schema or
json_object, or with `tools` and a `tool_choice` that forces a call, is answered with JSON for
the schema. Invalid on directive, read from any user message of the request (a feedback
re-ask's last message is the feedback): `[[sim:invalid_json]]`, `[[sim:schema_violation]]`,
`[[sim:fenced_json]]` (valid JSON in a fenced block with prose), `[[sim:invalid_then_valid=N]]`
(the row's first N answers invalid, counted per row: the model and the messages before the
first assistant message); and `rate_invalid`: that share of rows get an invalid first answer
(drawn from the row's digest, so the same rows whatever the order). A body re-sent after an
invalid answer counts in `reasked_after_invalid`, not in `resent_after_ok`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import hmac
import math
import random
import signal
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from email.utils import formatdate
from typing import Any, TypeVar

import orjson

from runner.sim.answers import (
    CREATED,
    DIRECTIVE_RE,
    Entry,
    Window,
    answer_for,
    completion_cap,
    invalid_reason,
    text_of,
)
from runner.sim.http import DRIP, DROP, FULL, HTML, PARTIAL, Connection, Reply, Success, error_reply
from runner.sim.structured import schema_of

__all__ = ["MODELS", "Simulator", "SimulatorConfig", "SimulatorStats", "SimulatorThread", "serve"]

MODELS = ("gpt-4o", "gpt-4o-mini", "deepseek-r1", "sim-echo")
_DEFAULT_BUDGET = 256  # completion tokens assumed at TPM admission when the request sets no cap
_CHAT_PATHS = (b"/v1/chat/completions", b"/chat/completions")
_HTML_502 = (
    b"<html><head><title>502 Bad Gateway</title></head><body><center><h1>502 Bad Gateway</h1>"
    b"</center><hr><center>cloudflare</center></body></html>"
)
_RETRY_FORMATS = ("seconds", "ms", "date")
_T = TypeVar("_T")


@dataclass(slots=True)
class SimulatorConfig:
    """Simulator switches; a rate is the share in [0, 1] of requests past auth and limits."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    # > 0: latency drawn from a lognormal with median latency_ms and this sigma (jitter unused);
    # 0.72 puts p99 at about 5.3x the median (1.5 s median, ~8 s p99).
    latency_sigma: float = 0.0
    seed: int = 0
    api_key: str | None = None
    echo_key_on_401: bool = False
    rate_429: float = 0.0
    retry_after_s: float = 1.0
    retry_after_format: str = "seconds"
    rate_500: float = 0.0
    error_statuses: tuple[int, ...] = (500, 502, 503, 504)
    rate_drop: float = 0.0
    rate_malformed: float = 0.0
    rate_html: float = 0.0
    rate_reset_mid_body: float = 0.0
    # Share of rows whose first structured (JSON) answer is invalid (see the module docstring).
    rate_invalid: float = 0.0
    rpm_limit: int | None = None
    tpm_limit: int | None = None
    ratelimit_headers: bool = True
    insufficient_quota: bool = False
    # A model name answered with 404 model_not_found, as a server that does not serve it.
    unknown_model: str | None = None

    def __post_init__(self) -> None:
        # Specs and CLI flags build configs directly: a bad switch fails here, not mid-run.
        current = {f.name: getattr(self, f.name) for f in fields(self)}
        for name, value in _check_changes(current).items():
            setattr(self, name, value)


@dataclass(slots=True)
class SimulatorStats:
    """Counters of chat-completion requests; token sums cover complete 200 answers only."""

    requests: int = 0
    ok: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    dropped: int = 0
    malformed: int = 0
    reset_mid_body: int = 0
    resent_after_ok: int = 0
    distinct_ok_bodies: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    total_tokens: int = 0
    cost: float = 0.0
    rate_limited: int = 0
    connections: int = 0
    # Tokens of every complete answer produced (prompt + completion), whatever usage it
    # reports (`no_usage` and garbled usage included): what a server would bill.
    served_tokens: int = 0
    # Structured answers: JSON ones produced, invalid ones among them (on purpose), bodies
    # re-sent after an invalid answer (re-asks, not answers paid twice), and requests that
    # follow up an earlier answer (an assistant message in them), with the last one's text.
    structured: int = 0
    invalid_answers: int = 0
    reasked_after_invalid: int = 0
    followups: int = 0
    last_followup: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def copy(self) -> SimulatorStats:
        return replace(self, by_status=dict(self.by_status))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SimulatorStats:
        """Rebuild from `to_dict()` or from `GET /_sim/stats`, whose JSON keys are strings."""
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["by_status"] = {int(k): int(v) for k, v in data.get("by_status", {}).items()}
        return cls(**values)


def _valid(kind: str, value: object) -> bool:
    """Check a setting against its annotation text (kept as a string by `from __future__`)."""
    if isinstance(value, bool):
        return kind == "bool"
    if kind == "float":
        return isinstance(value, int | float) and value >= 0
    if kind == "int":
        return isinstance(value, int)
    if kind == "int | None":
        return value is None or (isinstance(value, int) and value > 0)
    if kind == "str":
        return value in _RETRY_FORMATS
    if kind == "str | None":
        return value is None or isinstance(value, str)
    if kind == "tuple[int, ...]":
        return (
            isinstance(value, tuple)
            and bool(value)
            and all(isinstance(s, int) and 400 <= s <= 599 for s in value)
        )
    return False


def _check_changes(changes: Mapping[str, object]) -> dict[str, object]:
    kinds = {f.name: str(f.type) for f in fields(SimulatorConfig)}
    clean: dict[str, object] = {}
    for name, value in changes.items():
        if name not in kinds:
            raise ValueError(f"unknown simulator setting {name!r}")
        if isinstance(value, list):
            value = tuple(value)  # JSON has no tuples
        too_big = name.startswith("rate_") and isinstance(value, float | int) and value > 1
        if too_big or not _valid(kinds[name], value):
            raise ValueError(f"invalid value for {name}: {value!r}")
        clean[name] = value
    return clean


def _retry_after(cfg: SimulatorConfig) -> bytes:
    wait = cfg.retry_after_s
    if cfg.retry_after_format == "ms":
        return b"retry-after-ms: %d\r\n" % round(wait * 1000)
    if cfg.retry_after_format == "date":
        return f"Retry-After: {formatdate(time.time() + wait, usegmt=True)}\r\n".encode()
    return f"Retry-After: {wait:g}\r\n".encode()


_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                404: "not_found_error", 429: "rate_limit_error"}  # fmt: skip
_SERVER_ERROR = "The server had an error while processing your request."
_QUOTA = "You exceeded your current quota, please check your plan and billing details."


class Simulator:
    """The server; every method runs on the event loop that called `start`."""

    def __init__(
        self, config: SimulatorConfig | None = None, *, tls: ssl.SSLContext | None = None
    ) -> None:
        self.config = config if config is not None else SimulatorConfig()
        self._tls = tls  # serve HTTPS with this context
        self._server: asyncio.Server | None = None
        self._host, self._port = "127.0.0.1", 0
        self.connections: set[Connection] = set()
        self.reset()

    def reset(self) -> None:
        """Back to a fresh start: counters, seen bodies, fail_first counts, windows, fault RNG."""
        self.stats = SimulatorStats()
        self._ok_bodies: set[bytes] = set()
        self._fail_counts: dict[bytes, int] = {}
        self._row_answers: dict[bytes, int] = {}  # structured answers served per row
        self._invalid_bodies: set[bytes] = set()  # bodies whose last answer was invalid
        self._requests, self._tokens = Window(), Window()
        self._tpm_entry: Entry | None = None
        self._serial = 0
        self._reseed()

    def _reseed(self) -> None:
        self._rng = random.Random(self.config.seed)
        # A separate generator, so that latency jitter never shifts the fault sequence.
        self._jitter_rng = random.Random(self.config.seed ^ 0x5EED)

    def update_config(self, **changes: object) -> None:
        """Validate and apply setting changes in place; a new seed restarts the fault sequence."""
        for name, value in _check_changes(changes).items():
            setattr(self.config, name, value)
        if "seed" in changes:
            self._reseed()

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: Connection(self), host, port, backlog=1024, ssl=self._tls
        )
        self._host, self._port = host, self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Close the listener and every connection, answered or not."""
        if self._server is None:
            return
        self._server.close()
        for conn in list(self.connections):
            conn.abort()
        await asyncio.sleep(0)  # let the aborted transports run connection_lost and close sockets
        await self._server.wait_closed()
        self._server = None

    @property
    def port(self) -> int:
        return self._port

    @property
    def base_url(self) -> str:
        scheme = "https" if self._tls is not None else "http"
        return f"{scheme}://{self._host}:{self._port}/v1"

    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._server is not None
        return self._server.get_loop()

    def count_connection(self) -> None:
        self.stats.connections += 1

    def dispatch(
        self, method: bytes, target: bytes, auth: bytes | None, body: bytes
    ) -> tuple[Reply, float]:
        """Answer one request; returns the reply and the delay before it may be sent."""
        path = target.partition(b"?")[0]
        route = (method, path)
        if path in _CHAT_PATHS and method == b"POST":
            return self._chat(auth, body)
        if route in ((b"GET", b"/v1/models"), (b"GET", b"/models")):
            if self.config.api_key is not None and not self._auth_ok(auth, self.config.api_key):
                return self._unauthorized(self.config, auth, []), 0.0
            data = [
                {"id": m, "object": "model", "created": CREATED, "owned_by": "sim"} for m in MODELS
            ]
            return Reply(200, orjson.dumps({"object": "list", "data": data})), 0.0
        if route == (b"GET", b"/_sim/stats"):
            stats = orjson.dumps(self.stats.to_dict(), option=orjson.OPT_NON_STR_KEYS)
            return Reply(200, stats), 0.0
        if route == (b"POST", b"/_sim/reset"):
            self.reset()
            return Reply(200, b'{"reset":true}'), 0.0
        if route == (b"POST", b"/_sim/config"):
            try:
                changes = orjson.loads(body)
                if not isinstance(changes, dict):
                    raise ValueError("expected a JSON object of setting changes")
                self.update_config(**changes)
            except ValueError as exc:  # orjson.JSONDecodeError is a ValueError too
                return error_reply(400, str(exc), "invalid_request_error", None), 0.0
        if path == b"/_sim/config" and method in (b"GET", b"POST"):
            return Reply(200, orjson.dumps(asdict(self.config))), 0.0
        if path in (*_CHAT_PATHS, b"/v1/models", b"/models", b"/_sim/stats", b"/_sim/reset"):
            return error_reply(405, "Method not allowed.", "invalid_request_error", None), 0.0
        message = f"Unknown path {path.decode('latin-1')}."
        return error_reply(404, message, "invalid_request_error", None), 0.0

    def _chat(self, auth: bytes | None, raw: bytes) -> tuple[Reply, float]:
        cfg, stats = self.config, self.stats
        stats.requests += 1
        self._serial += 1
        reply = self._answer(cfg, auth, raw, [b"x-request-id: req_%012x\r\n" % self._serial])
        if reply.mode == DROP:
            stats.dropped += 1
        else:
            stats.by_status[reply.status] = stats.by_status.get(reply.status, 0) + 1
            stats.rate_limited += reply.status == 429
        delay = cfg.latency_ms
        if cfg.latency_sigma:
            delay *= math.exp(self._jitter_rng.gauss(0.0, cfg.latency_sigma))
        elif cfg.jitter_ms:
            delay += self._jitter_rng.uniform(-cfg.jitter_ms, cfg.jitter_ms)
        return reply, delay / 1000

    @staticmethod
    def _auth_ok(auth: bytes | None, key: str) -> bool:
        return auth is not None and hmac.compare_digest(auth, b"Bearer " + key.encode())

    @staticmethod
    def _unauthorized(cfg: SimulatorConfig, auth: bytes | None, headers: list[bytes]) -> Reply:
        if auth is None:
            message, code = "You didn't provide an API key.", None
        else:
            message, code = "Incorrect API key provided.", "invalid_api_key"
            if cfg.echo_key_on_401:  # some providers quote the key back: clients must scrub it
                offered = auth.decode("latin-1").removeprefix("Bearer ").strip()
                message = f"Incorrect API key provided: {offered[:12]}****."
        return error_reply(401, message, "invalid_request_error", code, headers)

    def _answer(
        self, cfg: SimulatorConfig, auth: bytes | None, raw: bytes, headers: list[bytes]
    ) -> Reply:
        """Auth, quota, request validation, rate limits, then directives, faults or the answer."""
        if cfg.api_key is not None and not self._auth_ok(auth, cfg.api_key):
            return self._unauthorized(cfg, auth, headers)
        if cfg.insufficient_quota:
            return error_reply(429, _QUOTA, "insufficient_quota", "insufficient_quota", headers)
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            problem: str | None = "We could not parse the JSON body of your request."
        else:
            problem = invalid_reason(body)
        if problem is not None:
            return error_reply(400, problem, "invalid_request_error", None, headers)
        if cfg.unknown_model is not None and body.get("model") == cfg.unknown_model:
            message = f"The model `{cfg.unknown_model}` does not exist or you do not have access."
            return error_reply(404, message, "invalid_request_error", "model_not_found", headers)
        digest = hashlib.sha256(orjson.dumps(body, option=orjson.OPT_SORT_KEYS)).digest()
        # A copy of a body already answered: a re-ask when that answer was invalid; else an
        # answer bought twice, counted below only if this copy is sold too (not a 429, a
        # fault or a drop: those were not bought again).
        again = digest in self._ok_bodies and digest not in self._invalid_bodies
        if digest in self._ok_bodies and not again:
            self.stats.reasked_after_invalid += 1
        messages = body["messages"]
        prompt = max(1, sum(len(text_of(m.get("content")).encode()) // 4 + 4 for m in messages))
        cap = completion_cap(body)
        refused = self._admit(cfg, prompt + (cap or _DEFAULT_BUDGET), headers)
        if refused is not None:
            return refused
        text = next(
            (text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), ""
        )
        directives = {m[1]: m[2] for m in DIRECTIVE_RE.finditer(text)} if "[[sim:" in text else {}
        reply = self._directed_failure(cfg, directives, digest, prompt, headers)
        fault = self._draw_fault(cfg) if reply is None else None
        spent = prompt
        if reply is None and fault in ("429", "500", "drop", "html"):
            reply = self._fault(cfg, fault, headers)
        elif reply is None:
            structured = self._structured(cfg, body, digest)
            payload, success, spent = answer_for(
                body, text, directives, digest, prompt, cap, structured
            )
            if fault == "malformed":
                self.stats.malformed += 1
                reply = Reply(200, payload[: len(payload) // 2], headers)
            elif fault == "reset":
                self.stats.reset_mid_body += 1
                reply = Reply(200, payload, headers, mode=PARTIAL)
            else:
                mode = DRIP if "slow_drip" in directives else FULL
                reply = Reply(200, payload, headers, mode=mode, success=success)
                self.stats.served_tokens += spent
                self.stats.resent_after_ok += again
        if self._tpm_entry is not None:  # admission counted max_tokens; keep what was really used
            self._tokens.total += spent - self._tpm_entry.amount
            self._tpm_entry.amount = spent
        return reply

    def _structured(
        self, cfg: SimulatorConfig, body: dict[str, Any], digest: bytes
    ) -> tuple[str, Any, str] | None:
        """(target, schema, mode) of a request that asks for JSON; counts its answer."""
        asked = schema_of(body)
        messages = body["messages"]
        if any(m.get("role") == "assistant" for m in messages):
            self.stats.followups += 1
            self.stats.last_followup = text_of(messages[-1].get("content"))[:2000]
        if asked is None:
            return None
        first = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), None)
        row = hashlib.sha256(
            orjson.dumps([body["model"], messages[:first]], option=orjson.OPT_SORT_KEYS)
        ).digest()
        served = self._row_answers.get(row, 0)
        self._row_answers[row] = served + 1
        said = " ".join(text_of(m.get("content")) for m in messages if m.get("role") == "user")
        wanted = {m[1]: m[2] for m in DIRECTIVE_RE.finditer(said)} if "[[sim:" in said else {}
        mode = "valid"
        if "invalid_json" in wanted:
            mode = "invalid_json"
        elif "schema_violation" in wanted:
            mode = "schema_violation"
        elif "fenced_json" in wanted:
            mode = "fenced"
        elif "invalid_then_valid" in wanted and served < int(wanted["invalid_then_valid"] or 1):
            mode = "schema_violation" if served % 2 else "invalid_json"
        elif served == 0 and int.from_bytes(row[:4], "big") < cfg.rate_invalid * 2**32:
            mode = "invalid_json" if row[4] % 2 else "schema_violation"
        self.stats.structured += 1
        if mode == "valid":
            self._invalid_bodies.discard(digest)
        else:
            self.stats.invalid_answers += 1
            self._invalid_bodies.add(digest)
        return asked[0], asked[1], mode

    def _admit(self, cfg: SimulatorConfig, estimate: int, headers: list[bytes]) -> Reply | None:
        """Apply the RPM/TPM windows; add the limit headers; a 429 when the request does not fit."""
        self._tpm_entry = None
        rpm, tpm = cfg.rpm_limit, cfg.tpm_limit
        if rpm is None and tpm is None:
            return None
        now = time.monotonic()
        requests, tokens = self._requests, self._tokens
        requests.prune(now)
        tokens.prune(now)
        wait, unit = (requests.wait(now, 1, rpm), "requests") if rpm is not None else (0.0, "")
        if not wait and tpm is not None:
            wait, unit = tokens.wait(now, estimate, tpm), "tokens"
        if not wait:  # refused requests never enter the windows
            if rpm is not None:
                requests.add(now, 1)
            if tpm is not None:
                self._tpm_entry = tokens.add(now, estimate)
        if cfg.ratelimit_headers and rpm is not None:
            headers.append(requests.headers(now, rpm, b"requests"))
            left = max(0, rpm - requests.total)
            reset = math.ceil(round(requests.reset_in(now), 3))  # 60.0000001 s is "60", not "61"
            headers.append(
                b"X-RateLimit-Limit-Minute: %d\r\nX-RateLimit-Remaining-Minute: %d\r\n"
                b"X-RateLimit-Reset-Minute: %d\r\n" % (rpm, left, reset)
            )
        if cfg.ratelimit_headers and tpm is not None:
            headers.append(tokens.headers(now, tpm, b"tokens"))
        if not wait:
            return None
        seconds, ms = max(1, math.ceil(wait)), math.ceil(wait * 1000)
        headers.append(b"Retry-After: %d\r\nretry-after-ms: %d\r\n" % (seconds, ms))
        message = f"Rate limit reached for {unit}"
        return error_reply(429, message, "rate_limit_error", "rate_limit_exceeded", headers)

    def _directed_failure(
        self,
        cfg: SimulatorConfig,
        directives: dict[str, str | None],
        digest: bytes,
        prompt: int,
        headers: list[bytes],
    ) -> Reply | None:
        for name in directives:
            if name.isdigit() and 400 <= int(name) <= 599:
                status = int(name)
                if status == 429:
                    headers.append(_retry_after(cfg))
                default = "server_error" if status >= 500 else "invalid_request_error"
                kind = _ERROR_TYPES.get(status, default)
                return error_reply(status, f"Simulated {status} error.", kind, None, headers)
        if "context_length_exceeded" in directives:
            message = (
                "This model's maximum context length is 128000 tokens. "
                f"However, your messages resulted in {prompt + 128000} tokens."
            )
            code = "context_length_exceeded"
            return error_reply(400, message, "invalid_request_error", code, headers)
        if "fail_first" in directives:
            failed = self._fail_counts.get(digest, 0)
            if failed < int(directives["fail_first"] or 1):
                self._fail_counts[digest] = failed + 1
                return error_reply(500, _SERVER_ERROR, "server_error", None, headers)
        return None

    def _draw_fault(self, cfg: SimulatorConfig) -> str | None:
        """One draw per request against fixed thresholds, so a seed fixes the fault sequence."""
        draw = self._rng.random()
        for name, rate in (
            ("429", cfg.rate_429),
            ("500", cfg.rate_500),
            ("drop", cfg.rate_drop),
            ("malformed", cfg.rate_malformed),
            ("html", cfg.rate_html),
            ("reset", cfg.rate_reset_mid_body),
        ):
            if draw < rate:
                return name
            draw -= rate
        return None

    def _fault(self, cfg: SimulatorConfig, fault: str, headers: list[bytes]) -> Reply:
        if fault == "429":
            headers.append(_retry_after(cfg))
            message = "Rate limit reached for requests"
            return error_reply(429, message, "rate_limit_error", "rate_limit_exceeded", headers)
        if fault == "500":
            status = self._rng.choice(cfg.error_statuses)
            return error_reply(status, _SERVER_ERROR, "server_error", None, headers)
        if fault == "drop":
            return Reply(0, b"", mode=DROP)
        return Reply(502, _HTML_502, headers, ctype=HTML)

    def record_ok(self, success: Success) -> None:
        """Count a complete 200 answer, once it is written."""
        digest, prompt, completion, cached, reasoning, cost = success
        stats = self.stats
        stats.ok += 1
        if digest not in self._ok_bodies:
            self._ok_bodies.add(digest)
            stats.distinct_ok_bodies += 1
        stats.prompt_tokens += prompt
        stats.completion_tokens += completion
        stats.total_tokens += prompt + completion
        stats.cached_tokens += cached
        stats.reasoning_tokens += reasoning
        stats.cost += cost


class SimulatorThread:
    """A Simulator on its own event loop in a daemon thread, for synchronous tests and tools."""

    def __init__(
        self,
        config: SimulatorConfig | None = None,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self._sim = Simulator(config, tls=tls)
        self._host, self._port = host, port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def __enter__(self) -> SimulatorThread:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def start(self, timeout: float = 10.0) -> None:
        self._ready.clear()
        self._error = None
        self._thread = threading.Thread(
            target=asyncio.run, args=(self._main(),), name="simulator", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout):
            raise TimeoutError("simulator did not start")
        if self._error is not None:
            self._thread.join(timeout)  # its loop is closing: nothing left to stop
            self._thread = None
            raise self._error

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        try:
            await self._sim.start(self._host, self._port)
        except OSError as exc:
            self._error = exc
            return
        finally:
            self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await self._sim.stop()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is None:
            return
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed already: the thread is ending
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout)
        self._thread = None

    def _call(self, fn: Callable[[], _T]) -> _T:
        """Run `fn` on the simulator's own loop and wait: the simulator is not thread-safe.

        Before start and after stop no loop runs, so `fn` runs here (stats stay readable).
        """
        loop = self._loop
        if loop is None or self._thread is None:
            return fn()
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()

        def run() -> None:
            try:
                future.set_result(fn())
            except Exception as exc:
                future.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return future.result(timeout=10)

    @property
    def port(self) -> int:
        return self._sim.port

    @property
    def base_url(self) -> str:
        return self._sim.base_url

    @property
    def stats(self) -> SimulatorStats:
        """A snapshot copy."""
        return self._call(self._sim.stats.copy)

    @property
    def config(self) -> SimulatorConfig:
        """A snapshot copy; change settings with `set_config`."""
        return self._call(lambda: replace(self._sim.config))

    def set_config(self, **changes: object) -> None:
        self._call(lambda: self._sim.update_config(**changes))

    def reset(self) -> None:
        self._call(self._sim.reset)


def serve(
    host: str,
    port: int,
    config: SimulatorConfig,
    ready: Callable[[str], None] | None = None,
    tls: ssl.SSLContext | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM; call `ready(base_url)` once listening (port 0: any free port)."""

    async def main() -> None:
        sim = Simulator(config, tls=tls)
        await sim.start(host, port)
        loop, stop = asyncio.get_running_loop(), asyncio.Event()
        signals = (signal.SIGINT, signal.SIGTERM)
        for sig in signals:
            # Signal handlers only work in the main thread; elsewhere the caller stops us.
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, stop.set)
        try:
            if ready is not None:
                ready(sim.base_url)
            await stop.wait()
        finally:
            for sig in signals:
                with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                    loop.remove_signal_handler(sig)
            await sim.stop()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())

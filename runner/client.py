"""One HTTP attempt at a chat completion, turned into a `Completion` or a typed `AttemptError`.

The requests go through http11.py, the project's own HTTP/1.1 engine (see there why: a
request costs ~15 µs of CPU there, ~80 µs in aiohttp and 0.5-4 ms in httpx2). Outcomes
are classified by status code and exception type, never by message text. Every message that
may quote the provider is scrubbed of the API key before it leaves this module. Retrying is
not done here (retry.py).
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Mapping
from functools import cache
from importlib import metadata
from typing import Any

import anyio
import orjson

from runner.errors import (
    AttemptError,
    AuthFailure,
    ConnectFailure,
    MalformedResponse,
    ProtocolFailure,
    QuotaFailure,
    RateLimited,
    RequestRejected,
    ServerFailure,
    TimeoutFailure,
)
from runner.http11 import ConnectError, DeadlineError, HTTPError, Pool, env_proxy
from runner.records import Completion, token_count, untrusted_usage, usage_cost
from runner.spec import is_loopback_url

# Response headers kept for the retry policy and the limiter.
KEPT_HEADERS = ("retry-after", "retry-after-ms", "x-should-retry")
_RATE_PREFIXES = ("x-ratelimit-",)
_QUOTA_CODES = {"insufficient_quota", "billing_hard_limit_reached", "billing_not_active"}
_KEYISH = re.compile(r"\b(sk|rk|pk)-[A-Za-z0-9_\-*.]{4,}")
_MAX_MESSAGE = 500


class Secret:
    """An API key that never shows itself in a repr, a log or a traceback's locals."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__


def scrub(text: str, secret: Secret | None) -> str:
    """Remove the key, any 6+ character prefix of it, and anything key-shaped from `text`."""
    if secret is not None:
        key = secret.reveal()
        if key:
            text = text.replace(key, "***")
            # Longest first, every one: a body may quote the key more than once, cut differently.
            for size in range(len(key) - 1, 5, -1):
                if key[:size] in text:
                    text = text.replace(key[:size], "***")
    return _KEYISH.sub(r"\1-***", text)


class ChatClient:
    """Chat completions from `POST {base_url}/chat/completions`, over pooled connections."""

    def __init__(
        self,
        *,
        base_url: str,
        api_key: Secret | None,
        timeout_s: float,
        connect_timeout_s: float,
        concurrency: int,
        headers: Mapping[str, str] | None = None,
        proxy: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._secret = api_key
        self._deadline = timeout_s
        url = base_url.rstrip("/") + "/chat/completions"
        sent = {"content-type": "application/json", "accept": "application/json"}
        sent.update({name.lower(): value for name, value in (headers or {}).items()})
        sent.setdefault("user-agent", f"runner/{_version()}")
        if api_key is not None:
            sent["authorization"] = f"Bearer {api_key.reveal()}"
        if proxy is None and not is_loopback_url(base_url):
            # Proxy variables make no sense for a loopback endpoint and would misroute it.
            proxy = env_proxy(url)
        self._pool = Pool(
            url,
            headers=sent,
            connect_timeout_s=min(connect_timeout_s, timeout_s),
            limit=concurrency,
            proxy=proxy,
            ssl_context=ssl_context,
        )

    async def aclose(self) -> None:
        with anyio.CancelScope(shield=True), anyio.move_on_after(5):
            await self._pool.aclose()

    async def complete(self, body: bytes) -> Completion:
        """Send one request; return its answer or raise an `AttemptError`."""
        try:
            # A redirect is an answer like another: never followed, so the key goes nowhere else.
            response = await self._pool.post(body, self._deadline)
        except ConnectError as exc:
            raise ConnectFailure(self._clean(f"cannot connect: {exc}")) from None
        except DeadlineError:
            raise TimeoutFailure(f"no complete answer within {self._deadline:g} s") from None
        except HTTPError as exc:
            raise ProtocolFailure(self._clean(f"connection failed mid-answer: {exc}")) from None
        headers = response.headers
        kept = _rate_headers(headers, KEPT_HEADERS)
        if response.status == 200:
            return self._completion(response.body, kept)
        raise self._failure(
            response.status,
            response.reason,
            headers.get("content-type", ""),
            response.body,
            kept,
            headers.get("location", "?"),
        )

    def _clean(self, text: str) -> str:
        text = scrub(text, self._secret)
        return text if len(text) <= _MAX_MESSAGE else text[: _MAX_MESSAGE - 3] + "..."

    def _failure(
        self,
        status: int,
        reason: str,
        kind: str,
        content: bytes,
        headers: dict[str, str],
        location: str,
    ) -> AttemptError:
        code, text = self._error_body(reason, kind, content)
        message = self._clean(f"{status} {code + ': ' if code else ''}{text}".strip())
        error: type[AttemptError]
        if 300 <= status < 400:
            message = self._clean(f"{status} redirect to {location} not followed")
            error = RequestRejected
        elif code in _QUOTA_CODES or status == 402:
            error = QuotaFailure
        elif status == 429:
            error = RateLimited
        elif status in (401, 403):
            error = AuthFailure
        elif status in (408, 409) or status >= 500:
            error = ServerFailure
        else:
            error = RequestRejected
        return error(message, status=status, headers=headers)

    def _error_body(self, reason: str, kind: str, content: bytes) -> tuple[str, str]:
        """The provider's error code and message, or a short description of the body."""
        try:
            data = orjson.loads(content)
        except orjson.JSONDecodeError:
            return "", f"{reason or 'error'} ({kind.split(';')[0] or 'no content type'} body)"
        error = data.get("error") if isinstance(data, dict) else None
        if isinstance(error, dict):
            code = error.get("code") or error.get("type") or ""
            return str(code), str(error.get("message") or "")
        if isinstance(error, str):
            return "", error
        return "", reason or "error"

    def _completion(self, content: bytes, headers: dict[str, str]) -> Completion:
        try:
            data = orjson.loads(content)
        except orjson.JSONDecodeError:
            raise MalformedResponse("200 with a body that is not JSON", status=200) from None
        if not isinstance(data, dict):
            raise MalformedResponse("200 with a body that is not a JSON object", status=200)
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            error = data.get("error")
            detail = self._clean(str(error.get("message"))) if isinstance(error, dict) else ""
            raise MalformedResponse(f"200 without choices {detail}".strip(), status=200)
        choice = choices[0]
        message = _dict(choice.get("message"))
        usage = _dict(data.get("usage"))
        prompt_details = _dict(usage.get("prompt_tokens_details"))
        completion_details = _dict(usage.get("completion_tokens_details"))
        tool_calls = message.get("tool_calls")
        return Completion(
            content=_text(message.get("content")),
            refusal=_str(message.get("refusal")),
            tool_calls=orjson.dumps(tool_calls).decode() if tool_calls else None,
            finish_reason=_str(choice.get("finish_reason")),
            response_model=_str(data.get("model")),
            response_id=_str(data.get("id")),
            system_fingerprint=_str(data.get("system_fingerprint")),
            prompt_tokens=_int(usage.get("prompt_tokens")),
            completion_tokens=_int(usage.get("completion_tokens")),
            total_tokens=_int(usage.get("total_tokens")),
            cached_tokens=_int(prompt_details.get("cached_tokens")),
            reasoning_tokens=_int(completion_details.get("reasoning_tokens")),
            provider_cost=_float(usage.get("cost")),
            headers=headers or None,
            usage_raw=untrusted_usage(data.get("usage")),
        )


@cache
def _version() -> str:
    try:
        return metadata.version("runner")
    except metadata.PackageNotFoundError:
        return "dev"


def _rate_headers(headers: Mapping[str, str], also: tuple[str, ...] = ()) -> dict[str, str]:
    """The x-ratelimit-* headers (and `also`) of lower-cased `headers`, for the limiter and
    the retry policy."""
    return {
        name: value
        for name, value in headers.items()
        if name.startswith(_RATE_PREFIXES) or name in also
    }


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _text(value: Any) -> str | None:
    if isinstance(value, list):  # content parts
        parts = [p.get("text", "") for p in value if isinstance(p, dict)]
        return "".join(p for p in parts if isinstance(p, str))
    return _str(value)


def _int(value: Any) -> int | None:
    return token_count(value)  # negative, > int64, float, string, bool: unknown


def _float(value: Any) -> float | None:
    return usage_cost(value)  # negative, NaN, infinite: unknown

"""One HTTP attempt at a chat completion, turned into a `Completion` or a typed `AttemptError`.

The only module that imports the HTTP library, aiohttp: one `ClientSession` per run over a
`TCPConnector` with one keep-alive connection per worker, no cookie jar, no redirects (a 3xx is
an answer like any other, so the key goes nowhere but the endpoint) and no retries of its own
beyond the one described at `_Handler`. What aiohttp does not do for us is done here:

- Every body is read through a bounded reader: the raw bytes and the decompressed bytes both
  stop at `max_response_bytes`, so a huge body or a gzip bomb costs one buffer, not the heap.
  Only gzip and deflate are asked for (and decoded here, bounded); a body in any other encoding
  was not asked for.
- Nothing unasked is taken as an answer: bytes that arrive on an idle connection close it, and
  a connection is only reused once the answer it carried has been checked (an answer id that
  connection delivered before, for another request, means it is out of step: it is closed).

Outcomes are classified by status code and exception type, never by message text. Every
message that may quote the provider is scrubbed of the API key before it leaves this module.
Retrying is not done here (retry.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import resource
import ssl
import time
import zlib
from collections.abc import Coroutine, Mapping
from contextvars import ContextVar
from functools import cache, partial
from importlib import metadata
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import anyio
import orjson
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ConnectionKey
from aiohttp.connector import Connection
from aiohttp.tracing import Trace
from multidict import CIMultiDict, CIMultiDictProxy

from runner.errors import (
    AttemptError,
    ConnectFailure,
    KeyRejected,
    MalformedResponse,
    ModelNotFound,
    OversizedResponse,
    ProtocolFailure,
    QuotaDenied,
    RateLimited,
    RequestRejected,
    ServerFailure,
    TimeoutFailure,
    UndecodableResponse,
    UsageError,
)
from runner.records import MAX_TOKENS, Completion, untrusted_usage, usage_cost
from runner.spec import is_loopback_url

# Response headers kept for the retry policy and the limiter.
KEPT_HEADERS = ("retry-after", "retry-after-ms", "x-should-retry")
_RATE_PREFIXES = ("x-ratelimit-",)
_QUOTA_CODES = {"insufficient_quota", "billing_hard_limit_reached", "billing_not_active"}
_KEYISH = re.compile(r"\b(sk|rk|pk)-[A-Za-z0-9_\-*.]{4,}")
_MAX_MESSAGE = 500
_SHORTEST_SECRET = 12  # shorter keys are placeholders: answers quoting them are kept as they are
# The text fields of an answer, kept on disk: a server quoting the key there has it cut out.
_ANSWER_TEXTS = (
    "content",
    "refusal",
    "tool_calls",
    "finish_reason",
    "response_model",
    "response_id",
    "system_fingerprint",
    "usage_raw",
)
MAX_RESPONSE_BYTES = 32 * 1024 * 1024
# Of an error answer (not 200) only this much is read: enough for the provider's message.
_ERROR_BODY_BYTES = 64 * 1024
# Idle connections older than this are not reused. Servers close idle keep-alive connections
# after their own timeout (Node and uvicorn 5 s, gunicorn 2 s, nginx 75 s, AWS ALB 60 s); a
# request written as the server closes is lost. Staying under most of them makes that rare;
# the one retry at `_Handler` covers the rest.
KEEPALIVE_S = 4.0
# Answer ids remembered per connection, to recognise an answer delivered twice.
_REMEMBERED_IDS = 64
_ENCODINGS = "gzip, deflate"
_SURROGATE = re.compile("[\ud800-\udfff]")


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


# The connection the current task's request went out on (set by `_Handler` as aiohttp hands
# it the request), and whether that request must go out on a new connection.
_USED: ContextVar[_Handler | None] = ContextVar("runner_used_connection", default=None)
_FRESH: ContextVar[bool] = ContextVar("runner_fresh_connection", default=False)


class _Handler(ResponseHandler):
    """aiohttp's connection protocol, plus what it does not track.

    - `idle`: between answers. Bytes that arrive then were not asked for (a server repeating
      an answer, or out of step): the connection is closed, never read from again.
    - `requests` and `answered`: how many requests the connection has carried and whether the
      current one got any byte back. A request that fails with the server closing (or
      resetting) a connection that had already carried an answer, before a single byte of
      response, is retried once at once on a new connection (`ChatClient._attempt`). What is
      provable there: no response byte came back on a connection the server had left idle,
      which is what an idle timeout racing our write looks like. What is not provable: that
      the server never read the request (a server that reads a request and then closes
      without a word looks the same from here). aiohttp retries this case for idempotent
      methods only; a POST is retried once here, and the first try is not recorded as an
      attempt, so it is not counted as possibly billed.
    - `ids`: the answer ids it delivered lately, to recognise one delivered again.
    - `checking` / `parked`: a connection whose answer this module has not yet checked is
      not handed to another request (see `_Connector._release`).
    """

    def __init__(self, loop: Any) -> None:
        super().__init__(loop)
        self.idle = False
        self.requests = 0
        self.answered = False
        self.checking = False
        self.parked: ConnectionKey | None = None
        self.ids: dict[str, tuple[int, int]] | None = None

    def set_response_params(self, **params: Any) -> None:
        # aiohttp calls this as a request is about to be written on this connection.
        self.idle = False
        self.requests += 1
        self.answered = False
        self.checking = True
        _USED.set(self)
        super().set_response_params(**params)

    def data_received(self, data: bytes) -> None:
        if data:
            if self.idle:
                self.idle = False
                self.close()  # nobody asked: the connection cannot be trusted any more
                return
            self.answered = True
        super().data_received(data)

    def repeated(self, answer_id: str, request: bytes, content: bytes) -> bool:
        """Remember `answer_id` as the answer `content` to `request`; True when this
        connection delivered that very answer (same id, same bytes) before, to a different
        request.

        The same id for the same request is no proof of anything (a caching gateway, or the
        same question asked again of a deterministic server), nor is the same id with other
        content (servers that give every answer one id): only the same bytes again for a
        different request count.
        """
        ids = self.ids
        if ids is None:
            ids = self.ids = {}
        asked, said = hash(request), hash(content)
        before = ids.get(answer_id)
        if before is not None and before[0] != asked and before[1] == said:
            return True
        ids[answer_id] = (asked, said)
        if len(ids) > _REMEMBERED_IDS:
            del ids[next(iter(ids))]
        return False


class _Connector(aiohttp.TCPConnector):
    """aiohttp's connector with `_Handler` connections that are reused only once checked."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._factory = partial(_Handler, loop=self._loop)  # type: ignore[assignment]

    def _get(
        self, key: ConnectionKey, traces: list[Trace]
    ) -> Coroutine[Any, Any, Connection | None]:
        # Not a coroutine of its own: aiohttp's, or one that finds no idle connection (a
        # request that must go out on a new one). One coroutine a request fewer.
        if _FRESH.get():
            return _no_connection()
        return super()._get(key, traces)

    def _release(
        self, key: ConnectionKey, protocol: ResponseHandler, *, should_close: bool = False
    ) -> None:
        if (
            isinstance(protocol, _Handler)
            and protocol.checking
            and not (should_close or protocol.should_close or self._closed)
        ):
            # Not yet checked: free its slot but keep it out of the pool until `settle`.
            protocol.parked, protocol.idle = key, True
            self._release_acquired(key, protocol)
            return
        super()._release(key, protocol, should_close=should_close)
        if isinstance(protocol, _Handler) and protocol.is_connected():
            protocol.idle = True

    def settle(self, protocol: _Handler, keep: bool) -> None:
        """The answer on `protocol` is checked: back to the pool if `keep`, else closed."""
        key, protocol.parked, protocol.checking = protocol.parked, None, False
        if not keep:
            protocol.close()
        elif key is not None:
            if self._closed or not protocol.is_connected():
                protocol.close()
            else:
                super()._release(key, protocol)
                protocol.idle = True


async def _no_connection() -> Connection | None:
    return None


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
        max_response_bytes: int = MAX_RESPONSE_BYTES,
        ca_bundle: str | None = None,
        proxy: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._secret = api_key
        self._deadline = timeout_s
        self._connect_timeout = min(connect_timeout_s, timeout_s)
        self._max_bytes = max_response_bytes
        self._concurrency = concurrency
        self._url = base_url.rstrip("/") + "/chat/completions"
        sent = {name.lower(): value for name, value in (headers or {}).items()}
        if api_key is not None:
            sent["authorization"] = f"Bearer {api_key.reveal()}"
        # Ours, the same on every request and no secret: the session's default headers,
        # which aiohttp merges in C (the spec's headers and the key go with each request).
        self._fixed = {
            name: value
            for name, value in (
                ("content-type", "application/json"),
                ("accept", "application/json"),
                ("accept-encoding", _ENCODINGS),
                ("user-agent", f"runner/{_version()}"),
            )
            if name not in sent
        }
        # aiohttp turns a plain dict into a CIMultiDict on every request: made once here.
        self._headers = CIMultiDictProxy(CIMultiDict(sent)) if sent else None
        # The environment's proxy, read here rather than by aiohttp's trust_env, which would
        # also look up ~/.netrc on every request and send what it finds. A loopback endpoint
        # never goes through a proxy: the variables are meant for the outside world.
        self._proxy = proxy if proxy is not None else _env_proxy(self._url)
        self._tls: ssl.SSLContext | None = None
        if urlsplit(self._url).scheme == "https":
            self._tls = ssl_context or _tls_context(ca_bundle)
        self._session: aiohttp.ClientSession | None = None
        self._connector: _Connector | None = None
        # `total` bounds the whole exchange, body included: a slow drip cannot outlive it.
        self._timeout = _timeout(timeout_s, self._connect_timeout)
        _allow_open_files(concurrency + 64)

    def _open(self) -> aiohttp.ClientSession:
        # Made on first use: an aiohttp session belongs to the running event loop.
        self._connector = _Connector(
            limit=self._concurrency,
            limit_per_host=0,
            keepalive_timeout=KEEPALIVE_S,
            ssl=self._tls if self._tls is not None else True,
        )
        # Only our fixed headers session-wide: aiohttp copies those onto a proxy's CONNECT
        # request too (the Authorization header as Proxy-Authorization), which would hand the
        # key, or a secret among the spec's headers, to the proxy.
        self._session = aiohttp.ClientSession(
            connector=self._connector,
            headers=self._fixed,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,  # decoded here, bounded
            timeout=self._timeout,
        )
        return self._session

    async def aclose(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            with anyio.CancelScope(shield=True), anyio.move_on_after(5):
                await session.close()

    def complete(self, body: bytes) -> Coroutine[Any, Any, Completion]:
        """Send one request; (a coroutine that) returns its answer or raises an
        `AttemptError`. Not a coroutine of its own: one fewer on the way of every answer."""
        return self._attempt(self._session or self._open(), body, self._deadline, retry_stale=True)

    async def _again(
        self, session: aiohttp.ClientSession, body: bytes, started: float
    ) -> Completion:
        """The one retry of a request whose reused connection closed before any byte of
        answer (see `_Handler`): on a new connection, within what is left of the deadline."""
        left = self._deadline - (time.monotonic() - started)
        if left <= 0:
            raise TimeoutFailure(f"no complete answer within {self._deadline:g} s")
        token = _FRESH.set(True)
        try:
            return await self._attempt(session, body, left, retry_stale=False)
        finally:
            _FRESH.reset(token)

    async def _attempt(
        self, session: aiohttp.ClientSession, body: bytes, deadline: float, *, retry_stale: bool
    ) -> Completion:
        _USED.set(None)
        started = time.monotonic()
        handler: _Handler | None = None
        read = keep = stale = False
        # The session's own timeout unless this is the rest of a deadline already begun.
        timeout = (
            self._timeout
            if deadline == self._deadline
            else _timeout(deadline, self._connect_timeout)
        )
        try:
            # A redirect is an answer like another: never followed, so the key goes nowhere else.
            # Awaited, not `async with`: the same release below without aiohttp's five
            # context-manager coroutines on the way of every answer.
            response = await session.post(
                self._url,
                data=body,
                headers=self._headers,
                allow_redirects=False,
                proxy=self._proxy,
                timeout=timeout,
            )
            try:
                # The connection it came on (aiohttp may have let go of it already).
                handler = _USED.get()
                status = response.status
                headers = response.headers
                kept = _rate_headers(headers, KEPT_HEADERS)
                length = response.content_length
                if (
                    status == 200
                    and length is not None
                    and length <= self._max_bytes
                    and "content-encoding" not in headers
                ):
                    # `_body`'s usual case, without a coroutine of its own: a plain body of
                    # an announced length within the bound (the parser holds it to that).
                    content = await response.read()
                elif status == 200:
                    content = await self._body(response, status)
                else:
                    content = await _error_body(response)
                reason = response.reason or ""
            finally:
                response.release()
            read = True
        except AttemptError:
            raise
        except (aiohttp.ConnectionTimeoutError, aiohttp.ClientConnectorError) as exc:
            raise ConnectFailure(self._clean(f"cannot connect: {_describe(exc)}")) from None
        except aiohttp.ClientHttpProxyError as exc:
            raise ConnectFailure(self._clean(f"the proxy refused: {exc.status}")) from None
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            used = _USED.get()
            if not (retry_stale and used is not None and used.requests > 1 and not used.answered):
                raise ProtocolFailure(
                    self._clean(f"connection failed mid-answer: {_describe(exc)}")
                ) from None
            stale = True  # retried below, once the connection is settled
        except TimeoutError:
            raise TimeoutFailure(f"no complete answer within {self._deadline:g} s") from None
        except aiohttp.ClientError as exc:
            raise ProtocolFailure(
                self._clean(f"connection failed mid-answer: {_describe(exc)}")
            ) from None
        finally:
            if not read and self._connector is not None:
                # A failure or a cancellation before the answer was whole: never reuse it.
                if (used := _USED.get()) is not None:
                    self._connector.settle(used, False)
        if stale:
            return await self._again(session, body, started)
        try:
            if status != 200:
                location = headers.get("location", "?")
                kind = headers.get("content-type", "")
                raise self._failure(status, reason, kind, content, kept, location)
            answer = self._completion(content, kept)
            if (
                answer.response_id
                and handler is not None
                and handler.repeated(answer.response_id, body, content)
            ):
                raise ProtocolFailure(
                    "an answer this connection had delivered before came again: the "
                    "connection is out of step and was closed",
                    status=200,
                )
            keep = True
            return answer
        finally:
            if handler is not None and self._connector is not None:
                self._connector.settle(handler, keep or status != 200)

    async def _body(self, response: aiohttp.ClientResponse, status: int) -> bytes:
        """The whole body, decoded, never more than `max_response_bytes` raw or decoded."""
        limit = self._max_bytes
        length = response.content_length
        if length is not None and length > limit:
            raise OversizedResponse(_too_large(limit, f"announced {length} bytes"), status=status)
        encoding = response.headers.get("content-encoding", "").strip().lower()
        inflater = _Inflater(encoding) if encoding in ("gzip", "x-gzip", "deflate") else None
        if inflater is None and length is not None:
            content = await response.read()  # exactly `length` bytes: the parser holds it to that
        else:
            chunks: list[bytes] = []
            raw = size = 0
            stream = response.content
            while chunk := await stream.readany():
                raw += len(chunk)
                if raw > limit:
                    raise OversizedResponse(_too_large(limit, "raw"), status=status)
                if inflater is not None:
                    chunk = inflater.feed(chunk, limit - size, status)
                size += len(chunk)
                chunks.append(chunk)
            if inflater is not None:
                inflater.finish(status)
            content = b"".join(chunks)
        if inflater is None and encoding not in ("", "identity"):
            # Complete, paid for, and in an encoding we never asked for: keep the failure,
            # do not buy it again.
            raise UndecodableResponse(
                self._clean(f"200 in content-encoding {encoding!r}, which was not asked for"),
                status=status,
            )
        return content

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
            error = QuotaDenied
        elif status == 404 or code == "model_not_found":
            error = ModelNotFound
        elif status == 429:
            error = RateLimited
        elif status in (401, 403):
            error = KeyRejected
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
            # orjson refuses lone surrogate escapes ("\\ud83d", half an emoji: models emit
            # them) and invalid UTF-8; the answer was paid for, so read it leniently instead.
            data = _lenient_json(content)
            if data is None:
                raise MalformedResponse("200 with a body that is not JSON", status=200) from None
        if not isinstance(data, dict):
            raise MalformedResponse("200 with a body that is not a JSON object", status=200)
        choices = data.get("choices")
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            error = data.get("error")
            detail = self._clean(str(error.get("message"))) if isinstance(error, dict) else ""
            raise MalformedResponse(f"200 without choices {detail}".strip(), status=200)
        choice = choices[0]
        message = choice.get("message")
        if type(message) is not dict:
            message = {}
        text = message.get("content")
        tool_calls = message.get("tool_calls")
        prompt, completion, total, cached, reasoning, cost, raw = _usage(data.get("usage"))
        # By position, in Completion's field order (~0.4 us a row fewer than keywords).
        answer = Completion(
            text if type(text) is str else _text(text),  # content
            refusal if type(refusal := message.get("refusal")) is str else None,
            orjson.dumps(tool_calls).decode() if tool_calls else None,
            reason if type(reason := choice.get("finish_reason")) is str else None,
            model if type(model := data.get("model")) is str else None,  # response_model
            answer_id if type(answer_id := data.get("id")) is str else None,  # response_id
            print_ if type(print_ := data.get("system_fingerprint")) is str else None,
            prompt,
            completion,
            total,
            cached,
            reasoning,
            cost,
            200,
            headers or None,
            raw,
        )
        return self._redacted(answer)

    def _redacted(self, answer: Completion) -> Completion:
        """`answer` with the key (or most of it) cut from every text a server put in it."""
        key = self._secret.reveal() if self._secret is not None else ""
        if len(key) < _SHORTEST_SECRET:
            return answer  # "EMPTY", "none": a local server's placeholder, common words
        least = min(len(key), max(8, len(key) * 3 // 4))
        changed = {}
        for name in _ANSWER_TEXTS:
            text = getattr(answer, name)
            if text is not None and key[:least] in text:
                for size in range(len(key), least - 1, -1):
                    text = text.replace(key[:size], "***")
                changed[name] = text
        return dataclasses.replace(answer, **changed) if changed else answer


class _Inflater:
    """gzip or deflate, decoded as it arrives, never past the room it is given."""

    def __init__(self, encoding: str) -> None:
        self._deflate = encoding == "deflate"
        # 47: a gzip or zlib header, detected; deflate is meant to be zlib-wrapped.
        self._inflate = zlib.decompressobj(15 if self._deflate else 47)
        self._started = False

    def feed(self, data: bytes, room: int, status: int) -> bytes:
        try:
            out = self._inflate.decompress(data, room + 1)
        except zlib.error:
            if not (self._deflate and not self._started):
                raise UndecodableResponse(
                    "200 with a body that is not valid gzip/deflate", status=status
                ) from None
            # Some servers send raw deflate without the zlib header.
            self._inflate, self._started = zlib.decompressobj(-15), True
            return self.feed(data, room, status)
        self._started = True
        if len(out) > room:
            raise OversizedResponse(_too_large(room, "decompressed"), status=status)
        return out

    def finish(self, status: int) -> None:
        if not self._inflate.eof:
            raise UndecodableResponse("200 with a gzip/deflate body cut short", status=status)


async def _error_body(response: aiohttp.ClientResponse) -> bytes:
    """The first `_ERROR_BODY_BYTES` of an error answer, decoded when it is gzip/deflate."""
    chunks: list[bytes] = []
    size = 0
    stream = response.content
    while size < _ERROR_BODY_BYTES and (chunk := await stream.readany()):
        chunks.append(chunk)
        size += len(chunk)
    content = b"".join(chunks)[:_ERROR_BODY_BYTES]
    encoding = response.headers.get("content-encoding", "").strip().lower()
    if encoding in ("gzip", "x-gzip", "deflate"):
        with contextlib.suppress(zlib.error):
            return zlib.decompressobj(15 if encoding == "deflate" else 47).decompress(
                content, _ERROR_BODY_BYTES
            )
        return b""
    return content


def _too_large(limit: int, what: str) -> str:
    return f"answer body over max_response_bytes ({limit} bytes, {what}); not read further"


def _lenient_json(content: bytes) -> Any:
    """`content` as JSON with lone surrogates and invalid UTF-8 turned into U+FFFD; None if it
    is not JSON at all."""
    try:
        data = json.loads(content.decode("utf-8", "replace"))
    except ValueError:
        return None
    return _no_surrogates(data)


def _no_surrogates(value: Any) -> Any:
    if isinstance(value, str):
        return _SURROGATE.sub("\ufffd", value)
    if isinstance(value, list):
        return [_no_surrogates(v) for v in value]
    if isinstance(value, dict):
        return {_no_surrogates(k): _no_surrogates(v) for k, v in value.items()}
    return value


def _timeout(total: float, connect: float) -> aiohttp.ClientTimeout:
    return aiohttp.ClientTimeout(total=total, connect=min(connect, total))


def _tls_context(ca_bundle: str | None) -> ssl.SSLContext:
    """A verifying TLS context: the system store (SSL_CERT_FILE/SSL_CERT_DIR honoured), or
    only the certificates of `ca_bundle`."""
    try:
        return ssl.create_default_context(cafile=ca_bundle)
    except (ssl.SSLError, OSError) as exc:
        where = f"endpoint.ca_bundle {ca_bundle}" if ca_bundle else "the system CA store"
        raise UsageError(f"{where}: cannot load the certificates ({_describe(exc)})") from None


def _env_proxy(url: str) -> str | None:
    """The proxy HTTPS_PROXY / HTTP_PROXY name for `url` (NO_PROXY honoured), if any."""
    if is_loopback_url(url):
        return None
    import urllib.request  # ~20 ms of start-up, for remote endpoints only

    parts = urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme.lower())
    if not proxy or not parts.hostname:
        return None
    host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    if urllib.request.proxy_bypass(host):
        return None
    scheme = urlsplit(proxy if "://" in proxy else f"http://{proxy}").scheme.lower()
    if scheme not in ("http", "https"):
        # Never echo the proxy URL: it may hold credentials.
        raise UsageError(
            f"the {parts.scheme.upper()}_PROXY environment variable names a {scheme}:// "
            "proxy; only http:// and https:// proxies are supported"
        )
    return proxy if "://" in proxy else f"http://{proxy}"


def _describe(exc: BaseException) -> str:
    """What went wrong, by type, with the OS's or TLS's own words where they exist."""
    cause = exc
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        cause = exc.certificate_error
    if isinstance(cause, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {cause.verify_message}"
    if isinstance(cause, aiohttp.ClientConnectorError):
        return (
            f"{cause.host}:{cause.port}: {cause.os_error.strerror or type(cause.os_error).__name__}"
        )
    if isinstance(cause, aiohttp.ClientPayloadError):
        # Its text counts the bytes received, which differ from attempt to attempt: the
        # report groups errors by message, so name the kind of cut only.
        inner = next((a for a in cause.args if isinstance(a, BaseException)), cause.__cause__)
        return f"the body was cut short ({type(inner or cause).__name__})"
    if isinstance(cause, OSError) and cause.strerror:
        return f"{type(cause).__name__}: {cause.strerror}"
    return type(cause).__name__ + (f": {cause}" if str(cause) else "")


def _allow_open_files(needed: int) -> None:
    """Raise the soft open-files limit toward the hard one: one descriptor per connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        ceiling = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))


@cache
def _version() -> str:
    try:
        return metadata.version("runner")
    except metadata.PackageNotFoundError:
        return "dev"


def _rate_headers(headers: Mapping[str, str], also: tuple[str, ...] = ()) -> dict[str, str]:
    """The x-ratelimit-* headers (and `also`) of lower-cased `headers`, for the limiter and
    the retry policy."""
    kept = {}
    for name, value in headers.items():
        name = name.lower()
        if name.startswith(_RATE_PREFIXES) or name in also:
            kept[name] = value
    return kept


def _str(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _text(value: Any) -> str | None:
    if isinstance(value, list):  # content parts
        parts = [p.get("text", "") for p in value if isinstance(p, dict)]
        return "".join(p for p in parts if isinstance(p, str))
    return _str(value)


def _count(value: Any) -> int | None:
    """A count from parsed JSON as `token_count` takes it (JSON gives plain ints only):
    negative, past int64, float, string, bool: unknown."""
    return value if type(value) is int and 0 <= value <= MAX_TOKENS else None


_UsageFields = tuple[
    int | None, int | None, int | None, int | None, int | None, float | None, str | None
]


def _usage(usage: Any) -> _UsageFields:
    """(prompt, completion, total, cached, reasoning tokens, cost, raw usage) of an answer.

    Each count passes `token_count` and the cost `usage_cost`, else it is None; the raw usage
    (`untrusted_usage`) is kept only when some part of it did not pass. One pass over the
    usual answer's usage, no JSON text made for it.
    """
    if type(usage) is not dict:
        return None, None, None, None, None, None, untrusted_usage(usage)
    prompt = _count(usage.get("prompt_tokens"))
    completion = _count(usage.get("completion_tokens"))
    total = _count(usage.get("total_tokens"))
    clean = (
        prompt is not None
        and completion is not None
        and (total is not None or "total_tokens" not in usage)
    )
    cached = reasoning = None
    details = usage.get("prompt_tokens_details")
    if type(details) is dict:
        cached = _count(details.get("cached_tokens"))
        clean = clean and (cached is not None or "cached_tokens" not in details)
    elif details is not None:
        clean = False
    details = usage.get("completion_tokens_details")
    if type(details) is dict:
        reasoning = _count(details.get("reasoning_tokens"))
        clean = clean and (reasoning is not None or "reasoning_tokens" not in details)
    elif details is not None:
        clean = False
    cost = usage.get("cost")
    if cost is not None:
        cost = usage_cost(cost)
        clean = clean and cost is not None
    raw = None if clean else untrusted_usage(usage)
    return prompt, completion, total, cached, reasoning, cost, raw

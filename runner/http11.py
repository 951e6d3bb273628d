"""HTTP/1.1 for one endpoint: keep-alive connections on asyncio protocols, parsed by httptools.

The engine behind client.py, and all it needs: `POST` of a JSON body to one URL, one request at
a time per connection, connections kept alive and reused most-recent first, a deadline on the
whole exchange (connect included), TLS, and HTTP proxies (CONNECT for https, absolute-form for
http). No redirects, no cookies, no retries: a 3xx is an answer like any other, and retrying
is the policy's business. Only this module and client.py know how bytes reach the server.

Why not aiohttp (the engine before): measured on bench/run.py W1, a request cost the runner
~80 µs of CPU inside aiohttp's session layer against ~15 µs here, and the whole runner could not
match a plain aiohttp loop while paying it. The parsing that must be right (chunked bodies,
keep-alive rules, malformed responses) is llhttp's, through httptools.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import ipaddress
import os
import resource
import socket
import ssl
import time
import urllib.request
import zlib
from dataclasses import dataclass
from typing import cast
from urllib.parse import unquote, urlsplit

import anyio
import httptools

# Idle connections older than this are closed rather than reused: servers drop idle
# keep-alive connections after 5-120 s, and a request sent on one of those is lost.
KEEPALIVE_S = 15.0
DNS_TTL_S = 300.0


class HTTPError(Exception):
    """An exchange that produced no complete HTTP answer."""


class ConnectError(HTTPError):
    """The connection (TCP, proxy tunnel or TLS handshake) could not be made: nothing sent."""


class DeadlineError(HTTPError):
    """No complete answer before the deadline."""


class ProtocolError(HTTPError):
    """The connection broke, or the bytes were not HTTP, after the request was sent."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    reason: str
    headers: dict[str, str]  # lower-cased names; a repeated header keeps its last value
    body: bytes


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where requests go: the origin, the request target and, with a proxy, where to dial."""

    scheme: str
    host: str
    port: int
    target: bytes  # the request-target: a path, or the absolute URL through an http proxy
    dial_host: str
    dial_port: int
    tunnel: bool  # https through a proxy: CONNECT first
    proxy_auth: str | None  # a Proxy-Authorization value

    @classmethod
    def of(cls, url: str, proxy: str | None = None) -> Endpoint:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url}")
        port = parts.port or (443 if scheme == "https" else 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if proxy is None:
            return cls(
                scheme, parts.hostname, port, path.encode(), parts.hostname, port, False, None
            )
        via = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        if via.scheme.lower() != "http" or not via.hostname:
            raise ValueError("only http:// proxies are supported")
        auth = None
        if via.username is not None:
            pair = f"{unquote(via.username)}:{unquote(via.password or '')}".encode()
            auth = "Basic " + base64.b64encode(pair).decode()
        tunnel = scheme == "https"
        target = path if tunnel else f"{scheme}://{_authority(parts.hostname, port, scheme)}{path}"
        return cls(
            scheme,
            parts.hostname,
            port,
            target.encode(),
            via.hostname,
            via.port or 80,
            tunnel,
            auth,
        )

    @property
    def authority(self) -> str:
        return _authority(self.host, self.port, self.scheme)


def _authority(host: str, port: int, scheme: str) -> str:
    shown = f"[{host}]" if ":" in host else host
    default = 443 if scheme == "https" else 80
    return shown if port == default else f"{shown}:{port}"


def env_proxy(url: str) -> str | None:
    """The proxy the environment (HTTPS_PROXY, HTTP_PROXY, NO_PROXY) names for `url`."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    proxy = proxies.get(parts.scheme.lower())
    if not proxy or not parts.hostname:
        return None
    host = parts.hostname if parts.port is None else f"{parts.hostname}:{parts.port}"
    return None if urllib.request.proxy_bypass(host) else proxy


class _Connection(asyncio.Protocol):
    """One keep-alive connection; `send` writes a request and returns the answer's future."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Response] | None = None
        self.closed = False
        self.idle_since = time.monotonic()
        self._reason = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._headers_done = False
        self._until_close = False  # a body with neither length nor chunks ends at close
        self._complete = False
        self._keep_alive = False

    # -- asyncio.Protocol --

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._headers_done and self._until_close and not self._complete:
            self.on_message_complete()
        elif exc is not None:
            self._fail(ProtocolError(f"connection lost: {type(exc).__name__}: {exc}"))
        elif self._headers_done:
            self._fail(ProtocolError("connection closed before the whole answer arrived"))
        else:
            self._fail(ProtocolError("connection closed before any answer"))

    def data_received(self, data: bytes) -> None:
        if self.waiter is None:
            self.close()  # bytes nobody asked for: the connection cannot be trusted
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(ProtocolError("the server switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(ProtocolError(f"malformed HTTP answer: {exc}"))

    # -- httptools callbacks --

    def on_message_begin(self) -> None:
        self._reason, self._headers, self._body = b"", {}, []
        self._headers_done = self._until_close = self._complete = self._keep_alive = False

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        headers = self._headers
        self._headers_done = True
        self._until_close = (
            "content-length" not in headers
            and "chunked" not in headers.get("transfer-encoding", "").lower()
        )

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:
            # An interim answer (100 Continue, 103 Early Hints): the real one follows.
            self._headers_done = self._until_close = False
            return
        self._complete = True
        # Read now: once this callback returns, the parser is reset for the next answer.
        self._keep_alive = self.parser.should_keep_alive()
        waiter, self.waiter = self.waiter, None
        if waiter is None or waiter.done():
            return
        try:
            body = _decoded(b"".join(self._body), self._headers.get("content-encoding", ""))
        except ProtocolError as exc:
            waiter.set_exception(exc)
            return
        reason = self._reason.decode("latin-1").strip()
        waiter.set_result(Response(status, reason, self._headers, body))

    # -- used by the pool --

    @property
    def reusable(self) -> bool:
        return (
            self._complete
            and not self.closed
            and self.waiter is None
            and not self._until_close
            and self._keep_alive
        )

    @property
    def transport_closing(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    def send(self, head: bytes, body: bytes) -> asyncio.Future[Response]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self._headers_done = self._until_close = self._complete = self._keep_alive = False
        self.transport.writelines((head, body))
        return self.waiter

    def expire(self) -> None:
        self._fail(DeadlineError("no complete answer before the deadline"))

    def _fail(self, exc: HTTPError) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _decoded(body: bytes, encoding: str) -> bytes:
    encoding = encoding.strip().lower()
    if encoding in ("", "identity"):
        return body
    if encoding in ("gzip", "x-gzip", "deflate"):
        try:
            wbits = 47 if encoding != "deflate" else 15  # 47: gzip or zlib header, detected
            return zlib.decompress(body, wbits)
        except zlib.error:
            if encoding == "deflate":  # some servers send raw deflate without the zlib header
                with contextlib.suppress(zlib.error):
                    return zlib.decompress(body, -15)
            raise ProtocolError(f"answer body is not valid {encoding}") from None
    raise ProtocolError(f"answer body has an unsupported content-encoding: {encoding}")


class Pool:
    """Keep-alive connections to one URL, for at most `limit` requests at a time."""

    def __init__(
        self,
        url: str,
        *,
        headers: dict[str, str],
        connect_timeout_s: float,
        limit: int,
        proxy: str | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.endpoint = point = Endpoint.of(url, proxy)
        lines = [f"POST {point.target.decode()} HTTP/1.1", f"host: {point.authority}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        if point.proxy_auth and not point.tunnel:
            lines.append(f"proxy-authorization: {point.proxy_auth}")
        self._head = ("\r\n".join(lines) + "\r\ncontent-length: ").encode("latin-1")
        self._connect_timeout = connect_timeout_s
        self._tls: ssl.SSLContext | None = None
        if point.scheme == "https":
            self._tls = ssl_context or ssl.create_default_context()
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()
        self._addresses: tuple[float, list[str]] | None = None
        self._literal: list[str] | None = None  # the dial host, when it is an IP address
        with contextlib.suppress(ValueError):
            self._literal = [str(ipaddress.ip_address(point.dial_host))]
        self._resolving: asyncio.Future[list[str]] | None = None
        _allow_open_files(limit + 64)

    async def post(self, body: bytes, timeout_s: float) -> Response:
        """Send `body`; the answer, or an HTTPError, within `timeout_s` in all."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        connection = self._take() or await self._connect(deadline)
        waiter = connection.send(self._head + b"%d\r\n\r\n" % len(body), body)
        timer = loop.call_at(deadline, connection.expire)
        try:
            return await waiter
        finally:
            timer.cancel()
            if connection.reusable:
                connection.idle_since = time.monotonic()
                self._idle.append(connection)
            else:
                connection.close()
                self._open.discard(connection)

    def _take(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            fresh = now - connection.idle_since < KEEPALIVE_S
            if fresh and not connection.closed and not connection.transport_closing:
                return connection
            connection.close()
            self._open.discard(connection)
        return None

    async def _connect(self, deadline: float) -> _Connection:
        point = self.endpoint
        loop = asyncio.get_running_loop()
        limit = min(self._connect_timeout, max(deadline - loop.time(), 0.0))
        errors: list[str] = []
        try:
            with anyio.fail_after(limit):
                for address in await self._resolve():
                    try:
                        connection = await self._dial(address)
                    except (OSError, EOFError, asyncio.LimitOverrunError, ConnectError) as exc:
                        errors.append(_describe(exc))
                        continue
                    self._open.add(connection)
                    return connection
        except TimeoutError:
            errors.append(f"no connection within {limit:g} s")
        where = f"{point.dial_host}:{point.dial_port}"
        raise ConnectError(f"{where}: {'; '.join(errors) or 'no address'}")

    async def _dial(self, address: str) -> _Connection:
        point, loop = self.endpoint, asyncio.get_running_loop()
        if not point.tunnel:
            hostname = None if self._tls is None else point.host
            sock = await _tcp_connect(loop, address, point.dial_port)
            try:
                _, connection = await loop.create_connection(
                    _Connection, sock=sock, ssl=self._tls, server_hostname=hostname
                )
            except BaseException:
                sock.close()
                raise
            return connection
        reader, writer = await asyncio.open_connection(address, point.dial_port)
        try:
            request = f"CONNECT {point.authority} HTTP/1.1\r\nhost: {point.authority}\r\n"
            if point.proxy_auth:
                request += f"proxy-authorization: {point.proxy_auth}\r\n"
            writer.write((request + "\r\n").encode("latin-1"))
            head = await reader.readuntil(b"\r\n\r\n")
            status = head.split(b" ", 2)
            if len(status) < 2 or status[1] != b"200":
                line = head.split(b"\r\n", 1)[0].decode("latin-1")
                raise ConnectError(f"proxy refused the tunnel: {line}")
            assert self._tls is not None
            await writer.start_tls(self._tls, server_hostname=point.host)
        except BaseException:
            writer.close()
            raise
        connection = _Connection()
        transport = cast(asyncio.Transport, writer.transport)
        transport.set_protocol(connection)
        connection.connection_made(transport)
        return connection

    async def _resolve(self) -> list[str]:
        """The dial host's addresses, looked up once per DNS_TTL_S and shared by every dial."""
        if self._literal is not None:
            return self._literal
        host = self.endpoint.dial_host
        now = time.monotonic()
        if self._addresses is not None and now - self._addresses[0] < DNS_TTL_S:
            return self._addresses[1]
        lookup = self._resolving
        if lookup is None:
            lookup = self._resolving = asyncio.ensure_future(self._lookup(host))
            # Read its outcome even when every waiter was cancelled (no "never retrieved").
            lookup.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            return await asyncio.shield(lookup)
        finally:
            if lookup.done() and self._resolving is lookup:
                self._resolving = None

    async def _lookup(self, host: str) -> list[str]:
        loop = asyncio.get_running_loop()
        try:
            infos = await loop.getaddrinfo(host, self.endpoint.dial_port, type=socket.SOCK_STREAM)
        except OSError as exc:
            raise ConnectError(f"cannot resolve {host}: {_describe(exc)}") from None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        self._addresses = (time.monotonic(), addresses)
        return addresses

    async def aclose(self) -> None:
        for connection in self._open:  # the idle ones included
            connection.close()
        self._open.clear()
        self._idle.clear()
        await anyio.lowlevel.checkpoint()  # let the transports' close callbacks run


async def _tcp_connect(loop: asyncio.AbstractEventLoop, address: str, port: int) -> socket.socket:
    """A connected non-blocking TCP socket to an IP address.

    What loop.create_connection(host, port) does for one address, in one wait for
    writability and no futures beyond it: ~80 µs of CPU a connection instead of ~120
    (measured opening 256 at once over loopback), which is most of a pool's first wave.
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        error = sock.connect_ex((address, port))
        if error == errno.EINPROGRESS:
            ready = loop.create_future()
            fd = sock.fileno()  # by number: for a socket, asyncio formats its repr on register
            loop.add_writer(fd, ready.set_result, None)
            try:
                await ready
            finally:
                loop.remove_writer(fd)
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, os.strerror(error))
    except BaseException:
        sock.close()
        raise
    return sock


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS certificate not trusted: {exc.verify_message}"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__


def _allow_open_files(needed: int) -> None:
    """Raise the soft open-files limit toward the hard one: one descriptor per connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        ceiling = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (ceiling, hard))

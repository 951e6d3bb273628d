"""The simulator's HTTP/1.1 side: requests parsed on asyncio's Protocol API, answered in order.

Keep-alive and pipelining, one parse per read buffer, one write per read buffer, latency through
`loop.call_later` (no task per request), and the ways an answer can fail on the wire: dropped,
cut short, or dripped slowly. What a request gets is the Host's business (runner/sim/server.py).
"""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections import deque
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Protocol

import orjson

DRIP_INTERVAL_S = 0.2
_MAX_HEAD = 64 * 1024
_MAX_BODY = 64 * 1024 * 1024
JSON = b"application/json"
HTML = b"text/html; charset=utf-8"

FULL, DROP, PARTIAL, DRIP = range(4)
# digest, prompt, completion, cached, reasoning, cost
Success = tuple[bytes, int, int, int, int, float]


@dataclass(slots=True)
class Reply:
    status: int
    body: bytes
    headers: list[bytes] = field(default_factory=list)
    ctype: bytes = JSON
    mode: int = FULL
    success: Success | None = None  # what a complete write adds to the stats
    close: bool = False
    ready: bool = False
    handle: asyncio.TimerHandle | None = None


def _status_line(status: int) -> bytes:
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Unknown"
    return f"HTTP/1.1 {status} {phrase}\r\n".encode()


_STATUS_LINES = {s: _status_line(s) for s in range(100, 600)}


def _render_head(reply: Reply, length: int) -> bytes:
    return b"".join(
        (
            _STATUS_LINES[reply.status],
            b"content-type: %s\r\ncontent-length: %d\r\n" % (reply.ctype, length),
            *reply.headers,
            b"connection: close\r\n\r\n" if reply.close else b"\r\n",
        )
    )


def error_reply(
    status: int, message: str, kind: str, code: str | None, headers: list[bytes] | None = None
) -> Reply:
    body = {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return Reply(status, orjson.dumps(body), headers if headers is not None else [])


class _BadRequest(Exception):
    pass


def _parse_head(head: bytes) -> tuple[bytes, bytes, int, bool, bytes | None]:
    """Return method, target, content length, keep-alive and the Authorization value."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or parts[2] not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise _BadRequest("malformed request line")
    keep = parts[2] == b"HTTP/1.1"  # HTTP/1.0 keep-alive is not worth the extra header
    length, auth = 0, None
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise _BadRequest("malformed header line")
        name = name.strip().lower()
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                raise _BadRequest("invalid content-length") from None
            if not 0 <= length <= _MAX_BODY:
                raise _BadRequest("content-length out of range")
        elif name == b"transfer-encoding":
            raise _BadRequest("transfer-encoding is not supported: send content-length")
        elif name == b"connection" and value.strip().lower() == b"close":
            keep = False
        elif name == b"authorization":
            auth = value.strip()
    return parts[0], parts[1], length, keep, auth


class Host(Protocol):
    """What a connection needs of the server it belongs to."""

    connections: set[Connection]

    def count_connection(self) -> None: ...

    def dispatch(
        self, method: bytes, target: bytes, auth: bytes | None, body: bytes
    ) -> tuple[Reply, float]: ...

    def record_ok(self, success: Success) -> None: ...

    def loop(self) -> asyncio.AbstractEventLoop: ...


class Connection(asyncio.Protocol):
    """One client connection: parses pipelined requests and writes their answers in order."""

    def __init__(self, sim: Host) -> None:
        self._sim = sim
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._need = 0
        self._pending: deque[Reply] = deque()
        self._out: list[bytes] = []
        self._drip: Reply | None = None
        self._drip_pos = 0
        self._drip_handle: asyncio.TimerHandle | None = None
        self._stopped = False  # no more requests are parsed: closing, or the stream is unparseable

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._sim.connections.add(self)
        self._sim.count_connection()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stopped = True
        self._cancel_timers()
        self._pending.clear()
        self._sim.connections.discard(self)

    # Back-pressure: a client that pipelines without reading must not grow our buffers.
    def pause_writing(self) -> None:
        if self._transport is not None:
            self._transport.pause_reading()

    def resume_writing(self) -> None:
        if self._transport is not None:
            self._transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self._stopped:
            return
        if self._buf:
            self._buf += data
            if len(self._buf) < self._need:
                return
            data = bytes(self._buf)
            self._buf.clear()
        pos, size, need = 0, len(data), 0
        while pos < size and not self._stopped:
            end = data.find(b"\r\n\r\n", pos)
            if end < 0:
                if size - pos > _MAX_HEAD:
                    self._reject("request head too large")
                break
            try:
                method, target, length, keep, auth = _parse_head(data[pos:end])
            except _BadRequest as exc:
                self._reject(str(exc))
                break
            start = end + 4
            if size - start < length:
                need = start + length - pos
                break
            pos = start + length
            if not keep:
                self._stopped = True
            reply, delay = self._sim.dispatch(method, target, auth, data[start:pos])
            self._enqueue(reply, delay, not keep)
        if pos < size and not self._stopped:
            self._buf += data[pos:]
            self._need = need
        self._commit()

    def _reject(self, message: str) -> None:
        self._stopped = True
        reply = error_reply(400, f"Bad HTTP request: {message}", "invalid_request_error", None)
        self._enqueue(reply, 0.0, True)

    def _enqueue(self, reply: Reply, delay: float, close: bool) -> None:
        reply.close = close
        if delay <= 0:
            if not self._pending and self._drip is None:
                self._emit(reply)
                return
            reply.ready = True
        else:
            reply.handle = self._sim.loop().call_later(delay, self._on_ready, reply)
        self._pending.append(reply)

    def _on_ready(self, reply: Reply) -> None:
        reply.ready, reply.handle = True, None
        self._flush()
        self._commit()

    def _flush(self) -> None:
        pending = self._pending
        while pending and pending[0].ready and self._drip is None and self._emit(pending.popleft()):
            pass

    def _emit(self, reply: Reply) -> bool:
        """Write one answer; False when this connection can take no further answer for now."""
        if reply.mode == DROP:
            self._close()
            return False
        body = reply.body
        self._out.append(_render_head(reply, len(body)))
        if reply.mode == PARTIAL:
            self._out.append(body[: len(body) // 2])
            self._close()
            return False
        if reply.mode == DRIP:
            self._drip, self._drip_pos = reply, 0
            self._drip_handle = self._sim.loop().call_later(DRIP_INTERVAL_S, self._drip_step)
            return False
        self._out.append(body)
        if reply.success is not None:
            self._sim.record_ok(reply.success)
        if reply.close:
            self._close()
            return False
        return True

    def _drip_step(self) -> None:
        reply = self._drip
        assert reply is not None and self._transport is not None
        self._transport.write(reply.body[self._drip_pos : self._drip_pos + 1])
        self._drip_pos += 1
        if self._drip_pos < len(reply.body):
            self._drip_handle = self._sim.loop().call_later(DRIP_INTERVAL_S, self._drip_step)
            return
        self._drip = self._drip_handle = None
        if reply.success is not None:
            self._sim.record_ok(reply.success)
        if reply.close:
            self._close()
        else:
            self._flush()
        self._commit()

    def _commit(self) -> None:
        if self._out and self._transport is not None:
            self._transport.write(b"".join(self._out))
            self._out.clear()

    def _close(self) -> None:
        self._stopped = True
        self._commit()
        self._cancel_timers()
        self._pending.clear()
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        self._stopped = True
        self._cancel_timers()
        if self._transport is not None:
            self._transport.abort()

    def _cancel_timers(self) -> None:
        for reply in self._pending:
            if reply.handle is not None:
                reply.handle.cancel()
        if self._drip_handle is not None:
            self._drip_handle.cancel()
            self._drip_handle = None


def server_tls(certfile: str, keyfile: str) -> ssl.SSLContext:
    """A TLS server context for the simulator from a PEM certificate chain and its key."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certfile, keyfile)
    return context


def make_test_certificate(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate it signed, for localhost, sim.test, 127.0.0.1.

    Returns (ca.pem, server.pem, server.key) in `folder`; made with the `openssl` command,
    for tests and benchmarks only (the keys are not protected).
    """
    folder.mkdir(parents=True, exist_ok=True)
    ca, ca_key = folder / "ca.pem", folder / "ca.key"
    cert, key, csr = folder / "server.pem", folder / "server.key", folder / "server.csr"
    ext = folder / "server.ext"
    ext.write_text(
        "subjectAltName = DNS:localhost, DNS:sim.test, IP:127.0.0.1\n"
        "basicConstraints = critical, CA:FALSE\n"
        "keyUsage = critical, digitalSignature\n"
        "extendedKeyUsage = serverAuth\n"
        "subjectKeyIdentifier = hash\n"
        "authorityKeyIdentifier = keyid, issuer\n"
    )
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    commands = [
        ["openssl", "req", "-x509", *ec, "-keyout", ca_key, "-out", ca, "-days", "7",
         "-subj", "/CN=runner test CA",
         "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign"],
        ["openssl", "req", *ec, "-keyout", key, "-out", csr, "-subj", "/CN=localhost"],
        ["openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key,
         "-CAcreateserial", "-out", cert, "-days", "7", "-extfile", ext],
    ]  # fmt: skip
    for argv in commands:
        subprocess.run([str(a) for a in argv], check=True, capture_output=True)
    return ca, cert, key

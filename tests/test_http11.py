"""runner/http11.py over real loopback sockets: keep-alive, framings, encodings, failures,
cancellation, proxies (absolute-form and CONNECT), TLS and DNS caching.

Every server here is a tiny asyncio one bound to 127.0.0.1, counting what it accepts and
recording what it reads; nothing ever dials another address.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import re
import shutil
import socket
import ssl
import subprocess
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import anyio
import pytest

from runner import http11
from runner.http11 import (
    ConnectError,
    DeadlineError,
    Endpoint,
    HTTPError,
    Pool,
    ProtocolError,
    env_proxy,
)

pytestmark = pytest.mark.timeout(10)

PATH = "/v1/chat/completions"
BODY = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'


# -- helper servers ---------------------------------------------------------------------------


@dataclass
class Server:
    port: int
    connections: int = 0  # accepted so far
    eofs: int = 0  # connections the client closed while the server was waiting to read
    requests: list[bytes] = field(default_factory=list)  # what was read, head and body

    def url(self, scheme: str = "http", host: str = "127.0.0.1") -> str:
        return f"{scheme}://{host}:{self.port}{PATH}"


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, Server], Awaitable[None]]


@asynccontextmanager
async def serve(handler: Handler, *, tls: ssl.SSLContext | None = None) -> AsyncIterator[Server]:
    """A server on 127.0.0.1 running `handler` per connection; all of it stopped at the end."""
    tasks: set[asyncio.Task[Any]] = set()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        box.connections += 1
        # Cancelled at teardown: end normally, or Python 3.11's streams log the cancellation.
        with contextlib.suppress(OSError, EOFError, asyncio.CancelledError):
            try:
                await handler(reader, writer, box)
            finally:
                writer.close()
                with contextlib.suppress(OSError, asyncio.CancelledError):
                    await writer.wait_closed()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=tls)
    box = Server(server.sockets[0].getsockname()[1])
    try:
        yield box
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def read_message(reader: asyncio.StreamReader) -> bytes | None:
    """One request or answer framed by content-length (or without a body); None at EOF."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + await reader.readexactly(length)


async def wait_for_eof(reader: asyncio.StreamReader, server: Server) -> None:
    """Read until the client closes the connection, and count that."""
    with contextlib.suppress(ConnectionError):
        while await reader.read(65536):
            pass
    server.eofs += 1


Answer = bytes | Sequence[bytes] | Callable[[bytes], bytes]


def replying(
    answer: Answer, *, delay_s: float = 0.0, close: bool = False, pause_s: float = 0.005
) -> Handler:
    """Answer every request on a connection; a sequence is written piece by piece, `pause_s`
    apart.

    With `close`, the server closes the connection right after its first answer."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, box: Server):
        while (request := await read_message(reader)) is not None:
            box.requests.append(request)
            if delay_s:
                await asyncio.sleep(delay_s)
            if callable(answer):
                writer.write(answer(request))
            elif isinstance(answer, bytes):
                writer.write(answer)
            else:
                for piece in answer:
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(pause_s)
            await writer.drain()
            if close:
                return
        box.eofs += 1

    return handle


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, box: Server) -> None:
    """Read the request and never answer; count the client's close."""
    request = await read_message(reader)
    if request is not None:
        box.requests.append(request)
    await wait_for_eof(reader, box)


def answer(body: bytes = b"ok", *headers: str, status: str = "200 OK", length: bool = True):
    lines = [f"HTTP/1.1 {status}", *headers]
    if length:
        lines.append(f"content-length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def chunks(*parts: bytes) -> bytes:
    """Chunks of a chunked body, without the last (empty) chunk."""
    return b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in parts)


@asynccontextmanager
async def pool_for(url: str, **options: Any) -> AsyncIterator[Pool]:
    options.setdefault("headers", {})
    options.setdefault("connect_timeout_s", 2.0)
    options.setdefault("limit", 8)
    pool = Pool(url, **options)
    try:
        yield pool
    finally:
        await pool.aclose()


async def eventually(condition: Callable[[], bool], within_s: float = 2.0) -> None:
    """Wait until `condition()` holds, polling every 5 ms for at most `within_s`."""
    for _ in range(int(within_s / 0.005)):
        if condition():
            return
        await anyio.sleep(0.005)
    assert condition()


def head_lines(request: bytes) -> list[str]:
    return request.partition(b"\r\n\r\n")[0].decode("latin-1").split("\r\n")


# -- proxies --------------------------------------------------------------------------------


async def forward_proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, box: Server):
    """An http proxy: record each request, forward it in origin-form to the 127.0.0.1 origin
    its absolute-form target names, and relay the answer."""
    while (request := await read_message(reader)) is not None:
        box.requests.append(request)
        head, _, body = request.partition(b"\r\n\r\n")
        first, *fields = head.split(b"\r\n")
        method, target, version = first.split(b" ")
        url = urlsplit(target.decode())
        assert url.hostname == "127.0.0.1" and url.port is not None
        fields = [f for f in fields if not f.lower().startswith(b"proxy-authorization:")]
        forwarded = b"\r\n".join([b"%s %s %s" % (method, url.path.encode(), version), *fields])
        origin_reader, origin_writer = await asyncio.open_connection("127.0.0.1", url.port)
        try:
            origin_writer.write(forwarded + b"\r\n\r\n" + body)
            reply = await read_message(origin_reader)
        finally:
            origin_writer.close()
            with contextlib.suppress(OSError):
                await origin_writer.wait_closed()
        assert reply is not None
        writer.write(reply)
        await writer.drain()
    box.eofs += 1


async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
    except ConnectionError:
        pass
    finally:
        sink.close()


def tunnel_proxy(reply: bytes | None = b"HTTP/1.1 200 Connection established\r\n\r\n") -> Handler:
    """A CONNECT proxy: record the CONNECT head, answer `reply` (None: never answer) and,
    after a 200, relay bytes both ways with the 127.0.0.1 origin it names."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, box: Server):
        head = await reader.readuntil(b"\r\n\r\n")
        box.requests.append(head)
        if reply is None:
            await wait_for_eof(reader, box)
            return
        writer.write(reply)
        await writer.drain()
        if b" 200 " not in reply.split(b"\r\n", 1)[0]:
            return
        host, _, port = head.split(b" ")[1].decode().rpartition(":")
        assert host == "127.0.0.1"
        origin_reader, origin_writer = await asyncio.open_connection(host, int(port))
        try:
            await asyncio.gather(pipe(reader, origin_writer), pipe(origin_reader, writer))
        finally:
            origin_writer.close()

    return handle


# -- TLS material ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TLSFiles:
    cert: Path
    key: Path

    def server(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert, self.key)
        return context

    def client(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.cert))


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    """A self-signed certificate for IP 127.0.0.1, made by the openssl command line."""
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command is not installed")
    folder = tmp_path_factory.mktemp("tls")
    files = TLSFiles(folder / "c.pem", folder / "k.pem")
    command = "openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=127.0.0.1"
    command += " -addext subjectAltName=IP:127.0.0.1"
    subprocess.run(
        [*command.split(), "-keyout", str(files.key), "-out", str(files.cert)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    return files


# -- 1. keep-alive --------------------------------------------------------------------------


@pytest.mark.anyio
async def test_sequential_posts_reuse_one_connection() -> None:
    async with serve(replying(answer(b"ok"))) as server, pool_for(server.url()) as pool:
        for _ in range(20):
            response = await pool.post(BODY, 5)
            assert (response.status, response.body) == (200, b"ok")
    assert server.connections == 1
    assert len(server.requests) == 20


@pytest.mark.anyio
async def test_concurrent_posts_open_no_more_connections_than_requests_in_flight() -> None:
    async with (
        serve(replying(answer(b"ok"), delay_s=0.02)) as server,
        pool_for(server.url(), limit=8) as pool,
    ):
        statuses: list[int] = []

        async def one() -> None:
            statuses.append((await pool.post(BODY, 5)).status)

        for _ in range(3):
            async with anyio.create_task_group() as group:
                for _ in range(8):
                    group.start_soon(one)
            assert server.connections <= 8
    assert statuses == [200] * 24
    assert 1 <= server.connections <= 8


# -- 2. framings ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_content_length_body_is_returned_and_connection_reused() -> None:
    body = bytes(range(256)) * 40
    reply = answer(body, "content-type: application/octet-stream", "X-Custom: Value")
    async with serve(replying(reply)) as server, pool_for(server.url()) as pool:
        first = await pool.post(BODY, 5)
        second = await pool.post(BODY, 5)
    assert (first.status, first.reason, first.body) == (200, "OK", body)
    assert first.headers["content-length"] == str(len(body))
    assert first.headers["x-custom"] == "Value"  # names lower-cased, values kept
    assert second.body == body
    assert server.connections == 1


@pytest.mark.anyio
async def test_chunked_body_of_several_chunks_is_reassembled_and_connection_reused() -> None:
    head = answer(b"", "transfer-encoding: chunked", length=False)
    pieces = [head, chunks(b"hel", b"lo "), chunks(b"wor"), chunks(b"ld", b"!") + b"0\r\n\r\n"]
    async with serve(replying(pieces)) as server, pool_for(server.url()) as pool:
        first = await pool.post(BODY, 5)
        second = await pool.post(BODY, 5)
    assert first.body == second.body == b"hello world!"
    assert server.connections == 1


@pytest.mark.anyio
async def test_body_delimited_by_close_is_returned_whole_and_connection_not_reused() -> None:
    pieces = [answer(b"", length=False), b"part one, ", b"part two"]
    async with (
        serve(replying(pieces, close=True)) as server,
        pool_for(server.url()) as pool,
    ):
        first = await pool.post(BODY, 5)
        second = await pool.post(BODY, 5)
    assert first.body == second.body == b"part one, part two"
    assert server.connections == 2


@pytest.mark.anyio
async def test_connection_close_answer_is_returned_and_next_post_opens_new_connection() -> None:
    # The server keeps its end open: it is the client that must honour `connection: close`.
    reply = answer(b"bye", "connection: close")
    async with serve(replying(reply)) as server, pool_for(server.url()) as pool:
        first = await pool.post(BODY, 5)
        second = await pool.post(BODY, 5)
        await eventually(lambda: server.eofs == 2)
    assert first.body == second.body == b"bye"
    assert server.connections == 2


@pytest.mark.anyio
async def test_answer_written_one_byte_at_a_time_is_parsed() -> None:
    reply = answer(b"tiny", "x-split: across many reads", status="201 Created")
    pieces = [reply[i : i + 1] for i in range(len(reply))]
    async with (
        serve(replying(pieces, pause_s=0.001)) as server,
        pool_for(server.url()) as pool,
    ):
        response = await pool.post(BODY, 5)
        assert (await pool.post(BODY, 5)).body == b"tiny"
    assert (response.status, response.reason, response.body) == (201, "Created", b"tiny")
    assert response.headers["x-split"] == "across many reads"
    assert server.connections == 1


@pytest.mark.anyio
async def test_interim_1xx_answers_are_skipped_for_the_final_one() -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"
    pieces = [interim, answer(b"final", "x-final: yes")]
    async with serve(replying(pieces)) as server, pool_for(server.url()) as pool:
        first = await pool.post(BODY, 5)
        second = await pool.post(BODY, 5)
    assert (first.status, first.body) == (200, b"final")
    assert first.headers["x-final"] == "yes"
    assert "link" not in first.headers  # the interim answer's headers are not mixed in
    assert second.body == b"final"
    assert server.connections == 1


@pytest.mark.anyio
async def test_close_after_an_interim_answer_raises_protocol_error_at_once() -> None:
    interim = b"HTTP/1.1 100 Continue\r\n\r\n"
    async with serve(replying(interim, close=True)) as server, pool_for(server.url()) as pool:
        with pytest.raises(ProtocolError):
            await pool.post(BODY, 0.5)


@pytest.mark.anyio
async def test_http10_answer_without_keep_alive_is_not_reused() -> None:
    reply = answer(b"old").replace(b"HTTP/1.1", b"HTTP/1.0", 1)
    async with serve(replying(reply)) as server, pool_for(server.url()) as pool:
        assert (await pool.post(BODY, 5)).body == b"old"
        assert (await pool.post(BODY, 5)).body == b"old"
    assert server.connections == 2


@pytest.mark.anyio
async def test_redirect_is_an_answer_not_followed() -> None:
    reply = answer(b"moved", "location: /elsewhere", status="302 Found")
    async with serve(replying(reply)) as server, pool_for(server.url()) as pool:
        response = await pool.post(BODY, 5)
    assert (response.status, response.reason) == (302, "Found")
    assert response.headers["location"] == "/elsewhere"
    assert len(server.requests) == 1


# -- 3. content encodings -------------------------------------------------------------------


def raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-15)
    return compressor.compress(data) + compressor.flush()


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("encoding", "encode"),
    [
        ("gzip", gzip.compress),
        ("x-gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("deflate", raw_deflate),
        ("identity", lambda data: data),
    ],
    ids=["gzip", "x-gzip", "deflate-zlib", "deflate-raw", "identity"],
)
async def test_encoded_body_is_decoded(encoding: str, encode: Callable[[bytes], bytes]) -> None:
    text = b'{"choices": [{"message": {"content": "' + b"bonjour " * 500 + b'"}}]}'
    reply = answer(encode(text), f"content-encoding: {encoding}")
    async with serve(replying(reply)) as server, pool_for(server.url()) as pool:
        response = await pool.post(BODY, 5)
    assert response.body == text


@pytest.mark.anyio
async def test_unknown_content_encoding_raises_protocol_error() -> None:
    reply = answer(b"\x0b\x02\x80ok\x03", "content-encoding: br")
    async with serve(replying(reply)) as server, pool_for(server.url()) as pool:
        with pytest.raises(ProtocolError, match="unsupported content-encoding: br"):
            await pool.post(BODY, 5)


@pytest.mark.anyio
async def test_corrupt_gzip_body_raises_protocol_error() -> None:
    reply = answer(gzip.compress(b"x" * 100)[:-12] + b"garbage!", "content-encoding: gzip")
    async with serve(replying(reply)) as server, pool_for(server.url()) as pool:
        with pytest.raises(ProtocolError, match="not valid gzip"):
            await pool.post(BODY, 5)


# -- 4. failures ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_closed_port_raises_connect_error() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    async with pool_for(f"http://127.0.0.1:{port}{PATH}") as pool:
        with pytest.raises(ConnectError, match=f"127.0.0.1:{port}"):
            await pool.post(BODY, 5)


@pytest.mark.anyio
async def test_server_that_never_answers_raises_deadline_error_near_the_timeout() -> None:
    async with serve(silent) as server, pool_for(server.url()) as pool:
        started = time.monotonic()
        with pytest.raises(DeadlineError):
            await pool.post(BODY, 0.5)
        elapsed = time.monotonic() - started
        await eventually(lambda: server.eofs == 1)  # the late connection is closed
    assert 0.45 <= elapsed < 1.5
    assert len(server.requests) == 1


@pytest.mark.anyio
async def test_body_stalling_past_the_deadline_raises_deadline_error() -> None:
    head = answer(b"x" * 100)[:-100]
    pieces = [head, b"x" * 10, b"x" * 10]

    async with serve(replying(pieces, pause_s=0.2)) as server, pool_for(server.url()) as pool:
        started = time.monotonic()
        with pytest.raises(DeadlineError):
            await pool.post(BODY, 0.4)
        assert time.monotonic() - started < 1.4


@pytest.mark.anyio
async def test_deadline_shorter_than_connect_timeout_bounds_the_tls_handshake() -> None:
    # A plain TCP server that never speaks TLS: the handshake hangs until the deadline.
    async with (
        serve(silent) as server,
        pool_for(server.url("https"), connect_timeout_s=5.0) as pool,
    ):
        started = time.monotonic()
        with pytest.raises(ConnectError, match=r"no connection within 0\.[23]\d* s"):
            await pool.post(BODY, 0.3)
        assert time.monotonic() - started < 1.3
        await eventually(lambda: server.eofs == 1)


@pytest.mark.anyio
async def test_connect_timeout_bounds_the_tls_handshake() -> None:
    async with (
        serve(silent) as server,
        pool_for(server.url("https"), connect_timeout_s=0.2) as pool,
    ):
        started = time.monotonic()
        with pytest.raises(ConnectError, match=re.escape("no connection within 0.2 s")):
            await pool.post(BODY, 5)
        assert time.monotonic() - started < 1.2


@pytest.mark.anyio
async def test_server_closing_after_half_the_body_raises_protocol_error() -> None:
    reply = answer(b"x" * 100)[:-50]
    async with serve(replying(reply, close=True)) as server, pool_for(server.url()) as pool:
        with pytest.raises(ProtocolError, match="before the whole answer"):
            await pool.post(BODY, 5)


@pytest.mark.anyio
async def test_garbage_instead_of_a_status_line_raises_protocol_error() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, box: Server):
        await read_message(reader)
        writer.write(b"SSH-2.0-OpenSSH_9.6\r\nnot http at all\r\n\r\n")
        await wait_for_eof(reader, box)  # the connection stays open: the parse must fail

    async with serve(handle) as server, pool_for(server.url()) as pool:
        with pytest.raises(ProtocolError, match="malformed"):
            await pool.post(BODY, 5)
        await eventually(lambda: server.eofs == 1)


@pytest.mark.anyio
async def test_server_closing_without_answering_raises_protocol_error() -> None:
    async with serve(replying(b"", close=True)) as server, pool_for(server.url()) as pool:
        with pytest.raises(ProtocolError, match="before any answer"):
            await pool.post(BODY, 5)
    assert len(server.requests) == 1


def test_errors_are_http_errors() -> None:
    assert issubclass(ConnectError, HTTPError)
    assert issubclass(DeadlineError, HTTPError)
    assert issubclass(ProtocolError, HTTPError)


# -- 5. connections closed while idle --------------------------------------------------------


@pytest.mark.anyio
async def test_connection_closed_by_server_while_idle_is_not_reused() -> None:
    reply = answer(b"ok", "connection: keep-alive", "keep-alive: timeout=60")
    async with (
        serve(replying(reply, close=True)) as server,
        pool_for(server.url()) as pool,
    ):
        assert (await pool.post(BODY, 5)).body == b"ok"
        await anyio.sleep(0.05)
        assert (await pool.post(BODY, 5)).body == b"ok"
    assert server.connections == 2


@pytest.mark.anyio
async def test_unsolicited_bytes_on_an_idle_connection_stop_its_reuse() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, box: Server):
        while (request := await read_message(reader)) is not None:
            box.requests.append(request)
            writer.write(answer(b"ok"))
            await writer.drain()
            await asyncio.sleep(0.01)  # the client is idle by now
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nstray")
        box.eofs += 1

    async with serve(handle) as server, pool_for(server.url()) as pool:
        assert (await pool.post(BODY, 5)).body == b"ok"
        await eventually(lambda: server.eofs == 1)  # the client dropped that connection
        assert (await pool.post(BODY, 5)).body == b"ok"
    assert server.connections == 2


@pytest.mark.anyio
async def test_partial_extra_answer_after_the_answer_stops_reuse() -> None:
    reply = answer(b"ok") + b"HTTP/1.1 200 OK\r\ncontent-len"  # in the same write
    async with serve(replying(reply)) as server, pool_for(server.url()) as pool:
        assert (await pool.post(BODY, 5)).body == b"ok"
        assert (await pool.post(BODY, 5)).body == b"ok"
    assert server.connections == 2


@pytest.mark.anyio
async def test_idle_connection_older_than_keepalive_is_replaced(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(http11, "KEEPALIVE_S", 0.0)
    async with serve(replying(answer(b"ok"))) as server, pool_for(server.url()) as pool:
        await pool.post(BODY, 5)
        await pool.post(BODY, 5)
        await eventually(lambda: server.eofs == 1)  # the stale one was closed, not leaked
    assert server.connections == 2


@pytest.mark.anyio
async def test_aclose_closes_idle_connections() -> None:
    async with serve(replying(answer(b"ok"))) as server:
        async with pool_for(server.url()) as pool:
            await pool.post(BODY, 5)
            assert server.eofs == 0
        await eventually(lambda: server.eofs == 1)


# -- 6. cancellation -------------------------------------------------------------------------


@pytest.mark.anyio
async def test_cancelled_post_closes_its_connection_and_a_later_post_works() -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, box: Server):
        if box.connections == 1:
            await silent(reader, writer, box)
        else:
            await replying(answer(b"later"))(reader, writer, box)

    async with serve(handle) as server, pool_for(server.url()) as pool:
        with anyio.move_on_after(0.2) as scope:
            await pool.post(BODY, 5)
        assert scope.cancelled_caught
        await eventually(lambda: server.eofs == 1)  # the server sees the client's close
        assert (await pool.post(BODY, 5)).body == b"later"
    assert server.connections == 2


# -- 7. the request on the wire --------------------------------------------------------------


@pytest.mark.anyio
async def test_request_on_the_wire() -> None:
    headers = {
        "authorization": "Bearer sk-test",
        "content-type": "application/json",
        "user-agent": "runner-tests/1",
    }
    async with serve(replying(answer())) as server, pool_for(server.url(), headers=headers) as pool:
        await pool.post(BODY, 5)
        await pool.post(b"", 5)
    first, empty = server.requests
    lines = head_lines(first)
    assert lines[0] == f"POST {PATH} HTTP/1.1"
    fields = [line.split(": ", 1) for line in lines[1:]]
    names = [name.lower() for name, _ in fields]
    assert len(names) == len(set(names))  # no header twice
    values = dict(fields)
    assert values["host"] == f"127.0.0.1:{server.port}"
    for name, value in headers.items():
        assert values[name] == value
    assert values["content-length"] == str(len(BODY))
    assert first.partition(b"\r\n\r\n")[2] == BODY
    assert dict(line.split(": ", 1) for line in head_lines(empty)[1:])["content-length"] == "0"
    assert empty.endswith(b"\r\n\r\n")


@pytest.mark.anyio
async def test_large_request_body_arrives_exactly() -> None:
    body = bytes(range(256)) * 8192  # 2 MiB
    async with serve(replying(answer())) as server, pool_for(server.url()) as pool:
        await pool.post(body, 5)
    assert server.requests[0].partition(b"\r\n\r\n")[2] == body


# -- 8. proxies ------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_http_target_through_http_proxy_uses_absolute_form_and_proxy_auth() -> None:
    async with (
        serve(replying(lambda request: answer(b"via proxy: " + request.split(b" ")[1]))) as origin,
        serve(forward_proxy) as proxy,
        pool_for(origin.url(), proxy=f"http://user:p%40ss@127.0.0.1:{proxy.port}") as pool,
    ):
        first = await pool.post(BODY, 5)
        second = await pool.post(BODY, 5)
    assert first.body == second.body == f"via proxy: {PATH}".encode()
    assert proxy.connections == 1  # the connection to the proxy is kept alive
    lines = head_lines(proxy.requests[0])
    assert lines[0] == f"POST http://127.0.0.1:{origin.port}{PATH} HTTP/1.1"
    values = dict(line.split(": ", 1) for line in lines[1:])
    assert values["host"] == f"127.0.0.1:{origin.port}"
    assert values["proxy-authorization"] == "Basic " + base64.b64encode(b"user:p@ss").decode()
    assert proxy.requests[0].endswith(b"\r\n\r\n" + BODY)


@pytest.mark.anyio
async def test_http_proxy_without_credentials_sends_no_proxy_authorization() -> None:
    async with (
        serve(replying(answer(b"ok"))) as origin,
        serve(forward_proxy) as proxy,
        pool_for(origin.url(), proxy=f"127.0.0.1:{proxy.port}") as pool,
    ):
        assert (await pool.post(BODY, 5)).body == b"ok"
    assert b"proxy-authorization" not in proxy.requests[0].lower()


@pytest.mark.anyio
async def test_https_target_through_http_proxy_tunnels_with_connect(tls_files: TLSFiles) -> None:
    async with (
        serve(replying(answer(b"tunnelled")), tls=tls_files.server()) as origin,
        serve(tunnel_proxy()) as proxy,
        pool_for(
            origin.url("https"),
            proxy=f"http://user:secret@127.0.0.1:{proxy.port}",
            ssl_context=tls_files.client(),
        ) as pool,
    ):
        first = await pool.post(BODY, 5)
        second = await pool.post(BODY, 5)
    assert first.body == second.body == b"tunnelled"
    assert proxy.connections == origin.connections == 1
    lines = head_lines(proxy.requests[0])
    assert lines[0] == f"CONNECT 127.0.0.1:{origin.port} HTTP/1.1"
    values = dict(line.split(": ", 1) for line in lines[1:])
    assert values["host"] == f"127.0.0.1:{origin.port}"
    assert values["proxy-authorization"] == "Basic " + base64.b64encode(b"user:secret").decode()
    # Inside the tunnel: origin-form target, and the proxy's credentials stay with the proxy.
    inner = head_lines(origin.requests[0])
    assert inner[0] == f"POST {PATH} HTTP/1.1"
    assert not any(line.lower().startswith("proxy-authorization") for line in inner)
    assert origin.requests[0].endswith(b"\r\n\r\n" + BODY)


@pytest.mark.anyio
async def test_proxy_refusing_connect_gives_connect_error_naming_the_status(
    tls_files: TLSFiles,
) -> None:
    refusal = (
        b"HTTP/1.1 407 Proxy Authentication Required\r\n"
        b"proxy-authenticate: Basic realm=x\r\ncontent-length: 0\r\n\r\n"
    )
    async with (
        serve(tunnel_proxy(refusal)) as proxy,
        pool_for(
            "https://127.0.0.1:9/v1/chat/completions",
            proxy=f"http://127.0.0.1:{proxy.port}",
            ssl_context=tls_files.client(),
        ) as pool,
    ):
        status_line = "HTTP/1.1 407 Proxy Authentication Required"
        with pytest.raises(ConnectError, match=re.escape(status_line)):
            await pool.post(BODY, 5)
    assert head_lines(proxy.requests[0])[0] == "CONNECT 127.0.0.1:9 HTTP/1.1"
    assert b"proxy-authorization" not in proxy.requests[0].lower()


@pytest.mark.anyio
async def test_proxy_silent_on_connect_gives_connect_error_within_connect_timeout(
    tls_files: TLSFiles,
) -> None:
    async with (
        serve(tunnel_proxy(None)) as proxy,
        pool_for(
            "https://127.0.0.1:9/v1/chat/completions",
            proxy=f"http://127.0.0.1:{proxy.port}",
            ssl_context=tls_files.client(),
            connect_timeout_s=0.3,
        ) as pool,
    ):
        started = time.monotonic()
        with pytest.raises(ConnectError, match=re.escape("no connection within 0.3 s")):
            await pool.post(BODY, 5)
        assert time.monotonic() - started < 1.3
        await eventually(lambda: proxy.eofs == 1)  # the half-made tunnel is closed


# -- 9. TLS direct ---------------------------------------------------------------------------


@pytest.mark.anyio
async def test_tls_with_trusted_certificate_gets_the_answer(tls_files: TLSFiles) -> None:
    async with (
        serve(replying(answer(b"secure")), tls=tls_files.server()) as server,
        pool_for(server.url("https"), ssl_context=tls_files.client()) as pool,
    ):
        first = await pool.post(BODY, 5)
        second = await pool.post(BODY, 5)
    assert first.body == second.body == b"secure"
    assert server.connections == 1
    assert head_lines(server.requests[0])[0] == f"POST {PATH} HTTP/1.1"


@pytest.mark.anyio
async def test_tls_with_untrusted_certificate_raises_connect_error(tls_files: TLSFiles) -> None:
    async with (
        serve(replying(answer(b"secure")), tls=tls_files.server()) as server,
        pool_for(server.url("https")) as pool,
    ):
        with pytest.raises(ConnectError, match="certificate") as info:
            await pool.post(BODY, 5)
    assert "not trusted" in str(info.value)
    assert server.requests == []


# -- 10. Endpoint.of and env_proxy -----------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "authority", "port"),
    [
        ("http://api.example.com/v1", "api.example.com", 80),
        ("http://api.example.com:80/v1", "api.example.com", 80),
        ("https://api.example.com/v1", "api.example.com", 443),
        ("https://api.example.com:443/v1", "api.example.com", 443),
        ("https://api.example.com:8443/v1", "api.example.com:8443", 8443),
        ("http://api.example.com:443/v1", "api.example.com:443", 443),
        ("http://[::1]:8080/v1", "[::1]:8080", 8080),
        ("https://[2001:db8::1]/v1", "[2001:db8::1]", 443),
    ],
)
def test_endpoint_authority(url: str, authority: str, port: int) -> None:
    point = Endpoint.of(url)
    assert point.authority == authority
    assert (point.port, point.dial_port) == (port, port)
    assert point.dial_host == point.host
    assert not point.tunnel and point.proxy_auth is None


def test_endpoint_ipv6_host_is_bare_and_bracketed_only_in_authority() -> None:
    point = Endpoint.of("http://[::1]:8080/v1")
    assert point.host == point.dial_host == "::1"
    assert Endpoint.of("http://[::1]/x", "http://127.0.0.1:3128").target == b"http://[::1]/x"


def test_endpoint_target_keeps_query_and_defaults_to_slash() -> None:
    assert Endpoint.of("https://h.example/v1/chat?api-version=2024-06&x=1").target == (
        b"/v1/chat?api-version=2024-06&x=1"
    )
    assert Endpoint.of("https://h.example").target == b"/"
    assert Endpoint.of("https://h.example?q=1").target == b"/?q=1"


def test_endpoint_with_http_proxy_and_credentials() -> None:
    point = Endpoint.of("http://h.example:8000/v1?a=b", "http://us%40er:p%3Ass@proxy.test:3128")
    assert point.target == b"http://h.example:8000/v1?a=b"
    assert (point.dial_host, point.dial_port, point.tunnel) == ("proxy.test", 3128, False)
    assert point.proxy_auth is not None
    scheme, _, encoded = point.proxy_auth.partition(" ")
    assert scheme == "Basic"
    assert base64.b64decode(encoded) == b"us@er:p:ss"


def test_endpoint_https_through_proxy_tunnels_with_origin_form_target() -> None:
    point = Endpoint.of("https://h.example/v1", "proxy.test")  # no scheme: http, port 80
    assert (point.dial_host, point.dial_port, point.tunnel) == ("proxy.test", 80, True)
    assert point.target == b"/v1"
    assert point.authority == "h.example"
    assert point.proxy_auth is None
    user_only = Endpoint.of("https://h.example/v1", "http://alice@proxy.test:8080")
    assert user_only.proxy_auth == "Basic " + base64.b64encode(b"alice:").decode()


@pytest.mark.parametrize(
    "proxy", ["socks5://proxy.test:1080", "https://proxy.test:443", "http://:3128"]
)
def test_endpoint_rejects_non_http_proxy(proxy: str) -> None:
    with pytest.raises(ValueError, match="proxies"):
        Endpoint.of("https://h.example/v1", proxy)


@pytest.mark.parametrize("url", ["ftp://h.example/x", "h.example/v1", "http:///nohost"])
def test_endpoint_rejects_non_http_url(url: str) -> None:
    with pytest.raises(ValueError, match="not an http"):
        Endpoint.of(url)


def test_env_proxy_names_the_scheme_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.test:3128")
    assert env_proxy("https://api.example.com/v1") == "http://proxy.test:3128"
    assert env_proxy("http://api.example.com/v1") is None  # no HTTP_PROXY
    monkeypatch.setenv("HTTP_PROXY", "http://plain.test:8080")
    assert env_proxy("http://api.example.com/v1") == "http://plain.test:8080"


def test_env_proxy_is_none_when_no_proxy_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.test:3128")
    monkeypatch.setenv("NO_PROXY", "localhost,.internal.example,api.example.com")
    assert env_proxy("https://api.example.com/v1") is None
    assert env_proxy("https://api.example.com:8443/v1") is None
    assert env_proxy("https://llm.internal.example/v1") is None
    assert env_proxy("https://other.example.com/v1") == "http://proxy.test:3128"


def test_env_proxy_is_none_without_proxy_variables() -> None:
    assert env_proxy("https://api.example.com/v1") is None


# -- 11. DNS names ---------------------------------------------------------------------------


def localhost_is_127() -> bool:
    try:
        infos = socket.getaddrinfo("localhost", None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return any(info[4][0] == "127.0.0.1" for info in infos)


needs_localhost = pytest.mark.skipif(
    not localhost_is_127(), reason="localhost does not resolve to 127.0.0.1"
)


def count_lookups(monkeypatch: pytest.MonkeyPatch, delay_s: float = 0.0) -> list[str]:
    """Wrap the running loop's getaddrinfo; the returned list grows by one host per call."""
    loop = asyncio.get_running_loop()
    real = loop.getaddrinfo
    calls: list[str] = []

    async def counting(host: Any, *args: Any, **kwargs: Any) -> Any:
        calls.append(host)
        if delay_s:
            await asyncio.sleep(delay_s)
        return await real(host, *args, **kwargs)

    monkeypatch.setattr(loop, "getaddrinfo", counting)
    return calls


@needs_localhost
@pytest.mark.anyio
async def test_dns_name_is_resolved_once_and_cached(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = count_lookups(monkeypatch)
    reply = answer(b"named", "connection: close")  # every post needs a new connection
    async with (
        serve(replying(reply, close=True)) as server,
        pool_for(server.url(host="localhost")) as pool,
    ):
        assert (await pool.post(BODY, 5)).body == b"named"
        assert (await pool.post(BODY, 5)).body == b"named"
    assert server.connections == 2
    assert calls == ["localhost"]
    assert dict(line.split(": ", 1) for line in head_lines(server.requests[0])[1:])["host"] == (
        f"localhost:{server.port}"
    )


@needs_localhost
@pytest.mark.anyio
async def test_dns_lookup_is_repeated_after_its_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http11, "DNS_TTL_S", 0.0)
    calls = count_lookups(monkeypatch)
    reply = answer(b"named", "connection: close")
    async with (
        serve(replying(reply, close=True)) as server,
        pool_for(server.url(host="localhost")) as pool,
    ):
        await pool.post(BODY, 5)
        await pool.post(BODY, 5)
    assert calls == ["localhost", "localhost"]


@needs_localhost
@pytest.mark.anyio
async def test_concurrent_first_posts_share_one_dns_lookup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = count_lookups(monkeypatch, delay_s=0.05)
    async with (
        serve(replying(answer(b"named"))) as server,
        pool_for(server.url(host="localhost")) as pool,
    ):
        bodies: list[bytes] = []

        async def one() -> None:
            bodies.append((await pool.post(BODY, 5)).body)

        async with anyio.create_task_group() as group:
            for _ in range(4):
                group.start_soon(one)
    assert bodies == [b"named"] * 4
    assert calls == ["localhost"]


@pytest.mark.anyio
async def test_failed_dns_lookup_raises_connect_error(monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()

    async def failing(host: Any, *args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")

    monkeypatch.setattr(loop, "getaddrinfo", failing)
    async with pool_for("http://no-such-host.invalid/v1/chat/completions") as pool:
        with pytest.raises(ConnectError, match=re.escape("cannot resolve no-such-host.invalid")):
            await pool.post(BODY, 5)

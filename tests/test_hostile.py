"""The client against servers that misbehave on purpose: a raw-socket server on 127.0.0.1 with
one mode per way an HTTP answer can go wrong, and the client in a child process of its own so
that its peak RSS can be measured. Each mode checks: bounded memory, the typed outcome, no
answer on the wrong row, and the key sent to the endpoint only."""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import os
import subprocess
import sys
import threading
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-HOSTILE-0123456789abcdefXYZ"
# The child's limit on an answer body: small, so that "bounded" is a tight claim.
MAX_BYTES = 1024 * 1024
# Peak RSS a child may gain while talking to a hostile server (its start-up excluded).
RSS_GROWTH = 40 * 1024 * 1024

# The client, in a child process: sends `rows` requests tagged row-0.., retries what is
# retryable up to `attempts` times, prints each outcome and its peak RSS before and after.
CHILD = r"""
import asyncio, json, resource, sys, time
from runner.http.client import ChatClient, Secret
from runner.errors import AttemptError

args = json.loads(sys.argv[1])

def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

async def main():
    client = ChatClient(base_url=args["url"], api_key=Secret(args["key"]),
                        timeout_s=args["timeout"], connect_timeout_s=2.0,
                        concurrency=args["concurrency"], max_response_bytes=args["max_bytes"])
    gate = asyncio.Semaphore(args["concurrency"])

    async def one(i):
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": f"row-{i}"}]})
        async with gate:
            await asyncio.sleep(args["pause"])
            for attempt in range(1, args["attempts"] + 1):
                started = time.monotonic()
                try:
                    answer = await client.complete(body.encode())
                except AttemptError as exc:
                    out = {"row": i, "ok": False, "type": type(exc).__name__,
                           "retryable": exc.retryable, "billed": exc.possibly_billed,
                           "message": exc.message, "attempts": attempt,
                           "seconds": time.monotonic() - started}
                    if not exc.retryable:
                        return out
                    continue
                return {"row": i, "ok": True, "content": answer.content, "attempts": attempt,
                        "seconds": time.monotonic() - started}
            return out

    base = peak()
    results = await asyncio.gather(*(one(i) for i in range(args["rows"])))
    await client.aclose()
    print(json.dumps({"base": base, "peak": peak(), "results": results}))

asyncio.run(main())
"""


@dataclass
class Seen:
    """What a listener received: each request's head and body."""

    heads: list[bytes] = field(default_factory=list)
    bodies: list[bytes] = field(default_factory=list)
    connections: int = 0


Handler = Callable[["Exchange"], Any]


@dataclass
class Exchange:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    seen: Seen
    number: int = 0  # requests on this connection so far (1 for the first)
    head: bytes = b""
    body: bytes = b""

    @property
    def tag(self) -> str:
        try:
            return str(json.loads(self.body)["messages"][0]["content"])
        except (ValueError, KeyError, IndexError, TypeError):
            return "?"

    async def next_request(self) -> bool:
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return False
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        try:
            body = await self.reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            return False
        self.head, self.body, self.number = head, body, self.number + 1
        self.seen.heads.append(head)
        self.seen.bodies.append(body)
        return True

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()


def answer(tag: str) -> bytes:
    """A chat completion whose content is the request's own tag, with an id of its own."""
    return json.dumps(
        {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "model": "m",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": tag},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
        }
    ).encode()


def response(body: bytes, *, status: str = "200 OK", extra: str = "") -> bytes:
    head = f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\n{extra}"
    return f"{head}content-length: {len(body)}\r\n\r\n".encode() + body


class Listener:
    """A raw asyncio server on 127.0.0.1 in a thread of its own, serving one mode."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.seen = Seen()
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)

    def __enter__(self) -> Listener:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        tasks: set[asyncio.Task[None]] = set()

        async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            self.seen.connections += 1
            task = asyncio.current_task()
            assert task is not None
            tasks.add(task)
            try:
                await self.handler(Exchange(reader, writer, self.seen))
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                tasks.discard(task)
                writer.close()

        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stop.wait()
        server.close()
        for task in list(tasks):
            task.cancel()
        await asyncio.sleep(0.05)


def run_client(
    url: str,
    *,
    rows: int = 4,
    concurrency: int = 4,
    timeout: float = 5.0,
    attempts: int = 1,
    max_bytes: int = MAX_BYTES,
    pause: float = 0.0,
) -> dict[str, Any]:
    args = {
        "pause": pause,
        "url": url,
        "key": KEY,
        "rows": rows,
        "concurrency": concurrency,
        "timeout": timeout,
        "attempts": attempts,
        "max_bytes": max_bytes,
    }
    env = {k: v for k, v in os.environ.items() if not k.upper().endswith("_PROXY")}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(args)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    out: dict[str, Any] = json.loads(done.stdout)
    assert out["peak"] - out["base"] < RSS_GROWTH, (out["base"], out["peak"])
    for result in out["results"]:
        # No answer on the wrong row, and no key in any message.
        if result["ok"]:
            assert result["content"] == f"row-{result['row']}", result
        else:
            assert KEY[:10] not in result["message"], result
    return out


def outcomes(out: dict[str, Any]) -> set[str]:
    return {"ok" if r["ok"] else r["type"] for r in out["results"]}


def key_only_in(seen: Seen) -> None:
    for head in seen.heads:
        assert f"Bearer {KEY}".encode() in head


# -- modes ------------------------------------------------------------------------------------


async def endless_headers(ex: Exchange) -> None:
    if await ex.next_request():
        await ex.send(b"HTTP/1.1 200 OK\r\n")
        line = b"x-filler: " + b"a" * 100 + b"\r\n"
        while True:
            await ex.send(line * 100)


async def huge_body(ex: Exchange) -> None:
    """A chunked body without end: its size is known only by reading it."""
    if await ex.next_request():
        await ex.send(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n" % 65536 + b"a" * 65536 + b"\r\n"
        while True:
            await ex.send(chunk)


async def huge_announced(ex: Exchange) -> None:
    if await ex.next_request():
        await ex.send(b"HTTP/1.1 200 OK\r\ncontent-length: 500000000\r\n\r\n")
        while True:
            await ex.send(b"a" * 65536)


@functools.cache
def bomb() -> bytes:
    """64 KB of gzip that inflates to 64 MB of zeros: 64 times the child's limit."""
    squeeze = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = bytes(1024 * 1024)
    parts = [squeeze.compress(block) for _ in range(64)]
    return b"".join(parts) + squeeze.flush()


async def gzip_bomb(ex: Exchange) -> None:
    payload = bomb()
    while await ex.next_request():
        head = (
            f"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: {len(payload)}\r\n\r\n"
        )
        await ex.send(head.encode() + payload)


def encoded_as(encoding: str) -> Handler:
    async def mode(ex: Exchange) -> None:
        while await ex.next_request():
            body = os.urandom(300)  # not decodable by anything we have
            await ex.send(response(body, extra=f"content-encoding: {encoding}\r\n"))

    return mode


async def gzip_answer(ex: Exchange) -> None:
    while await ex.next_request():
        body = zlib.compress(answer(ex.tag), wbits=31)
        await ex.send(response(body, extra="content-encoding: gzip\r\n"))


async def repeats(ex: Exchange) -> None:
    """Each answer, and the same answer again 20 ms later on the same connection."""
    while await ex.next_request():
        data = response(answer(ex.tag))
        await ex.send(data)
        asyncio.get_running_loop().call_later(0.02, ex.writer.write, data)


async def closes_when_reused(ex: Exchange) -> None:
    """Keep-alive, but a request on a connection that already carried one finds it closed:
    what an idle timeout racing the client's write looks like, every time."""
    while await ex.next_request():
        if ex.number > 1:
            ex.seen.heads.pop()  # never read, as far as the server is concerned
            ex.seen.bodies.pop()
            return
        await ex.send(response(answer(ex.tag)))


async def closes_when_idle(ex: Exchange) -> None:
    """Keep-alive with a 50 ms idle timeout, as servers have (longer): closed silently."""
    while True:
        try:
            if not await asyncio.wait_for(ex.next_request(), 0.05):
                return
        except TimeoutError:
            return
        await ex.send(response(answer(ex.tag)))


async def continue_first(ex: Exchange) -> None:
    while await ex.next_request():
        await ex.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        await ex.send(response(answer(ex.tag)))


async def http10_until_close(ex: Exchange) -> None:
    if await ex.next_request():
        await ex.send(b"HTTP/1.0 200 OK\r\ncontent-type: application/json\r\n\r\n")
        await ex.send(answer(ex.tag))


async def bad_chunks(ex: Exchange) -> None:
    if await ex.next_request():
        await ex.send(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n"
        )
        await ex.reader.read()


def redirect_to(port: int) -> Handler:
    async def mode(ex: Exchange) -> None:
        while await ex.next_request():
            where = f"http://127.0.0.2:{port}/v1/chat/completions"
            await ex.send(
                response(b"", status="307 Temporary Redirect", extra=f"location: {where}\r\n")
            )

    return mode


async def never_answers(ex: Exchange) -> None:
    if await ex.next_request():
        await ex.reader.read()


async def slow_drip(ex: Exchange) -> None:
    if await ex.next_request():
        body = answer(ex.tag)
        await ex.send(f"HTTP/1.1 200 OK\r\ncontent-length: {len(body)}\r\n\r\n".encode())
        for byte in body:
            await ex.send(bytes([byte]))
            await asyncio.sleep(0.05)


@pytest.fixture
def serve() -> Iterator[Callable[[Handler], Listener]]:
    started: list[Listener] = []

    def start(handler: Handler) -> Listener:
        listener = Listener(handler).__enter__()
        started.append(listener)
        return listener

    yield start
    for listener in started:
        listener.__exit__()


# -- tests ------------------------------------------------------------------------------------


def test_endless_headers_stop_at_the_header_limit(serve: Callable[[Handler], Listener]) -> None:
    server = serve(endless_headers)
    out = run_client(server.url, rows=2)
    assert outcomes(out) == {"ProtocolFailure"}
    key_only_in(server.seen)


@pytest.mark.parametrize("mode", [huge_body, huge_announced])
def test_a_huge_body_fails_its_row_unretried(
    serve: Callable[[Handler], Listener], mode: Handler
) -> None:
    server = serve(mode)
    out = run_client(server.url, rows=2, attempts=3)
    assert outcomes(out) == {"OversizedResponse"}
    assert all(r["attempts"] == 1 and r["billed"] and not r["retryable"] for r in out["results"])
    key_only_in(server.seen)


def test_a_gzip_bomb_is_cut_at_the_limit(serve: Callable[[Handler], Listener]) -> None:
    server = serve(gzip_bomb)
    out = run_client(server.url, rows=2, attempts=3)
    assert outcomes(out) == {"OversizedResponse"}
    assert len(server.seen.heads) == 2  # not bought again
    key_only_in(server.seen)


def test_gzip_answers_are_decoded(serve: Callable[[Handler], Listener]) -> None:
    server = serve(gzip_answer)
    out = run_client(server.url, rows=6, concurrency=2)
    assert outcomes(out) == {"ok"}
    for head in server.seen.heads:
        encodings = next(
            line for line in head.lower().split(b"\r\n") if line.startswith(b"accept-encoding")
        )
        assert b"br" not in encodings and b"zstd" not in encodings


@pytest.mark.parametrize("encoding", ["br", "zstd"])
def test_an_encoding_not_asked_for_is_kept_failed_not_bought_again(
    serve: Callable[[Handler], Listener], encoding: str
) -> None:
    server = serve(encoded_as(encoding))
    out = run_client(server.url, rows=3, attempts=3)
    assert outcomes(out) == {"UndecodableResponse"}
    assert all(r["billed"] and r["attempts"] == 1 for r in out["results"])
    assert len(server.seen.heads) == 3


def test_a_repeated_answer_never_lands_on_another_row(
    serve: Callable[[Handler], Listener],
) -> None:
    server = serve(repeats)
    out = run_client(server.url, rows=300, concurrency=16, attempts=6)
    # run_client checked that no row holds another row's answer; each row got its own.
    assert outcomes(out) == {"ok"}


def test_a_connection_closed_as_it_is_reused_costs_no_attempt(
    serve: Callable[[Handler], Listener],
) -> None:
    server = serve(closes_when_reused)
    out = run_client(server.url, rows=40, concurrency=4, attempts=1)
    assert outcomes(out) == {"ok"}
    # Reused connections were tried (and closed by the server), yet no request failed, and
    # the server saw each request exactly once.
    assert server.seen.connections > 4
    assert sorted(json.loads(b)["messages"][0]["content"] for b in server.seen.bodies) == sorted(
        f"row-{i}" for i in range(40)
    )


def test_a_server_closing_idle_connections_costs_no_attempt(
    serve: Callable[[Handler], Listener],
) -> None:
    server = serve(closes_when_idle)
    # One request every 120 ms: each finds its connection closed by the server meanwhile.
    out = run_client(server.url, rows=8, concurrency=1, pause=0.12)
    assert outcomes(out) == {"ok"}
    assert all(r["attempts"] == 1 for r in out["results"])
    assert len(server.seen.heads) == 8


def test_interim_100_continue_is_skipped(serve: Callable[[Handler], Listener]) -> None:
    server = serve(continue_first)
    out = run_client(server.url, rows=4, concurrency=2)
    assert outcomes(out) == {"ok"}


def test_http10_without_length_reads_to_close(serve: Callable[[Handler], Listener]) -> None:
    server = serve(http10_until_close)
    out = run_client(server.url, rows=3)
    assert outcomes(out) == {"ok"}


def test_bad_chunk_sizes_are_a_protocol_failure(serve: Callable[[Handler], Listener]) -> None:
    server = serve(bad_chunks)
    out = run_client(server.url, rows=2)
    assert outcomes(out) == {"ProtocolFailure"}


def test_a_redirect_is_not_followed_and_the_key_stays_home(
    serve: Callable[[Handler], Listener],
) -> None:
    elsewhere = serve(gzip_answer)
    server = serve(redirect_to(elsewhere.port))
    out = run_client(server.url, rows=2)
    assert outcomes(out) == {"RequestRejected"}
    assert elsewhere.seen.connections == 0
    key_only_in(server.seen)


@pytest.mark.parametrize("mode", [never_answers, slow_drip])
def test_the_total_deadline_holds(serve: Callable[[Handler], Listener], mode: Handler) -> None:
    server = serve(mode)
    out = run_client(server.url, rows=2, timeout=0.6)
    assert outcomes(out) == {"TimeoutFailure"}
    assert all(r["seconds"] < 3 for r in out["results"])


async def constant_id(ex: Exchange) -> None:
    """Every answer under one and the same `id` (some gateways and local servers do this),
    each with its own content, one request at a time on a keep-alive connection."""
    while await ex.next_request():
        body = json.loads(answer(ex.tag))
        body["id"] = "chatcmpl-000"
        await ex.send(response(json.dumps(body).encode()))


def test_one_id_for_every_answer_is_not_a_repeat(serve: Callable[[Handler], Listener]) -> None:
    # Broke: the repeat check took the same id for a different request as an answer the
    # connection had delivered before, so every reused connection's answer was thrown away
    # (paid for) and bought again until max_attempts.
    server = serve(constant_id)
    out = run_client(server.url, rows=40, concurrency=2, attempts=1)
    assert outcomes(out) == {"ok"}
    assert server.seen.connections <= 4


async def echoes_key(ex: Exchange) -> None:
    """A 200 that quotes the request's key in every text field it has, some cut short."""
    while await ex.next_request():
        key = ex.head.split(b"Bearer ", 1)[1].split(b"\r\n", 1)[0].decode()
        body = {
            "id": f"chatcmpl-{key}",
            "model": key,
            "system_fingerprint": key[:-2],
            "choices": [
                {
                    "message": {"content": f"{ex.tag} {key}", "refusal": key[:-1]},
                    "finish_reason": key,
                }
            ],
            "usage": {"prompt_tokens": key, "completion_tokens": 1},
        }
        await ex.send(response(json.dumps(body).encode()))


def test_a_key_quoted_in_an_answer_never_reaches_the_record(
    serve: Callable[[Handler], Listener],
) -> None:
    # Broke: an answer's id, model, content, refusal, fingerprint and raw usage were kept as
    # the server sent them, so a server quoting the key had it written into the results.
    from runner.http.client import ChatClient, Secret

    server = serve(echoes_key)

    async def ask(key: str) -> Any:
        client = ChatClient(
            base_url=server.url,
            api_key=Secret(key),
            timeout_s=5.0,
            connect_timeout_s=2.0,
            concurrency=1,
        )
        try:
            return await client.complete(b'{"model":"m","messages":[{"content":"row-0"}]}')
        finally:
            await client.aclose()

    answer = asyncio.run(ask(KEY))
    assert answer.content is not None and answer.content.startswith("row-0 ")
    # A short placeholder key ("EMPTY" for a local server) is no secret: answers stay whole.
    assert asyncio.run(ask("EMPTY")).content == "row-0 EMPTY"
    for item in dataclasses.fields(answer):
        value = getattr(answer, item.name)
        assert KEY[:12] not in str(value), (item.name, value)

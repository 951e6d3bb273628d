"""Proxies from the environment, end to end through a real proxy process on loopback: plain
HTTP in absolute form, and CONNECT tunnels to an HTTPS endpoint. The endpoint is named
sim.test, which only the proxy resolves (to 127.0.0.1): nothing but loopback is contacted."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from runner.errors import UsageError
from runner.http.client import ChatClient, Secret, _env_proxy
from runner.sim.http import make_test_certificate, server_tls
from runner.sim.server import SimulatorConfig, SimulatorThread

KEY = "sk-PROXIED-0123456789abcdefXYZ"

# A small forward proxy: CONNECT host:port tunnels to 127.0.0.1:port; a request in absolute
# form is sent on to 127.0.0.1:port in origin form, and its answer (content-length framed)
# back. Every request head it receives is logged, one JSON line each.
PROXY = r"""
import asyncio, json, sys
from urllib.parse import urlsplit

log = open(sys.argv[1], "a", buffering=1)

async def pipe(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()

async def message(reader):
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head, await reader.readexactly(length)

async def handle(reader, writer):
    upstream = None
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            line, _, rest = head.partition(b"\r\n")
            method, target, version = line.decode().split(" ")
            log.write(json.dumps({"line": line.decode(), "head": head.decode("latin-1")}) + "\n")
            if method == "CONNECT":
                port = int(target.rsplit(":", 1)[1])
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
                return
            url = urlsplit(target)
            length = 0
            for header in rest.split(b"\r\n"):
                name, _, value = header.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            body = await reader.readexactly(length)
            if upstream is None:
                upstream = await asyncio.open_connection("127.0.0.1", url.port or 80)
            path = url.path + (f"?{url.query}" if url.query else "")
            upstream[1].write(f"{method} {path} {version}\r\n".encode() + rest + body)
            answer_head, answer_body = await message(upstream[0])
            writer.write(answer_head + answer_body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()

async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""


class Proxy:
    def __init__(self, log: Path, port: int) -> None:
        self.log, self.port = log, port

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def heads(self) -> list[dict[str, Any]]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[Proxy]:
    log = tmp_path / "proxy.log"
    proc = subprocess.Popen(
        [sys.executable, "-c", PROXY, str(log)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        yield Proxy(log, int(proc.stdout.readline()))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_test_certificate(tmp_path_factory.mktemp("certs"))


def body(i: int) -> bytes:
    return json.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": f"q{i}"}]}
    ).encode()


async def ask_many(base_url: str, n: int, ca_bundle: str | None = None) -> list[str | None]:
    client = ChatClient(
        base_url=base_url,
        api_key=Secret(KEY),
        timeout_s=10,
        connect_timeout_s=5,
        concurrency=2,
        ca_bundle=ca_bundle,
    )
    try:
        return [(await client.complete(body(i))).content for i in range(n)]
    finally:
        await client.aclose()


@pytest.mark.anyio
async def test_http_through_the_proxy_in_absolute_form(
    proxy: Proxy, simulator: SimulatorThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    answers = await ask_many(f"http://sim.test:{simulator.port}/v1", 3)
    assert all(answers)
    assert simulator.stats.ok == 3
    lines = [h["line"] for h in proxy.heads()]
    assert lines and all(
        line == f"POST http://sim.test:{simulator.port}/v1/chat/completions HTTP/1.1"
        for line in lines
    )


@pytest.mark.anyio
async def test_https_through_a_connect_tunnel(
    proxy: Proxy, certs: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, cert, key = certs
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    with SimulatorThread(SimulatorConfig(), tls=server_tls(str(cert), str(key))) as sim:
        answers = await ask_many(f"https://sim.test:{sim.port}/v1", 3, str(ca))
        assert all(answers)
        assert sim.stats.ok == 3
    heads = proxy.heads()
    assert heads and all(h["line"] == f"CONNECT sim.test:{sim.port} HTTP/1.1" for h in heads)
    # The key travels inside the tunnel only: the proxy never sees it.
    leaked = [h["head"] for h in heads if KEY[:10] in h["head"] or "bearer" in h["head"].lower()]
    assert not leaked


@pytest.mark.anyio
async def test_a_loopback_endpoint_never_goes_through_a_proxy(
    proxy: Proxy, simulator: SimulatorThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    assert all(await ask_many(simulator.base_url, 2))
    assert proxy.heads() == []


def test_no_proxy_and_unsupported_schemes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "proxy.example:3128")
    assert _env_proxy("https://api.example/v1") == "http://proxy.example:3128"
    monkeypatch.setenv("NO_PROXY", "api.example")
    assert _env_proxy("https://api.example/v1") is None
    monkeypatch.delenv("NO_PROXY")
    monkeypatch.setenv("HTTPS_PROXY", "socks5://user:secret@proxy.example:1080")
    with pytest.raises(UsageError) as info:
        _env_proxy("https://api.example/v1")
    assert "socks5" in str(info.value) and "secret" not in str(info.value)

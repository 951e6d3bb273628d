"""HTTPS over real TLS on loopback, with a CA and a certificate the tests make: verified by
default, trusted through endpoint.ca_bundle or SSL_CERT_FILE, refused otherwise."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.errors import ConnectFailure
from runner.http.client import ChatClient
from runner.sim.http import make_test_certificate, server_tls
from runner.sim.server import SimulatorConfig, SimulatorThread

ROOT = Path(__file__).resolve().parent.parent
BODY = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    return make_test_certificate(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def tls_sim(certs: tuple[Path, Path, Path]) -> Iterator[SimulatorThread]:
    _, cert, key = certs
    with SimulatorThread(SimulatorConfig(), tls=server_tls(str(cert), str(key))) as sim:
        yield sim


async def ask(base_url: str, ca_bundle: str | None = None) -> str | None:
    client = ChatClient(
        base_url=base_url,
        api_key=None,
        timeout_s=5,
        connect_timeout_s=2,
        concurrency=2,
        ca_bundle=ca_bundle,
    )
    try:
        return (await client.complete(BODY.encode())).content
    finally:
        await client.aclose()


@pytest.mark.anyio
async def test_ca_bundle_trusts_a_private_ca(
    tls_sim: SimulatorThread, certs: tuple[Path, Path, Path]
) -> None:
    assert tls_sim.base_url.startswith("https://127.0.0.1:")
    assert await ask(tls_sim.base_url, str(certs[0]))
    assert tls_sim.stats.ok == 1


@pytest.mark.anyio
async def test_an_unknown_ca_is_refused_before_anything_is_sent(
    tls_sim: SimulatorThread,
) -> None:
    with pytest.raises(ConnectFailure) as info:
        await ask(tls_sim.base_url)
    assert "TLS certificate not trusted" in info.value.message
    assert tls_sim.stats.requests == 0


@pytest.mark.anyio
async def test_the_name_is_verified_too(
    tls_sim: SimulatorThread, certs: tuple[Path, Path, Path]
) -> None:
    """The same server reached as 127.0.0.2, a name its certificate does not hold: refused."""
    with pytest.raises(ConnectFailure):
        await ask(tls_sim.base_url.replace("127.0.0.1", "127.0.0.2"), str(certs[0]))


@pytest.mark.anyio
async def test_ssl_cert_file_is_honoured(
    tls_sim: SimulatorThread, certs: tuple[Path, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SSL_CERT_FILE", str(certs[0]))
    assert await ask(tls_sim.base_url)


def submit(tmp_path: Path, base_url: str, extra: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "in.jsonl").write_text(
        "".join(json.dumps({"id": f"r{i}", "prompt": f"hello {i}"}) + "\n" for i in range(20))
    )
    spec = tmp_path / "job.toml"
    spec.write_text(
        'name = "tls"\n[input]\npath = "in.jsonl"\nid_column = "id"\nprompt_column = "prompt"\n'
        f'[endpoint]\nbase_url = "{base_url}"\n{extra}\n'
        '[request]\nmodel = "gpt-4o-mini"\n[run]\nconcurrency = 4\n'
    )
    return subprocess.run(
        [sys.executable, "-m", "runner", "submit", str(spec), "--runs-dir", str(tmp_path / "runs")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_submit_over_https_with_a_ca_bundle_relative_to_the_spec(
    tls_sim: SimulatorThread, certs: tuple[Path, Path, Path], tmp_path: Path
) -> None:
    (tmp_path / "pki").mkdir()
    (tmp_path / "pki" / "ca.pem").write_bytes(certs[0].read_bytes())
    done = submit(tmp_path, tls_sim.base_url, 'ca_bundle = "pki/ca.pem"')
    assert done.returncode == 0, done.stderr
    assert tls_sim.stats.ok == 20


def test_a_missing_ca_bundle_is_a_usage_error(tmp_path: Path) -> None:
    done = submit(tmp_path, "https://127.0.0.1:9/v1", 'ca_bundle = "nowhere.pem"')
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "endpoint.ca_bundle" in lines[0] and "no such file" in lines[0]

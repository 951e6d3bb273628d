"""Helpers of the Ray tests: a local cluster in its own process, a simulator process, the
CLI as a driver process. Real processes and loopback sockets only."""

from __future__ import annotations

import contextlib
import json
import os
import re
import selectors
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
# What every process of a Ray test runs with: statistics off, workers on this interpreter,
# the cluster's token checked (ray makes ~/.ray/auth_token once), dummy S3 credentials.
RAY_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
    "RAY_AUTH_MODE": "token",
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RUNNER_", "RAY_"))}
    return {**env, **RAY_ENV}


def _first_line(process: subprocess.Popen[str], timeout: float) -> str:
    """The process's first line of output, or an error after `timeout` seconds."""
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        if not selector.select(timeout):
            raise TimeoutError(f"no output from {process.args!r} in {timeout} s")
    return process.stdout.readline()


@contextlib.contextmanager
def ray_cluster(cpus: int = 2) -> Iterator[str]:
    """A local Ray cluster (tests/ray_cluster.py) for a test module; yields its address."""
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "ray_cluster.py"), str(cpus)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=_env(),
        cwd=ROOT,
    )
    try:
        address = _first_line(process, 180).strip()
        assert re.fullmatch(r"127\.0\.0\.1:\d+", address), address
        yield address
    finally:
        assert process.stdin is not None
        process.stdin.close()  # the helper shuts Ray down
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        if process.stdout is not None:
            process.stdout.close()


class Simulator:
    """`runner simulate` in its own process; its counters over HTTP."""

    def __init__(self, *switches: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "runner", "simulate", "--port", "0", *switches],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            cwd=ROOT,
        )
        line = _first_line(self.process, 60)
        found = re.fullmatch(r"simulator listening on (http://127\.0\.0\.1:\d+/v1)\n", line)
        assert found, line
        self.base_url = found[1]

    def stats(self) -> dict[str, Any]:
        url = self.base_url.removesuffix("/v1") + "/_sim/stats"
        with urllib.request.urlopen(url, timeout=10) as response:
            found: dict[str, Any] = json.load(response)
            return found

    def reset(self) -> None:
        url = self.base_url.removesuffix("/v1") + "/_sim/reset"
        request = urllib.request.Request(url, data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout is not None:
            self.process.stdout.close()


def runner(
    cwd: Path, *args: str, timeout: float = 150, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """`runner ARGS` to the end, as a real process with the Ray test environment."""
    return subprocess.run(
        [sys.executable, "-m", "runner", *args],
        cwd=cwd,
        env={**_env(), **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_runner(cwd: Path, *args: str) -> subprocess.Popen[str]:
    """`runner ARGS` started, not awaited (for kill tests)."""
    return subprocess.Popen(
        [sys.executable, "-m", "runner", *args],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(check: Any, what: str, timeout: float = 90) -> Any:
    """Wait for a condition on files a real process writes, to a deadline; its value."""
    deadline = time.monotonic() + timeout
    while True:
        found = check()
        if found:
            return found
        if time.monotonic() > deadline:
            raise TimeoutError(f"no {what} in {timeout} s")
        time.sleep(0.05)


def journaled(folder: Path) -> int:
    """Records a shard has made durable so far (journal lines and part rows)."""
    import pyarrow.parquet as pq

    lines = sum(p.read_bytes().count(b"\n") for p in folder.glob("journal/segment-*.jsonl"))
    rows = sum(pq.ParquetFile(p).metadata.num_rows for p in folder.glob("parts/part-*.parquet"))
    return lines + rows


def spec(base_url: str, *, concurrency: int, name: str = "t", extra: str = "") -> str:
    return (
        f'name = "{name}"\n\n[input]\npath = "data.jsonl"\nid_column = "id"\n'
        f'prompt_column = "text"\n\n[endpoint]\nbase_url = "{base_url}"\ntimeout_s = 30\n\n'
        f'[request]\nmodel = "gpt-4o-mini"\nmax_tokens = 32\n\n'
        f"[run]\nconcurrency = {concurrency}\nbackoff_base_s = 0.01\nbackoff_max_s = 0.05\n"
        f"{extra}"
    )


def write_input(path: Path, rows: int) -> Path:
    path.write_text(
        "".join(json.dumps({"id": f"r{i}", "text": f"question {i}"}) + "\n" for i in range(rows))
    )
    return path

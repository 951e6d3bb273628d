"""Shared pieces of the benchmarks: a simulator in its own process, inputs, job specs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"


def pinned(cpu: int, argv: list[str]) -> list[str]:
    """Pin a command to one core when taskset exists (server and client on different cores)."""
    if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
        return ["taskset", "-c", str(cpu), *argv]
    return argv


@contextlib.contextmanager
def simulator(*switches: str, cpu: int = 1) -> Iterator[str]:
    """`runner simulate` in its own process on a free loopback port; yields its base URL."""
    with _serving(
        [sys.executable, "-m", "runner", "simulate", "--port", "0", *switches], cpu
    ) as url:
        yield url


@contextlib.contextmanager
def _serving(argv: list[str], cpu: int) -> Iterator[str]:
    """Run a simulator command pinned to `cpu` until its "listening on URL" line; yield URL."""
    proc = subprocess.Popen(pinned(cpu, argv), cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"simulator did not start: {line!r}")
        yield line.rsplit(" ", 1)[1].strip()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


SIM_SCRIPT = """
import json, sys
from runner.sim.http import server_tls
from runner.sim.server import SimulatorConfig, serve
config = SimulatorConfig(**json.loads(sys.argv[1]))
tls = server_tls(sys.argv[2], sys.argv[3]) if len(sys.argv) > 3 else None
serve("127.0.0.1", 0, config, ready=lambda url: print("listening on", url, flush=True), tls=tls)
"""


@contextlib.contextmanager
def configured_simulator(
    config: dict[str, object], tls: tuple[Path, Path] | None = None, *, cpu: int = 1
) -> Iterator[str]:
    """A simulator with any SimulatorConfig settings (and TLS from a certificate and key, when
    given) in its own process; yields its base URL."""
    argv = [sys.executable, "-c", SIM_SCRIPT, json.dumps(config)]
    argv += [str(tls[0]), str(tls[1])] if tls else []
    with _serving(argv, cpu) as url:
        yield url


def make_input(rows: int) -> Path:
    """A Parquet file of `rows` prompts of varied length (cached between runs)."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"prompts-{rows}.parquet"
    if path.exists():
        return path
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    texts = [
        f"Row {i}: summarise " + " ".join(words[(i + k) % len(words)] for k in range(10 + i % 40))
        for i in range(rows)
    ]
    table = pa.table({"id": pa.array(range(rows), pa.int64()), "text": texts})
    pq.write_table(table, path)
    return path


def make_spec(
    name: str,
    input_path: Path,
    base_url: str,
    *,
    concurrency: int,
    extra: str = "",
    endpoint_extra: str = "",
) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    spec = OUT / f"{name}.toml"
    spec.write_text(
        f'name = "{name}"\n\n[input]\npath = "{input_path}"\nid_column = "id"\n'
        f'prompt_column = "text"\n\n[endpoint]\nbase_url = "{base_url}"\ntimeout_s = 60\n'
        f"{endpoint_extra}\n\n"
        f'[request]\nmodel = "gpt-4o-mini"\nmax_tokens = 64\n\n'
        f"[run]\nconcurrency = {concurrency}\n{extra}\n"
    )
    return spec


def child_script(command: str) -> str:
    """Python source that runs `runner COMMAND ARG --runs-dir DIR` in-process and prints its
    exit code, wall seconds and peak RSS as JSON.

    Peak RSS is VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forking parent.
    """
    return f"""
import json, sys, time
from runner.cli import main
start = time.perf_counter()
code = 0
try:
    main(["{command}", sys.argv[1], "--runs-dir", sys.argv[2]])
except SystemExit as exc:
    code = exc.code
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({{"exit": code, "seconds": time.perf_counter() - start,
                  "peak_rss_mb": int(hwm.split()[1]) / 1024}}))
"""

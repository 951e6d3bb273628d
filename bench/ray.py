"""Scale-out on Ray (issue 17, acceptance 5): rows/s for 1-4 shards, and the start-up cost of --ray.

    uv run python bench/ray.py [--seconds 12] [--shards 1,2,3,4] [--startup-runs 3]

Throughput: the simulator answers after 1 s (latency_ms = 1000) in its own process; each shard
runs with concurrency 256, no rate limit, so one shard tops out near 256 rows/s and k shards
near k x 256 if the machine keeps up. One local Ray (num_cpus = 4) is started in this process
for all of them; a first, unrecorded run starts the worker processes. Each run has about
`--seconds` of work (k x 256 x seconds rows); rows/s is measured on the simulator's own count
of answers, between 10 % and 90 % of the rows (the ramp and the tail left out). CPU seconds of
each part are read from /proc over the run: this process (the driver, with its sampler), the
Ray workers running shards, the budget actor, Ray's own processes (raylet, GCS, ...), and the
simulator.

Start-up: the wall time of `runner submit job.toml` against `runner submit job.toml --ray` (a
local Ray started for the run and stopped after) for the same 100-row job, latency 0, fresh
processes, alternating, medians of `--startup-runs`. Loopback only; every loop and
subprocess is bounded in count and time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from common import OUT, ROOT, SIM_SCRIPT, make_input, make_spec

# This file is named ray.py: with its folder first on sys.path, `import ray` (here and in
# runner.cluster) would find it instead of Ray. The folder served `common` already.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != Path(__file__).parent]

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

CONCURRENCY = 256
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_of(pid: int) -> float:
    """User + system CPU seconds of a live process (0 once it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def descendants(root: int) -> dict[int, str]:
    """Every process under `root` with its command line."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            names[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found: dict[int, str] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found[pid] = names.get(pid, "")
        todo += children.get(pid, [])
    return found


def kind(cmdline: str) -> str:
    if "BudgetActor" in cmdline:
        return "budget actor"
    if "ray::" in cmdline or "default_worker" in cmdline:
        return "ray workers"
    return "ray system"


class CpuMeter:
    """CPU seconds by part over a span: this process, Ray's processes, the simulator.

    Per process, alive at the end (a process that ended meanwhile is not counted: the
    budget actor of the run before, idle by then)."""

    def __init__(self, sim_pid: int) -> None:
        self.sim_pid = sim_pid
        self.start = self._read()

    def _read(self) -> dict[int, tuple[str, float]]:
        own = resource.getrusage(resource.RUSAGE_SELF)
        found = {0: ("driver", own.ru_utime + own.ru_stime)}
        found[self.sim_pid] = ("simulator", cpu_of(self.sim_pid))
        for pid, cmdline in descendants(os.getpid()).items():
            if pid != self.sim_pid:
                found[pid] = (kind(cmdline), cpu_of(pid))
        return found

    def spent(self) -> dict[str, float]:
        parts: dict[str, float] = {}
        for pid, (name, cpu) in self._read().items():
            before = self.start.get(pid, (name, 0.0))[1]
            parts[name] = parts.get(name, 0.0) + max(cpu - before, 0.0)
        return {name: round(cpu, 2) for name, cpu in sorted(parts.items())}


def make_jsonl(rows: int) -> Path:
    """`rows` prompts as JSONL (a Ray run cuts JSONL at any line; Parquet only between row
    groups, and common.make_input writes one)."""
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"prompts-{rows}.jsonl"
    if not path.exists():
        words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
        lines = (
            json.dumps({"id": i, "text": f"Row {i}: summarise " + " ".join(words[: 10 + i % 2])})
            for i in range(rows)
        )
        path.write_text("\n".join(lines) + "\n")
    return path


@contextlib.contextmanager
def sim_process(config: dict[str, Any]) -> Iterator[tuple[str, int]]:
    """The simulator in its own process; yields (base URL, pid)."""
    argv = [sys.executable, "-c", SIM_SCRIPT, json.dumps(config)]
    proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"simulator did not start: {line!r}")
        yield line.rsplit(" ", 1)[1].strip(), proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()


def sim_ok(url: str) -> int:
    with urllib.request.urlopen(url.removesuffix("/v1") + "/_sim/stats", timeout=5) as reply:
        return int(json.loads(reply.read())["ok"])


def sim_reset(url: str) -> None:
    request = urllib.request.Request(url.removesuffix("/v1") + "/_sim/reset", method="POST")
    with urllib.request.urlopen(request, timeout=5):
        pass


def throughput(url: str, sim_pid: int, shards: int, rows: int, runs_dir: Path) -> dict[str, Any]:
    """One Ray run of `rows` rows over `shards` shards; rows/s between 10 % and 90 %."""
    import threading

    import anyio

    from runner.cluster import load_driver
    from runner.engine import job

    driver = load_driver()
    data = make_jsonl(rows)
    spec = make_spec(
        f"ray-{shards}", data, url, concurrency=CONCURRENCY, extra="adaptive_concurrency = false"
    )
    prepared = job.prepare(spec, check_whole_file=True)
    sim_reset(url)
    marks: dict[str, float] = {}
    done = threading.Event()

    def sample() -> None:
        low, high = 0.1 * rows, 0.9 * rows
        while not done.wait(0.1) and "high" not in marks:  # bounded by the run
            ok, now = sim_ok(url), time.monotonic()
            if ok >= low and "low" not in marks:
                marks["low"], marks["low_ok"] = now, ok
            if ok >= high:
                marks["high"], marks["high_ok"] = now, ok

    meter = CpuMeter(sim_pid)
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()

    async def main() -> Any:
        options = driver.RayOptions(shards=shards)
        with anyio.fail_after(600):
            return await driver.submit(prepared, runs_dir, options, handle_signals=False)

    outcome = anyio.run(main)
    wall = time.monotonic() - started
    done.set()
    sampler.join(5)
    cpu = meter.spent()
    if outcome.state != "completed" or outcome.progress.ok != rows:
        raise RuntimeError(f"{shards} shards: {outcome.state}, {outcome.progress.ok} of {rows}")
    span = marks["high"] - marks["low"]
    return {
        "shards": shards,
        "rows": rows,
        "rows_per_s": round((marks["high_ok"] - marks["low_ok"]) / span, 1),
        "wall_s": round(wall, 2),
        "cpu_s": cpu,
    }


def startup(url: str, runs: int) -> dict[str, float]:
    """Median wall seconds of a 100-row `runner submit`, local and --ray (local Ray)."""
    data = make_input(100)
    spec = make_spec("ray-startup", data, url, concurrency=64)
    runs_dir = OUT / "ray-startup-runs"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}
    times: dict[str, list[float]] = {"local": [], "ray": []}
    for _ in range(runs):
        for name, extra in (("local", []), ("ray", ["--ray"])):
            shutil.rmtree(runs_dir, ignore_errors=True)
            argv = [sys.executable, "-m", "runner", "submit", str(spec), *extra]
            argv += ["--runs-dir", str(runs_dir)]
            begun = time.monotonic()
            done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, timeout=300)
            if done.returncode != 0:
                raise RuntimeError(f"{name}: exit {done.returncode}: {done.stderr[-800:]!r}")
            times[name].append(time.monotonic() - begun)
    return {name: round(statistics.median(values), 2) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--shards", default="1,2,3,4")
    parser.add_argument("--startup-runs", type=int, default=3)
    args = parser.parse_args()
    counts = [int(k) for k in args.shards.split(",")]
    results: dict[str, Any] = {"cpus": os.cpu_count(), "load_before": os.getloadavg()}
    if args.startup_runs:
        with sim_process({}) as (url, _):
            results["startup_s"] = startup(url, args.startup_runs)
        print(json.dumps({"startup_s": results["startup_s"]}), flush=True)
    import ray

    runs_dir = OUT / "ray-runs"
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        with sim_process({"latency_ms": 1000.0}) as (url, pid):
            shutil.rmtree(runs_dir, ignore_errors=True)
            throughput(url, pid, max(counts), CONCURRENCY * max(counts), runs_dir)  # warm-up
            results["runs"] = []
            for k in counts:
                rows = int(CONCURRENCY * k * args.seconds)
                result = throughput(url, pid, k, rows, runs_dir)
                print(json.dumps(result), flush=True)
                results["runs"].append(result)
    finally:
        ray.shutdown()
    results["load_after"] = os.getloadavg()
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "ray.json").write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

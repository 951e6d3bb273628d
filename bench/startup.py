"""Start-up cost: CPU and peak RSS of a 100-row run, `runner submit` against the plain aiohttp loop.

    uv run python bench/startup.py [--runs 5] [--rows 100]

The simulator runs on core 1; each client runs as a fresh process on core 0 (taskset), the two
alternating, after one unrecorded pair. CPU is user+sys of the reaped child (RUSAGE_CHILDREN
deltas); peak RSS is `/usr/bin/time -f %M` when it exists, else not reported. Bytecode is
cached under bench/out/pycache (as an installed package has .pyc files). Prints the medians
and the ratios; every subprocess has a timeout.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from common import OUT, ROOT, make_input, make_spec, pinned, simulator

BIN = Path(sys.executable).parent
TIME = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else None)


def measure(argv: list[str], env: dict[str, str]) -> tuple[float, float | None]:
    """(CPU seconds, peak RSS MB or None) of one child process."""
    wrapped = [TIME, "-f", "%M", *argv] if TIME else argv
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        pinned(0, wrapped), cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {done.returncode}: {done.stderr[-800:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    rss = int(done.stderr.strip().splitlines()[-1]) / 1024 if TIME else None
    return cpu, rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--rows", type=int, default=100)
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPYCACHEPREFIX=str(OUT / "pycache"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # else nothing is cached, and every start compiles
    runs_dir = OUT / "startup-runs"
    result = OUT / "startup-baseline.parquet"
    figures: dict[str, list[tuple[float, float | None]]] = {"runner": [], "aiohttp": []}
    with simulator(cpu=1) as url:
        data = make_input(args.rows)
        spec = make_spec("startup", data, url, concurrency=64)
        for turn in range(args.runs + 1):
            shutil.rmtree(runs_dir, ignore_errors=True)
            runner = measure(
                [str(BIN / "runner"), "submit", str(spec), "--runs-dir", str(runs_dir)], env
            )
            script = str(ROOT / "bench" / "baseline_aiohttp.py")
            loop = measure([sys.executable, script, str(data), str(result), url, "64"], env)
            if turn:  # the first pair warms the page cache
                figures["runner"].append(runner)
                figures["aiohttp"].append(loop)
    shutil.rmtree(runs_dir, ignore_errors=True)
    result.unlink(missing_ok=True)
    medians = {}
    for client, runs in figures.items():
        cpu = statistics.median(c for c, _ in runs)
        rss = [r for _, r in runs if r is not None]
        medians[client] = (cpu, statistics.median(rss) if rss else None)
        shown = " ".join(f"{c:.2f}" for c, _ in runs)
        peak = f", peak RSS median {medians[client][1]:.0f} MB" if rss else ""
        print(f"{client:<8} {args.rows} rows: CPU median {cpu:.3f} s ({shown}){peak}")
    (rc, rr), (bc, br) = medians["runner"], medians["aiohttp"]
    ratio = f", peak RSS {rr / br:.2f}x" if rr and br else ""
    print(f"runner / aiohttp: CPU {rc / bc:.2f}x{ratio}")


if __name__ == "__main__":
    main()

"""CPU per 1,000 rows of `runner submit` and the plain aiohttp loop, alternating, N pairs.

    uv run python bench/cpu_pairs.py [--rows 20000] [--pairs 4]

On a shared machine one pair's ratio is noisy: this runs the W1 set-up (zero latency, 64
concurrent) pair after pair, each client a fresh process on core 0 and the simulator on
core 1, and prints each run's user+sys CPU, the minimum and median per client, and the
ratios of minima and medians (the minimum is the least disturbed by other work). Bytecode is
cached under bench/out/pycache, as bench/run.py --bytecode does.
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


def cpu_of(argv: list[str], env: dict[str, str]) -> float:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        pinned(0, argv), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[0]} exited {done.returncode}: {done.stderr[-800:]}")
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--pairs", type=int, default=4)
    args = parser.parse_args()
    env = dict(os.environ, PYTHONPYCACHEPREFIX=str(OUT / "pycache"))
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # else nothing is cached, and every start compiles
    runs_dir = OUT / "pairs-runs"
    result = OUT / "pairs-baseline.parquet"
    figures: dict[str, list[float]] = {"runner": [], "aiohttp": []}
    with simulator(cpu=1) as url:
        data = make_input(args.rows)
        spec = make_spec("pairs", data, url, concurrency=64)
        for _ in range(args.pairs):
            shutil.rmtree(runs_dir, ignore_errors=True)
            argv = [str(BIN / "runner"), "submit", str(spec), "--runs-dir", str(runs_dir)]
            figures["runner"].append(cpu_of(argv, env) / args.rows * 1000)
            script = str(ROOT / "bench" / "baseline_aiohttp.py")
            argv = [sys.executable, script, str(data), str(result), url, "64"]
            figures["aiohttp"].append(cpu_of(argv, env) / args.rows * 1000)
            print(
                f"runner {figures['runner'][-1]:.3f}  aiohttp {figures['aiohttp'][-1]:.3f}"
                f"  (CPU s / 1k rows; load {os.getloadavg()[0]:.1f})",
                flush=True,
            )
    shutil.rmtree(runs_dir, ignore_errors=True)
    result.unlink(missing_ok=True)
    low = {k: min(v) for k, v in figures.items()}
    mid = {k: statistics.median(v) for k, v in figures.items()}
    print(f"min:    runner {low['runner']:.3f}  aiohttp {low['aiohttp']:.3f}  "
          f"ratio {low['runner'] / low['aiohttp']:.2f}x")  # fmt: skip
    print(f"median: runner {mid['runner']:.3f}  aiohttp {mid['aiohttp']:.3f}  "
          f"ratio {mid['runner'] / mid['aiohttp']:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()

"""`runner report` on a run with 1,000,000 results (built synthetically, as bench/resume.py).

    uv run python bench/report.py [--rows 1000000]

Times the whole `runner report RUN` command (a fresh process: start-up, DuckDB over 100
Parquet parts, pricing, rendering) and `runner report RUN --by model`. Target: under 3 s.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from common import simulator
from resume import build_run


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {done.stderr[-2000:]}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with simulator() as base_url:
        run = build_run(args.rows, 0, base_url)
    base = [
        sys.executable,
        "-m",
        "runner",
        "report",
        run.run_id,
        "--runs-dir",
        str(run.path.parent),
    ]
    for label, extra in (("report", []), ("report --by model", ["--by", "model"])):
        times = [timed(base + extra) for _ in range(args.repeat)]
        print(
            f"{label:<20} {args.rows:,} rows: median {statistics.median(times):.2f} s "
            f"(runs: {', '.join(f'{t:.2f}' for t in times)}); target < 3 s"
        )


if __name__ == "__main__":
    main()

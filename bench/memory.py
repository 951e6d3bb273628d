"""Peak memory of `runner submit` at zero latency: 20,000 vs 200,000 rows.

    uv run python bench/memory.py [--rows 20000 200000] [--concurrency 64]

The simulator runs in its own process (pinned to another core where taskset exists); each
run is `runner submit` in a fresh process whose own peak RSS (VmHWM) is reported.
Target: peak RSS under 250 MB, and the large run within 20 % of the small one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from common import OUT, child_script, make_input, make_spec, pinned, simulator

CHILD = child_script("submit")


def run_one(rows: int, base_url: str, concurrency: int) -> dict[str, float]:
    spec = make_spec(f"mem{rows}", make_input(rows), base_url, concurrency=concurrency)
    runs = OUT / "runs"
    done = subprocess.run(
        pinned(0, [sys.executable, "-c", CHILD, str(spec), str(runs)]),
        capture_output=True,
        text=True,
        check=False,
    )
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    if result["exit"] != 0:
        raise SystemExit(f"run failed ({result['exit']}): {done.stderr[-2000:]}")
    result["rows"] = rows
    result["rows_per_s"] = rows / result["seconds"]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[20_000, 200_000])
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    results = []
    with simulator() as base_url:
        for rows in args.rows:
            started = time.perf_counter()
            results.append(run_one(rows, base_url, args.concurrency))
            print(
                f"  {rows:>9,} rows done in {time.perf_counter() - started:.1f} s", file=sys.stderr
            )
    print(f"{'rows':>10}  {'peak RSS MB':>11}  {'seconds':>8}  {'rows/s':>8}")
    for r in results:
        rate = r["rows_per_s"]
        print(f"{r['rows']:>10,}  {r['peak_rss_mb']:>11.1f}  {r['seconds']:>8.1f}  {rate:>8.0f}")
    if len(results) >= 2:
        small, large = results[0], results[-1]
        ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
        verdict = "ok" if large["peak_rss_mb"] < 250 and ratio <= 1.2 else "OVER TARGET"
        print(f"large/small peak RSS: {ratio:.2f}  ({verdict}: target < 250 MB and <= 1.20)")


if __name__ == "__main__":
    main()

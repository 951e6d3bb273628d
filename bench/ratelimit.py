"""Rate limits: does the runner converge on the provider's limit, not past it, not below it?

    uv run python bench/ratelimit.py [--seconds 60] [--only short-job,rpm,rpm-noheaders,...]

Each scenario starts the simulator in its own process with a real sliding-window limit,
runs `runner submit` (concurrency 128, no client-side limit configured) for `--seconds`,
stops it with SIGINT, and reads the simulator's counters:
  - rpm:            1,200 requests/min with x-ratelimit-* headers   (target >= 90 %, < 3 % 429s)
  - rpm-noheaders:  the same, only 429 + Retry-After               (target >= 80 %, < 10 % 429s)
  - tpm / tpm-noheaders: 200,000 tokens/min, prompts of varied length (same two targets)
The share of the limit is what the simulator accepted over the run, divided by what the limit
allows over the same time (limit x seconds / 60).

  - short-job: 2,400 rows against the same 1,200 requests/min sliding window with headers, run
    to the end: the ideal is ~61 s (one window's worth at once, wait for the oldest to leave,
    the second window's worth); target within 10 % of it, < 3 % 429s. Timed from the first
    request the simulator sees to the last answer.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO

from common import OUT, ROOT, make_input, make_spec, pinned, simulator

SCENARIOS = {
    "rpm": (["--rpm-limit", "1200"], "requests", 1200, 0.90, 0.03),
    "rpm-noheaders": (
        ["--rpm-limit", "1200", "--no-ratelimit-headers"],
        "requests",
        1200,
        0.80,
        0.10,
    ),
    "tpm": (["--tpm-limit", "200000"], "tokens", 200_000, 0.90, 0.03),
    "tpm-noheaders": (
        ["--tpm-limit", "200000", "--no-ratelimit-headers"],
        "tokens",
        200_000,
        0.80,
        0.10,
    ),
}


def stats(base_url: str) -> dict[str, object]:
    with urllib.request.urlopen(base_url.replace("/v1", "/_sim/stats"), timeout=5) as resp:
        data: dict[str, object] = json.load(resp)
        return data


def start_submit(spec: Path, base_url: str, log: IO[str]) -> tuple[subprocess.Popen[str], float]:
    """`runner submit` of `spec` on core 0 (its log to `log`), and the moment the simulator saw
    its first request: the clock starts there, not at process start."""
    runs = OUT / "ratelimit-runs"
    argv = [sys.executable, "-m", "runner", "submit", str(spec), "--runs-dir", str(runs)]
    proc = subprocess.Popen(
        pinned(0, argv), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, text=True
    )
    started = time.monotonic()
    while stats(base_url)["requests"] == 0 and time.monotonic() - started < 30:
        time.sleep(0.01)
    return proc, time.monotonic()


def run(name: str, seconds: float, run_extra: str = "") -> dict[str, float]:
    switches, unit, limit, want_share, max_429 = SCENARIOS[name]
    rows = 200_000
    with simulator("--latency-ms", "50", "--jitter-ms", "20", *switches) as base_url:
        spec = make_spec(f"rl-{name}", make_input(rows), base_url, concurrency=128, extra=run_extra)
        log = (OUT / f"ratelimit-{name}.log").open("w")
        proc, t0 = start_submit(spec, base_url, log)
        time.sleep(seconds)
        s = stats(base_url)
        elapsed = time.monotonic() - t0
        proc.send_signal(signal.SIGINT)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        finally:
            log.close()
    ok = float(s["ok"])  # type: ignore[arg-type]
    requests = float(s["requests"])  # type: ignore[arg-type]
    limited = float(s["rate_limited"])  # type: ignore[arg-type]
    used = ok if unit == "requests" else float(s["total_tokens"])  # type: ignore[arg-type]
    allowed = limit * elapsed / 60
    return {
        "share": used / allowed,
        "rate_limited_share": limited / requests if requests else 0.0,
        "ok": ok,
        "requests": requests,
        "rate_limited": limited,
        "seconds": elapsed,
        "want_share": want_share,
        "max_429": max_429,
    }


SHORT_ROWS, SHORT_IDEAL_S = 2_400, 61.0


def short_job() -> dict[str, float]:
    """2,400 rows through a 1,200/min sliding window with headers, to the end."""
    with simulator("--latency-ms", "50", "--jitter-ms", "20", "--rpm-limit", "1200") as base_url:
        spec = make_spec("rl-short", make_input(SHORT_ROWS), base_url, concurrency=128)
        with (OUT / "ratelimit-short-job.log").open("w") as log:
            proc, t0 = start_submit(spec, base_url, log)
            while (s := stats(base_url))["ok"] < SHORT_ROWS:  # type: ignore[operator]
                if proc.poll() is not None or time.monotonic() - t0 > 300:
                    break
                time.sleep(0.05)
            elapsed = time.monotonic() - t0
            try:
                proc.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
    ok = float(s["ok"])  # type: ignore[arg-type]
    requests = float(s["requests"])  # type: ignore[arg-type]
    limited = float(s["rate_limited"])  # type: ignore[arg-type]
    return {
        "seconds": elapsed,
        "of_ideal": elapsed / SHORT_IDEAL_S,
        "rate_limited_share": limited / requests if requests else 0.0,
        "ok": ok,
        "requests": requests,
        "rate_limited": limited,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--only", default=",".join(["short-job", *SCENARIOS]))
    parser.add_argument(
        "--run-extra", default="", help='extra [run] lines, e.g. "adaptive_concurrency = false"'
    )
    args = parser.parse_args()
    results = {}
    names = args.only.split(",")
    if "short-job" in names:
        print(f"running short-job ({SHORT_ROWS:,} rows to the end) ...", file=sys.stderr)
        short = results["short-job"] = short_job()
        good = short["of_ideal"] <= 1.10 and short["rate_limited_share"] < 0.03
        print(
            f"short-job: {short['seconds']:.1f} s ({short['of_ideal']:.0%} of the ideal "
            f"{SHORT_IDEAL_S:.0f} s), {short['rate_limited_share']:.2%} 429s, "
            f"{short['ok']:.0f} ok of {short['requests']:.0f} requests  "
            f"{'ok' if good else 'MISSED'} (target <= 110 %, < 3 % 429s)"
        )
    for name in (n for n in names if n != "short-job"):
        print(f"running {name} for {args.seconds:.0f} s ...", file=sys.stderr)
        results[name] = run(name, args.seconds, args.run_extra)
    print(f"{'scenario':<15} {'of limit':>9} {'429s':>7} {'ok':>7} {'requests':>9}  verdict")
    for name, r in results.items():
        if name == "short-job":
            continue
        good = r["share"] >= r["want_share"] and r["rate_limited_share"] < r["max_429"]
        print(
            f"{name:<15} {r['share']:>8.1%} {r['rate_limited_share']:>7.2%} {r['ok']:>7.0f} "
            f"{r['requests']:>9.0f}  {'ok' if good else 'MISSED'} "
            f"(target >= {r['want_share']:.0%}, < {r['max_429']:.0%} 429s)"
        )
    (OUT / "ratelimit.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

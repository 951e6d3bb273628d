"""Rate limits: does the runner converge on the provider's limit, not past it, not below it?

    uv run python bench/ratelimit.py [--seconds 60] [--only rpm,rpm-noheaders,tpm,tpm-noheaders]

Each scenario starts the simulator in its own process with a real sliding-window limit,
runs `runner submit` (concurrency 128, no client-side limit configured) for `--seconds`,
stops it with SIGINT, and reads the simulator's counters:
  - rpm:            1,200 requests/min with x-ratelimit-* headers   (target >= 90 %, < 3 % 429s)
  - rpm-noheaders:  the same, only 429 + Retry-After               (target >= 80 %, < 10 % 429s)
  - tpm / tpm-noheaders: 200,000 tokens/min, prompts of varied length (same two targets)
The share of the limit is what the simulator accepted over the run, divided by what the limit
allows over the same time (limit x seconds / 60).
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import time
import urllib.request

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


def run(name: str, seconds: float, run_extra: str = "") -> dict[str, float]:
    switches, unit, limit, want_share, max_429 = SCENARIOS[name]
    rows = 200_000
    with simulator("--latency-ms", "50", "--jitter-ms", "20", *switches) as base_url:
        spec = make_spec(f"rl-{name}", make_input(rows), base_url, concurrency=128, extra=run_extra)
        runs = OUT / "ratelimit-runs"
        argv = [sys.executable, "-m", "runner", "submit", str(spec), "--runs-dir", str(runs)]
        log = (OUT / f"ratelimit-{name}.log").open("w")
        proc = subprocess.Popen(
            pinned(0, argv), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=log, text=True
        )
        started = time.monotonic()
        # Start the clock at the first request the simulator sees (not at process start).
        while stats(base_url)["requests"] == 0 and time.monotonic() - started < 30:
            time.sleep(0.01)
        t0 = time.monotonic()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--only", default=",".join(SCENARIOS))
    parser.add_argument(
        "--run-extra", default="", help='extra [run] lines, e.g. "adaptive_concurrency = false"'
    )
    args = parser.parse_args()
    results = {}
    for name in args.only.split(","):
        print(f"running {name} for {args.seconds:.0f} s ...", file=sys.stderr)
        results[name] = run(name, args.seconds, args.run_extra)
    print(f"{'scenario':<15} {'of limit':>9} {'429s':>7} {'ok':>7} {'requests':>9}  verdict")
    for name, r in results.items():
        good = r["share"] >= r["want_share"] and r["rate_limited_share"] < r["max_429"]
        print(
            f"{name:<15} {r['share']:>8.1%} {r['rate_limited_share']:>7.2%} {r['ok']:>7.0f} "
            f"{r['requests']:>9.0f}  {'ok' if good else 'MISSED'} "
            f"(target >= {r['want_share']:.0%}, < {r['max_429']:.0%} 429s)"
        )
    (OUT / "ratelimit.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

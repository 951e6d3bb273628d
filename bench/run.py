"""Throughput, CPU and memory of `runner submit` against plain aiohttp / httpx2 loops.

    uv run python bench/run.py [--only W1,W2] [--quick] [--w4-baselines] [--bytecode]
                               [--no-help-times] [--no-warmup] [--clients runner,aiohttp]
                               [--repeat N]

The simulator runs in its own process on core 1 (taskset, where it exists); every client
runs as a fresh process on core 0:
  runner    `.venv/bin/runner submit SPEC --runs-dir ...` (spec from common.make_spec)
  aiohttp   bench/baseline_aiohttp.py  (fixed worker pool over a bounded queue, Parquet at end)
  httpx2    bench/baseline_httpx2.py   (the same loop over httpx2)
Per run: wall time from process start to exit (rows/s = rows / that), the rate over the run
itself (runner: first started_at to last finished_at in its parts; baselines: first send to
last answer, reported by the child), user+sys CPU (RUSAGE_CHILDREN deltas around one reaped
child), peak RSS (VmHWM read by an atexit hook in the child, injected through a generated
sitecustomize on PYTHONPATH; ru_maxrss is not used since Linux carries it over exec), and
the time from process start to the first request the simulator sees (GET /_sim/stats every
~5 ms). Progress goes to stderr, the table to stdout, raw figures to bench/out/results.json.
With --repeat N, each workload's clients run N rounds, in turns (runner first in odd
rounds, last in even ones), and each ratio is the median of the rounds' own ratios: on a
machine whose speed drifts (a shared VM), one pair can be off by a third either way.
Each subprocess has a timeout; the soft RLIMIT_NOFILE is raised to the hard limit here and
inherited by the simulator and the clients. One unrecorded 200-row run per client comes
first (page cache). With PYTHONDONTWRITEBYTECODE=1 and no .pyc in the venv, every process
compiles its imports from source: --bytecode caches them under bench/out/pycache instead.

Workloads (--quick divides row counts by 10):
  W1  20,000 rows, 0 ms latency, 64 concurrent
  W2   5,000 rows, 200 +- 50 ms latency, 256 concurrent (ideal 1,280 rows/s)
  W3  20,000 rows, 1 s latency, 2,048 concurrent (ideal 2,048 rows/s)
  W4  1,000,000 rows, 0 ms, 64 concurrent: runner only (+ a 100,000-row runner run for the
      peak-RSS flatness check); baselines with --w4-baselines
  W5  10,000 rows over HTTPS (a test CA made with openssl; runner: endpoint.ca_bundle,
      baselines: SSL_CERT_FILE), lognormal latency (median 1.5 s, sigma 0.72: p99 ~8 s),
      1,024 concurrent (ideal: concurrency / mean latency, 527 rows/s)
  W6  50,000 rows, 2 s latency, 8,192 concurrent (ideal 4,096 rows/s); needs ~16,700 open
      files: the soft RLIMIT_NOFILE is raised to the hard limit (warned about when short)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import ssl
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
from common import OUT, ROOT, configured_simulator, make_input, make_spec, pinned, simulator

BIN = Path(sys.executable).parent
HOOK_DIR = OUT / "hwm-hook"
HOOK = """\
import atexit, os
_path = os.environ.get("BENCH_HWM_FILE")
if _path:
    def _hwm():
        with open("/proc/self/status") as f:
            kb = next(int(l.split()[1]) for l in f if l.startswith("VmHWM:"))
        with open(_path, "w") as f:
            f.write(str(kb))
    atexit.register(_hwm)
"""
CLIENT_CPU, SIM_CPU = 0, 1
WARMUP_ROWS = 200


@dataclass(frozen=True)
class Workload:
    name: str
    rows: int
    latency_ms: float
    jitter_ms: float
    concurrency: int
    sigma: float = 0.0  # > 0: lognormal latency with median latency_ms
    tls: bool = False

    @property
    def mean_latency_s(self) -> float:
        return self.latency_ms / 1000 * math.exp(self.sigma**2 / 2)

    @property
    def ideal(self) -> float | None:
        return self.concurrency / self.mean_latency_s if self.latency_ms else None

    def config(self) -> dict[str, float]:
        """The simulator settings, for a simulator started with `configured_simulator`."""
        return {"latency_ms": self.latency_ms, "jitter_ms": self.jitter_ms,
                "latency_sigma": self.sigma}  # fmt: skip

    def switches(self) -> list[str]:
        return ["--latency-ms", f"{self.latency_ms:g}", "--jitter-ms", f"{self.jitter_ms:g}"]


WORKLOADS = {
    "W1": Workload("W1", 20_000, 0, 0, 64),
    "W2": Workload("W2", 5_000, 200, 50, 256),
    "W3": Workload("W3", 20_000, 1000, 0, 2048),
    "W4": Workload("W4", 1_000_000, 0, 0, 64),
    "W5": Workload("W5", 10_000, 1500, 0, 1024, sigma=0.72, tls=True),
    "W6": Workload("W6", 50_000, 2000, 0, 8192),
}
# The HTTPS workload's CA (bench/out/tls/ca.pem once made): sim_get and the clients trust it.
TLS: dict[str, Path] = {}


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def sim_get(base_url: str, path: str, data: bytes | None = None) -> Any:
    url = base_url.removesuffix("/v1") + path
    context = ssl.create_default_context(cafile=str(TLS["ca"])) if "ca" in TLS else None
    with urllib.request.urlopen(url, data=data, timeout=5, context=context) as resp:
        return json.load(resp)


def raise_nofile(need: int) -> dict[str, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one; children (simulator, clients) inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before = soft
    if soft != resource.RLIM_INFINITY and (hard == resource.RLIM_INFINITY or soft < hard):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft != resource.RLIM_INFINITY and soft < need:
        log(f"WARNING: RLIMIT_NOFILE {soft} < {need} descriptors needed by the largest workload")
    return {"soft_before": before, "soft": soft, "hard": hard, "needed": need}


def run_client(
    client: str, w: Workload, rows: int, base_url: str, timeout: float
) -> dict[str, Any]:
    """One fresh client process; returns its figures."""
    tag = f"{w.name}-{client}-{rows}"
    input_path = make_input(rows)
    logs = OUT / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    runs_dir = OUT / "bench-runs" / tag
    shutil.rmtree(runs_dir, ignore_errors=True)
    result_path = OUT / f"baseline-{tag}.parquet"
    hwm_file = logs / f"{tag}.hwm"
    env = dict(os.environ, BENCH_HWM_FILE=str(hwm_file))
    if client == "runner":
        trust = f'ca_bundle = "{TLS["ca"]}"' if w.tls else ""
        spec = make_spec(
            f"bench-{tag}", input_path, base_url, concurrency=w.concurrency, endpoint_extra=trust
        )
        argv = [str(BIN / "runner"), "submit", str(spec), "--runs-dir", str(runs_dir)]
    else:
        script = ROOT / "bench" / f"baseline_{client}.py"
        argv = [sys.executable, str(script), str(input_path), str(result_path), base_url,
                str(w.concurrency), str(timeout)]  # fmt: skip
    hwm_file.unlink(missing_ok=True)
    if w.tls and client != "runner":
        env["SSL_CERT_FILE"] = str(TLS["ca"])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HOOK_DIR), env.get("PYTHONPATH")]))
    sim_get(base_url, "/_sim/reset", b"")
    out_path, err_path = logs / f"{tag}.out", logs / f"{tag}.err"
    log(f"{w.name} {client:<7} {rows:>9,} rows, {w.concurrency} concurrent ...")
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        proc = subprocess.Popen(pinned(CLIENT_CPU, argv), cwd=ROOT, env=env, stdout=out, stderr=err)
        killer = threading.Timer(timeout, proc.kill)  # every run stops by itself
        killer.start()
        sampled = [0]
        sampler = threading.Thread(target=_sample_hwm, args=(proc, sampled), daemon=True)
        sampler.start()
        first = _first_request(proc, base_url, started, min(timeout, 120.0))
        code = proc.wait()
        wall = time.perf_counter() - started
        killer.cancel()
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        sampler.join(timeout=1)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    stats = sim_get(base_url, "/_sim/stats")
    peak_kb = int(hwm_file.read_text()) if hwm_file.exists() else None
    r: dict[str, Any] = {
        "workload": w.name, "client": client, "rows": rows, "concurrency": w.concurrency,
        "latency_ms": w.latency_ms, "jitter_ms": w.jitter_ms, "exit": code,
        "timed_out": wall >= timeout, "wall_s": wall, "rows_per_s": rows / wall,
        "cpu_s": cpu, "cpu_s_per_1k": cpu / rows * 1000,
        "peak_rss_mb": (peak_kb if peak_kb is not None else sampled[0]) / 1024,
        "peak_rss_source": "atexit VmHWM" if peak_kb is not None else "sampled VmHWM",
        "first_request_s": first, "sim_requests": stats.get("requests"),
        "sim_resent_after_ok": stats.get("resent_after_ok"), "ideal_rows_per_s": w.ideal,
    }  # fmt: skip
    if client == "runner":
        r.update(_runner_figures(runs_dir))
        shutil.rmtree(runs_dir, ignore_errors=True)
    else:
        lines = out_path.read_text().strip().splitlines()
        child = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
        r["ok"], r["run_s"] = child.get("ok"), child.get("run_seconds")
        result_path.unlink(missing_ok=True)
    r["run_rows_per_s"] = rows / r["run_s"] if r.get("run_s") else None
    if code != 0 or r.get("ok") != rows:
        tail = err_path.read_text()[-1500:]
        log(f"  PROBLEM: exit {code}, ok {r.get('ok')} of {rows}; stderr tail:\n{tail}")
    log(
        f"  {wall:.2f} s wall, {r['rows_per_s']:,.0f} rows/s, CPU {cpu:.2f} s, "
        f"peak {r['peak_rss_mb']:.0f} MB, first request {_fmt(first, '.3f')} s"
    )
    return r


def _sample_hwm(proc: subprocess.Popen[bytes], box: list[int]) -> None:
    """Fallback peak RSS: VmHWM of the live process every 50 ms (misses the last instants)."""
    status = Path(f"/proc/{proc.pid}/status")
    while proc.returncode is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    box[0] = max(box[0], int(line.split()[1]))
        except (OSError, ValueError):
            return
        time.sleep(0.05)


def _first_request(
    proc: subprocess.Popen[bytes], base_url: str, started: float, limit: float
) -> float | None:
    """Seconds from process start to the first chat request the simulator counted."""
    while proc.poll() is None and time.perf_counter() - started < limit:
        if sim_get(base_url, "/_sim/stats")["requests"] > 0:
            return time.perf_counter() - started
        time.sleep(0.005)
    return None


def _runner_figures(runs_dir: Path) -> dict[str, Any]:
    manifests = list(runs_dir.glob("*/manifest.json"))
    if len(manifests) != 1:
        return {"ok": None, "run_s": None}
    manifest = json.loads(manifests[0].read_text())
    parts = manifests[0].parent / "parts"
    run_s = None
    if any(parts.glob("part-*.parquet")):
        t = pq.read_table(parts, columns=["started_at", "finished_at"])
        lo = pc.min(t.column("started_at").cast("int64")).as_py()
        hi = pc.max(t.column("finished_at").cast("int64")).as_py()
        run_s = (hi - lo) / 1e6
    return {"ok": manifest.get("counts", {}).get("ok"), "run_s": run_s,
            "state": manifest.get("state")}  # fmt: skip


def help_times(repeats: int = 5) -> dict[str, Any]:
    """Median wall time of `runner --help` (console script) and `python -m runner --help`."""
    result: dict[str, Any] = {}
    for label, argv in (
        ("runner --help", [str(BIN / "runner"), "--help"]),
        ("python -m runner --help", [sys.executable, "-m", "runner", "--help"]),
    ):
        subprocess.run(pinned(CLIENT_CPU, argv), capture_output=True, timeout=60, check=True)
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            subprocess.run(pinned(CLIENT_CPU, argv), capture_output=True, timeout=60, check=True)
            times.append(time.perf_counter() - started)
        result[label] = {"median_s": statistics.median(times), "runs_s": times}
        log(f"{label}: median {statistics.median(times) * 1000:.0f} ms over {repeats}")
    return result


def _tls_files() -> tuple[Path, Path]:
    """A test CA and server certificate under bench/out/tls (made once, with openssl)."""
    from runner.sim.http import make_test_certificate

    folder = OUT / "tls"
    names = [folder / n for n in ("ca.pem", "server.pem", "server.key")]
    if not all(p.exists() for p in names):
        make_test_certificate(folder)
    TLS["ca"] = names[0]
    return names[1], names[2]


def plan(w: Workload, quick: bool, w4_baselines: bool) -> list[tuple[str, int]]:
    rows = w.rows // 10 if quick else w.rows
    if w.name == "W4":
        runs = [("runner", rows), ("runner", rows // 10)]
        if w4_baselines:
            runs += [("aiohttp", rows), ("httpx2", rows)]
        return runs
    return [("runner", rows), ("aiohttp", rows), ("httpx2", rows)]


def timeout_for(w: Workload, rows: int) -> float:
    # Generous: 250 rows/s at worst (or a tenth of the ideal rate), plus start-up.
    floor = min(250.0, (w.ideal or 2500.0) / 10)
    return 120.0 + rows / floor


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: list[dict[str, Any]]) -> str:
    head = (
        f"{'load':<4} {'client':<8} {'rows':>9} {'wall s':>8} {'rows/s':>8} {'run r/s':>8} "
        f"{'%ideal':>11} {'CPU s/1k':>8} {'RSS MB':>7} {'1st req s':>9} {'ok':>9}"
    )
    lines = [head, "-" * len(head)]
    for r in results:
        ideal = r["ideal_rows_per_s"]
        share = "-"
        if ideal:
            share = f"{r['rows_per_s'] / ideal:.0%}"
            if r["run_rows_per_s"]:
                share += f"/{r['run_rows_per_s'] / ideal:.0%}"
        ok = "TIMEOUT" if r["timed_out"] else _fmt(r["ok"], ",")
        lines.append(
            f"{r['workload']:<4} {r['client']:<8} {r['rows']:>9,} {r['wall_s']:>8.2f} "
            f"{r['rows_per_s']:>8,.0f} {_fmt(r['run_rows_per_s'], ',.0f'):>8} {share:>11} "
            f"{r['cpu_s_per_1k']:>8.3f} {r['peak_rss_mb']:>7.0f} "
            f"{_fmt(r['first_request_s'], '.3f'):>9} {ok:>9}"
        )
    lines.append("")
    lines.append("%ideal = wall rate / run rate as a share of concurrency / latency.")
    lines.append(
        "runner / baseline ratios (same run; rows/s < 1 and CPU > 1 mean runner is worse):"
    )
    for name in dict.fromkeys(r["workload"] for r in results):
        mine = [r for r in results if r["workload"] == name]
        for base_client in dict.fromkeys(r["client"] for r in mine if r["client"] != "runner"):
            line = _ratios(name, base_client, mine)
            if line:
                lines.append(line)
        runners = sorted((r for r in mine if r["client"] == "runner"), key=lambda r: r["rows"])
        if len(runners) >= 2 and runners[0]["rows"] != runners[-1]["rows"]:
            small, large = runners[0], runners[-1]
            ratio = large["peak_rss_mb"] / small["peak_rss_mb"]
            verdict = "flat (<= 1.20)" if ratio <= 1.2 else "NOT flat (> 1.20)"
            lines.append(
                f"  {name} runner peak RSS {large['rows']:,} vs {small['rows']:,} rows: "
                f"{large['peak_rss_mb']:.0f} / {small['peak_rss_mb']:.0f} MB = {ratio:.2f}"
                f"  {verdict}"
            )
    return "\n".join(lines)


def _ratios(name: str, base_client: str, results: list[dict[str, Any]]) -> str | None:
    """runner / `base_client` on one workload: per round (the largest runner run against the
    baseline run of its size), then the median over rounds, with the range when several."""
    rounds: dict[int, dict[str, dict[str, Any]]] = {}
    for r in results:
        mine = rounds.setdefault(r.get("round", 0), {})
        if r["client"] in ("runner", base_client):
            if r["client"] not in mine or r["rows"] > mine[r["client"]]["rows"]:
                mine[r["client"]] = r
    pairs = [
        (got["runner"], got[base_client])
        for got in rounds.values()
        if {"runner", base_client} <= got.keys()
        and got["runner"]["rows"] == got[base_client]["rows"]
    ]
    if not pairs:
        return None

    def median(key: str) -> str:
        values = [a[key] / b[key] for a, b in pairs if a.get(key) and b.get(key)]
        if not values:
            return "-"
        text = f"{statistics.median(values):.2f}x"
        if len(values) > 1:
            text += f" ({min(values):.2f}-{max(values):.2f})"
        return text

    where = f" median of {len(pairs)} rounds" if len(pairs) > 1 else ""
    return (
        f"  {name} runner/{base_client:<8} rows/s {median('rows_per_s')}"
        f"  run rows/s {median('run_rows_per_s')}  CPU/1k {median('cpu_s_per_1k')}"
        f"  peak RSS {median('peak_rss_mb')}{where}"
    )


def _git_state() -> dict[str, Any]:
    """The commit measured, and the runner files that differed from it (others edit too)."""

    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, timeout=10)
        return done.stdout.strip()

    try:
        return {"head": git("rev-parse", "HEAD"),
                "dirty": git("status", "--porcelain", "--", "runner").splitlines()}  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="W1,W2,W3,W4,W5,W6", help="comma-separated workloads")
    parser.add_argument("--quick", action="store_true", help="row counts / 10 (smoke run)")
    parser.add_argument("--w4-baselines", action="store_true", help="also run baselines on W4")
    parser.add_argument("--no-help-times", action="store_true", help="skip `runner --help` timing")
    parser.add_argument("--clients", default="runner,aiohttp,httpx2", help="clients to run")
    parser.add_argument("--out", type=Path, default=OUT / "results.json")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="run each workload's clients N rounds, in turns; ratios are medians over rounds",
    )
    parser.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help=f"skip the unrecorded {WARMUP_ROWS}-row run of each client before the first workload",
    )
    parser.add_argument(
        "--bytecode",
        action="store_true",
        help="let the children cache bytecode under bench/out/pycache (PYTHONPYCACHEPREFIX), "
        "as an installed package would have .pyc files, even if PYTHONDONTWRITEBYTECODE is set",
    )
    args = parser.parse_args()
    names = [n.strip().upper() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in WORKLOADS]
    if unknown:
        parser.error(f"unknown workload(s) {unknown}; choose from {sorted(WORKLOADS)}")
    clients = set(args.clients.split(","))
    if args.bytecode:  # inherited by the simulator and every client
        os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
        os.environ["PYTHONPYCACHEPREFIX"] = str(OUT / "pycache")
    HOOK_DIR.mkdir(parents=True, exist_ok=True)
    (HOOK_DIR / "sitecustomize.py").write_text(HOOK)
    # Client + simulator sockets, plus files; the simulator and the clients inherit the limit.
    nofile = raise_nofile(max(WORKLOADS[n].concurrency for n in names) * 2 + 256)
    log(f"RLIMIT_NOFILE soft {nofile['soft_before']} -> {nofile['soft']} (hard {nofile['hard']})")
    report: dict[str, Any] = {
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "argv": sys.argv[1:],
        "machine": {
            "cpus": os.cpu_count(),
            "taskset": shutil.which("taskset") is not None,
            "python": platform.python_version(),
            "nofile": nofile,
        },
        "git": _git_state(),
        "env": {k: os.environ.get(k) for k in ("PYTHONDONTWRITEBYTECODE", "PYTHONPYCACHEPREFIX")},
        "results": [],
    }
    warmed: set[str] = set()
    for name in names:
        w = WORKLOADS[name]
        if w.tls or w.sigma:
            log(
                f"--- {name}: simulator {w.config()}{' over TLS' if w.tls else ''} (core {SIM_CPU})"
            )
            started = configured_simulator(w.config(), _tls_files() if w.tls else None, cpu=SIM_CPU)
        else:
            log(f"--- {name}: simulator {' '.join(w.switches())} (core {SIM_CPU})")
            started = simulator(*w.switches(), cpu=SIM_CPU)
        if not w.tls:
            TLS.pop("ca", None)
        with started as base_url:
            runs = [(c, n) for c, n in plan(w, args.quick, args.w4_baselines) if c in clients]
            for client in dict.fromkeys(c for c, _ in runs if c not in warmed and args.warmup):
                # Unrecorded: loads the files into the page cache (and bytecode, if cached).
                run_client(client, w, WARMUP_ROWS, base_url, timeout_for(w, WARMUP_ROWS))
                warmed.add(client)
            for round_ in range(max(args.repeat, 1)):
                # In turns: the runner first in odd rounds, last in even ones, so that a
                # machine slowing down (or speeding up) does not favour one side.
                for client, rows in runs if round_ % 2 == 0 else runs[::-1]:
                    make_input(rows)  # built before the clock starts
                    r = run_client(client, w, rows, base_url, timeout_for(w, rows))
                    r["round"] = round_
                    report["results"].append(r)
                    args.out.parent.mkdir(parents=True, exist_ok=True)
                    args.out.write_text(json.dumps(report, indent=2))
    if not args.no_help_times:
        report["help_times"] = help_times()
    args.out.write_text(json.dumps(report, indent=2))
    print(table(report["results"]))
    runner_rows = [r for r in report["results"] if r["client"] == "runner"]
    if runner_rows:
        print("\nFrom `runner submit` to the first request sent:")
        for r in runner_rows:
            print(f"  {r['workload']} {r['rows']:>9,} rows: {_fmt(r['first_request_s'], '.3f')} s")
    if "help_times" in report:
        print("\n`runner --help` time (median of 5, after one warm-up):")
        for label, v in report["help_times"].items():
            print(f"  {label:<26} {v['median_s'] * 1000:6.0f} ms")
    print(f"\nraw figures: {args.out}")


if __name__ == "__main__":
    main()

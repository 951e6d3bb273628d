"""The driver of a Ray run: plan shards once, run each as a Ray task, resume what is left.

The one module that imports ray (runner/cluster/__init__.py `load_driver` imports it, so a
missing extra is a clear exit 2). `submit` and `resume` mirror runner/job.py's: the run's
folder, manifest and lock are the local runner's, with `shards.json` (the plan) and one
run folder per shard under `shards/<k>/` (runner/cluster/shard.py runs them). Each unsettled
shard is a task with fractional CPUs; a task lost with its worker or node is launched again
as the next attempt (the numbers are recorded in the manifest before each launch), so a
driver restarted after a crash never reuses one. Readers see the run as one: the manifest
holds the run's counts and state, and runner/state.py lists every shard's parts.

A local Ray (no ADDRESS) is started for the run: `ray.init(num_cpus=..., include_dashboard=
False)` with usage statistics off; `auto`, `host:port` or `ray://...` joins a cluster.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import ray
import ray.exceptions

from runner.cluster.budget import open_budget
from runner.cluster.shard import Pacing, ShardResult, ShardTask, run_shard
from runner.cluster.shards import ShardPlan, is_ray_run, plan_shards, read_plan, write_plan
from runner.engine.job import Outcome, Prepared, ProgressHook, SignalHook, SimulatorStarter
from runner.engine.plan import resumed_spec, session_settings, shown
from runner.errors import RunnerError, UsageError
from runner.output.schema import freeze, frozen_text
from runner.records import Progress
from runner.report.query import summary
from runner.spec import SIMULATOR, LoadedSpec, check_environment
from runner.store.objstore import open_store, write_bytes
from runner.store.state import (
    STORE_FILE,
    Counts,
    Manifest,
    RunDir,
    Session,
    _write_atomic,
    check_writable,
    current_attempt,
    input_fingerprint,
    resolve_run,
    utc_now,
    versions,
)

# Launches of one shard in a session before it is given up (the run stays resumable).
MAX_LAUNCHES = 4
TICK_S = 0.5
# Rows per shard when no count is given: minutes of work at usual rates, not seconds.
ROWS_PER_SHARD = 50_000
PacingFactory = Callable[[ShardTask], Pacing]


@dataclass(frozen=True, slots=True)
class RayOptions:
    """How a run uses Ray (`runner submit --ray [ADDRESS]`)."""

    address: str | None = None  # None: a local Ray started for the run
    shards: int | None = None  # None: one per ROWS_PER_SHARD rows, at least one per CPU
    store: str | None = None  # results on an object store (pyarrow.fs URI) instead of runs/
    num_cpus: int | None = None  # of a local Ray (None: the machine's)
    cpus_per_shard: float = 0.25
    # A cluster-wide limiter and budget (runner/cluster/shard.py `Pacing`); None: the key's
    # budget actor (runner/cluster/budget.py), whose per-minute limits count over a server
    # window of `rate_window_s`.
    pacing: PacingFactory | None = None
    rate_window_s: float = 60.0


@dataclass(slots=True)
class _Launch:
    shard: int
    attempt: int
    launches: int


@dataclass(slots=True)
class _Session:
    results: dict[int, ShardResult] = field(default_factory=dict)
    progress: dict[tuple[int, int], dict[str, Any]] = field(default_factory=dict)
    error: RunnerError | None = None
    stopping: bool = False


def _shard_main(task: ShardTask, board: Any, pacing: PacingFactory | None) -> ShardResult:
    """The Ray task: one attempt of one shard, in a worker process."""

    async def report(progress: Progress) -> bool:
        stop: bool = await board.update.remote((task.shard, task.attempt), counts_of(progress))
        return stop

    run = functools.partial(run_shard, task, pacing=pacing(task) if pacing else None, report=report)
    return anyio.run(run)


class _Board:
    """The shards' progress, and the driver's word to stop (a Ray actor, no CPU)."""

    def __init__(self) -> None:
        self.progress: dict[tuple[int, int], dict[str, Any]] = {}
        self.stopping = False

    def update(self, key: tuple[int, int], counts: dict[str, Any]) -> bool:
        self.progress[key] = counts
        return self.stopping

    def snapshot(self) -> dict[tuple[int, int], dict[str, Any]]:
        return self.progress

    def stop(self) -> None:
        self.stopping = True


def counts_of(progress: Progress) -> dict[str, Any]:
    found = asdict(progress)
    found.pop("started", None)
    return found


async def submit(
    prepared: Prepared,
    runs_dir: Path,
    options: RayOptions,
    *,
    on_start: Callable[[RunDir], None] | None = None,
    on_progress: ProgressHook | None = None,
    start_simulator: SimulatorStarter | None = None,
    handle_signals: bool = True,
    on_signal: SignalHook | None = None,
) -> Outcome:
    """Start a new run of a prepared job across a Ray cluster."""
    check_writable(runs_dir)
    store_uri = _check_store(options.store)
    run = RunDir.create(runs_dir, prepared.spec.job.name, prepared.spec.text)
    run.lock()
    try:
        rows = prepared.check.rows if prepared.check else None
        fingerprint = input_fingerprint(prepared.source.path, rows)
        count = options.shards or max(1, (rows or 0) // ROWS_PER_SHARD, os.cpu_count() or 1)
        plan = plan_shards(prepared.source, count, fingerprint)
        fingerprint["rows"] = plan.rows
        models = len(prepared.spec.job.request.models) if prepared.spec.job.request else 1
        manifest: Manifest = {
            "run_id": run.run_id,
            "job_name": prepared.spec.job.name,
            "spec_path": str(prepared.spec.path),
            "spec_hash": prepared.spec.hash,
            "input": fingerprint,
            "state": "running",
            "created_at": utc_now(),
            "versions": versions(),
            "counts": {"total": plan.rows * max(models, 1)},
            "sessions": [],
            "ray": {"shards": len(plan.ranges), "attempts": {}},
        }
        schema_hash = freeze(prepared.output, run.path)
        if schema_hash is not None:
            manifest["output_schema_sha256"] = schema_hash
        body = write_plan(run, plan)
        if store_uri is not None:
            uri = store_of(store_uri, run.run_id)
            manifest["ray"]["store"] = uri
            _write_atomic(run.path / STORE_FILE, f'{{"uri": "{uri}"}}\n'.encode())
            fs, base = open_store(uri)
            write_bytes(fs, f"{base}/shards.json", body)
            write_bytes(fs, f"{base}/job.toml", prepared.spec.text.encode())
        run.write_manifest(manifest)
        if on_start:
            on_start(run)
        return await _drive(
            run,
            manifest,
            prepared.spec,
            plan,
            options,
            retry_failed=False,
            on_progress=on_progress,
            start_simulator=start_simulator,
            handle_signals=handle_signals,
            on_signal=on_signal,
        )
    finally:
        run.unlock()


async def resume(
    ref: str,
    runs_dir: Path,
    options: RayOptions,
    *,
    retry_failed: bool = False,
    allow_changed_input: bool = False,
    budget_usd: float | None = None,
    spec_path: Path | None = None,
    on_start: Callable[[RunDir], None] | None = None,
    on_progress: ProgressHook | None = None,
    start_simulator: SimulatorStarter | None = None,
    handle_signals: bool = True,
    on_signal: SignalHook | None = None,
) -> Outcome:
    """Continue a Ray run: launch every shard that is not settled, as its next attempt."""
    run = resolve_run(ref, runs_dir)
    run.lock()
    try:
        manifest = run.read_manifest()
        if not is_ray_run(run) or "ray" not in manifest:
            raise UsageError(f"run {run.run_id} did not run on Ray: resume it without --ray")
        if options.store is not None:
            raise UsageError("--store is chosen at submit; a resume uses the run's own")
        alive = run.last_alive()
        spec = resumed_spec(run, manifest, spec_path)
        check_environment(spec)
        if budget_usd is not None:
            manifest["budget_usd"] = budget_usd
        if manifest.get("budget_usd") is not None:
            run_spec = spec.job.run.model_copy(update={"budget_usd": manifest["budget_usd"]})
            spec.job = spec.job.model_copy(update={"run": run_spec})
        plan = read_plan(run)
        old = plan.input
        now = input_fingerprint(spec.input_path, old.get("rows"))
        if any(now[k] != old.get(k) for k in ("size", "mtime", "hash")):
            hint = " (--allow-changed-input is for local runs)" if allow_changed_input else ""
            raise UsageError(
                f"{shown(spec.input_path)}: the input changed since run {run.run_id} "
                f"started; a Ray run's shards are row ranges of the input as it was{hint}"
            )
        _end_crashed_session(manifest, alive)
        if on_start:
            on_start(run)
        return await _drive(
            run,
            manifest,
            spec,
            plan,
            options,
            retry_failed=retry_failed,
            on_progress=on_progress,
            start_simulator=start_simulator,
            handle_signals=handle_signals,
            on_signal=on_signal,
        )
    finally:
        run.unlock()


def _check_store(store: str | None) -> str | None:
    """The store URI, checked to open (a clear exit 2 before anything is written)."""
    if store is None:
        return None
    open_store(store)
    return store


def store_of(store: str, run_id: str) -> str:
    """The run's own URI under a store URI (S3 options stay in the query string)."""
    where, _, query = store.partition("?")
    return f"{where.rstrip('/')}/{run_id}" + (f"?{query}" if query else "")


def _end_crashed_session(manifest: Manifest, alive: float | None) -> None:
    """The driver of the last session died (its manifest still says running)."""
    if manifest.get("state") != "running" or not manifest.get("sessions"):
        return
    crashed = manifest["sessions"][-1]
    crashed["outcome"] = "crashed"
    if not isinstance(crashed.get("ended_epoch"), int | float):
        ended = max(alive or 0.0, crashed.get("started_epoch") or 0.0)
        crashed["ended_epoch"] = ended
        crashed["ended_at"] = datetime.fromtimestamp(ended, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _shard_manifests(run: RunDir, shards: int) -> dict[int, dict[str, Any]]:
    """Each shard's manifest as last written (mirrored from the store first, if any)."""
    import json

    found: dict[int, dict[str, Any]] = {}
    for folder in run.result_folders()[1:]:
        with contextlib.suppress(OSError, ValueError):
            data = json.loads((folder / "manifest.json").read_text())
            if isinstance(data, dict) and int(folder.name) < shards:
                found[int(folder.name)] = data
    return found


def _settled(shard: dict[str, Any] | None, retry_failed: bool) -> bool:
    if shard is None or shard.get("state") != "completed":
        return False
    return not (retry_failed and (shard.get("counts") or {}).get("failed"))


def _done_before(shard: dict[str, Any] | None) -> int:
    counts = (shard or {}).get("counts") or {}
    return sum(int(counts.get(k) or 0) for k in ("ok", "failed", "skipped"))


@contextlib.contextmanager
def _ray_session(options: RayOptions) -> Iterator[None]:
    """Connect to the cluster (or start a local one) for the session; always disconnect."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # (load_driver set it before)
    if ray.is_initialized():
        yield  # the caller's own Ray session (the Python API, tests): theirs to end
        return
    quiet: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if options.address is None:
            ray.init(
                # A new local Ray for the run, even where RAY_ADDRESS or `ray start` would
                # have ray.init join another cluster (and then refuse num_cpus).
                address="local",
                num_cpus=options.num_cpus or os.cpu_count() or 1,
                include_dashboard=False,
                **quiet,
            )
        else:
            ray.init(address=options.address, **quiet)
    except (ConnectionError, ValueError, RuntimeError) as exc:
        target = options.address or "a local Ray"
        raise UsageError(f"--ray: cannot start or reach {target} ({exc})") from None
    try:
        yield
    finally:
        ray.shutdown()


async def _drive(
    run: RunDir,
    manifest: Manifest,
    spec: LoadedSpec,
    plan: ShardPlan,
    options: RayOptions,
    *,
    retry_failed: bool,
    on_progress: ProgressHook | None,
    start_simulator: SimulatorStarter | None,
    handle_signals: bool,
    on_signal: SignalHook | None,
) -> Outcome:
    job = spec.job
    models = job.request.models if job.request is not None else []
    per_row = max(len(models), 1)
    session: Session = {
        "started_at": utc_now(),
        "started_epoch": time.time(),
        "pid": os.getpid(),
        "settings": session_settings(spec, manifest.get("spec_file", "job.toml")),
        "ray": {"address": options.address or "local"},
    }
    manifest.setdefault("sessions", []).append(session)
    manifest["state"] = "running"
    _write_manifest(run, manifest)
    shards = len(plan.ranges)
    before = _shard_manifests(run, shards)
    todo = [k for k in range(shards) if not _settled(before.get(k), retry_failed)]
    settled_before = sum(_done_before(m) for m in before.values())
    if len(manifest["sessions"]) > 1:
        # A crashed session left shard manifests behind their parts: count the parts.
        found = summary(run)
        settled_before = found["ok"] + found["skipped"] + (0 if retry_failed else found["failed"])
    total = plan.rows * per_row
    progress = Progress(rows_total=total, rows_done_before=settled_before)
    state = _Session()
    started = time.monotonic()
    if job.endpoint.base_url == SIMULATOR and todo:
        if start_simulator is None:
            raise UsageError("base_url = 'simulator' needs the CLI (or a simulator starter)")
        simulator: AbstractContextManager[str | None] = start_simulator(
            dict(job.endpoint.simulator)
        )
    else:
        simulator = nullcontext(None)
    stop_reason: str | None = None
    schema_text = frozen_text(
        run.path,
        manifest.get("output_schema_sha256"),
        spec,
        given=False,
        run_id=run.run_id,
    )
    try:
        with simulator as base_url, _ray_session(options) if todo else nullcontext():
            if todo:  # (a run whose shards are all settled needs no cluster)
                board: Any = ray.remote(num_cpus=0)(_Board).remote()
                remote = ray.remote(_shard_main).options(
                    num_cpus=options.cpus_per_shard, max_retries=0
                )
                pacing = options.pacing or open_budget(
                    run.run_id,
                    job.endpoint.api_key_env,
                    job.run,
                    spent_usd={
                        str(k): float(m.get("budget_spent_usd") or 0.0) for k, m in before.items()
                    },
                    window_s=options.rate_window_s,
                    session=str(session["started_epoch"]),
                )

                def launch(k: int, launches: int) -> tuple[Any, _Launch]:
                    attempt = _next_attempt(run, manifest, k)
                    task = ShardTask(
                        run_id=run.run_id,
                        job_name=job.name,
                        input=manifest["input"],
                        run_path=str(run.path.resolve()),
                        shard=k,
                        attempt=attempt,
                        rows=plan.ranges[k],
                        share=plan.share(k),
                        spec_text=spec.text,
                        schema_text=schema_text,
                        spec_path=str(spec.path),
                        base_url=base_url,
                        store=manifest["ray"].get("store"),
                        retry_failed=retry_failed,
                    )
                    return remote.remote(task, board, pacing), _Launch(k, attempt, launches)

                pending = dict(launch(k, 1) for k in todo)
                _write_manifest(run, manifest)  # the attempts just numbered
                async with anyio.create_task_group() as tg:
                    if handle_signals:
                        tg.start_soon(
                            _watch_signals, board, pending, state, job.run.grace_s, on_signal
                        )
                    while pending:
                        ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=0)
                        for ref in ready:
                            done = pending.pop(ref)
                            again = _collect(ref, done, state)
                            if again and not state.stopping and state.error is None:
                                if done.launches < MAX_LAUNCHES:
                                    new_ref, new = launch(done.shard, done.launches + 1)
                                    pending[new_ref] = new
                                    _write_manifest(run, manifest)
                                else:
                                    stop_reason = f"shard {done.shard} lost {MAX_LAUNCHES} times"
                        if state.error is not None and not state.stopping:
                            state.stopping = True
                            board.stop.remote()
                        snapshot = await board.snapshot.remote()
                        _sum_progress(progress, {**snapshot, **state.progress})
                        if on_progress:
                            on_progress(progress)
                        if pending:
                            await anyio.sleep(TICK_S)
                    tg.cancel_scope.cancel()
                snapshot = await board.snapshot.remote()
                _sum_progress(progress, {**snapshot, **state.progress})
    except BaseException:
        stop_reason = stop_reason or "cancelled"
        raise
    finally:
        final_state = _finish(run, manifest, session, plan, per_row, state, stop_reason)
        if on_progress:
            on_progress(progress)
    if state.error is not None:
        raise state.error
    stop_reason = stop_reason or next(
        (r.stop_reason for r in state.results.values() if r.stop_reason), None
    )
    if state.stopping and final_state != "completed":
        stop_reason = stop_reason or "interrupted"
    from runner.report.pricing import PriceSource, parse_price_table

    prices = PriceSource(parse_price_table(job.prices, path=str(spec.path)))
    return Outcome(
        run,
        final_state,
        progress,
        time.monotonic() - started,
        settled_before,
        stop_reason,
        models=list(models),
        input_rows=plan.rows,
        cost_usd=manifest.get("cost_usd"),
        prices={
            m: (price.provenance if (price := prices.price(m)) else "unpriced") for m in models
        },
        on_ray=True,
    )


def _next_attempt(run: RunDir, manifest: Manifest, shard: int) -> int:
    """One more than any attempt of the shard launched or seen; recorded in the manifest."""
    attempts = manifest["ray"].setdefault("attempts", {})
    seen = current_attempt(run.path / "shards" / str(shard))
    attempt = max(int(attempts.get(str(shard), 0)), seen[0] if seen else 0) + 1
    attempts[str(shard)] = attempt
    return attempt


def _collect(ref: Any, launch: _Launch, state: _Session) -> bool:
    """Take a finished task's result; True when the shard must be launched again."""
    try:
        result: ShardResult = ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, RunnerError):
            state.error = state.error or cause
            return False
        raise
    except ray.exceptions.TaskCancelledError:
        return False
    except ray.exceptions.RayError:
        return True  # the worker, its node or its raylet died: the next attempt goes on
    if result.state == "locked":
        return True
    state.results[launch.shard] = result
    if result.progress:
        state.progress[(launch.shard, launch.attempt)] = result.progress
    return False


def _sum_progress(progress: Progress, snapshot: dict[tuple[int, int], dict[str, Any]]) -> None:
    """The session's progress: every attempt's own counts, added up."""
    for name in ("ok", "failed", "skipped", "reused", "retrying", "in_flight", "requests"):
        setattr(progress, name, sum(int(p.get(name) or 0) for p in snapshot.values()))
    progress.prompt_tokens = sum(int(p.get("prompt_tokens") or 0) for p in snapshot.values())
    progress.completion_tokens = sum(
        int(p.get("completion_tokens") or 0) for p in snapshot.values()
    )
    costs = [p.get("cost_usd") for p in snapshot.values()]
    progress.cost_usd = None if any(c is None for c in costs) else sum(costs)  # type: ignore[arg-type]


def _finish(
    run: RunDir,
    manifest: Manifest,
    session: Session,
    plan: ShardPlan,
    per_row: int,
    state: _Session,
    stop_reason: str | None,
) -> str:
    """The run's manifest from its shards' (counts, cost, state); returns the state."""
    shards = _shard_manifests(run, len(plan.ranges))
    counts: Counts = {
        "total": plan.rows * per_row,
        "ok": 0,
        "failed": 0,
        "skipped": 0,
        "requests": 0,
    }
    cost: float | None = 0.0
    spent = 0.0
    for data in shards.values():
        found = data.get("counts") or {}
        counts["ok"] += int(found.get("ok") or 0)
        counts["failed"] += int(found.get("failed") or 0)
        counts["skipped"] += int(found.get("skipped") or 0)
        counts["requests"] += int(found.get("requests") or 0)
        shard_cost = data.get("cost_usd")
        cost = None if cost is None or shard_cost is None else cost + float(shard_cost)
        spent += float(data.get("budget_spent_usd") or 0.0)
    complete = (
        len(shards) == len(plan.ranges)
        and all(m.get("state") == "completed" for m in shards.values())
        and state.error is None
        and stop_reason is None
    )
    # Bad input found by a shard stops the run (exit 2, resumable once fixed), as locally;
    # any other error is a failure.
    failed = state.error is not None and not isinstance(state.error, UsageError)
    manifest["state"] = "failed" if failed else "completed" if complete else "stopped"
    manifest["counts"] = counts
    manifest["cost_usd"] = None if cost is None else round(cost, 6)
    manifest["budget_spent_usd"] = spent
    if state.error is not None:
        manifest["error"] = str(state.error)
    else:
        manifest.pop("error", None)
    session["ended_at"] = utc_now()
    session["ended_epoch"] = time.time()
    session["outcome"] = manifest["state"]
    session["stop_reason"] = stop_reason
    session.setdefault("ray", {})["shards"] = {
        str(k): r.state for k, r in sorted(state.results.items())
    }
    _write_manifest(run, manifest)
    return str(manifest["state"])


def _write_manifest(run: RunDir, manifest: Manifest) -> None:
    run.write_manifest(manifest)
    uri = manifest.get("ray", {}).get("store")
    if uri:
        fs, base = open_store(uri)
        write_bytes(fs, f"{base}/manifest.json", run.manifest_path.read_bytes())


async def _watch_signals(
    board: Any,
    pending: dict[Any, _Launch],
    state: _Session,
    grace_s: float,
    on_signal: SignalHook | None,
) -> None:
    """First SIGINT/SIGTERM: every shard drains (grace_s); second: cancel every task."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            if on_signal:
                on_signal(not state.stopping, grace_s)
            if state.stopping:
                for ref in list(pending):
                    ray.cancel(ref, force=True)
                return
            state.stopping = True
            board.stop.remote()

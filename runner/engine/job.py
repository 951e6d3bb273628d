"""A run from start to end: submit and resume, wiring spec, source, pool, sink and state.

The library entry points the CLI calls (async; only `cli` starts the event loop). Owns the
run's life cycle: validate before spending, create or reopen the run folder under its lock,
feed only unsettled rows, handle SIGINT/SIGTERM (drain, then stop), and always leave the
folder consistent (shielded, time-bounded cleanup). Knows nothing of terminals or argv.
What it runs was made ready by runner/engine/plan.py (`prepare`, re-exported here with `estimate`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import anyio
import anyio.from_thread
import anyio.lowlevel
from anyio.lowlevel import EventLoopToken

from runner.engine.limiter import Limiter, Limiters
from runner.engine.plan import (
    Estimate,
    Prepared,
    estimate,
    prepare,
    prepare_loaded,
    resumed_spec,
    session_settings,
    shown,
)
from runner.engine.pool import Pool
from runner.errors import (
    EXIT_FAILED_ROWS,
    EXIT_OK,
    EXIT_STOPPED,
    AuthFailed,
    InputError,
    Interrupted,
    ModelRefused,
    RunStopped,
    StorageFailed,
    UsageError,
    primary,
)
from runner.http.client import ChatClient, Secret
from runner.http.retry import RetryPolicy
from runner.input.source import RequestBuilder, Skip, check_input
from runner.output.schema import freeze, frozen_text
from runner.records import Progress, WorkItem
from runner.report.pricing import ATTO, Budget, PriceSource, spent_before
from runner.spec import SIMULATOR, RunSpec, check_environment
from runner.store.sink import RunSink, reasked_rows
from runner.store.starts import StartLog
from runner.store.state import (
    SHARD_PLAN,
    Manifest,
    RunDir,
    Session,
    Settled,
    check_writable,
    input_fingerprint,
    manifest_says_nothing_sent,
    resolve_run,
    row_keys_stamp,
    utc_now,
    versions,
)

# Rows per Parquet part: large enough for fast scans, small enough to keep memory flat.
PART_ROWS = 10_000
TICK_S = 0.25
SimulatorStarter = Callable[[dict[str, Any]], AbstractContextManager[str]]
ProgressHook = Callable[[Progress], None]
SignalHook = Callable[[bool, float], None]  # (first signal?, grace seconds)


@dataclass(slots=True)
class Outcome:
    """How a session of a run ended."""

    run: RunDir
    state: str  # completed | stopped
    progress: Progress
    wall_s: float
    settled_before: int
    stop_reason: str | None = None
    # The endpoint refused or could not be reached (or did not know the model): a fix to
    # [endpoint] goes in with `runner resume RUN --spec FILE`.
    stopped_by_endpoint: bool = False
    refused_model: str | None = None  # the model the server said it does not know
    models: list[str] = field(default_factory=list)
    input_rows: int | None = None  # rows of the input file, when known
    cost_usd: float | None = None  # over all sessions (None: some cost is unknown)
    prices: dict[str, str] = field(default_factory=dict)  # model -> price provenance
    on_ray: bool = False  # a Ray run (runner/cluster): its results are under shards/

    @property
    def exit_code(self) -> int:
        if self.state != "completed":
            return EXIT_STOPPED
        return EXIT_FAILED_ROWS if self.progress.failed or self.progress.invalid else EXIT_OK


@dataclass(slots=True)
class SessionHooks:
    """What a session swaps in when it is not a whole run on this machine (a shard of a Ray
    run, runner/cluster); each left None keeps the local runner's own.

    `limiters`: the pacing (RPM/TPM, concurrency) the pool waits on; `budget`: makes the
    Spender from (prices, the session's limit in USD, what earlier sessions spent);
    `sink`: makes the sink from (run folder, first segment number); `background`: tasks
    run beside the pool (given it, e.g. to stop it) and cancelled when it ends.
    """

    limiters: Limiters | None = None
    budget: Callable[[PriceSource, float | None, float], Budget] | None = None
    sink: Callable[[RunDir, int], RunSink] | None = None
    background: Sequence[Callable[[Pool], Coroutine[Any, Any, None]]] = ()


def _limiters(run: RunSpec) -> Limiters:
    def make(rpm: float | None, tpm: float | None, concurrency: int) -> Limiter:
        return Limiter(
            requests_per_minute=rpm,
            tokens_per_minute=tpm,
            concurrency=concurrency,
            adaptive=run.adaptive_concurrency,
        )

    default = make(run.requests_per_minute, run.tokens_per_minute, run.concurrency)
    per_model = {
        model: make(
            limits.requests_per_minute,
            limits.tokens_per_minute,
            min(limits.concurrency or run.concurrency, run.concurrency),
        )
        for model, limits in run.limits.items()
    }
    return Limiters(default, per_model)


async def submit(
    prepared: Prepared,
    runs_dir: Path,
    *,
    on_start: Callable[[RunDir], None] | None = None,
    on_progress: ProgressHook | None = None,
    start_simulator: SimulatorStarter | None = None,
    handle_signals: bool = True,
    on_signal: SignalHook | None = None,
    stop_switch: StopSwitch | None = None,
    run: RunDir | None = None,
) -> Outcome:
    """Start a new run of a prepared job.

    `run`: a run folder made for this job beforehand (RunDir.create with the spec's text),
    for an input that must live in the run's own folder (the Python API's DataFrames).
    """
    if run is None:
        check_writable(runs_dir)
        run = RunDir.create(runs_dir, prepared.spec.job.name, prepared.spec.text)
    run.lock()
    try:
        rows = prepared.check.rows if prepared.check else prepared.source.row_count_hint()
        manifest: Manifest = {
            "run_id": run.run_id,
            "job_name": prepared.spec.job.name,
            "spec_path": str(prepared.spec.path),
            "spec_hash": prepared.spec.hash,
            "input": input_fingerprint(prepared.source.path, rows),
            "state": "running",
            "created_at": utc_now(),
            "versions": versions(),
            "counts": {},
            "sessions": [],
        }
        schema_hash = freeze(prepared.output, run.path)
        if schema_hash is not None:
            manifest["output_schema_sha256"] = schema_hash
        if prepared.check_alongside:
            manifest["input_check"] = "pending"  # a resume checks the input if never finished
        run.write_manifest(manifest)
        if on_start:
            on_start(run)
        return await _execute(
            run,
            manifest,
            prepared,
            Settled.nothing(),
            1,
            on_progress,
            start_simulator,
            handle_signals,
            on_signal,
            stop_switch,
        )
    except UsageError:
        # Bad input or spec found before the first request: nothing was paid, so no run is
        # left for the job name to mean (a later fix of the input is a new submit).
        if manifest_says_nothing_sent(run):
            run.unlock()
            run.discard()
        raise
    finally:
        run.unlock()


async def resume(
    ref: str,
    runs_dir: Path,
    *,
    retry_failed: bool = False,
    allow_changed_input: bool = False,
    on_start: Callable[[RunDir], None] | None = None,
    on_progress: ProgressHook | None = None,
    start_simulator: SimulatorStarter | None = None,
    handle_signals: bool = True,
    budget_usd: float | None = None,
    spec_path: Path | None = None,
    on_signal: SignalHook | None = None,
    stop_switch: StopSwitch | None = None,
) -> Outcome:
    """Continue a run: send only what no earlier session settled.

    `budget_usd` replaces the spec's run.budget_usd (the total for the run, all sessions).
    `spec_path` is an edited copy of the job's spec whose endpoint, [run] and [prices]
    settings this session and later ones use; a change to what is sent is refused.
    """
    run = resolve_run(ref, runs_dir)
    if (run.path / SHARD_PLAN).exists():
        raise UsageError(f"run {run.run_id} ran on Ray: resume it with --ray [ADDRESS]")
    run.lock()
    try:
        manifest = run.read_manifest()
        alive = run.last_alive()  # before recovery rewrites files: when a crash left off
        spec = resumed_spec(run, manifest, spec_path)
        check_environment(spec)
        schema_text = frozen_text(
            run.path,
            manifest.get("output_schema_sha256"),
            spec,
            given=spec_path is not None,
            run_id=run.run_id,
        )
        if budget_usd is not None:
            manifest["budget_usd"] = budget_usd
        if manifest.get("budget_usd") is not None:
            run_spec = spec.job.run.model_copy(update={"budget_usd": manifest["budget_usd"]})
            spec.job = spec.job.model_copy(update={"run": run_spec})
        old = manifest.get("input", {})
        now = input_fingerprint(spec.input_path, old.get("rows"))
        changed = any(now[k] != old.get(k) for k in ("size", "mtime", "hash"))
        if changed and not allow_changed_input:
            raise UsageError(
                f"{shown(spec.input_path)}: the input changed since run "
                f"{run.run_id} started; rerun with --allow-changed-input to send only rows "
                "whose request changed"
            )
        # Once the input has changed, a row is known by its key, never by its position:
        # row_keys.parquet lists the current rows' keys, made from the input as it is now.
        by_key = changed or run.row_keys_path.exists()
        if by_key and (changed or not run.row_keys_fresh(now)):
            prepared = prepare_loaded(spec, False, schema_text=schema_text)
            prepared.check = check_input(
                prepared.source,
                prepared.builder,
                keys_to=run.row_keys_path,
                keys_metadata=row_keys_stamp(now),
            )
        else:
            # An unchanged input was checked whole when the run was submitted (unless that
            # session ended before its check did).
            unchecked = manifest.get("input_check") == "pending"
            prepared = prepare_loaded(spec, None if unchecked else False, schema_text=schema_text)
        if prepared.check is not None:
            manifest.pop("input_check", None)
        if changed:
            manifest["input"] = {**now, "rows": prepared.check.rows if prepared.check else None}
        next_segment = run.recover()
        note_crash(run, manifest, alive)
        repeated = prepared.check.repeated if prepared.check else run.read_repeated()
        if prepared.check is not None:
            run.write_repeated(prepared.check.repeated)
        if by_key:
            settled = run.settled(retry_failed=retry_failed, by_request=True)
            # Answers are content-addressed: an unchanged request whose row moved (or whose
            # twin's row was edited) takes the answer already bought for it. Every request is
            # tracked for reuse (no set of the repeated ones: it would copy ok_hashes).
            settled.reusable = None
        else:
            settled = run.settled(retry_failed=retry_failed, reusable=repeated)
        if on_start:
            on_start(run)
        return await _execute(
            run,
            manifest,
            prepared,
            settled,
            next_segment,
            on_progress,
            start_simulator,
            handle_signals,
            on_signal,
            stop_switch,
        )
    finally:
        run.unlock()


def note_crash(run: RunDir, manifest: Manifest, alive: float | None) -> None:
    """When the last session crashed (its manifest still says running), count what it had on
    the wire and never heard back, and end it at its last trace on disk (`alive`, taken
    before recovery; not now: wall time is the real span). Call after `run.recover()`."""
    if manifest.get("state") != "running" or not manifest.get("sessions"):
        return
    crashed = manifest["sessions"][-1]
    unanswered = run.unanswered_requests(since=crashed.get("started_epoch"))
    crashed["unanswered_at_crash"] = len(unanswered)
    # Possibly billed without a record: the budget counts them at their worst case.
    crashed["unanswered_worst_usd"] = sum(unanswered.values())
    crashed["outcome"] = "crashed"
    if not isinstance(crashed.get("ended_epoch"), int | float):
        ended = max(alive or 0.0, crashed.get("started_epoch") or 0.0)
        crashed["ended_epoch"] = ended
        crashed["ended_at"] = datetime.fromtimestamp(ended, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _unanswered_worst(manifest: Manifest) -> float:
    """The worst case of every request crashed sessions had on the wire without a record."""
    total = 0.0
    for session in manifest.get("sessions", []):
        worst = session.get("unanswered_worst_usd") if isinstance(session, dict) else None
        if isinstance(worst, int | float) and worst > 0:
            total += float(worst)
    return total


def _all_priced(prepared: Prepared) -> bool:
    request = prepared.spec.job.request
    return request is not None and all(prepared.prices.price(m) is not None for m in request.models)


def _items(prepared: Prepared, settled: Settled) -> Iterator[WorkItem | Skip]:
    source, builder = prepared.source, prepared.builder
    if settled.count == 0:
        for row in source.rows():
            yield from builder.build(row)
        return
    models = builder.models
    for row in source.rows():
        # Matching by position skips settled rows without building their requests.
        if (
            settled.keys is None
            and models
            and all(settled.done(row.index, m, "", "") for m in models)
        ):
            continue
        for item in builder.build(row):
            digest = item.request_hash if isinstance(item, WorkItem) else ""
            if not settled.done(item.row_index, item.model, item.row_id, digest):
                yield item


async def _execute(
    run: RunDir,
    manifest: Manifest,
    prepared: Prepared,
    settled: Settled,
    next_segment: int,
    on_progress: ProgressHook | None,
    start_simulator: SimulatorStarter | None,
    handle_signals: bool,
    on_signal: SignalHook | None = None,
    stop_switch: StopSwitch | None = None,
    hooks: SessionHooks | None = None,
) -> Outcome:
    hooks = hooks or SessionHooks()
    job = prepared.spec.job
    endpoint = job.endpoint
    total = None
    models = max(len(job.request.models) if job.request else 1, 1)
    if prepared.check is not None:
        total = prepared.check.items + prepared.check.skipped
        manifest.setdefault("counts", {})["total"] = total
    elif (hint := prepared.source.row_count_hint()) is not None:
        total = hint * models
    elif (known := manifest.get("counts", {}).get("total")) is not None:
        total = known
    progress = Progress(rows_total=total, rows_done_before=settled.count)
    session: Session = {
        "started_at": utc_now(),
        "started_epoch": time.time(),
        "pid": os.getpid(),
        "settings": session_settings(prepared.spec, manifest.get("spec_file", "job.toml")),
    }
    manifest.setdefault("sessions", []).append(session)
    manifest["state"] = "running"
    run.write_manifest(manifest)
    run.clear_sending()  # a crash's count is in the manifest now (resume): start afresh

    key = os.environ.get(endpoint.api_key_env) if endpoint.api_key_env else None
    if endpoint.base_url == SIMULATOR:
        if start_simulator is None:
            raise UsageError("base_url = 'simulator' needs the CLI (or a simulator starter)")
        simulator: AbstractContextManager[str] = start_simulator(dict(endpoint.simulator))
    else:
        simulator = nullcontext(endpoint.base_url)

    if hooks.sink is not None:
        sink = hooks.sink(run, next_segment)
    else:
        sink = RunSink(
            run.journal_dir, run.parts_dir, next_number=next_segment, part_rows=PART_ROWS
        )
    start_log = run.start_log()
    started = time.monotonic()
    stop_reason: str | None = None
    by_endpoint = False
    refused: str | None = None
    error: str | None = None
    pool: Pool | None = None
    budget: Budget | None = None
    checker: _Checker | None = None
    try:
        with simulator as base_url:
            client = ChatClient(
                base_url=base_url,
                api_key=Secret(key) if key else None,
                timeout_s=endpoint.timeout_s,
                connect_timeout_s=endpoint.connect_timeout_s,
                concurrency=job.run.concurrency,
                headers=endpoint.headers,
                max_response_bytes=endpoint.max_response_bytes,
                ca_bundle=str(ca) if (ca := prepared.spec.ca_bundle) is not None else None,
            )
            policy = RetryPolicy(
                max_attempts=job.run.max_attempts,
                deadline_s=job.run.row_deadline_s,
                base_delay_s=job.run.backoff_base_s,
                max_delay_s=job.run.backoff_max_s,
                max_retry_after_s=job.run.max_retry_after_s,
            )
            limiters = hooks.limiters or _limiters(job.run)
            prices = prepared.prices
            # Answers of unknown usage count at their worst case (journaled with each record
            # as charged_usd), and so do requests a crashed session had on the wire without
            # a record (they may have been billed): a kill -9 forgets nothing. A clean
            # session's own figure includes all of these.
            spent_usd = max(
                spent_before(
                    prices,
                    {m: (int(u[0]), int(u[1]), int(u[2]), u[3]) for m, u in settled.usage.items()},
                )
                + _unanswered_worst(manifest),
                float(manifest.get("budget_spent_usd") or 0.0),
            )
            make_budget = hooks.budget or _budget
            budget = make_budget(prices, job.run.budget_usd, spent_usd)
            progress.cost_usd = 0.0 if _all_priced(prepared) else None
            progress.concurrency = limiters.default.concurrency_limit
            pool = Pool(
                client=client,
                policy=policy,
                limiters=limiters,
                spender=budget,
                sink=sink,
                progress=progress,
                concurrency=job.run.concurrency,
                retry_finish_reasons=job.run.retry_finish_reasons,
                startup_failures_to_stop=job.run.auth_failures_to_stop,
                answered=settled.ok_hashes,
                repeated=(
                    prepared.check.repeated
                    if prepared.check is not None and settled.keys is None
                    else settled.reusable
                ),
                start_log=start_log,
                output=prepared.output,
                reasked=(
                    reasked_rows(run.parts_dir, run.journal_dir)
                    if prepared.output is not None and next_segment > 1
                    else None
                ),
            )
            if prepared.check_alongside:
                checker = _Checker(prepared, pool, progress, run, manifest)
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(_tick, sink, progress, on_progress, limiters, start_log, pool)
                    tg.start_soon(sink.compactor)
                    if stop_switch is not None:
                        tg.start_soon(_watch_stops, stop_switch, pool, job.run.grace_s, on_signal)
                    elif handle_signals:
                        tg.start_soon(_watch_signals, pool, job.run.grace_s, on_signal)
                    if checker is not None:
                        tg.start_soon(checker.run)
                    for task in hooks.background:
                        tg.start_soon(task, pool)
                    await pool.run(_items(prepared, settled))
                    if checker is not None and not pool.stopping:
                        await checker.done.wait()  # the run is complete once its input passed
                    tg.cancel_scope.cancel()
                stop_reason = pool.stop_reason
            except BaseExceptionGroup as group:
                raise primary(group) from None
            finally:
                await client.aclose()
    except RunStopped as exc:
        # A stop (auth, quota, disk, signal) is an outcome, not a crash: the run is resumable.
        stop_reason = str(exc)
        by_endpoint = isinstance(exc, AuthFailed)
        refused = exc.model if isinstance(exc, ModelRefused) else None
    except UsageError as exc:
        stop_reason = str(exc)  # bad input found on the way (exit 2): a stop
        raise
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}".splitlines()[0]  # exit 4: the run failed
        raise
    except BaseException:
        stop_reason = stop_reason or "cancelled"  # never "completed" on the way out
        raise
    finally:
        start_log.close()
        if budget is not None:
            # Still reserved: rows cut by a hard stop (grace_s over, a second Ctrl-C), whose
            # requests may have been billed without a record. They count at their worst case.
            manifest["budget_spent_usd"] = (budget.spent_units + budget.reserved_units) / ATTO
        with anyio.CancelScope(shield=True):
            stop_reason = await _finish(
                run, manifest, session, sink, progress, settled, stop_reason, pool, error
            )
        if on_progress:
            on_progress(progress)
    if checker is not None and checker.error is not None:
        raise checker.error  # exit 2, naming the file and line; what was answered is kept
    state = manifest["state"]
    if pool is not None and pool.stopping and state != "completed":
        stop_reason = stop_reason or "interrupted"
    names = job.request.models if job.request is not None else []
    return Outcome(
        run,
        state,
        progress,
        time.monotonic() - started,
        settled.count,
        stop_reason,
        by_endpoint,
        refused_model=refused,
        models=names,
        input_rows=manifest.get("input", {}).get("rows"),
        cost_usd=manifest.get("cost_usd"),
        prices={
            m: (price.provenance if (price := prepared.prices.price(m)) else "unpriced")
            for m in names
        },
    )


def _budget(prices: PriceSource, limit_usd: float | None, spent_usd: float) -> Budget:
    return Budget(prices, limit_usd=limit_usd, spent_usd=spent_usd)


async def run_session(
    run: RunDir,
    manifest: Manifest,
    prepared: Prepared,
    settled: Settled,
    next_segment: int,
    hooks: SessionHooks,
    *,
    on_progress: ProgressHook | None = None,
) -> Outcome:
    """One session of a run folder whose lock the caller holds, recovered and with its
    settled work known (a shard of a Ray run): the same pipeline as submit and resume,
    without signal handling (the caller stops it through a background hook)."""
    return await _execute(
        run,
        manifest,
        prepared,
        settled,
        next_segment,
        on_progress,
        None,
        False,
        None,
        None,
        hooks,
    )


class _Checker:
    """The whole-file input check, in a worker thread while the first requests go out.

    Checking 1,000,000 rows takes ~5 s; the first request waits for none of it. What the
    check finds takes effect when it ends: a bad row or a repeated id stops the run (exit 2,
    the answers so far kept); otherwise the run learns its size and which requests repeat,
    and the pool stops tracking the others for reuse.
    """

    def __init__(
        self,
        prepared: Prepared,
        pool: Pool,
        progress: Progress,
        run: RunDir,
        manifest: Manifest,
    ) -> None:
        self.prepared = prepared
        self.pool = pool
        self.progress = progress
        self.run_dir = run
        self.manifest = manifest
        self.error: InputError | None = None
        self.done = anyio.Event()

    async def run(self) -> None:
        prepared = self.prepared
        # A builder of its own: the pool's builds requests in the event loop meanwhile.
        builder = RequestBuilder(prepared.spec.job, prepared.source)
        # Not before every worker has started: on a small machine the check's thread takes
        # its share of the CPU, and during the first wave that share delayed every first
        # request (W2 of bench/run.py: 256 first requests were out at ~70 ms, now ~35 ms).
        await self.pool.started.wait()
        try:
            check = await anyio.to_thread.run_sync(
                check_input, prepared.source, builder, abandon_on_cancel=True
            )
        except InputError as exc:
            self.error = exc
            self.pool.stop()
        else:
            self.progress.rows_total = check.items + check.skipped
            self.manifest.setdefault("counts", {})["total"] = self.progress.rows_total
            self.manifest["input"]["rows"] = check.rows
            self.run_dir.write_repeated(check.repeated)
            self.manifest.pop("input_check", None)
            self.pool.narrow_reuse(check.repeated)
        finally:
            self.done.set()


async def _finish(
    run: RunDir,
    manifest: Manifest,
    session: Session,
    sink: RunSink,
    progress: Progress,
    settled: Settled,
    stop_reason: str | None,
    pool: Pool | None,
    error: str | None = None,
) -> str | None:
    """Make every answer durable and record how the session ended; bounded in time.

    The state written is `failed` (an internal error: `error`, its one line, is kept),
    `completed`, or `stopped`; `running` stays only when the process dies before this runs
    (readers then show `interrupted`, see state.run_state). Returns the stop reason, which a
    storage failure here may set: whatever was journaled stays in the journal and the next
    resume compacts it.
    """
    try:
        with anyio.move_on_after(60):
            await sink.close()
        run.clear_sending()  # everything sent got an answer or was cut: none is in doubt
    except StorageFailed as exc:
        stop_reason = stop_reason or str(exc)
    pending = None
    if progress.rows_total is not None:
        pending = progress.rows_total - progress.rows_done_before - progress.done - progress.skipped
    interrupted = pool is not None and pool.stopping
    complete = (
        error is None
        and stop_reason is None
        and not interrupted
        and (pending is None or pending <= 0)
    )
    manifest["state"] = "failed" if error else "completed" if complete else "stopped"
    if error:
        manifest["error"] = error
    else:
        manifest.pop("error", None)
    sent = pool.sent if pool is not None else 0
    if sent == 0 and not complete and len(manifest.get("sessions", [])) == 1:
        # Nothing was sent, so nothing was paid: a job name no longer means this run.
        manifest["nothing_sent"] = True
    else:
        manifest.pop("nothing_sent", None)
    if complete and progress.rows_total is None:
        # An unchecked input's size is known once every row went through.
        progress.rows_total = progress.rows_done_before + progress.done + progress.skipped
    # Cost so far at the prices in force (None once any part of it is unknown).
    before: float | None = (
        manifest.get("cost_usd", 0.0) if len(manifest.get("sessions", [])) > 1 else 0.0
    )
    now = progress.cost_usd
    manifest["cost_usd"] = None if before is None or now is None else round(before + now, 6)
    manifest["counts"] = {
        "total": progress.rows_total,
        "ok": settled.ok + progress.ok,
        # Rows `invalid` (answers that failed the schema) count as failed here.
        "failed": (0 if settled.retry_failed else settled.failed)
        + progress.failed
        + progress.invalid,
        "skipped": settled.skipped + progress.skipped,
        "requests": manifest.get("counts", {}).get("requests", 0) + progress.requests,
    }
    session["ended_at"] = utc_now()
    session["ended_epoch"] = time.time()
    session["outcome"] = manifest["state"]
    session["stop_reason"] = stop_reason or ("interrupted" if interrupted else None)
    session["requests_started"] = sent
    session["ok"] = progress.ok
    session["failed"] = progress.failed
    session["requests"] = progress.requests
    try:
        run.write_manifest(manifest)
    except StorageFailed as exc:
        stop_reason = stop_reason or str(exc)
    return stop_reason


async def _tick(
    sink: RunSink,
    progress: Progress,
    on_progress: ProgressHook | None,
    limiters: Limiters,
    start_log: StartLog,
    pool: Pool,
) -> None:
    """Commit the journal, shrink the start log to what is not journaled yet and report
    progress, at a fixed rate (never per row)."""
    while True:
        await anyio.sleep(TICK_S)
        sink.commit()
        start_log.rotate(pool.unjournaled())
        progress.concurrency = limiters.default.concurrency_limit
        if on_progress:
            on_progress(progress)


class StopSwitch:
    """Asks a session to stop from another thread, as SIGINT does from outside: the first
    request drains (requests in flight get grace_s), the second stops at once.

    For a session whose event loop runs in a worker thread (the Python API inside Jupyter,
    whose own loop is taken): signal handlers can only be installed in the main thread, so
    the thread that waits for the session turns its KeyboardInterrupt into `request()`.
    Thread-safe (the session's own thread may call it too); a request made before the
    session starts takes effect when it does.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests = 0
        self._token: EventLoopToken | None = None
        self._wake: anyio.Event | None = None
        self._thread: int | None = None  # the session loop's thread, while one waits

    @property
    def requests(self) -> int:
        """How many stops were asked for so far."""
        with self._lock:
            return self._requests

    def request(self) -> None:
        """Ask the session to stop (drain first; a second request: at once)."""
        with self._lock:
            self._requests += 1
            token, wake, thread = self._token, self._wake, self._thread
        if token is None or wake is None:
            return
        if thread == threading.get_ident():
            wake.set()  # in the loop's own thread (waiting for itself would never end)
            return
        with contextlib.suppress(RuntimeError):  # the loop has ended: nothing to stop
            anyio.from_thread.run_sync(wake.set, token=token)

    async def wait(self, seen: int) -> int:
        """Until more than `seen` stops were asked for; returns how many were."""
        while True:
            with self._lock:
                if self._requests > seen:
                    return self._requests
                self._token = anyio.lowlevel.current_token()
                self._thread = threading.get_ident()
                wake = self._wake = anyio.Event()
            try:
                await wake.wait()
            finally:
                with self._lock:
                    self._token = self._wake = self._thread = None


async def _watch_stops(
    switch: StopSwitch, pool: Pool, grace_s: float, on_signal: SignalHook | None = None
) -> None:
    """What `_watch_signals` does on signals, on the stops asked for through a StopSwitch."""
    seen = await switch.wait(0)
    if on_signal:
        on_signal(True, grace_s)
    pool.stop()
    if seen < 2:
        with anyio.move_on_after(grace_s) as waited:
            await switch.wait(seen)
        if waited.cancelled_caught:  # grace_s is over: cut what is still in flight
            pool.abort()
            return
    if on_signal:
        on_signal(False, grace_s)
    pool.abort()


async def _watch_signals(pool: Pool, grace_s: float, on_signal: SignalHook | None = None) -> None:
    """First SIGINT/SIGTERM: drain for up to grace_s. Second: stop at once. `on_signal`
    hears of each at once (first or not, and the grace time), so a person sees a reply."""
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            if on_signal:
                on_signal(not pool.stopping, grace_s)
            if pool.stopping:
                pool.abort()
                return
            pool.stop()
            async with anyio.create_task_group() as tg:
                tg.start_soon(_abort_after, pool, grace_s)
                async for _ in signals:
                    if on_signal:
                        on_signal(False, grace_s)
                    pool.abort()
                    tg.cancel_scope.cancel()
                    return


async def _abort_after(pool: Pool, grace_s: float) -> None:
    await anyio.sleep(grace_s)
    pool.abort()


__all__ = [
    "Estimate",
    "Interrupted",
    "Outcome",
    "Prepared",
    "SessionHooks",
    "StopSwitch",
    "estimate",
    "note_crash",
    "prepare",
    "resume",
    "run_session",
    "submit",
]

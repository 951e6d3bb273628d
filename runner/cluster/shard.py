"""One shard of a Ray run: the local runner's pipeline over a row range, under a lease.

Runs inside a Ray task (runner/cluster/driver.py) but imports no ray: everything it needs
comes in a `ShardTask` (plain data, never a key) and two optional hooks.

The shard's folder is a run folder of its own (`shards/<k>/`: lock, manifest.json,
journal/, parts/) on the shared run folder, or, when the run's results go to an object
store, a folder on the node's local disk whose parts are uploaded as they are written
(`StoreSink`) and whose journal is sealed into a part every `flush_s` seconds: a lost node
loses at most that window, which a resume buys again.

Exactly one writer per shard. The driver numbers each launch of a shard (its attempt);
the attempt takes the shard's flock (POSIX: a zombie that still holds it blocks the new
attempt, which fails and is retried) and writes `attempt-NNNNNN.json` once (exclusive
create) naming the parts of earlier attempts it adopts. Segments and parts of attempt A are
numbered from A * ATTEMPT_SPAN + 1, so readers (runner/state.py `shard_parts`) keep the
current attempt's parts and the adopted ones only: whatever a superseded attempt writes
later is ignored, and on an object store a superseded attempt stops at its next upload.

Pacing hook (for a cluster-wide rate and budget actor). `run_shard(task, pacing=...)`
takes an object with this interface (`Pacing`); the driver builds it in the worker from
`RayOptions.pacing(task)`. `LocalPacing`, the default, gives each shard its share of the
run's limits and budget (rows of the shard / rows of the run); any other Pacing is given
the run's own limits and budget (whole, not shared out):

    limiters(run: RunSpec) -> Limiters | None
        the limiters the shard's pool waits on (None: the runner's own, made from `run`);
    budget(prices, limit_usd, spent_usd) -> Budget | None
        the Spender (None: a local Budget of `limit_usd`); `spent_usd` is what this
        shard's earlier attempts spent (the run's total is in the shards' manifests);
    async run(pool) -> None
        runs beside the pool for the whole session (lease renewals, pauses heard from other
        shards: `pool.stop()` ends the session cleanly); cancelled when the pool is done.

Keys never travel: the task holds the spec, whose endpoint names the key's environment
variable; the worker reads its own environment (see runner/cluster/__init__.py).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import anyio

from runner.engine.job import PART_ROWS, SessionHooks, note_crash, run_session
from runner.engine.limiter import Limiters
from runner.engine.plan import prepare_loaded
from runner.engine.pool import Pool
from runner.errors import RunLocked, RunStopped, StorageFailed
from runner.input.source import RowRange
from runner.records import Progress
from runner.report.pricing import Budget, PriceSource
from runner.spec import SIMULATOR, LoadedSpec, RunSpec, parse_spec
from runner.store.objstore import list_files, open_store, read_bytes, write_bytes
from runner.store.sink import RunSink, _Sealed, part_name, part_number
from runner.store.state import (
    ATTEMPT_SPAN,
    DIR_MODE,
    Counts,
    InputStamp,
    Manifest,
    RunDir,
    _write_atomic,
    attempt_name,
    current_attempt,
    shard_parts,
    utc_now,
    versions,
)

# How long a new attempt waits for the flock of one that is still dying.
LEASE_WAIT_S = 20.0
# On an object store: the journal becomes a part (and is uploaded) at least this often.
FLUSH_S = 3.0


@dataclass(frozen=True, slots=True)
class ShardTask:
    """What a worker needs to run one attempt of one shard: data only, never a key."""

    run_id: str
    job_name: str
    input: InputStamp  # the run's input as planned (a shard's manifest keeps it)
    run_path: str  # the run's folder (shared POSIX path), where shards/<k>/ lives
    shard: int
    attempt: int
    rows: RowRange
    share: float  # the shard's rows over the run's: its part of the limits and budget
    spec_text: str  # the frozen spec this session runs with (it never holds a secret)
    spec_path: str  # where it came from (the input path resolves against it)
    schema_text: str | None = None  # the run's frozen [output] schema file, if any
    base_url: str | None = None  # the simulator the driver started, for base_url = simulator
    store: str | None = None  # the object store URI of the run (None: all under run_path)
    retry_failed: bool = False
    flush_s: float = FLUSH_S


@dataclass(slots=True)
class ShardResult:
    """How an attempt ended, for the driver's summary (the shard's manifest has it all)."""

    shard: int
    attempt: int
    state: str  # completed | stopped | failed | superseded
    counts: Counts = field(default_factory=lambda: Counts())
    cost_usd: float | None = None
    budget_spent_usd: float = 0.0
    stop_reason: str | None = None
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    progress: dict[str, Any] = field(default_factory=dict)  # the session's own counters


class Pacing(Protocol):
    """Where a shard's limits and budget come from; see the module docstring."""

    def limiters(self, run: RunSpec) -> Limiters | None: ...

    def budget(
        self, prices: PriceSource, limit_usd: float | None, spent_usd: float
    ) -> Budget | None: ...

    async def run(self, pool: Pool) -> None: ...


class LocalPacing:
    """No cluster actor: the shard's share of the run's limits and budget, paced locally."""

    def limiters(self, run: RunSpec) -> Limiters | None:
        return None

    def budget(
        self, prices: PriceSource, limit_usd: float | None, spent_usd: float
    ) -> Budget | None:
        return None

    async def run(self, pool: Pool) -> None:
        return None


# Called with the progress of the session now and again; returns True to stop the shard.
Reporter = Callable[[Progress], Coroutine[Any, Any, bool]]


def shared(run: RunSpec, share: float) -> RunSpec:
    """The run settings of one shard: its share of every rate and of the budget (the
    concurrency stays: it caps a shard, not the run)."""
    limits = {
        model: limit.model_copy(
            update={
                "requests_per_minute": _part(limit.requests_per_minute, share),
                "tokens_per_minute": _part(limit.tokens_per_minute, share),
            }
        )
        for model, limit in run.limits.items()
    }
    return run.model_copy(
        update={
            "requests_per_minute": _part(run.requests_per_minute, share),
            "tokens_per_minute": _part(run.tokens_per_minute, share),
            "budget_usd": None if run.budget_usd is None else run.budget_usd * share,
            "limits": limits,
        }
    )


def _part(value: float | None, share: float) -> float | None:
    return None if value is None else max(value * share, 1e-9)


def shard_spec(task: ShardTask, *, share: bool = True) -> LoadedSpec:
    """The spec a shard runs with: with `share`, its share of the run's limits and budget
    (a cluster-wide Pacing gets the run's own instead)."""
    spec = parse_spec(task.spec_text, path=Path(task.spec_path), display=task.spec_path)
    job = spec.job
    updates: dict[str, Any] = {"run": shared(job.run, task.share) if share else job.run}
    if job.endpoint.base_url == SIMULATOR and task.base_url is not None:
        updates["endpoint"] = job.endpoint.model_copy(update={"base_url": task.base_url})
    spec.job = job.model_copy(update=updates)
    return spec


async def run_shard(
    task: ShardTask, *, pacing: Pacing | None = None, report: Reporter | None = None
) -> ShardResult:
    """Run one attempt of a shard to its end (completed, or stopped: resumable)."""
    pacing = pacing or LocalPacing()
    store = _StoreShard(task) if task.store else None
    folder = store.local if store else Path(task.run_path) / "shards" / str(task.shard)
    shard = _ShardDir(folder, store)
    try:
        for sub in (folder, shard.journal_dir, shard.parts_dir):
            sub.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
    except OSError as exc:
        raise StorageFailed(f"cannot create shard folder {folder} ({exc.strerror})") from None
    if not await _take_lease(shard):
        return ShardResult(task.shard, task.attempt, "locked")
    uploaded = False
    try:
        if store is not None:
            store.sweep()
            store.download(folder)
        lease = current_attempt(folder)
        if lease is not None and lease[0] >= task.attempt:
            return ShardResult(task.shard, task.attempt, "superseded")
        alive = shard.last_alive()
        shard.recover()  # a dead attempt's journal (flock held: its writer is gone)
        manifest = _shard_manifest(shard, task, task.input)
        note_crash(shard, manifest, alive)
        adopted = sorted(part_number(p) for p in shard_parts(folder))
        claim = {"attempt": task.attempt, "adopted": adopted, "pid": os.getpid()}
        claim |= {"started_at": utc_now(), "node": os.uname().nodename}
        if not shard.claim(task.attempt, claim):
            return ShardResult(task.shard, task.attempt, "superseded")
        settled = shard.settled(retry_failed=task.retry_failed)
        spec = shard_spec(task, share=isinstance(pacing, LocalPacing))
        prepared = prepare_loaded(spec, False, rows_range=task.rows, schema_text=task.schema_text)
        background: list[Callable[[Pool], Coroutine[Any, Any, None]]] = [pacing.run]
        if report is not None:
            background.append(_reporting(report))
        if store is not None:
            background.append(store.flusher)
        run = spec.job.run
        limiters = pacing.limiters(run)

        def budget(prices: PriceSource, limit: float | None, spent: float) -> Budget:
            found = pacing.budget(prices, limit, spent)
            return found if found is not None else Budget(prices, limit_usd=limit, spent_usd=spent)

        hooks = SessionHooks(
            limiters=limiters,
            budget=budget,
            sink=store.sink if store else None,
            background=background,
        )
        first = task.attempt * ATTEMPT_SPAN + 1
        outcome = await run_session(shard, manifest, prepared, settled, first, hooks)
        final = outcome.progress
        counts = manifest.get("counts", {})
        if store is not None:
            uploaded = True  # every part and the manifest are on the store now
        return ShardResult(
            task.shard,
            task.attempt,
            outcome.state,
            counts,
            manifest.get("cost_usd"),
            float(manifest.get("budget_spent_usd") or 0.0),
            outcome.stop_reason,
            final.requests,
            final.prompt_tokens,
            final.completion_tokens,
            {k: v for k, v in asdict(final).items() if k != "started"},
        )
    finally:
        shard.unlock()
        if uploaded:
            shutil.rmtree(folder, ignore_errors=True)


async def _take_lease(shard: RunDir) -> bool:
    """The shard's flock, waiting a bounded time for an attempt that is still dying (its
    worker killed with the driver) to let go; False when it never does."""
    deadline = time.monotonic() + LEASE_WAIT_S
    while True:
        try:
            shard.lock()
        except RunLocked:
            if time.monotonic() >= deadline:
                return False
            await anyio.sleep(0.25)
        else:
            return True


def _reporting(report: Reporter) -> Callable[[Pool], Coroutine[Any, Any, None]]:
    async def reporting(pool: Pool) -> None:
        while True:
            if await report(pool.progress.snapshot()):
                pool.stop()
            await anyio.sleep(0.5)

    return reporting


def _shard_manifest(shard: RunDir, task: ShardTask, stamp: InputStamp) -> Manifest:
    """The shard's manifest (its own sessions and counts), made on its first attempt."""
    if shard.manifest_path.exists():
        return shard.read_manifest()
    rows = task.rows
    return {
        "run_id": shard.run_id,
        "job_name": task.job_name,
        "spec_path": task.spec_path,
        "spec_hash": "",
        "input": {**stamp, "rows": rows.stop - rows.start},
        "state": "running",
        "created_at": utc_now(),
        "versions": versions(),
        "counts": {},
        "sessions": [],
        "ray": {"run_id": task.run_id, "shard": task.shard, "rows": [rows.start, rows.stop]},
    }


class _ShardDir(RunDir):
    """A shard's run folder; with an object store, its manifest and claim go there too."""

    def __init__(self, path: Path, store: _StoreShard | None) -> None:
        super().__init__(path)
        self.store = store

    def write_manifest(self, manifest: Manifest) -> None:
        super().write_manifest(manifest)
        if self.store is not None:
            self.store.put("manifest.json", self.manifest_path.read_bytes())

    def claim(self, attempt: int, data: dict[str, Any]) -> bool:
        """Write this attempt's claim once; False when it exists (another took it)."""
        body = json.dumps(data, indent=2).encode()
        if self.store is not None and not self.store.claim(attempt, body):
            return False
        path = self.path / attempt_name(attempt)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except FileExistsError:
            return self.store is not None  # the local copy of a claim just made in the store
        except OSError as exc:
            raise StorageFailed(f"cannot write {path} ({exc.strerror})") from None
        with os.fdopen(fd, "wb") as handle:
            handle.write(body)
            handle.flush()
            os.fsync(handle.fileno())
        return True


class _StoreShard:
    """A shard whose files live on an object store, worked on in a local folder."""

    def __init__(self, task: ShardTask) -> None:
        assert task.store is not None
        self.task = task
        self.fs, base = open_store(task.store)
        self.base = f"{base}/shards/{task.shard}"
        # One local folder per attempt: an earlier attempt's leftovers on this node are not
        # this attempt's to adopt (they are the window a lost node loses).
        root = Path(tempfile.gettempdir()) / f"runner-ray-{os.getuid()}" / task.run_id
        self.local = root / f"{task.shard}-a{task.attempt}"
        self._sink: StoreSink | None = None

    def sweep(self) -> None:
        """Remove this node's folders of the shard's earlier attempts (what they had not
        uploaded is the window a resume buys again), unless a process still holds one."""
        for old in self.local.parent.glob(f"{self.task.shard}-a*"):
            if old == self.local or not old.name.rsplit("-a", 1)[1].isdigit():
                continue
            stale = RunDir(old)
            try:
                stale.lock()
            except (RunLocked, StorageFailed):
                continue
            stale.unlock()
            shutil.rmtree(old, ignore_errors=True)

    def put(self, name: str, data: bytes) -> None:
        write_bytes(self.fs, f"{self.base}/{name}", data)

    def download(self, folder: Path) -> None:
        """The shard's claims, manifest and parts from the store (parts already here kept)."""
        for info in list_files(self.fs, self.base):
            relative = info.path[len(self.base) + 1 :]
            target = folder / relative
            if relative.startswith("parts/") and target.exists():
                continue
            if not relative.startswith(("parts/part-", "attempt-", "manifest.json")):
                continue
            data = read_bytes(self.fs, info.path)
            if data is not None:
                _write_atomic(target, data)

    def claim(self, attempt: int, body: bytes) -> bool:
        """Create the attempt's claim on the store unless it exists; pyarrow.fs has no
        conditional PUT, so two creators within one round trip could both win: the driver
        numbers attempts (one driver per run, under the run's lock) so none ever race."""
        path = f"{self.base}/{attempt_name(attempt)}"
        if read_bytes(self.fs, path) is not None:
            return False
        write_bytes(self.fs, path, body)
        return True

    def holds_lease(self) -> bool:
        """Whether this attempt's claim is still the highest on the store."""
        names = [
            info.path.rsplit("/", 1)[-1]
            for info in list_files(self.fs, self.base)
            if info.path.rsplit("/", 1)[-1].startswith("attempt-")
        ]
        return max(names, default="") <= attempt_name(self.task.attempt)

    def upload_part(self, path: Path) -> None:
        if not self.holds_lease():
            raise _Superseded(f"shard {self.task.shard}: attempt {self.task.attempt} superseded")
        self.put(f"parts/{path.name}", path.read_bytes())

    def sink(self, run: RunDir, next_number: int) -> RunSink:
        self._sink = StoreSink(
            self, run.journal_dir, run.parts_dir, next_number=next_number, part_rows=PART_ROWS
        )
        return self._sink

    async def flusher(self, pool: Pool) -> None:
        """Seal the journal into a part (uploaded) every flush_s seconds."""
        while True:
            await anyio.sleep(self.task.flush_s)
            if self._sink is not None:
                self._sink.flush()


class _Superseded(RunStopped):
    """A later attempt of the shard took its lease: this one stops writing."""


class StoreSink(RunSink):
    """The local sink whose every part is also uploaded to the store once durable here."""

    def __init__(self, store: _StoreShard, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.store = store

    def _compact(self, sealed: _Sealed) -> None:
        super()._compact(sealed)
        self.store.upload_part(self.parts_dir / part_name(sealed.number))


__all__ = [
    "FLUSH_S",
    "LocalPacing",
    "Pacing",
    "ShardResult",
    "ShardTask",
    "run_shard",
    "shared",
]

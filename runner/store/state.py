"""The run directory: layout, manifest, lock, recovery, and finding runs by name.

    runs/<run-id>/
      job.toml        frozen copy of the spec as submitted (never holds a secret)
      manifest.json   state, counts, versions, input fingerprint; replaced atomically
      lock            flock'd by the one process running this run
      journal/        append-only JSONL segments
      parts/          immutable part-NNNNNN.parquet
      shards.json     (a Ray run) the row ranges of its shards, planned once
      shards/<k>/     (a Ray run) each shard a run folder of its own: lock, manifest.json,
                      journal/, parts/, attempt-NNNNNN.json (see `shard_parts`)

A Ray run's results are those of its shards: `part_paths` and `journal_paths` list them
for readers as one run (runner/cluster writes them).

Owns resume bookkeeping (which row keys are settled). Readers (status, report) never take
the lock. Uses journal and sink for the files; knows nothing of HTTP or the pool.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import platform
import shutil
import time
from array import array
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any, NotRequired, TypedDict, cast

import pyarrow as pa
import pyarrow.parquet as pq

from runner.errors import RunLocked, RunNotFound, StorageFailed, UsageError
from runner.records import hash_key, work_key
from runner.store.journal import read_segment, segment_number, segments, storage_error
from runner.store.sink import SCHEMA, compact_leftovers, fsync_dir, part_number, parts
from runner.store.starts import START_GLOB, StartLog

DIR_MODE = 0o700
# What readers show. `running` and `interrupted` are never trusted from the manifest: they
# come from the lock (held: running; not held and the run not ended: interrupted, a crash or
# a kill). The manifest's own word is kept for the states a session writes as it ends.
ENDED_STATES = ("stopped", "completed", "failed")


class InputStamp(TypedDict):
    """The input a run was made from: cheap to take, and it catches edits between sessions."""

    path: str
    size: int
    mtime: float
    hash: str  # sha256 of the first and last MiB
    rows: int | None


class Counts(TypedDict, total=False):
    """Rows by outcome over every session, and requests sent (attempts, re-asks included)."""

    total: int | None
    ok: int
    failed: int
    skipped: int
    requests: int


class Session(TypedDict):
    """One session (a submit or a resume): written as it starts, completed as it ends."""

    started_at: str
    started_epoch: float
    pid: int
    settings: dict[str, Any]  # what this session ran with (run/plan.py session_settings)
    ended_at: NotRequired[str]
    ended_epoch: NotRequired[float]
    outcome: NotRequired[str]  # completed, stopped, failed, or crashed (found by a resume)
    stop_reason: NotRequired[str | None]
    requests_started: NotRequired[int]
    ok: NotRequired[int]
    failed: NotRequired[int]
    requests: NotRequired[int]
    # Set by the resume that found the session crashed: requests it had on the wire with no
    # record, and their worst-case cost (the budget counts them).
    unanswered_at_crash: NotRequired[int]
    unanswered_worst_usd: NotRequired[float]
    ray: NotRequired[dict[str, Any]]  # a Ray run's session: cluster address, shards' ends


class Manifest(TypedDict):
    """manifest.json: the run's identity, state and totals (replaced atomically)."""

    run_id: str
    job_name: str
    spec_path: str  # the spec file as submitted (the frozen copy is job.toml)
    spec_hash: str
    input: InputStamp
    state: str  # the word the last session wrote; readers use RunDir.state()
    created_at: str
    versions: dict[str, str]
    counts: Counts
    sessions: list[Session]
    updated_at: NotRequired[str]
    spec_file: NotRequired[str]  # the frozen spec in force (job.N.toml after resume --spec)
    input_check: NotRequired[str]  # "pending" until the whole-input check finished once
    budget_usd: NotRequired[float | None]  # set by `resume --budget-usd`
    budget_spent_usd: NotRequired[float]
    cost_usd: NotRequired[float | None]  # None once any part of the cost is unknown
    error: NotRequired[str]  # why the run failed
    nothing_sent: NotRequired[bool]  # the only session ended before sending anything
    # A Ray run: {"shards": n, "attempts": {shard: last attempt launched}, "store": URI};
    # a shard's own manifest: {"run_id": the Ray run's id, "shard": k, "rows": range}.
    ray: NotRequired[dict[str, Any]]
    # SHA-256 of the [output] schema file frozen as output.schema.json (runner/output/schema.py)
    output_schema_sha256: NotRequired[str]


_FINGERPRINT_BYTES = 1 << 20
# What a manifest must hold for readers to trust the rest of it.
_MANIFEST_SHAPE = (
    ("run_id", str),
    ("state", str),
    ("input", dict),
    ("counts", dict),
    ("sessions", list),
)


# A shard's attempt A numbers its journal segments and parts from A * ATTEMPT_SPAN + 1.
ATTEMPT_SPAN = 1_000_000
ATTEMPT_GLOB = "attempt-*.json"
SHARDS = "shards"
SHARD_PLAN = "shards.json"
STORE_FILE = "store.json"  # a Ray run whose shards write to an object store: its URI


def attempt_name(attempt: int) -> str:
    return f"attempt-{attempt:06d}.json"


def current_attempt(folder: Path) -> tuple[int, set[int]] | None:
    """The attempt that holds a shard's lease (the highest attempt file) and the part
    numbers of earlier attempts it adopted; None for a folder with no attempt file."""
    found = sorted(folder.glob(ATTEMPT_GLOB))
    for path in reversed(found):
        with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
            data = json.loads(path.read_text())
            return int(data["attempt"]), {int(n) for n in data.get("adopted", [])}
    return None


def shard_parts(folder: Path) -> list[Path]:
    """A run folder's valid parts: all of them, or for a shard those of the attempt holding
    its lease and those it adopted; a stale attempt's later parts (a zombie's) are ignored."""
    found = parts(folder / "parts")
    lease = current_attempt(folder)
    if lease is None:
        return found
    attempt, adopted = lease
    return [
        p for p in found if part_number(p) in adopted or part_number(p) // ATTEMPT_SPAN == attempt
    ]


def shard_segments(folder: Path) -> list[Path]:
    """A run folder's journal segments (for a shard, only the current attempt's)."""
    found = list(segments(folder / "journal"))
    lease = current_attempt(folder)
    if lease is None:
        return found
    return [s for s in found if segment_number(s) // ATTEMPT_SPAN == lease[0]]


def default_runs_dir() -> Path:
    return Path(os.environ.get("RUNNER_RUNS_DIR") or "runs")


def utc_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for package in ("runner", "aiohttp", "anyio", "pyarrow", "duckdb"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[package] = metadata.version(package)
    return found


def input_fingerprint(path: Path, rows: int | None) -> InputStamp:
    """Size, mtime and hashes of the first and last MiB: cheap, and catches edits."""
    stat = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        digest.update(handle.read(_FINGERPRINT_BYTES))
        if stat.st_size > _FINGERPRINT_BYTES:
            handle.seek(max(stat.st_size - _FINGERPRINT_BYTES, _FINGERPRINT_BYTES))
            digest.update(handle.read())
    return {
        "path": str(path),
        "size": stat.st_size,
        "mtime": stat.st_mtime,
        "hash": digest.hexdigest(),
        "rows": rows,
    }


# A row `invalid` (answers failing the [output] schema until re-asks ran out) is settled as
# failed: kept, and asked again by --retry-failed.
_CODES = {"ok": 1, "failed": 2, "skipped": 3, "invalid": 2}


@dataclass(slots=True)
class Settled:
    """What earlier sessions of a run settled, compact enough for millions of rows.

    While the input never changed, rows are matched by position: one status byte per row and
    model (row N is still row N). Once it has changed, a row's identity is its key, never its
    position: (row id, model, request hash), where the row id is the id column's value, or
    the row number when there is none. Only the rows of the input as it is now
    (runs/<id>/row_keys.parquet) count as settled; an edited or inserted row is sent.
    """

    ok: int = 0
    failed: int = 0
    skipped: int = 0
    retry_failed: bool = False
    # model -> status byte per row_index (0 = nothing yet, else _CODES)
    by_row: dict[str, bytearray] = field(default_factory=dict)
    keys: set[int] | None = None  # work_key() of the current rows' settled work, by key
    ok_hashes: set[int] = field(default_factory=set)  # hash_key() of answers to reuse
    # model -> [prompt, cached, completion, usd] summed over paid answers; rows with a
    # provider-reported cost, or a budget charge for unknown usage (charged_usd), count
    # only in the last.
    usage: dict[str, list[float]] = field(default_factory=dict)
    # When known, only these request keys can be reused (the input repeats them).
    reusable: set[int] | None = None

    @classmethod
    def nothing(cls) -> Settled:
        return cls()

    @property
    def count(self) -> int:
        return self.ok + self.skipped + (0 if self.retry_failed else self.failed)

    def done(self, row_index: int, model: str, row_id: str, request_hash: str) -> bool:
        """Whether this work needs no new request."""
        if self.keys is not None:
            return work_key(row_id, model, request_hash) in self.keys
        codes = self.by_row.get(model)
        if codes is None or row_index >= len(codes):
            return False
        code = codes[row_index]
        return code != 0 and (code != 2 or not self.retry_failed)


ROW_KEYS = "row_keys.parquet"


def row_keys_stamp(fingerprint: InputStamp) -> dict[bytes, bytes]:
    """The input a row_keys.parquet was made from, kept in the file's own metadata."""
    seen = {k: fingerprint.get(k) for k in ("size", "mtime", "hash")}
    return {b"input": json.dumps(seen, sort_keys=True).encode()}


class RunDir:
    """A run's folder and the operations on it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.run_id = path.name
        self.manifest_path = path / "manifest.json"
        self.spec_path = path / "job.toml"
        self.lock_path = path / "lock"
        self.journal_dir = path / "journal"
        self.parts_dir = path / "parts"
        self.sending_path = path / "journal" / "sending.json"
        self._lock_fd: int | None = None

    # -- results of the run (its own, or every shard's) ---------------------------------------

    def result_folders(self) -> list[Path]:
        """Folders holding the run's results: the run's, then each shard's (a Ray run's);
        a run whose shards write to an object store has them mirrored here first."""
        store = self.path / STORE_FILE
        if store.is_file():
            from runner.store.objstore import mirror_shards  # pyarrow.fs only for such runs

            mirror_shards(json.loads(store.read_text())["uri"], self.path)
        shards = self.path / SHARDS
        if not shards.is_dir():
            return [self.path]
        numbered = [d for d in shards.iterdir() if d.is_dir() and d.name.isdigit()]
        return [self.path, *sorted(numbered, key=lambda d: int(d.name))]

    def part_paths(self) -> list[Path]:
        """Every valid part of the run, in the order written (shard by shard)."""
        return [p for folder in self.result_folders() for p in shard_parts(folder)]

    def journal_paths(self) -> list[Path]:
        """Every journal segment of the run not compacted yet."""
        return [s for folder in self.result_folders() for s in shard_segments(folder)]

    # -- creation and locking --------------------------------------------------------------

    @classmethod
    def create(cls, runs_dir: Path, job_name: str, spec_text: str) -> RunDir:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        try:
            runs_dir.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
            for n in range(1, 1000):
                name = f"{job_name}-{stamp}" + (f"-{n}" if n > 1 else "")
                try:
                    (runs_dir / name).mkdir(mode=DIR_MODE)
                except FileExistsError:
                    continue
                break
            run = cls(runs_dir / name)
            run.journal_dir.mkdir(mode=DIR_MODE)
            run.parts_dir.mkdir(mode=DIR_MODE)
            _write_atomic(run.spec_path, spec_text.encode())
        except OSError as exc:
            raise storage_error("create run folder in", runs_dir, exc) from None
        return run

    def lock(self) -> None:
        """Hold the run's flock for this process's lifetime, or raise RunLocked."""
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise storage_error("open lock file", self.lock_path, exc) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise RunLocked(self.run_id, int(holder) if holder.isdigit() else None) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._lock_fd, 0)
            os.close(self._lock_fd)
            self._lock_fd = None

    def holder_pid(self) -> int | None:
        """PID of the process running this run now, if any (a read-only probe)."""
        try:
            fd = os.open(self.lock_path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.pread(fd, 32, 0).decode(errors="replace").strip()
                return int(text) if text.isdigit() else -1
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)

    def is_run(self) -> bool:
        """Whether the folder is a run's: its manifest names it and it has the run's journal
        and parts folders (a folder that merely holds a manifest.json is not)."""
        try:
            data = json.loads(self.manifest_path.read_text())
        except (OSError, ValueError):
            return False
        named = isinstance(data, dict) and data.get("run_id") == self.run_id
        return named and self.journal_dir.is_dir() and self.parts_dir.is_dir()

    def remove(self) -> None:
        """Delete the run's folder, holding its lock so that no session runs meanwhile.

        Raises RunLocked (and deletes nothing) when a process is running the run. The folder
        is first renamed to a hidden name, so a half-deleted run is never listed.
        """
        self.lock()
        try:
            doomed = self.path.with_name(f".removing-{self.run_id}-{os.getpid()}")
            try:
                os.rename(self.path, doomed)
            except OSError as exc:
                raise storage_error("remove run folder", self.path, exc) from None
        finally:
            self.unlock()
        shutil.rmtree(doomed, ignore_errors=True)

    def discard(self) -> None:
        """Remove the run folder (only for a run that sent nothing: nothing paid is lost)."""
        shutil.rmtree(self.path, ignore_errors=True)

    def state(self, manifest: Manifest | None = None) -> str:
        """The run's state for readers; see STATES (derived from the lock, not a stored word)."""
        if self.holder_pid() is not None:
            return "running"
        if manifest is None:
            try:
                manifest = self.read_manifest()
            except UsageError:
                return "interrupted"
        stored = manifest.get("state")
        return stored if stored in ENDED_STATES else "interrupted"

    # -- manifest ----------------------------------------------------------------------------

    def read_manifest(self) -> Manifest:
        try:
            data = json.loads(self.manifest_path.read_text())
        except FileNotFoundError:
            raise RunNotFound(f"{self.path}: not a run folder (no manifest.json)") from None
        except (OSError, ValueError) as exc:
            raise UsageError(f"{self.manifest_path}: unreadable ({exc})") from None
        if not isinstance(data, dict) or not all(
            isinstance(data.get(key), kind) for key, kind in _MANIFEST_SHAPE
        ):
            raise UsageError(f"{self.manifest_path}: not a manifest")
        return cast(Manifest, data)

    def write_manifest(self, manifest: Manifest) -> None:
        manifest["updated_at"] = utc_now()
        try:
            _write_atomic(self.manifest_path, json.dumps(manifest, indent=2).encode())
        except OSError as exc:
            raise storage_error("write manifest", self.manifest_path, exc) from None

    # -- recovery and resume -----------------------------------------------------------------

    def write_repeated(self, keys: set[int]) -> None:
        """Keep the keys of the requests the input repeats, for resumes that skip the check."""
        try:
            _write_atomic(self.path / "repeated.bin", array("Q", sorted(keys)).tobytes())
        except OSError as exc:
            raise storage_error("write", self.path / "repeated.bin", exc) from None

    def read_repeated(self) -> set[int] | None:
        try:
            data = (self.path / "repeated.bin").read_bytes()
        except FileNotFoundError:
            return None
        keys = array("Q")
        keys.frombytes(data)
        return set(keys)

    def start_log(self) -> StartLog:
        """The write-ahead log of this session's requests (see StartLog)."""
        return StartLog(self.journal_dir)

    def clear_sending(self) -> None:
        """Forget what earlier sessions had on the wire (counted, or settled cleanly)."""
        self.sending_path.unlink(missing_ok=True)  # the snapshot older versions wrote
        for path in self.journal_dir.glob(START_GLOB):
            path.unlink(missing_ok=True)

    def last_alive(self) -> float | None:
        """When a session of this run last left a trace on disk (epoch seconds): the newest of
        the start log (rotated every tick), the journal, the parts and the manifest."""
        newest: float | None = None
        for folder, pattern in (
            (self.journal_dir, "*"),
            (self.parts_dir, "*"),
            (self.path, "manifest.json"),
        ):
            for path in folder.glob(pattern):
                with contextlib.suppress(OSError):
                    mtime = path.stat().st_mtime
                    newest = mtime if newest is None else max(newest, mtime)
        return newest

    def wall_seconds(self, manifest: Manifest) -> float:
        """Time the sessions ran, summed over each one's own start and end.

        A session with no recorded end is still running (counted until now) while the lock is
        held; otherwise it was killed and ends at its last trace on disk (last_alive), never
        at the moment a report is read.
        """
        total = 0.0
        sessions = [s for s in manifest.get("sessions", []) if isinstance(s, dict)]
        open_end: float | None = None
        for number, session in enumerate(sessions):
            start = session.get("started_epoch")
            if not isinstance(start, int | float):
                continue
            end = session.get("ended_epoch")
            if not isinstance(end, int | float):
                if open_end is None:
                    running = number == len(sessions) - 1 and self.holder_pid() is not None
                    open_end = time.time() if running else (self.last_alive() or start)
                end = open_end
            total += max(end - start, 0.0)
        return total

    def unanswered_at_crash(self) -> int:
        """Requests the crashed session put on the wire that never got a record.

        An upper bound of what a resume may buy again: the start log holds every request
        before it was sent (see StartLog), so a request answered by the server but not yet
        journaled at the kill is counted too. They may have been billed without an answer.
        """
        return len(self.unanswered_requests())

    def unanswered_requests(self, since: float | None = None) -> dict[tuple[str, str, int], float]:
        """(row_id, model, attempt) of each request of unanswered_at_crash, with its worst
        case in USD as the start log has it (0 when unknown).

        `since`: when the crashed session started (its `started_epoch`). Only a record of
        that session answers one of its requests: an earlier session's record of the same
        row, model and attempt number (a row sent again after its input was edited, or
        after its attempt 1 met a 429 and that session ended) is of another request, and
        counting it as the answer hid a request that may be bought again."""
        wanted: dict[tuple[str, str, int], float] = {}
        with contextlib.suppress(OSError, ValueError, TypeError):
            entries = json.loads(self.sending_path.read_text())  # an older version's snapshot
            wanted |= {(str(r), str(m), int(a)): 0.0 for r, m, a in entries}
        for path in self.journal_dir.glob(START_GLOB):
            for key, worst in StartLog.read(path).items():
                wanted[key] = max(wanted.get(key, 0.0), worst)
        if not wanted:
            return wanted
        import pyarrow.compute as pc  # ~30 ms: not on a submit's way to its first request

        ids = pa.array(sorted({r for r, _, _ in wanted}))
        for path in self.part_paths():
            table = pq.read_table(path, columns=["row_id", "model", "attempts", "started_at"])
            table = table.filter(pc.is_in(table.column("row_id"), value_set=ids))
            for row in table.to_pylist():
                started = row["started_at"]
                if since is None or started is None or started.timestamp() >= since:
                    wanted.pop((row["row_id"], row["model"], row["attempts"]), None)
        for segment in segments(self.journal_dir):
            for r in read_segment(segment):
                started = r.get("started_at")
                if since is None or not isinstance(started, int | float) or started >= since:
                    wanted.pop((r["row_id"], r["model"], r["attempts"]), None)
        return wanted

    def recover(self) -> int:
        """Compact whatever an interrupted session left; returns the next segment number."""
        try:
            return compact_leftovers(self.journal_dir, self.parts_dir)
        except OSError as exc:
            raise storage_error("recover journal in", self.journal_dir, exc) from None

    @property
    def row_keys_path(self) -> Path:
        """The keys of the current input's rows, written once the input has changed."""
        return self.path / ROW_KEYS

    def row_keys_fresh(self, fingerprint: InputStamp) -> bool:
        """Whether row_keys.parquet was made from the input with this fingerprint."""
        try:
            metadata = pq.read_schema(self.row_keys_path).metadata or {}
        except (OSError, pa.ArrowInvalid):
            return False
        return metadata.get(b"input") == row_keys_stamp(fingerprint)[b"input"]

    def settled(
        self,
        *,
        retry_failed: bool = False,
        by_request: bool = False,
        reusable: set[int] | None = None,
    ) -> Settled:
        """Work settled by committed parts and the journal; the latest final record wins.

        Parts and segments are read in the order they were written, so a later record (a
        failed row answered on a --retry-failed resume) overwrites an earlier one.
        `by_request`: match by key against the rows of row_keys.parquet (the input as it is
        now); only those rows are counted, however many rows earlier inputs had.
        """
        result = Settled(retry_failed=retry_failed, reusable=reusable)
        latest: dict[int, int] | None = {} if by_request else None
        columns = ["row_index", "row_id", "model", "request_hash", "status", "reused"]
        wanted = list(dict.fromkeys([*columns, *_USAGE_COLUMNS]))
        for path in self.part_paths():
            # One open and one read a part (its footer parsed once): a resume of a run of
            # many parts spent ~8 ms on each in three reads.
            try:
                part = pq.ParquetFile(path)
                names = set(part.schema_arrow.names)
                table = part.read(columns=[c for c in wanted if c in names])
                final = table.select(columns).filter(table.column("final"))
            except (pa.ArrowException, OSError, KeyError) as exc:
                # Not Parquet any more (overwritten, truncated, replaced), or not a part: the
                # user's to look at, not an internal error.
                raise results_unreadable(path, exc) from None
            values = [final.column(c).to_pylist() for c in columns]
            for row in zip(*values, strict=True):
                _settle(result, latest, *row)
            _add_usage(result, _usage_of(table))
        for segment in segments(self.journal_dir):
            records = read_segment(segment)
            if records:
                _add_usage(
                    result,
                    pa.Table.from_pylist(
                        [{c: r.get(c) for c in _USAGE_COLUMNS} for r in records],
                        schema=SCHEMA.select(_USAGE_COLUMNS),
                    ),
                )
            for r in records:
                if r.get("final"):
                    _settle(
                        result,
                        latest,
                        r["row_index"],
                        r["row_id"],
                        r["model"],
                        r["request_hash"],
                        r["status"],
                        bool(r.get("reused")),
                    )
        for codes in result.by_row.values():
            result.ok += codes.count(1)
            result.failed += codes.count(2)
            result.skipped += codes.count(3)
        if latest is not None:
            _settle_current(result, latest, self.row_keys_path)
        return result


def results_unreadable(where: Path, exc: BaseException) -> UsageError:
    """The user's error for parts that are not readable Parquet (overwritten, truncated,
    replaced): named, with the first line of the reader's reason."""
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return UsageError(f"{where}: the run's results cannot be read ({reason})")


_USAGE_COLUMNS = [
    "model",
    "status",
    "final",
    "reused",
    "prompt_tokens",
    "cached_tokens",
    "completion_tokens",
    "provider_cost",
    "charged_usd",
]


def _usage_of(table: pa.Table) -> pa.Table:
    """A part's usage columns; a part written before `charged_usd` existed has it null."""
    names = set(table.column_names)
    usage = table.select([c for c in _USAGE_COLUMNS if c in names])
    for name in _USAGE_COLUMNS:
        if name not in names:
            usage = usage.append_column(
                SCHEMA.field(name), pa.nulls(usage.num_rows, SCHEMA.field(name).type)
            )
    return usage


def _add_usage(result: Settled, table: pa.Table) -> None:
    """Sum paid usage per model (every answer really received, re-asked ones too), and
    what the budget charged for attempts whose usage was unknown (`charged_usd`: their
    worst case, which their tokens cannot tell), into the USD sum of `result.usage`."""
    import pyarrow.compute as pc  # ~30 ms: not on a submit's way to its first request

    charged = table.filter(pc.field("charged_usd").is_valid())
    if charged.num_rows:
        sums = charged.group_by("model").aggregate([("charged_usd", "sum")])
        for row in sums.to_pylist():
            acc = result.usage.setdefault(row["model"], [0, 0, 0, 0.0])
            acc[3] += row["charged_usd_sum"] or 0.0
        table = table.filter(~pc.field("charged_usd").is_valid())
    paid = table.filter(
        ~pc.field("reused")
        & (pc.field("prompt_tokens").is_valid() | pc.field("provider_cost").is_valid())
    )
    if not paid.num_rows:
        return
    has_cost = pc.is_valid(paid.column("provider_cost"))
    for part, cost_known in (
        (paid.filter(has_cost), True),
        (paid.filter(pc.invert(has_cost)), False),
    ):
        if not part.num_rows:
            continue
        sums = part.group_by("model").aggregate(
            [
                ("prompt_tokens", "sum"),
                ("cached_tokens", "sum"),
                ("completion_tokens", "sum"),
                ("provider_cost", "sum"),
            ]
        )
        for row in sums.to_pylist():
            acc = result.usage.setdefault(row["model"], [0, 0, 0, 0.0])
            if cost_known:
                acc[3] += row["provider_cost_sum"] or 0.0
            else:
                acc[0] += row["prompt_tokens_sum"] or 0
                acc[1] += row["cached_tokens_sum"] or 0
                acc[2] += row["completion_tokens_sum"] or 0


def _settle_current(result: Settled, latest: dict[int, int], path: Path) -> None:
    """Count and key the settled work of the current input's rows only."""
    keys: set[int] = set()
    counts = [0, 0, 0, 0]  # by code: nothing, ok, failed, skipped
    table = pq.ParquetFile(path)
    for batch in table.iter_batches(columns=["row_id", "model", "request_hash"]):
        ids, models, digests = (column.to_pylist() for column in batch.columns)
        for row_id, model, digest in zip(ids, models, digests, strict=True):
            key = work_key(row_id, model, digest)
            code = latest.get(key, 0)
            counts[code] += 1
            if code and (code != 2 or not result.retry_failed):
                keys.add(key)
    result.ok, result.failed, result.skipped = counts[1], counts[2], counts[3]
    result.keys = keys


def _settle(
    result: Settled,
    latest: dict[int, int] | None,
    row_index: int,
    row_id: str,
    model: str,
    digest: str,
    status: str,
    reused: bool,
) -> None:
    code = _CODES.get(status, 0)
    if latest is not None:
        latest[work_key(row_id, model, digest)] = code
    else:
        codes = result.by_row.get(model)
        if codes is None:
            codes = result.by_row[model] = bytearray()
        if row_index >= len(codes):
            codes.extend(bytes(max(row_index + 1 - len(codes), len(codes))))
        codes[row_index] = code
    if code == 1 and not reused:
        key = hash_key(digest)
        if result.reusable is None or key in result.reusable:
            result.ok_hashes.add(key)


def _write_atomic(path: Path, data: bytes, *, sync: bool = True) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if sync:
        fsync_dir(path.parent)


def resolve_run(ref: str, runs_dir: Path) -> RunDir:
    """A run id, a run folder path, or a job name (meaning its latest run)."""
    candidate = Path(ref)
    if (candidate / "manifest.json").exists():
        return RunDir(candidate.resolve())
    if (runs_dir / ref / "manifest.json").exists():
        return RunDir((runs_dir / ref).resolve())
    latest = [
        m for m in list_runs(runs_dir) if m.get("job_name") == ref and not m.get("nothing_sent")
    ]
    if latest:
        return RunDir((runs_dir / latest[-1]["run_id"]).resolve())
    raise RunNotFound(f"no run or job named {ref!r} in {runs_dir}")


def manifest_says_nothing_sent(run: RunDir) -> bool:
    """Whether the run's only session ended having sent nothing (or never wrote a manifest)."""
    try:
        return bool(run.read_manifest().get("nothing_sent"))
    except RunNotFound:
        return True
    except UsageError:
        return False


def list_runs(runs_dir: Path) -> list[Manifest]:
    """Manifests of every run under runs_dir, oldest first; `state` as readers show it
    (RunDir.state: running and interrupted come from the lock)."""
    found: list[Manifest] = []
    if not runs_dir.is_dir():
        return found
    for child in runs_dir.iterdir():
        path = child / "manifest.json"
        if path.is_file():
            with contextlib.suppress(OSError, ValueError, UsageError, RunNotFound):
                run = RunDir(child)
                manifest = run.read_manifest()
                manifest["state"] = run.state(manifest)
                found.append(manifest)
    found.sort(key=lambda m: (m.get("created_at", ""), m.get("run_id", "")))
    return found


def check_writable(runs_dir: Path) -> None:
    """Fail before the first request when results could not be written."""
    try:
        runs_dir.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        probe = runs_dir / f".probe-{os.getpid()}-{time.monotonic_ns()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise StorageFailed(f"runs folder {runs_dir} is not writable ({exc.strerror})") from None

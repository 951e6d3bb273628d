"""The result schema and the files that hold results: journal first, then Parquet parts.

The single source of result column names. Parts are immutable: written to `.tmp`, fsynced,
renamed, folder fsynced, so a reader only ever sees whole files. Part N holds exactly the
records of journal segment N, which is deleted once the part is durable; recovery compacts
whatever segments are left. Owns pyarrow writing; knows nothing of HTTP or the pool.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, fields
from operator import attrgetter
from pathlib import Path
from typing import Any

import anyio
import pyarrow as pa
import pyarrow.parquet as pq

from runner.errors import StorageFailed
from runner.records import Reasked, ResultRecord
from runner.store.journal import (
    Journal,
    read_segment,
    segment_number,
    segments,
    storage_error,
    torn_error,
)

PART_GLOB = "part-*.parquet"

_TS = pa.timestamp("us", tz="UTC")
_TYPES: dict[str, pa.DataType] = {
    "row_id": pa.string(),
    "row_index": pa.int64(),
    "model": pa.string(),
    "request_hash": pa.string(),
    "status": pa.string(),
    "final": pa.bool_(),
    "attempts": pa.int32(),
    "started_at": _TS,
    "finished_at": _TS,
    "latency_ms": pa.float64(),
    "http_status": pa.int32(),
    "content": pa.string(),
    "refusal": pa.string(),
    "tool_calls": pa.string(),
    "finish_reason": pa.string(),
    "response_model": pa.string(),
    "response_id": pa.string(),
    "system_fingerprint": pa.string(),
    "prompt_tokens": pa.int64(),
    "completion_tokens": pa.int64(),
    "total_tokens": pa.int64(),
    "cached_tokens": pa.int64(),
    "reasoning_tokens": pa.int64(),
    "provider_cost": pa.float64(),
    "usage_raw": pa.string(),
    "error_type": pa.string(),
    "error_message": pa.string(),
    "possibly_billed": pa.bool_(),
    "reused": pa.bool_(),
    "charged_usd": pa.float64(),
    "validation_error": pa.string(),
}
COLUMNS = [f.name for f in fields(ResultRecord)]
assert set(COLUMNS) == set(_TYPES), "records.ResultRecord and sink's schema disagree"
SCHEMA = pa.schema([pa.field(name, _TYPES[name]) for name in COLUMNS])
# Columns that identify a row's answer, for joins with the input and exports.
ANSWER_COLUMNS = [
    c
    for c in COLUMNS
    if c not in ("row_index", "final", "possibly_billed", "reused", "charged_usd")
]
# Columns a reused row takes from the ok result it reuses.
REUSED_COLUMNS = [
    "content",
    "refusal",
    "tool_calls",
    "finish_reason",
    "response_model",
    "response_id",
    "system_fingerprint",
]


def part_name(number: int) -> str:
    return f"part-{number:06d}.parquet"


def part_number(path: Path) -> int:
    return int(path.stem.split("-")[1])


def parts(folder: Path) -> list[Path]:
    return sorted(folder.glob(PART_GLOB), key=part_number)


def to_table(rows: Sequence[ResultRecord] | Sequence[dict[str, Any]]) -> pa.Table:
    """Columns built one at a time (far cheaper than row-wise conversion)."""
    arrays = []
    as_dicts = bool(rows) and isinstance(rows[0], dict)
    for name in COLUMNS:
        if as_dicts:
            values = [r.get(name) for r in rows]  # type: ignore[union-attr]
        else:
            values = list(map(attrgetter(name), rows))
        kind = _TYPES[name]
        arrays.append(_timestamps(values) if kind == _TS else pa.array(values, kind))
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def _timestamps(seconds: Sequence[float | None]) -> pa.Array:
    """Epoch seconds as the timestamp column, rounded to the microsecond: integers straight
    into the timestamp type, since a cast would import pyarrow.compute (~30 ms of a short
    run's start-up)."""
    return pa.array([None if v is None else round(v * 1_000_000) for v in seconds], _TS)


# The journal's view of SCHEMA: timestamps are epoch seconds there.
_JOURNAL_SCHEMA = pa.schema(
    [pa.field(f.name, pa.float64() if f.type == _TS else f.type) for f in SCHEMA]
)


def segment_table(path: Path, longest: int) -> pa.Table:
    """A whole, closed journal segment as its part's table, read by Arrow's JSON reader.

    The same table as `to_table` of its records (tests/test_storage.py checks it), but
    parsed in C++ without the GIL: in the compactor's worker thread it costs the event loop
    nothing, where building the table from the records cost it ~4.5 us a row (bench/run.py
    W1). `longest` is the segment's longest line: a block must hold a whole line. A segment
    the reader refuses is read the plain way.
    """
    import pyarrow.json as pj  # <1 ms

    block = max(1 << 20, longest + 1)
    try:
        table = pj.read_json(
            path,
            read_options=pj.ReadOptions(use_threads=False, block_size=block),
            parse_options=pj.ParseOptions(
                explicit_schema=_JOURNAL_SCHEMA, unexpected_field_behavior="error"
            ),
        )
    except pa.ArrowInvalid:
        return to_table(read_segment(path))
    arrays: list[pa.ChunkedArray | pa.Array] = []
    for field in SCHEMA:
        column = table.column(field.name)
        arrays.append(_timestamps(column.to_pylist()) if field.type == _TS else column)
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_part(folder: Path, number: int, table: pa.Table) -> Path:
    """Write an immutable part: .tmp, close, fsync, rename, fsync the folder."""
    final = folder / part_name(number)
    tmp = final.with_name(final.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as handle:
            pq.write_table(table, handle, compression="zstd", row_group_size=64 * 1024)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
        fsync_dir(folder)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise storage_error("write results part", final, exc) from None
    return final


def compact_leftovers(journal_dir: Path, parts_dir: Path) -> int:
    """Turn every segment left by an earlier session into its part; returns the next number.

    Safe to repeat at any instant: a segment whose part exists is only deleted, and a
    half-written `.tmp` part is discarded (the segment still holds its records).
    """
    for tmp in parts_dir.glob("*.tmp"):
        tmp.unlink()
    highest = max((part_number(p) for p in parts(parts_dir)), default=0)
    for segment in list(segments(journal_dir)):
        number = segment_number(segment)
        if not (parts_dir / part_name(number)).exists():
            records = read_segment(segment, repair=True)
            if records:
                write_part(parts_dir, number, to_table(records))
        segment.unlink()
        highest = max(highest, number)
    fsync_dir(journal_dir)
    return highest + 1


@dataclass(slots=True)
class _Sealed:
    """A closed journal segment waiting to become its part."""

    segment: Path
    number: int
    longest: int  # its longest line (bytes)


class RunSink:
    """The pool's sink: journal every record, compact each full segment into a part.

    The writer only ever appends; full segments are sealed and handed to `compactor()`, a
    task that reads each back and writes its part in a worker thread, so a slow part write
    never holds answers in memory unjournaled. Nothing of a record is kept once it is
    journaled: memory stays flat, and the event loop does no more than write the line.
    """

    def __init__(self, journal_dir: Path, parts_dir: Path, *, next_number: int, part_rows: int):
        self.journal_dir = journal_dir
        self.parts_dir = parts_dir
        self.part_rows = part_rows
        self._journal = Journal(journal_dir, next_number)
        self._sealed: list[_Sealed] = []
        self._wake = anyio.Event()
        self._compacting = anyio.Lock()
        self._closed = False
        # Set once a failed write left a fragment in a segment: its whole lines may hold
        # records the caller takes as not written, so nothing more is written this session.
        self._torn: Path | None = None

    def append(self, records: Sequence[ResultRecord]) -> None:
        """Journal records now (a write that returned survives kill -9)."""
        if self._torn is not None:
            raise torn_error(self._torn)
        try:
            self._journal.append(records)
        except StorageFailed:
            if self._journal.torn:
                self._torn = self._journal.path
            raise
        if self._journal.records >= self.part_rows:
            self._seal()

    def flush(self) -> None:
        """Seal what is journaled into a part now, if anything (a shard does it every
        flush_s, so that at most that much of its work is only on its local disk)."""
        if not self._closed and self._journal.records:
            self._seal()

    def commit(self) -> None:
        """Make what is journaled durable soon: an fsync in a worker thread, so the event
        loop does not wait for the disk (raises an earlier fsync's failure)."""
        self._journal.sync_soon()

    def _seal(self) -> None:
        """Close the open segment and queue it for compaction; open the next one."""
        journal = self._journal
        journal.close()
        if journal.records or journal.torn:  # a fragment's whole lines are records too
            self._sealed.append(_Sealed(journal.path, journal.number, journal.longest))
            self._wake.set()
        else:
            journal.path.unlink(missing_ok=True)
        self._journal = Journal(self.journal_dir, journal.number + 1)

    async def compactor(self) -> None:
        """Write sealed segments as parts, off the event loop, until cancelled."""
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            await self._compact_sealed()

    async def _compact_sealed(self) -> None:
        async with self._compacting:
            while self._sealed:
                sealed = self._sealed[0]
                await anyio.to_thread.run_sync(self._compact, sealed)
                self._sealed.pop(0)

    def _compact(self, sealed: _Sealed) -> None:
        write_part(self.parts_dir, sealed.number, segment_table(sealed.segment, sealed.longest))
        sealed.segment.unlink()
        fsync_dir(self.journal_dir)

    async def close(self) -> None:
        """Seal the open segment and write every part still due (shielded by the caller)."""
        self._closed = True
        self._seal()
        self._journal.close()
        self._journal.path.unlink(missing_ok=True)
        await self._compact_sealed()


_REASK_COLUMNS = [
    "row_id",
    "model",
    "request_hash",
    "final",
    "attempts",
    "content",
    "tool_calls",
    "validation_error",
]


def reasked_rows(parts_dir: Path, journal_dir: Path) -> dict[tuple[str, str, str], Reasked]:
    """Rows with invalid answers re-asked (journaled non-final with a validation_error) and
    no final record yet, by (row id, model, request hash): what a resume goes on from.

    Only re-asked attempts are kept in memory (the filter runs in Arrow); parts written
    before the `validation_error` column have none.
    """
    import pyarrow.compute as pc  # ~30 ms: only on the way of a run with an [output] schema

    tables: list[pa.Table] = []
    for path in parts(parts_dir):
        if "validation_error" not in pq.read_schema(path).names:
            continue
        table = pq.read_table(path, columns=_REASK_COLUMNS)
        tables.append(table.filter(pc.field("validation_error").is_valid()))
    for segment in segments(journal_dir):
        records = [r for r in read_segment(segment) if r.get("validation_error") is not None]
        if records:
            tables.append(to_table(records).select(_REASK_COLUMNS))
    found: dict[tuple[str, str, str], Reasked] = {}
    settled: set[tuple[str, str, str]] = set()
    for table in tables:
        for r in table.to_pylist():
            key = (r["row_id"], r["model"], r["request_hash"])
            if r["final"]:
                settled.add(key)  # a row settled `invalid`: nothing to go on from
                continue
            before = found.get(key)
            if before is None or r["attempts"] >= before.attempts:
                found[key] = Reasked(
                    used=(before.used if before else 0) + 1,
                    attempts=r["attempts"],
                    content=r["content"],
                    tool_calls=r["tool_calls"],
                    validation_error=r["validation_error"],
                )
            else:
                found[key] = dataclasses.replace(before, used=before.used + 1)
    if not found:
        return found
    # Rows settled since (ok, or failed on a later attempt): their final records say so.
    wanted = pa.array(sorted({k[2] for k in found}))
    for path in parts(parts_dir):
        table = pq.read_table(path, columns=["row_id", "model", "request_hash", "final"])
        table = table.filter(pc.field("final") & pc.field("request_hash").isin(wanted))
        settled.update(zip(*(table.column(c).to_pylist() for c in _KEY_COLUMNS), strict=True))
    for segment in segments(journal_dir):
        settled.update(
            (r["row_id"], r["model"], r["request_hash"])
            for r in read_segment(segment)
            if r.get("final")
        )
    return {key: value for key, value in found.items() if key not in settled}


_KEY_COLUMNS = ("row_id", "model", "request_hash")

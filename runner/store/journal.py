"""The journal: append-only JSONL segments of finished attempts, group-committed with fsync.

A record is acknowledged once one `os.write` on an O_APPEND descriptor has returned (it then
survives kill -9); fsync after every ~1,000 records or ~200 ms makes it survive power loss too.
That fsync runs in a worker thread, one at a time: on a busy disk one took ~4.5 ms, and 200
of them in the event loop held up a 20,000-row run (bench/run.py W1) for ~0.9 s. Even in a
thread each costs the event loop: the thread takes the GIL twice, and the loop waits for it
back; at W1's ~7,000 answers a second, fsyncs every 100 records took ~3 us a row (2-3 % of the
run's wall time), every 1,000 next to nothing. A failed fsync is raised by the next append or
commit, never ignored; `commit` and `close` wait for it.
A crash can leave a torn last line: readers ignore it and recovery truncates it. Knows the
record type, not Parquet, pools or runs.
"""

from __future__ import annotations

import errno
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from runner.errors import StorageFailed
from runner.records import ResultRecord

SEGMENT_GLOB = "segment-*.jsonl"
FSYNC_EVERY = 1_000  # records between fsyncs at most (and ~200 ms): see above
FILE_MODE = 0o600


_SYNCER: ThreadPoolExecutor | None = None
_SYNCER_LOCK = threading.Lock()


def _syncer() -> ThreadPoolExecutor:
    """The one worker thread that runs background fsyncs (made on first use)."""
    global _SYNCER
    with _SYNCER_LOCK:
        if _SYNCER is None:
            _SYNCER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="runner-fsync")
        return _SYNCER


def _fsync(fd: int) -> None:
    os.fsync(fd)


def segment_name(number: int) -> str:
    return f"segment-{number:06d}.jsonl"


def segment_number(path: Path) -> int:
    return int(path.stem.split("-")[1])


def storage_error(what: str, path: Path, exc: OSError) -> StorageFailed:
    """A one-line, resumable stop for a failed write, naming the cause plainly."""
    if exc.errno == errno.ENOSPC:
        cause = "the disk is full"
    elif exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        cause = "permission denied"
    else:
        cause = exc.strerror or type(exc).__name__
    return StorageFailed(f"cannot {what} {path}: {cause}")


def torn_error(path: Path) -> StorageFailed:
    """The stop for a write after a failed one whose fragment could not be taken out."""
    return StorageFailed(f"cannot write journal {path}: a failed write is left in it")


class Journal:
    """One open segment at a time; `append` writes, `commit` makes it durable."""

    def __init__(
        self,
        folder: Path,
        number: int,
        *,
        fsync_every: int | None = None,
        fsync_interval_s: float = 0.2,
    ) -> None:
        self.folder = folder
        self.number = number
        self.path = folder / segment_name(number)
        self.fsync_every = FSYNC_EVERY if fsync_every is None else fsync_every
        self.fsync_interval_s = fsync_interval_s
        self.records = 0
        self.longest = 0  # the longest line written, newline included (bytes)
        self._unsynced = 0
        self._last_sync = time.monotonic()
        # The background fsync under way, and how many records it covers.
        self._syncing: Future[None] | None = None
        self._syncing_records = 0
        try:
            self._fd: int | None = os.open(
                self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, FILE_MODE
            )
            # The segment's length once every append so far is in: a failed write is cut
            # back to it (see append).
            self._size = os.fstat(self._fd).st_size
        except OSError as exc:
            raise storage_error("create journal segment", self.path, exc) from None
        self._torn = False

    def append(self, records: Sequence[ResultRecord]) -> None:
        """Write records as JSON lines in one system call; fsync when the group is due."""
        if self._fd is None:
            raise RuntimeError("journal segment is closed")
        if self._syncing is not None and self._syncing.done():
            self._collect()  # a failed fsync stops the run before more is written
        if self._torn:
            raise torn_error(self.path)
        dumps, newline = orjson.dumps, orjson.OPT_APPEND_NEWLINE
        lines = [dumps(r, option=newline) for r in records]
        data = b"".join(lines)
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                if not written:
                    raise OSError(errno.EIO, "no byte was written")
                view = view[written:]
        except OSError as exc:
            if len(view) < len(data):
                self._cut_back()
            raise storage_error("write journal", self.path, exc) from None
        self._size += len(data)
        self.records += len(records)
        if lines:
            self.longest = max(self.longest, max(map(len, lines)))
        self._unsynced += len(records)
        if (
            self._unsynced >= self.fsync_every
            or time.monotonic() - self._last_sync >= self.fsync_interval_s
        ):
            syncing = self._syncing
            if syncing is not None and syncing.done() and syncing.exception() is not None:
                # Failed while this batch was written: the batch is journaled (raising now
                # would have it written again); the next append or commit raises it.
                return
            self.sync_soon()

    @property
    def torn(self) -> bool:
        """A failed write's fragment is left in the segment (see `_cut_back`)."""
        return self._torn

    def _cut_back(self) -> None:
        """Take out what a failed write let through (a full disk can take part of a batch,
        then refuse the rest): the caller writes the batch again once there is room, and a
        fragment left before it would be a corrupt line in the middle of the segment, or a
        record twice. If even that fails, nothing more is written to this segment: the
        fragment stays its last line, which recovery truncates."""
        assert self._fd is not None
        try:
            os.ftruncate(self._fd, self._size)
        except OSError:
            self._torn = True

    def sync_soon(self) -> None:
        """Start an fsync of what is written in a worker thread, unless one is under way;
        raises the failure of an earlier one."""
        if self._syncing is not None:
            if not self._syncing.done():
                return
            self._collect()
        if self._fd is None or not self._unsynced:
            return
        self._syncing_records = self._unsynced
        self._last_sync = time.monotonic()
        self._syncing = _syncer().submit(_fsync, self._fd)

    def _collect(self) -> None:
        """Wait for the background fsync, if any; raise its failure."""
        syncing, self._syncing = self._syncing, None
        if syncing is None:
            return
        exc = syncing.exception()
        if isinstance(exc, OSError):
            raise storage_error("fsync journal", self.path, exc) from None
        if exc is not None:
            raise exc
        self._unsynced -= self._syncing_records
        self._syncing_records = 0

    def commit(self) -> None:
        """fsync the segment now; an fsync error is fatal, never ignored."""
        self._collect()
        if self._fd is None or not self._unsynced:
            return
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise storage_error("fsync journal", self.path, exc) from None
        self._unsynced = 0
        self._last_sync = time.monotonic()

    def close(self) -> None:
        if self._fd is None:
            return
        try:
            self.commit()
        finally:
            os.close(self._fd)
            self._fd = None


def read_segment(path: Path, *, repair: bool = False) -> list[dict[str, Any]]:
    """All whole records of a segment. A torn or garbled last line is ignored (and cut
    off when `repair`); a bad line elsewhere means real corruption and raises."""
    data = path.read_bytes()
    records: list[dict[str, Any]] = []
    lines = data.split(b"\n")
    # A file ending in "\n" splits into [..., b""]: the final element is the torn tail, if any.
    tail = lines.pop()
    good_bytes = len(data) - len(tail)
    for number, line in enumerate(lines, start=1):
        if not line:
            continue
        try:
            records.append(orjson.loads(line))
        except orjson.JSONDecodeError:
            if number == len(lines) and not tail:
                good_bytes -= len(line) + 1
                break
            raise StorageFailed(f"{path}:{number}: journal line is corrupt") from None
    if repair and good_bytes != len(data):
        with path.open("r+b") as handle:
            handle.truncate(good_bytes)
            handle.flush()
            os.fsync(handle.fileno())
    return records


def segments(folder: Path) -> Iterator[Path]:
    """Journal segments in order."""
    return iter(sorted(folder.glob(SEGMENT_GLOB), key=segment_number))

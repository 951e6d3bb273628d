"""The start log: every request a session puts on the wire, written before its first byte.

Owns `journal/starts-NNNNNN.log` (not `*.jsonl`, which journal readers glob). state.py reads
it after a crash to count what may be bought again. Imports only `journal` from the package.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from pathlib import Path

import orjson

from runner.store.journal import storage_error

START_GLOB = "starts-*.log"  # not *.jsonl: that is what journal readers glob
# Bytes allocated and mapped for each file: ~4,500 entries, more than a tick's worth at the
# highest rates measured (a file may be made larger; one that fills up is rotated early).
MAPPED_BYTES = 256 * 1024


class StartLog:
    """A write-ahead log of the requests a session puts on the wire, for crash accounting.

    Each attempt is written before its bytes are sent, so after a crash the log lists every
    request that may have reached the server; those without a journaled record may have been
    billed and are bought again on resume. The snapshot this replaced was written every tick,
    after the fact, and missed every request started since (41 counted vs 277 re-bought over
    22 kills).

    Written into a shared memory map of the file (its blocks allocated up front, so a full
    disk fails when a file is made, never as a fault mid-run): a store to the mapping is in
    the page cache at once and survives kill -9 without an fsync, as the `os.write` per
    request this replaced did, for a copy instead of a system call (~1-6 us a request, more
    while the journal's fsync runs). The unused rest of a file is zero bytes, which readers
    skip as they skip a torn line. Where a file cannot be mapped, each entry is one
    `os.write` on an O_APPEND descriptor.

    To keep it small, `rotate` (every tick) starts a new file holding the requests still in
    flight, then deletes the old one: at every instant the files on disk cover every request
    that is in flight or whose record may not be journaled yet.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._fd: int | None = None
        self._path: Path | None = None
        self._map: mmap.mmap | None = None
        self._end = 0  # bytes written into the mapping
        numbers = [int(p.stem.split("-")[1]) for p in folder.glob(START_GLOB)]
        self._number = max(numbers, default=0)
        # What each request logged since the last rotation may cost (written with it).
        self._worst: dict[tuple[str, str, int], float] = {}

    def _open_next(self, first: bytes) -> None:
        self._number += 1
        path = self.folder / f"starts-{self._number:06d}.log"
        size = max(MAPPED_BYTES, 2 * len(first))
        mapped: mmap.mmap | None = None
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_EXCL, 0o600)
            try:
                os.posix_fallocate(fd, 0, size)
                mapped = mmap.mmap(fd, size)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EIO):
                    os.close(fd)
                    path.unlink(missing_ok=True)
                    raise
                # No mapping here (a file system without it): one write per entry instead.
                os.ftruncate(fd, 0)
                os.close(fd)
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
            if mapped is not None:
                mapped[: len(first)] = first
            elif first:
                os.write(fd, first)
        except OSError as exc:
            raise storage_error("write", path, exc) from None
        self._close_file()
        self._fd, self._path, self._map, self._end = fd, path, mapped, len(first)

    def _close_file(self, *, delete: bool = True) -> None:
        mapped, fd, path = self._map, self._fd, self._path
        self._map = self._fd = self._path = None
        if mapped is not None:
            mapped.close()
        if fd is not None:
            os.close(fd)
        if delete and path is not None:
            path.unlink(missing_ok=True)

    def started(self, entry: tuple[str, str, int], worst_usd: float = 0.0) -> None:
        """Log a request about to be sent, with what it may cost (its worst case, counted
        against the budget on resume when it never got a record); synchronous, before the
        request's first byte."""
        if self._fd is None:
            self._open_next(b"")
        self._worst[entry] = worst_usd
        line = orjson.dumps([*entry, worst_usd]) + b"\n"
        mapped = self._map
        if mapped is not None:
            end = self._end + len(line)
            if end <= len(mapped):
                mapped[self._end : end] = line
                self._end = end
                return
            # Full: a new file with every entry since the last rotation (this one included).
            self._open_next(self._lines(self._worst))
            return
        assert self._fd is not None
        try:
            os.write(self._fd, line)
        except OSError as exc:
            raise storage_error("write", self._path or self.folder, exc) from None

    @staticmethod
    def _lines(entries: dict[tuple[str, str, int], float]) -> bytes:
        return b"".join(orjson.dumps([*e, worst]) + b"\n" for e, worst in entries.items())

    def rotate(self, in_flight: set[tuple[str, str, int]]) -> None:
        """Start a new file with what is in flight now and drop the old one."""
        if self._fd is None and not in_flight:
            return
        worst = self._worst
        self._worst = {e: worst.get(e, 0.0) for e in in_flight}
        self._open_next(self._lines(self._worst))

    def close(self) -> None:
        self._close_file(delete=False)

    @staticmethod
    def read(path: Path) -> dict[tuple[str, str, int], float]:
        """The entries of one file and what each may cost (0 when older versions wrote no
        cost); a torn last line (a kill mid-write) is skipped."""
        found: dict[tuple[str, str, int], float] = {}
        try:
            lines = path.read_bytes().splitlines()
        except OSError:
            return found
        for line in lines:
            with contextlib.suppress(ValueError, TypeError):
                row_id, model, attempt, *rest = orjson.loads(line)
                worst = float(rest[0]) if rest else 0.0
                key = (str(row_id), str(model), int(attempt))
                found[key] = max(found.get(key, 0.0), worst if worst >= 0 else 0.0)
        return found

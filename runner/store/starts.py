"""The start log: every request a session puts on the wire, written before its first byte.

Owns `journal/starts-NNNNNN.log` (not `*.jsonl`, which journal readers glob). state.py reads
it after a crash to count what may be bought again. Imports only `journal` from the package.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import orjson

from runner.store.journal import storage_error

START_GLOB = "starts-*.log"  # not *.jsonl: that is what journal readers glob


class StartLog:
    """A write-ahead log of the requests a session puts on the wire, for crash accounting.

    Each attempt is appended (one `os.write` on an O_APPEND fd: it survives kill -9 without
    an fsync) before its bytes are sent, so after a crash the log lists every request that
    may have reached the server; those without a journaled record may have been billed and
    are bought again on resume. The snapshot this replaced was written every tick, after the
    fact, and missed every request started since (41 counted vs 277 re-bought over 22 kills).

    To keep it small, `rotate` (every tick) starts a new file holding the requests still in
    flight, then deletes the old one: at every instant the files on disk cover every request
    that is in flight or whose record may not be journaled yet.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._fd: int | None = None
        self._path: Path | None = None
        numbers = [int(p.stem.split("-")[1]) for p in folder.glob(START_GLOB)]
        self._number = max(numbers, default=0)
        # What each request logged since the last rotation may cost (written with it).
        self._worst: dict[tuple[str, str, int], float] = {}

    def _open_next(self, first: bytes) -> None:
        self._number += 1
        path = self.folder / f"starts-{self._number:06d}.log"
        try:
            fd = os.open(
                path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_EXCL, 0o600
            )
            if first:
                os.write(fd, first)
        except OSError as exc:
            raise storage_error("write", path, exc) from None
        old_fd, old_path = self._fd, self._path
        self._fd, self._path = fd, path
        if old_fd is not None:
            os.close(old_fd)
        if old_path is not None:
            old_path.unlink(missing_ok=True)

    def started(self, entry: tuple[str, str, int], worst_usd: float = 0.0) -> None:
        """Log a request about to be sent, with what it may cost (its worst case, counted
        against the budget on resume when it never got a record); synchronous, before the
        request's first byte."""
        if self._fd is None:
            self._open_next(b"")
        assert self._fd is not None
        self._worst[entry] = worst_usd
        try:
            os.write(self._fd, orjson.dumps([*entry, worst_usd]) + b"\n")
        except OSError as exc:
            raise storage_error("write", self._path or self.folder, exc) from None

    def rotate(self, in_flight: set[tuple[str, str, int]]) -> None:
        """Start a new file with what is in flight now and drop the old one."""
        if self._fd is None and not in_flight:
            return
        worst = self._worst
        self._worst = {e: worst.get(e, 0.0) for e in in_flight}
        self._open_next(b"".join(orjson.dumps([*e, self._worst[e]]) + b"\n" for e in in_flight))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

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

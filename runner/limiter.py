"""Pacing shared by every worker: the pool-wide pause after a 429.

Owns the decision of *when* the next request may start. Knows nothing of HTTP or results;
the pool tells it what happened. (Request/token buckets and adaptive concurrency belong here
too as they arrive.) Waits are computed deadlines, never polling loops.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import anyio


class Limiter:
    """Gates request starts; one instance per run, shared by all workers."""

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._resume_at = 0.0
        self.pauses = 0

    def pause_for(self, seconds: float) -> None:
        """Hold every worker for `seconds` (a 429's Retry-After): one pause for the pool."""
        until = self._clock() + max(seconds, 0.0)
        if until > self._resume_at:
            self._resume_at = until
            self.pauses += 1

    @property
    def paused_for(self) -> float:
        return max(self._resume_at - self._clock(), 0.0)

    async def ready(self) -> None:
        """Return when a request may start; sleeps to the computed resume instant."""
        wait = self._resume_at - self._clock()
        if wait > 0:
            await anyio.sleep(wait)
            # Another 429 may have pushed the resume instant further meanwhile.
            await self.ready()

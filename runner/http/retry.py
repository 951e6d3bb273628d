"""The retry policy: what is retried, how long to wait, and when to give up.

Policy as data (keyword-only options with units: attempts *and* a total deadline, an explicit
retryable set, a backoff hook that honours Retry-After). The only module that imports
tenacity. Knows errors, not HTTP: the headers it reads arrive on `AttemptError.headers`.
"""

from __future__ import annotations

import email.utils
import math
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import anyio
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
    stop_before_delay,
)

from runner.errors import AttemptError

T = TypeVar("T")
OnRetry = Callable[[AttemptError, int, float], Awaitable[None]]


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from `retry-after-ms`, else `Retry-After` (seconds or an HTTP date).

    Returns None when no usable value is present; never a negative number.
    """
    raw_ms = headers.get("retry-after-ms")
    if raw_ms is not None:
        try:
            value = float(raw_ms) / 1000
        except ValueError:
            value = None
        if value is not None and math.isfinite(value):
            return max(value, 0.0)
    raw = headers.get("retry-after")
    if raw is None:
        return None
    raw = raw.strip()
    try:
        seconds = float(raw)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(raw)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if not math.isfinite(seconds):
        return None
    return max(seconds, 0.0)


def should_retry_header(headers: Mapping[str, str]) -> bool | None:
    """The server's `x-should-retry: true|false` override, if it sent one."""
    value = headers.get("x-should-retry", "").strip().lower()
    return {"true": True, "false": False}.get(value)


def _full_jitter(ceiling: float) -> float:
    return random.uniform(0, ceiling)


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """When and how long to retry one row's request."""

    max_attempts: int = 6
    deadline_s: float = 900.0  # total for one row: attempts plus waits
    base_delay_s: float = 0.5
    max_delay_s: float = 60.0
    max_retry_after_s: float = 120.0
    jitter: Callable[[float], float] = _full_jitter
    # Tests swap in a sleep that returns at once; production waits for real.
    sleep: Callable[[float], Awaitable[None]] = field(default=anyio.sleep)

    def is_retryable(self, exc: BaseException) -> bool:
        if not isinstance(exc, AttemptError):
            return False  # programming errors and cancellation are never retried
        override = should_retry_header(exc.headers)
        return exc.retryable if override is None else override

    def delay(self, attempt_number: int, exc: BaseException | None) -> float:
        """Seconds to wait after failed attempt `attempt_number` (1-based)."""
        if isinstance(exc, AttemptError):
            hinted = parse_retry_after(exc.headers)
            if hinted is not None:
                return min(hinted, self.max_retry_after_s)
        ceiling = min(self.max_delay_s, self.base_delay_s * 2 ** (attempt_number - 1))
        return self.jitter(ceiling)

    def retrying(self, on_retry: OnRetry | None = None, *, done: int = 0) -> AsyncRetrying:
        """A tenacity controller for one worker (reuse it row after row, not concurrently).

        `done` attempts already happened outside it: they count toward the attempt cap and
        the backoff exponent, and hooks see the true attempt numbers.
        """

        async def before_sleep(state: RetryCallState) -> None:
            if on_retry is not None and state.outcome is not None:
                exc = state.outcome.exception()
                if isinstance(exc, AttemptError):
                    await on_retry(exc, state.attempt_number + done, state.upcoming_sleep)

        return AsyncRetrying(
            stop=stop_after_attempt(self.max_attempts - done) | stop_before_delay(self.deadline_s),
            wait=lambda state: self.delay(
                state.attempt_number + done,
                state.outcome.exception() if state.outcome else None,
            ),
            retry=retry_if_exception(self.is_retryable),
            sleep=self.sleep,
            before_sleep=before_sleep,
            reraise=True,
        )


class Retrier:
    """Runs calls under a policy for one worker: the first attempt bare, the rest in tenacity.

    Most rows succeed on the first attempt; sparing them tenacity's per-call set-up (it
    inspects every hook for coroutine-ness on every call) saved ~10 % of the runner's CPU.
    """

    def __init__(self, policy: RetryPolicy, on_retry: OnRetry | None = None) -> None:
        self.policy = policy
        self.on_retry = on_retry
        self._rest = policy.retrying(on_retry, done=1) if policy.max_attempts > 1 else None

    async def __call__(self, attempt: Callable[[], Awaitable[T]]) -> T:
        try:
            return await attempt()
        except AttemptError as exc:
            failed = exc
        return await self.after(failed, attempt)

    async def after(self, failed: AttemptError, attempt: Callable[[], Awaitable[T]]) -> T:
        """The rest of a call whose first attempt (made by the caller, awaited bare: one
        coroutine fewer on the way of every answer) failed with `failed`."""
        if self._rest is None or not self.policy.is_retryable(failed):
            raise failed
        wait = self.policy.delay(1, failed)
        if self.on_retry is not None:
            await self.on_retry(failed, 1, wait)
        await self.policy.sleep(wait)
        result: T = await self._rest(attempt)
        return result

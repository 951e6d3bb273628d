"""Pacing shared by every worker: 429 pauses, request/token buckets, adaptive concurrency.

Owns the decision of *when* the next request may start. Knows nothing of HTTP or results;
the pool tells it what happened (an outcome, the tokens used, the response headers), and
runner/engine/rate_headers.py reads those headers. Imports only anyio, the standard library and
that module. Waits are
computed deadlines or wake-ups, never polling loops; every time-based piece takes an
injected clock (and the limiter an injected sleep) so tests need no real sleeps.

    Limiter.acquire(est_tokens) ──> concurrency slot (AIMD limit) ──> gate (one head waiter)
        └─> pause, request bucket, token bucket: checked and debited in one synchronous step
    Limiter.release(ticket, outcome=..., used_tokens=..., headers=...)
        └─> frees the slot, settles the token reservation, observe(headers), feeds AIMD
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Literal, Protocol

import anyio

from runner.engine.rate_headers import RateHeaders, parse_rate_headers

PacingSignal = Literal["ok", "rate_limited", "error"]
_OUTCOMES = frozenset(("ok", "rate_limited", "error"))

# 429s without rate-limit headers count as a rate limit (halve the concurrency, pause the
# pool) only when dense: _DENSE_429_MIN in a row, or at least _DENSE_429_SHARE of the last
# _RECENT answers (and that many). 3 % random 429s at concurrency 16 halved it to 3-6 and cut
# throughput to a third; three in a row happen by chance about once in 40,000 answers.
_RECENT = 50
_DENSE_429_SHARE = 0.2
_DENSE_429_MIN = 3


# --- token bucket --------------------------------------------------------------------------


class TokenBucket:
    """A token bucket holding at most `per_minute`, refilled continuously at `per_minute`/60 s.

    Times are seconds on the caller's clock (the limiter's monotonic clock); an instant earlier
    than one already seen counts as that one. The level may go negative (debt) when real usage
    turns out larger than the reservation; nothing is granted until the debt is paid back.

    An amount larger than the capacity could never be granted by the classic rule, so it is
    granted when the bucket is full and leaves it in debt: a huge request waits for a full
    bucket, then its excess delays everything after it.
    """

    __slots__ = ("_held_until", "_level", "_updated", "capacity", "granted", "rate")

    def __init__(self, per_minute: float, *, now: float = 0.0) -> None:
        if not per_minute > 0 or not math.isfinite(per_minute):
            raise ValueError(f"a bucket needs a positive finite rate, not {per_minute!r}")
        self.capacity = float(per_minute)
        self.rate = self.capacity / 60.0  # per second
        self._level = self.capacity  # starts full
        self._updated = now
        self._held_until = -math.inf  # no refill before this instant (see hold)
        self.granted = 0.0  # running total of grants: tells observe() what a server missed

    def level(self, now: float) -> float:
        """Tokens available at `now` (negative while in debt)."""
        self._refill(now)
        return self._level

    def set_rate(self, per_minute: float, now: float) -> None:
        """Change the capacity and refill rate (a limit learned from the server)."""
        if not per_minute > 0 or not math.isfinite(per_minute):
            raise ValueError(f"a bucket needs a positive finite rate, not {per_minute!r}")
        self._refill(now)
        self.capacity = float(per_minute)
        self.rate = self.capacity / 60.0
        self._level = min(self._level, self.capacity)

    def wait_time(self, amount: float, now: float) -> float:
        """Seconds until `amount` could be granted (0 if now); debits nothing."""
        self._refill(now)
        target = min(amount, self.capacity)
        deficit = target - self._level
        if deficit <= 1e-9 * max(1.0, target):  # float slack: a computed deadline must suffice
            return 0.0
        return max(self._held_until - now, 0.0) + deficit / self.rate

    def try_acquire(self, amount: float, now: float) -> float:
        """Debit `amount` and return 0, or return the seconds to wait and debit nothing."""
        wait = self.wait_time(amount, now)
        if wait == 0.0:
            self._level -= amount
            self.granted += amount
        return wait

    def adjust(self, delta: float, now: float) -> None:
        """Correct a grant once real usage is known: `delta` = used - reserved (may be < 0)."""
        self._refill(now)
        self._level = min(self._level - delta, self.capacity)

    def refund(self, amount: float, now: float) -> None:
        """Give back `amount` that was reserved but not used."""
        self.adjust(-amount, now)

    def observe(self, remaining: float, now: float, *, since: float = 0.0) -> None:
        """Follow the server's view: the level becomes what the server says is left, less
        `since` (what was granted after the server counted; it had not seen those yet), up
        or down, never above the capacity.

        Up as well as down: after a sliding window's wait its slots free as fast as the
        oldest requests leave, and only the server's count says so; following the bucket's
        own refill alone took 2,400 requests through 1,200/min in ~114 s instead of ~61 s.
        The refill rate stays this bucket's own (the limit per minute): the server's reset
        time is not used. An earlier version also slowed the refill to
        `(limit - remaining) / reset_s`; against a sliding window that throttled a run to a
        fifth of its limit for half a minute after every window turnover (bench/ratelimit.py:
        83 % of the limit over 150 s, 120 % without it).
        """
        self._refill(now)
        self._level = min(remaining - since, self.capacity)

    def hold(self, until: float, now: float) -> None:
        """Empty the bucket and refill nothing before `until` (a rate limit's Retry-After):
        what comes after the wait is paced by the server's counts, not a bucket that filled
        up unseen while everyone waited."""
        self._refill(now)
        self._level = min(self._level, 0.0)
        self._held_until = max(self._held_until, until)

    def _refill(self, now: float) -> None:
        start = max(self._updated, self._held_until)
        if now > start:
            self._level = min(self._level + (now - start) * self.rate, self.capacity)
        self._updated = max(self._updated, now)


# --- adaptive concurrency ------------------------------------------------------------------


class AIMD:
    """Additive-increase, multiplicative-decrease concurrency limit.

    Grows by one slot per `window` clean answers (default: the current limit, about one slot
    per round of requests); halves on a 429, once per burst. A burst is the 429s of requests
    that were already in flight when the limit was cut (they were sent under the old limit;
    pass the `epoch` the request started in to tell them apart) plus anything within
    `cooldown_s` of the cut. So 64 simultaneous 429s halve once, not 64 times. The limit
    stays within [minimum, maximum].
    """

    __slots__ = (
        "_clean",
        "_cut_at",
        "cooldown_s",
        "cuts",
        "epoch",
        "limit",
        "maximum",
        "minimum",
        "window",
    )

    def __init__(
        self,
        initial: int,
        *,
        minimum: int = 1,
        maximum: int | None = None,
        window: int | None = None,
        cooldown_s: float = 1.0,
    ) -> None:
        if minimum < 1:
            raise ValueError(f"minimum must be at least 1, not {minimum}")
        if maximum is not None and maximum < minimum:
            raise ValueError(f"maximum {maximum} is below minimum {minimum}")
        if window is not None and window < 1:
            raise ValueError(f"window must be at least 1, not {window}")
        self.minimum = minimum
        self.maximum = maximum
        self.window = window
        self.cooldown_s = cooldown_s
        self.limit = self._bounded(initial)
        self.epoch = 0  # bumped at every cut
        self.cuts = 0
        self._clean = 0  # clean answers since the last change
        self._cut_at = -math.inf

    def _bounded(self, value: int) -> int:
        value = max(value, self.minimum)
        return value if self.maximum is None else min(value, self.maximum)

    def on_success(self, *, started_epoch: int | None = None) -> bool:
        """Count a clean answer; True if the limit grew."""
        if started_epoch is not None and started_epoch < self.epoch:
            return False  # sent under the old, larger limit: no evidence about the new one
        self._clean += 1
        if self._clean < (self.window or self.limit):
            return False
        self._clean = 0
        grown = self._bounded(self.limit + 1)
        if grown == self.limit:
            return False
        self.limit = grown
        return True

    def on_rate_limited(self, now: float, *, started_epoch: int | None = None) -> bool:
        """Halve the limit unless this 429 belongs to the burst already answered; True if cut."""
        if started_epoch is not None and started_epoch < self.epoch:
            return False
        if now - self._cut_at < self.cooldown_s:
            return False
        self._cut_at = now
        self._clean = 0
        self.epoch += 1
        self.cuts += 1
        self.limit = self._bounded(self.limit // 2)
        return True


# --- the limiter ---------------------------------------------------------------------------


class SharedQuota(Protocol):
    """Room shared with other processes (a Ray cluster's per-key budget, runner/cluster/):
    a request starts only when it has room here too. Times are the limiter's clock."""

    def attach(self, wake: Callable[[], None]) -> None:
        """`wake()` makes the limiter's waiting head re-check at once (room arrived)."""

    def wait_time(self, tokens: int, now: float) -> float:
        """Seconds until one request of `tokens` could start (0: now); takes nothing."""

    def take(self, tokens: int, now: float) -> None:
        """One request of `tokens` starts (right after a `wait_time` of 0)."""

    def settle(self, delta_tokens: int) -> None:
        """A request used `delta_tokens` more (negative: fewer) than it took."""

    def rate_limited(self, seconds: float) -> None:
        """This limiter paused for a rate limit (a 429's Retry-After): so must the others."""

    def refused(self, reason: str) -> None:
        """The provider refused for lack of quota: the others must stop too."""

    def learned(self, requests_per_minute: int | None, tokens_per_minute: int | None) -> None:
        """The server stated its limits (`x-ratelimit-limit-*`): the shared quota follows."""


class _Slots:
    """A first-come, first-served counting semaphore whose size may change.

    Taking a free slot is a comparison and an increment, no await: anyio's CapacityLimiter
    (borrower sets, a checkpoint-free path still two method calls and a set insertion each
    way) cost ~12,000 instructions a request on bench/run.py W1.
    """

    __slots__ = ("_waiters", "limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: deque[anyio.Event] = deque()

    def take_nowait(self) -> bool:
        # No one waits while a slot is free (`_admit` runs whenever one frees or the limit
        # rises), so a newcomer taking it never jumps the queue.
        if self.used < self.limit:
            self.used += 1
            return True
        return False

    async def take(self) -> None:
        """Wait in line for a slot."""
        if self.take_nowait():
            return
        granted = anyio.Event()
        self._waiters.append(granted)
        try:
            await granted.wait()
        except BaseException:
            if granted.is_set():
                self.give_back()  # handed over as this task was cancelled: pass it on
            else:
                self._waiters.remove(granted)
            raise

    def give_back(self) -> None:
        self.used -= 1
        self._admit()

    def resize(self, limit: int) -> None:
        """Lowering it lets the slots taken above it drain; raising it admits waiters."""
        self.limit = limit
        self._admit()

    def _admit(self) -> None:
        waiters = self._waiters
        while waiters and self.used < self.limit:
            self.used += 1  # taken on the waiter's behalf: no newcomer can slip in between
            waiters.popleft().set()


@dataclass(slots=True, eq=False)
class Ticket:
    """One granted request start; hand it back to `Limiter.release` exactly once.

    Compared by identity.
    """

    est_tokens: int
    epoch: int = 0
    granted_at: float = 0.0
    request_mark: float | None = None  # the request bucket's `granted` after this grant
    token_mark: float | None = None
    released: bool = False


def tokens_to_reserve(prompt_tokens: int, max_tokens: int | None, *, completion: int = 256) -> int:
    """Tokens to reserve for a request: the prompt estimate plus `max_tokens` (else a guess).

    Providers count `max_tokens` against a token limit when the request arrives, so reserve
    it; `release` corrects the reservation with the real usage.
    """
    return max(prompt_tokens, 0) + (completion if max_tokens is None else max(max_tokens, 0))


class Limiter:
    """Gates request starts; one instance per run (or per model), shared by all workers.

    With nothing configured it only holds the pool-wide 429 pause, as `ready()` always did.
    `requests_per_minute` / `tokens_per_minute` add token buckets; `concurrency` adds a slot
    limit that, when `adaptive`, follows an AIMD controller (never above `concurrency`).
    When `adaptive`, `x-ratelimit-*` headers passed to `release` also teach the buckets the
    server's limits (never above a configured one) and clamp them to what the server says is
    left; a bucket is created from headers when none was configured.
    """

    def __init__(
        self,
        *,
        requests_per_minute: float | None = None,
        tokens_per_minute: float | None = None,
        concurrency: int | None = None,
        adaptive: bool = True,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        sleep: Callable[[float], Awaitable[None]] = anyio.sleep,
        quota: SharedQuota | None = None,
    ) -> None:
        if concurrency is not None and concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, not {concurrency}")
        self._clock = clock
        self._wall_clock = wall_clock
        self._sleep = sleep
        self.adaptive = adaptive
        self._resume_at = 0.0
        self._rpm = requests_per_minute
        self._tpm = tokens_per_minute
        now = clock()
        self._requests = (
            None if requests_per_minute is None else TokenBucket(requests_per_minute, now=now)
        )
        self._tokens = (
            None if tokens_per_minute is None else TokenBucket(tokens_per_minute, now=now)
        )
        self._concurrency = concurrency
        self._aimd = (
            AIMD(concurrency, maximum=concurrency) if adaptive and concurrency is not None else None
        )
        self._slots = None if concurrency is None else _Slots(concurrency)
        # One task at a time waits on the pause and the buckets; the rest queue here in order.
        self._gate = anyio.Lock()
        self._doze: anyio.CancelScope | None = None
        self._in_flight_tokens = 0
        self._quota = quota
        if quota is not None:
            quota.attach(self.wake)
        # The last outcomes (True: a 429), to tell a rate limit from isolated 429s.
        self._recent: deque[bool] = deque(maxlen=_RECENT)
        self._recent_429 = 0
        self._429_in_a_row = 0
        # Counters for reports and the progress bar.
        self.pauses = 0
        self.rate_limited = 0
        self.waits_s = 0.0
        self.in_flight = 0

    # -- the pool-wide pause (unchanged API) --

    def pause_for(self, seconds: float) -> None:
        """Hold every worker for `seconds` (a 429's Retry-After): one pause for the pool."""
        until = self._clock() + max(seconds, 0.0)
        if until > self._resume_at:
            self._resume_at = until
            self.pauses += 1

    def pause_after_429(self, seconds: float, headers: Mapping[str, str] | None = None) -> bool:
        """Pause the pool for a 429's Retry-After when it is a rate limit; True if paused.

        A 429 is a rate limit when it says so (x-ratelimit-* headers) or when 429s are dense
        among the last answers (see `limited`). An isolated 429 without headers (a router's
        hiccup, a busy upstream) only delays its own row, by its own Retry-After.
        """
        if not self.limited(headers):
            return False
        self.pause_for(seconds)
        now = self._clock()
        for bucket in (self._requests, self._tokens):
            if bucket is not None:
                bucket.hold(now + max(seconds, 0.0), now)
        if self._quota is not None:
            self._quota.rate_limited(seconds)
        return True

    def refused_for_quota(self, reason: str) -> None:
        """The provider refused for lack of quota (the run stops): tell the shared quota."""
        if self._quota is not None:
            self._quota.refused(reason)

    def wake(self) -> None:
        """Make the waiting head re-check now (a shared quota's room arrived)."""
        if self._doze is not None:
            self._doze.cancel()

    def limited(self, headers: Mapping[str, str] | None = None) -> bool:
        """Whether a 429 with these headers means the pool is over a rate limit."""
        if headers and parse_rate_headers(headers, self._wall_clock()) is not None:
            return True
        if self._429_in_a_row >= _DENSE_429_MIN:
            return True
        seen = len(self._recent)
        return self._recent_429 >= max(_DENSE_429_MIN, _DENSE_429_SHARE * seen)

    def _note_outcome(self, rate_limited: bool) -> None:
        recent = self._recent
        if len(recent) == recent.maxlen:
            self._recent_429 -= recent[0]
        recent.append(rate_limited)
        self._recent_429 += rate_limited
        self._429_in_a_row = self._429_in_a_row + 1 if rate_limited else 0

    @property
    def paused_for(self) -> float:
        return max(self._resume_at - self._clock(), 0.0)

    async def ready(self) -> None:
        """Return when a request may start; sleeps to the computed resume instant."""
        wait = self._resume_at - self._clock()
        if wait > 0:
            await self._sleep(wait)
            # Another 429 may have pushed the resume instant further meanwhile.
            await self.ready()

    # -- what reports and the progress bar read --

    @property
    def concurrency_limit(self) -> int | None:
        """The current concurrency limit (the AIMD one when adaptive); None when unlimited."""
        return self._aimd.limit if self._aimd is not None else self._concurrency

    @property
    def requests_per_minute(self) -> float | None:
        """The request limit in force (configured or learned from headers)."""
        return None if self._requests is None else self._requests.capacity

    @property
    def tokens_per_minute(self) -> float | None:
        """The token limit in force (configured or learned from headers)."""
        return None if self._tokens is None else self._tokens.capacity

    # -- acquire / release --

    def try_acquire(self, est_tokens: int = 0) -> Ticket | None:
        """`acquire` when it would not wait: a ticket if a slot and room are free now and
        nobody is queued, else None (and nothing taken: await `acquire` then). No coroutine
        to make and run for the usual request."""
        slots = self._slots
        if (slots is not None and slots.used >= slots.limit) or self._gate.locked():
            return None
        ticket = Ticket(est_tokens=max(int(est_tokens), 0))
        if self._grant_or_wait(ticket) > 0:
            return None
        if slots is not None:
            slots.used += 1
        return ticket

    async def acquire(self, est_tokens: int = 0) -> Ticket:
        """Wait for a slot, the pause, and room in both buckets; then take them, all at once.

        `est_tokens` is reserved from the token bucket (see `tokens_to_reserve`). The checks
        and the debit happen in one synchronous step, so no other worker can slip in between.
        """
        ticket = Ticket(est_tokens=max(int(est_tokens), 0))
        started = self._clock()
        slots = self._slots
        if slots is not None and not slots.take_nowait():
            await slots.take()
        try:
            # Fast path: nobody is queued and everything has room: no await at all.
            if self._gate.locked() or self._grant_or_wait(ticket) > 0:
                async with self._gate:
                    while (wait := self._grant_or_wait(ticket)) > 0:
                        await self._sleep_or_wake(wait)
        except BaseException:
            if slots is not None:
                slots.give_back()
            raise
        self.waits_s += max(ticket.granted_at - started, 0.0)
        return ticket

    def release(
        self,
        ticket: Ticket,
        *,
        outcome: PacingSignal,
        used_tokens: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Hand back a ticket with what happened; synchronous, so safe in `finally`.

        `used_tokens` is the real usage (total tokens); None keeps the reservation as spent.
        `headers` are the response's lower-cased headers (only `x-ratelimit-*` are read).
        A second release of the same ticket does nothing.
        """
        if outcome not in _OUTCOMES:
            raise ValueError(f"outcome must be one of {sorted(_OUTCOMES)}, not {outcome!r}")
        if ticket.released:
            return
        ticket.released = True
        if self._slots is not None:
            self._slots.give_back()
        self.in_flight -= 1
        self._in_flight_tokens -= ticket.est_tokens
        now = self._clock()
        more_room = False
        tokens = self._tokens
        if used_tokens is not None and tokens is not None:
            # A bucket learned after the grant holds no reservation: debit the usage whole.
            reserved = ticket.est_tokens if ticket.token_mark is not None else 0
            tokens.adjust(used_tokens - reserved, now)
            more_room = used_tokens < reserved
        if used_tokens is not None and self._quota is not None:
            self._quota.settle(used_tokens - ticket.est_tokens)
        if headers and self.adaptive:
            seen = parse_rate_headers(headers, self._wall_clock())
            if seen is not None:
                more_room |= self._observe(seen, ticket, now)
        aimd = self._aimd
        if outcome == "rate_limited":
            self.rate_limited += 1
            self._note_outcome(True)
            if (
                aimd is not None
                and self.limited(headers)
                and aimd.on_rate_limited(now, started_epoch=ticket.epoch)
            ):
                self._set_slots(aimd.limit)
        elif outcome == "ok":
            self._note_outcome(False)
            if aimd is not None and aimd.on_success(started_epoch=ticket.epoch):
                self._set_slots(aimd.limit)
        if more_room and self._doze is not None:
            self._doze.cancel()  # the waiting head re-checks now rather than at its deadline

    def _set_slots(self, limit: int) -> None:
        # Lowering it lets the requests in flight above it drain; raising it admits waiters.
        if self._slots is not None:
            self._slots.resize(limit)

    def _grant_or_wait(self, ticket: Ticket) -> float:
        """Grant (debit everything, return 0) or return the seconds until it could be."""
        now = self._clock()
        requests, tokens = self._requests, self._tokens
        wait = self._resume_at - now
        if requests is not None:
            wait = max(wait, requests.wait_time(1, now))
        if tokens is not None:
            wait = max(wait, tokens.wait_time(ticket.est_tokens, now))
        quota = self._quota
        if quota is not None and wait <= 0:
            wait = quota.wait_time(ticket.est_tokens, now)
        if wait > 0:
            return wait
        if quota is not None:
            quota.take(ticket.est_tokens, now)
        if requests is not None:
            requests.try_acquire(1, now)
            ticket.request_mark = requests.granted
        if tokens is not None:
            tokens.try_acquire(ticket.est_tokens, now)
            ticket.token_mark = tokens.granted
        ticket.epoch = self._aimd.epoch if self._aimd is not None else 0
        ticket.granted_at = now
        self.in_flight += 1
        self._in_flight_tokens += ticket.est_tokens
        return 0.0

    async def _sleep_or_wake(self, seconds: float) -> None:
        """Sleep until the computed deadline, or until a release gives room back."""
        with anyio.CancelScope() as scope:
            self._doze = scope
            try:
                await self._sleep(seconds)
            finally:
                self._doze = None

    def _observe(self, seen: RateHeaders, ticket: Ticket, now: float) -> bool:
        """Learn limits from headers and clamp the buckets; True if a limit was raised."""
        raised = False
        if self._quota is not None and (seen.request_limit or seen.token_limit):
            self._quota.learned(seen.request_limit, seen.token_limit)
        self._requests, up = _learn(self._requests, self._rpm, seen.request_limit, now)
        raised |= up
        if self._requests is not None and seen.request_remaining is not None:
            if ticket.request_mark is not None:
                since = self._requests.granted - ticket.request_mark
            else:
                since = float(self.in_flight)  # the bucket is new: the others may be unseen
            self._requests.observe(seen.request_remaining, now, since=since)
        self._tokens, up = _learn(self._tokens, self._tpm, seen.token_limit, now)
        raised |= up
        if self._tokens is not None and seen.token_remaining is not None:
            if ticket.token_mark is not None:
                since = self._tokens.granted - ticket.token_mark
            else:
                since = float(self._in_flight_tokens)
            self._tokens.observe(seen.token_remaining, now, since=since)
        return raised


def _learn(
    bucket: TokenBucket | None, configured: float | None, limit: int | None, now: float
) -> tuple[TokenBucket | None, bool]:
    """The bucket after the server stated `limit` per minute; True if its capacity rose."""
    if limit is None or limit <= 0:
        return bucket, False
    target = float(limit) if configured is None else min(configured, float(limit))
    if bucket is None:
        return TokenBucket(target, now=now), True
    if bucket.capacity == target:
        return bucket, False
    rose = target > bucket.capacity
    bucket.set_rate(target, now)
    return bucket, rose


class Limiters:
    """The limiter for each model: a per-model one where configured, else the default."""

    __slots__ = ("default", "per_model")

    def __init__(self, default: Limiter, per_model: Mapping[str, Limiter] | None = None) -> None:
        self.default = default
        self.per_model: dict[str, Limiter] = dict(per_model or {})

    def for_model(self, model: str) -> Limiter:
        """The limiter for `model` (matched exactly, suffixes such as `:free` included)."""
        return self.per_model.get(model, self.default)

    def __iter__(self) -> Iterator[Limiter]:
        """Each distinct limiter once, the default first (for reports that sum counters)."""
        seen: set[int] = set()
        for limiter in (self.default, *self.per_model.values()):
            if id(limiter) not in seen:
                seen.add(id(limiter))
                yield limiter

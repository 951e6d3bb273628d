"""Unit tests for the limiter: header parsers, token bucket, AIMD, and acquire/release."""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

import anyio
import anyio.lowlevel
import pytest
from hypothesis import given
from hypothesis import strategies as st

from runner.engine.limiter import AIMD, Limiter, Limiters, Ticket, TokenBucket, tokens_to_reserve
from runner.engine.rate_headers import (
    RateHeaders,
    parse_go_duration,
    parse_rate_headers,
    parse_reset_seconds,
)


class FakeClock:
    """A clock that only moves when the limiter sleeps on it."""

    def __init__(self, now: float = 0.0) -> None:
        self.now = now
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds
        await anyio.lowlevel.checkpoint()


async def never_wake(seconds: float) -> None:
    """A sleep that only ends by cancellation (a wake-up), so deadlines never fire."""
    await anyio.sleep_forever()


# --- parsers -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("20ms", 0.02),
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("1h2m3.5s", 3723.5),
        ("0.5s", 0.5),
        ("150us", 150e-6),
        ("150\u00b5s", 150e-6),
        ("150\u03bcs", 150e-6),
        ("2ns", 2e-9),
        ("1m30ms", 60.03),
        (".5h", 1800.0),
        ("0", 0.0),
        (" 7s ", 7.0),
    ],
)
def test_go_duration_examples(text: str, seconds: float) -> None:
    """Go durations as OpenAI sends them parse to seconds, `ms` before `m`."""
    result = parse_go_duration(text)
    assert result is not None
    assert result == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["", "s", "1", "1.5", "-1s", "1x", "1m x", "1e5s", "abc", "1s1", "\u0663s", "9" * 80]
)
def test_go_duration_garbage(text: str) -> None:
    """Anything that is not a Go duration gives None."""
    assert parse_go_duration(text) is None


@given(
    hours=st.integers(0, 1000),
    minutes=st.integers(0, 59),
    seconds=st.integers(0, 59),
    millis=st.integers(0, 999),
    layout=st.sets(st.sampled_from(["h", "m", "s", "ms"]), min_size=1),
)
def test_go_duration_round_trip(
    hours: int, minutes: int, seconds: int, millis: int, layout: set[str]
) -> None:
    """A generated h/m/s/ms duration parses back to its value in seconds."""
    parts = {"h": hours, "m": minutes, "s": seconds, "ms": millis}
    text = "".join(f"{parts[unit]}{unit}" for unit in ("h", "m", "s", "ms") if unit in layout)
    expected = sum(parts[unit] * {"h": 3600, "m": 60, "s": 1, "ms": 0.001}[unit] for unit in layout)
    assert parse_go_duration(text) == pytest.approx(expected)


@given(seconds=st.floats(0, 1e6, allow_nan=False))
def test_go_duration_fractional_seconds(seconds: float) -> None:
    """Fractional seconds written with `s` come back unchanged."""
    assert parse_go_duration(f"{seconds:f}s") == pytest.approx(seconds, abs=1e-6)


@pytest.mark.parametrize("parse", [parse_go_duration, parse_reset_seconds])
def test_parsers_refuse_non_text(parse: Callable[[str], float | None]) -> None:
    """A value that is not text (bytes from a careless caller) gives None."""
    assert parse(b"1s") is None  # type: ignore[arg-type]


@given(text=st.text(max_size=80))
def test_go_duration_never_raises(text: str) -> None:
    """Arbitrary text gives None or a finite, non-negative number of seconds."""
    result = parse_go_duration(text)
    assert result is None or (math.isfinite(result) and result >= 0)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("20", 20.0),
        ("1.5", 1.5),
        ("0", 0.0),
        ("6m0s", 360.0),
        ("1700000060", 60.0),  # a Unix time 60 s after `now`
        ("1699999000", 0.0),  # a Unix time in the past
        ("1700000030000", 30.0),  # a Unix time in milliseconds
        ("nan", None),
        ("inf", None),
        ("-5", None),
        ("soon", None),
        ("", None),
        ("1" * 70, None),
    ],
)
def test_reset_seconds(text: str, seconds: float | None) -> None:
    """Reset values are seconds, Unix times (less `now`) or Go durations; else None."""
    assert parse_reset_seconds(text, now=1_700_000_000.0) == seconds


@given(text=st.text(max_size=80), now=st.floats(0, 2e9))
def test_reset_seconds_never_raises(text: str, now: float) -> None:
    """Arbitrary text gives None or a finite, non-negative number of seconds."""
    result = parse_reset_seconds(text, now)
    assert result is None or (math.isfinite(result) and result >= 0)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, None),
        ({"content-type": "application/json", "retry-after": "3"}, None),
        (
            {
                "x-ratelimit-limit-requests": "60",
                "x-ratelimit-remaining-requests": "59",
                "x-ratelimit-reset-requests": "1s",
                "x-ratelimit-limit-tokens": "150000",
                "x-ratelimit-remaining-tokens": "149984",
                "x-ratelimit-reset-tokens": "6ms",
            },
            RateHeaders(60, 59, 1.0, 150000, 149984, 0.006),
        ),
        (
            {
                "x-ratelimit-limit-minute": "20",
                "x-ratelimit-remaining-minute": "0",
                "x-ratelimit-reset-minute": "42",
            },
            RateHeaders(request_limit=20, request_remaining=0, request_reset_s=42.0),
        ),
        (
            {"x-ratelimit-remaining-requests": "lots", "x-ratelimit-reset-tokens": "later"},
            RateHeaders(),
        ),
        ({"x-ratelimit-limit-minute": "-3"}, RateHeaders()),
        ({"x-ratelimit-limit-minute": "20.0"}, RateHeaders(request_limit=20)),
    ],
)
def test_rate_headers_examples(headers: dict[str, str], expected: RateHeaders | None) -> None:
    """OpenAI and routeway limit headers are read; garbage values become None fields."""
    assert parse_rate_headers(headers, now=0.0) == expected


def test_rate_headers_prefer_requests_trio() -> None:
    """Where both spellings are present the `-requests` header wins over `-minute`."""
    headers = {"x-ratelimit-limit-requests": "60", "x-ratelimit-limit-minute": "20"}
    seen = parse_rate_headers(headers, now=0.0)
    assert seen is not None
    assert seen.request_limit == 60


_NAMES = [
    f"x-ratelimit-{what}-{unit}"
    for what in ("limit", "remaining", "reset")
    for unit in ("requests", "tokens", "minute")
]


@given(headers=st.dictionaries(st.sampled_from(_NAMES), st.text(max_size=30)))
def test_rate_headers_never_raise(headers: dict[str, str]) -> None:
    """Arbitrary values under the limit header names never raise."""
    seen = parse_rate_headers(headers, now=1_700_000_000.0)
    assert (seen is None) == (not headers)


@given(
    limit=st.integers(0, 10**9),
    remaining=st.integers(0, 10**9),
    reset_ms=st.integers(0, 10**7),
    tokens=st.booleans(),
)
def test_rate_headers_round_trip(limit: int, remaining: int, reset_ms: int, tokens: bool) -> None:
    """Generated limit, remaining and reset values read back as they were written."""
    unit = "tokens" if tokens else "requests"
    headers = {
        f"x-ratelimit-limit-{unit}": str(limit),
        f"x-ratelimit-remaining-{unit}": str(remaining),
        f"x-ratelimit-reset-{unit}": f"{reset_ms}ms",
    }
    seen = parse_rate_headers(headers, now=0.0)
    assert seen is not None
    got = (
        (seen.token_limit, seen.token_remaining, seen.token_reset_s)
        if tokens
        else (seen.request_limit, seen.request_remaining, seen.request_reset_s)
    )
    assert got[:2] == (limit, remaining)
    assert got[2] == pytest.approx(reset_ms / 1000)


# --- token bucket --------------------------------------------------------------------------


def test_bucket_grants_and_debits() -> None:
    """A full bucket grants at once and holds that much less."""
    bucket = TokenBucket(60, now=0.0)
    assert bucket.try_acquire(1, 0.0) == 0.0
    assert bucket.level(0.0) == 59
    assert bucket.granted == 1


@pytest.mark.parametrize(("amount", "wait"), [(1, 1.0), (3, 3.0), (60, 60.0)])
def test_bucket_denies_with_exact_wait(amount: int, wait: float) -> None:
    """An empty bucket says exactly how long until the amount fits, and debits nothing."""
    bucket = TokenBucket(60, now=0.0)
    assert bucket.try_acquire(60, 0.0) == 0.0
    assert bucket.try_acquire(amount, 0.0) == pytest.approx(wait)
    assert bucket.level(0.0) == 0
    assert bucket.try_acquire(amount, wait) == 0.0


def test_bucket_refills_continuously_up_to_capacity() -> None:
    """The level grows at capacity per minute and stops at the capacity."""
    bucket = TokenBucket(120, now=0.0)
    bucket.try_acquire(120, 0.0)
    assert bucket.level(15.0) == pytest.approx(30)
    assert bucket.level(10_000.0) == 120


def test_bucket_ignores_time_going_back() -> None:
    """An earlier instant than one already seen neither refills nor drains."""
    bucket = TokenBucket(60, now=10.0)
    bucket.try_acquire(60, 10.0)
    assert bucket.level(5.0) == 0
    assert bucket.level(11.0) == pytest.approx(1)


def test_bucket_refund_and_debt() -> None:
    """Refunds give room back up to capacity; extra usage is debt that delays the next grant."""
    bucket = TokenBucket(60, now=0.0)
    bucket.try_acquire(50, 0.0)
    bucket.refund(30, 0.0)
    assert bucket.level(0.0) == 40
    bucket.refund(1000, 0.0)
    assert bucket.level(0.0) == 60
    bucket.try_acquire(60, 0.0)
    bucket.adjust(20, 0.0)  # used 20 more than reserved
    assert bucket.level(0.0) == -20
    assert bucket.wait_time(1, 0.0) == pytest.approx(21.0)


def test_bucket_oversize_amount_waits_for_full_bucket() -> None:
    """An amount above capacity is granted only from a full bucket, leaving it in debt."""
    bucket = TokenBucket(60, now=0.0)
    bucket.try_acquire(10, 0.0)
    assert bucket.try_acquire(100, 0.0) == pytest.approx(10.0)
    assert bucket.try_acquire(100, 10.0) == 0.0
    assert bucket.level(10.0) == pytest.approx(-40)
    assert bucket.wait_time(100, 10.0) == pytest.approx(100.0)


@pytest.mark.parametrize("rate", [0, -1, math.inf, math.nan])
def test_bucket_rejects_bad_rates(rate: float) -> None:
    """A bucket needs a positive, finite rate."""
    with pytest.raises(ValueError, match="positive finite"):
        TokenBucket(rate)


@pytest.mark.parametrize(
    ("remaining", "since", "level"), [(10, 0, 10), (10, 4, 6), (3, 5, -2), (500, 0, 60)]
)
def test_observe_clamps_to_server_remaining(remaining: int, since: int, level: int) -> None:
    """The level becomes what the server has left, less what it had not yet seen, up or down,
    never above the capacity."""
    bucket = TokenBucket(60, now=0.0)
    bucket.observe(remaining, 0.0, since=since)
    assert bucket.level(0.0) == level
    bucket.observe(0, 0.0)
    bucket.observe(remaining, 0.0, since=since)
    assert bucket.level(0.0) == level


def test_hold_empties_and_refills_nothing_until_its_end() -> None:
    """A held bucket is empty until the hold ends, then refills at its own rate from there."""
    bucket = TokenBucket(60, now=0.0)  # 1 per second
    bucket.hold(30.0, 0.0)
    assert bucket.level(29.0) == 0
    assert bucket.wait_time(2, 10.0) == pytest.approx(22.0)
    assert bucket.level(32.0) == pytest.approx(2.0)


def test_observe_clamps_the_level_but_keeps_the_bucket_rate() -> None:
    """After the server says nothing is left, the bucket refills at its own rate (a sliding
    window frees slots as old requests age out; slowing below the limit wasted a fifth of it)."""
    bucket = TokenBucket(60, now=0.0)  # 1 per second
    bucket.observe(0, 0.0)
    assert bucket.level(0.0) == 0
    assert bucket.wait_time(1, 0.0) == pytest.approx(1.0)
    assert bucket.level(40.0) == pytest.approx(40)
    assert bucket.level(100.0) == pytest.approx(60)  # never above capacity


def test_observe_of_continuous_server_keeps_rate() -> None:
    """A server refilling at the bucket's own rate (OpenAI) changes only the level."""
    bucket = TokenBucket(60, now=0.0)
    bucket.observe(59, 0.0)
    bucket.try_acquire(59, 0.0)
    assert bucket.wait_time(1, 0.0) == pytest.approx(1.0)


def test_set_rate_caps_level() -> None:
    """A lower learned rate lowers the capacity and the level with it; a bad one is refused."""
    bucket = TokenBucket(600, now=0.0)
    bucket.set_rate(60, 0.0)
    assert (bucket.capacity, bucket.rate, bucket.level(0.0)) == (60, 1, 60)
    with pytest.raises(ValueError, match="positive finite"):
        bucket.set_rate(0, 0.0)


# --- AIMD ----------------------------------------------------------------------------------


def test_aimd_storm_halves_once() -> None:
    """64 simultaneous 429s from requests sent before the cut halve the limit once."""
    aimd = AIMD(64, maximum=64)
    epoch = aimd.epoch
    cuts = [aimd.on_rate_limited(5.0 + i, started_epoch=epoch) for i in range(64)]
    assert cuts.count(True) == 1
    assert (aimd.limit, aimd.cuts) == (32, 1)


def test_aimd_cooldown_without_epochs() -> None:
    """Without epochs, 429s within the cool-down after a cut are the same burst."""
    aimd = AIMD(64, cooldown_s=1.0)
    assert aimd.on_rate_limited(10.0)
    assert not aimd.on_rate_limited(10.9)
    assert aimd.on_rate_limited(11.0)
    assert aimd.limit == 16


def test_aimd_new_burst_cuts_again() -> None:
    """A 429 of a request sent after the cut, past the cool-down, is a new burst."""
    aimd = AIMD(64)
    aimd.on_rate_limited(0.0, started_epoch=0)
    assert aimd.on_rate_limited(2.0, started_epoch=aimd.epoch)
    assert aimd.limit == 16


@pytest.mark.parametrize(("window", "needed"), [(None, 4), (2, 2), (1, 1)])
def test_aimd_grows_one_per_window(window: int | None, needed: int) -> None:
    """The limit grows by one after `window` clean answers (default: the current limit)."""
    aimd = AIMD(4, maximum=10, window=window)
    grew = [aimd.on_success() for _ in range(needed)]
    assert grew == [False] * (needed - 1) + [True]
    assert aimd.limit == 5


def test_aimd_ignores_successes_sent_before_cut() -> None:
    """Answers to requests sent under the old limit do not count toward growth."""
    aimd = AIMD(8, window=1)
    old = aimd.epoch
    aimd.on_rate_limited(0.0, started_epoch=old)
    assert not aimd.on_success(started_epoch=old)
    assert aimd.on_success(started_epoch=aimd.epoch)
    assert aimd.limit == 5


@pytest.mark.parametrize(
    ("initial", "minimum", "maximum", "after_cut", "after_growth"),
    [(1, 1, 4, 1, 2), (3, 2, 3, 2, 3), (100, 1, 10, 5, 6), (0, 1, None, 1, 2)],
)
def test_aimd_bounds(
    initial: int, minimum: int, maximum: int | None, after_cut: int, after_growth: int
) -> None:
    """The limit starts, falls and grows within [minimum, maximum]."""
    aimd = AIMD(initial, minimum=minimum, maximum=maximum, window=1)
    aimd.on_rate_limited(0.0)
    assert aimd.limit == after_cut
    aimd.on_success()
    assert aimd.limit == after_growth
    for _ in range(50):
        aimd.on_success()
    assert maximum is None or aimd.limit == maximum


@pytest.mark.parametrize("kwargs", [{"minimum": 0}, {"minimum": 5, "maximum": 4}, {"window": 0}])
def test_aimd_rejects_bad_bounds(kwargs: dict[str, int]) -> None:
    """Impossible bounds are a programming error."""
    with pytest.raises(ValueError, match=r"must be|below"):
        AIMD(4, **kwargs)


# --- Limiter -------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_unconfigured_limiter_grants_at_once() -> None:
    """With nothing configured acquire returns at once and nothing is limited."""
    clock = FakeClock()
    limiter = Limiter(clock=clock, sleep=clock.sleep)
    tickets = [await limiter.acquire(10_000) for _ in range(100)]
    assert limiter.in_flight == 100
    for ticket in tickets:
        limiter.release(ticket, outcome="ok", used_tokens=5)
    assert (limiter.in_flight, limiter.concurrency_limit, clock.slept) == (0, None, [])
    assert (limiter.requests_per_minute, limiter.tokens_per_minute) == (None, None)


@pytest.mark.anyio
async def test_ready_and_pause_keep_old_behaviour() -> None:
    """pause_for only extends, counts pauses, and paused_for reads the injected clock."""
    clock = FakeClock(100.0)
    limiter = Limiter(clock=clock)
    limiter.pause_for(5)
    limiter.pause_for(2)
    assert (limiter.pauses, limiter.paused_for) == (1, 5.0)
    clock.now = 106.0
    assert limiter.paused_for == 0.0
    await limiter.ready()


@pytest.mark.anyio
async def test_ready_sleeps_to_resume_instant() -> None:
    """ready() sleeps exactly to the end of the pause."""
    clock = FakeClock()
    limiter = Limiter(clock=clock, sleep=clock.sleep)
    limiter.pause_for(2.5)
    await limiter.ready()
    assert clock.slept == [2.5]


def test_limiter_rejects_zero_concurrency() -> None:
    """A concurrency below one is a programming error."""
    with pytest.raises(ValueError, match="concurrency"):
        Limiter(concurrency=0)


@pytest.mark.anyio
async def test_concurrency_never_exceeded() -> None:
    """N concurrent acquirers never hold more slots than the concurrency limit."""
    limiter = Limiter(concurrency=3, adaptive=False)
    active = peak = 0

    async def worker() -> None:
        nonlocal active, peak
        for _ in range(5):
            ticket = await limiter.acquire(1)
            active += 1
            peak = max(peak, active)
            for _ in range(3):
                await anyio.lowlevel.checkpoint()
            active -= 1
            limiter.release(ticket, outcome="ok", used_tokens=1)

    async with anyio.create_task_group() as tg:
        for _ in range(10):
            tg.start_soon(worker)
    assert peak == 3
    assert limiter.in_flight == 0


async def grant_times(limiter: Limiter, clock: FakeClock, count: int) -> list[float]:
    """When each of `count` concurrent acquirers was granted (each releases at once)."""
    granted: list[float] = []

    async def worker() -> None:
        ticket = await limiter.acquire(0)
        granted.append(clock())
        limiter.release(ticket, outcome="ok")

    async with anyio.create_task_group() as tg:
        for _ in range(count):
            tg.start_soon(worker)
    return granted


@pytest.mark.anyio
async def test_pause_holds_everyone_until_deadline() -> None:
    """Every acquirer waits for the pool-wide pause to end, and no longer."""
    clock = FakeClock()
    limiter = Limiter(concurrency=8, clock=clock, sleep=clock.sleep)
    limiter.pause_for(5.0)
    granted = await grant_times(limiter, clock, 6)
    assert granted == [5.0] * 6
    assert clock.slept == [5.0]
    assert limiter.waits_s == pytest.approx(30.0)


@pytest.mark.anyio
async def test_pause_extended_while_waiting() -> None:
    """A pause pushed further while the head sleeps is honoured after it wakes."""
    clock = FakeClock()

    async def sleep(seconds: float) -> None:
        await clock.sleep(seconds)
        if clock() == 2.0:
            limiter.pause_for(3.0)  # another 429 at t=2: hold until t=5

    limiter = Limiter(clock=clock, sleep=sleep)
    limiter.pause_for(2.0)
    ticket = await limiter.acquire()
    assert clock() == 5.0
    assert limiter.pauses == 2
    limiter.release(ticket, outcome="ok")


@pytest.mark.anyio
async def test_rpm_bucket_spaces_requests() -> None:
    """A burst of the per-minute limit goes at once, then one request per 60/rpm seconds."""
    clock = FakeClock()
    limiter = Limiter(requests_per_minute=6, clock=clock, sleep=clock.sleep)
    granted = await grant_times(limiter, clock, 9)
    assert granted == pytest.approx([0.0] * 6 + [10.0, 20.0, 30.0])


@pytest.mark.anyio
async def test_tpm_reservation_is_corrected_by_usage() -> None:
    """Unused reserved tokens come back on release; extra usage delays the next grant."""
    clock = FakeClock()
    limiter = Limiter(tokens_per_minute=600, clock=clock, sleep=clock.sleep)
    first = await limiter.acquire(500)
    limiter.release(first, outcome="ok", used_tokens=100)
    second = await limiter.acquire(500)
    assert clock() == 0.0
    limiter.release(second, outcome="ok", used_tokens=800)  # 300 over: 200 in debt
    third = await limiter.acquire(100)
    assert clock() == pytest.approx(40.0)  # 300 of debt, then 100: 400 at 10 per second
    limiter.release(third, outcome="error")


@pytest.mark.anyio
async def test_refund_wakes_waiting_head() -> None:
    """A release that gives tokens back lets the waiting acquirer through before its deadline."""
    clock = FakeClock()
    limiter = Limiter(tokens_per_minute=600, clock=clock, sleep=never_wake)
    first = await limiter.acquire(600)
    got: list[Ticket] = []

    async def waiter() -> None:
        got.append(await limiter.acquire(300))

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        assert got == []
        limiter.release(first, outcome="ok", used_tokens=200)
    assert len(got) == 1
    assert clock() == 0.0


EXHAUSTED = {"x-ratelimit-remaining-requests": "0", "retry-after": "1"}


@pytest.mark.anyio
async def test_isolated_429s_without_headers_neither_cut_nor_pause_the_pool() -> None:
    """3 % of answers 429 without rate-limit headers, spread out: the concurrency limit stays
    and no pool-wide pause is taken (each row waits its own Retry-After)."""
    clock = FakeClock()
    limiter = Limiter(concurrency=16, clock=clock, sleep=clock.sleep)
    for n in range(1, 1001):
        ticket = await limiter.acquire()
        clock.now += 0.01
        if n % 33 == 0:
            limiter.release(ticket, outcome="rate_limited", headers={"retry-after": "1"})
            assert not limiter.pause_after_429(1.0, {"retry-after": "1"})
        else:
            limiter.release(ticket, outcome="ok")
    assert limiter.rate_limited == 30
    assert (limiter.concurrency_limit, limiter.pauses, limiter.paused_for) == (16, 0, 0.0)


@pytest.mark.anyio
@pytest.mark.parametrize("with_headers", [True, False])
async def test_a_real_rate_limit_still_cuts_and_pauses(with_headers: bool) -> None:
    """A 429 that says it is a rate limit (x-ratelimit-* headers) cuts and pauses at once;
    without headers, 429s that come dense (here 1 in 3) do too."""
    clock = FakeClock()
    limiter = Limiter(concurrency=16, clock=clock, sleep=clock.sleep)
    headers = EXHAUSTED if with_headers else {"retry-after": "1"}
    paused = False
    for n in range(1, 31):
        ticket = await limiter.acquire()
        clock.now += 0.5  # past the AIMD cooldown between cuts
        if n % 3 == 0:
            limiter.release(ticket, outcome="rate_limited", headers=headers)
            paused = limiter.pause_after_429(1.0, headers)
            if with_headers:
                assert paused
            clock.now += limiter.paused_for
        else:
            limiter.release(ticket, outcome="ok")
    assert paused
    assert limiter.concurrency_limit is not None and limiter.concurrency_limit < 16
    assert limiter.pauses >= 1


@pytest.mark.anyio
async def test_lowered_limit_is_respected_for_new_acquisitions() -> None:
    """After a 429 halves the limit, new acquirers wait until in-flight drains below it."""
    limiter = Limiter(concurrency=4)
    tickets = [await limiter.acquire() for _ in range(4)]
    limiter.release(tickets.pop(), outcome="rate_limited", headers=EXHAUSTED)
    assert limiter.concurrency_limit == 2
    assert limiter.rate_limited == 1
    got: list[Ticket] = []

    async def waiter() -> None:
        got.append(await limiter.acquire())

    async with anyio.create_task_group() as tg:
        tg.start_soon(waiter)
        await anyio.wait_all_tasks_blocked()
        assert got == []  # 3 in flight, limit 2
        limiter.release(tickets.pop(), outcome="rate_limited", headers=EXHAUSTED)  # same burst
        await anyio.wait_all_tasks_blocked()
        assert got == []  # 2 in flight, limit 2
        limiter.release(tickets.pop(), outcome="ok")
    assert len(got) == 1
    assert (limiter.concurrency_limit, limiter.rate_limited) == (2, 2)


@pytest.mark.anyio
async def test_limiter_storm_halves_once_and_grows_back() -> None:
    """64 in-flight 429s halve once; clean answers then grow the limit back by one a round."""
    limiter = Limiter(concurrency=64)
    tickets = [await limiter.acquire() for _ in range(64)]
    for ticket in tickets:
        limiter.release(ticket, outcome="rate_limited")
    assert limiter.concurrency_limit == 32
    for _ in range(32):
        limiter.release(await limiter.acquire(), outcome="ok")
    assert limiter.concurrency_limit == 33


@pytest.mark.anyio
async def test_not_adaptive_keeps_limits() -> None:
    """With adaptive off, 429s and headers change neither the concurrency nor the buckets."""
    limiter = Limiter(concurrency=8, adaptive=False)
    headers = {"x-ratelimit-limit-minute": "5", "x-ratelimit-remaining-minute": "0"}
    limiter.release(await limiter.acquire(), outcome="rate_limited", headers=headers)
    assert (limiter.concurrency_limit, limiter.requests_per_minute) == (8, None)


@pytest.mark.anyio
async def test_headers_teach_and_clamp_request_bucket() -> None:
    """Routeway headers create a request bucket at the server's limit, clamped to what is left."""
    clock = FakeClock()
    limiter = Limiter(clock=clock, sleep=clock.sleep, wall_clock=lambda: 1_700_000_000.0)
    headers = {
        "x-ratelimit-limit-minute": "20",
        "x-ratelimit-remaining-minute": "0",
        "x-ratelimit-reset-minute": "1700000030",
    }
    limiter.release(await limiter.acquire(), outcome="ok", headers=headers)
    assert limiter.requests_per_minute == 20
    ticket = await limiter.acquire()
    assert clock() == pytest.approx(3.0)  # empty, refilling at the bucket's 20 per minute
    limiter.release(ticket, outcome="ok")


@pytest.mark.parametrize(("configured", "learned"), [(None, 30000), (10000, 10000), (50000, 30000)])
@pytest.mark.anyio
async def test_learned_limit_never_above_configured(
    configured: float | None, learned: float
) -> None:
    """A limit from headers replaces a higher configured one but never raises a lower one."""
    limiter = Limiter(tokens_per_minute=configured)
    headers = {"x-ratelimit-limit-tokens": "30000", "x-ratelimit-reset-tokens": "1s"}
    limiter.release(await limiter.acquire(10), outcome="ok", used_tokens=10, headers=headers)
    assert limiter.tokens_per_minute == learned


@pytest.mark.anyio
async def test_learned_limits_follow_the_server_both_ways() -> None:
    """Without a configured limit the learned one follows the server up as well as down."""
    limiter = Limiter()
    for limit in ("20", "20", "40", "10"):
        headers = {"x-ratelimit-limit-requests": limit}
        limiter.release(await limiter.acquire(), outcome="ok", headers=headers)
        assert limiter.requests_per_minute == float(limit)


@pytest.mark.anyio
async def test_token_headers_learned_mid_flight() -> None:
    """A token bucket learned while requests are in flight charges their whole usage."""
    clock = FakeClock()
    limiter = Limiter(clock=clock, sleep=clock.sleep)
    early = [await limiter.acquire(100) for _ in range(3)]
    headers = {
        "x-ratelimit-limit-tokens": "600",
        "x-ratelimit-remaining-tokens": "500",
        "x-ratelimit-reset-tokens": "10s",
    }
    limiter.release(early[0], outcome="ok", used_tokens=100, headers=headers)
    assert limiter.tokens_per_minute == 600
    # 500 left, less the 200 still in flight that the server may not have counted.
    for ticket in early[1:]:
        limiter.release(ticket, outcome="ok", used_tokens=100)  # not reserved: charged whole
    await limiter.acquire(100)
    assert clock() == pytest.approx(0.0)
    ticket = await limiter.acquire(100)
    assert clock() == pytest.approx(10.0)  # 0 left, refilling at 10 per second
    headers["x-ratelimit-remaining-tokens"] = "0"
    limiter.release(ticket, outcome="ok", used_tokens=100, headers=headers)
    assert limiter.waits_s == pytest.approx(10.0)


@pytest.mark.anyio
async def test_observe_counts_requests_granted_after_the_answer() -> None:
    """Requests granted after the observed one are taken off the server's remaining count."""
    clock = FakeClock()
    limiter = Limiter(requests_per_minute=60, clock=clock, sleep=clock.sleep)
    first = await limiter.acquire()
    later = [await limiter.acquire() for _ in range(4)]
    headers = {"x-ratelimit-remaining-requests": "5", "x-ratelimit-limit-requests": "60"}
    limiter.release(first, outcome="ok", headers=headers)
    for ticket in later:
        limiter.release(ticket, outcome="ok")
    await limiter.acquire()  # 5 left, less the 4 the server had not seen: one more now
    assert clock() == 0.0
    await limiter.acquire()
    assert clock() == pytest.approx(1.0)


@pytest.mark.anyio
async def test_cancelled_acquire_frees_its_slot() -> None:
    """An acquirer cancelled while waiting gives its concurrency slot back."""
    clock = FakeClock()
    limiter = Limiter(concurrency=1, clock=clock, sleep=never_wake)
    limiter.pause_for(100.0)
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(limiter.acquire)
            await anyio.wait_all_tasks_blocked()
            scope.cancel()
    clock.now = 200.0
    with anyio.fail_after(5):
        ticket = await limiter.acquire()
    limiter.release(ticket, outcome="ok")


@pytest.mark.anyio
async def test_a_slot_waiter_cancelled_in_the_queue_leaves_it() -> None:
    """A task cancelled while queued for a slot takes none: the next acquire is granted."""
    limiter = Limiter(concurrency=1, adaptive=False)
    held = await limiter.acquire()
    with anyio.CancelScope() as scope:
        async with anyio.create_task_group() as tg:
            tg.start_soon(limiter.acquire)
            await anyio.wait_all_tasks_blocked()
            scope.cancel()
    limiter.release(held, outcome="ok")
    with anyio.fail_after(5):
        again = await limiter.acquire()
    assert limiter.in_flight == 1
    limiter.release(again, outcome="ok")
    assert limiter.in_flight == 0


@pytest.mark.anyio
async def test_a_slot_granted_to_a_waiter_cancelled_before_it_ran_is_handed_on() -> None:
    """A slot handed to a queued task that is cancelled before it resumes goes to the next
    one in the queue, not lost (the limit would shrink by one each time)."""
    limiter = Limiter(concurrency=1, adaptive=False)
    held = await limiter.acquire()
    got: list[str] = []
    scopes: dict[str, anyio.CancelScope] = {}

    async def waiter(name: str) -> None:
        with anyio.CancelScope() as scopes[name]:
            ticket = await limiter.acquire()
            got.append(name)
            limiter.release(ticket, outcome="ok")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for name in ("first", "second"):
                tg.start_soon(waiter, name)
                await anyio.wait_all_tasks_blocked()
            scopes["first"].cancel()  # not yet delivered: the first is still queued ...
            limiter.release(held, outcome="ok")  # ... when its slot comes, in the same step
    assert got == ["second"]
    assert limiter.in_flight == 0


@pytest.mark.anyio
async def test_slots_are_granted_in_the_order_asked() -> None:
    """Queued acquirers get slots first come, first served."""
    limiter = Limiter(concurrency=2, adaptive=False)
    held = [await limiter.acquire(), await limiter.acquire()]
    order: list[int] = []

    async def waiter(number: int) -> None:
        ticket = await limiter.acquire()
        order.append(number)
        await anyio.lowlevel.checkpoint()
        limiter.release(ticket, outcome="ok")

    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            for number in range(6):
                tg.start_soon(waiter, number)
                await anyio.wait_all_tasks_blocked()
            for ticket in held:
                limiter.release(ticket, outcome="ok")
    assert order == list(range(6))
    assert limiter.in_flight == 0


@pytest.mark.anyio
async def test_try_acquire_grants_only_what_acquire_would_grant_at_once() -> None:
    """`try_acquire` takes a slot and room when both are free and nobody waits; otherwise it
    takes nothing and says so (None), leaving the caller to queue with `acquire`."""
    clock = FakeClock()
    limiter = Limiter(concurrency=2, requests_per_minute=1, adaptive=False, clock=clock,
                      sleep=never_wake)  # fmt: skip
    first = limiter.try_acquire(5)
    assert first is not None and limiter.in_flight == 1
    assert limiter.try_acquire(5) is None  # the bucket is empty for a minute
    assert limiter.in_flight == 1
    clock.now += 60.0
    second = limiter.try_acquire(5)
    assert second is not None
    clock.now += 60.0
    assert limiter.try_acquire(5) is None  # room in the bucket, but both slots are taken
    limiter.release(first, outcome="ok")
    limiter.release(second, outcome="ok")
    assert limiter.in_flight == 0
    clock.now += 60.0
    third = limiter.try_acquire(5)
    assert third is not None
    limiter.release(third, outcome="ok")


@pytest.mark.anyio
async def test_try_acquire_never_jumps_a_task_queued_at_the_gate() -> None:
    """A task waiting at the gate (here for a pause) goes first: `try_acquire` takes nothing
    while it waits, even once the pause is over and a slot is free."""
    clock = FakeClock()
    limiter = Limiter(concurrency=3, adaptive=False, clock=clock, sleep=never_wake)
    limiter.pause_for(30.0)
    async with anyio.create_task_group() as tg:
        tg.start_soon(limiter.acquire)
        await anyio.wait_all_tasks_blocked()
        clock.now += 60.0
        assert limiter.try_acquire(5) is None
        assert limiter.in_flight == 0
        tg.cancel_scope.cancel()
    ticket = limiter.try_acquire(5)
    assert ticket is not None and limiter.in_flight == 1


@pytest.mark.anyio
async def test_release_validates_and_is_idempotent() -> None:
    """An unknown outcome is refused; a second release of a ticket does nothing."""
    limiter = Limiter(concurrency=2)
    ticket = await limiter.acquire()
    with pytest.raises(ValueError, match="outcome"):
        limiter.release(ticket, outcome="maybe")  # type: ignore[arg-type]
    limiter.release(ticket, outcome="rate_limited", headers=EXHAUSTED)
    limiter.release(ticket, outcome="rate_limited", headers=EXHAUSTED)
    assert (limiter.in_flight, limiter.rate_limited, limiter.concurrency_limit) == (0, 1, 1)


def test_limiters_pick_per_model_or_default() -> None:
    """Each model gets its own limiter where configured, else the default; each listed once."""
    default, free = Limiter(), Limiter(requests_per_minute=20)
    limiters = Limiters(default, {"llama:free": free, "alias": default})
    assert limiters.for_model("llama:free") is free
    assert limiters.for_model("gpt-4o-mini") is default
    assert list(limiters) == [default, free]


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "expected"), [(100, 64, 164), (100, None, 356), (-5, 10, 10)]
)
def test_tokens_to_reserve(prompt: int, max_tokens: int | None, expected: int) -> None:
    """The reservation is the prompt estimate plus max_tokens, or a default guess."""
    assert tokens_to_reserve(prompt, max_tokens) == expected


class SlidingWindowServer:
    """A 1,200 requests/minute sliding window that answers with routeway-style headers
    (reset: when the oldest request leaves the window), as runner/sim/answers.py does."""

    def __init__(self, limit: int = 1200, window_s: float = 60.0) -> None:
        self.limit, self.window_s = limit, window_s
        self.admitted: deque[float] = deque()
        self.refused = 0

    def answer(self, now: float) -> tuple[bool, dict[str, str]]:
        while self.admitted and self.admitted[0] <= now - self.window_s:
            self.admitted.popleft()
        ok = len(self.admitted) < self.limit
        if ok:
            self.admitted.append(now)
        reset = self.admitted[0] + self.window_s - now if self.admitted else 0.0
        headers = {
            "x-ratelimit-limit-minute": str(self.limit),
            "x-ratelimit-remaining-minute": str(self.limit - len(self.admitted)),
            "x-ratelimit-reset-minute": str(math.ceil(round(reset, 3))),
        }
        if not ok:
            self.refused += 1
            headers["retry-after-ms"] = str(math.ceil(reset * 1000))
        return ok, headers


@pytest.mark.anyio
async def test_two_windows_of_a_sliding_limit_take_one_window_and_a_wait() -> None:
    """2,400 requests (1 ms apart when free to go) against 1,200/min in a sliding window:
    the first window's worth at once, a wait for the oldest to leave, then the second as fast
    as the window frees: within 10 % of the ideal ~61 s, under 3 % 429s. Following only the
    bucket's own refill after the wait took ~120 s."""
    clock = FakeClock()
    limiter = Limiter(concurrency=128, clock=clock, sleep=clock.sleep, wall_clock=lambda: 0.0)
    server = SlidingWindowServer()
    done = 0
    with anyio.fail_after(30):
        while done < 2400:
            ticket = await limiter.acquire()
            clock.now += 0.001  # the request's own time on the wire
            ok, headers = server.answer(clock.now)
            limiter.release(ticket, outcome="ok" if ok else "rate_limited", headers=headers)
            if ok:
                done += 1
            else:
                limiter.pause_after_429(int(headers["retry-after-ms"]) / 1000, headers)
    assert clock.now <= 61.2 * 1.1, clock.now
    assert server.refused < 0.03 * 2400, server.refused

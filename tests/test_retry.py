"""The retry policy: Retry-After parsing, the retryable set, backoff, and the tenacity loop."""

from __future__ import annotations

import asyncio
import email.utils
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.errors import (
    AttemptError,
    ConnectFailure,
    KeyRejected,
    MalformedResponse,
    ProtocolFailure,
    QuotaDenied,
    RateLimited,
    RequestRejected,
    ServerFailure,
    TimeoutFailure,
    UnwantedAnswer,
)
from runner.http.retry import RetryPolicy, parse_retry_after, should_retry_header

NOW = 1_750_000_000.0
_seconds = st.floats(min_value=0, max_value=1e12, allow_nan=False, allow_infinity=False)


# -- parse_retry_after -----------------------------------------------------------------------


@given(_seconds)
def test_seconds_round_trip(seconds: float) -> None:
    """Any non-negative number of seconds, as text, parses back to itself."""
    assert parse_retry_after({"retry-after": repr(seconds)}) == seconds
    assert parse_retry_after({"retry-after": f"  {seconds}\t"}) == seconds


@given(st.integers(min_value=0, max_value=10**9))
def test_integer_seconds_round_trip(seconds: int) -> None:
    """Integer seconds, the common form, parse exactly."""
    assert parse_retry_after({"retry-after": str(seconds)}) == float(seconds)


@given(_seconds, st.text(max_size=30) | _seconds.map(str))
def test_retry_after_ms_wins(milliseconds: float, other: str) -> None:
    """A usable retry-after-ms header is used instead of Retry-After, in seconds."""
    headers = {"retry-after-ms": repr(milliseconds), "retry-after": other}
    assert parse_retry_after(headers) == milliseconds / 1000


@pytest.mark.parametrize("bad_ms", ["soon", "", "nan", "inf", "1e400"])
def test_unusable_retry_after_ms_falls_back_to_retry_after(bad_ms: str) -> None:
    """An unusable retry-after-ms leaves the decision to Retry-After."""
    assert parse_retry_after({"retry-after-ms": bad_ms, "retry-after": "7"}) == 7.0


@given(st.integers(min_value=0, max_value=10**7), st.integers(min_value=0, max_value=10**10))
def test_http_date_in_the_future(seconds: int, now: int) -> None:
    """An HTTP date N whole seconds after `now` parses to N."""
    date = email.utils.formatdate(now + seconds, usegmt=True)
    assert parse_retry_after({"retry-after": date}, now=now) == seconds


@given(st.floats(min_value=0, max_value=10**6), st.floats(min_value=0, max_value=10**9))
def test_http_date_with_fractional_now(seconds: float, now: float) -> None:
    """An HTTP date (whole seconds) parses to within a second of the intended wait."""
    date = email.utils.formatdate(now + seconds, usegmt=True)
    parsed = parse_retry_after({"retry-after": date}, now=now)
    assert parsed is not None and abs(parsed - seconds) < 1


def test_http_date_uses_the_clock_when_now_is_not_given() -> None:
    """Without `now`, a date a minute ahead of the real clock parses to about 60 s."""
    import time

    date = email.utils.formatdate(time.time() + 60, usegmt=True)
    parsed = parse_retry_after({"retry-after": date})
    assert parsed is not None and 58 <= parsed <= 60


@pytest.mark.parametrize(
    "headers",
    [
        {"retry-after": "-5"},
        {"retry-after-ms": "-5"},
        {"retry-after": email.utils.formatdate(NOW - 3600, usegmt=True)},
    ],
)
def test_past_or_negative_waits_are_zero(headers: dict[str, str]) -> None:
    """A negative number or a date in the past means no wait, never a negative one."""
    assert parse_retry_after(headers, now=NOW) == 0.0


@pytest.mark.parametrize(
    "value",
    ["", "   ", "soon", "nan", "inf", "1e400", "5 seconds",
     "Wed, 21 Oct 2015 07:28:00",  # no zone
     "Wed, 21 Oct 2015 07:28:00 -0000",  # RFC 2822: zone unknown
     "Wed, 99 Foo 2015 99:99:99 GMT"],
)  # fmt: skip
def test_unusable_retry_after_is_none(value: str) -> None:
    """Values that are neither finite seconds nor a zoned HTTP date give None."""
    assert parse_retry_after({"retry-after": value}, now=NOW) is None


def test_no_header_is_none() -> None:
    """Without either header there is no hint."""
    assert parse_retry_after({"x-ratelimit-reset-requests": "1s"}) is None


@given(st.text(alphabet=st.characters(blacklist_categories=["Nd"])))
def test_text_without_digits_is_none(value: str) -> None:
    """Text without a digit is never a wait (it cannot be seconds or a date)."""
    assert parse_retry_after({"retry-after": value, "retry-after-ms": value}, now=NOW) is None


@settings(max_examples=300)
@given(
    st.dictionaries(
        st.sampled_from(["retry-after", "retry-after-ms", "x-other"]),
        st.text(max_size=40)
        | st.from_regex(
            r"[A-Z][a-z]{2}, [0-9]{1,2} [A-Z][a-z]{2} [0-9]{1,5} [0-9:]{5,8} (GMT|[+-][0-9]{4})",
            fullmatch=True,
        ),
    ),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12),
)
def test_garbage_never_raises_nor_goes_negative(headers: dict[str, str], now: float) -> None:
    """Any header text, date-like or not, gives None or a non-negative finite number."""
    parsed = parse_retry_after(headers, now=now)
    assert parsed is None or 0 <= parsed < float("inf")


@pytest.mark.parametrize(
    ("value", "expected"),
    [("true", True), (" TRUE ", True), ("false", False), ("False", False), ("maybe", None),
     ("", None), (None, None)],
)  # fmt: skip
def test_should_retry_header(value: str | None, expected: bool | None) -> None:
    """x-should-retry is read case-insensitively; anything but true/false is no opinion."""
    headers = {} if value is None else {"x-should-retry": value}
    assert should_retry_header(headers) is expected


# -- RetryPolicy: what is retried ------------------------------------------------------------

RETRYABLE = [RateLimited, ServerFailure, TimeoutFailure, ConnectFailure, ProtocolFailure,
             MalformedResponse]  # fmt: skip
FINAL = [RequestRejected, KeyRejected, QuotaDenied]


def error(kind: type[AttemptError], headers: dict[str, str] | None = None) -> AttemptError:
    if kind is UnwantedAnswer:
        return UnwantedAnswer("length", answer=None)
    return kind(f"{kind.__name__} happened", status=None, headers=headers)


@pytest.mark.parametrize(
    ("kind", "expected"),
    [(k, True) for k in [*RETRYABLE, UnwantedAnswer]] + [(k, False) for k in FINAL],
)
def test_retryable_set_by_error_class(kind: type[AttemptError], expected: bool) -> None:
    """Transient failures are retried; rejected, auth and quota failures are not."""
    assert RetryPolicy().is_retryable(error(kind)) is expected


@pytest.mark.parametrize("kind", RETRYABLE + FINAL)
@pytest.mark.parametrize("header", ["true", "false"])
def test_x_should_retry_overrides_the_class(kind: type[AttemptError], header: str) -> None:
    """The server's x-should-retry header decides, both ways, whatever the error class."""
    exc = error(kind, {"x-should-retry": header})
    assert RetryPolicy().is_retryable(exc) is (header == "true")


@pytest.mark.parametrize(
    "exc", [ValueError("bug"), RuntimeError("bug"), asyncio.CancelledError(), KeyboardInterrupt()]
)
def test_other_exceptions_are_never_retried(exc: BaseException) -> None:
    """Programming errors and cancellation are never retried."""
    assert RetryPolicy().is_retryable(exc) is False


# -- RetryPolicy: how long to wait -----------------------------------------------------------


def identity(ceiling: float) -> float:
    return ceiling


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"retry-after": "3"}, 3.0),
        ({"retry-after": "0"}, 0.0),
        ({"retry-after-ms": "250"}, 0.25),
        ({"retry-after": "500"}, 120.0),  # capped at max_retry_after_s
        ({"retry-after": "90"}, 90.0),  # above max_delay_s: the server's word wins
        ({"retry-after": email.utils.formatdate(4102444800, usegmt=True)}, 120.0),
    ],
)
def test_delay_honours_retry_after_up_to_the_cap(headers: dict[str, str], expected: float) -> None:
    """A Retry-After hint is the wait, capped at max_retry_after_s, whatever the attempt."""
    policy = RetryPolicy(max_delay_s=60, max_retry_after_s=120, jitter=identity)
    for attempt in (1, 5):
        assert policy.delay(attempt, error(RateLimited, headers)) == expected


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (5, 8.0), (6, 10.0), (30, 10.0)],
)
@pytest.mark.parametrize("kind", [ServerFailure, None])
def test_delay_is_exponential_without_a_hint(
    attempt: int, expected: float, kind: type[AttemptError] | None
) -> None:
    """Without a hint the jitter ceiling is min(max_delay_s, base * 2**(n-1))."""
    policy = RetryPolicy(base_delay_s=0.5, max_delay_s=10, jitter=identity)
    assert policy.delay(attempt, error(kind) if kind else None) == expected


@settings(max_examples=200)
@given(
    st.integers(min_value=1, max_value=200),
    st.floats(min_value=0, max_value=10),
    st.floats(min_value=0, max_value=100),
)
def test_full_jitter_stays_within_the_ceiling(attempt: int, base: float, cap: float) -> None:
    """The default full jitter waits between 0 and the exponential ceiling."""
    delay = RetryPolicy(base_delay_s=base, max_delay_s=cap).delay(attempt, None)
    assert 0 <= delay <= min(cap, base * 2 ** (attempt - 1))


# -- RetryPolicy.retrying: the loop ----------------------------------------------------------


class Recorder:
    """An instant sleep and an on_retry hook that remember what they were given."""

    def __init__(self) -> None:
        self.slept: list[float] = []
        self.retried: list[tuple[AttemptError, int, float]] = []

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)

    async def on_retry(self, exc: AttemptError, attempt: int, wait: float) -> None:
        self.retried.append((exc, attempt, wait))


def policy(recorder: Recorder, **options: Any) -> RetryPolicy:
    settings_: dict[str, Any] = {"max_attempts": 4, "base_delay_s": 0.5, "jitter": identity}
    return RetryPolicy(**(settings_ | options), sleep=recorder.sleep)


def failing(*errors: BaseException, result: str = "answer") -> Any:
    """An async attempt that raises each error in turn, then returns `result`."""
    calls: list[int] = []

    async def attempt() -> str:
        calls.append(1)
        if len(calls) <= len(errors):
            raise errors[len(calls) - 1]
        return result

    attempt.calls = calls  # type: ignore[attr-defined]
    return attempt


@pytest.mark.anyio
async def test_stops_after_max_attempts_and_reraises_the_last_error() -> None:
    """A retryable error every time ends after max_attempts, re-raising the last error, with one
    on_retry call (and one sleep) per retried attempt."""
    recorder = Recorder()
    errors = [ServerFailure(f"boom {i}", status=500) for i in range(10)]
    attempt = failing(*errors)
    with pytest.raises(ServerFailure) as info:
        await policy(recorder).retrying(recorder.on_retry)(attempt)
    assert info.value is errors[3]
    assert len(attempt.calls) == 4
    assert recorder.retried == [(errors[0], 1, 0.5), (errors[1], 2, 1.0), (errors[2], 3, 2.0)]
    assert recorder.slept == [0.5, 1.0, 2.0]


@pytest.mark.anyio
async def test_success_after_retries_returns_the_answer() -> None:
    """Transient failures followed by an answer return the answer after honouring Retry-After."""
    recorder = Recorder()
    limited = RateLimited("429", status=429, headers={"retry-after": "7"})
    attempt = failing(ConnectFailure("refused"), limited)
    result = await policy(recorder).retrying(recorder.on_retry)(attempt)
    assert result == "answer"
    assert recorder.slept == [0.5, 7.0]
    assert [(a, w) for _, a, w in recorder.retried] == [(1, 0.5), (2, 7.0)]


@pytest.mark.anyio
@pytest.mark.parametrize(
    "exc",
    [
        RequestRejected("400", status=400),
        KeyRejected("401", status=401),
        QuotaDenied("quota", status=429),
        ServerFailure("500", status=500, headers={"x-should-retry": "false"}),
        ValueError("a bug"),
    ],
)
async def test_non_retryable_error_is_raised_at_once(exc: BaseException) -> None:
    """A non-retryable error is raised after one attempt, without sleep or on_retry."""
    recorder = Recorder()
    attempt = failing(exc)
    with pytest.raises(type(exc)) as info:
        await policy(recorder).retrying(recorder.on_retry)(attempt)
    assert info.value is exc
    assert len(attempt.calls) == 1
    assert recorder.slept == [] and recorder.retried == []


@pytest.mark.anyio
async def test_x_should_retry_true_retries_a_rejected_request() -> None:
    """A 400 carrying x-should-retry: true is retried."""
    recorder = Recorder()
    attempt = failing(RequestRejected("400", status=400, headers={"x-should-retry": "true"}))
    assert await policy(recorder).retrying()(attempt) == "answer"
    assert len(attempt.calls) == 2


@pytest.mark.anyio
async def test_deadline_stops_before_a_wait_that_would_pass_it() -> None:
    """A Retry-After wait that would pass the row deadline ends the retries at once."""
    recorder = Recorder()
    limited = RateLimited("429", status=429, headers={"retry-after": "30"})
    attempt = failing(limited)
    with pytest.raises(RateLimited):
        await policy(recorder, deadline_s=10).retrying(recorder.on_retry)(attempt)
    assert len(attempt.calls) == 1
    assert recorder.slept == []


@pytest.mark.anyio
async def test_controller_is_reusable_row_after_row() -> None:
    """One controller serves one row after another, each with its own attempt count."""
    recorder = Recorder()
    retrying = policy(recorder, max_attempts=2).retrying(recorder.on_retry)
    for _ in range(3):
        attempt = failing(TimeoutFailure("slow"))
        assert await retrying(attempt) == "answer"
        assert len(attempt.calls) == 2
    assert [a for _, a, _ in recorder.retried] == [1, 1, 1]


def test_defaults_match_the_documented_policy() -> None:
    """The default policy is 6 attempts, 900 s per row, 0.5 s base, 60 s cap, 120 s Retry-After."""
    p = RetryPolicy()
    assert (p.max_attempts, p.deadline_s, p.base_delay_s, p.max_delay_s, p.max_retry_after_s) == (
        6,
        900.0,
        0.5,
        60.0,
        120.0,
    )


@pytest.mark.anyio
@pytest.mark.parametrize("max_attempts", [1, 2, 5])
async def test_retrier_makes_exactly_max_attempts_and_reports_true_attempt_numbers(
    max_attempts: int,
) -> None:
    """Retrier runs the first attempt bare and the rest in tenacity: same cap, same numbers."""
    from runner.errors import ServerFailure
    from runner.http.retry import Retrier

    seen: list[tuple[int, float]] = []
    calls = 0

    async def on_retry(exc: Exception, attempt: int, wait: float) -> None:
        seen.append((attempt, wait))

    async def no_sleep(seconds: float) -> None:
        return None

    policy = RetryPolicy(
        max_attempts=max_attempts,
        base_delay_s=1,
        max_delay_s=100,
        jitter=lambda c: c,
        sleep=no_sleep,
    )

    async def failing() -> str:
        nonlocal calls
        calls += 1
        raise ServerFailure("boom", status=503)

    with pytest.raises(ServerFailure):
        await Retrier(policy, on_retry)(failing)
    assert calls == max_attempts
    assert seen == [(n, float(2 ** (n - 1))) for n in range(1, max_attempts)]


@pytest.mark.anyio
async def test_retrier_returns_the_first_success_without_retrying() -> None:
    """A first attempt that succeeds is returned as is, with no retry hook called."""
    from runner.http.retry import Retrier

    hooks: list[int] = []

    async def on_retry(exc: Exception, attempt: int, wait: float) -> None:
        hooks.append(attempt)

    async def ok() -> str:
        return "answer"

    assert await Retrier(RetryPolicy(), on_retry)(ok) == "answer"
    assert hooks == []

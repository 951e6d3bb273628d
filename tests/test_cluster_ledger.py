"""The arithmetic of the cluster-wide budget (runner/cluster/ledger.py), on a fake clock."""

from __future__ import annotations

import bisect
import random

import pytest

from runner.cluster.ledger import BURST_S, LEASE_S, Ledger, Limits


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def max_in_window(times: list[float], window: float) -> int:
    times = sorted(times)
    return max((bisect.bisect_left(times, t + window) - i for i, t in enumerate(times)), default=0)


@pytest.mark.parametrize("window_s", [10.0, 60.0])
def test_sends_under_leases_never_overfill_a_server_window(window_s: float) -> None:
    """Four holders leasing greedily, each sending its lease at any instant of its life:
    no server window of `window_s` ever holds more than the limit, and the run still gets
    at least 90 % of it."""
    clock = Clock()
    rng = random.Random(7)
    ledger = Ledger({"": Limits(requests_per_minute=1200)}, window_s=window_s, clock=clock)
    start = clock.now
    sends: list[float] = []
    unused = dict.fromkeys("abcd", 0)
    for _ in range(int(window_s * 3 / 0.05)):  # bounded: three windows in 50 ms steps
        clock.now += 0.05
        for holder in "abcd":
            grant = ledger.lease(holder, "", want_requests=10, unused_requests=unused[holder])
            used = grant.requests - rng.randint(0, min(grant.requests, 1))
            unused[holder] = grant.requests - used
            # Whatever is sent under a lease goes out within its life, at the worst instant.
            sends += [clock.now + rng.uniform(0, LEASE_S) for _ in range(used)]
    limit = 1200 * window_s / 60
    assert max_in_window(sends, window_s) <= limit
    assert len(sends) >= 0.9 * 1200 * (clock.now - start) / 60


def test_no_burst_at_start() -> None:
    """The run starts at the limit's rate, not with a whole window in its first second."""
    clock = Clock()
    ledger = Ledger({"": Limits(requests_per_minute=1200)}, clock=clock)
    got = sum(ledger.lease(h, "", want_requests=1000).requests for h in "abcd")
    assert got <= 1200 / 60 * BURST_S


def test_a_pause_refuses_every_holder_until_it_ends() -> None:
    """A rate limit reported by one holder: nobody gets a lease for its Retry-After."""
    clock = Clock()
    ledger = Ledger({"": Limits(requests_per_minute=6000)}, clock=clock)
    assert ledger.lease("a", "", want_requests=5).requests == 5
    assert ledger.rate_limited("", 2.0)
    epoch = ledger.epoch
    clock.now += 1.9
    for holder in "abcd":
        grant = ledger.lease(holder, "", want_requests=5)
        assert grant.requests == 0 and grant.pause_s == pytest.approx(0.1)
    clock.now += 0.2
    assert ledger.lease("b", "", want_requests=1).requests == 1
    assert ledger.epoch == epoch and ledger.pauses == 1


def test_a_pause_of_the_key_pauses_every_model_scope() -> None:
    """The key's own 429 pauses every scope; a model's pauses only that model."""
    clock = Clock()
    ledger = Ledger({"": Limits(600), "m": Limits(600)}, clock=clock)
    ledger.rate_limited("m", 5)
    assert ledger.paused_for("m") > 0 and ledger.paused_for("") == 0
    ledger.rate_limited("", 5)
    assert ledger.paused_for("") > 0


def test_a_stop_reaches_every_holder() -> None:
    """A quota error: every later lease carries the stop."""
    clock = Clock()
    ledger = Ledger({"": Limits(600)}, clock=clock)
    ledger.stop("no quota")
    assert ledger.lease("x", "", want_requests=1).stop == "no quota"


def test_tokens_need_room_for_the_waiting_request() -> None:
    """A lease grants tokens only when the waiting request's estimate fits; a debt waits."""
    clock = Clock()
    ledger = Ledger({"": Limits(None, 60_000)}, clock=clock)  # 1,000 tokens a second
    assert ledger.lease("a", "", want_requests=1, need_tokens=800).tokens >= 800
    grant = ledger.lease("a", "", want_requests=1, need_tokens=800, token_debt=500)
    assert grant.requests == 0 and grant.wait_s > 0


def test_restarted_ledger_runs_at_half_rate_for_a_window() -> None:
    """After a restart the grants of a window are at most half the limit, then full again."""
    clock = Clock()
    ledger = Ledger({"": Limits(1200)}, window_s=10, restarted=True, clock=clock)
    granted = 0
    for _ in range(200):  # 10 s
        clock.now += 0.05
        granted += ledger.lease("a", "", want_requests=50).requests
    assert granted <= 100
    clock.now += 10
    assert ledger.factor == 1.0 or ledger.lease("a", "", want_requests=1) is not None
    assert ledger.factor == 1.0


def test_dollars_never_pass_the_budget() -> None:
    """Allowances to many holders never commit more than the budget; a leave frees the rest."""
    clock = Clock()
    ledger = Ledger({}, limit_usd=10.0, spent_usd={"0": 2.0}, clock=clock)
    assert ledger.join("0", 1, 1.5)  # the driver's figure is higher: it stays
    assert ledger.join("1", 1, 0.0)
    granted = 0.0
    for _ in range(100):
        for holder in ("0", "1"):
            granted += ledger.grant_usd(holder, 1, need=0.1, want=1.0)
    assert ledger.committed_usd <= 10.0 + 1e-9
    assert 8.0 - 0.1 < granted <= 8.0 + 1e-9  # the last 0.1 fits no row
    assert ledger.grant_usd("1", 1, need=0.1, want=1.0) == 0.0
    ledger.leave("1", 1, 1.0)  # it spent 1 of its allowances
    assert ledger.grant_usd("0", 1, need=0.1, want=100.0) > 0
    assert ledger.committed_usd <= 10.0 + 1e-9


def test_a_stale_attempt_gets_nothing() -> None:
    """Once attempt 2 of a shard joined, attempt 1 (a zombie) is refused money and leaves."""
    clock = Clock()
    ledger = Ledger({}, limit_usd=10.0, clock=clock)
    assert ledger.join("0", 2, 0.0)
    assert not ledger.join("0", 1, 0.0)
    assert ledger.grant_usd("0", 1, need=0.1, want=1) == 0.0
    ledger.leave("0", 1, 0.0)
    assert ledger.grant_usd("0", 2, need=0.1, want=1) > 0


def test_dollar_state_survives_a_restart() -> None:
    """A restarted ledger restored from the checkpoint keeps every exposure."""
    clock = Clock()
    ledger = Ledger({}, limit_usd=5.0, clock=clock)
    ledger.join("0", 1, 0.0)
    ledger.grant_usd("0", 1, need=1.0, want=4.0)
    again = Ledger({}, limit_usd=5.0, restarted=True, clock=clock)
    again.restore_usd(ledger.usd_state())
    assert again.committed_usd == ledger.committed_usd
    assert again.grant_usd("0", 1, need=5.0, want=5.0) == 0.0


def test_limits_learned_from_headers_pace_the_scope_never_above_a_configured_one() -> None:
    """A scope with no limit of its own follows the limit a holder read from the server's
    headers; a configured limit below the server's stays the one in force."""
    clock = Clock()
    ledger = Ledger({"": Limits(), "m": Limits(requests_per_minute=60)}, clock=clock)
    assert ledger.lease("a", "", want_requests=500).requests == 500  # not limited yet
    ledger.learn("", 1200, None)
    assert ledger.lease("a", "", want_requests=500).requests <= 1200 / 60 * BURST_S
    ledger.learn("m", 6000, None)
    assert ledger.lease("a", "m", want_requests=500).requests <= 1

"""The shard side of the cluster budget (runner/cluster/budget.py) against the actor's own code
run in this event loop: what two shards' limiters and budgets do, without a Ray cluster."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import anyio
import pytest

pytest.importorskip("ray")

from runner.cluster.budget import BudgetActor, ClusterPacing
from runner.cluster.ledger import Ledger, Limits
from runner.records import WorkItem
from runner.report.pricing import PriceSource, parse_price_table
from runner.spec import RunSpec

pytestmark = pytest.mark.anyio

RATE_LIMIT_HEADERS = {"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "0"}


class _Method:
    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn

    def remote(self, *args: Any) -> asyncio.Future[Any]:
        # Scheduled at once, as a Ray call is: awaited by `call`, left running by `tell`.
        return asyncio.ensure_future(self.fn(*args))


class InLoopActor:
    """BudgetActor's methods on this loop, called as a Ray actor handle is."""

    def __init__(self, ledger: Ledger) -> None:
        actor = BudgetActor.__new__(BudgetActor)
        actor.ledger, actor.checkpoint, actor.restarted, actor.frozen = ledger, None, False, False
        actor._changed = asyncio.Event()
        self.actor = actor

    def __getattr__(self, name: str) -> _Method:
        return _Method(getattr(self.actor, name))


class FakePool:
    def __init__(self) -> None:
        self.stop_reason: str | None = None
        self.stopped = anyio.Event()

    def stop(self) -> None:
        self.stopped.set()


def _item(i: int) -> WorkItem:
    return WorkItem(i, f"r{i}", "m", b"{}", f"h{i}", est_prompt_tokens=1000, max_tokens=0)


async def test_a_rate_limit_met_by_one_shard_holds_the_other() -> None:
    """Shard A meets a rate-limit 429 (Retry-After 1 s): shard B's next request waits for it."""
    actor = InLoopActor(Ledger({"": Limits(requests_per_minute=6000)}, clock=time.monotonic))
    a, b = (ClusterPacing(actor, holder=h, attempt=1) for h in "ab")
    run = RunSpec(requests_per_minute=6000, concurrency=4)
    limiter_a, limiter_b = a.limiters(run).default, b.limiters(run).default
    async with anyio.create_task_group() as tg:
        tg.start_soon(a.run, FakePool())
        tg.start_soon(b.run, FakePool())
        with anyio.fail_after(10):
            limiter_b.release(await limiter_b.acquire(), outcome="ok")  # B is running
            assert limiter_a.pause_after_429(1.0, RATE_LIMIT_HEADERS)
            await anyio.sleep(0.2)  # (the watch answers within milliseconds)
            started = time.monotonic()
            limiter_b.release(await limiter_b.acquire(), outcome="ok")
            assert time.monotonic() - started >= 0.6
        tg.cancel_scope.cancel()
    assert actor.actor.ledger.pauses == 1


async def test_leases_pace_two_shards_at_one_rate() -> None:
    """Two shards acquiring as fast as they can share 600 a minute: ~10 a second together
    (one second's burst first)."""
    actor = InLoopActor(Ledger({"": Limits(requests_per_minute=600)}, clock=time.monotonic))
    pacings = [ClusterPacing(actor, holder=h, attempt=1) for h in "ab"]
    run = RunSpec(requests_per_minute=600, concurrency=8)
    limiters = [p.limiters(run).default for p in pacings]
    granted = 0

    async def hammer(limiter: Any) -> None:
        nonlocal granted
        while True:
            limiter.release(await limiter.acquire(), outcome="ok")
            granted += 1

    async with anyio.create_task_group() as tg:
        for pacing, limiter in zip(pacings, limiters, strict=True):
            tg.start_soon(pacing.run, FakePool())
            tg.start_soon(hammer, limiter)
        await anyio.sleep(1.5)
        tg.cancel_scope.cancel()
    assert 5 <= granted <= 10 + 1.5 * 10 + 2


async def test_a_quota_error_stops_every_shard() -> None:
    """A quota refusal reported by one shard stops the other shard's pool, with the reason."""
    actor = InLoopActor(Ledger({"": Limits()}, clock=time.monotonic))
    a, b = (ClusterPacing(actor, holder=h, attempt=1) for h in "ab")
    run = RunSpec(concurrency=2)
    limiter_a = a.limiters(run).default
    b.limiters(run)
    pool_b = FakePool()
    async with anyio.create_task_group() as tg:
        tg.start_soon(a.run, FakePool())
        tg.start_soon(b.run, pool_b)
        await anyio.sleep(0.05)  # B's watch is open
        limiter_a.refused_for_quota("the provider refused for lack of quota")
        with anyio.fail_after(5):
            await pool_b.stopped.wait()
        tg.cancel_scope.cancel()
    assert pool_b.stop_reason == "the provider refused for lack of quota"


async def test_shards_never_spend_past_the_run_budget() -> None:
    """Two shards reserving rows from allowances: together they never reserve past the
    budget, and they reserve nearly all of it before `more_room` says no."""
    actor = InLoopActor(Ledger({}, limit_usd=1.0, clock=time.monotonic))
    prices = PriceSource(parse_price_table({"m": {"input": 10, "output": 10}}, path="t"))
    budgets = []
    for holder in "ab":
        pacing = ClusterPacing(actor, holder=holder, attempt=1)
        budget = pacing.budget(prices, 0.5, 0.0)
        assert budget is not None
        budgets.append(budget)
    with anyio.fail_after(10):
        for i in range(200):  # $0.01 a row: 100 fit
            budget = budgets[i % 2]
            reservation = budget.reserve(_item(i))
            while reservation is None and await budget.more_room(_item(i)):
                reservation = budget.reserve(_item(i))
            if reservation is None:
                break
    reserved = sum(float(b.spent + b.reserved) for b in budgets)
    assert 0.97 <= reserved <= 1.0 + 1e-9
    assert actor.actor.ledger.committed_usd <= 1.0 + 1e-9
    assert "budget" in budgets[0].reached()

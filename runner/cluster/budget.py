"""One rate and money budget per API key across a Ray cluster: the actor and the shards' side.

    driver:  open_budget(run_id, key_env, run) ──> BudgetActor "runner-budget/<run>/<KEY_ENV>"
                 (named, get_if_exists, max_restarts=-1, owned by the driver: it ends with the run)
    shard:   ClusterPacing (runner/cluster/shard.py's Pacing)
                 limiters ──> Limiter(quota=ClusterQuota per scope): each request start takes
                              one request (and its tokens) from a lease of about a second
                 budget   ──> ClusterBudget: rows reserve their worst case from an allowance
                 run      ──> refills leases, watches the actor for pauses and stops

The actor runs runner/cluster/ledger.py (the arithmetic) and is off the hot path: a shard calls
it about once a second per scope, and when its dollar allowance runs out. A 429 that pauses a
shard's limiter (a rate limit: runner/engine/limiter.py `pause_after_429`) is reported at once;
every other shard hears it through `watch`, a call the actor answers as soon as anything is
paused or stopped (WATCH_S at the latest, then it is made again): a pause reaches every holder
within one actor round trip (milliseconds on one machine), and a holder whose watch is broken
(the actor restarting) learns it at its next lease, within LEASE_S. A quota error stops
every shard. After a restart the actor runs at half rate for a window (it forgot its grants)
and reloads its dollar ledger from a checkpoint on the driver's node (it is pinned there),
written before any allowance is handed out (without one it grants no more dollars): the
budget is never passed across the cluster.

Keys never travel: the actor is named by the key's variable NAME, never its value.
Must not be imported by the local runner (runner/cluster/ is the only home of ray).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio
import ray
import ray.exceptions
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from runner.cluster.ledger import LEASE_S, Grant, Ledger, Limits
from runner.engine.limiter import Limiter, Limiters
from runner.records import WorkItem
from runner.report.pricing import ATTO, Budget, PriceSource, atto
from runner.spec import RunSpec

# A watch call returns after this long when nothing happened, and is made again.
WATCH_S = 2.0
# Calls to the actor that fail in a row (it is gone for good) before a shard stops.
MAX_FAILURES = 20
# A new dollar allowance aims at this many rows' worst case (the actor may give less).
ALLOWANCE_ROWS = 32


def actor_name(run_id: str, key_env: str | None) -> str:
    """The budget actor's name: the run and the key's variable name (never its value)."""
    return f"runner-budget/{run_id}/{key_env or 'no-key'}"


def run_limits(run: RunSpec) -> dict[str, Limits]:
    """The scopes of a run's limits: "" for the key's, and each model with its own."""
    scopes = {"": Limits(run.requests_per_minute, run.tokens_per_minute)}
    for model, limits in run.limits.items():
        scopes[model] = Limits(limits.requests_per_minute, limits.tokens_per_minute)
    return scopes


class BudgetActor:
    """The async Ray actor holding one key's Ledger; every method runs on its one event loop."""

    def __init__(
        self,
        limits: Mapping[str, tuple[float | None, float | None]],
        window_s: float,
        limit_usd: float | None,
        spent_usd: Mapping[str, float],
        checkpoint: str | None,
    ) -> None:
        with warnings.catch_warnings():  # Ray 2.60 reads its own deprecated actor_id here
            warnings.simplefilter("ignore", DeprecationWarning)
            self.restarted = bool(ray.get_runtime_context().was_current_actor_reconstructed)
        self.ledger = Ledger(
            {scope: Limits(*pair) for scope, pair in limits.items()},
            window_s=window_s,
            limit_usd=limit_usd,
            spent_usd=spent_usd,
            restarted=self.restarted,
            clock=time.monotonic,
        )
        self.checkpoint = Path(checkpoint) if checkpoint else None
        # Restarted without its ledger, it cannot tell what shards hold: no more dollars.
        self.frozen = self.restarted and limit_usd is not None
        if self.restarted and self.checkpoint is not None:
            with contextlib.suppress(OSError, ValueError):
                self.ledger.restore_usd(json.loads(self.checkpoint.read_text()))
                self.frozen = False
        self._changed = asyncio.Event()

    def _bump(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def _save(self) -> bool:
        """Write the dollar ledger for a restart; False when it could not be written."""
        if self.checkpoint is None:
            return True
        tmp = self.checkpoint.with_name(self.checkpoint.name + ".tmp")
        try:
            self.checkpoint.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp.write_text(json.dumps(self.ledger.usd_state()))
            os.replace(tmp, self.checkpoint)
        except OSError:
            return False
        return True

    async def lease(self, holder: str, scope: str, asked: dict[str, int]) -> Grant:
        return self.ledger.lease(holder, scope, **asked)

    async def rate_limited(self, scope: str, seconds: float) -> None:
        if self.ledger.rate_limited(scope, seconds):
            self._bump()

    async def learn(self, scope: str, rpm: float | None, tpm: float | None) -> None:
        self.ledger.learn(scope, rpm, tpm)

    async def stop(self, reason: str) -> None:
        if self.ledger.stopped is None:
            self.ledger.stop(reason)
            self._bump()

    async def watch(self, epoch: int, timeout_s: float) -> tuple[int, dict[str, float], str | None]:
        """Returns (epoch, pause left per scope, stop reason) once the epoch differs from
        `epoch`, or after `timeout_s`."""
        if self.ledger.epoch == epoch:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout_s)
        ledger = self.ledger
        pauses = {s: ledger.paused_for(s) for s in ledger.scopes() if ledger.paused_for(s) > 0}
        return ledger.epoch, pauses, ledger.stopped

    async def join(self, holder: str, attempt: int, spent_usd: float) -> bool:
        joined = self.ledger.join(holder, attempt, spent_usd)
        self._save()
        return joined

    async def grant_usd(self, holder: str, attempt: int, need: float, want: float) -> float:
        if self.frozen:
            return 0.0
        granted = self.ledger.grant_usd(holder, attempt, need=need, want=want)
        if granted and not self._save():
            # Not handed out: a restart, reading the older checkpoint, could not know of it.
            self.ledger.exposure[holder] -= granted
            return 0.0
        return granted

    async def leave(self, holder: str, attempt: int, spent_usd: float) -> None:
        self.ledger.leave(holder, attempt, spent_usd)
        self._save()

    async def state(self) -> dict[str, Any]:
        """For reports and tests: restarts, pauses, dollars committed."""
        return {
            "restarted": self.restarted,
            "pauses": self.ledger.pauses,
            "epoch": self.ledger.epoch,
            "stopped": self.ledger.stopped,
            "committed_usd": self.ledger.committed_usd,
            "exposure": dict(self.ledger.exposure),
        }


def open_budget(
    run_id: str,
    key_env: str | None,
    run: RunSpec,
    *,
    spent_usd: Mapping[str, float] | None = None,
    window_s: float = 60.0,
    session: str | None = None,
) -> PacingFactory:
    """Start (or find) the run's budget actor for one key, on this (the driver's) node.

    Call on the driver with ray initialised. `spent_usd`: what each shard (by its number as
    a string) spent in earlier sessions. `window_s`: the server's window for per-minute
    limits. The checkpoint of the dollar ledger lives in this node's temp folder, one per
    session (a new session counts from the shards' journals, as the local runner does).
    """
    name = actor_name(run_id, key_env)
    folder = Path(tempfile.gettempdir()) / f"runner-ray-{os.getuid()}" / run_id
    stamp = session or f"{time.time():.6f}"
    checkpoint = folder / f"budget-{key_env or 'no-key'}-{stamp}.json"
    for old in folder.glob(f"budget-{key_env or 'no-key'}-*.json"):
        with contextlib.suppress(OSError):
            old.unlink()  # an earlier session's: this one counts from the shards' journals
    limits = {
        scope: (lim.requests_per_minute, lim.tokens_per_minute)
        for scope, lim in run_limits(run).items()
    }
    here = ray.get_runtime_context().get_node_id()
    actor_class: Any = ray.remote(BudgetActor)
    actor = actor_class.options(
        name=name,
        get_if_exists=True,
        max_restarts=-1,
        max_task_retries=-1,
        num_cpus=0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=here, soft=False),
    ).remote(limits, window_s, run.budget_usd, dict(spent_usd or {}), str(checkpoint))
    return PacingFactory(name, actor)


class ShardLike(Protocol):
    @property
    def shard(self) -> int: ...

    @property
    def attempt(self) -> int: ...


@dataclass(frozen=True, slots=True)
class PacingFactory:
    """Sent with each shard's task (pickled with the actor's handle). The driver holds it
    for the session: a named actor that is not detached lives as long as a handle does, so
    the budget ends with the run's driver."""

    name: str
    actor: Any

    def __call__(self, task: ShardLike) -> ClusterPacing:
        return ClusterPacing(self.actor, holder=str(task.shard), attempt=task.attempt)


class _Link:
    """Calls to the actor, counting failures in a row (the actor gone for good stops us)."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor
        self.failures = 0
        self.broken: str | None = None

    async def call(self, method: str, *args: Any) -> Any:
        try:
            result = await getattr(self.actor, method).remote(*args)
        except ray.exceptions.RayError as exc:
            self.failures += 1
            if self.failures >= MAX_FAILURES:
                self.broken = f"the cluster's rate budget is unreachable: {type(exc).__name__}"
            raise
        self.failures = 0
        return result

    def tell(self, method: str, *args: Any) -> None:
        """Fire and forget (also from synchronous code and under cancellation)."""
        with contextlib.suppress(ray.exceptions.RayError):
            getattr(self.actor, method).remote(*args)


class ClusterQuota:
    """One scope's lease on this shard: the limiter's `SharedQuota` (runner/engine/limiter.py).

    The hot path (`wait_time`, `take`) only counts down the lease; the pacing's refill task
    asks the actor for the next lease when this one runs low, expires, or a request waits.
    """

    def __init__(
        self, link: _Link, holder: str, scope: str, *, limited: bool, tokens_limited: bool
    ) -> None:
        self.link, self.holder, self.scope = link, holder, scope
        self.limited = limited  # False: no rate of its own, only pauses apply
        self.tokens_limited = tokens_limited
        self.requests = 0  # left of the lease
        self.tokens = 0
        self.granted = 0  # requests of the last lease
        self.expires = -math.inf
        self.paused_until = -math.inf
        self.retry_at = -math.inf  # the actor said nothing fits before this
        self.need_tokens = 0
        self.token_debt = 0
        self.wanted = anyio.Event()
        self._told: tuple[int | None, int | None] = (None, None)  # limits learned, told
        self._wake: Callable[[], None] = lambda: None

    def attach(self, wake: Callable[[], None]) -> None:
        self._wake = wake

    def wait_time(self, tokens: int, now: float) -> float:
        if now < self.paused_until:
            return self.paused_until - now
        if not self.limited:
            return 0.0
        if now < self.expires and self.requests >= 1:
            if not self.tokens_limited or self.tokens >= tokens:
                if self.requests * 2 <= self.granted:
                    self.wanted.set()  # half used: the next lease is fetched meanwhile
                return 0.0
        self.need_tokens = max(self.need_tokens, tokens)
        self.wanted.set()
        return max(self.retry_at - now, 0.0) or LEASE_S

    def take(self, tokens: int, now: float) -> None:
        if not self.limited:
            return
        self.requests -= 1
        if self.tokens_limited:
            self.tokens -= tokens

    def settle(self, delta_tokens: int) -> None:
        if self.tokens_limited:
            self.token_debt += delta_tokens

    def rate_limited(self, seconds: float) -> None:
        self.pause(seconds)
        self.link.tell("rate_limited", self.scope, seconds)

    def refused(self, reason: str) -> None:
        self.link.tell("stop", reason)

    def learned(self, requests_per_minute: int | None, tokens_per_minute: int | None) -> None:
        """Limits read from the server's headers: from now on this scope leases (the actor
        learns them too, once per change)."""
        told = (requests_per_minute or None, tokens_per_minute or None)
        if told == self._told:
            return
        self._told = told
        self.limited = True
        self.tokens_limited = self.tokens_limited or told[1] is not None
        self.link.tell("learn", self.scope, told[0], told[1])

    def pause(self, seconds: float) -> None:
        """Hold every start for `seconds`; the rest of the lease goes back at the next ask."""
        now = time.monotonic()
        self.paused_until = max(self.paused_until, now + seconds)
        self.expires = -math.inf

    def unused(self) -> tuple[int, int]:
        """What is left of the lease, handed back (it ends now)."""
        back = (max(self.requests, 0), max(self.tokens, 0))
        self.requests = self.tokens = 0
        self.expires = -math.inf
        return back

    async def refill(self) -> str | None:
        """Fetch the next lease whenever one is wanted; returns a stop reason when the run
        must stop (a quota error somewhere, or the actor gone)."""
        while True:
            await self.wanted.wait()
            self.wanted = anyio.Event()
            asked_at = time.monotonic()
            unused_requests, unused_tokens = self.unused()
            debt, self.token_debt = self.token_debt, 0
            need = self.need_tokens
            asked = {
                "want_requests": max(self.granted * 2, 1),
                "need_tokens": need,
                "want_tokens": 0,
                "unused_requests": unused_requests,
                "unused_tokens": unused_tokens,
                "token_debt": debt,
            }
            try:
                grant: Grant = await self.link.call("lease", self.holder, self.scope, asked)
            except ray.exceptions.RayError:
                if self.link.broken:
                    return self.link.broken
                self.retry_at = time.monotonic() + LEASE_S
                await anyio.sleep(LEASE_S)  # the actor restarting: ask again then
                self.wanted.set()
                continue
            if grant.stop is not None:
                return grant.stop
            if grant.pause_s > 0:
                self.pause(grant.pause_s)
            if grant.requests:
                self.need_tokens = 0
                self.requests, self.tokens = grant.requests, grant.tokens
                self.granted = grant.requests
                self.expires = asked_at + grant.ttl_s
                self.retry_at = -math.inf
                self._wake()
            else:
                self.retry_at = time.monotonic() + grant.wait_s
                await anyio.sleep(grant.wait_s)  # a computed deadline: room is due then
                self.wanted.set()


class ClusterBudget(Budget):
    """A shard's Budget whose limit is what it spent before plus the allowances the actor
    granted it: each row reserves its worst case locally; when that does not fit,
    `more_room` asks the actor for another allowance (False: the run's budget is reached)."""

    def __init__(
        self,
        prices: PriceSource,
        *,
        link: _Link,
        holder: str,
        attempt: int,
        spent_usd: float,
        default_completion: int = 0,
    ) -> None:
        super().__init__(
            prices,
            limit_usd=None,
            spent_usd=spent_usd,
            default_completion=default_completion,
        )
        # What it spent is all the room it has until granted more (an infinite spend is
        # clamped, never the "no limit" an infinite limit means).
        self.limit_units = self.spent_units
        self.link, self.holder, self.attempt = link, holder, attempt
        self.joined = False
        self._lock = anyio.Lock()

    async def more_room(self, item: WorkItem) -> bool:
        async with self._lock:
            assert self.limit_units is not None
            worst = self.worst(item)
            need = self.spent_units + self.reserved_units + worst - self.limit_units
            if need <= 0:
                return True  # another worker's allowance made room meanwhile
            try:
                if not self.joined:
                    self.joined = await self.link.call(
                        "join", self.holder, self.attempt, float(self.spent)
                    )
                    if not self.joined:
                        return False  # a later attempt of this shard runs: this one stops
                want = (need + worst * ALLOWANCE_ROWS) / ATTO
                granted = await self.link.call(
                    "grant_usd", self.holder, self.attempt, need / ATTO, want
                )
            except ray.exceptions.RayError:
                return False
            if not granted:
                return False
            self.limit_units += atto(granted)
            return True

    def reached(self) -> str:
        return (
            f"the run's budget is reached across the cluster (this shard spent "
            f"${self.spent:.4f}); resume with --budget-usd to continue"
        )

    def leave(self) -> None:
        """The session's end: what it spent, and what is still reserved (rows cut on the
        wire), is all the actor keeps charged to this shard."""
        if self.joined:
            self.link.tell("leave", self.holder, self.attempt, float(self.spent + self.reserved))


class _Stoppable(Protocol):
    stop_reason: str | None

    def stop(self) -> None: ...


class ClusterPacing:
    """runner/cluster/shard.py's Pacing backed by the key's budget actor."""

    def __init__(self, actor: Any, *, holder: str, attempt: int) -> None:
        self.link = _Link(actor)
        self.holder, self.attempt = holder, attempt
        self.quotas: dict[str, ClusterQuota] = {}
        self.spender: ClusterBudget | None = None

    def _quota(self, scope: str, rpm: float | None, tpm: float | None) -> ClusterQuota:
        limited = rpm is not None or tpm is not None
        quota = ClusterQuota(
            self.link, self.holder, scope, limited=limited, tokens_limited=tpm is not None
        )
        self.quotas[scope] = quota
        return quota

    def limiters(self, run: RunSpec) -> Limiters:
        """Concurrency stays the shard's (a cap per shard); rates are the actor's."""

        def make(scope: str, rpm: float | None, tpm: float | None, concurrency: int) -> Limiter:
            return Limiter(
                concurrency=concurrency,
                adaptive=run.adaptive_concurrency,
                quota=self._quota(scope, rpm, tpm),
            )

        default = make("", run.requests_per_minute, run.tokens_per_minute, run.concurrency)
        per_model = {
            model: make(
                model,
                limits.requests_per_minute,
                limits.tokens_per_minute,
                min(limits.concurrency or run.concurrency, run.concurrency),
            )
            for model, limits in run.limits.items()
        }
        return Limiters(default, per_model)

    def budget(
        self, prices: PriceSource, limit_usd: float | None, spent_usd: float
    ) -> Budget | None:
        """The cluster's dollar budget when the run has one (`limit_usd`, this shard's share
        of it, only says whether it has); else the local runner's own."""
        if limit_usd is None:
            return None
        self.spender = ClusterBudget(
            prices, link=self.link, holder=self.holder, attempt=self.attempt, spent_usd=spent_usd
        )
        return self.spender

    async def run(self, pool: _Stoppable) -> None:
        """Beside the pool for the session: refill leases, hear pauses and stops."""
        try:
            async with anyio.create_task_group() as tg:
                for quota in self.quotas.values():  # one without limits waits: none wanted
                    tg.start_soon(self._refilling, quota, pool)
                tg.start_soon(self._watching, pool)
        finally:
            if self.spender is not None:
                self.spender.leave()
            for quota in self.quotas.values():
                unused = quota.unused()
                if any(unused):
                    asked = {"want_requests": 0, "unused_requests": unused[0]}
                    asked |= {"unused_tokens": unused[1], "token_debt": quota.token_debt}
                    self.link.tell("lease", self.holder, quota.scope, asked)

    async def _refilling(self, quota: ClusterQuota, pool: _Stoppable) -> None:
        reason = await quota.refill()
        if reason is not None:
            _stop(pool, reason)

    async def _watching(self, pool: _Stoppable) -> None:
        epoch = 0
        while True:
            try:
                epoch, pauses, stop = await self.link.call("watch", epoch, WATCH_S)
            except ray.exceptions.RayError:
                if self.link.broken:
                    _stop(pool, self.link.broken)
                    return
                await anyio.sleep(LEASE_S)  # restarting: leases tell pauses meanwhile
                continue
            if stop is not None:
                _stop(pool, stop)
                return
            for scope, seconds in pauses.items():
                targets = self.quotas.values() if scope == "" else [self.quotas.get(scope)]
                for quota in targets:
                    if quota is not None:
                        quota.pause(seconds)


def _stop(pool: _Stoppable, reason: str) -> None:
    if pool.stop_reason is None:
        pool.stop_reason = reason
    pool.stop()

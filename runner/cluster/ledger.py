"""The bookkeeping of one API key's cluster-wide budget: request and token rates, pauses, dollars.

Owns the arithmetic the budget actor (runner/cluster/budget.py) runs for every shard that
holds a lease on the key; knows nothing of Ray, so it is tested with an injected clock. Must not
import ray, anyio or anything that does I/O (the actor checkpoints `usd_state()` itself).

Rates, per scope (the key's limits, or one model's own `[run.limits]`):

    lease(holder, scope, want) ──> at most `want` requests (and tokens) for LEASE_S seconds
        granted from a bucket refilled at the limit's rate, holding at most BURST_S of it,
        and only while the grants of the last `window_s + LEASE_S` seconds stay within the
        limit: whatever a holder sends under a lease lands within one server window
        (`window_s`, 60 s for a per-minute limit) of its grant, so no server window ever
        holds more than the limit, however the grants were spread.
    unused ──> what a holder gives back of its last lease leaves both (never sent).
    rate_limited(scope, seconds) ──> every holder of the scope is refused until then.

Dollars, for the run (all scopes): each holder (a shard) is charged its exposure, what it spent
before this session plus every allowance granted to it since; a grant never takes the sum of
exposures past the run's budget. A holder reserves each row's worst case from its allowance
(runner/report/pricing.py Budget), settles to the real cost, and at the end (`leave`) its
exposure drops to what it really spent.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

# A lease is good for this long after the holder asked for it; then its rest is given back.
LEASE_S = 1.0
# The buckets hold at most this many seconds of their rate: the run starts, and resumes after a
# pause, at the limit's rate rather than with a burst of a whole window.
BURST_S = 1.0
# A holder that leased within this many seconds counts as active (the grant cap is shared).
ACTIVE_S = 3.0
# A dollar allowance is at most this share of what is left, split among the holders spending.
USD_SHARE = 0.5
# After the actor restarts it knows no grants of the last window: it runs at half rate for a
# window, by when every grant it forgot has left the server's window.
RESTART_FACTOR = 0.5


@dataclass(frozen=True, slots=True)
class Limits:
    """A scope's limits: requests and tokens per minute (None: not limited)."""

    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None


@dataclass(frozen=True, slots=True)
class Grant:
    """What a lease call gives a holder.

    `requests`/`tokens`: granted now, to be used within `ttl_s`. `wait_s`: when nothing was
    granted, the seconds before asking again may succeed. `pause_s`: the scope is paused
    (a 429 somewhere) for that long. `epoch`: counts pauses and stops, for `watch`. `stop`:
    the run must stop (a quota error somewhere), with this reason.
    """

    requests: int = 0
    tokens: int = 0
    ttl_s: float = LEASE_S
    wait_s: float = 0.0
    pause_s: float = 0.0
    epoch: int = 0
    stop: str | None = None


class _Rate:
    """One limit: a bucket of BURST_S of its rate, and the grants of the last window."""

    __slots__ = ("_updated", "level", "log", "logged", "per_minute", "scale", "span", "window_s")

    def __init__(self, per_minute: float, window_s: float, scale: float, now: float) -> None:
        self.per_minute = per_minute
        self.window_s = window_s
        self.scale = scale
        self.level = self.capacity
        self._updated = now
        self.span = window_s + LEASE_S  # a grant counts this long: its sends land in a window
        self.log: deque[list[float]] = deque()  # [granted at, amount], oldest first
        self.logged = 0.0

    @property
    def rate(self) -> float:
        return self.per_minute / 60.0 * self.scale

    @property
    def capacity(self) -> float:
        return max(self.rate * BURST_S, 1.0)

    @property
    def limit(self) -> float:
        """What one server window may hold."""
        return self.per_minute * self.window_s / 60.0 * self.scale

    def _advance(self, now: float) -> None:
        if now > self._updated:
            self.level = min(self.level + (now - self._updated) * self.rate, self.capacity)
            self._updated = now
        cutoff = now - self.span
        while self.log and self.log[0][0] <= cutoff:
            self.logged -= self.log.popleft()[1]

    def available(self, now: float) -> float:
        self._advance(now)
        return max(min(self.level, self.limit - self.logged), 0.0)

    def wait(self, amount: float, now: float) -> float:
        """Seconds until `amount` (at most the capacity) could be granted."""
        self._advance(now)
        target = min(amount, self.capacity, self.limit)
        wait = max(target - self.level, 0.0) / self.rate
        excess = self.logged + target - self.limit
        for at, logged in self.log:
            if excess <= 1e-9:
                break
            excess -= logged
            wait = max(wait, at + self.span - now)
        return wait

    def take(self, amount: float, now: float) -> list[float]:
        self._advance(now)
        self.level -= amount
        entry = [now, amount]
        self.log.append(entry)
        self.logged += amount
        return entry

    def give_back(self, entry: list[float] | None, amount: float, now: float) -> None:
        """Unused amount of a grant: never sent, so out of the bucket's debit and the log."""
        self._advance(now)
        amount = max(amount, 0.0)
        if entry is not None and entry[0] > now - self.span:  # still in the log
            back = min(amount, entry[1])
            entry[1] -= back
            self.logged -= back
        self.level = min(self.level + amount, self.capacity)

    def debit(self, amount: float, now: float) -> None:
        """More was used than granted (tokens over their estimate): a debt paid by waiting."""
        self._advance(now)
        if amount > 0:
            self.level -= amount
            self.log.append([now, amount])
            self.logged += amount
        else:
            self.level = min(self.level - amount, self.capacity)

    def hold(self) -> None:
        """Empty the bucket: what comes after a pause starts from nothing, not a burst."""
        self.level = min(self.level, 0.0)


@dataclass(slots=True)
class _Scope:
    requests: _Rate | None
    tokens: _Rate | None
    paused_until: float = -math.inf
    # The last grant to each holder, given back in part when the holder reports it unused.
    last: dict[str, tuple[list[float] | None, list[float] | None]] = field(default_factory=dict)


class Ledger:
    """One key's rate and dollar budget for every holder; see the module docstring.

    `limits` maps each scope to its limits ("" is the key's); `window_s` is the server's
    window (60 s for per-minute limits). `limit_usd` is the run's budget (None: not limited)
    and `spent_usd` what each holder (shard) spent in earlier sessions as far as the driver
    knows. `restarted`: this ledger replaces one that was lost (rates start at half).
    """

    def __init__(
        self,
        limits: Mapping[str, Limits],
        *,
        window_s: float = 60.0,
        limit_usd: float | None = None,
        spent_usd: Mapping[str, float] | None = None,
        restarted: bool = False,
        clock: Callable[[], float],
    ) -> None:
        if not window_s > 0:
            raise ValueError(f"window_s must be positive, not {window_s!r}")
        self._clock = clock
        now = clock()
        self.window_s = window_s
        self.factor = RESTART_FACTOR if restarted else 1.0
        self._full_at = now + window_s + LEASE_S if restarted else now
        self._scopes = {name: self._scope(lim, now) for name, lim in limits.items()}
        self._configured = dict(limits)
        self._seen: dict[str, float] = {}
        self.epoch = 0
        self.stopped: str | None = None
        self.limit_usd = limit_usd
        self.exposure: dict[str, float] = {k: float(v) for k, v in (spent_usd or {}).items()}
        self.attempts: dict[str, int] = {}
        self._spending: set[str] = set()  # holders joined and not left: allowances are shared
        self.pauses = 0

    def _scope(self, limits: Limits, now: float) -> _Scope:
        rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
        w, f = self.window_s, self.factor
        return _Scope(
            None if rpm is None else _Rate(rpm, w, f, now),
            None if tpm is None else _Rate(tpm, w, f, now),
        )

    def _now(self) -> float:
        now = self._clock()
        if self.factor != 1.0 and now >= self._full_at:
            # A window after a restart: every forgotten grant has left the server's window.
            self.factor = 1.0
            for state in self._scopes.values():
                for rate in (state.requests, state.tokens):
                    if rate is not None:
                        rate.scale = 1.0
        return now

    # -- rates --

    def _get(self, scope: str) -> _Scope:
        found = self._scopes.get(scope)
        if found is None:  # a scope without limits of its own: only pauses apply
            found = self._scopes[scope] = _Scope(None, None)
        return found

    def _active(self, holder: str, now: float) -> int:
        self._seen[holder] = now
        for name, at in list(self._seen.items()):
            if now - at > ACTIVE_S:
                del self._seen[name]
        return len(self._seen)

    def lease(
        self,
        holder: str,
        scope: str,
        *,
        want_requests: int,
        need_tokens: int = 0,
        want_tokens: int = 0,
        unused_requests: int = 0,
        unused_tokens: int = 0,
        token_debt: int = 0,
    ) -> Grant:
        """Give back what the holder's last lease left unused, then grant a new one.

        At most `want_requests` requests, and tokens between `need_tokens` (what one waiting
        request needs) and `want_tokens`; each capped at the bucket's capacity shared among
        the active holders. Nothing is granted while paused or stopped.
        `token_debt`: tokens used beyond (or, negative, short of) what was granted.
        """
        now = self._now()
        state = self._get(scope)
        active = self._active(holder, now)
        req_entry, tok_entry = state.last.pop(holder, (None, None))
        if state.requests is not None:
            state.requests.give_back(req_entry, unused_requests, now)
        if state.tokens is not None:
            state.tokens.give_back(tok_entry, unused_tokens, now)
            if token_debt:
                state.tokens.debit(token_debt, now)
        if self.stopped is not None:
            return Grant(epoch=self.epoch, stop=self.stopped)
        if now < state.paused_until:
            pause = state.paused_until - now
            return Grant(wait_s=pause, pause_s=pause, epoch=self.epoch)
        requests = max(want_requests, 0)
        waits = [0.0]
        if state.requests is not None and requests:
            cap = max(state.requests.capacity / active, 1.0)
            room = math.floor(min(state.requests.available(now), cap))
            if room < 1:
                waits.append(state.requests.wait(1, now))
            requests = min(requests, room)
        tokens = max(want_tokens, need_tokens, 0)
        if state.tokens is not None and requests:
            cap = max(state.tokens.capacity / active, float(need_tokens))
            room = math.floor(min(state.tokens.available(now), cap))
            if room < need_tokens:
                waits.append(state.tokens.wait(need_tokens, now))
                tokens = 0
            else:
                tokens = min(tokens, room)
        if max(waits) > 0 or requests == 0:
            return Grant(wait_s=max(waits), epoch=self.epoch)
        req_entry = state.requests.take(requests, now) if state.requests is not None else None
        tok_entry = state.tokens.take(tokens, now) if state.tokens is not None else None
        state.last[holder] = (req_entry, tok_entry)
        return Grant(requests=requests, tokens=tokens, epoch=self.epoch)

    def learn(
        self, scope: str, requests_per_minute: float | None, tokens_per_minute: float | None
    ) -> None:
        """A holder read the server's limits from its headers: the scope follows them (never
        above a configured limit), as each local limiter does (runner/engine/limiter.py)."""
        now = self._now()
        state = self._get(scope)
        configured = self._configured.get(scope, Limits())
        for kind, learned, limit in (
            ("requests", requests_per_minute, configured.requests_per_minute),
            ("tokens", tokens_per_minute, configured.tokens_per_minute),
        ):
            if learned is None or not learned > 0:
                continue
            target = float(learned) if limit is None else min(limit, float(learned))
            rate: _Rate | None = getattr(state, kind)
            if rate is None:
                setattr(state, kind, _Rate(target, self.window_s, self.factor, now))
            elif rate.per_minute != target:
                rate.per_minute = target
                rate.level = min(rate.level, rate.capacity)

    def rate_limited(self, scope: str, seconds: float) -> bool:
        """A holder met a rate limit (a 429 with Retry-After): pause every holder of the scope
        (every scope when it is the key's, ""); True if that extended the pause."""
        now = self._now()
        until = now + max(seconds, 0.0)
        extended = False
        for name in self._scopes if scope == "" else (scope,):
            state = self._get(name)
            if until > state.paused_until:
                state.paused_until = until
                extended = True
            for rate in (state.requests, state.tokens):
                if rate is not None:
                    rate.hold()
        if extended:
            self.epoch += 1
            self.pauses += 1
        return extended

    def stop(self, reason: str) -> None:
        """A holder met a quota error: every holder stops (the run stays resumable)."""
        if self.stopped is None:
            self.stopped = reason
            self.epoch += 1

    def scopes(self) -> list[str]:
        return list(self._scopes)

    def paused_for(self, scope: str = "") -> float:
        state = self._scopes.get(scope)
        return 0.0 if state is None else max(state.paused_until - self._now(), 0.0)

    # -- dollars --

    def join(self, holder: str, attempt: int, spent_usd: float) -> bool:
        """A holder's session starts, having spent `spent_usd` before (its journal's count);
        False when a later attempt of the same holder has joined (this one is stale)."""
        if attempt < self.attempts.get(holder, -1):
            return False
        self.attempts[holder] = attempt
        self.exposure[holder] = max(self.exposure.get(holder, 0.0), float(spent_usd))
        self._spending.add(holder)
        return True

    @property
    def committed_usd(self) -> float:
        return math.fsum(self.exposure.values())

    def grant_usd(self, holder: str, attempt: int, *, need: float, want: float) -> float:
        """An allowance of at least `need` (one row's worst case) and up to `want`, bounded
        by a share of what is left of the run's budget; 0.0 when `need` does not fit."""
        if attempt < self.attempts.get(holder, -1):
            return 0.0
        if self.limit_usd is None:
            return max(need, want)
        room = self.limit_usd - self.committed_usd
        if need > room + 1e-12 or room <= 0:
            return 0.0
        active = max(len(self._spending), 1)
        give = max(need, min(want, room * USD_SHARE / active))
        give = min(give, room)
        self.exposure[holder] = self.exposure.get(holder, 0.0) + give
        return give

    def leave(self, holder: str, attempt: int, spent_usd: float) -> None:
        """A holder's session ended having spent `spent_usd` in all (its sessions before
        included, what was still reserved counted): the rest of its allowances is free."""
        if attempt < self.attempts.get(holder, -1):
            return
        self.exposure[holder] = float(spent_usd)
        self._spending.discard(holder)

    def usd_state(self) -> dict[str, Any]:
        """What a restarted actor needs to keep the dollar budget (see `restore_usd`)."""
        return {"exposure": dict(self.exposure), "attempts": dict(self.attempts)}

    def restore_usd(self, state: Mapping[str, Any]) -> None:
        for holder, usd in dict(state.get("exposure", {})).items():
            self.exposure[str(holder)] = max(self.exposure.get(str(holder), 0.0), float(usd))
        for holder, attempt in dict(state.get("attempts", {})).items():
            self.attempts[str(holder)] = max(self.attempts.get(str(holder), -1), int(attempt))

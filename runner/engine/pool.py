"""The worker pool: a fixed set of workers pulling from one iterator, and one writer.

    items ──(next, in turn)──> N workers ──(list + wake-up)──> writer ──> ResultSink

Never one task per row: memory stays flat whatever the input size. Nothing on the way of a
row awaits but the request itself: a worker pulls its next item synchronously and appends
its record to a list; the writer journals everything appended during one turn of the event
loop in one write (a group commit that costs no latency) and updates the run's counters.
Measured on bench/run.py W1, the bounded streams this replaced cost two extra turns of the
event loop per row. Imports client-side pieces by protocol only: the HTTP client, the sink
and the source are passed in.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

import anyio
import anyio.lowlevel

from runner.engine.limiter import Limiters, PacingSignal, tokens_to_reserve
from runner.errors import (
    AttemptError,
    AuthFailed,
    ConnectFailure,
    KeyRejected,
    ModelNotFound,
    ModelRefused,
    QuotaDenied,
    QuotaExhausted,
    RateLimited,
    UnwantedAnswer,
    primary,
)
from runner.http.retry import Retrier, RetryPolicy
from runner.input.source import Skip, estimate_prompt_tokens
from runner.output.repair import feedback_body
from runner.output.schema import OutputSchema
from runner.output.validate import check_answer
from runner.records import Completion, Progress, Reasked, ResultRecord, WorkItem, hash_key


class Completer(Protocol):
    async def complete(self, body: bytes) -> Completion: ...


class Spender(Protocol):
    """Budget and cost keeping (pricing.Budget): reserve before a row, settle after it."""

    def reserve(self, item: WorkItem) -> object | None:
        """A reservation for the row's worst case, or None when it would pass the budget."""

    def settle(self, reservation: object, record: ResultRecord) -> float | None:
        """Replace the reservation with the row's actual cost; returns that cost if known."""

    def release(self, reservation: object) -> None:
        """Drop a reservation whose row stays pending (its request was not billed)."""

    def reached(self) -> str:
        """The one-line message for a stop at the budget."""

    def room_to_reask(self, reservation: object, record: ResultRecord) -> bool:
        """Whether paying for `record` (a re-asked answer) leaves the row's reservation within
        the budget for its next attempt."""

    def paid(self, reservation: object, record: ResultRecord) -> float | None:
        """Count a paid answer that did not settle its row (re-asked); returns its cost.

        `reservation` is the row's (its worst case stands for an answer of unknown usage)."""

    def charged(
        self, reservation: object, record: ResultRecord, *, answered: bool = False
    ) -> float | None:
        """What settling (`answered`: paying for) `record` charges that its usage cannot
        tell, journaled with it (`charged_usd`) so that a resume after a crash counts it."""

    def worst_usd(self, reservation: object) -> float:
        """A reservation in USD: what a request on the wire may cost."""

    async def more_room(self, item: WorkItem) -> bool:
        """After `reserve` found no room: wait for more (a budget shared by a cluster's
        shards, runner/cluster/); False when none will come (the run stops at the budget)."""


class StartRecorder(Protocol):
    def started(self, entry: tuple[str, str, int], worst_usd: float = 0.0) -> None:
        """Durably note (row_id, model, attempt) before the request is sent, with what it
        may cost (the row's reservation)."""


class ResultSink(Protocol):
    def append(self, records: Sequence[ResultRecord]) -> None:
        """Journal the records now (synchronously: also used under cancellation)."""


class Pool:
    """Runs work items through `concurrency` workers; stop() drains, abort() cancels."""

    def __init__(
        self,
        *,
        client: Completer,
        policy: RetryPolicy,
        limiters: Limiters,
        sink: ResultSink,
        progress: Progress,
        concurrency: int,
        retry_finish_reasons: Sequence[str] = (),
        startup_failures_to_stop: int = 3,
        answered: set[int] | None = None,
        spender: Spender | None = None,
        repeated: set[int] | None = None,
        start_log: StartRecorder | None = None,
        output: OutputSchema | None = None,
        reasked: Mapping[tuple[str, str, str], Reasked] | None = None,
    ) -> None:
        self.client = client
        # Answers are checked against the job's schemas; an invalid one is re-asked up to
        # output.settings.max_invalid_attempts times (`reasked`: what earlier sessions used).
        self.output = output
        self.reasked = reasked or {}
        self.start_log = start_log
        self.policy = policy
        self.limiters = limiters
        self.spender = spender
        self.stop_reason: str | None = None
        self.sent = 0  # attempts that went (or may have gone) on the wire
        # (row_id, model, attempt) of the requests on the wire now: snapshotted to disk so a
        # crash can tell what may have been billed without an answer.
        self.sending: set[tuple[str, str, int]] = set()
        self.sink = sink
        self.progress = progress
        self.concurrency = concurrency
        self.retry_finish_reasons = frozenset(retry_finish_reasons)
        self.startup_failures_to_stop = startup_failures_to_stop
        self.stopping = False
        self._work_scope = anyio.CancelScope()
        self._successes = 0
        self._blocking_failures = 0  # auth / connect failures since the last success
        self._answered_models: set[str] = set()  # models answered at least once (a 404 stops
        # the run until then: the server does not know the model)
        self._items: Iterator[WorkItem | Skip] = iter(())
        # Records waiting for the writer, which journals them in one write per turn of the
        # event loop; run() flushes what is left when it ends, cancelled or not.
        self._done: list[ResultRecord] = []
        self._wake = anyio.Event()
        self.started = anyio.Event()  # set once every worker has started
        # Content-addressed reuse: hash_key() of requests with an ok answer in this run, and
        # the requests in flight now. An identical request waits for its twin, then reuses it.
        # (Taken over, not copied: it can hold millions of keys on a big resume.)
        self._answered: set[int] = answered if answered is not None else set()
        # When the input was checked, only requests that occur more than once can be
        # reused: tracking just those keeps memory flat on inputs of unique prompts.
        self._repeated = repeated
        self._in_flight: dict[str, anyio.Event] = {}

    def unjournaled(self) -> set[tuple[str, str, int]]:
        """(row_id, model, attempt) of every request sent whose record is not journaled yet:
        those on the wire and those answered since the writer last ran."""
        return self.sending | {(r.row_id, r.model, r.attempts) for r in self._done if r.attempts}

    def narrow_reuse(self, repeated: set[int]) -> None:
        """From now on track for reuse only the requests the input repeats (its check has
        found them); until then every request was tracked."""
        self._repeated = repeated
        self._answered = {key for key in self._answered if key in repeated}

    def stop(self) -> None:
        """Stop feeding new rows; requests in flight finish (see abort for the hard stop)."""
        self.stopping = True

    def abort(self) -> None:
        """Cancel requests in flight too; what was answered is still written."""
        self.stop()
        self._work_scope.cancel()

    async def run(self, items: Iterator[WorkItem | Skip]) -> None:
        """Send every item; return when all are settled or the pool was stopped."""
        self._items = items
        try:
            async with anyio.create_task_group() as outer:
                outer.start_soon(self._writer)
                with self._work_scope:
                    async with anyio.create_task_group() as tg:
                        for started in range(1, self.concurrency + 1):
                            tg.start_soon(self._worker)
                            if started % 16 == 0:
                                # Let the first connections open and send before the rest
                                # start: 2,048 workers took ~0.5 s to start all at once.
                                await anyio.lowlevel.checkpoint()
                        self.started.set()
                outer.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            raise primary(group) from None
        finally:
            # Answers received since the writer last ran (a cancellation, the end of the
            # run): journal them now, synchronously, so nothing that was paid for is lost.
            self._flush()

    def _next(self) -> WorkItem | None:
        """The next item to send; rows settled without a request are delivered here.

        Workers pull from the one iterator in turn (it never awaits, so no two pull at
        once): no feeder task and no queue hop per row.
        """
        while not self.stopping:
            item = next(self._items, None)
            if item is None:
                return None  # exhausted: each worker ends as it comes here
            if isinstance(item, Skip):
                self._deliver(_skip_record(item))
                continue
            return item
        return None

    def _deliver(self, record: ResultRecord) -> None:
        """Hand a record to the writer: appended now, journaled when the writer next runs
        (within the same turn of the event loop, with every other record of that turn)."""
        self._done.append(record)
        self._wake.set()

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            self._flush()

    def _flush(self) -> None:
        batch, self._done = self._done, []
        if batch:
            try:
                self.sink.append(batch)
            except BaseException:
                self._done[:0] = batch  # not journaled: kept for the final flush
                raise
            self._count(batch)

    def _count(self, batch: Sequence[ResultRecord]) -> None:
        progress = self.progress
        for record in batch:
            if record.attempts:
                progress.requests += 1
            if not record.final:
                progress.reasked += record.validation_error is not None
                progress.prompt_tokens += record.prompt_tokens or 0
                progress.completion_tokens += record.completion_tokens or 0
                continue
            if record.status == "ok":
                progress.ok += 1
                progress.reused += record.reused
            elif record.status == "failed":
                progress.failed += 1
            elif record.status == "invalid":
                progress.invalid += 1
            else:
                progress.skipped += 1
            progress.prompt_tokens += record.prompt_tokens or 0
            progress.completion_tokens += record.completion_tokens or 0

    async def _worker(self) -> None:
        current = _Current()

        async def on_retry(exc: AttemptError, attempt: int, wait: float) -> None:
            self._note_failure(exc)
            if isinstance(exc, RateLimited) and current.item is not None:
                # Pool-wide only when it is a rate limit; an isolated 429 waits for its row.
                self.limiters.for_model(current.item.model).pause_after_429(wait, exc.headers)
            # The row's own attempt number (re-asks of invalid answers continue it).
            record = current.failure(exc, current.attempts, final=False)
            if isinstance(exc, UnwantedAnswer) and isinstance(exc.answer, Completion):
                # A re-asked answer was still paid for: keep its usage with the attempt.
                record = current.paid_attempt(record, exc.answer)
                if self.spender is not None:
                    charged = self.spender.charged(current.reservation, record, answered=True)
                    if charged is not None:
                        record = dataclasses.replace(record, charged_usd=charged)
                    if not self.spender.room_to_reask(current.reservation, record):
                        self._stop_at_budget()
                        raise exc  # no room for another answer: this one is the row's
                    self._add_cost(self.spender.paid(current.reservation, record))
            elif exc.possibly_billed and self.spender is not None:
                # Perhaps sold though unusable (a 200 without choices, a drop mid-answer): it
                # counts at the row's worst case, and the row is re-asked only if that fits.
                # Journaled with the attempt (charged_usd), so a resume after a crash counts it.
                charged = self.spender.charged(current.reservation, record, answered=True)
                if charged is not None:
                    record = dataclasses.replace(record, charged_usd=charged)
                if not self.spender.room_to_reask(current.reservation, record):
                    self._stop_at_budget()
                    raise exc
                self._add_cost(self.spender.paid(current.reservation, record))
            if not current.retrying:
                current.retrying = True
                self.progress.retrying += 1
            self._deliver(record)

        retrying = Retrier(self.policy, on_retry)
        while (item := self._next()) is not None:
            key = hash_key(item.request_hash)
            tracked = self._repeated is None or key in self._repeated
            if tracked:
                # Wait while an identical request is on the wire. When it failed, the first
                # waiter to wake finds no twin and sends (the check and the claim below run
                # without an await between them); the others then wait on that one.
                while key not in self._answered:
                    twin = self._in_flight.get(item.request_hash)
                    if twin is None:
                        break
                    await twin.wait()
                if key in self._answered:
                    self._deliver(_reuse_record(item))
                    continue
            reservation = self.spender.reserve(item) if self.spender else None
            while self.spender and reservation is None and await self.spender.more_room(item):
                reservation = self.spender.reserve(item)  # a shared budget's new allowance
            if self.spender and reservation is None:
                self._stop_at_budget()
                continue
            current.start(item)
            current.reservation = reservation
            own = None
            if tracked:
                own = self._in_flight[item.request_hash] = anyio.Event()
            try:
                if self.output is None:
                    record = await self._ask(item, item, current, retrying)
                else:
                    record = await self._process(item, current, retrying)
                if tracked and record is not None and record.status == "ok":
                    self._answered.add(key)
                # The row's reservation now: a feedback re-ask reserves for its larger body.
                reservation = current.reservation
                if self.spender is not None and record is not None:
                    charged = self.spender.charged(reservation, record)
                    if charged is not None:
                        record = dataclasses.replace(record, charged_usd=charged)
                    self._add_cost(self.spender.settle(reservation, record))
                elif self.spender is not None and reservation is not None:
                    self.spender.release(reservation)  # refused key: nothing was billed
            finally:
                if own is not None:
                    self._in_flight.pop(item.request_hash, None)
                    own.set()
                if current.retrying:
                    self.progress.retrying -= 1
            if record is not None:
                self._deliver(record)

    async def _process(
        self, item: WorkItem, current: _Current, retrying: Retrier
    ) -> ResultRecord | None:
        """Ask for the row's answer; an answer that fails the job's schema is re-asked (the
        same request, or with the answer and its error as feedback) until valid or until
        [output] max_invalid_attempts re-asks are used. Each invalid answer is journaled
        (non-final, with its usage and error); the last one is kept as the row's, `invalid`."""
        output = self.output
        if output is None:
            return await self._ask(item, item, current, retrying)
        settings = output.settings
        prior = self.reasked.get((item.row_id, item.model, item.request_hash))
        sent = item
        if prior is not None:  # an earlier session re-asked this row: go on from there
            current.invalid, current.attempts = prior.used, prior.attempts
            if settings.repair == "feedback":
                sent = self._feedback_item(
                    item, prior.content, prior.tool_calls, prior.validation_error
                )
                if self.spender is not None:
                    bigger = self.spender.reserve(sent)  # its body is larger than the row's
                    if bigger is None:
                        self._stop_at_budget()
                        return None  # stays pending; the worker lets the row's reservation go
                    self.spender.release(current.reservation)
                    current.reservation, current.body_reserved = bigger, sent.body
        while True:
            record = await self._ask(item, sent, current, retrying)
            if record is None or record.status != "ok":
                return record
            error = check_answer(output, record.content, record.tool_calls)
            if error is None:
                return record
            record = dataclasses.replace(record, status="invalid", validation_error=error)
            if current.invalid >= settings.max_invalid_attempts:
                return record  # re-asks used up: the last answer is the row's
            nxt = item
            if settings.repair == "feedback":
                nxt = self._feedback_item(item, record.content, record.tool_calls, error)
            paid = self._pay_reask(current, record, nxt)
            if paid is None:
                return record  # no room in the budget for another answer: this one stays
            self._deliver(paid)
            current.invalid += 1
            sent = nxt

    def _feedback_item(
        self, item: WorkItem, content: str | None, tool_calls: str | None, error: str
    ) -> WorkItem:
        body, added = feedback_body(item.body, content, tool_calls, error)
        extra = estimate_prompt_tokens(added) + len(tool_calls or "") // 4
        return dataclasses.replace(
            item, body=body, est_prompt_tokens=item.est_prompt_tokens + extra
        )

    def _pay_reask(
        self, current: _Current, record: ResultRecord, nxt: WorkItem
    ) -> ResultRecord | None:
        """The invalid answer as a paid, non-final attempt, once the budget has room for the
        re-ask `nxt`; None (nothing counted) when it has not, and the run stops there."""
        record = dataclasses.replace(record, final=False)
        spender = self.spender
        if spender is None:
            return record
        reservation = current.reservation
        charged = spender.charged(reservation, record, answered=True)
        if charged is not None:
            record = dataclasses.replace(record, charged_usd=charged)
        if nxt.body is current.body_reserved:
            if not spender.room_to_reask(reservation, record):
                self._stop_at_budget()
                return None
        else:
            # A larger body (feedback): reserve its worst case beside the row's before
            # counting this answer, then let the row's go.
            bigger = spender.reserve(nxt)
            if bigger is None:
                self._stop_at_budget()
                return None
            spender.release(reservation)
            current.reservation, current.body_reserved = bigger, nxt.body
            # The answer is paid against the row's old worst case (unknown usage).
            self._add_cost(spender.paid(reservation, record))
            return record
        self._add_cost(spender.paid(reservation, record))
        return record

    async def _ask(
        self, item: WorkItem, sent: WorkItem, current: _Current, retrying: Retrier
    ) -> ResultRecord | None:
        """One answer for the row (`sent`: the body to send, the row's or a re-ask's),
        retried on transient failures under the retry policy."""
        progress = self.progress

        limiter = self.limiters.for_model(item.model)
        estimate = tokens_to_reserve(sent.est_prompt_tokens, item.max_tokens)

        async def attempt() -> Completion:
            current.attempts += 1
            ticket = limiter.try_acquire(estimate) or await limiter.acquire(estimate)
            outcome: PacingSignal = "error"
            used: int | None = None  # unknown: the reservation stays counted as spent
            headers: Mapping[str, str] | None = None
            current.attempt_started = time.perf_counter()
            progress.in_flight += 1
            sending = (item.row_id, item.model, current.attempts)
            if self.start_log is not None:
                worst = (
                    self.spender.worst_usd(current.reservation)
                    if self.spender is not None and current.reservation is not None
                    else 0.0
                )
                self.start_log.started(sending, worst)  # before the first byte: see StartLog
            self.sending.add(sending)
            self.sent += 1
            try:
                answer = await self.client.complete(sent.body)
                outcome, headers = "ok", answer.headers
                used = answer.total_tokens if answer.usage_raw is None else None
            except RateLimited as exc:
                outcome, used, headers = "rate_limited", 0, exc.headers  # refused: none used
                raise
            except ConnectFailure as exc:
                used, headers = 0, exc.headers  # never reached the server
                raise
            except AttemptError as exc:
                headers = exc.headers
                raise
            finally:
                progress.in_flight -= 1
                self.sending.discard(sending)
                limiter.release(ticket, outcome=outcome, used_tokens=used, headers=headers)
            if answer.finish_reason in self.retry_finish_reasons:
                raise UnwantedAnswer(f"finish_reason {answer.finish_reason}", answer=answer)
            return answer

        try:
            # The first attempt awaited bare, the retrier only after a failure (out of the
            # except block): one coroutine fewer on the way of every answer.
            try:
                answer: Completion = await attempt()
            except AttemptError as exc:
                failed: AttemptError | None = exc
            else:
                failed = None
            if failed is not None:
                answer = await retrying.after(failed, attempt)
        except UnwantedAnswer as exc:
            assert isinstance(exc.answer, Completion)
            answer = exc.answer  # attempts ran out: keep the last paid answer
        except (KeyRejected, QuotaDenied, ConnectFailure) as exc:
            self._note_failure(exc)
            if isinstance(exc, QuotaDenied):
                raise QuotaExhausted(f"the provider refused for lack of quota: {exc}") from None
            if isinstance(exc, ConnectFailure):
                raise AuthFailed(f"endpoint unreachable: {exc}") from None
            if self._row_refusal(exc):
                return current.failure(exc, current.attempts, final=True)
            return None  # the key's, not the row's: it stays pending (the run may stop)
        except ModelNotFound as exc:
            if item.model not in self._answered_models:  # a wrong model, not a wrong row
                raise ModelRefused(item.model, exc.message) from None
            return current.failure(exc, current.attempts, final=True)
        except AttemptError as exc:
            return current.failure(exc, current.attempts, final=True)
        self._successes += 1
        self._answered_models.add(item.model)
        self._blocking_failures = 0
        return current.success(answer)

    def _row_refusal(self, exc: AttemptError) -> bool:
        """A 403 after the key was accepted: the row's own answer."""
        return isinstance(exc, KeyRejected) and exc.status == 403 and self._successes > 0

    def _stop_at_budget(self) -> None:
        if self.stop_reason is None and self.spender is not None:
            self.stop_reason = self.spender.reached()
        self.stop()

    def _add_cost(self, cost: float | None) -> None:
        if self.progress.cost_usd is not None:
            self.progress.cost_usd = None if cost is None else self.progress.cost_usd + cost

    def _note_failure(self, exc: AttemptError) -> None:
        """Stop the run when auth/connect failures come before any success or in a row.

        A 403 once the key has been accepted (an answer seen) is that row's answer (content
        refused for it), not the key's: it never counts. A 401 is always the key's.
        """
        if isinstance(exc, QuotaDenied):
            reason = f"the provider refused for lack of quota: {exc}"
            for limiter in self.limiters:
                limiter.refused_for_quota(reason)  # a cluster's other shards stop too
            raise QuotaExhausted(reason)
        if not isinstance(exc, KeyRejected | ConnectFailure) or self._row_refusal(exc):
            return
        self._blocking_failures += 1
        if self._blocking_failures >= self.startup_failures_to_stop:
            what = "credentials refused" if isinstance(exc, KeyRejected) else "endpoint unreachable"
            raise AuthFailed(f"{what}: {exc}")


class _Current:
    """What one worker is doing now; builds the records for it."""

    __slots__ = (
        "attempt_started",
        "attempts",
        "body_reserved",
        "invalid",
        "item",
        "reservation",
        "retrying",
        "started",
    )

    def __init__(self) -> None:
        self.item: WorkItem | None = None
        self.reservation: object | None = None  # the Spender's, for the row being sent
        self.body_reserved = b""  # the body whose worst case `reservation` covers
        self.invalid = 0  # the row's invalid answers re-asked so far
        self.attempts = 0
        self.started = 0.0
        self.attempt_started = 0.0
        self.retrying = False

    def start(self, item: WorkItem) -> None:
        self.item = item
        self.body_reserved = item.body
        self.invalid = 0
        self.attempts = 0
        self.started = time.time()
        self.attempt_started = time.perf_counter()
        self.retrying = False

    def _latency_ms(self) -> float:
        return round((time.perf_counter() - self.attempt_started) * 1000, 3)

    def _record(self, *, status: str, final: bool, attempts: int, **fields: Any) -> ResultRecord:
        item = self.item
        assert item is not None
        return ResultRecord(
            row_id=item.row_id,
            row_index=item.row_index,
            model=item.model,
            request_hash=item.request_hash,
            status=status,
            final=final,
            attempts=attempts,
            started_at=self.started,
            finished_at=time.time(),
            latency_ms=self._latency_ms(),
            **fields,
        )

    def success(self, answer: Completion) -> ResultRecord:
        if answer.usage_raw is not None:
            return self._record(
                status="ok", final=True, attempts=self.attempts, **_answer_fields(answer)
            )
        # The usual answer, built in one call with its fields in order (the dicts of
        # _answer_fields cost ~40 % of it, keywords ~0.9 us more); OK_FIELDS names the order,
        # which tests/test_pool.py checks against ResultRecord's.
        item = self.item
        assert item is not None
        return ResultRecord(
            item.row_id,
            item.row_index,
            item.model,
            item.request_hash,
            "ok",
            True,
            self.attempts,
            self.started,
            time.time(),
            round((time.perf_counter() - self.attempt_started) * 1000, 3),
            answer.http_status,
            answer.content,
            answer.refusal,
            answer.tool_calls,
            answer.finish_reason,
            answer.response_model,
            answer.response_id,
            answer.system_fingerprint,
            answer.prompt_tokens,
            answer.completion_tokens,
            answer.total_tokens,
            answer.cached_tokens,
            answer.reasoning_tokens,
            answer.provider_cost,
        )

    def paid_attempt(self, record: ResultRecord, answer: Completion) -> ResultRecord:
        return dataclasses.replace(record, **_answer_fields(answer))

    def failure(self, exc: AttemptError, attempt: int, *, final: bool) -> ResultRecord:
        return self._record(
            status="failed",
            final=final,
            attempts=attempt,
            http_status=exc.status,
            error_type=exc.error_type,
            error_message=exc.message,
            possibly_billed=exc.possibly_billed,
        )


# The fields `_Current.success` passes by position, in ResultRecord's order.
OK_FIELDS = (
    "row_id",
    "row_index",
    "model",
    "request_hash",
    "status",
    "final",
    "attempts",
    "started_at",
    "finished_at",
    "latency_ms",
    "http_status",
    "content",
    "refusal",
    "tool_calls",
    "finish_reason",
    "response_model",
    "response_id",
    "system_fingerprint",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
    "provider_cost",
)


def _answer_fields(answer: Completion) -> dict[str, Any]:
    """The result columns an answer fills in.

    Usage that was not trustworthy as a whole (usage_raw is set) is kept only raw: no count
    from it is stored, so the row is priced as unknown and counts at its worst case.
    """
    if answer.usage_raw is not None:
        return {**_content_fields(answer), **_NO_USAGE, "usage_raw": answer.usage_raw}
    return {
        **_content_fields(answer),
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "total_tokens": answer.total_tokens,
        "cached_tokens": answer.cached_tokens,
        "reasoning_tokens": answer.reasoning_tokens,
        "provider_cost": answer.provider_cost,
    }


# The usage columns (OK_FIELDS' last six), none known.
_NO_USAGE: dict[str, Any] = dict.fromkeys(OK_FIELDS[OK_FIELDS.index("prompt_tokens") :])


def _content_fields(answer: Completion) -> dict[str, Any]:
    return {
        "http_status": answer.http_status,
        "content": answer.content,
        "refusal": answer.refusal,
        "tool_calls": answer.tool_calls,
        "finish_reason": answer.finish_reason,
        "response_model": answer.response_model,
        "response_id": answer.response_id,
        "system_fingerprint": answer.system_fingerprint,
    }


def _unsent_record(
    row_id: str, row_index: int, model: str, request_hash: str, status: str, **fields: Any
) -> ResultRecord:
    """A row settled without a request of its own: no attempt, no latency."""
    now = time.time()
    return ResultRecord(
        row_id=row_id,
        row_index=row_index,
        model=model,
        request_hash=request_hash,
        status=status,
        final=True,
        attempts=0,
        started_at=now,
        finished_at=now,
        latency_ms=0.0,
        **fields,
    )


def _reuse_record(item: WorkItem) -> ResultRecord:
    """An ok row answered by an identical request's answer: nothing sent, nothing spent (its
    tokens stay NULL: they were paid once, on the row that bought the answer)."""
    return _unsent_record(
        item.row_id, item.row_index, item.model, item.request_hash, "ok", reused=True
    )


def _skip_record(skip: Skip) -> ResultRecord:
    """A row not sent: an empty prompt (skipped) or one over the size limit (failed)."""
    return _unsent_record(
        skip.row_id,
        skip.row_index,
        skip.model,
        "",
        "failed" if skip.failed else "skipped",
        error_type=skip.error_type,
        error_message=skip.message,
    )

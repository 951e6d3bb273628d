"""The small records that flow through a run: work items, answers, results, progress.

Dataclasses frozen to the type checker (see `record`), slotted so one row costs one small
object on the hot path; a result is not (see `journaled`), so orjson serialises it straight
into a journal line from its dict. Imports only `errors`.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TypeVar, dataclass_transform

_T = TypeVar("_T")

# Token counts are stored as int64: a count past it is as untrustworthy as a negative one.
MAX_TOKENS = 2**63 - 1
_RAW_USAGE_CHARS = 2000  # what is kept of untrustworthy usage (a hostile server may send MBs)
_COUNTS = ("prompt_tokens", "completion_tokens", "total_tokens")
_DETAILS = (
    ("prompt_tokens_details", "cached_tokens"),
    ("completion_tokens_details", "reasoning_tokens"),
)


@dataclass_transform(frozen_default=True)
def record(cls: type[_T]) -> type[_T]:
    """A slotted dataclass, frozen to the type checker only: mypy refuses any assignment to
    its fields, as for `@dataclass(frozen=True)`; at run time it is a plain slotted dataclass
    (and hashable, as a frozen one is). A frozen one sets each field through
    object.__setattr__: building a 30-field ResultRecord cost ~4 us instead of ~0.4 us, and a
    run builds several of these a row."""
    return dataclass(slots=True, unsafe_hash=True)(cls)


@dataclass_transform(frozen_default=True)
def journaled(cls: type[_T]) -> type[_T]:
    """As `record`, but with a `__dict__` instead of slots: orjson writes such a dataclass
    from its dict in ~0.6 us and a slotted one field by field in ~2 us, and every result is
    written once to the journal (building one costs ~0.3 us more; a run holds at most a
    part's chunk of them, a few thousand)."""
    return dataclass(unsafe_hash=True)(cls)


def work_key(row_id: str, model: str, request_hash: str) -> int:
    """A 64-bit key for one row x model x request: a small int in a set instead of a tuple."""
    return hash((row_id, model, request_hash))


def hash_key(request_hash: str) -> int:
    """A 64-bit key for a request hash (its first 16 hex digits)."""
    return int(request_hash[:16], 16) if request_hash else 0


def token_count(value: object) -> int | None:
    """A usage count the runner trusts: a non-negative int that fits int64 (bool is not one)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKENS:
        return value
    return None


def usage_cost(value: object) -> float | None:
    """A provider-reported cost the runner trusts: a finite non-negative number."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    cost = float(value) if not isinstance(value, int) or abs(value) <= MAX_TOKENS else math.inf
    return cost if math.isfinite(cost) and cost >= 0 else None


def untrusted_usage(usage: object) -> str | None:
    """The raw `usage` as JSON text when any part of it is not trustworthy, else None.

    Trustworthy: a mapping whose prompt and completion counts (and total, cached and
    reasoning counts and `cost`, when present) pass `token_count` / `usage_cost`. A missing
    `usage` returns None (there is nothing to keep); the row's tokens are NULL either way.
    """
    if usage is None:
        return None
    clean = isinstance(usage, dict)
    if isinstance(usage, dict):
        for name in _COUNTS:
            if (name in usage or name != "total_tokens") and token_count(usage.get(name)) is None:
                clean = False
        for outer, name in _DETAILS:
            details = usage.get(outer)
            if details is not None and (
                not isinstance(details, dict)
                or (name in details and token_count(details[name]) is None)
            ):
                clean = False
        if "cost" in usage and usage["cost"] is not None and usage_cost(usage["cost"]) is None:
            clean = False
    if clean:
        return None
    text = json.dumps(usage, default=repr, ensure_ascii=False)
    return text if len(text) <= _RAW_USAGE_CHARS else text[:_RAW_USAGE_CHARS] + "..."


@record
class WorkItem:
    """One request to make: an input row for one model."""

    row_index: int
    row_id: str
    model: str
    body: bytes  # the canonical JSON request body, sent as is
    request_hash: str
    est_prompt_tokens: int
    max_tokens: int | None


@record
class Completion:
    """What a successful (HTTP 200, parseable) chat-completion answer holds."""

    content: str | None
    refusal: str | None
    tool_calls: str | None  # JSON text, stored as data and never executed
    finish_reason: str | None
    response_model: str | None
    response_id: str | None
    system_fingerprint: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    total_tokens: int | None
    cached_tokens: int | None
    reasoning_tokens: int | None
    provider_cost: float | None
    http_status: int = 200
    # x-ratelimit-* headers of the answer (for the limiter), when the server sent any.
    headers: Mapping[str, str] | None = None
    # The answer's `usage` as JSON text when it was not trustworthy (untrusted_usage): its
    # counts above are then None where they failed, and the row is priced as unknown.
    usage_raw: str | None = None


@journaled
class ResultRecord:
    """One finished attempt, as journaled and as stored in Parquet parts.

    `final` marks the record that settles the row (ok or failed); earlier failed attempts
    of the same row are journaled with `final=False` so reports can count retries and
    spend that may have been billed without an answer.
    """

    row_id: str
    row_index: int
    model: str
    request_hash: str
    status: str  # "ok" | "failed" | "skipped" | "invalid" (an answer failing the schema)
    final: bool
    attempts: int
    started_at: float  # epoch seconds
    finished_at: float
    latency_ms: float
    http_status: int | None = None
    content: str | None = None
    refusal: str | None = None
    tool_calls: str | None = None
    finish_reason: str | None = None
    response_model: str | None = None
    response_id: str | None = None
    system_fingerprint: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None
    provider_cost: float | None = None
    # The server's `usage` as JSON text when it was not non-negative integers (see
    # untrusted_usage); the row then counts at its worst case against the budget.
    usage_raw: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    possibly_billed: bool = False
    # Answered from an earlier ok result with the same request hash (no request was sent);
    # the answer columns are filled from that result when read.
    reused: bool = False
    # What the budget charged for this attempt when its stored usage cannot tell (unknown
    # usage, or possibly billed without an answer): its worst case, so that a resume after
    # a crash counts it again (state.Settled.usage). None when its tokens or cost tell.
    charged_usd: float | None = None
    # Why the answer failed the job's JSON Schema ([output]): on a re-asked attempt
    # (final=False) and on a row whose re-asks ran out (status "invalid"). None otherwise.
    validation_error: str | None = None


@dataclass(frozen=True, slots=True)
class Reasked:
    """A row's invalid answers journaled by an earlier session, for a resume to go on from:
    how many were re-asked, the row's attempts so far, and the latest one (for feedback)."""

    used: int
    attempts: int
    content: str | None
    tool_calls: str | None
    validation_error: str


@dataclass(slots=True)
class Progress:
    """The run's counters: updated in one place (the pool's writer), read by renderers."""

    rows_total: int | None = None  # work items (rows x models) this run will attempt
    rows_done_before: int = 0  # settled by an earlier session of the same run
    ok: int = 0
    failed: int = 0
    skipped: int = 0  # rows not sent at all (null or empty prompt)
    invalid: int = 0  # rows whose answers failed the schema until re-asks ran out
    reasked: int = 0  # answers that failed the schema and were asked again (all paid)
    reused: int = 0  # ok rows answered from an identical request (included in ok)
    retrying: int = 0  # items currently waiting for another attempt
    in_flight: int = 0
    concurrency: int | None = None  # the adaptive concurrency limit now, when there is one
    cost_usd: float | None = None  # this session's cost so far, when the models are priced
    requests: int = 0  # HTTP attempts finished, retries included
    prompt_tokens: int = 0
    completion_tokens: int = 0
    started: float = field(default_factory=time.monotonic)

    @property
    def done(self) -> int:
        return self.ok + self.failed + self.invalid

    def snapshot(self) -> Progress:
        return Progress(
            rows_total=self.rows_total,
            rows_done_before=self.rows_done_before,
            ok=self.ok,
            failed=self.failed,
            skipped=self.skipped,
            invalid=self.invalid,
            reasked=self.reasked,
            reused=self.reused,
            retrying=self.retrying,
            in_flight=self.in_flight,
            concurrency=self.concurrency,
            cost_usd=self.cost_usd,
            requests=self.requests,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            started=self.started,
        )

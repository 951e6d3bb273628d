"""One row of a run as it went: the request body sent for it, its answer and every attempt.

Nothing is stored per row to do this: the body is rebuilt from the run's input and its
frozen spec by the same RequestBuilder that built it for sending, and its hash is compared
with the `request_hash` the run journaled, so `sent` says whether these are the very bytes
that went out (an input edited since would give another body: what a resume would send).
Answers, validation errors, attempts and costs come from the run's journal and parts.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from runner.engine.plan import shown
from runner.errors import InputError, UsageError
from runner.input.source import InputFile, RequestBuilder, Skip
from runner.output.schema import sent_with_schema
from runner.records import WorkItem
from runner.report.parsed import run_output
from runner.report.query import row_attempts
from runner.store.state import RunDir


@dataclass(frozen=True, slots=True)
class RowRequest:
    """One row x model: what is sent for it and what came back."""

    row_id: str
    model: str
    body: bytes | None  # the request body as sent (sorted keys); None: the row is not sent
    request_hash: str | None
    skipped: str | None  # why the row is not sent (an empty prompt, too long), if it is not
    # True: the run journaled an attempt with this body's hash; False: its attempts were of
    # another body (the input changed since); None: nothing was sent for it yet.
    sent: bool | None
    attempts: list[dict[str, Any]] = field(default_factory=list)  # oldest first
    # The row's settled result (its status and answer; a reused row's answer is the one it
    # reuses, named by reused_from), or None when it has not settled.
    final: dict[str, Any] | None = None

    def as_dict(self, run_id: str) -> dict[str, Any]:
        """Everything shown, as plain data (the body as a JSON value)."""
        return {
            "run_id": run_id,
            "row_id": self.row_id,
            "model": self.model,
            "request": None if self.body is None else orjson.loads(self.body),
            "request_hash": self.request_hash,
            "sent": self.sent,
            "skipped": self.skipped,
            "cost_usd": self.cost_usd,
            "attempts": self.attempts,
            "result": self.final,
        }

    @property
    def cost_usd(self) -> float | None:
        """What every paid attempt cost together; None when one of them has no known cost."""
        paid = [a for a in self.attempts if _paid(a)]
        costs = [a.get("cost_usd") for a in paid]
        if any(c is None for c in costs):
            return None
        return float(sum(c for c in costs if c is not None))


def _paid(attempt: dict[str, Any]) -> bool:
    if attempt.get("reused"):
        return False
    if attempt.get("prompt_tokens") is not None or attempt.get("provider_cost") is not None:
        return True
    return bool(attempt.get("final") and attempt.get("status") == "ok")


def show_row(run: RunDir, row_id: str) -> list[RowRequest]:
    """The row's request for each model of the run, with its attempts (exit 2 when the row
    is not in the run's input, or the input cannot be read)."""
    manifest = run.read_manifest()
    spec, output = run_output(run, manifest)
    try:
        source = InputFile(spec.input_path, spec.job.input, shown=shown(spec.input_path))
        builder = RequestBuilder(sent_with_schema(spec.job, output), source)
        items = _find(source, builder, row_id)
    except InputError as exc:
        raise UsageError(
            f"run {run.run_id}: its input cannot be read to rebuild the request: {exc}"
        ) from None
    if items is None:
        raise UsageError(
            f"run {run.run_id}: no row {row_id!r} in its input {source.shown} "
            f"({_id_hint(spec.job.input.id_column, builder.batch)})"
        )
    attempts, results = row_attempts(run, row_id)
    found = []
    for item in items:
        mine = [a for a in attempts if a.get("model") == item.model]
        final = next((r for r in results if r.get("model") == item.model), None)
        if isinstance(item, Skip):
            found.append(
                RowRequest(row_id, item.model, None, None, item.message, None, mine, final)
            )
            continue
        hashes = {a.get("request_hash") for a in mine}
        sent = None if not mine else item.request_hash in hashes
        found.append(
            RowRequest(row_id, item.model, item.body, item.request_hash, None, sent, mine, final)
        )
    return found


def _find(source: InputFile, builder: RequestBuilder, row_id: str) -> list[WorkItem | Skip] | None:
    """The work items (or skips) of the first input row whose id is `row_id`."""
    source.check_columns()
    for row in source.rows():
        if builder.row_id(row) == row_id:
            return list(builder.build(row))
    return None


def _id_hint(id_column: str | None, batch: bool) -> str:
    if batch:
        return "row ids are the lines' custom_id"
    if id_column:
        return f"row ids are the values of column {id_column!r}"
    return "without an id column, row ids are row numbers from 0"


__all__ = ["RowRequest", "show_row"]

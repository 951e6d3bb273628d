"""The shard plan of a Ray run: row ranges of the input, planned once into `shards.json`.

Reads input metadata only: Parquet row groups from the footer; JSONL line starts from one
newline scan (the bytes of each shard's first line and its 1-based number); CSV by row
number (a quoted value may hold a newline: bytes cannot split it safely, so each CSV shard
reads the file from the start and keeps its rows). The plan is immutable: a resume reuses
it, so a shard's folder always means the same rows. No ray here.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from runner.errors import UsageError
from runner.input.source import InputFile, RowRange
from runner.store.state import SHARD_PLAN, InputStamp, RunDir, _write_atomic

SHARDS_FILE = SHARD_PLAN
_SCAN_BLOCK = 1 << 20


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """The run's shards: row ranges covering every row of the input once, in order."""

    rows: int
    ranges: tuple[RowRange, ...]
    input: InputStamp  # the input's fingerprint when planned

    def share(self, shard: int) -> float:
        span = self.ranges[shard]
        return (span.stop - span.start) / self.rows if self.rows else 1.0 / len(self.ranges)


def plan_shards(source: InputFile, count: int, fingerprint: InputStamp) -> ShardPlan:
    """Cut the input into at most `count` shards of about equal rows (never an empty one)."""
    if source.format == "parquet":
        ranges = _parquet_ranges(source, count)
    elif source.format == "csv":
        ranges = _row_ranges(sum(1 for _ in source.rows()), count)
    else:
        ranges = _jsonl_ranges(source.path, count)
    rows = ranges[-1].stop if ranges else 0
    if not ranges:
        ranges = [RowRange(0, 0)]
    return ShardPlan(rows, tuple(ranges), fingerprint)


def _row_ranges(rows: int, count: int) -> list[RowRange]:
    size = max(math.ceil(rows / max(count, 1)), 1)
    return [RowRange(start, min(start + size, rows)) for start in range(0, rows, size)]


def _parquet_ranges(source: InputFile, count: int) -> list[RowRange]:
    """Consecutive row groups, about rows / count each (a row group is never split)."""
    meta = source._parquet().metadata
    sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
    target = sum(sizes) / max(count, 1)
    ranges: list[RowRange] = []
    start = end = 0
    groups: list[int] = []
    for group, size in enumerate(sizes):
        groups.append(group)
        end += size
        if end - start >= target * 0.999 or group == len(sizes) - 1:
            ranges.append(RowRange(start, end, row_groups=tuple(groups)))
            start, groups = end, []
    return [r for r in ranges if r.stop > r.start]


def _jsonl_ranges(path: Path, count: int) -> list[RowRange]:
    """One scan for where each non-blank line starts; shards start at a line."""
    starts: list[tuple[int, int]] = []  # (byte offset, 1-based line) of each data row
    offset, line = 0, 1
    with path.open("rb") as handle:
        for raw in handle:
            if raw.strip():
                starts.append((offset, line))
            offset += len(raw)
            line += 1
    size = offset
    ranges = []
    for span in _row_ranges(len(starts), count):
        byte_start, first_line = starts[span.start]
        byte_stop = starts[span.stop][0] if span.stop < len(starts) else size
        ranges.append(
            RowRange(
                span.start, span.stop, byte_start=byte_start, byte_stop=byte_stop, line=first_line
            )
        )
    return ranges


def write_plan(run: RunDir, plan: ShardPlan) -> bytes:
    """Write shards.json once (a plan is never rewritten); returns what was written."""
    path = run.path / SHARDS_FILE
    data = {
        "rows": plan.rows,
        "input": plan.input,
        "shards": [{"shard": k, **asdict(r)} for k, r in enumerate(plan.ranges)],
    }
    body = json.dumps(data, indent=2).encode()
    if path.exists():
        raise UsageError(f"{path}: the run already has a shard plan")
    _write_atomic(path, body)
    return body


def read_plan(run: RunDir) -> ShardPlan:
    path = run.path / SHARDS_FILE
    try:
        data = json.loads(path.read_text())
        ranges = []
        for entry in data["shards"]:
            entry = {k: v for k, v in entry.items() if k != "shard"}
            groups = entry.get("row_groups")
            entry["row_groups"] = tuple(groups) if groups is not None else None
            ranges.append(RowRange(**entry))
        return ShardPlan(int(data["rows"]), tuple(ranges), data["input"])
    except FileNotFoundError:
        raise UsageError(f"run {run.run_id} has no shard plan ({path}): not a Ray run") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{path}: unreadable shard plan ({exc})") from None


def is_ray_run(run: RunDir) -> bool:
    return (run.path / SHARDS_FILE).exists()

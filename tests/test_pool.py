"""The pool's own logic, with a fake client: identical requests wait for their twin, and when
the twin fails exactly one waiter takes over while the others wait on it."""

from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from runner.engine.limiter import Limiter, Limiters
from runner.engine.pool import Pool
from runner.errors import RequestRejected, ServerFailure
from runner.http.retry import RetryPolicy
from runner.records import Completion, Progress, ResultRecord, WorkItem

ROOT = Path(__file__).resolve().parent.parent


async def _no_sleep(_: float) -> None:
    await anyio.lowlevel.checkpoint()


def answer(content: str = "hi") -> Completion:
    return Completion(
        content=content,
        refusal=None,
        tool_calls=None,
        finish_reason="stop",
        response_model="m",
        response_id="r",
        system_fingerprint=None,
        prompt_tokens=3,
        completion_tokens=2,
        total_tokens=5,
        cached_tokens=None,
        reasoning_tokens=None,
        provider_cost=None,
    )


class FlakyClient:
    """Answers after a random number of event-loop turns; fails a random share of requests
    (retryable or not), and records how many identical bodies are on the wire at once."""

    def __init__(self, rng: random.Random, fail_rate: float) -> None:
        self.rng = rng
        self.fail_rate = fail_rate
        self.on_wire: Counter[bytes] = Counter()
        self.most_at_once = 0
        self.sent = 0

    async def complete(self, body: bytes) -> Completion:
        self.sent += 1
        self.on_wire[body] += 1
        self.most_at_once = max(self.most_at_once, self.on_wire[body])
        try:
            for _ in range(self.rng.randrange(4)):
                await anyio.lowlevel.checkpoint()
            draw = self.rng.random()
            if draw < self.fail_rate / 2:
                raise ServerFailure("boom", status=500)
            if draw < self.fail_rate:
                raise RequestRejected("no", status=400)
            return answer(body.decode())
        finally:
            self.on_wire[body] -= 1


class ListSink:
    def __init__(self) -> None:
        self.records: list[ResultRecord] = []

    def append(self, records: Sequence[ResultRecord]) -> None:
        self.records.extend(records)


def items(count: int, distinct: int) -> list[WorkItem]:
    return [
        WorkItem(
            row_index=i,
            row_id=f"r{i}",
            model="m",
            body=f"prompt {i % distinct}".encode(),
            request_hash=f"{i % distinct:064x}",
            est_prompt_tokens=3,
            max_tokens=8,
        )
        for i in range(count)
    ]


async def run_pool(client: FlakyClient, work: list[WorkItem], concurrency: int) -> ListSink:
    sink = ListSink()
    pool = Pool(
        client=client,
        policy=RetryPolicy(max_attempts=2, sleep=_no_sleep),
        limiters=Limiters(Limiter()),
        sink=sink,
        progress=Progress(),
        concurrency=concurrency,
    )
    with anyio.fail_after(30):
        await pool.run(iter(work))
    return sink


@pytest.mark.anyio
@pytest.mark.parametrize("seed", range(40))
async def test_twins_of_a_failing_request_hand_over_one_at_a_time(seed: int) -> None:
    """Any number of waiters on failing twins: no crash, never two identical requests on the
    wire at once, and every row settled exactly once."""
    rng = random.Random(seed)
    client = FlakyClient(rng, fail_rate=rng.choice([0.3, 0.7, 1.0]))
    work = items(rng.randrange(20, 120), distinct=rng.randrange(1, 6))
    sink = await run_pool(client, work, concurrency=rng.choice([2, 8, 32]))
    assert client.most_at_once == 1
    finals = Counter(r.row_id for r in sink.records if r.final)
    assert finals == Counter(item.row_id for item in work)
    # A row is reused only when an identical request got an ok answer.
    answered = {r.request_hash for r in sink.records if r.final and r.status == "ok"}
    for record in sink.records:
        if record.reused:
            assert record.request_hash in answered


@pytest.mark.anyio
async def test_all_failing_twins_each_send_in_turn() -> None:
    """When every request fails, each row of a repeated prompt gets its own attempts, one
    row at a time per prompt."""
    client = FlakyClient(random.Random(1), fail_rate=1.0)
    work = items(60, distinct=3)
    sink = await run_pool(client, work, concurrency=32)
    assert client.most_at_once == 1
    finals = [r for r in sink.records if r.final]
    assert len(finals) == 60
    assert all(r.status == "failed" for r in finals)


@pytest.mark.parametrize("raw", [None, '{"prompt_tokens": -1}'])
def test_an_answer_record_carries_every_answer_field(raw: str | None) -> None:
    """An ok record holds what the answer said, each column from its own field (the usual
    answer's record is built in one call, apart from the general path); usage that was not
    trustworthy keeps no count, only the raw text."""
    import dataclasses

    from runner.engine.pool import OK_FIELDS, _answer_fields, _Current

    names = tuple(f.name for f in dataclasses.fields(ResultRecord))
    assert names[: len(OK_FIELDS)] == OK_FIELDS  # the usual record is built by position
    answer = Completion(
        content="c",
        refusal="r",
        tool_calls="[]",
        finish_reason="stop",
        response_model="m2",
        response_id="id-1",
        system_fingerprint="fp",
        prompt_tokens=11,
        completion_tokens=12,
        total_tokens=23,
        cached_tokens=4,
        reasoning_tokens=5,
        provider_cost=0.25,
        http_status=203,
        usage_raw=raw,
    )
    item = WorkItem(7, "row-7", "m", b"{}", "ab" * 16, 10, 64)
    current = _Current()
    current.start(item)
    current.attempts = 2
    record = current.success(answer)
    expected = _answer_fields(answer)
    assert expected["content"] == "c" and (expected["prompt_tokens"] == 11) == (raw is None)
    assert {name: getattr(record, name) for name in expected} == expected
    unset = {f.name for f in dataclasses.fields(ResultRecord)} - set(expected)
    others = {name: getattr(record, name) for name in unset}
    assert others.pop("finished_at") >= others.pop("started_at") > 0
    assert others.pop("latency_ms") >= 0
    row = {
        "row_id": "row-7",
        "row_index": 7,
        "model": "m",
        "request_hash": "ab" * 16,
        "status": "ok",
        "final": True,
        "attempts": 2,
    }
    assert {name: others.pop(name) for name in row} == row
    defaults = {f.name: f.default for f in dataclasses.fields(ResultRecord)}
    assert others == {name: defaults[name] for name in others}  # the rest as a record's default


def test_records_are_frozen_to_the_type_checker_and_hashable(tmp_path: Path) -> None:
    """Work items, answers and results are built without a frozen dataclass's per-field
    object.__setattr__ (the hot path builds several a row), yet mypy refuses any assignment to
    their fields, and they hash and compare by value as frozen ones do."""
    item = WorkItem(1, "r", "m", b"{}", "ab" * 16, 3, None)
    twin = WorkItem(1, "r", "m", b"{}", "ab" * 16, 3, None)
    assert item == twin and hash(item) == hash(twin) and len({item, twin}) == 1
    first = ResultRecord("r", 1, "m", "h", "ok", True, 1, 0.0, 1.0, 2.0)
    assert hash(first) == hash(ResultRecord("r", 1, "m", "h", "ok", True, 1, 0.0, 1.0, 2.0))
    snippet = tmp_path / "assign.py"
    snippet.write_text(
        "from runner.records import Completion, ResultRecord, WorkItem\n"
        "from runner.input.source import Row, Skip\n"
        "def f(i: WorkItem, c: Completion, r: ResultRecord, w: Row, s: Skip) -> None:\n"
        "    i.model = 'x'\n"
        "    c.content = 'x'\n"
        "    r.status = 'x'\n"
        "    w.index = 1\n"
        "    s.row_id = 'x'\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", str(snippet)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    refused = [line for line in done.stdout.splitlines() if "is read-only" in line]
    assert len(refused) == 5, done.stdout

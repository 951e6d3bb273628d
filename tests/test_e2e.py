"""End to end over real loopback sockets: spec -> pool -> simulator -> journal -> Parquet."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import anyio
import pyarrow.parquet as pq
import pytest

from runner.engine import job
from runner.records import Progress
from runner.store.state import RunDir

from .conftest import ROOT, run_cli, select, spec_text, submit_job, write_rows, write_spec


def rows(count: int, marker: dict[int, str] | None = None) -> list[dict[str, Any]]:
    marker = marker or {}
    return [
        {"id": f"r{i}", "text": f"Question number {i}: what is {i} squared? {marker.get(i, '')}"}
        for i in range(count)
    ]


async def run_job(
    tmp_path: Path, data: list[dict[str, Any]], base_url: str, **pieces: Any
) -> job.Outcome:
    return await submit_job(tmp_path, spec_text(base_url=base_url, **pieces), data)


def results(run: RunDir) -> list[dict[str, Any]]:
    return select(run, "SELECT * FROM results ORDER BY row_index")


def attempts(run: RunDir) -> list[dict[str, Any]]:
    return select(run, "SELECT * FROM attempts WHERE NOT final")


@pytest.mark.anyio
async def test_all_rows_end_ok_despite_429s_and_500s(tmp_path: Path, sim_factory: Any) -> None:
    """2,000 rows with 5 % 429s and 5 % 500s all end ok, each row exactly once."""
    sim = sim_factory(rate_429=0.05, rate_500=0.05, retry_after_s=0.02, seed=7)
    outcome = await run_job(tmp_path, rows(2000), sim.base_url, run_extra="max_attempts = 10")
    assert outcome.state == "completed" and outcome.exit_code == 0
    got = results(outcome.run)
    assert len(got) == 2000
    assert {r["row_id"] for r in got} == {f"r{i}" for i in range(2000)}
    assert all(r["status"] == "ok" and r["content"] for r in got)
    stats = sim.stats
    assert stats.by_status.get(429, 0) > 0 and stats.by_status.get(500, 0) > 0
    retried = attempts(outcome.run)
    assert {r["http_status"] for r in retried} >= {429, 500}
    assert stats.requests == 2000 + len(retried)
    # Token counts in the results are exactly what the server put in its answers.
    assert sum(r["prompt_tokens"] for r in got) == stats.prompt_tokens
    assert sum(r["completion_tokens"] for r in got) == stats.completion_tokens


@pytest.mark.anyio
async def test_rows_answered_400_are_failed_with_their_status(
    tmp_path: Path, sim_factory: Any
) -> None:
    """A 400 for some rows records exactly those rows as failed, with status and message."""
    sim = sim_factory()
    bad = {i: "[[sim:400]]" for i in range(0, 300, 7)}
    outcome = await run_job(tmp_path, rows(300, bad), sim.base_url)
    assert outcome.state == "completed" and outcome.exit_code == 1
    got = results(outcome.run)
    failed = {r["row_id"] for r in got if r["status"] == "failed"}
    assert failed == {f"r{i}" for i in bad}
    for r in got:
        if r["status"] == "failed":
            assert r["http_status"] == 400
            assert r["error_type"] == "invalid_request"
            assert "400" in r["error_message"] and r["attempts"] == 1
    assert sim.stats.requests == 300  # a 400 is not retried


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("switch", "error_type"),
    [("rate_drop", "connection_dropped"), ("rate_malformed", "malformed_response")],
)
async def test_dropped_connections_and_malformed_bodies_are_retried(
    tmp_path: Path, sim_factory: Any, switch: str, error_type: str
) -> None:
    """A dropped connection or a malformed body is retried, journaled as possibly billed."""
    sim = sim_factory(**{switch: 0.15}, seed=3)
    outcome = await run_job(tmp_path, rows(400), sim.base_url, run_extra="max_attempts = 10")
    assert outcome.exit_code == 0
    got = results(outcome.run)
    assert len(got) == 400 and all(r["status"] == "ok" for r in got)
    retried = attempts(outcome.run)
    assert retried and {r["error_type"] for r in retried} == {error_type}
    assert all(r["possibly_billed"] for r in retried)


@pytest.mark.anyio
async def test_cancelling_half_way_leaves_only_whole_parquet_files(
    tmp_path: Path, sim_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cancelling a run half way leaves whole Parquet parts, and resume completes it once."""
    monkeypatch.setattr(job, "PART_ROWS", 100)
    sim = sim_factory(latency_ms=5)
    write_rows(tmp_path / "data.jsonl", rows(1500))
    spec = write_spec(tmp_path, spec_text(base_url=sim.base_url))
    prepared = job.prepare(spec)
    seen: list[RunDir] = []

    with anyio.CancelScope() as scope:

        def on_progress(progress: Progress) -> None:
            if progress.ok >= 600:
                scope.cancel()

        await job.submit(
            prepared,
            tmp_path / "runs",
            on_start=seen.append,
            on_progress=on_progress,
            handle_signals=False,
        )
    assert scope.cancelled_caught
    run = seen[0]
    assert not list(run.parts_dir.glob("*.tmp"))
    files = sorted(run.parts_dir.glob("*.parquet"))
    assert len(files) >= 5
    committed = sum(pq.read_table(f).num_rows for f in files)
    assert 600 <= committed < 1500
    assert not any(run.journal_dir.iterdir())  # every journal record went into a part
    assert run.read_manifest()["state"] == "stopped"

    sent_before = sim.stats.resent_after_ok
    outcome = await job.resume(run.run_id, tmp_path / "runs", handle_signals=False)
    assert outcome.state == "completed"
    got = results(run)
    assert sorted(r["row_index"] for r in got) == list(range(1500))
    # A hard cancel cuts requests in flight; only those (at most `concurrency`) are re-bought.
    assert sim.stats.resent_after_ok - sent_before <= 16


@pytest.mark.anyio
async def test_auth_failure_stops_the_run_without_failing_rows(
    tmp_path: Path, sim_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """401 on the first requests stops the run (exit 3) and marks no row failed."""
    sim = sim_factory(api_key="sk-right-key-000000000000")
    monkeypatch.setenv("TEST_KEY", "sk-wrong-key-111111111111")
    outcome = await run_job(
        tmp_path, rows(500), sim.base_url, endpoint_extra='api_key_env = "TEST_KEY"'
    )
    assert outcome.state == "stopped" and outcome.exit_code == 3
    assert outcome.stop_reason is not None and "credentials refused" in outcome.stop_reason
    assert "sk-wrong" not in outcome.stop_reason
    assert outcome.progress.failed == 0
    assert sim.stats.requests <= 16 + 3  # the first wave only


def test_demo_job_runs_through_the_cli(tmp_path: Path) -> None:
    """The README's first command works: every demo row ends ok, and export writes them."""
    runs = tmp_path / "runs"
    done = run_cli("submit", str(ROOT / "jobs" / "demo.toml"), "--runs-dir", str(runs), cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "completed" in done.stderr
    out = tmp_path / "demo.parquet"
    exported = run_cli("export", "demo", str(out), "--runs-dir", str(runs), cwd=ROOT)
    assert exported.returncode == 0, exported.stderr
    table = pq.read_table(out)
    assert table.num_rows == 300
    assert set(table.column("status").to_pylist()) == {"ok"}
    assert table.column("id").to_pylist() == list(range(1, 301))  # input order

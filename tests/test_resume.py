"""Crash-safe runs: kill -9, SIGINT, the lock, recovery from torn files, reuse of answers.

Runs here are real `python -m runner` processes against a simulator in this process, so the
simulator's counters see every request any of them sends, across kills and resumes.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pyarrow.parquet as pq
import pytest

from runner.engine import job
from runner.report.query import RunDB, export
from runner.sim.answers import request_tag
from runner.sim.server import SimulatorConfig, SimulatorThread
from runner.store.journal import SEGMENT_GLOB, segment_name
from runner.store.state import RunDir, list_runs

from .conftest import (
    run_cli,
    sections,
    select,
    spec_text,
    start_runner,
    submit_job,
    write_rows,
    write_spec,
)


@pytest.fixture
def sim() -> Iterator[SimulatorThread]:
    with SimulatorThread(SimulatorConfig(latency_ms=50, jitter_ms=10)) as s:
        yield s


def the_run(tmp_path: Path) -> RunDir:
    runs = list_runs(tmp_path / "runs")
    assert len(runs) == 1
    return RunDir(tmp_path / "runs" / runs[0]["run_id"])


def committed(run: RunDir) -> list[dict[str, Any]]:
    return select(run, "SELECT row_id, status, content FROM results")


def wait_for_results(run_dir: Path, at_least: int, timeout: float = 30) -> None:
    """Block until the run has journaled at least `at_least` records."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:  # a test-side wait on another process's files
        done = 0
        if (run_dir / "journal").is_dir():
            for seg in (run_dir / "journal").glob(SEGMENT_GLOB):  # not the start log
                with contextlib.suppress(FileNotFoundError):  # compacted meanwhile
                    done += seg.read_bytes().count(b"\n")
            for part in (run_dir / "parts").glob("*.parquet"):
                done += pq.ParquetFile(part).metadata.num_rows
        if done >= at_least:
            return
        time.sleep(0.05)
    raise AssertionError(f"run did not reach {at_least} results in {timeout} s")


def make_job(tmp_path: Path, sim: SimulatorThread, count: int, **pieces: Any) -> Path:
    data = [
        {"id": f"r{i}", "text": f"Row {i}: tell me about the number {i}."} for i in range(count)
    ]
    write_rows(tmp_path / "data.jsonl", data)
    return write_spec(tmp_path, spec_text(base_url=sim.base_url, **pieces))


def test_kill_9_three_times_then_resume_holds_every_row_once(
    tmp_path: Path, sim: SimulatorThread
) -> None:
    """SIGKILL at three random moments: every row ends once; re-bought <= in flight x kills."""
    concurrency, rows, kills = 64, 20_000, 3
    spec = make_job(tmp_path, sim, rows, concurrency=concurrency)
    rng = random.Random(1234)
    proc = start_runner(tmp_path, "submit", str(spec))
    for kill in range(kills):
        if kill == 0:
            deadline = time.monotonic() + 30
            while not (tmp_path / "runs").is_dir() or not list((tmp_path / "runs").iterdir()):
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.05)
        run_dir = next((tmp_path / "runs").iterdir())
        wait_for_results(run_dir, at_least=(kill + 1) * 2_000 + rng.randrange(0, 2_000))
        time.sleep(rng.uniform(0, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
        proc = start_runner(tmp_path, "resume", run_dir.name)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    got = committed(the_run(tmp_path))
    assert len(got) == rows
    assert len({r["row_id"] for r in got}) == rows
    assert all(r["status"] == "ok" for r in got)
    assert sim.stats.resent_after_ok <= 2 * concurrency * kills
    # Each crashed session records what it had on the wire and never heard back about.
    # (A kill that lands before a session has started leaves no session behind.)
    sessions = the_run(tmp_path).read_manifest()["sessions"]
    assert 1 <= len(sessions) - 1 <= kills
    assert [s["outcome"] for s in sessions] == ["crashed"] * (len(sessions) - 1) + ["completed"]
    # What each crash left unanswered: at most the requests on the wire plus the answers not
    # yet journaled (one a worker); together an upper bound of what the resumes bought again.
    unanswered = [s["unanswered_at_crash"] for s in sessions[:-1]]
    assert all(0 <= n <= 2 * concurrency for n in unanswered), unanswered
    assert sum(unanswered) >= sim.stats.resent_after_ok


def test_sigint_drains_stops_with_exit_3_and_resume_resends_nothing(
    tmp_path: Path, sim: SimulatorThread
) -> None:
    """SIGINT: exit 3 with the resume hint; resume sends no request already answered."""
    spec = make_job(tmp_path, sim, 3_000, concurrency=32)
    proc = start_runner(tmp_path, "submit", str(spec))
    deadline = time.monotonic() + 30
    while not list((tmp_path / "runs").glob("*/manifest.json")):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    wait_for_results(next((tmp_path / "runs").iterdir()), at_least=500)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 3, err
    run = the_run(tmp_path)
    assert f"resume with: runner resume {run.run_id}" in err
    assert "stopped" in err.splitlines()[-1]
    assert run.read_manifest()["state"] == "stopped"
    done_before = len(committed(run))
    assert 500 <= done_before < 3_000
    assert sim.stats.resent_after_ok == 0
    resumed = run_cli("resume", run.run_id, "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert sim.stats.resent_after_ok == 0  # the drain journaled everything in flight
    assert len(committed(run)) == 3_000


def test_second_process_on_a_locked_run_is_refused_and_sends_nothing(
    tmp_path: Path, sim: SimulatorThread
) -> None:
    """While one process holds a run, `resume` exits 2 naming the PID and sends zero requests."""
    spec = make_job(tmp_path, sim, 50)
    first = run_cli("submit", str(spec), "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    run = the_run(tmp_path)
    requests = sim.stats.requests
    run.lock()  # this test process now plays the running owner
    try:
        second = run_cli(
            "resume", run.run_id, "--retry-failed", "--runs-dir", str(tmp_path / "runs"),
            cwd=tmp_path,
        )  # fmt: skip
    finally:
        run.unlock()
    assert second.returncode == 2
    assert f"in use by process {os.getpid()}" in second.stderr
    assert len(second.stderr.strip().splitlines()) == 1
    assert sim.stats.requests == requests


def test_status_and_report_work_while_the_run_is_in_progress(
    tmp_path: Path, sim: SimulatorThread
) -> None:
    """`status` and `report` read a running run without its lock and see live progress."""
    spec = make_job(tmp_path, sim, 4_000, concurrency=16)
    proc = start_runner(tmp_path, "submit", str(spec))
    try:
        deadline = time.monotonic() + 30
        while not list((tmp_path / "runs").glob("*/manifest.json")):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.05)
        run_dir = next((tmp_path / "runs").iterdir())
        wait_for_results(run_dir, at_least=200)
        runs = str(tmp_path / "runs")
        status = run_cli("status", run_dir.name, "--json", "--runs-dir", runs, cwd=tmp_path)
        assert status.returncode == 0, status.stderr
        info = json.loads(status.stdout)
        assert info["state"] == "running" and info["pid"] == proc.pid
        assert 200 <= info["ok"] < 4_000
        report = run_cli(
            "report", run_dir.name, "--format", "json", "--runs-dir", runs, cwd=tmp_path
        )
        assert report.returncode == 0, report.stderr
        overview = {r["metric"]: r["value"] for r in json.loads(report.stdout)["overview"]}
        assert overview["rows ok"] >= info["ok"]
        assert overview["state"] == "running"
        assert proc.poll() is None  # still running: the readers did not disturb it
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 3


def test_torn_journal_line_and_leftover_tmp_part_are_recovered(
    tmp_path: Path, sim: SimulatorThread
) -> None:
    """A torn last journal line and a half-written .tmp part are recovered without loss."""
    spec = make_job(tmp_path, sim, 300)
    done = run_cli("submit", str(spec), "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    run = the_run(tmp_path)
    [part] = list(run.parts_dir.glob("*.parquet"))
    records = pq.read_table(part).to_pylist()
    # Rebuild the state a crash leaves: the answers only in a journal segment with a torn
    # tail, and a .tmp part that never got renamed.
    part.unlink()
    lines = [json.dumps({**r, "started_at": 0.0, "finished_at": 0.0}) for r in records[:200]]
    segment = run.journal_dir / segment_name(1)
    segment.write_text("\n".join(lines) + "\n" + lines[200 - 1][: len(lines[0]) // 2])
    (run.parts_dir / "part-000001.parquet.tmp").write_bytes(b"PAR1 half a file")
    manifest = run.read_manifest()
    manifest["state"] = "running"
    run.write_manifest(manifest)
    requests = sim.stats.requests

    status = run_cli(
        "status", run.run_id, "--json", "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path
    )
    assert status.returncode == 0 and json.loads(status.stdout)["ok"] == 200

    resumed = run_cli("resume", run.run_id, "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert sim.stats.requests - requests == 100  # only the 100 rows that were never journaled
    assert sim.stats.resent_after_ok == 100  # (the simulator had answered them before)
    assert not list(run.parts_dir.glob("*.tmp"))
    got = committed(run)
    assert sorted(r["row_id"] for r in got) == sorted(f"r{i}" for i in range(300))


@pytest.mark.anyio
async def test_duplicate_prompts_are_sent_once(tmp_path: Path) -> None:
    """With 30 % duplicate prompts, each distinct request is sent once and every row is ok."""
    rng = random.Random(5)
    texts = [f"Distinct prompt {i}" for i in range(700)]
    data = [{"id": i, "text": texts[i] if i < 700 else rng.choice(texts)} for i in range(1000)]
    rng.shuffle(data)
    with SimulatorThread(SimulatorConfig(latency_ms=20)) as sim:
        write_rows(tmp_path / "data.jsonl", data)
        spec = write_spec(tmp_path, spec_text(base_url=sim.base_url))
        outcome = await job.submit(job.prepare(spec), tmp_path / "runs", handle_signals=False)
        assert outcome.exit_code == 0
        assert sim.stats.requests == 700
        assert sim.stats.resent_after_ok == 0
    assert outcome.progress.reused == 300
    with RunDB(outcome.run, with_input=False) as db:
        got = db.arrow(
            "SELECT row_id, content, reused, reused_from, prompt_tokens FROM results"
        ).to_pylist()
    by_text = {}
    text_of = {str(r["id"]): r["text"] for r in data}
    for r in got:
        assert r["content"], r
        by_text.setdefault(text_of[r["row_id"]], set()).add(r["content"])
    assert len(got) == 1000
    assert all(len(contents) == 1 for contents in by_text.values())  # twins share the answer
    assert sum(r["reused"] for r in got) == 300
    assert sum(r["prompt_tokens"] or 0 for r in got) == sim.stats.prompt_tokens  # paid once
    # A reused row has no tokens of its own (NULL, not 0) and names the row that paid.
    paid_by = {r["row_id"]: r for r in got if not r["reused"]}
    for r in got:
        if r["reused"]:
            assert r["prompt_tokens"] is None
            twin = paid_by[r["reused_from"]]
            assert text_of[twin["row_id"]] == text_of[r["row_id"]]
            assert twin["content"] == r["content"]
        else:
            assert r["prompt_tokens"] and r["reused_from"] is None


def test_resume_refuses_a_changed_input_unless_allowed(
    tmp_path: Path, sim: SimulatorThread
) -> None:
    """A changed input is refused; with --allow-changed-input only changed rows are sent."""
    spec = make_job(tmp_path, sim, 100)
    runs = str(tmp_path / "runs")
    assert run_cli("submit", str(spec), "--runs-dir", runs, cwd=tmp_path).returncode == 0
    run = the_run(tmp_path)
    data = [{"id": f"r{i}", "text": f"Row {i}: tell me about the number {i}."} for i in range(100)]
    for i in (3, 50):
        data[i]["text"] = f"Row {i} was edited."
    write_rows(tmp_path / "data.jsonl", data)
    requests = sim.stats.requests
    refused = run_cli("resume", run.run_id, "--runs-dir", runs, cwd=tmp_path)
    assert refused.returncode == 2
    assert "--allow-changed-input" in refused.stderr
    allowed = run_cli(
        "resume", run.run_id, "--allow-changed-input", "--runs-dir", runs, cwd=tmp_path
    )
    assert allowed.returncode == 0, allowed.stderr
    assert sim.stats.requests - requests == 2
    got = {r["row_id"]: r["content"] for r in committed(run)}
    assert len(got) == 100 and "edited" in got["r3"]


def test_cancelled_session_can_be_resumed_in_process(tmp_path: Path, sim: SimulatorThread) -> None:
    """A session cancelled from outside leaves a resumable run (library use, no signals)."""
    spec = make_job(tmp_path, sim, 400)

    async def main() -> None:
        prepared = job.prepare(spec)
        with anyio.move_on_after(0.5):
            await job.submit(prepared, tmp_path / "runs", handle_signals=False)
        run = the_run(tmp_path)
        assert run.read_manifest()["state"] == "stopped"
        outcome = await job.resume(run.run_id, tmp_path / "runs", handle_signals=False)
        assert outcome.state == "completed"

    anyio.run(main)
    assert len(committed(the_run(tmp_path))) == 400


# -- row identity: a row is its key, never its position ---------------------------------------


def tag(text: str, model: str = "gpt-4o-mini") -> str:
    """The digest the simulator puts in its answer to this prompt (see sim_answers)."""
    return f"[req {request_tag(model, [{'role': 'user', 'content': text}])}]"


def rows_of(texts: list[str], ids: list[str] | None = None) -> list[dict[str, Any]]:
    if ids is None:
        return [{"text": t} for t in texts]
    return [{"id": i, "text": t} for i, t in zip(ids, texts, strict=True)]


def export_rows(run: RunDir, tmp_path: Path) -> list[dict[str, Any]]:
    out = tmp_path / "out.jsonl"
    export(run, out, overwrite=True)  # called again after each session
    return [json.loads(line) for line in out.read_text().splitlines()]


def assert_own_answers(run: RunDir, tmp_path: Path, data: list[dict[str, Any]]) -> None:
    """Every current input row exactly once, in results and in the export, with the answer
    to its own prompt; nothing else in results."""
    got = select(run, "SELECT row_id, row_index, status, content FROM results")
    assert len(got) == len(data), (len(got), len(data))
    for r in got:
        row = data[r["row_index"]]
        assert r["row_id"] == str(row.get("id", r["row_index"]))
        assert r["status"] == "ok" and tag(row["text"]) in r["content"], (r, row)
    exported = export_rows(run, tmp_path)
    assert [e["text"] for e in exported] == [d["text"] for d in data]
    for e in exported:
        assert e["status"] == "ok" and tag(e["text"]) in e["content"], e


async def submit_rows(
    tmp_path: Path, sim: SimulatorThread, data: list[dict[str, Any]], **kw: Any
) -> RunDir:
    spec = spec_text(base_url=sim.base_url, **kw)
    outcome = await submit_job(tmp_path, spec, data)
    assert outcome.exit_code == 0
    return outcome.run


async def resume_changed(tmp_path: Path, data: list[dict[str, Any]], **kw: Any) -> job.Outcome:
    write_rows(tmp_path / "data.jsonl", data)
    return await job.resume(
        "t", tmp_path / "runs", allow_changed_input=True, handle_signals=False, **kw
    )


@pytest.mark.anyio
async def test_row_inserted_on_top_with_an_id_column_is_sent_alone_and_rows_keep_answers(
    tmp_path: Path, sim: SimulatorThread
) -> None:
    """Insert a row at the top (id_column): one request, 6 rows for 6, each its own answer."""
    texts = [f"Question number {i} about rivers." for i in range(5)]
    run = await submit_rows(tmp_path, sim, rows_of(texts, [f"r{i}" for i in range(5)]))
    requests = sim.stats.requests
    data = rows_of(
        ["A new first question about lakes.", *texts], ["new", *(f"r{i}" for i in range(5))]
    )
    outcome = await resume_changed(tmp_path, data)
    assert outcome.exit_code == 0 and outcome.state == "completed"
    assert sim.stats.requests - requests == 1
    assert outcome.progress.rows_total == 6 and outcome.settled_before == 5
    assert_own_answers(run, tmp_path, data)
    assert not any(r["reused"] for r in select(run, "SELECT reused FROM results"))


@pytest.mark.anyio
async def test_interrupted_changed_resume_resumed_plainly_ends_with_each_row_once(
    tmp_path: Path,
) -> None:
    """Insert 30 rows on top and delete 5; interrupt that resume; a plain resume sends the
    rest, buys nothing twice, and each current row ends once with its own answer."""
    with SimulatorThread(SimulatorConfig(latency_ms=60)) as sim:
        texts = [f"Old question {i} on trees." for i in range(40)]
        ids = [f"o{i}" for i in range(40)]
        run = await submit_rows(tmp_path, sim, rows_of(texts, ids), concurrency=2)
        requests = sim.stats.requests
        new = [f"New question {i} on birds." for i in range(30)]
        data = rows_of([*new, *texts[5:]], [*(f"n{i}" for i in range(30)), *ids[5:]])
        with anyio.move_on_after(0.4):
            await resume_changed(tmp_path, data)
        assert run.read_manifest()["state"] == "stopped"
        sent_first = sim.stats.requests - requests
        assert 0 < sent_first < 30
        outcome = await job.resume("t", tmp_path / "runs", handle_signals=False)
        assert outcome.state == "completed"
        # Each new row bought once; the 2 cut off at the interruption may have been sent twice.
        assert 30 <= sim.stats.requests - requests <= 30 + 2
        # The interruption cancels what is on the wire: the server may have answered those
        # (at most concurrency = 2) after the client stopped listening, so they are re-bought.
        assert sim.stats.resent_after_ok <= 2
        assert sim.stats.distinct_ok_bodies == 70
        assert outcome.progress.rows_total == 65
    assert_own_answers(run, tmp_path, data)
    # The deleted rows stay in attempts, not in results.
    gone = select(run, "SELECT row_id FROM attempts WHERE row_id IN ('o0', 'o4')")
    assert len(gone) == 2
    manifest = run.read_manifest()
    assert manifest["counts"]["total"] == 65 and manifest["counts"]["ok"] == 65


@pytest.mark.anyio
async def test_without_an_id_column_a_moved_row_reuses_its_answer_and_an_edited_one_is_sent(
    tmp_path: Path, sim: SimulatorThread
) -> None:
    """No id column: a row inserted on top and one edited are sent (2 requests); every moved
    row reuses the answer bought for its unchanged request at its old row number."""
    texts = [f"Question {i} about mountains." for i in range(20)]
    extra = 'prompt_column = "text"'
    run = await submit_rows(tmp_path, sim, rows_of(texts), input_extra=extra)
    requests = sim.stats.requests
    edited = ["Inserted question about seas.", *texts]
    edited[7] = "An edited question about valleys."
    data = rows_of(edited)
    outcome = await resume_changed(tmp_path, data)
    assert outcome.exit_code == 0
    assert sim.stats.requests - requests == 2
    assert sim.stats.resent_after_ok == 0
    assert_own_answers(run, tmp_path, data)
    got = {
        r["row_index"]: r
        for r in select(run, "SELECT row_index, reused, reused_from, prompt_tokens FROM results")
    }
    for index, r in got.items():
        if index in (0, 7):
            assert not r["reused"] and r["prompt_tokens"]
        else:  # its request was answered at row index - 1 before the insert
            assert r["reused"] and r["reused_from"] == str(index - 1)
            assert r["prompt_tokens"] is None
    exported = export_rows(run, tmp_path)
    assert [e["reused"] for e in exported] == [i not in (0, 7) for i in range(21)]
    # Every export format says so: a boolean `reused` and the row that bought the answer.
    export(run, tmp_path / "out.parquet")
    export(run, tmp_path / "out.csv")
    from_parquet = pq.read_table(tmp_path / "out.parquet").to_pylist()
    with (tmp_path / "out.csv").open(newline="") as handle:
        from_csv = list(csv.DictReader(handle))
    assert [r["reused"] for r in from_parquet] == [e["reused"] for e in exported]
    assert [r["reused_from"] for r in from_parquet] == [e["reused_from"] for e in exported]
    assert [r["reused"] for r in from_csv] == [str(e["reused"]).lower() for e in exported]
    assert from_csv[5]["reused_from"] == "4" and from_csv[0]["reused_from"] == ""


@pytest.mark.anyio
async def test_truncated_input_counts_only_its_own_rows(
    tmp_path: Path, sim: SimulatorThread
) -> None:
    """20 rows, then the input cut to 5: progress is 5 of 5, not 20 of 5; results hold 5."""
    texts = [f"Question {i} about deserts." for i in range(20)]
    ids = [f"d{i}" for i in range(20)]
    run = await submit_rows(tmp_path, sim, rows_of(texts, ids))
    requests = sim.stats.requests
    data = rows_of(texts[:5], ids[:5])
    outcome = await resume_changed(tmp_path, data)
    assert outcome.exit_code == 0 and sim.stats.requests == requests
    assert outcome.progress.rows_total == 5 and outcome.settled_before == 5
    assert run.read_manifest()["counts"] == {
        "total": 5, "ok": 5, "failed": 0, "skipped": 0, "requests": 20
    }  # fmt: skip
    assert_own_answers(run, tmp_path, data)
    overview = {r["metric"]: r["value"] for r in sections(run)["overview"]}
    assert overview["rows total"] == 5 and overview["rows ok"] == 5


@pytest.mark.anyio
async def test_editing_the_row_a_twin_reused_leaves_the_twin_its_own_answer(
    tmp_path: Path, sim: SimulatorThread
) -> None:
    """Rows a and b ask the same; b reuses a's answer. Edit a: b keeps the answer to its own
    request (not NULL), still marked reused from a; a gets a new answer."""
    same = "The very same question about glaciers."
    run = await submit_rows(tmp_path, sim, rows_of([same, same, "Other."], ["a", "b", "c"]))
    assert sim.stats.requests == 2
    data = rows_of(["An edited question about fjords.", same, "Other."], ["a", "b", "c"])
    outcome = await resume_changed(tmp_path, data)
    assert outcome.exit_code == 0 and sim.stats.requests == 3
    assert_own_answers(run, tmp_path, data)
    got = {r["row_id"]: r for r in select(run, "SELECT * FROM results")}
    assert got["b"]["reused"] and got["b"]["reused_from"] == "a"
    assert got["b"]["prompt_tokens"] is None
    assert not got["a"]["reused"] and got["a"]["reused_from"] is None
    costed = {r["row_id"]: r for r in select(run, "SELECT row_id, cost_usd FROM costed")}
    assert costed["b"]["cost_usd"] == 0.0


def test_export_refuses_an_input_the_run_has_not_seen(tmp_path: Path, sim: SimulatorThread) -> None:
    """Export after an edit without a resume would pair rows with other prompts' answers."""
    spec = make_job(tmp_path, sim, 10)
    runs = str(tmp_path / "runs")
    assert run_cli("submit", str(spec), "--runs-dir", runs, cwd=tmp_path).returncode == 0
    data = [{"id": "new", "text": "Inserted."}] + [
        {"id": f"r{i}", "text": f"Row {i}: tell me about the number {i}."} for i in range(10)
    ]
    write_rows(tmp_path / "data.jsonl", data)
    done = run_cli("export", "t", "out.jsonl", "--runs-dir", runs, cwd=tmp_path)
    assert done.returncode == 2
    assert "--allow-changed-input" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out.jsonl").exists()

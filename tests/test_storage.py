"""Disk and process faults: full disk, fsync errors, unwritable folders, a second signal."""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import signal
import subprocess
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import orjson
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.engine import job
from runner.errors import StorageFailed
from runner.http.client import ChatClient
from runner.records import ResultRecord
from runner.sim.server import SimulatorConfig, SimulatorThread
from runner.store import journal, sink
from runner.store.state import RunDir, list_runs

from .conftest import run_cli, select, spec_text, start_runner, write_rows, write_spec


@pytest.fixture
def sim() -> Iterator[SimulatorThread]:
    with SimulatorThread(SimulatorConfig(latency_ms=5)) as s:
        yield s


def make_job(tmp_path: Path, sim: SimulatorThread, count: int) -> Path:
    data = [{"id": f"r{i}", "text": f"Row {i}: what is {i} times {i}?"} for i in range(count)]
    write_rows(tmp_path / "data.jsonl", data)
    return write_spec(tmp_path, spec_text(base_url=sim.base_url))


def row_ids(run: RunDir) -> list[str]:
    return [r["row_id"] for r in select(run, "SELECT row_id FROM results")]


def failing_after(real: Any, calls: int, err: int) -> Any:
    """A stand-in for an os function that fails with `err` after `calls` successful calls."""
    count = {"n": 0}

    def fake(*args: Any) -> Any:
        count["n"] += 1
        if count["n"] > calls:
            raise OSError(err, os.strerror(err))
        return real(*args)

    return fake


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("function", "calls", "err", "message"),
    [
        ("write", 20, errno.ENOSPC, "the disk is full"),
        ("fsync", 4, errno.EIO, "Input/output error"),
    ],
)
async def test_disk_full_or_fsync_error_stops_the_run_and_resume_loses_nothing(
    tmp_path: Path,
    sim: SimulatorThread,
    monkeypatch: pytest.MonkeyPatch,
    function: str,
    calls: int,
    err: int,
    message: str,
) -> None:
    """A failing journal write or fsync stops the run (exit 3); resume then completes it once."""
    spec = make_job(tmp_path, sim, 1_000)
    monkeypatch.setattr(journal, "FSYNC_EVERY", 100)  # several fsyncs within these 1,000 rows
    real = getattr(os, function)
    # Only the journal's own calls fail: a module stand-in that delegates everything else.
    faulty = types.SimpleNamespace(**{n: getattr(os, n) for n in dir(os) if not n.startswith("__")})
    setattr(faulty, function, failing_after(real, calls, err))
    monkeypatch.setattr(journal, "os", faulty)
    outcome = await job.submit(job.prepare(spec), tmp_path / "runs", handle_signals=False)
    assert outcome.state == "stopped" and outcome.exit_code == 3
    assert outcome.stop_reason is not None and message in outcome.stop_reason
    run = outcome.run
    kept = row_ids(run)
    assert 0 < len(kept) < 1_000

    monkeypatch.setattr(journal, "os", os)  # space is back
    resent = sim.stats.resent_after_ok
    resumed = await job.resume(run.run_id, tmp_path / "runs", handle_signals=False)
    assert resumed.state == "completed"
    ids = row_ids(run)
    assert sorted(ids) == sorted(f"r{i}" for i in range(1_000))
    assert set(kept) <= set(ids)
    # Re-bought at most what was answered but not yet durable when the disk failed.
    assert sim.stats.resent_after_ok - resent <= 16 * 4


def test_unwritable_runs_folder_is_caught_before_the_first_request(
    tmp_path: Path, sim: SimulatorThread
) -> None:
    """A runs folder that cannot be created stops with exit 3 before any request is sent."""
    spec = make_job(tmp_path, sim, 10)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    done = run_cli("submit", str(spec), "--runs-dir", str(blocker / "runs"), cwd=tmp_path)
    assert done.returncode == 3
    assert "not writable" in done.stderr
    assert len(done.stderr.strip().splitlines()) <= 2
    assert sim.stats.requests == 0


def test_second_signal_stops_at_once_without_corrupting_the_run(
    tmp_path: Path, sim: SimulatorThread
) -> None:
    """Two SIGINTs: exit 3 at once, every part readable, and resume completes every row."""
    sim.set_config(latency_ms=200)
    spec = write_spec(
        tmp_path,
        spec_text(base_url=sim.base_url, concurrency=32, run_extra="grace_s = 60"),
    )
    write_rows(tmp_path / "data.jsonl", [{"id": f"r{i}", "text": f"Row {i}"} for i in range(2_000)])
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner", "submit", str(spec), "--runs-dir", str(tmp_path / "runs")],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 30
    while sim.stats.ok < 100:  # a test-side wait on another process
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    started = time.monotonic()
    _, err = proc.communicate(timeout=30)
    assert time.monotonic() - started < 10  # not the 60 s grace
    assert proc.returncode == 3, err
    [info] = list_runs(tmp_path / "runs")
    run = RunDir(tmp_path / "runs" / info["run_id"])
    for part in run.parts_dir.glob("*"):
        assert part.suffix == ".parquet"
        pq.read_table(part)
    sim.set_config(latency_ms=0)
    resumed = run_cli("resume", run.run_id, "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    ids = row_ids(run)
    assert len(ids) == len(set(ids)) == 2_000


# -- run states ------------------------------------------------------------------------------


def listed_states(tmp_path: Path) -> dict[str, str]:
    """run id -> state, as `runner runs --format json` shows them."""
    done = run_cli("runs", "--format", "json", "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return {r["run_id"]: r["state"] for r in json.loads(done.stdout)}


@pytest.mark.anyio
async def test_internal_error_leaves_a_failed_run_with_its_one_line(
    tmp_path: Path, sim: SimulatorThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An internal error mid-run (exit 4) marks the run `failed`, keeps the error's line in
    the manifest, and `runner runs` / `runner status` say so; resume then completes it."""
    spec = make_job(tmp_path, sim, 200)
    calls = {"n": 0}
    real = ChatClient.complete

    async def broken(self: ChatClient, body: bytes) -> Any:
        calls["n"] += 1
        if calls["n"] == 50:
            raise RuntimeError("the 50th call broke")
        return await real(self, body)

    monkeypatch.setattr(ChatClient, "complete", broken)
    with pytest.raises(RuntimeError):
        await job.submit(job.prepare(spec), tmp_path / "runs", handle_signals=False)
    [info] = list_runs(tmp_path / "runs")
    assert info["state"] == "failed"
    assert info["error"] == "RuntimeError: the 50th call broke"
    assert listed_states(tmp_path) == {info["run_id"]: "failed"}
    status = run_cli("status", "t", "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert f"{info['run_id']}  failed" in status.stdout
    assert "RuntimeError: the 50th call broke" in status.stdout
    monkeypatch.setattr(ChatClient, "complete", real)
    resumed = await job.resume("t", tmp_path / "runs", handle_signals=False)
    assert resumed.state == "completed"
    assert list_runs(tmp_path / "runs")[0]["state"] == "completed"
    assert "error" not in list_runs(tmp_path / "runs")[0]


def test_killed_run_is_running_while_locked_then_interrupted(
    tmp_path: Path, sim: SimulatorThread
) -> None:
    """A run shows `running` while its process holds the lock and `interrupted` once it was
    killed (never `running` forever, never `completed`)."""
    sim.set_config(latency_ms=200)
    make_job(tmp_path, sim, 2_000)
    proc = start_runner(tmp_path, "submit", "job.toml")
    assert proc.stderr is not None
    first = proc.stderr.readline()
    assert first.startswith("run "), first
    run_id = first.split()[1].rstrip(":")
    assert listed_states(tmp_path) == {run_id: "running"}
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert listed_states(tmp_path) == {run_id: "interrupted"}
    status = run_cli("status", run_id, "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert f"{run_id}  interrupted" in status.stdout


def test_bad_input_before_the_first_request_leaves_no_run_for_the_job_name(
    tmp_path: Path, sim: SimulatorThread
) -> None:
    """A submit that stops on bad input before sending anything leaves no run: the job name
    still means the earlier run, whose answers export as before."""
    spec = make_job(tmp_path, sim, 5)
    runs = str(tmp_path / "runs")
    first = run_cli("submit", str(spec), "--runs-dir", runs, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    [good] = list_runs(tmp_path / "runs")
    # The first row is an empty prompt (settled without a request), the second is broken.
    (tmp_path / "data.jsonl").write_text('{"id": "r0", "text": ""}\n{not json\n')
    sent = sim.stats.requests
    bad = run_cli("submit", str(spec), "--no-check", "--runs-dir", runs, cwd=tmp_path)
    assert bad.returncode == 2, bad.stderr
    assert "data.jsonl:2" in bad.stderr
    assert sim.stats.requests == sent
    assert [r["run_id"] for r in list_runs(tmp_path / "runs")] == [good["run_id"]]
    make_job(tmp_path, sim, 5)  # the input back as it was, for the export's join
    out = tmp_path / "out.jsonl"
    exported = run_cli("export", "t", str(out), "--runs-dir", runs, cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    answers = [json.loads(line)["content"] for line in out.read_text().splitlines()]
    assert len(answers) == 5 and all(answers)


def test_start_log_covers_every_request_not_journaled(tmp_path: Path) -> None:
    """The start log lists each attempt before it is sent; a rotation keeps only what is
    still unjournaled; a torn last line (a kill mid-write) is skipped; clear removes it all."""
    run = RunDir.create(tmp_path / "runs", "t", "")
    log = run.start_log()
    for n in range(5):
        log.started((f"r{n}", "m", 1))
    log.rotate({("r3", "m", 1), ("r4", "m", 1)})
    log.started(("r5", "m", 1))
    [path] = run.journal_dir.glob("starts-*.log")
    with path.open("ab") as handle:
        handle.write(b'["r6", "m"')  # torn
    assert run.unanswered_at_crash() == 3
    log.close()
    later = run.start_log()  # a new session numbers its files after the old ones
    later.started(("r7", "m", 1))
    assert run.unanswered_at_crash() == 4
    later.close()
    run.clear_sending()
    assert run.unanswered_at_crash() == 0


def test_a_damaged_part_file_is_the_users_error_not_an_internal_one(tmp_path: Path) -> None:
    """A part file that is no longer Parquet (overwritten, or a symlink to another file):
    query, report, export and status exit 2 in one line naming the parts folder, not exit 4
    with a DuckDB trace."""
    write_rows(tmp_path / "data.jsonl", [{"id": f"r{i}", "text": f"q {i}"} for i in range(3)])
    write_spec(tmp_path, spec_text())
    done = run_cli("submit", "job.toml", "--runs-dir", "runs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (run,) = (tmp_path / "runs").iterdir()
    (part,) = (run / "parts").glob("*.parquet")
    part.unlink()
    part.symlink_to(tmp_path / "job.toml")
    for args in (
        ("query", run.name, "SELECT count(*) FROM results"),
        ("report", run.name),
        ("export", run.name, "out.csv"),
        ("status", run.name),
    ):
        done = run_cli(*args, "--runs-dir", "runs", cwd=tmp_path)
        assert done.returncode == 2, (args, done.stderr)
        (line,) = done.stderr.strip().splitlines()
        assert line.startswith(f"error: {run / 'parts'}: the run's results cannot be read"), line
    assert not (tmp_path / "out.csv").exists()
    # A resume reads what is settled from the parts: the damaged one is named, exit 2.
    done = run_cli("resume", run.name, "--retry-failed", "--runs-dir", "runs", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith(f"error: {part}: the run's results cannot be read"), line


def test_start_log_entries_survive_kill_9_without_a_close(tmp_path: Path) -> None:
    """An entry written to the start log's memory map is on disk for the next process once
    `started` returns, though the process is killed before anything is closed or synced."""
    script = (
        "import os, signal, sys\n"
        "from pathlib import Path\n"
        "from runner.store.starts import StartLog\n"
        "log = StartLog(Path(sys.argv[1]))\n"
        "for n in range(300):\n"
        "    log.started((f'r{n}', 'm', 1), 0.5)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path)], capture_output=True, timeout=60
    )
    assert done.returncode == -signal.SIGKILL
    from runner.store.starts import StartLog

    [path] = tmp_path.glob("starts-*.log")
    assert StartLog.read(path) == {(f"r{n}", "m", 1): 0.5 for n in range(300)}


def test_a_full_start_log_file_moves_to_a_larger_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When a file's mapped room is used up, every entry since the last rotation goes on in a
    new file (the old one is deleted only then): nothing logged is lost."""
    from runner.store import starts

    monkeypatch.setattr(starts, "MAPPED_BYTES", 100)
    log = starts.StartLog(tmp_path)
    for n in range(40):
        log.started((f"r{n}", "m", 1), 0.25)
        [path] = tmp_path.glob("starts-*.log")
        assert starts.StartLog.read(path) == {(f"r{i}", "m", 1): 0.25 for i in range(n + 1)}
    assert int(path.stem.split("-")[1]) > 2  # it did move, more than once
    log.rotate({("r39", "m", 1)})
    [path] = tmp_path.glob("starts-*.log")
    assert starts.StartLog.read(path) == {("r39", "m", 1): 0.25}
    log.close()


def test_start_log_without_a_memory_map_writes_each_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file system that cannot map the file gets one write per entry; a disk that is full
    when a file is made stops the run with a one-line storage error."""
    from runner.errors import StorageFailed
    from runner.store import starts

    def no_map(*args: Any, **kwargs: Any) -> Any:
        raise OSError(errno.ENODEV, "No such device")

    monkeypatch.setattr(starts.mmap, "mmap", no_map)
    log = starts.StartLog(tmp_path)
    for n in range(3):
        log.started((f"r{n}", "m", 2), 1.0)
    [path] = tmp_path.glob("starts-*.log")
    assert path.read_bytes().count(b"\n") == 3  # no zero bytes: written, not mapped
    assert starts.StartLog.read(path) == {(f"r{n}", "m", 2): 1.0 for n in range(3)}
    log.close()

    def full(*args: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(starts.os, "posix_fallocate", full)
    other = starts.StartLog(tmp_path / "journal")
    (tmp_path / "journal").mkdir()
    with pytest.raises(StorageFailed, match="the disk is full"):
        other.started(("r", "m", 1))
    assert not list((tmp_path / "journal").glob("starts-*.log"))  # no empty file left


_TEXT = st.one_of(st.none(), st.text(max_size=40))
_COUNT = st.one_of(st.none(), st.integers(0, 2**62))
_MONEY = st.one_of(st.none(), st.floats(0, 1e18, allow_nan=False, allow_infinity=False))
_RECORDS = st.lists(
    st.builds(
        ResultRecord,
        row_id=st.text(min_size=1, max_size=20),
        row_index=st.integers(0, 2**62),
        model=st.text(max_size=20),
        request_hash=st.text(max_size=32),
        status=st.sampled_from(["ok", "failed", "skipped", "invalid"]),
        final=st.booleans(),
        attempts=st.integers(0, 2**31 - 1),
        started_at=st.floats(0, 4e9, allow_nan=False),
        finished_at=st.floats(0, 4e9, allow_nan=False),
        latency_ms=st.floats(0, 1e9, allow_nan=False),
        http_status=st.one_of(st.none(), st.integers(100, 599)),
        content=st.one_of(_TEXT, st.just('"quoted"\n\\ \u2028 \x00 \U0001f600')),
        refusal=_TEXT,
        tool_calls=_TEXT,
        finish_reason=_TEXT,
        response_model=_TEXT,
        response_id=_TEXT,
        system_fingerprint=_TEXT,
        prompt_tokens=_COUNT,
        completion_tokens=_COUNT,
        total_tokens=_COUNT,
        cached_tokens=_COUNT,
        reasoning_tokens=_COUNT,
        provider_cost=_MONEY,
        usage_raw=_TEXT,
        error_type=_TEXT,
        error_message=_TEXT,
        possibly_billed=st.booleans(),
        reused=st.booleans(),
        charged_usd=_MONEY,
        validation_error=_TEXT,
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=150, deadline=None)
@given(records=_RECORDS, longest_first=st.booleans())
def test_a_part_read_from_its_journal_is_the_table_of_its_records(
    tmp_path_factory: pytest.TempPathFactory, records: list[ResultRecord], longest_first: bool
) -> None:
    """The compactor reads a sealed segment back with Arrow's JSON reader; the part must be
    exactly the table the records make (every type, escape, null and timestamp rounding)."""
    folder = tmp_path_factory.mktemp("segment")
    if longest_first:
        # A line longer than the reader's default block (1 MiB) must not fail the part.
        records = [dataclasses.replace(records[0], content="x" * (1 << 20) + "y"), *records]
    segment = journal.Journal(folder, 1)
    segment.append(records)
    segment.close()
    read = sink.segment_table(segment.path, segment.longest)
    assert read.schema == sink.SCHEMA
    assert read.to_pylist() == sink.to_table(records).to_pylist()


def test_a_full_segment_becomes_its_part_and_no_record_stays_in_memory(tmp_path: Path) -> None:
    """A sealed segment is compacted from the file, not from records kept in memory."""
    records = [
        ResultRecord(f"r{i}", i, "m", "h", "ok", True, 1, 1.5 + i, 2.25 + i, 0.5, content=f"c{i}")
        for i in range(25)
    ]
    journal_dir, parts_dir = tmp_path / "journal", tmp_path / "parts"
    journal_dir.mkdir()
    parts_dir.mkdir()
    run_sink = sink.RunSink(journal_dir, parts_dir, next_number=1, part_rows=10)

    async def go() -> None:
        for start in range(0, 25, 5):
            run_sink.append(records[start : start + 5])
        await run_sink.close()

    anyio.run(go)
    assert not hasattr(run_sink, "_pending")
    written = [pq.read_table(p).to_pylist() for p in sink.parts(parts_dir)]
    assert [len(t) for t in written] == [10, 10, 5]
    assert [r for t in written for r in t] == sink.to_table(records).to_pylist()
    assert list(journal_dir.iterdir()) == []


@pytest.mark.parametrize("cut", [0.5, 0.7, 1 / 3])
def test_a_write_cut_short_by_a_full_disk_leaves_the_segment_as_it_was(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cut: float
) -> None:
    """A full disk can let one write through in part before the next fails: the failed
    append must leave no fragment behind, so that the batch written again once there is room
    is read back once, and the sealed segment still becomes its part."""
    records = [
        ResultRecord(f"r{i}", i, "m", "h", "ok", True, 1, 1.5, 2.25, 0.5, content=f"c{i}")
        for i in range(4)
    ]
    mode = {"now": "ok"}
    real = os.write

    def write(fd: int, data: Any) -> int:
        if mode["now"] == "short":  # part of the batch, then the disk is full
            mode["now"] = "full"
            return real(fd, bytes(data[: int(len(data) * cut)]))
        if mode["now"] == "full":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    faulty = types.SimpleNamespace(**{n: getattr(os, n) for n in dir(os) if not n.startswith("__")})
    faulty.write = write
    monkeypatch.setattr(journal, "os", faulty)
    journal_dir, parts_dir = tmp_path / "journal", tmp_path / "parts"
    journal_dir.mkdir()
    parts_dir.mkdir()
    run_sink = sink.RunSink(journal_dir, parts_dir, next_number=1, part_rows=1_000)
    run_sink.append(records[:1])  # the cut goes back to the end of earlier appends, not 0
    run_sink.append(records[1:2])
    [segment] = journal_dir.glob("segment-*.jsonl")
    before = segment.read_bytes()
    mode["now"] = "short"
    with pytest.raises(StorageFailed, match="the disk is full"):
        run_sink.append(records[2:])
    assert segment.read_bytes() == before
    mode["now"] = "ok"  # room is back: the pool writes the batch again
    run_sink.append(records[2:])
    anyio.run(run_sink.close)
    [part] = sink.parts(parts_dir)
    assert pq.read_table(part).to_pylist() == sink.to_table(records).to_pylist()
    assert list(journal_dir.iterdir()) == []


def test_a_fragment_that_cannot_be_cut_back_stays_the_last_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the fragment of a failed write cannot be taken out, nothing more is written after
    it (it would be a corrupt line in the middle): recovery drops it as a torn last line."""
    records = [ResultRecord(f"r{i}", i, "m", "h", "ok", True, 1, 1.5, 2.25, 0.5) for i in range(4)]
    real = os.write
    calls = {"n": 0}

    def write(fd: int, data: Any) -> int:
        calls["n"] += 1
        if calls["n"] == 2:
            return real(fd, bytes(data[: len(data) // 2 - 5]))  # r2 cut mid-line
        if calls["n"] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)

    def no_truncate(fd: int, length: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    faulty = types.SimpleNamespace(**{n: getattr(os, n) for n in dir(os) if not n.startswith("__")})
    faulty.write, faulty.ftruncate = write, no_truncate
    monkeypatch.setattr(journal, "os", faulty)
    segment = journal.Journal(tmp_path, 1)
    segment.append(records[:2])
    with pytest.raises(StorageFailed, match="the disk is full"):
        segment.append(records[2:])
    with pytest.raises(StorageFailed, match="a failed write is left in it"):
        segment.append(records[2:])
    segment.close()
    assert calls["n"] == 3  # nothing written after the fragment
    parts_dir = tmp_path / "parts"
    parts_dir.mkdir()
    sink.compact_leftovers(tmp_path, parts_dir)
    [part] = sink.parts(parts_dir)
    assert pq.read_table(part).column("row_id").to_pylist() == ["r0", "r1"]


def _faulty_os(**replaced: Any) -> Any:
    """The os module as the journal sees it, with some calls replaced."""
    faulty = types.SimpleNamespace(**{n: getattr(os, n) for n in dir(os) if not n.startswith("__")})
    for name, function in replaced.items():
        setattr(faulty, name, function)
    return faulty


_SIX = [ResultRecord(f"r{i}", i, "m", "h", "ok", True, 1, 1.5, 2.25, 0.5) for i in range(6)]


def _part_ids(parts_dir: Path) -> list[str]:
    return [i for p in sink.parts(parts_dir) for i in pq.read_table(p)["row_id"].to_pylist()]


def test_a_background_fsync_failing_while_a_batch_is_written_never_fails_that_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An fsync that fails while an append writes: the written batch is journaled, so the
    append returns and the failure stops the next one before it writes. Raised after the
    write, the caller took the batch as not journaled and wrote it again (rows twice)."""
    go, counts = threading.Event(), {"fsyncs": 0, "writes": 0}
    segment: journal.Journal | None = None

    def fsync(fd: int) -> None:
        counts["fsyncs"] += 1
        if counts["fsyncs"] == 1:
            go.wait(5)  # the first background fsync is slow, then fails
            raise OSError(errno.EIO, os.strerror(errno.EIO))

    def write(fd: int, data: Any) -> int:
        counts["writes"] += 1
        written = os.write(fd, data)
        if counts["writes"] == 2:  # the fsync fails while this write is under way
            go.set()
            assert segment is not None and segment._syncing is not None
            deadline = time.monotonic() + 5
            while not segment._syncing.done() and time.monotonic() < deadline:
                time.sleep(0.001)
        return written

    monkeypatch.setattr(journal, "os", _faulty_os(fsync=fsync, write=write))
    monkeypatch.setattr(journal, "_fsync", fsync)
    segment = journal.Journal(tmp_path, 1, fsync_every=2)
    segment.append(_SIX[:2])  # starts the slow background fsync
    segment.append(_SIX[2:4])  # written while it fails: journaled
    with pytest.raises(StorageFailed, match="fsync"):
        segment.append(_SIX[4:])  # the failure stops the next batch before it is written
    with contextlib.suppress(StorageFailed):
        segment.close()
    parts_dir = tmp_path / "parts"
    parts_dir.mkdir()
    sink.compact_leftovers(tmp_path, parts_dir)
    assert _part_ids(parts_dir) == ["r0", "r1", "r2", "r3"]


def test_a_segment_left_torn_stops_the_sink_not_just_that_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fragment that could not be cut back ends on a line boundary: its whole lines are
    journaled. Sealing that segment (a shard's flusher) must not let the batch be written
    again in the next segment: its rows would be in two parts."""
    mode = {"now": "ok"}
    line = len(orjson.dumps(_SIX[2], option=orjson.OPT_APPEND_NEWLINE))

    def write(fd: int, data: Any) -> int:
        if mode["now"] == "short":
            mode["now"] = "full"
            return os.write(fd, bytes(data[:line]))  # r2's whole line, then a full disk
        if mode["now"] == "full":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return os.write(fd, data)

    def ftruncate(fd: int, length: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(journal, "os", _faulty_os(write=write, ftruncate=ftruncate))
    journal_dir, parts_dir = tmp_path / "journal", tmp_path / "parts"
    journal_dir.mkdir()
    parts_dir.mkdir()
    run_sink = sink.RunSink(journal_dir, parts_dir, next_number=1, part_rows=1_000)
    run_sink.append(_SIX[:2])
    mode["now"] = "short"
    with pytest.raises(StorageFailed, match="the disk is full"):
        run_sink.append(_SIX[2:4])
    run_sink.flush()  # a shard's flusher seals what is journaled
    mode["now"] = "ok"
    with pytest.raises(StorageFailed, match="a failed write is left in it"):
        run_sink.append(_SIX[2:4])  # the pool's final flush
    with contextlib.suppress(StorageFailed):
        anyio.run(run_sink.close)
    sink.compact_leftovers(journal_dir, parts_dir)  # what a resume does first
    assert _part_ids(parts_dir) == ["r0", "r1", "r2"]


def test_flushes_with_nothing_new_and_after_close_leave_nothing(tmp_path: Path) -> None:
    """A flush with nothing journaled since the last one keeps the open segment (no segment
    number spent); a flush after close opens nothing."""
    journal_dir, parts_dir = tmp_path / "journal", tmp_path / "parts"
    journal_dir.mkdir()
    parts_dir.mkdir()
    run_sink = sink.RunSink(journal_dir, parts_dir, next_number=1, part_rows=1_000)
    for _ in range(3):
        run_sink.flush()
    run_sink.append(_SIX[:1])
    anyio.run(run_sink.close)
    run_sink.flush()
    assert [p.name for p in sink.parts(parts_dir)] == [sink.part_name(1)]
    assert list(journal_dir.iterdir()) == []


def test_a_write_that_writes_nothing_fails_rather_than_loops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = {"n": 0}

    def write(fd: int, data: Any) -> int:
        calls["n"] += 1
        assert calls["n"] < 1_000, "still writing after 1,000 calls that wrote nothing"
        return 0

    monkeypatch.setattr(journal, "os", _faulty_os(write=write))
    segment = journal.Journal(tmp_path, 1)
    with pytest.raises(StorageFailed, match="cannot write journal"):
        segment.append(_SIX[:1])

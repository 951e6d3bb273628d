"""`runner rm RUN...`: delete runs a person no longer wants, never one that is running;
`runner runs` while one is running."""

from __future__ import annotations

import json
import signal
from pathlib import Path

from runner.store.state import list_runs

from .conftest import run_cli, spec_text, start_runner, write_rows, write_spec


def submit(folder: Path, name: str = "t", endpoint_extra: str = "") -> str:
    write_rows(folder / "data.jsonl", [{"id": f"r{i}", "text": f"q {i}"} for i in range(4)])
    write_spec(folder, spec_text(name=name, endpoint_extra=endpoint_extra))
    done = run_cli("submit", "job.toml", "--runs-dir", "runs", cwd=folder)
    assert done.returncode == 0, done.stderr
    return done.stderr.split(":", 1)[0].removeprefix("run ")


def files(folder: Path) -> set[Path]:
    """The run's files, without the .tmp ones it writes and renames as it goes."""
    return {p.relative_to(folder) for p in folder.rglob("*") if p.suffix != ".tmp"}


def ids(folder: Path) -> list[str]:
    return [m["run_id"] for m in list_runs(folder / "runs")]


def test_rm_deletes_the_runs_named_and_only_those(tmp_path: Path) -> None:
    """`runner rm A --yes` deletes that run's folder; another run of the same job stays, and
    nothing of the deleted one is left in the runs folder."""
    first, second = (submit(tmp_path) for _ in range(2))
    done = run_cli("rm", first, "--yes", "--runs-dir", "runs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [f"removed {first}"]
    assert ids(tmp_path) == [second]
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == [second]


def test_rm_without_yes_off_a_terminal_deletes_nothing(tmp_path: Path) -> None:
    run_id = submit(tmp_path)
    done = run_cli("rm", run_id, "--runs-dir", "runs", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == "error: rm deletes runs for good: add --yes to confirm"
    assert ids(tmp_path) == [run_id]


def test_rm_refuses_an_unknown_run_or_a_job_name(tmp_path: Path) -> None:
    """A job name is not a run id: rm deletes only runs named exactly; nothing is deleted
    when any name is unknown."""
    run_id = submit(tmp_path)
    for ref in ("t", "no-such-run"):
        done = run_cli("rm", run_id, ref, "--yes", "--runs-dir", "runs", cwd=tmp_path)
        assert done.returncode == 2
        assert done.stderr.strip() == (
            f"error: no run {ref!r} in runs (give run ids, as `runner runs` lists them)"
        )
    assert ids(tmp_path) == [run_id]


def test_rm_refuses_a_running_run_and_keeps_it(tmp_path: Path) -> None:
    """While `runner submit` runs (its process holds the run's lock), `runner rm` exits 2
    naming the process and keeps every file; once that process is gone, rm deletes it."""
    write_rows(tmp_path / "data.jsonl", [{"id": f"r{i}", "text": f"q {i}"} for i in range(4)])
    # Answers take a minute: the run is still going when rm is tried.
    write_spec(
        tmp_path, spec_text(endpoint_extra="simulator = { latency_ms = 60000 }", concurrency=2)
    )
    proc = start_runner(tmp_path, "submit", "job.toml")
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()  # written once the run's lock is held
        assert first.startswith("run "), first
        run_id = first.split(":", 1)[0].removeprefix("run ")
        folder = tmp_path / "runs" / run_id
        before = files(folder)
        done = run_cli("rm", run_id, "--yes", "--runs-dir", "runs", cwd=tmp_path)
        assert done.returncode == 2
        assert done.stderr.strip() == (
            f"error: run {run_id} is running (process {proc.pid}); stop it first"
        )
        # The run goes on writing its journal: every file it had is still there.
        assert before <= files(folder)
        assert {Path("manifest.json"), Path("job.toml"), Path("lock")} <= set(before)
        assert ids(tmp_path) == [run_id]
        # `runner runs` counts the running run's rows from its files, not blanks.
        done = run_cli("runs", "--format", "json", "--runs-dir", "runs", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        [listed] = json.loads(done.stdout)
        assert (listed["state"], listed["ok"], listed["failed"]) == ("running", 0, 0)
        assert listed["total"] in (None, 4)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if proc.stderr is not None:
            proc.stderr.close()
    done = run_cli("rm", run_id, "--yes", "--runs-dir", "runs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert ids(tmp_path) == []


def test_rm_refuses_a_folder_that_is_not_a_run(tmp_path: Path) -> None:
    """A folder is a run only when its manifest names it and it has the run's journal and
    parts: `runner rm` of a project folder that merely holds a manifest.json (or of `.`)
    exits 2 and deletes nothing, nor leaves a lock file in it."""
    run_id = submit(tmp_path)
    project = tmp_path / "webext"
    (project / "src").mkdir(parents=True)
    (project / "manifest.json").write_text('{"name": "my extension"}')
    (project / "src" / "main.js").write_text("code\n")
    before = files(project)
    for ref in ("webext", str(project), f"../{project.name}"):
        done = run_cli("rm", ref, "--yes", "--runs-dir", "runs", cwd=tmp_path)
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith("error: ") and len(done.stderr.splitlines()) == 1
        assert files(project) == before
    assert ids(tmp_path) == [run_id]


def test_rm_of_the_same_run_twice_removes_it_once(tmp_path: Path) -> None:
    run_id = submit(tmp_path)
    done = run_cli("rm", run_id, run_id, "--yes", "--runs-dir", "runs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [f"removed {run_id}"]
    assert ids(tmp_path) == []

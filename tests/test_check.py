"""`runner submit` checks the whole input in a worker thread while the first requests go out:
what the check finds still stops the run with exit 2 naming the place, and nothing answered
before that is lost or bought again."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from runner.store.state import RunDir, list_runs

from .conftest import run_cli, spec_text, write_spec

ROWS = 3000


def lines(count: int) -> list[str]:
    return [json.dumps({"id": f"r{i}", "text": f"question {i}"}) for i in range(count)]


def only_run(tmp_path: Path) -> tuple[dict[str, Any], RunDir]:
    [info] = list_runs(tmp_path / "runs")
    run = RunDir(tmp_path / "runs" / info["run_id"])
    return info, run


def answered(tmp_path: Path) -> int:
    """Rows the run holds as ok (journal and parts), read back by `runner status --json`."""
    done = run_cli("status", "t", "--runs-dir", "runs", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return int(json.loads(done.stdout)["ok"])


def test_bad_line_near_the_end_stops_with_exit_2_and_keeps_what_was_answered(
    tmp_path: Path, sim_factory: Any
) -> None:
    """A malformed line 2,990 of 3,000 stops the run (exit 2, file and line named); every
    answer received is kept, and a resume after the fix buys none of them again."""
    sim = sim_factory()
    data = lines(ROWS)
    data[2989] = '{"id": "r2989", "text": '  # cut short
    (tmp_path / "data.jsonl").write_text("\n".join(data) + "\n")
    write_spec(tmp_path, spec_text(base_url=sim.base_url, concurrency=32))
    done = run_cli("submit", "job.toml", "--runs-dir", "runs", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "data.jsonl:2990" in last, last
    info, _ = only_run(tmp_path)
    assert info["state"] == "stopped"
    assert answered(tmp_path) == sim.stats.ok  # every paid answer is in the run
    assert sim.stats.ok > 0  # requests went out while the check ran

    data[2989] = json.dumps({"id": "r2989", "text": "question 2989"})
    (tmp_path / "data.jsonl").write_text("\n".join(data) + "\n")
    again = run_cli("resume", "t", "--runs-dir", "runs", "--allow-changed-input", cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert answered(tmp_path) == ROWS
    assert sim.stats.resent_after_ok == 0


def test_repeated_id_near_the_end_of_a_parquet_file_names_both_rows(
    tmp_path: Path, sim_factory: Any
) -> None:
    """Row ids 5 and 2,995 are equal: exit 2 naming both rows; the answers so far are kept."""
    sim = sim_factory()
    ids = [f"r{i}" for i in range(ROWS)]
    ids[2994] = "r4"
    table = pa.table({"id": ids, "text": [f"question {i}" for i in range(ROWS)]})
    pq.write_table(table, tmp_path / "data.parquet")
    write_spec(tmp_path, spec_text(input_path="data.parquet", base_url=sim.base_url))
    done = run_cli("submit", "job.toml", "--runs-dir", "runs", cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "duplicate id 'r4' (rows 5 and 2995)" in last, last
    assert only_run(tmp_path)[0]["state"] == "stopped"
    assert answered(tmp_path) == sim.stats.ok


def test_resume_of_a_run_whose_check_never_passed_checks_before_sending(
    tmp_path: Path, sim_factory: Any
) -> None:
    """The check of the first session failed: a resume of the unchanged input checks it
    again, before any request, and refuses with the same place."""
    sim = sim_factory()
    data = lines(ROWS)
    data[2500] = "not json"
    (tmp_path / "data.jsonl").write_text("\n".join(data) + "\n")
    write_spec(tmp_path, spec_text(base_url=sim.base_url))
    first = run_cli("submit", "job.toml", "--runs-dir", "runs", cwd=tmp_path)
    assert first.returncode == 2, first.stderr
    sent = sim.stats.requests
    again = run_cli("resume", "t", "--runs-dir", "runs", cwd=tmp_path)
    assert again.returncode == 2, again.stderr
    assert "data.jsonl:2501" in again.stderr.strip().splitlines()[-1]
    assert sim.stats.requests == sent


def test_completed_run_knows_its_size_and_which_requests_repeat(
    tmp_path: Path, sim_factory: Any
) -> None:
    """When the check passes, the run records the input's size and its repeated requests
    (for resumes), and identical prompts were sent once, even those sent before the check
    ended."""
    sim = sim_factory()
    data = [json.dumps({"id": f"r{i}", "text": f"question {i % 1000}"}) for i in range(ROWS)]
    (tmp_path / "data.jsonl").write_text("\n".join(data) + "\n")
    write_spec(tmp_path, spec_text(base_url=sim.base_url))
    done = run_cli("submit", "job.toml", "--runs-dir", "runs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    info, run = only_run(tmp_path)
    assert info["state"] == "completed"
    manifest = run.read_manifest()
    assert manifest["counts"]["total"] == ROWS
    assert "input_check" not in manifest
    assert run.read_repeated() is not None and len(run.read_repeated() or ()) == 1000
    assert sim.stats.requests == 1000


def test_changed_input_with_a_bad_line_sends_nothing_and_leaves_no_row_keys(
    tmp_path: Path, sim_factory: Any
) -> None:
    """A changed input is checked whole before any request: a bad line exits 2 naming it,
    sends nothing and leaves no row_keys.parquet (whole or partial); once fixed, the resume
    sends only the new row, and `runner query` reads the current rows through the keys."""
    sim = sim_factory()
    (tmp_path / "data.jsonl").write_text("\n".join(lines(50)) + "\n")
    write_spec(tmp_path, spec_text(base_url=sim.base_url))
    assert run_cli("submit", "job.toml", "--runs-dir", "runs", cwd=tmp_path).returncode == 0
    _, run = only_run(tmp_path)
    requests = sim.stats.requests
    changed = [json.dumps({"id": "new", "text": "a new question"}), *lines(50)]
    (tmp_path / "data.jsonl").write_text("\n".join([*changed[:40], "{not json", *changed[40:]]))
    done = run_cli("resume", "t", "--allow-changed-input", "--runs-dir", "runs", cwd=tmp_path)
    assert done.returncode == 2 and "data.jsonl:41" in done.stderr, done.stderr
    assert sim.stats.requests == requests
    assert not list(run.path.glob("row_keys*"))
    (tmp_path / "data.jsonl").write_text("\n".join(changed) + "\n")
    done = run_cli("resume", "t", "--allow-changed-input", "--runs-dir", "runs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sim.stats.requests == requests + 1
    assert run.row_keys_path.is_file()
    query = run_cli(
        "query", "t", "SELECT row_id, row_index FROM results ORDER BY row_index LIMIT 2",
        "--format", "json", "--runs-dir", "runs", cwd=tmp_path,
    )  # fmt: skip
    assert query.returncode == 0, query.stderr
    assert json.loads(query.stdout) == [
        {"row_id": "new", "row_index": 0},
        {"row_id": "r0", "row_index": 1},
    ]

"""Re-asks of invalid answers across kill -9: a resume goes on from the re-asks a killed
session journaled (never more answers per row than 1 + max_invalid_attempts), every row ends
once, and parts written before the validation_error column still read."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from runner.errors import SpecError, UsageError
from runner.output.schema import FROZEN_NAME, freeze, frozen_text, load_output
from runner.records import Reasked, ResultRecord
from runner.sim.server import SimulatorConfig, SimulatorThread
from runner.spec import load_spec
from runner.store.journal import Journal
from runner.store.sink import parts, reasked_rows, to_table, write_part
from runner.store.state import RunDir, list_runs

from .conftest import select, spec_text, start_runner, write_rows, write_spec
from .test_output import SCHEMA
from .test_resume import wait_for_results

ASK_JSON = 'response_format = { type = "json_schema", json_schema = { name = "x", strict = true } }'


@pytest.fixture
def sim() -> Iterator[SimulatorThread]:
    with SimulatorThread(SimulatorConfig(latency_ms=10, jitter_ms=5)) as s:
        yield s


@pytest.mark.parametrize("repair", ["resend", "feedback"])
def test_kill_9_mid_reasks_then_resume(tmp_path: Path, sim: SimulatorThread, repair: str) -> None:
    """Every row's first three answers are invalid and two re-asks are allowed: killed while
    rows are being re-asked, the resume asks no row more than three times in all (its
    journaled re-asks count), and each row ends once, `invalid` with its error (or `ok` when
    an answer it never heard of, on the wire at the kill, used up one of the invalid ones)."""
    rows = 1_500
    data = [{"id": f"r{i}", "text": f"Row {i}. [[sim:invalid_then_valid=3]]"} for i in range(rows)]
    write_rows(tmp_path / "data.jsonl", data)
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    text = spec_text(base_url=sim.base_url, request_extra=ASK_JSON, concurrency=32).replace(
        "max_tokens = 64", "max_tokens = 200"
    )
    spec = write_spec(tmp_path, text + f'\n[output]\nschema = "schema.json"\nrepair = "{repair}"\n')
    proc = start_runner(tmp_path, "submit", str(spec))
    deadline = time.monotonic() + 30
    while not list((tmp_path / "runs").glob("*/manifest.json")):
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.05)
    run_dir = next((tmp_path / "runs").iterdir())
    wait_for_results(run_dir, at_least=2_000)  # first answers done, re-asks under way
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=10)
    proc = start_runner(tmp_path, "resume", run_dir.name)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err  # rows invalid: exit 1, as for failed rows
    (listed,) = list_runs(tmp_path / "runs")
    run = RunDir(tmp_path / "runs" / listed["run_id"])
    answers = select(
        run,
        "SELECT row_id, count(*) AS n FROM attempts WHERE prompt_tokens IS NOT NULL "
        "GROUP BY row_id",
    )
    assert len(answers) == rows
    assert max(r["n"] for r in answers) == 3, sorted(r["n"] for r in answers)[-5:]
    got = select(run, "SELECT row_id, status, validation_error FROM results")
    assert len(got) == rows == len({r["row_id"] for r in got})
    crashed = run.read_manifest()["sessions"][0]
    lost = crashed["unanswered_at_crash"]
    ok = [r for r in got if r["status"] == "ok"]
    assert len(ok) <= lost
    invalid = [r for r in got if r["status"] == "invalid"]
    assert len(invalid) == rows - len(ok)
    assert all(r["validation_error"] for r in invalid)
    assert sim.stats.resent_after_ok <= lost


def test_parts_written_before_the_column_still_read(tmp_path: Path, sim: SimulatorThread) -> None:
    """A run whose early parts have no validation_error column reads, reports and resumes."""
    data = [{"id": f"r{i}", "text": f"Row {i}."} for i in range(20)]
    write_rows(tmp_path / "data.jsonl", data)
    spec = write_spec(tmp_path, spec_text(base_url=sim.base_url))
    proc = start_runner(tmp_path, "submit", str(spec))
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    (listed,) = list_runs(tmp_path / "runs")
    run = RunDir(tmp_path / "runs" / listed["run_id"])
    for path in parts(run.parts_dir):
        pq.write_table(pq.read_table(path).drop_columns(["validation_error"]), path)
    # A later part with the column (as a resume would write), after the old one.
    newer = run.parts_dir / "part-000099.parquet"
    table = pq.read_table(parts(run.parts_dir)[0])
    import pyarrow as pa

    column = pa.array(["$: was wrong"] * table.num_rows, pa.string())
    pq.write_table(table.append_column("validation_error", column), newer)
    got = select(run, "SELECT count(*) AS n, count(validation_error) AS e FROM attempts")
    assert got == [{"n": 40, "e": 20}]


def _record(
    row: str, attempts: int, *, final: bool, status: str, error: str | None
) -> ResultRecord:
    return ResultRecord(
        row_id=row,
        row_index=int(row[1:]),
        model="m",
        request_hash=f"h{row}",
        status=status,
        final=final,
        attempts=attempts,
        started_at=0.0,
        finished_at=1.0,
        latency_ms=1.0,
        content=f"answer {attempts} of {row}",
        validation_error=error,
    )


def test_reasked_rows_are_the_unsettled_ones(tmp_path: Path) -> None:
    """What a resume goes on from: re-asked rows without a final record (in parts or the
    journal), with their re-asks counted and their latest answer and error."""
    journal, parts_dir = tmp_path / "journal", tmp_path / "parts"
    journal.mkdir()
    parts_dir.mkdir()
    in_part = [
        _record("r1", 1, final=False, status="invalid", error="$: first"),
        _record("r2", 1, final=False, status="invalid", error="$: once"),
        _record("r3", 1, final=False, status="invalid", error="$: once"),
        _record("r4", 1, final=True, status="ok", error=None),
    ]
    write_part(parts_dir, 1, to_table(in_part))
    segment = Journal(journal, 2)
    segment.append(
        [
            _record("r1", 2, final=False, status="invalid", error="$: second"),
            _record("r2", 2, final=True, status="ok", error=None),
            _record("r3", 3, final=True, status="invalid", error="$: last"),
        ]
    )
    segment.close()
    found = reasked_rows(parts_dir, journal)
    assert found == {
        ("r1", "m", "hr1"): Reasked(
            used=2,
            attempts=2,
            content="answer 2 of r1",
            tool_calls=None,
            validation_error="$: second",
        )
    }


def test_frozen_schema_checks(tmp_path: Path) -> None:
    """The frozen copy is used as long as its hash holds; an edit of it, or a --spec whose
    schema differs, is refused with exit 2."""
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    write_rows(tmp_path / "data.jsonl", [{"id": "0", "text": "x"}])
    spec = load_spec(write_spec(tmp_path, spec_text() + '\n[output]\nschema = "schema.json"\n'))
    output = load_output(spec)
    run = tmp_path / "run"
    run.mkdir()
    digest = freeze(output, run)
    assert digest is not None
    assert frozen_text(run, digest, spec, given=False, run_id="x") == json.dumps(SCHEMA)
    assert frozen_text(run, None, spec, given=False, run_id="x") is None  # an older run
    with pytest.raises(SpecError, match="not asked with a schema file"):
        frozen_text(run, None, spec, given=True, run_id="x")
    (tmp_path / "schema.json").write_text("{}")
    with pytest.raises(SpecError, match=r"output\.schema: differs from run x's"):
        frozen_text(run, digest, spec, given=True, run_id="x")
    assert frozen_text(run, digest, spec, given=False, run_id="x") == json.dumps(SCHEMA)
    (run / FROZEN_NAME).write_text("{}")
    with pytest.raises(UsageError, match="edited since the run froze it"):
        frozen_text(run, digest, spec, given=False, run_id="x")

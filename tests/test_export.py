"""`runner report` and `runner export` as a user meets them: every `--by`, error messages in
the report, and user errors (exit 2, one line) instead of internal ones."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from runner.report.query import GROUPS, query, report, summary
from runner.store.state import RunDir

from .conftest import run_cli, select, spec_text, write_rows, write_spec


@dataclass(frozen=True)
class Mixed:
    folder: Path
    run: RunDir

    def cli(self, *args: str) -> tuple[int, str, str]:
        done = run_cli(*args, "--runs-dir", str(self.folder / "runs"), cwd=self.folder)
        return done.returncode, done.stdout, done.stderr


TEXTS = [
    "What is one?",
    "What is two?",
    "What is three?",
    "What is one?",  # the same request as row 0: answered by it
    "Refuse me [[sim:400]]",
    "Refuse me too [[sim:400]]",
    "Too long [[sim:context_length_exceeded]]",
    "Cut short [[sim:length]]",
]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mixed]:
    """A finished run with ok rows, a reused row, two 400s, a context-length refusal and a
    `length` finish."""
    folder = tmp_path_factory.mktemp("mixed")
    write_rows(folder / "data.jsonl", [{"id": f"r{i}", "text": t} for i, t in enumerate(TEXTS)])
    write_spec(folder, spec_text())
    done = run_cli("submit", "job.toml", "--runs-dir", "runs", cwd=folder)
    assert done.returncode == 1, done.stderr  # failed rows
    (path,) = (folder / "runs").iterdir()
    yield Mixed(folder, RunDir(path))


# -- report ------------------------------------------------------------------------------


@pytest.mark.parametrize("by", sorted(GROUPS))
def test_report_by_every_value(mixed: Mixed, by: str) -> None:
    """`runner report --by X` works for every X: one row per value, counts adding up to the
    rows, and each group's counts those of the results (a reused row counts with the finish
    reason of the answer it reused). --by finish_reason, which failed, goes through the CLI."""
    if by == "finish_reason":
        code, out, err = mixed.cli("report", mixed.run.run_id, "--by", by, "--format", "json")
        assert code == 0, err
        (table,) = json.loads(out).values()
    else:
        [(_, names, found)] = report(mixed.run, by=by)
        table = [dict(zip(names, row, strict=True)) for row in found]
    assert sum(r["rows"] for r in table) == len(TEXTS)
    assert sum(r["failed"] for r in table) == 3
    if by == "hour":
        return
    results = select(mixed.run, "SELECT * FROM results")
    expected = Counter(r[by] for r in results)
    assert {r[by]: r["rows"] for r in table} == dict(expected)
    if by == "finish_reason":
        reused = [r for r in results if r["reused"]]
        assert len(reused) == 1 and reused[0]["finish_reason"] in ("stop", "length")
        assert expected["length"] >= 1 and expected[None] == 3


def test_report_errors_show_the_messages_with_counts(mixed: Mixed) -> None:
    """The report's error table names each error message with its count of rows."""
    code, out, err = mixed.cli("report", mixed.run.run_id, "--format", "json")
    assert code == 0, err
    errors = json.loads(out)["errors"]
    by_message = {(e["error_type"], e["message"]): e["failed_rows"] for e in errors}
    [rejected] = [k for k in by_message if (k[1] or "").endswith("Simulated 400 error.")]
    assert by_message[rejected] == 2
    [too_long] = [k for k in by_message if "maximum context length" in (k[1] or "")]
    assert by_message[too_long] == 1
    # The table shows the message column too.
    code, out, err = mixed.cli("report", mixed.run.run_id)
    assert code == 0, err
    assert "Simulated 400 error." in out


def test_summary_top_errors_carry_messages(mixed: Mixed) -> None:
    """The library's summary lists the top error messages with their row counts."""
    top = summary(mixed.run)["top_errors"]
    assert top[0]["message"].endswith("Simulated 400 error.") and top[0]["rows"] == 2
    assert sum(e["rows"] for e in top) == 3


def rows_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -- export ------------------------------------------------------------------------------


def one_line(code: int, stdout: str, stderr: str) -> str:
    assert code == 2, (stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_export_to_a_missing_folder_is_a_user_error(mixed: Mixed) -> None:
    """A folder that does not exist: exit 2, one line naming it, nothing created."""
    out = mixed.folder / "nodir" / "x.parquet"
    line = one_line(*mixed.cli("export", mixed.run.run_id, str(out)))
    assert line == f"error: {out}: folder {out.parent} does not exist"
    assert not out.parent.exists()


@pytest.mark.parametrize("case", ["under-a-file", "a-folder", "the-input", "in-the-run"])
def test_export_to_a_path_that_cannot_be_written_is_a_user_error(mixed: Mixed, case: str) -> None:
    """A path under a regular file, a folder, the run's input file or a file of the run
    itself is refused with exit 2 and one line, whatever --overwrite says; nothing changes."""
    (mixed.folder / "plain-file").write_text("x")
    (mixed.folder / "a-folder.csv").mkdir(exist_ok=True)
    out = {
        "under-a-file": mixed.folder / "plain-file" / "x.csv",
        "a-folder": mixed.folder / "a-folder.csv",
        "the-input": mixed.folder / "data.jsonl",
        "in-the-run": mixed.run.path / "manifest.json.csv",
    }[case]
    before = {p: p.read_bytes() for p in (mixed.folder / "data.jsonl", mixed.run.manifest_path)}
    line = one_line(*mixed.cli("export", mixed.run.run_id, str(out), "--overwrite"))
    assert line.startswith(f"error: {out}: "), line
    assert {p: p.read_bytes() for p in before} == before
    assert not list(mixed.folder.glob("**/*.tmp"))
    assert not (mixed.run.path / "manifest.json.csv").exists()


def test_an_existing_file_is_replaced_only_with_overwrite(mixed: Mixed, tmp_path: Path) -> None:
    """Export refuses to replace an existing file unless --overwrite is given."""
    out = tmp_path / "answers.jsonl"
    out.write_text("keep me\n")
    line = one_line(*mixed.cli("export", mixed.run.run_id, str(out)))
    assert line == f"error: {out}: exists; add --overwrite to replace it"
    assert out.read_text() == "keep me\n"
    code, _, err = mixed.cli("export", mixed.run.run_id, str(out), "--overwrite")
    assert code == 0, err
    assert [r["id"] for r in rows_of(out)] == [f"r{i}" for i in range(len(TEXTS))]


DRIFT_AT = 25_000


def test_jsonl_whose_column_type_drifts_exports_and_queries(tmp_path: Path) -> None:
    """A JSONL input whose unused column is a number for 25,000 rows and then text (and gains
    a column late) runs, exports and shows in the `input` view, read like the runner reads it."""
    data = [
        {"id": f"r{i}", "text": "", "extra": i if i < DRIFT_AT else f"s{i}"}
        for i in range(DRIFT_AT + 5)
    ]
    for i in (0, 1, DRIFT_AT + 2):
        data[i]["text"] = f"question {i}"
    data[DRIFT_AT + 3]["late"] = True
    write_rows(tmp_path / "data.jsonl", data)
    write_spec(tmp_path, spec_text())
    done = run_cli("submit", "job.toml", "--runs-dir", "runs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "out.jsonl"
    done = run_cli("export", "t", str(out), "--runs-dir", "runs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    exported = rows_of(out)
    assert len(exported) == len(data)
    assert [r["extra"] for r in exported[DRIFT_AT - 1 : DRIFT_AT + 1]] == [
        DRIFT_AT - 1,
        f"s{DRIFT_AT}",
    ]
    assert exported[DRIFT_AT + 3]["late"] is True and exported[0]["late"] is None
    assert exported[DRIFT_AT + 2]["status"] == "ok" and exported[5]["status"] == "skipped"
    sql = "SELECT row_index, extra::VARCHAR AS extra FROM input WHERE row_index >= 25004"
    done = run_cli("query", "t", sql, "--format", "json", "--runs-dir", "runs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [{"row_index": DRIFT_AT + 4, "extra": f'"s{DRIFT_AT + 4}"'}]


def test_input_gone_is_a_user_error_for_export_and_query(tmp_path: Path) -> None:
    """When the run's input file was moved away, export and a query of the input view exit 2
    with one line naming the file; the other views still answer."""
    write_rows(tmp_path / "data.jsonl", [{"id": "a", "text": "x"}])
    write_spec(tmp_path, spec_text())
    assert run_cli("submit", "job.toml", "--runs-dir", "runs", cwd=tmp_path).returncode == 0
    (tmp_path / "data.jsonl").rename(tmp_path / "moved.jsonl")
    path = tmp_path / "data.jsonl"
    done = run_cli("export", "t", "out.csv", "--runs-dir", "runs", cwd=tmp_path)
    line = one_line(done.returncode, done.stdout, done.stderr)
    assert line.startswith("error: the input file of run t-") and line.endswith(f"({path})")
    done = run_cli("query", "t", "SELECT * FROM input", "--runs-dir", "runs", cwd=tmp_path)
    line = one_line(done.returncode, done.stdout, done.stderr)
    assert line == f"error: query failed: the run's input file is gone ({path}): no input view"
    (run,) = (tmp_path / "runs").iterdir()
    assert query(RunDir(run), "SELECT count(*) FROM results")[1] == [(1,)]


def test_report_and_export_leave_no_temp_files(mixed: Mixed, tmp_path: Path) -> None:
    """DuckDB's spill folder is private and removed: after report and export, the caller's
    TMPDIR holds nothing and the current folder has no `.tmp`."""
    private = tmp_path / "tmpdir"
    private.mkdir()
    env = {"TMPDIR": str(private)}
    for args in (["report", mixed.run.run_id], ["export", mixed.run.run_id, "x.parquet"]):
        done = run_cli(*args, "--runs-dir", str(mixed.folder / "runs"), cwd=tmp_path, env=env)
        assert done.returncode == 0, done.stderr
    assert list(private.iterdir()) == []
    assert not (tmp_path / ".tmp").exists()

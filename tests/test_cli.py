"""The `runner` command line: act through real processes, check through the library.

One finished run is built per module and reused by every read-only command; tests that
submit or resume build their own small runs in their own folders.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from runner.cli import cli
from runner.report.query import RunDB
from runner.sim.server import SimulatorThread
from runner.store.state import RunDir, list_runs

from .conftest import run_cli, select, spec_text, write_rows, write_spec

ROWS = 40


def rows(count: int, marker: dict[int, str] | None = None) -> list[dict[str, Any]]:
    """Input rows with an id, a prompt and one extra column that must survive export."""
    marker = marker or {}
    return [
        {
            "id": f"r{i}",
            "text": f"Question {i}: what is {i} squared? {marker.get(i, '')}",
            "topic": f"t{i % 3}",
        }
        for i in range(count)
    ]


def make_job(folder: Path, data: list[dict[str, Any]], **pieces: Any) -> Path:
    """Write data.jsonl and job.toml into folder; returns the spec's path."""
    write_rows(folder / "data.jsonl", data)
    return write_spec(folder, spec_text(**pieces))


def only_run(runs_dir: Path) -> RunDir:
    """The single run under runs_dir."""
    (path,) = [p for p in runs_dir.iterdir() if (p / "manifest.json").exists()]
    return RunDir(path)


def results(run: RunDir) -> list[dict[str, Any]]:
    return select(run, "SELECT * FROM results ORDER BY row_index, model")


def one_line(stderr: str) -> str:
    """The stderr of a failed command, which must be exactly one line."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def parse_table(text: str) -> list[dict[str, str]]:
    """Rows of a `--format table` output whose cells hold no spaces."""
    header, rule, *body = text.strip().splitlines()
    assert set(rule.replace(" ", "")) == {"-"}, text
    names = header.split()
    return [dict(zip(names, line.split(), strict=True)) for line in body]


def parse_csv(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text)))


PARSERS: dict[str, Callable[[str], list[dict[str, Any]]]] = {
    "table": parse_table,
    "csv": parse_csv,
    "json": json.loads,
}


def plain(value: Any) -> str:
    """A cell as text, whatever the format: `1,234` (table), `1234` (csv) and 1234 (json)."""
    return "" if value is None else str(value).replace(",", "")


@dataclass(frozen=True)
class Finished:
    """A finished run made by `runner submit`, and the process that made it."""

    folder: Path
    runs_dir: Path
    run: RunDir
    submitted: subprocess.CompletedProcess[str]

    def cli(
        self, *args: str, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, "--runs-dir", str(self.runs_dir), cwd=self.folder, env=env)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Finished]:
    """A completed 40-row JSONL run of job `cli`, submitted through the CLI."""
    folder = tmp_path_factory.mktemp("cli")
    make_job(folder, rows(ROWS), name="cli")
    # Module fixtures start before the autouse clean_environment: clean the same way here.
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            upper = name.upper()
            if upper.endswith(("_API_KEY", "_PROXY")) or upper in ("NO_PROXY", "SSL_CERT_FILE"):
                mp.delenv(name)
        submitted = run_cli("submit", "job.toml", "--runs-dir", "runs", cwd=folder)
    assert submitted.returncode == 0, submitted.stderr
    runs_dir = folder / "runs"
    yield Finished(folder, runs_dir, only_run(runs_dir), submitted)


# -- submit ------------------------------------------------------------------------------


def test_submit_prints_the_run_id_and_a_completed_summary(finished: Finished) -> None:
    """A clean submit exits 0, names the run first and ends with a `completed` summary."""
    run_id = finished.run.run_id
    lines = finished.submitted.stderr.splitlines()
    assert lines[0] == f"run {run_id}: {Path('runs') / run_id}"
    assert any(re.fullmatch(rf"run {run_id}: completed in [\d.]+ s", line) for line in lines)
    assert f"  input     {ROWS} rows, model gpt-4o-mini" in lines
    assert f"  rows      {ROWS} ok, 0 failed, 0 skipped this session" in lines
    assert f"            runner export {run_id} out.parquet" in lines
    cost = next(line for line in lines if line.startswith("  cost      "))
    manifest = finished.run.read_manifest()
    found = re.fullmatch(
        r"  cost      \$(0\.0*[1-9]\d), estimated from tokens at price-table prices", cost
    )
    assert found, cost  # two significant digits, never 1.3e-05
    assert float(found[1]) == pytest.approx(manifest["cost_usd"], rel=0.05)
    assert finished.submitted.stdout == ""
    manifest = finished.run.read_manifest()
    assert manifest["state"] == "completed"
    assert manifest["counts"]["ok"] == ROWS
    assert [r["row_id"] for r in results(finished.run)] == [f"r{i}" for i in range(ROWS)]


def test_submit_progress_is_plain_lines_when_stderr_is_not_a_terminal(finished: Finished) -> None:
    """Without a terminal, progress is whole plain lines: no tqdm bar, no carriage returns."""
    stderr = finished.submitted.stderr
    assert "\r" not in stderr and "\x1b" not in stderr
    assert "row/s" not in stderr and "%|" not in stderr
    progress = [line for line in stderr.splitlines() if " rows  ok " in line]
    assert progress, stderr
    for line in progress:
        assert re.fullmatch(
            r"\d+/\d+ rows  ok \d+  failed \d+  \$[\d.]+( \(~\$[\d.]+ at end\))?"
            r"  [\d,]+ req/s(  retrying \d+)?  in flight \d+  conc \d+  tokens [\d,]+",
            line,
        ), line


def test_submit_with_rejected_rows_exits_1(tmp_path: Path) -> None:
    """Rows the server rejects with a 400 fail (not retried) and the submit exits 1."""
    make_job(tmp_path, rows(20, {3: "[[sim:400]]", 11: "[[sim:400]]"}))
    done = run_cli("submit", "job.toml", "--runs-dir", "runs", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "  rows      18 ok, 2 failed, 0 skipped this session" in done.stderr.splitlines()
    # The summary says why, with counts (the most frequent errors of the run).
    assert "  failed    2 x 400 invalid_request_error: Simulated 400 error." in done.stderr
    failed = [r for r in results(only_run(tmp_path / "runs")) if r["status"] == "failed"]
    assert [(r["row_id"], r["http_status"], r["attempts"]) for r in failed] == [
        ("r3", 400, 1),
        ("r11", 400, 1),
    ]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("temperature = 3", "error: job.toml: request.temperature: must be between 0 and 2"),
        ("temprature = 0.5", "error: job.toml: request.temprature: unknown key"),
    ],
)
def test_bad_spec_exits_2_with_one_line(tmp_path: Path, extra: str, message: str) -> None:
    """An invalid spec exits 2 with one error line, no traceback, and no run folder."""
    make_job(tmp_path, rows(5), request_extra=extra)
    done = run_cli("submit", "job.toml", "--runs-dir", "runs", cwd=tmp_path)
    assert done.returncode == 2
    assert one_line(done.stderr).startswith(message)
    assert not list_runs(tmp_path / "runs")


def test_runner_debug_prints_the_traceback(tmp_path: Path) -> None:
    """With RUNNER_DEBUG=1 the same spec error comes with a traceback, and still exits 2."""
    make_job(tmp_path, rows(5), request_extra="temperature = 3")
    done = run_cli("submit", "job.toml", cwd=tmp_path, env={"RUNNER_DEBUG": "1"})
    assert done.returncode == 2
    assert done.stderr.startswith("Traceback (most recent call last):")
    assert "SpecError" in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: job.toml: request.temperature")


@pytest.mark.parametrize(
    ("spec", "input_path", "named"),
    [("job.toml", "missing.jsonl", "missing.jsonl"), ("absent.toml", "data.jsonl", "absent.toml")],
)
def test_missing_file_exits_2_naming_it(
    tmp_path: Path, spec: str, input_path: str, named: str
) -> None:
    """A missing input file (or spec file) exits 2 with one line naming that file."""
    make_job(tmp_path, rows(5), input_path=input_path)
    done = run_cli("submit", spec, "--runs-dir", "runs", cwd=tmp_path)
    assert done.returncode == 2
    assert one_line(done.stderr).startswith(f"error: {named}:")
    assert not list_runs(tmp_path / "runs")


# -- runs, status ------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_runs_lists_the_run_with_its_counts(finished: Finished, fmt: str) -> None:
    """`runner runs` lists the run with job, state and ok/failed/total, in every format."""
    done = finished.cli("runs", "--format", fmt)
    assert done.returncode == 0, done.stderr
    if fmt == "csv":
        assert done.stdout.splitlines()[0] == "run_id,job,state,ok,failed,total,cost_usd,created_at"
    listed = PARSERS[fmt](done.stdout)
    assert isinstance(listed, list) and all(isinstance(r, dict) for r in listed)
    (row,) = [r for r in listed if r["run_id"] == finished.run.run_id]
    manifest = finished.run.read_manifest()
    assert manifest["cost_usd"] > 0  # gpt-4o-mini is priced
    # The table shows two significant digits; csv and json the stored value.
    assert float(str(row.pop("cost_usd")).replace(",", "")) == pytest.approx(
        manifest["cost_usd"], rel=0.05 if fmt == "table" else 1e-5
    )
    expected = {
        "run_id": finished.run.run_id,
        "job": "cli",
        "state": "completed",
        "ok": str(ROWS),
        "failed": "0",
        "total": str(ROWS),
        "created_at": manifest["created_at"],
    }
    if fmt == "table":  # the run id holds the job's name and the start time
        del expected["job"], expected["created_at"]
    assert {k: plain(v) for k, v in row.items()} == expected


def run_ref(finished: Finished, kind: str) -> str:
    return {
        "id": finished.run.run_id,
        "path": str(finished.run.path),
        "job": "cli",
    }[kind]


@pytest.mark.parametrize("kind", ["id", "path", "job"])
def test_status_text(finished: Finished, kind: str) -> None:
    """`runner status RUN` shows state and counts for RUN given as id, folder or job name."""
    done = finished.cli("status", run_ref(finished, kind))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"{finished.run.run_id}  completed"
    assert lines[1] == f"  input     {ROWS} rows, model gpt-4o-mini"
    assert (
        lines[2] == f"  rows      {ROWS} of {ROWS} done (100.0 %): {ROWS} ok, 0 failed, 0 skipped"
    )
    manifest = finished.run.read_manifest()
    assert re.fullmatch(r"  cost      \$0\.0*[1-9]\d", lines[-2])
    assert float(lines[-2].split("$")[1]) == pytest.approx(manifest["cost_usd"], rel=0.05)
    assert lines[-1] == f"  folder    {Path('runs') / finished.run.run_id}"  # from its folder


@pytest.mark.parametrize("kind", ["id", "path", "job"])
def test_status_json(finished: Finished, kind: str) -> None:
    """`runner status RUN --json` agrees with the results for RUN as id, folder or job name."""
    done = finished.cli("status", run_ref(finished, kind), "--json")
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    got = results(finished.run)
    assert info["run_id"] == finished.run.run_id
    assert info["job_name"] == "cli"
    assert info["state"] == "completed" and info["pid"] is None
    assert (info["total"], info["ok"], info["failed"], info["skipped"]) == (ROWS, ROWS, 0, 0)
    assert info["requests"] == ROWS
    assert info["prompt_tokens"] == sum(r["prompt_tokens"] for r in got)
    assert info["completion_tokens"] == sum(r["completion_tokens"] for r in got)
    assert info["path"] == str(finished.run.path.resolve())


def test_job_name_means_the_latest_run(tmp_path: Path) -> None:
    """Given a job name, `status` picks that job's latest run."""
    make_job(tmp_path, rows(5))
    ids = []
    for _ in range(2):
        done = run_cli("submit", "job.toml", "--runs-dir", "runs", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        ids.append(done.stderr.split(":", 1)[0].removeprefix("run "))
    assert ids[0] != ids[1]
    done = run_cli("status", "t", "--json", "--runs-dir", "runs", cwd=tmp_path)
    assert json.loads(done.stdout)["run_id"] == ids[1]


@pytest.mark.parametrize(
    "command",
    [
        ["status"],
        ["status", "--json"],
        ["report"],
        ["query", "SELECT 1"],
        ["export", "o.csv"],
        ["resume"],
    ],
    ids=lambda c: "-".join(c).replace(" ", "_"),
)
def test_unknown_run_exits_2_with_one_line(finished: Finished, command: list[str]) -> None:
    """Every command taking RUN refuses an unknown run with exit 2 and one line."""
    done = finished.cli(command[0], "no-such-run", *command[1:])
    assert done.returncode == 2
    assert (
        one_line(done.stderr) == f"error: no run or job named 'no-such-run' in {finished.runs_dir}"
    )
    assert done.stdout == ""


def test_status_of_a_no_check_run_does_not_claim_zero_rows(tmp_path: Path) -> None:
    """After `submit --no-check` on JSONL (total unknown up front) status never says 0 rows."""
    make_job(tmp_path, rows(20))
    done = run_cli("submit", "job.toml", "--no-check", "--runs-dir", "runs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    info = run_cli("status", "t", "--json", "--runs-dir", "runs", cwd=tmp_path)
    assert json.loads(info.stdout)["total"] in (None, 20)
    text = run_cli("status", "t", "--runs-dir", "runs", cwd=tmp_path)
    assert text.returncode == 0, text.stderr
    assert "20 of 0 done" not in text.stdout


# -- report, query -----------------------------------------------------------------------


def parse_report(fmt: str, text: str) -> dict[str, dict[str, Any]]:
    """The overview and tokens sections of `runner report` as {section: {metric: value}}."""
    if fmt == "json":
        parsed = json.loads(text)
        return {
            "overview": {r["metric"]: r["value"] for r in parsed["overview"]},
            "tokens": {r["tokens"]: r["count"] for r in parsed["tokens"]},
        }
    if fmt == "csv":
        out: dict[str, dict[str, Any]] = {}
        for row in parse_csv(text):
            pairs = dict(p.split("=", 1) for p in row["values"].split(" ") if "=" in p)
            if row["section"] == "overview":
                out.setdefault("overview", {})[
                    row["values"].split("=", 1)[1].rsplit(" value=", 1)[0]
                ] = pairs.get("value")
            elif row["section"] == "tokens":
                out.setdefault("tokens", {})[
                    row["values"].split("=", 1)[1].rsplit(" count=", 1)[0]
                ] = pairs.get("count")
        return out
    out = {}
    for block in text.strip().split("\n\n"):
        title, _header, dashes, *lines = block.split("\n")
        # Column spans from the dashes line: cells may hold spaces.
        spans = [(m.start(), m.end()) for m in re.finditer(r"-+", dashes)]
        cells = [[line[a : (b if i < len(spans) - 1 else None)].strip() for i, (a, b) in
                  enumerate(spans)] for line in lines]  # fmt: skip
        out[title] = {c[0]: c[1].replace(",", "") for c in cells}
    return out


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_report_token_totals_are_the_sums_over_results(finished: Finished, fmt: str) -> None:
    """`runner report` in every format shows counts and token totals equal to the results' sums."""
    done = finished.cli("report", finished.run.run_id, "--format", fmt)
    assert done.returncode == 0, done.stderr
    info = parse_report(fmt, done.stdout)
    got = results(finished.run)
    overview = {
        "rows ok": ROWS,
        "rows failed": 0,
        "rows skipped": 0,
        "requests sent (retries included)": ROWS,
        "rows total": ROWS,
        "state": "completed",
        "run": finished.run.run_id,
    }
    tokens = {
        "prompt": sum(r["prompt_tokens"] for r in got),
        "completion": sum(r["completion_tokens"] for r in got),
        "total": sum(r["total_tokens"] for r in got),
    }
    assert {k: plain(info["overview"][k]) for k in overview} == {
        k: str(v) for k, v in overview.items()
    }
    assert {k: plain(info["tokens"][k]) for k in tokens} == {k: str(v) for k, v in tokens.items()}
    assert tokens["total"] == tokens["prompt"] + tokens["completion"]


QUERY = "SELECT row_id, status, prompt_tokens FROM results ORDER BY row_index"


@pytest.mark.parametrize("fmt", ["table", "csv", "json"])
def test_query_in_every_format(finished: Finished, fmt: str) -> None:
    """`runner query` prints the same rows the library's query returns, in every format."""
    done = finished.cli("query", finished.run.run_id, QUERY, "--format", fmt)
    assert done.returncode == 0, done.stderr
    if fmt == "csv":
        assert done.stdout.splitlines()[0] == "row_id,status,prompt_tokens"
    got = PARSERS[fmt](done.stdout)
    assert isinstance(got, list) and all(isinstance(r, dict) for r in got)
    with RunDB(finished.run) as db:
        names, expected = db.query(QUERY)
    assert len(expected) == ROWS
    assert [{k: plain(v) for k, v in r.items()} for r in got] == [
        {n: plain(v) for n, v in zip(names, row, strict=True)} for row in expected
    ]


def test_query_input_view_joins_results_on_row_index(finished: Finished) -> None:
    """The `input` view carries the input's columns and joins `results` on `row_index`."""
    sql = (
        "SELECT count(*) AS n, count(*) FILTER (i.id = r.row_id) AS same_id, "
        "count(DISTINCT i.topic) AS topics FROM input i JOIN results r ON r.row_index = i.row_index"
    )
    done = finished.cli("query", "cli", sql, "--format", "json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [{"n": ROWS, "same_id": ROWS, "topics": 3}]


@pytest.mark.parametrize(
    "sql",
    ["SELEC 1", "SELECT * FROM no_such_view", "SELECT no_such_column FROM results"],
)
def test_broken_query_exits_2_with_one_line(finished: Finished, sql: str) -> None:
    """A query DuckDB refuses exits 2 with one line starting `error: query failed`."""
    done = finished.cli("query", finished.run.run_id, sql)
    assert done.returncode == 2
    assert one_line(done.stderr).startswith("error: query failed")
    assert done.stdout == ""


# -- export ------------------------------------------------------------------------------


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


READERS: dict[str, Callable[[Path], list[dict[str, Any]]]] = {
    ".parquet": lambda path: pq.read_table(path).to_pylist(),
    ".jsonl": read_jsonl,
    ".csv": lambda path: parse_csv(path.read_text()),
}


@pytest.mark.parametrize("suffix", sorted(READERS))
def test_export_writes_input_and_answers_in_input_order(
    finished: Finished, tmp_path: Path, suffix: str
) -> None:
    """`runner export` writes input columns then answers, in input order, readable back."""
    out = tmp_path / f"out{suffix}"
    done = finished.cli("export", finished.run.run_id, str(out))
    assert done.returncode == 0, done.stderr
    assert one_line(done.stderr) == f"wrote {ROWS} rows to {out}"
    exported = READERS[suffix](out)
    assert list(exported[0])[:4] == ["id", "text", "topic", "row_id"]
    assert {"model", "status", "content", "prompt_tokens", "finish_reason"} <= set(exported[0])
    assert [r["id"] for r in exported] == [f"r{i}" for i in range(ROWS)]
    answers = {r["row_id"]: r for r in results(finished.run)}
    for row in exported:
        assert row["row_id"] == row["id"]
        assert row["status"] == "ok"
        assert row["content"] == answers[row["id"]]["content"]
        assert plain(row["prompt_tokens"]) == str(answers[row["id"]]["prompt_tokens"])
    assert not list(tmp_path.glob("*.tmp"))


def test_export_with_two_models_has_a_row_per_input_row_per_model(tmp_path: Path) -> None:
    """With a list of models, the export holds one row per input row per model, in input order."""
    text = spec_text().replace('model = "gpt-4o-mini"', 'model = ["gpt-4o-mini", "gpt-4o"]')
    write_rows(tmp_path / "data.jsonl", rows(10))
    write_spec(tmp_path, text)
    assert run_cli("submit", "job.toml", "--runs-dir", "runs", cwd=tmp_path).returncode == 0
    done = run_cli("export", "t", "out.parquet", "--runs-dir", "runs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    exported = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert len(exported) == 20 == len(results(only_run(tmp_path / "runs")))
    assert [r["id"] for r in exported] == [f"r{i // 2}" for i in range(20)]
    for i in range(0, 20, 2):
        assert {exported[i]["model"], exported[i + 1]["model"]} == {"gpt-4o-mini", "gpt-4o"}
    assert all(r["status"] == "ok" and r["content"] for r in exported)


def test_export_to_an_unknown_suffix_exits_2(finished: Finished, tmp_path: Path) -> None:
    """An output file type export does not know exits 2 with one line and writes nothing."""
    out = tmp_path / "out.xlsx"
    done = finished.cli("export", finished.run.run_id, str(out))
    assert done.returncode == 2
    assert one_line(done.stderr).startswith(f"error: {out}: unknown output type")
    assert list(tmp_path.iterdir()) == []


# -- resume ------------------------------------------------------------------------------


def test_resume_of_a_completed_run_sends_nothing(
    tmp_path: Path, simulator: SimulatorThread
) -> None:
    """Resuming a completed run sends no request, keeps every result and exits 0."""
    make_job(tmp_path, rows(20), base_url=simulator.base_url)
    assert run_cli("submit", "job.toml", "--runs-dir", "runs", cwd=tmp_path).returncode == 0
    run = only_run(tmp_path / "runs")
    sent = simulator.stats.requests
    assert sent == 20
    before = results(run)
    done = run_cli("resume", run.run_id, "--runs-dir", "runs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert simulator.stats.requests == sent
    assert any(
        line.startswith(f"run {run.run_id}: completed in ") for line in done.stderr.splitlines()
    )
    assert "0 ok, 0 failed, 0 skipped this session; 20 settled before" in done.stderr
    assert results(run) == before
    manifest = run.read_manifest()
    assert manifest["state"] == "completed" and len(manifest["sessions"]) == 2


# -- simulate, help, entry points --------------------------------------------------------


def test_simulate_serves_and_stops_on_sigterm() -> None:
    """`runner simulate --port 0` prints its URL, answers a completion, and exits on SIGTERM."""
    process = subprocess.Popen(
        [sys.executable, "-m", "runner", "simulate", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        found = re.fullmatch(r"simulator listening on (http://127\.0\.0\.1:(\d+)/v1)\n", line)
        assert found and int(found[2]) > 0, line
        body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hello"}]}
        request = urllib.request.Request(
            found[1] + "/chat/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            answer = json.load(response)
        assert answer["choices"][0]["message"]["content"]
        assert answer["usage"]["total_tokens"] > 0
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=5) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


def test_group_help_lists_every_command(tmp_path: Path) -> None:
    """`runner --help` exits 0 and lists every command."""
    done = run_cli("--help", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    commands = done.stdout.split("Commands:", 1)[1]
    assert sorted(line.split()[0] for line in commands.strip().splitlines()) == sorted(cli.commands)


ENTRY_POINTS = {
    "python -m runner": [sys.executable, "-m", "runner"],
    "console script": [str(Path(sys.executable).parent / "runner")],
}


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_entry_point_prints_the_version(entry: str, tmp_path: Path) -> None:
    """`--version` prints the installed package version, from either entry point."""
    done = subprocess.run(
        [*ENTRY_POINTS[entry], "--version"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith(f"version {metadata.version('runner')}")


@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_entry_point_runs_a_command(entry: str, finished: Finished) -> None:
    """Both entry points run a real command (`runs --format json`) the same way."""
    done = subprocess.run(
        [*ENTRY_POINTS[entry], "runs", "--format", "json", "--runs-dir", str(finished.runs_dir)],
        cwd=finished.folder,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert [r["run_id"] for r in json.loads(done.stdout)] == [finished.run.run_id]


# -- a model the server does not know ----------------------------------------------------


def test_unknown_model_stops_the_run_naming_it(tmp_path: Path) -> None:
    """A 404 model_not_found on the first answers stops the run (exit 3) in one line naming
    the model; no row is marked failed and the run stays resumable."""
    make_job(tmp_path, rows(30), endpoint_extra='simulator = { unknown_model = "gpt-4o-mini" }')
    done = run_cli("submit", "job.toml", "--runs-dir", "runs", cwd=tmp_path)
    assert done.returncode == 3, done.stderr
    (stop,) = [line for line in done.stderr.splitlines() if line.startswith("stopped")]
    assert "the server refused model 'gpt-4o-mini': 404 model_not_found" in stop
    assert "resume with: runner resume" in stop
    assert stop.endswith("; another model needs a new run (runner submit)")
    run = only_run(tmp_path / "runs")
    assert run.read_manifest()["state"] == "stopped"
    assert select(run, "SELECT count(*) AS n FROM results WHERE status = 'failed'") == [{"n": 0}]


def test_a_404_after_the_model_answered_fails_only_its_row(tmp_path: Path) -> None:
    """Once a model has answered, a 404 is that row's failure: the run completes (exit 1)."""
    make_job(tmp_path, rows(12, {8: "[[sim:404]]"}), concurrency=1)
    done = run_cli("submit", "job.toml", "--runs-dir", "runs", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    failed = [r for r in results(only_run(tmp_path / "runs")) if r["status"] == "failed"]
    assert [(r["row_id"], r["http_status"], r["error_type"]) for r in failed] == [
        ("r8", 404, "model_not_found")
    ]


def test_runs_counts_a_run_while_it_is_going(tmp_path: Path) -> None:
    """`runner runs` shows the live counts of a running run (its manifest has none yet)."""
    from .conftest import start_runner
    from .test_resume import wait_for_results

    make_job(tmp_path, rows(200), endpoint_extra="simulator = { latency_ms = 200 }", concurrency=4)
    proc = start_runner(tmp_path, "submit", "job.toml")
    try:
        assert proc.stderr is not None
        first = proc.stderr.readline()  # "run ID: PATH", once the run folder exists
        run_id = first.split()[1].rstrip(":")
        wait_for_results(tmp_path / "runs" / run_id, at_least=8)
        done = run_cli("runs", "--format", "json", "--runs-dir", "runs", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        (row,) = json.loads(done.stdout)
        assert row["state"] == "running"
        assert 8 <= row["ok"] < 200 and row["failed"] == 0
        assert row["total"] in (None, 200)  # known once the input check has ended
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert proc.returncode == 3


def test_resume_summary_counts_the_cost_of_every_session(
    tmp_path: Path, simulator: SimulatorThread
) -> None:
    """After a resume the summary's cost is the run's (all sessions), this session's apart."""
    marked = dict.fromkeys((2, 7, 11), "[[sim:fail_first=1]]")
    make_job(tmp_path, rows(20, marked), base_url=simulator.base_url, run_extra="max_attempts = 1")
    assert run_cli("submit", "job.toml", "--runs-dir", "runs", cwd=tmp_path).returncode == 1
    run = only_run(tmp_path / "runs")
    first = run.read_manifest()["cost_usd"]
    done = run_cli("resume", run.run_id, "--retry-failed", "--runs-dir", "runs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    total = run.read_manifest()["cost_usd"]
    assert total > first > 0
    (line,) = [x for x in done.stderr.splitlines() if x.startswith("  cost      ")]
    found = re.fullmatch(
        r"  cost      \$([\d.]+) over all sessions \(\$([\d.]+) this session\), "
        r"estimated from tokens at price-table prices",
        line,
    )
    assert found, line
    assert float(found[1]) == pytest.approx(total, rel=0.05)
    assert float(found[2]) == pytest.approx(total - first, rel=0.05)


@pytest.mark.parametrize("fmt", ["table", "json"])
def test_report_labels_are_never_cut_off_a_terminal(finished: Finished, fmt: str) -> None:
    """Piped (no terminal to fit) or as JSON, the report's labels are whole."""
    done = finished.cli("report", finished.run.run_id, "--format", fmt)
    assert done.returncode == 0, done.stderr
    label = "failed attempts sent without a usable answer (timeouts, drops, 5xx)"
    assert label in done.stdout
    assert "..." not in done.stdout


# -- rendering, in process (the screens themselves are in tests/test_screens.py) ---------


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        (1.3e-05, "$0.000013"),
        (0.0, "$0.00"),
        (0.012345, "$0.0123"),
        (1234.567, "$1,234.57"),
        (None, "unpriced"),
        (-0.5, "-$0.5000"),
    ],
)
def test_money_is_for_people(value: float | None, shown: str) -> None:
    """Dollars never in scientific notation; tiny amounts keep two significant digits."""
    from runner.screens import money

    assert money(value) == shown


@pytest.mark.parametrize(
    ("value", "shown"),
    [(1.3e-05, "0.000013"), (1234.5, "1,234.5"), (3.0, "3"), (0.25, "0.25"), (2e7, "20,000,000")],
)
def test_numbers_are_for_people(value: float, shown: str) -> None:
    """Floats in tables never use scientific notation."""
    from runner.screens import number

    assert number(value) == shown


def test_table_fits_a_narrow_terminal_by_cutting_the_widest_text_only() -> None:
    """Numbers are right-aligned and never cut; the widest text column is cut to fit."""
    from runner.screens import table

    rows = [("a" * 70, 1_234_567, 0.5), ("short", 3, 1.3e-05)]
    wide = table(["label", "count", "cost_usd"], rows).splitlines()
    assert wide[2].startswith("a" * 70)
    assert wide[3].endswith("        3  0.000013")
    narrow = table(["label", "count", "cost_usd"], rows, 60).splitlines()
    assert all(len(line) <= 60 for line in narrow)
    assert narrow[2].split()[1:] == ["1,234,567", "0.500000"]
    assert narrow[2].split()[0].endswith("...")


@pytest.mark.parametrize("width", [40, 79, 159])
def test_progress_lines_fit_the_width(width: int) -> None:
    """Both progress lines fit the width at any count; whole fields are left out, never cut."""
    from runner.records import Progress
    from runner.screens import ProgressRenderer

    renderer = ProgressRenderer("t")
    renderer.models = 2
    progress = Progress(rows_total=6_000_000, rows_done_before=1_000_000, ok=123_456)
    progress.failed, progress.retrying, progress.concurrency = 7_890, 12, 2_048
    progress.cost_usd, progress.requests, progress.prompt_tokens = 123.45, 200_000, 9_999_999
    status = renderer.status(progress, width)
    assert len(status) <= width and status.startswith("  ok 1,123,456  failed 7,890")
    assert not status.endswith(" ")
    bar = renderer.bar(progress, width)
    assert len(bar) == width and "answers" in bar
    progress.rows_total = None
    assert renderer.bar(progress, width).startswith("  1,131,346 answers [")


def test_the_command_line_never_imports_numpy_unless_ray_needs_it(tmp_path: Path) -> None:
    """numpy is installed here (pandas brings it) and pyarrow would import it: ~190 ms of a
    command's CPU. The `runner` command blocks it; `--ray` (Ray needs numpy) and a process
    that imported it first keep it."""
    probe = (
        "import sys\n"
        "from runner.cli import main\n"
        "sys.argv = ['runner', *sys.argv[1:]]\n"
        "try:\n"
        "    main()\n"
        "except SystemExit:\n"
        "    pass\n"
        "import pyarrow.parquet\n"
        "print(sys.modules.get('numpy') is not None)\n"
    )
    runs = str(tmp_path / "runs")

    def numpy_loaded(*args: str, first: str = "") -> str:
        done = subprocess.run(
            [sys.executable, "-c", first + probe, *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.strip().splitlines()[-1]

    assert numpy_loaded("runs", "--runs-dir", runs) == "False"
    assert numpy_loaded("runs", "--runs-dir", runs, first="import numpy\n") == "True"
    from runner import tuning

    before = sys.modules.get("numpy")
    tuning.skip_numpy(["submit", "job.toml", "--ray"])
    assert sys.modules.get("numpy") is before

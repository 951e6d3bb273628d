"""The Python API: runs started, resumed and read from Python leave the run folders the
command line knows, inside a running event loop too, and a DataFrame input outlives its
process. Answers are checked by the digest of its own request the simulator puts in each.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import tomllib
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import runner
from runner import api
from runner.api import session
from runner.engine import job
from runner.sim.answers import request_tag
from runner.sim.server import SimulatorConfig, SimulatorThread

from .conftest import ROOT, run_cli, spec_text, write_rows, write_spec
from .test_resume import wait_for_results

MODEL = "gpt-4o-mini"
SYSTEM = 'You answer in one "line".\nNo more.'


@pytest.fixture
def sim() -> Iterator[SimulatorThread]:
    with SimulatorThread(SimulatorConfig(latency_ms=5)) as s:
        yield s


def rows(count: int) -> list[dict[str, Any]]:
    """Ids counting down, so that input order is neither id order nor text order."""
    return [{"id": f"r{count - i:03d}", "text": f"Row {i}: what is {i} * 7?"} for i in range(count)]


def tag(text: str, system: str | None = None) -> str:
    """The digest the simulator writes into its answer to this prompt."""
    messages = [{"role": "user", "content": text}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    return f"[req {request_tag(MODEL, messages)}]"


def assert_answers(run: runner.Run, data: list[dict[str, Any]], system: str | None = None) -> None:
    """One row per input row, in input order, each with the answer to its own prompt."""
    got = run.results().to_pylist()
    assert [r["id"] for r in got] == [d["id"] for d in data]
    for row, want in zip(got, data, strict=True):
        assert row["row_id"] == want["id"] and row["status"] == "ok", row
        assert tag(want["text"], system) in row["content"], (row, want)


def as_json(value: Any) -> Any:
    """A value as `runner ... --format json` prints it."""
    return json.loads(json.dumps(value, default=str))


# -- starting runs -------------------------------------------------------------------------


def test_submit_runs_a_toml_spec_and_returns_the_run(tmp_path: Path, sim: SimulatorThread) -> None:
    """runner.submit() on a spec file blocks until the run ends and returns it completed."""
    data = rows(30)
    write_rows(tmp_path / "data.jsonl", data)
    spec = write_spec(tmp_path, spec_text(base_url=sim.base_url, name="summaries"))
    run = runner.submit(spec, runs_dir=tmp_path / "runs", progress=False)
    assert run.state == "completed" and run.id.startswith("summaries-")
    assert run.outcome is not None and run.outcome.progress.ok == 30
    assert run.path == tmp_path / "runs" / run.id
    assert_answers(run, data)
    assert sim.stats.requests == 30


def frame(data: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(data)


def table(data: list[dict[str, Any]]) -> pa.Table:
    return pa.Table.from_pylist(data)


class ArrowStream:
    """Any object that exports an Arrow C stream (as polars' DataFrame does)."""

    def __init__(self, data: list[dict[str, Any]]) -> None:
        self.table = pa.Table.from_pylist(data)

    def __arrow_c_stream__(self, requested_schema: object = None) -> object:
        return self.table.__arrow_c_stream__(requested_schema)


@pytest.mark.parametrize("make", [frame, table, ArrowStream], ids=["pandas", "pyarrow", "stream"])
def test_run_writes_an_in_memory_table_into_the_run_folder(
    tmp_path: Path, sim: SimulatorThread, make: Any
) -> None:
    """A pandas DataFrame, a pyarrow Table or an Arrow stream is answered row by row in input
    order, and becomes the run's own input.parquet, which its frozen spec points at."""
    data = rows(40)
    run = runner.run(
        make(data),
        model=MODEL,
        prompt_column="text",
        id_column="id",
        system=SYSTEM,
        base_url=sim.base_url,
        concurrency=8,
        max_tokens=32,
        temperature=0.5,
        runs_dir=tmp_path / "runs",
        name="frames",
        progress=False,
    )
    assert run.state == "completed"
    assert_answers(run, data, SYSTEM)
    assert pq.read_table(run.path / "input.parquet").to_pylist() == data
    for path in [run.path, *run.path.rglob("*")]:
        assert path.stat().st_mode & 0o077 == 0, f"{path} is open to others"
    frozen = tomllib.loads((run.path / "job.toml").read_text())
    assert frozen["input"]["path"] == "input.parquet"
    assert frozen["input"]["system"] == SYSTEM
    assert frozen["request"] == {"model": MODEL, "max_tokens": 32, "temperature": 0.5}
    assert frozen["run"]["concurrency"] == 8
    assert "key" not in (run.path / "job.toml").read_text().lower()


def test_run_takes_a_file_path_in_place(tmp_path: Path, sim: SimulatorThread) -> None:
    """A path is read where it is (not copied); the job is named after the file; extra spec
    settings go in through `spec`."""
    data = rows(25)
    source = write_rows(tmp_path / "prompts.csv", data)
    run = runner.run(
        source,
        model=MODEL,
        prompt_column="text",
        id_column="id",
        base_url=sim.base_url,
        runs_dir=tmp_path / "runs",
        spec={"request": {"seed": 7}, "run": {"max_attempts": 2}},
        progress=False,
    )
    assert run.id.startswith("prompts-")
    assert not (run.path / "input.parquet").exists()
    frozen = tomllib.loads((run.path / "job.toml").read_text())
    assert frozen["input"]["path"] == str(source.resolve())
    assert frozen["request"]["seed"] == 7 and frozen["run"]["max_attempts"] == 2
    assert_answers(run, data)


@pytest.mark.anyio
async def test_blocking_calls_work_inside_a_running_event_loop(
    tmp_path: Path, sim: SimulatorThread
) -> None:
    """As in Jupyter, where a loop is running: submit() and run() block, run the job on a
    loop of their own in a worker thread, and return the Run."""
    asyncio.get_running_loop()  # the premise
    data = rows(20)
    write_rows(tmp_path / "data.jsonl", data)
    spec = write_spec(tmp_path, spec_text(base_url=sim.base_url))
    run = runner.submit(spec, runs_dir=tmp_path / "runs", progress=False)
    assert run.state == "completed"
    assert_answers(run, data)
    again = runner.run(
        frame(data),
        model=MODEL,
        prompt_column="text",
        id_column="id",
        base_url=sim.base_url,
        runs_dir=tmp_path / "runs",
        progress=False,
    )
    assert again.state == "completed"
    assert_answers(again, data)


@pytest.mark.anyio
async def test_async_variants_run_in_the_callers_loop(tmp_path: Path, sim: SimulatorThread) -> None:
    """submit_async, run_async and resume_async await the run in the running loop."""
    data = rows(20)
    write_rows(tmp_path / "data.jsonl", data)
    spec = write_spec(tmp_path, spec_text(base_url=sim.base_url))
    runs = tmp_path / "runs"
    run = await runner.submit_async(spec, runs_dir=runs, progress=False)
    assert run.state == "completed"
    assert_answers(run, data)
    made = await runner.run_async(
        table(data),
        model=MODEL,
        prompt_column="text",
        id_column="id",
        base_url=sim.base_url,
        runs_dir=runs,
        progress=False,
    )
    assert_answers(made, data)
    sent = sim.stats.requests
    again = await runner.resume_async(made.id, runs_dir=runs, progress=False)
    assert again.state == "completed" and sim.stats.requests == sent  # nothing left to send


def test_the_notebook_progress_bar_draws_no_terminal_escapes(
    tmp_path: Path, sim: SimulatorThread, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """In a notebook the progress is one tqdm.auto bar ending at the row count: no cursor
    movement, which a notebook would print as text."""
    monkeypatch.setattr(session, "_in_notebook", lambda: True)
    data = rows(12)
    runner.run(
        table(data),
        model=MODEL,
        prompt_column="text",
        base_url=sim.base_url,
        runs_dir=tmp_path / "runs",
    )
    err = capsys.readouterr().err
    assert "12/12" in err and "ok 12" in err, err
    assert "\x1b[" not in err, err


# -- reading runs --------------------------------------------------------------------------


@pytest.fixture
def finished(tmp_path: Path, sim: SimulatorThread) -> runner.Run:
    """A completed run of 30 rows, one of which failed for good (its prompt is over
    input.max_prompt_tokens, so it was never sent)."""
    data = rows(30)
    data[3]["text"] = "x" * 400  # over max_prompt_tokens: fails without being sent
    return runner.run(
        table(data),
        model=MODEL,
        prompt_column="text",
        id_column="id",
        base_url=sim.base_url,
        runs_dir=tmp_path / "runs",
        name="finished",
        spec={"input": {"max_prompt_tokens": 50}},
        progress=False,
    )


def test_report_and_status_are_the_cli_figures(tmp_path: Path, finished: runner.Run) -> None:
    """run.report() holds what `runner report --format json` prints, and run.status() what
    `runner status --json` prints."""
    runs = str(tmp_path / "runs")
    printed = run_cli("report", finished.id, "--runs-dir", runs, "--format", "json", cwd=tmp_path)
    assert printed.returncode == 0, printed.stderr
    report = finished.report()
    assert as_json(report.tables) == json.loads(printed.stdout)
    assert report.overview["rows ok"] == 29 and report.overview["rows failed"] == 1
    assert report.tokens["prompt"] == finished.status().prompt_tokens
    assert [(r["model"], r["rows"], r["uncosted_rows"]) for r in report.cost] == [(MODEL, 30, 1)]
    by_model = finished.report(by="model").tables["by model"]
    assert [r["model"] for r in by_model] == [MODEL] and by_model[0]["rows"] == 30
    shown = run_cli("status", finished.id, "--runs-dir", runs, "--json", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    status = json.loads(shown.stdout)
    assert as_json(vars_of(finished.status())) == status
    assert finished.status().done == 30


def vars_of(status: runner.Status) -> dict[str, Any]:
    return {name: getattr(status, name) for name in status.__dataclass_fields__}


def test_query_is_the_cli_sandbox_and_returns_arrow(finished: runner.Run) -> None:
    """run.query() returns an Arrow table; SQL that reaches outside the run is refused."""
    got = finished.query(
        "SELECT row_id, status, prompt_tokens FROM results ORDER BY row_index LIMIT 5"
    )
    assert isinstance(got, pa.Table) and got.column_names == ["row_id", "status", "prompt_tokens"]
    assert got.column("row_id").to_pylist() == ["r030", "r029", "r028", "r027", "r026"]
    assert got.schema.field("prompt_tokens").type == pa.int64()
    assert finished.query("SELECT * FROM results WHERE false").num_rows == 0
    with pytest.raises(runner.UsageError, match="query refused"):
        finished.query("SELECT * FROM read_csv('/etc/passwd')")
    with pytest.raises(runner.UsageError, match="only a SELECT"):
        finished.query("COPY results TO 'out.csv'")


def test_export_and_results_agree(tmp_path: Path, finished: runner.Run) -> None:
    """run.export() writes what run.results() returns; an existing file is refused."""
    out = tmp_path / "out.parquet"
    assert finished.export(out) == 30
    assert pq.read_table(out).equals(finished.results())
    with pytest.raises(runner.UsageError, match="exists"):
        finished.export(out)
    lean = finished.results(with_input=False)
    assert "text" not in lean.column_names
    assert lean.column("row_id").to_pylist() == finished.results().column("row_id").to_pylist()


def test_open_finds_runs_by_id_folder_and_job_name(tmp_path: Path, finished: runner.Run) -> None:
    """runner.open() takes what `runner status` takes; runner.runs() lists them all."""
    runs = tmp_path / "runs"
    for ref in (finished.id, finished.path, "finished"):
        assert runner.open(ref, runs_dir=runs).id == finished.id
    assert [r.id for r in runner.runs(runs_dir=runs)] == [finished.id]
    assert "completed" in repr(finished)
    again = finished.resume(progress=False)  # nothing left but the failed row, kept failed
    assert again.id == finished.id and again.state == "completed"
    assert again.outcome is not None and again.outcome.progress.requests == 0


# -- errors --------------------------------------------------------------------------------


def test_errors_are_the_documented_exceptions(tmp_path: Path, sim: SimulatorThread) -> None:
    """An unknown run, a missing column, an unset key variable, a bad setting and data of
    the wrong kind fail before anything is sent, naming what is wrong; no run is left."""
    runs = tmp_path / "runs"
    with pytest.raises(runner.RunNotFound, match="no run or job named 'nope'"):
        runner.open("nope", runs_dir=runs)
    with pytest.raises(runner.RunNotFound):
        runner.resume("nope", runs_dir=runs, progress=False)
    base = {"model": MODEL, "base_url": sim.base_url, "runs_dir": runs, "progress": False}
    with pytest.raises(runner.InputError) as missing:
        runner.run(frame(rows(3)), prompt_column="txt", **base)
    assert str(missing.value) == "the pandas DataFrame: no column 'txt' (columns: id, text)"
    with pytest.raises(runner.SpecError) as unset:
        runner.run(frame(rows(3)), prompt_column="text", api_key_env="NO_SUCH_KEY_VAR", **base)
    assert str(unset.value) == (
        "runner.run(): endpoint.api_key_env: environment variable NO_SUCH_KEY_VAR is not set"
    )
    with pytest.raises(runner.SpecError, match=r"^runner.run\(\): request.temperature: must be"):
        runner.run(frame(rows(3)), prompt_column="text", temperature=5, **base)
    with pytest.raises(runner.SpecError, match="exactly one of prompt_column"):
        runner.run(frame(rows(3)), **base)
    with pytest.raises(runner.InputError, match=r"prompts\.parquet: no such file"):
        runner.run(tmp_path / "prompts.parquet", prompt_column="text", **base)
    with pytest.raises(TypeError, match="takes a pandas or polars DataFrame"):
        runner.run([{"text": "a list"}], prompt_column="text", **base)
    assert issubclass(runner.SpecError, runner.UsageError)
    assert issubclass(runner.UsageError, runner.RunnerError)
    assert runner.runs(runs_dir=runs) == [] and not any(runs.glob("*/job.toml"))
    assert sim.stats.requests == 0


# Any text a file can hold (lone surrogates cannot be written as UTF-8).
TEXT = st.text(alphabet=st.characters(blacklist_categories=["Cs"]))


@settings(max_examples=200, deadline=None)
@given(
    text=TEXT,
    number=st.floats(allow_nan=False) | st.integers(-(2**63), 2**63 - 1),
    key=TEXT.filter(bool),
    flag=st.booleans(),
)
def test_spec_toml_reads_back_as_written(text: str, number: float, key: str, flag: bool) -> None:
    """Any string (quotes, newlines, control characters, DEL), number and key survives the
    frozen spec's TOML."""
    spec = {"name": "t", "input": {"system": text, key: [number, flag]}, "run": {"x": {key: text}}}
    assert tomllib.loads(api.spec_toml(spec)) == spec


# -- interrupts, kills and the command line ------------------------------------------------

SCRIPT = """
import asyncio, sys
import anyio
import pandas as pd
import runner

df = pd.DataFrame({{"id": [f"r{{i}}" for i in range({count})],
                   "text": [f"Row {{i}}: tell me about {{i}}." for i in range({count})]}})

def start():
    return runner.run(df, model="gpt-4o-mini", prompt_column="text", id_column="id",
                      base_url="{url}", concurrency={concurrency}, name="nb", runs_dir="runs",
                      progress=False)

async def in_a_running_loop():
    try:
        start()
    except KeyboardInterrupt as exc:
        print("KeyboardInterrupt", *exc.__notes__, flush=True)
        sys.exit(3)

if sys.argv[1] == "loop":
    # As a notebook runs a cell: a running loop, and SIGINT raises KeyboardInterrupt.
    asyncio.new_event_loop().run_until_complete(in_a_running_loop())
else:
    start()
"""


def start_script(
    tmp_path: Path, sim: SimulatorThread, mode: str, count: int, concurrency: int
) -> subprocess.Popen[str]:
    """The script above as a child process in tmp_path: `plain` or in a running `loop`."""
    script = SCRIPT.format(count=count, url=sim.base_url, concurrency=concurrency)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), mode],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def the_run_dir(tmp_path: Path, proc: subprocess.Popen[str]) -> Path:
    """The run folder the child process made (once it has a manifest)."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # a test-side wait on another process's files
        found = list((tmp_path / "runs").glob("*/manifest.json"))
        if found:
            return found[0].parent
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    raise AssertionError("no run folder")


def test_a_dataframe_run_killed_with_9_is_resumed_from_its_own_input(tmp_path: Path) -> None:
    """kill -9 of a process running runner.run(df): the DataFrame is gone with it, and
    runner.resume() finishes the run from the run folder: every row once, nothing re-bought
    beyond what was in flight at the kill."""
    # 8 x 50 ms: ~160 rows a second; the kill lands after 100, seconds before the end.
    count, concurrency = 800, 8
    with SimulatorThread(SimulatorConfig(latency_ms=50, jitter_ms=10)) as sim:
        proc = start_script(tmp_path, sim, "plain", count, concurrency)
        run_dir = the_run_dir(tmp_path, proc)
        wait_for_results(run_dir, at_least=100, timeout=60)
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=10)
        assert runner.open(run_dir.name, runs_dir=tmp_path / "runs").state == "interrupted"
        run = runner.resume(run_dir.name, runs_dir=tmp_path / "runs", progress=False)
        stats = sim.stats
    assert run.state == "completed"
    got = run.results().to_pylist()
    assert [r["id"] for r in got] == [f"r{i}" for i in range(count)]
    assert len({r["row_id"] for r in got}) == count
    for r in got:
        assert r["status"] == "ok" and tag(r["text"]) in r["content"], r
    # On the wire at the kill, plus answers received and not yet journaled (one a worker).
    assert stats.resent_after_ok <= 2 * concurrency
    sessions = json.loads((run_dir / "manifest.json").read_text())["sessions"]
    assert [s["outcome"] for s in sessions] == ["crashed", "completed"]
    assert sessions[0]["unanswered_at_crash"] >= stats.resent_after_ok


def test_keyboardinterrupt_in_a_running_loop_stops_cleanly_and_the_cli_resumes(
    tmp_path: Path,
) -> None:
    """In a running loop (a notebook), SIGINT while runner.run() waits drains the run and
    raises KeyboardInterrupt saying how to resume; `runner resume/status/report` then work
    on that run started from Python, and nothing is bought twice."""
    # 8 x 50 ms: ~160 rows a second; SIGINT lands after 50, seconds before the end.
    count, concurrency = 600, 8
    runs = str(tmp_path / "runs")
    with SimulatorThread(SimulatorConfig(latency_ms=50, jitter_ms=10)) as sim:
        proc = start_script(tmp_path, sim, "loop", count, concurrency)
        run_dir = the_run_dir(tmp_path, proc)
        wait_for_results(run_dir, at_least=50, timeout=60)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 3, (out, err)
        run_id = run_dir.name
        assert out.strip() == (
            f"KeyboardInterrupt run {run_id} stopped cleanly (stopped); "
            f"continue it with runner.resume({run_id!r})"
        ), err
        manifest = json.loads((run_dir / "manifest.json").read_text())
        assert manifest["state"] == "stopped"
        assert manifest["sessions"][0]["stop_reason"] == "interrupted"
        resumed = run_cli("resume", run_id, "--runs-dir", runs, cwd=tmp_path)
        assert resumed.returncode == 0, resumed.stderr
        stats = sim.stats
    assert stats.resent_after_ok == 0  # a clean stop leaves nothing in doubt
    assert stats.ok == count
    status = run_cli("status", run_id, "--runs-dir", runs, "--json", cwd=tmp_path)
    assert json.loads(status.stdout)["state"] == "completed"
    assert json.loads(status.stdout)["ok"] == count
    report = run_cli("report", "nb", "--runs-dir", runs, "--format", "json", cwd=tmp_path)
    assert json.loads(report.stdout) == as_json(runner.open("nb", runs_dir=runs).report().tables)


def test_run_is_the_api_function() -> None:
    """`runner.run` is the API's function, whatever of the package was imported before (no
    subpackage of runner/ is named after a function of the API)."""
    import runner.engine.job

    assert runner.run is runner.api.run
    assert "prompt_column" in str(inspect.signature(runner.run))
    api_names = set(runner.__all__)
    packages = {p.parent.name for p in (ROOT / "runner").glob("*/__init__.py")}
    assert not api_names & packages


def test_the_readme_example_calls_the_api_as_it_is() -> None:
    """The README's Python API example parses, and every function and keyword it uses exists
    with that name (`runner.run`'s and the Run's)."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Python API", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    tree = ast.parse(block)
    called = [n for n in ast.walk(tree) if isinstance(n, ast.Call)]
    used = {
        (n.func.value.id, n.func.attr): [k.arg for k in n.keywords]
        for n in called
        if isinstance(n.func, ast.Attribute) and isinstance(n.func.value, ast.Name)
    }
    assert {
        ("runner", "submit"),
        ("runner", "run"),
        ("runner", "resume"),
        ("runner", "open"),
    } <= set(used)
    for (owner, name), keywords in used.items():
        if owner == "runner":
            target = getattr(runner.api, name)
        elif owner == "run":
            target = getattr(runner.Run, name)
        else:
            continue
        assert set(keywords) <= set(inspect.signature(target).parameters), (name, keywords)


def test_a_call_from_another_thread_runs_on_a_loop_of_its_own(
    tmp_path: Path, sim: SimulatorThread
) -> None:
    """Outside the main thread (no signal handlers there) a blocking call still runs."""
    data = rows(10)
    with ThreadPoolExecutor(1) as pool:
        run = pool.submit(
            runner.run,
            table(data),
            model=MODEL,
            prompt_column="text",
            id_column="id",
            base_url=sim.base_url,
            runs_dir=tmp_path / "runs",
            progress=False,
        ).result(timeout=60)
    assert run.state == "completed"
    assert_answers(run, data)


@pytest.mark.parametrize("stops", [1, 2])
def test_a_stop_switch_drains_once_and_cuts_on_the_second_request(
    tmp_path: Path, stops: int
) -> None:
    """What a notebook's interrupt does to a session in a worker thread: one request lets the
    requests in flight finish (every one answered and kept), two cut them at once."""
    data = rows(200)
    write_rows(tmp_path / "data.jsonl", data)
    with SimulatorThread(SimulatorConfig(latency_ms=400)) as slow:
        spec = write_spec(tmp_path, spec_text(base_url=slow.base_url, concurrency=8))
        switch = job.StopSwitch()
        signalled: list[bool] = []

        def stop_when_in_flight(progress: Any) -> None:
            # From the session's own thread, as a hook does: a stop it asks for still counts.
            if progress.in_flight >= 8 and not switch.requests:
                for _ in range(stops):
                    switch.request()

        async def main() -> job.Outcome:
            return await job.submit(
                job.prepare(spec),
                tmp_path / "runs",
                handle_signals=False,
                stop_switch=switch,
                on_progress=stop_when_in_flight,
                on_signal=lambda first, grace: signalled.append(first),
            )

        outcome = anyio.run(main)
        stats = slow.stats
    assert outcome.state == "stopped" and outcome.stop_reason == "interrupted"
    assert signalled == [True, False][:stops]
    assert switch.requests == stops
    if stops == 1:
        assert outcome.progress.ok == stats.ok >= 8  # the drained ones were kept
    else:
        assert outcome.progress.ok < stats.requests  # cut while on the wire
    assert outcome.progress.ok + outcome.progress.failed < len(data)


def test_a_relative_ca_bundle_is_the_callers_and_resumes_from_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over real TLS: `ca_bundle` relative to the working folder is frozen as an absolute
    path (a frozen spec's paths are relative to the run's folder), so the run trusts the
    same CA in its session and in a resume from another folder."""
    from runner.sim.http import make_test_certificate, server_tls

    ca, cert, key = make_test_certificate(tmp_path / "pki")
    monkeypatch.chdir(tmp_path)
    data = rows(10)
    with SimulatorThread(SimulatorConfig(), tls=server_tls(str(cert), str(key))) as tls_sim:
        run = runner.run(
            table(data),
            model=MODEL,
            prompt_column="text",
            id_column="id",
            base_url=tls_sim.base_url,
            spec={"endpoint": {"ca_bundle": str(ca.relative_to(tmp_path))}},
            runs_dir="runs",
            progress=False,
        )
        assert run.state == "completed"
        frozen = tomllib.loads((run.path / "job.toml").read_text())
        assert frozen["endpoint"]["ca_bundle"] == str(ca)
        monkeypatch.chdir(run.path)
        again = runner.resume(run.path.resolve(), retry_failed=True, progress=False)
    assert again.state == "completed"
    assert_answers(again, data)


def test_a_relative_output_schema_is_the_callers(
    tmp_path: Path, sim: SimulatorThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    """[output] schema given relative to the working folder is frozen as an absolute path,
    and the answers are checked against it."""
    (tmp_path / "ticket.json").write_text((ROOT / "jobs" / "extract.schema.json").read_text())
    monkeypatch.chdir(tmp_path)
    lines = (ROOT / "sample_data" / "tickets.jsonl").read_text().splitlines()
    tickets = [json.loads(line) for line in lines[:8]]
    run = runner.run(
        table(tickets),
        model=MODEL,
        id_column="id",
        template="Extract the fields of this support ticket.\n\n{text}",
        base_url=sim.base_url,
        max_tokens=300,
        runs_dir="runs",
        spec={
            "request": {"response_format": {"type": "json_schema", "json_schema": {"name": "t"}}},
            "output": {"schema": "ticket.json"},
        },
        progress=False,
    )
    frozen = tomllib.loads((run.path / "job.toml").read_text())
    assert frozen["output"]["schema"] == str(tmp_path / "ticket.json")
    assert run.state == "completed" and run.status().ok == len(tickets)


def _loop_module_of_a_session() -> str:
    """The module of the event loop `session.blocking` runs a session on."""
    seen: list[str] = []

    async def start(hooks: dict[str, Any]) -> job.Outcome:
        seen.append(type(asyncio.get_running_loop()).__module__)
        raise RuntimeError("stop here")  # the loop is all this test wants

    with pytest.raises(RuntimeError, match="stop here"):
        session.blocking(start, None)  # type: ignore[arg-type]
    return seen[0]


@pytest.mark.parametrize("where", ["main thread", "worker thread"])
def test_a_session_runs_on_uvloop_unless_asked_for_asyncio(
    where: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run's loop is uvloop (runner/tuning.py loop_options), on the main thread and on the
    worker thread a call from a thread or a running loop gets; RUNNER_EVENT_LOOP=asyncio
    keeps asyncio's own."""
    pytest.importorskip("uvloop")

    def check() -> tuple[str, str]:
        monkeypatch.delenv("RUNNER_EVENT_LOOP", raising=False)
        default = _loop_module_of_a_session()
        monkeypatch.setenv("RUNNER_EVENT_LOOP", "asyncio")
        plain = _loop_module_of_a_session()
        return default, plain

    if where == "main thread":
        default, plain = check()
    else:
        with ThreadPoolExecutor(1) as pool:
            default, plain = pool.submit(check).result(timeout=60)
    assert default.startswith("uvloop")
    assert plain.startswith("asyncio")

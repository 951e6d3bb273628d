"""`runner resume RUN --spec FILE`: an edited endpoint, [run] or [prices] is taken and
recorded per session; a change to what is sent is refused naming the field (real processes)."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from runner.store.state import RunDir

from .conftest import run_cli, select, spec_text, write_rows, write_spec

ROWS = 30


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


def rows() -> list[dict[str, Any]]:
    return [{"id": f"r{i}", "text": f"Question {i}?"} for i in range(ROWS)]


def the_run(tmp_path: Path) -> RunDir:
    (path,) = [p for p in (tmp_path / "runs").iterdir() if (p / "manifest.json").exists()]
    return RunDir(path)


def stop_a_run(tmp_path: Path) -> RunDir:
    """A run that stopped (exit 3) on an endpoint nothing listens on; nothing was answered."""
    write_rows(tmp_path / "data.jsonl", rows())
    spec = write_spec(
        tmp_path,
        spec_text(base_url=f"http://127.0.0.1:{closed_port()}/v1", run_extra="max_attempts = 2"),
    )
    first = run_cli("submit", str(spec), "--runs-dir", "runs", cwd=tmp_path)
    assert first.returncode == 3, first.stderr
    run = the_run(tmp_path)
    # The stop says how to carry on once the endpoint is fixed.
    assert f"runner resume {run.run_id} --spec" in first.stderr, first.stderr
    return run


@pytest.fixture
def stopped(tmp_path: Path) -> RunDir:
    """A stopped run of this test's own."""
    return stop_a_run(tmp_path)


@pytest.fixture(scope="module")
def refused_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, RunDir]:
    """One stopped run shared by the tests whose resume is refused (they change nothing)."""
    folder = tmp_path_factory.mktemp("refused")
    return folder, stop_a_run(folder)


def test_resume_with_fixed_endpoint_finishes_every_row_once(
    tmp_path: Path, stopped: RunDir, sim_factory: Any
) -> None:
    """A resume with a corrected base_url and concurrency answers every row exactly once and
    records which session used which endpoint and settings."""
    sim = sim_factory()
    fixed = write_spec(
        tmp_path,
        spec_text(base_url=sim.base_url, concurrency=4, run_extra="max_attempts = 3"),
        name="fixed.toml",
    )
    plain = run_cli("resume", stopped.run_id, "--runs-dir", "runs", cwd=tmp_path)
    assert plain.returncode == 3, plain.stderr  # the frozen spec still points at the dead port
    second = run_cli(
        "resume", stopped.run_id, "--spec", str(fixed), "--runs-dir", "runs", cwd=tmp_path
    )
    assert second.returncode == 0, second.stderr
    found = select(stopped, "SELECT row_id, count(*) AS n FROM results GROUP BY row_id")
    assert sorted(r["row_id"] for r in found) == sorted(f"r{i}" for i in range(ROWS))
    assert all(r["n"] == 1 for r in found)
    assert sim.stats.ok == ROWS
    manifest = stopped.read_manifest()
    sessions = [s["settings"] for s in manifest["sessions"]]
    assert [s["endpoint"]["base_url"] for s in sessions[:2]] == [
        sessions[0]["endpoint"]["base_url"]
    ] * 2
    assert sessions[2]["endpoint"]["base_url"] == sim.base_url
    assert [s["run"]["concurrency"] for s in sessions] == [16, 16, 4]
    assert [s["run"]["max_attempts"] for s in sessions] == [2, 2, 3]
    assert sessions[2]["spec_file"] == "job.3.toml"
    assert (stopped.path / "job.3.toml").read_text() == fixed.read_text()
    assert (stopped.path / "job.toml").read_text() != fixed.read_text()  # as submitted
    # A later plain resume keeps the settings the run last ran with.
    third = run_cli("resume", stopped.run_id, "--runs-dir", "runs", cwd=tmp_path)
    assert third.returncode == 0, third.stderr
    last = stopped.read_manifest()["sessions"][-1]["settings"]
    assert last["endpoint"]["base_url"] == sim.base_url
    assert sim.stats.ok == ROWS


@pytest.mark.parametrize(
    ("pieces", "field"),
    [
        ({"request_extra": "temperature = 0.7"}, "request.temperature"),
        ({"input_extra": 'id_column = "id"\nprompt_column = "other"'}, "input.prompt_column"),
        ({"input_extra": 'id_column = "id"\ntemplate = "Q: {text}"'}, "input.prompt_column"),
        ({"name": "renamed"}, "name"),
    ],
)
def test_resume_refuses_a_change_to_what_is_sent(
    refused_folder: tuple[Path, RunDir], pieces: dict[str, str], field: str
) -> None:
    """A changed request or prompt setting is refused (exit 2) in one line that names the
    field and says to submit anew; the run is left as it was."""
    tmp_path, stopped = refused_folder
    before = stopped.manifest_path.read_text()
    edited = write_spec(tmp_path, spec_text(base_url="simulator", **pieces), name="edited.toml")
    found = run_cli(
        "resume", stopped.run_id, "--spec", str(edited), "--runs-dir", "runs", cwd=tmp_path
    )
    assert found.returncode == 2, found.stderr
    (line,) = found.stderr.strip().splitlines()
    assert f"edited.toml: {field}: " in line
    assert "runner submit" in line
    assert stopped.manifest_path.read_text() == before


def test_resume_spec_changing_only_the_endpoint_records_no_secret(
    tmp_path: Path, stopped: RunDir, sim_factory: Any
) -> None:
    """Header values and the key stay out of the manifest: only the variable's name is kept."""
    sim = sim_factory(api_key="sk-test-0123456789abcdef")
    fixed = write_spec(
        tmp_path,
        spec_text(
            base_url=sim.base_url,
            endpoint_extra='api_key_env = "SIM_KEY"\nheaders = { X-Team = "team-secret-42" }',
        ),
        name="fixed.toml",
    )
    done = run_cli(
        "resume",
        stopped.run_id,
        "--spec",
        str(fixed),
        "--runs-dir",
        "runs",
        cwd=tmp_path,
        env={"SIM_KEY": "sk-test-0123456789abcdef"},
    )
    assert done.returncode == 0, done.stderr
    text = stopped.manifest_path.read_text()
    assert "sk-test-0123456789abcdef" not in text
    assert "team-secret-42" not in text
    settings = json.loads(text)["sessions"][-1]["settings"]
    assert settings["endpoint"]["api_key_env"] == "SIM_KEY"
    assert settings["endpoint"]["headers"] == ["X-Team"]


def test_resume_spec_prices_are_the_reports(tmp_path: Path, stopped: RunDir) -> None:
    """New [prices] given at resume price the run's budget, its summary and its report."""
    priced = spec_text(base_url="simulator") + (
        '\n[prices."gpt-4o-mini"]\ninput = 1000.0\noutput = 1000.0\n'
    )
    fixed = write_spec(tmp_path, priced, name="priced.toml")
    done = run_cli(
        "resume", stopped.run_id, "--spec", str(fixed), "--runs-dir", "runs", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "estimated from tokens at override prices" in done.stderr
    manifest = stopped.read_manifest()
    assert manifest["sessions"][-1]["settings"]["prices"] == {
        "gpt-4o-mini": {"input": 1000.0, "output": 1000.0}
    }
    tokens = select(stopped, "SELECT sum(prompt_tokens + completion_tokens) AS n FROM results")
    expected = int(tokens[0]["n"]) * 1000.0 / 1e6
    assert manifest["cost_usd"] == pytest.approx(expected, rel=1e-4)
    report = run_cli(
        "report", stopped.run_id, "--format", "json", "--runs-dir", "runs", cwd=tmp_path
    )
    assert report.returncode == 0, report.stderr
    (cost,) = json.loads(report.stdout)["cost"]
    assert cost["provenance"] == "override"
    assert cost["cost_usd"] == pytest.approx(expected, rel=1e-4)


def test_resume_spec_from_another_folder_reads_the_same_input(
    tmp_path: Path, stopped: RunDir, sim_factory: Any
) -> None:
    """An edited copy kept in another folder may name the same input by another relative
    path: the input is compared by where it is, not by how it is written."""
    sim = sim_factory()
    (tmp_path / "edits").mkdir()
    fixed = write_spec(
        tmp_path / "edits",
        spec_text(base_url=sim.base_url, input_path="../data.jsonl"),
        name="fixed.toml",
    )
    done = run_cli(
        "resume", stopped.run_id, "--spec", "edits/fixed.toml", "--runs-dir", "runs", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert sim.stats.ok == ROWS
    assert stopped.read_manifest()["spec_path"] == str(fixed.resolve())


PROMPT = 'id_column = "id"\nprompt_column = "text"'


@pytest.mark.parametrize(
    ("pieces", "field"),
    [
        ({"base_url": "http://127.0.0.1:1/v1", "endpoint_extra": "connect_timeout_s = 3"}, None),
        ({"concurrency": 3, "run_extra": "requests_per_minute = 60\nmax_attempts = 2"}, None),
        ({"input_extra": PROMPT + "\ncheck_whole_file = false"}, None),
        ({"request_extra": "seed = 1"}, "request.seed"),
        ({"input_extra": PROMPT + '\nsystem = "Be brief."'}, "input.system"),
        ({"input_extra": 'id_column = "row"\nprompt_column = "text"'}, "input.id_column"),
        ({"input_path": "other.jsonl"}, "input.path"),
    ],
)
def test_which_fields_a_resume_may_change(
    tmp_path: Path, pieces: dict[str, Any], field: str | None
) -> None:
    """Endpoint, [run] and check_whole_file may change; the request and prompt settings not."""
    from runner.spec import load_spec, sent_fields_changed

    old = load_spec(write_spec(tmp_path, spec_text(), name="old.toml"))
    new = load_spec(write_spec(tmp_path, spec_text(**pieces), name="new.toml"))
    assert sent_fields_changed(old, new) == field


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("flag = true", "flag = 1"),
        ("seed_x = 1.0", "seed_x = 1"),
        ("opts = { deep = false }", "opts = { deep = 0 }"),
    ],
)
def test_a_value_equal_in_python_but_sent_otherwise_is_a_change(
    tmp_path: Path, old: str, new: str
) -> None:
    """`true` and `1` (or `1.0` and `1`) compare equal in Python but are other bytes on the
    wire (another request hash): a resume spec that swaps one for the other changes what is
    sent, and is refused."""
    from runner.spec import load_spec, sent_fields_changed

    before = load_spec(
        write_spec(tmp_path, spec_text(request_extra=f"extra_body = {{ {old} }}"), "old.toml")
    )
    after = load_spec(
        write_spec(tmp_path, spec_text(request_extra=f"extra_body = {{ {new} }}"), "new.toml")
    )
    assert sent_fields_changed(before, after) == "request.extra_body"
    assert sent_fields_changed(before, before) is None


def test_resume_refuses_a_boolean_turned_number_in_extra_body(tmp_path: Path) -> None:
    """Through the CLI: the run stopped with `flag = true`; `--spec` with `flag = 1` is
    refused (exit 2) naming the field, and the run's spec stays the frozen one."""
    write_rows(tmp_path / "data.jsonl", rows()[:4])
    dead = f"http://127.0.0.1:{closed_port()}/v1"
    spec = write_spec(
        tmp_path,
        spec_text(
            base_url=dead,
            run_extra="max_attempts = 1",
            request_extra="extra_body = { flag = true }",
        ),
    )
    first = run_cli("submit", str(spec), "--runs-dir", "runs", cwd=tmp_path)
    assert first.returncode == 3, first.stderr
    run = the_run(tmp_path)
    before = run.manifest_path.read_text()
    edited = write_spec(
        tmp_path, spec_text(request_extra="extra_body = { flag = 1 }"), name="edited.toml"
    )
    found = run_cli("resume", run.run_id, "--spec", str(edited), "--runs-dir", "runs", cwd=tmp_path)
    assert found.returncode == 2, found.stderr
    (line,) = found.stderr.strip().splitlines()
    assert "edited.toml: request.extra_body: " in line
    assert run.manifest_path.read_text() == before


def test_resume_refuses_a_hand_edited_frozen_spec(tmp_path: Path) -> None:
    """The run's own copy of its spec, edited by hand (max_tokens changed along with the
    endpoint), would change what is sent unchecked: a plain resume exits 2 in one line saying
    to use --spec, and sends nothing. A --spec is checked against the spec file the copy was
    frozen from while that file is unchanged, and refused once it is not."""
    run = stop_a_run(tmp_path)
    frozen = run.path / "job.toml"
    text = frozen.read_text()
    dead = text.split('base_url = "')[1].split('"')[0]
    frozen.write_text(text.replace("max_tokens = 64", "max_tokens = 32").replace(dead, "simulator"))
    before = run.manifest_path.read_text()
    found = run_cli("resume", run.run_id, "--runs-dir", "runs", cwd=tmp_path)
    assert found.returncode == 2, found.stderr
    (line,) = found.stderr.strip().splitlines()
    assert "job.toml: edited since the run froze it" in line
    assert f"runner resume {run.run_id} --spec FILE" in line
    assert run.manifest_path.read_text() == before
    assert select(run, "SELECT count(*) AS n FROM attempts WHERE status = 'ok'") == [{"n": 0}]
    # --spec with max_tokens = 32 is refused: the spec as frozen (still job.toml here) says 64.
    edited = write_spec(
        tmp_path, spec_text(base_url="simulator").replace("= 64", "= 32"), name="edited.toml"
    )
    found = run_cli("resume", run.run_id, "--spec", str(edited), "--runs-dir", "runs", cwd=tmp_path)
    assert found.returncode == 2, found.stderr
    assert "edited.toml: request.max_tokens: " in found.stderr
    # Once the spec it was frozen from is changed too, nothing can be checked: refused.
    (tmp_path / "job.toml").write_text(text.replace(dead, "simulator"))
    fixed = write_spec(tmp_path, spec_text(base_url="simulator"), name="fixed.toml")
    found = run_cli("resume", run.run_id, "--spec", str(fixed), "--runs-dir", "runs", cwd=tmp_path)
    assert found.returncode == 2, found.stderr
    assert "(once " in found.stderr
    assert run.manifest_path.read_text() == before
    # With the copy restored, the fixed spec finishes the run.
    frozen.write_text(text)
    found = run_cli("resume", run.run_id, "--spec", str(fixed), "--runs-dir", "runs", cwd=tmp_path)
    assert found.returncode == 0, found.stderr
    assert select(run, "SELECT count(*) AS n FROM results WHERE status = 'ok'") == [{"n": ROWS}]

"""Secrets end to end: the API key never reaches a file, an output or an export, whatever the
faults, and a run folder is readable by its owner only. Tool calls are data, never actions.

Every command runs as a real `python -m runner` process against a simulator on loopback.
"""

from __future__ import annotations

import json
import os
import secrets
import string
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from runner.report.query import RunDB
from runner.sim.server import SimulatorConfig, SimulatorThread
from runner.store.state import RunDir, list_runs

from .conftest import run_cli, spec_text, write_rows, write_spec

_ALPHABET = string.ascii_letters + string.digits


def random_text(size: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(size))


def pieces(key: str, size: int = 8) -> set[bytes]:
    """Every `size`-character piece of the key: any 8+ character prefix contains one."""
    return {key[i : i + size].encode() for i in range(len(key) - size + 1)}


def leaks(data: bytes, secret_pieces: set[bytes]) -> list[bytes]:
    return sorted(p for p in secret_pieces if p in data)


def file_texts(path: Path) -> Iterator[bytes]:
    """A file's bytes, and for Parquet (compressed) its decoded rows too."""
    yield path.read_bytes()
    if path.suffix == ".parquet":
        yield json.dumps(pq.read_table(path).to_pylist(), default=str).encode()


@pytest.fixture
def permissive_umask() -> Iterator[None]:
    """Child processes start with umask 0, so only the runner's own modes protect files."""
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("permissive_umask")
def test_key_never_reaches_files_outputs_or_exports_and_run_folder_is_owner_only(
    tmp_path: Path,
) -> None:
    """Through submit, resumes answered 401 with the key quoted back, debug tracebacks,
    report, query, status and export, no 8-character piece of either key shows anywhere,
    and every file and folder of the run is owner-only."""
    sentinel = "sk-SENTINEL-" + random_text(32)
    wrong = "WRONGKEY" + random_text(32)  # not key-shaped: only scrubbing by value hides it
    secret_pieces = pieces(sentinel) | pieces(wrong)
    config = SimulatorConfig(
        api_key=sentinel, echo_key_on_401=True, rate_500=0.1, rate_drop=0.1, seed=3
    )
    data = [
        {"id": f"r{i}", "text": f"Row {i}: a question. {'[[sim:400]]' if i % 9 == 4 else ''}"}
        for i in range(60)
    ]
    write_rows(tmp_path / "data.jsonl", data)
    outputs: list[str] = []

    def start(*args: str, key: str = sentinel, debug: bool = False) -> subprocess.Popen[str]:
        """`python -m runner ARGS` with TEST_KEY=key (and RUNNER_DEBUG=1 when debug)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}
        env["TEST_KEY"] = key
        if debug:
            env["RUNNER_DEBUG"] = "1"
        return subprocess.Popen(
            [sys.executable, "-m", "runner", *args, "--runs-dir", "runs"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def cli(
        *args: str, key: str = sentinel, debug: bool = False
    ) -> subprocess.CompletedProcess[str]:
        proc = start(*args, key=key, debug=debug)
        out, err = proc.communicate(timeout=90)
        outputs.extend([out, err])
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    with SimulatorThread(config) as sim:
        write_spec(
            tmp_path,
            spec_text(
                base_url=sim.base_url,
                endpoint_extra='api_key_env = "TEST_KEY"',
                run_extra="max_attempts = 10",
            ),
        )
        submitted = cli("submit", "job.toml")
        assert submitted.returncode == 1, submitted.stderr  # the [[sim:400]] rows failed
        [info] = list_runs(tmp_path / "runs")
        run_id = info["run_id"]

        # A wrong key: the provider quotes it back in its 401 message.
        wrong_run = cli("resume", run_id, "--retry-failed", key=wrong, debug=True)
        assert wrong_run.returncode == 3, wrong_run.stderr
        assert "credentials refused: 401 invalid_api_key: Incorrect API key" in wrong_run.stderr
        # The right key refused: the provider quotes the sentinel itself back.
        sim.set_config(api_key="sk-elsewhere-" + random_text(24))
        refused = cli("resume", run_id, "--retry-failed", debug=True)
        assert refused.returncode == 3, refused.stderr
        assert "401 invalid_api_key: Incorrect API key provided: " in refused.stderr
        stats = sim.stats
    assert stats.by_status[400] and stats.by_status[401] >= 2 and stats.dropped
    assert set(stats.by_status) & {500, 502, 503, 504}

    pasted = write_spec(
        tmp_path,
        spec_text(request_extra=f'extra_body = {{ token = "{sentinel}" }}'),
        name="pasted.toml",
    )
    exported = [tmp_path / f"export{suffix}" for suffix in (".parquet", ".jsonl", ".csv")]
    # The readers do not change the run: run them side by side. (args, debug, exit code)
    readers: list[tuple[list[str], bool, int]] = [
        *((["report", run_id, "--format", fmt], False, 0) for fmt in ("table", "csv", "json")),
        (["report", run_id, "--by", "error_type"], False, 0),
        *(
            (["query", run_id, sql, "--format", "json"], False, 0)
            for sql in ("SELECT * FROM attempts", "SELECT * FROM costed", "SELECT * FROM input")
        ),
        (["status", run_id, "--json"], False, 0),
        (["runs"], False, 0),
        *((["export", run_id, str(out)], False, 0) for out in exported),
        # Crash-y paths with RUNNER_DEBUG=1 print tracebacks, still without the key.
        (["export", run_id, str(tmp_path / "no-such-folder" / "x.parquet")], True, 2),
        (["query", run_id, "SELECT nope FROM results"], True, 2),
        (["submit", str(pasted)], True, 2),
    ]
    started = [(args, debug, code, start(*args, debug=debug)) for args, debug, code in readers]
    for args, debug, code, proc in started:
        out, err = proc.communicate(timeout=60)
        outputs.extend([out, err])
        assert proc.returncode == code, (args, err)
        assert ("Traceback" in err) == debug, (args, err)

    for text in outputs:
        assert not leaks(text.encode(), secret_pieces), text
    run_dir = tmp_path / "runs" / run_id
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"job.toml", "manifest.json", "lock"}
    for path in [*files, *exported]:
        for data_bytes in file_texts(path):
            assert not leaks(data_bytes, secret_pieces), path
    for path in [run_dir, *run_dir.rglob("*")]:
        assert path.stat().st_mode & 0o077 == 0, f"{path} is open to others: {path.stat()}"
    assert len(list_runs(tmp_path / "runs")) == 1  # the pasted spec made no run


def test_tool_calls_are_stored_as_json_text_and_never_executed(tmp_path: Path) -> None:
    """An answer calling an `os.system` tool whose argument would create a file is stored as
    parseable JSON text, exported as text, and nothing is executed."""
    target = tmp_path / "pwned"
    tool = (
        '{ type = "function", function = { name = "os.system", description = "Run a shell '
        'command", parameters = { type = "object", properties = { query = { type = "string" '
        "} } } } }"
    )
    data = [
        {"id": "a", "text": "Say hello."},
        {"id": "b", "text": f"touch {target} [[sim:tool_calls]]"},
    ]
    write_rows(tmp_path / "data.jsonl", data)
    with SimulatorThread(SimulatorConfig()) as sim:
        write_spec(
            tmp_path,
            spec_text(
                base_url=sim.base_url, request_extra=f'tools = [{tool}]\ntool_choice = "auto"'
            ),
        )
        done = run_cli("submit", "job.toml", "--runs-dir", "runs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    [info] = list_runs(tmp_path / "runs")
    with RunDB(RunDir(tmp_path / "runs" / info["run_id"]), with_input=False) as db:
        row = db.arrow("SELECT * FROM results WHERE row_id = 'b'").to_pylist()[0]
    assert (row["status"], row["finish_reason"], row["content"]) == ("ok", "tool_calls", None)
    [call] = json.loads(row["tool_calls"])
    assert call["type"] == "function" and call["function"]["name"] == "os.system"
    assert json.loads(call["function"]["arguments"]) == {"query": f"touch {target}"}
    out = tmp_path / "out.jsonl"
    exported = run_cli("export", info["run_id"], str(out), "--runs-dir", "runs", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    by_id = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert isinstance(by_id["b"]["tool_calls"], str)
    assert json.loads(by_id["b"]["tool_calls"]) == [call]
    assert by_id["a"]["tool_calls"] is None
    assert not target.exists()

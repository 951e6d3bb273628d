"""Shared fixtures: a clean environment, the simulator on loopback, job specs in tmp folders."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runner.engine import job
from runner.report.query import RunDB, report
from runner.sim.server import SimulatorConfig, SimulatorThread
from runner.store.state import RunDir

ROOT = Path(__file__).resolve().parent.parent


def start_runner(
    tmp_path: Path, *args: str, entry: Sequence[str] = ("-m", "runner")
) -> subprocess.Popen[str]:
    """`runner ARGS --runs-dir tmp_path/runs` as a child process in tmp_path, without RUNNER_*
    variables; stderr is piped, so that crash tests can read its first line and kill it."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("RUNNER_") or k == "RUNNER_CACHE_DIR"
    }
    return subprocess.Popen(
        [sys.executable, *entry, *args, "--runs-dir", str(tmp_path / "runs")],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never see the developer's keys, proxies or runner settings."""
    for name in list(os.environ):
        upper = name.upper()
        if (
            upper.endswith(("_API_KEY", "_PROXY"))
            or upper.startswith("RUNNER_")
            or upper in ("NO_PROXY", "SSL_CERT_FILE")
        ):
            monkeypatch.delenv(name, raising=False)


@pytest.fixture(autouse=True)
def private_cache(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The price cache of tests lives in a folder of the session's own, never ~/.cache/runner
    (children started with the test's environment inherit it)."""
    monkeypatch.setenv("RUNNER_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))


@pytest.fixture
def simulator() -> Iterator[SimulatorThread]:
    """A simulator with no faults, on its own loop in a thread."""
    with SimulatorThread(SimulatorConfig()) as sim:
        yield sim


@pytest.fixture
def sim_factory() -> Iterator[Any]:
    """Start simulators with given switches; all are stopped at the end of the test."""
    started: list[SimulatorThread] = []

    def start(**switches: Any) -> SimulatorThread:
        sim = SimulatorThread(SimulatorConfig(**switches))
        sim.__enter__()
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.__exit__(None, None, None)


def write_rows(path: Path, rows: list[dict[str, Any]]) -> Path:
    """Write rows as Parquet, JSONL or CSV by the file's suffix."""
    if path.suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif path.suffix == ".csv":
        import csv

        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    else:
        import json

        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_spec(folder: Path, text: str, name: str = "job.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def spec_text(
    *,
    input_path: str = "data.jsonl",
    base_url: str = "simulator",
    input_extra: str = 'id_column = "id"\nprompt_column = "text"',
    endpoint_extra: str = "",
    request_extra: str = "",
    run_extra: str = "",
    name: str = "t",
    concurrency: int = 16,
) -> str:
    """A job spec with sensible test defaults; pieces can be replaced or extended."""
    return (
        f'name = "{name}"\n\n[input]\npath = "{input_path}"\n{input_extra}\n\n'
        f'[endpoint]\nbase_url = "{base_url}"\ntimeout_s = 10\n{endpoint_extra}\n\n'
        f'[request]\nmodel = "gpt-4o-mini"\nmax_tokens = 64\n{request_extra}\n\n'
        f"[run]\nconcurrency = {concurrency}\nbackoff_base_s = 0.01\nbackoff_max_s = 0.05\n"
        f"{run_extra}\n"
    )


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    """Run `python -m runner ARGS` as a real process."""
    full_env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("RUNNER_") or k == "RUNNER_CACHE_DIR"
    }
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "runner", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


async def submit_job(tmp_path: Path, text: str, data: list[dict[str, Any]]) -> job.Outcome:
    """data.jsonl and job.toml (`text`) in tmp_path, submitted in-process to tmp_path/runs."""
    write_rows(tmp_path / "data.jsonl", data)
    spec = write_spec(tmp_path, text)
    return await job.submit(job.prepare(spec), tmp_path / "runs", handle_signals=False)


def select(run: RunDir, sql: str) -> list[dict[str, Any]]:
    """A query over the run's views (results, attempts, ...), as a list of dicts."""
    with RunDB(run, with_input=False) as db:
        found: list[dict[str, Any]] = db.arrow(sql).to_pylist()
        return found


def sections(run: RunDir, **kwargs: Any) -> dict[str, list[dict[str, Any]]]:
    """The report's sections by title, each row a dict by column name."""
    return {
        title: [dict(zip(names, row, strict=True)) for row in found]
        for title, names, found in report(run, **kwargs)
    }

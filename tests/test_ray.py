"""A job across a local Ray cluster in shards (`runner submit --ray ADDRESS`): every row
once, the simulator's counters matched, the same report as a local run, and resume after
kill -9 of a shard's worker or of the driver. One cluster for the module, in its own
process (tests/ray_support.py); the drivers are real `runner` processes."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("ray")

from runner.store.state import RunDir
from tests.conftest import sections, select
from tests.ray_support import (
    RAY_ENV,
    Simulator,
    journaled,
    ray_cluster,
    runner,
    spec,
    start_runner,
    wait_for,
    write_input,
)

pytestmark = [pytest.mark.ray, pytest.mark.xdist_group("ray"), pytest.mark.timeout(300)]


# Session-scoped although only this module uses it: a worker that runs another module's test
# between two of these (pytest-xdist) would otherwise tear it down and start a second one.
@pytest.fixture(scope="session")
def cluster() -> Iterator[str]:
    with ray_cluster(cpus=2) as address:
        yield address


@pytest.fixture
def sim_factory() -> Iterator[Any]:
    started: list[Simulator] = []

    def start(*switches: str) -> Simulator:
        sim = Simulator(*switches)
        started.append(sim)
        return sim

    yield start
    for sim in started:
        sim.close()


def ended(process: subprocess.Popen[str]) -> None:
    """A driver process gone, killed if it still runs, its pipe closed."""
    if process.poll() is None:
        process.kill()
        process.wait()
    if process.stderr is not None:
        process.stderr.close()


def only_run(runs: Path) -> RunDir:
    (found,) = [p for p in runs.iterdir() if (p / "manifest.json").exists()]
    return RunDir(found)


def once_each(run: RunDir, rows: int) -> None:
    """Every row has exactly one final record, and the results hold each row once."""
    (counts,) = select(
        run,
        "SELECT count(*) AS n, count(DISTINCT row_index) AS rows, "
        "count(*) FILTER (status = 'ok') AS ok FROM attempts WHERE final",
    )
    assert counts == {"n": rows, "rows": rows, "ok": rows}
    (results,) = select(run, "SELECT count(*) AS n, count(DISTINCT row_id) AS ids FROM results")
    assert results == {"n": rows, "ids": rows}


def test_shards_answer_every_row_once_as_a_local_run_does(
    tmp_path: Path, cluster: str, sim_factory: Any
) -> None:
    """20,000 rows over 4 shards: each row answered once, tokens equal to the simulator's
    counters, and the report (and every answer) the same as the job's local run."""
    sim = sim_factory()
    rows = 20_000
    write_input(tmp_path / "data.jsonl", rows)
    (tmp_path / "job.toml").write_text(spec(sim.base_url, concurrency=32))
    done = runner(
        tmp_path, "submit", "job.toml", "--runs-dir", "ray-runs", "--shards", "4", "--ray", cluster
    )
    assert done.returncode == 0, done.stderr
    run = only_run(tmp_path / "ray-runs")
    stats = sim.stats()
    once_each(run, rows)
    (tokens,) = select(
        run,
        "SELECT count(*) AS requests, sum(prompt_tokens) AS prompt, "
        "sum(completion_tokens) AS completion FROM attempts WHERE attempts > 0",
    )
    assert tokens == {
        "requests": stats["requests"],
        "prompt": stats["prompt_tokens"],
        "completion": stats["completion_tokens"],
    }
    assert stats["resent_after_ok"] == 0
    plan = json.loads((run.path / "shards.json").read_text())
    assert [(s["start"], s["stop"]) for s in plan["shards"]] == [
        (0, 5000),
        (5000, 10000),
        (10000, 15000),
        (15000, 20000),
    ]
    manifest = run.read_manifest()
    assert manifest["state"] == "completed"
    assert manifest["counts"]["ok"] == rows

    local = runner(tmp_path, "submit", "job.toml", "--runs-dir", "local-runs")
    assert local.returncode == 0, local.stderr
    alone = only_run(tmp_path / "local-runs")
    answers = (
        "SELECT row_id, row_index, content, prompt_tokens, completion_tokens, status "
        "FROM results ORDER BY row_index"
    )
    assert select(run, answers) == select(alone, answers)
    timing = (
        "run",
        "wall time s",
        "throughput rows/s",
        "latency p50 ms",
        "latency p90 ms",
        "latency p99 ms",
    )

    def steady(found: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        return {
            title: [r for r in table if r.get("metric") not in timing]
            for title, table in found.items()
        }

    assert steady(sections(run)) == steady(sections(alone))
    status = runner(tmp_path, "status", run.run_id, "--runs-dir", "ray-runs", "--json")
    assert json.loads(status.stdout)["ok"] == rows
    wrong = runner(tmp_path, "resume", run.run_id, "--runs-dir", "ray-runs")
    assert wrong.returncode == 2 and "--ray" in wrong.stderr


def test_a_killed_shard_worker_is_launched_again_and_buys_only_what_was_in_flight(
    tmp_path: Path, cluster: str, sim_factory: Any
) -> None:
    """kill -9 of the worker running shard 0: the driver launches its next attempt, which
    adopts what was journaled; each row is answered once and at most the requests in flight
    at the kill are paid twice."""
    sim = sim_factory("--latency-ms", "40")
    rows, concurrency = 1_600, 8
    write_input(tmp_path / "data.jsonl", rows)
    (tmp_path / "job.toml").write_text(spec(sim.base_url, concurrency=concurrency))
    driver = start_runner(
        tmp_path, "submit", "job.toml", "--runs-dir", "runs", "--shards", "2", "--ray", cluster
    )
    try:
        shard = wait_for(lambda: next((tmp_path / "runs").glob("*/shards/0"), None), "shard 0")
        wait_for(lambda: journaled(shard) >= 100, "100 records of shard 0")
        pid = int((shard / "lock").read_text().strip())
        os.kill(pid, signal.SIGKILL)
        _, stderr = driver.communicate(timeout=180)
    finally:
        ended(driver)
    assert driver.returncode == 0, stderr
    run = only_run(tmp_path / "runs")
    once_each(run, rows)
    assert (shard / "attempt-000002.json").exists()
    stats = sim.stats()
    assert stats["resent_after_ok"] <= concurrency
    assert stats["ok"] <= rows + concurrency
    assert run.read_manifest()["ray"]["attempts"]["0"] == 2


def test_resume_after_the_driver_is_killed_finishes_every_row_once(
    tmp_path: Path, cluster: str, sim_factory: Any
) -> None:
    """kill -9 of the driver mid-run, then `runner resume RUN --ray`: every shard goes on
    from what it journaled; each row answered once, at most what was in flight re-bought."""
    sim = sim_factory("--latency-ms", "40")
    rows, concurrency, shards = 1_600, 8, 2
    write_input(tmp_path / "data.jsonl", rows)
    (tmp_path / "job.toml").write_text(spec(sim.base_url, concurrency=concurrency))
    driver = start_runner(
        tmp_path,
        "submit",
        "job.toml",
        "--runs-dir",
        "runs",
        "--shards",
        str(shards),
        "--ray",
        cluster,
    )
    try:
        wait_for(
            lambda: sum(journaled(s) for s in (tmp_path / "runs").glob("*/shards/*")) >= 200,
            "200 records",
        )
        driver.send_signal(signal.SIGKILL)
        driver.wait(timeout=30)
    finally:
        ended(driver)
    run = only_run(tmp_path / "runs")
    assert run.read_manifest()["state"] == "running"
    done = runner(tmp_path, "resume", run.run_id, "--runs-dir", "runs", "--ray", cluster)
    assert done.returncode == 0, done.stderr
    once_each(run, rows)
    stats = sim.stats()
    assert stats["resent_after_ok"] <= shards * concurrency
    manifest = run.read_manifest()
    assert manifest["state"] == "completed"
    assert [s["outcome"] for s in manifest["sessions"]] == ["crashed", "completed"]


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """moto's S3 server on loopback with one bucket; yields a store URI for --store."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    for name, value in RAY_ENV.items():
        monkeypatch.setenv(name, value)
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        port = server._server.server_address[1]  # type: ignore[union-attr]
        options = f"endpoint_override=127.0.0.1:{port}&scheme=http&region=us-east-1"
        fs, _ = pafs.FileSystem.from_uri(f"s3://results?{options}&allow_bucket_creation=true")
        fs.create_dir("results")
        # moto's buckets live as long as the process: a prefix of the test's own.
        yield f"s3://results/{uuid.uuid4().hex}/runs?{options}"
    finally:
        server.stop()


def test_an_object_store_run_folder_holds_parts_and_manifests(
    tmp_path: Path, cluster: str, sim_factory: Any, s3: str
) -> None:
    """--store s3://...: the shards' parts and manifests, the run's manifest and plan are on
    the store (moto on loopback); report, status and export read them through pyarrow.fs."""
    import pyarrow.fs as pafs

    sim = sim_factory()
    rows = 600
    write_input(tmp_path / "data.jsonl", rows)
    (tmp_path / "job.toml").write_text(spec(sim.base_url, concurrency=16))
    done = runner(
        tmp_path,
        "submit",
        "job.toml",
        "--runs-dir",
        "runs",
        "--shards",
        "2",
        "--store",
        s3,
        "--ray",
        cluster,
    )
    assert done.returncode == 0, done.stderr
    run = only_run(tmp_path / "runs")
    fs, base = pafs.FileSystem.from_uri(s3)
    listed = fs.get_file_info(pafs.FileSelector(f"{base}/{run.run_id}", recursive=True))
    names = {
        info.path.removeprefix(f"{base}/{run.run_id}/")
        for info in listed
        if info.type == pafs.FileType.File
    }
    assert {"manifest.json", "shards.json", "job.toml"} <= names
    for shard in ("0", "1"):
        assert {f"shards/{shard}/manifest.json", f"shards/{shard}/attempt-000001.json"} <= names
        assert any(n.startswith(f"shards/{shard}/parts/part-") for n in names), names
    assert not list(run.parts_dir.iterdir())
    shutil.rmtree(run.path / "shards")  # readers mirror what they need from the store
    report = runner(tmp_path, "report", run.run_id, "--runs-dir", "runs")
    assert report.returncode == 0, report.stderr
    assert "rows ok" in report.stdout and "600" in report.stdout
    once_each(run, rows)
    out = runner(tmp_path, "export", run.run_id, "out.parquet", "--runs-dir", "runs")
    assert out.returncode == 0, out.stderr
    import pyarrow.parquet as pq

    assert pq.read_metadata(tmp_path / "out.parquet").num_rows == rows
    assert sim.stats()["requests"] == rows


def test_a_killed_worker_on_an_object_store_rebuys_at_most_the_unflushed_window(
    tmp_path: Path, cluster: str, sim_factory: Any, s3: str
) -> None:
    """With --store, a shard's journal stays on the node and is flushed to the store every
    FLUSH_S seconds: kill -9 of its worker loses at most that window (plus what was in
    flight), which the next attempt buys again; each row is still answered once."""
    import pyarrow.fs as pafs

    from runner.cluster.shard import FLUSH_S

    latency_s, concurrency, rows = 0.04, 4, 1_600
    sim = sim_factory("--latency-ms", str(latency_s * 1000))
    write_input(tmp_path / "data.jsonl", rows)
    (tmp_path / "job.toml").write_text(spec(sim.base_url, concurrency=concurrency))
    driver = start_runner(
        tmp_path,
        "submit",
        "job.toml",
        "--runs-dir",
        "runs",
        "--shards",
        "2",
        "--store",
        s3,
        "--ray",
        cluster,
    )
    fs, base = pafs.FileSystem.from_uri(s3)

    def uploaded() -> bool:
        found = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        return any("/shards/0/parts/part-" in info.path for info in found)

    try:
        wait_for(uploaded, "a part of shard 0 on the store")
        run = only_run(tmp_path / "runs")
        lock = Path(tempfile.gettempdir()) / f"runner-ray-{os.getuid()}/{run.run_id}/0-a1/lock"
        pid = wait_for(lambda: lock.read_text().strip().isdigit() and lock.read_text(), "pid")
        os.kill(int(pid), signal.SIGKILL)
        _, stderr = driver.communicate(timeout=180)
    finally:
        ended(driver)
    assert driver.returncode == 0, stderr
    run = only_run(tmp_path / "runs")
    once_each(run, rows)
    # At most `concurrency` answers every `latency_s`: the window's worth, one second of
    # slack for the upload, and what was on the wire.
    bound = concurrency + concurrency / latency_s * (FLUSH_S + 1.0)
    assert sim.stats()["resent_after_ok"] <= bound
    assert run.read_manifest()["ray"]["attempts"]["0"] == 2

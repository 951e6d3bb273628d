"""Shard plans and the parts of Ray support that need no cluster: row ranges that cover the
input once (read back exactly as a whole-file read numbers them), the local runner never
importing ray, and a clear exit 2 when --ray is asked for without ray installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runner.cluster.shard import ShardTask, run_shard
from runner.cluster.shards import ShardPlan, plan_shards, write_plan
from runner.input.source import InputFile
from runner.report.query import RunDB
from runner.sim.server import SimulatorThread
from runner.spec import InputSpec
from runner.store.state import Manifest, RunDir, Session, input_fingerprint, shard_parts
from tests.conftest import spec_text, write_rows

ROWS = [
    {"id": f"r{i}", "text": f"line {i}\nwith a newline" if i % 7 == 0 else f"t{i}"}
    for i in range(103)
]
STAMP = {"path": "", "size": 0, "mtime": 0.0, "hash": "", "rows": None}


def _whole(path: Path) -> list[tuple[int, int | None, dict[str, object]]]:
    source = InputFile(path, InputSpec(path=str(path), id_column="id", prompt_column="text"))
    return [(r.index, r.line, r.values) for r in source.rows()]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
@pytest.mark.parametrize("count", [1, 3, 4, 200])
def test_shards_cover_every_row_once_with_the_whole_file_numbering(
    tmp_path: Path, suffix: str, count: int
) -> None:
    """Read shard by shard, the rows are those of one whole-file read: same index, same line,
    same values, none twice; JSONL blank lines and CSV quoted newlines included."""
    path = tmp_path / f"data{suffix}"
    if suffix == ".parquet":
        pq.write_table(pa.Table.from_pylist(ROWS), path, row_group_size=10)
    else:
        write_rows(path, ROWS)
    if suffix == ".jsonl":  # blank lines are not rows
        text = path.read_text().splitlines(keepends=True)
        path.write_text("\n".join(text[:5]) + "\n\n" + "".join(text[5:]))
    spec = InputSpec(path=str(path), id_column="id", prompt_column="text")
    plan = plan_shards(InputFile(path, spec), count, STAMP)  # type: ignore[arg-type]
    assert plan.rows == len(ROWS)
    assert 1 <= len(plan.ranges) <= count
    assert [r.start for r in plan.ranges] == [0, *(r.stop for r in plan.ranges[:-1])]
    read = []
    for span in plan.ranges:
        source = InputFile(path, spec, rows_range=span)
        assert source.row_count_hint() == span.stop - span.start
        read += [(r.index, r.line, r.values) for r in source.rows()]
    assert read == _whole(path)
    assert abs(sum(plan.share(k) for k in range(len(plan.ranges))) - 1) < 1e-9


def _run_python(tmp_path: Path, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_local_submit_never_imports_ray(tmp_path: Path) -> None:
    """`runner submit` without --ray (and status, report) runs to the end without ray."""
    write_rows(tmp_path / "data.jsonl", [{"id": str(i), "text": f"q{i}"} for i in range(5)])
    (tmp_path / "job.toml").write_text(spec_text())
    code = (
        "import atexit, sys\n"
        "atexit.register(lambda: sys.stderr.write('RAY\\n' if 'ray' in sys.modules else "
        "'NO RAY\\n'))\n"
        "from runner.cli import main\n"
        "main(['submit', 'job.toml', '--runs-dir', 'runs'])\n"
    )
    done = _run_python(tmp_path, code)
    assert done.returncode == 0, done.stderr
    assert done.stderr.endswith("NO RAY\n")


@pytest.mark.parametrize("command", [["submit", "job.toml"], ["resume", "t"]])
def test_ray_asked_for_without_ray_installed_is_a_clear_exit_2(
    tmp_path: Path, command: list[str]
) -> None:
    """--ray with no ray to import: one line naming the extra to install, exit 2."""
    write_rows(tmp_path / "data.jsonl", [{"id": "1", "text": "q"}])
    (tmp_path / "job.toml").write_text(spec_text())
    code = (
        "import sys\nsys.modules['ray'] = None  # as if not installed\n"
        "from runner.cli import main\n"
        f"main({[*command, '--runs-dir', 'runs', '--ray']!r})\n"
    )
    done = _run_python(tmp_path, code)
    assert done.returncode == 2, done.stderr
    assert "uv sync --extra ray" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def _ray_run(tmp_path: Path, rows: int) -> tuple[RunDir, ShardPlan, str]:
    """A Ray run's folder as the driver makes it (manifest, frozen spec, a 2-shard plan)."""
    write_rows(tmp_path / "data.jsonl", [{"id": str(i), "text": f"q{i}"} for i in range(rows)])
    text = spec_text(input_path=str(tmp_path / "data.jsonl"))
    run = RunDir.create(tmp_path / "runs", "t", text)
    source = InputFile(
        tmp_path / "data.jsonl",
        InputSpec(path=str(tmp_path / "data.jsonl"), id_column="id", prompt_column="text"),
    )
    stamp = input_fingerprint(tmp_path / "data.jsonl", rows)
    plan = plan_shards(source, 2, stamp)
    write_plan(run, plan)
    manifest: Manifest = {
        "run_id": run.run_id,
        "job_name": "t",
        "spec_path": str(tmp_path / "job.toml"),
        "spec_hash": "",
        "input": stamp,
        "state": "completed",
        "created_at": "",
        "versions": {},
        "counts": {"total": rows},
        "sessions": [],
        "ray": {"shards": 2, "attempts": {}},
    }
    run.write_manifest(manifest)
    return run, plan, text


def _task(run: RunDir, plan: ShardPlan, text: str, shard: int, attempt: int, url: str) -> Any:
    return ShardTask(
        run_id=run.run_id,
        job_name="t",
        input=plan.input,
        run_path=str(run.path),
        shard=shard,
        attempt=attempt,
        rows=plan.ranges[shard],
        share=plan.share(shard),
        spec_text=text,
        spec_path=str(run.path.parent.parent / "job.toml"),
        base_url=url,
    )


@pytest.mark.anyio
async def test_a_stale_attempt_writes_nothing_that_counts(
    tmp_path: Path, simulator: SimulatorThread
) -> None:
    """Once attempt 2 of a shard has claimed it, attempt 1 launched again is refused, and a
    part a zombie of attempt 1 writes afterwards is ignored by recovery and by reports."""
    run, plan, text = _ray_run(tmp_path, 40)
    first = await run_shard(_task(run, plan, text, 0, 1, simulator.base_url))
    assert first.state == "completed" and first.counts["ok"] == 20
    second = await run_shard(_task(run, plan, text, 0, 2, simulator.base_url))
    assert second.state == "completed" and second.requests == 0  # adopted, nothing re-bought
    stale = await run_shard(_task(run, plan, text, 0, 1, simulator.base_url))
    assert stale.state == "superseded"
    folder = run.path / "shards" / "0"
    claim = json.loads((folder / "attempt-000002.json").read_text())
    assert claim["adopted"] == [1_000_001]
    # A zombie of attempt 1 writes one more part after attempt 2 took over.
    zombie = pq.read_table(folder / "parts" / "part-1000001.parquet")
    zombie = zombie.set_column(
        zombie.schema.get_field_index("content"),
        "content",
        pa.array(["zombie"] * zombie.num_rows),
    )
    pq.write_table(zombie, folder / "parts" / "part-1000002.parquet")
    assert [p.name for p in shard_parts(folder)] == ["part-1000001.parquet"]
    assert RunDir(folder).settled().ok == 20
    with RunDB(run, with_input=False) as db:
        _, found = db.query("SELECT count(*), count(*) FILTER (content = 'zombie') FROM attempts")
    assert found == [(20, 0)]
    assert simulator.stats.requests == 20


@pytest.mark.anyio
async def test_a_shard_on_a_store_seals_and_uploads_while_answers_arrive(
    tmp_path: Path, simulator: SimulatorThread
) -> None:
    """The flusher seals what is journaled every flush_s while rows are still in flight:
    several parts reach the store, and together they hold every row of the shard once."""
    simulator.set_config(latency_ms=150, jitter_ms=140)  # answers spread over ~0.3 s
    run, plan, text = _ray_run(tmp_path, 30)
    store = f"file://{tmp_path / 'store' / run.run_id}"
    (run.path / "store.json").write_text(json.dumps({"uri": store}))
    task = _task(run, plan, text, 0, 1, simulator.base_url)
    result = await run_shard(replace(task, store=store, flush_s=0.05))
    assert result.state == "completed" and result.counts["ok"] == 15
    uploaded = sorted((tmp_path / "store" / run.run_id / "shards" / "0" / "parts").iterdir())
    assert len(uploaded) > 1
    ids = [i for p in uploaded for i in pq.read_table(p, columns=["row_id"])["row_id"].to_pylist()]
    assert sorted(ids) == sorted(str(i) for i in range(plan.ranges[0].start, plan.ranges[0].stop))


def _work_folders(run_id: str) -> list[Path]:
    """Shard folders of a run left on this node's local disk."""
    return list(Path(tempfile.gettempdir()).glob(f"runner-ray-{os.getuid()}/{run_id}/*"))


@pytest.mark.anyio
async def test_a_shard_on_a_store_uploads_its_parts_and_readers_mirror_them(
    tmp_path: Path, simulator: SimulatorThread
) -> None:
    """A shard whose run keeps results on a store (here a file:// URI, the same pyarrow.fs
    calls as S3) works in a local folder, uploads its claim, manifest and parts, and leaves
    nothing behind; a reader of the run mirrors them and sees every row once."""
    run, plan, text = _ray_run(tmp_path, 30)
    store = f"file://{tmp_path / 'store' / run.run_id}"
    (run.path / "store.json").write_text(json.dumps({"uri": store}))
    for shard in range(len(plan.ranges)):
        task = _task(run, plan, text, shard, 1, simulator.base_url)
        result = await run_shard(replace(task, store=store, flush_s=0.05))
        assert result.state == "completed"
    remote = tmp_path / "store" / run.run_id / "shards"
    assert sorted(p.name for p in (remote / "0").iterdir()) == [
        "attempt-000001.json",
        "manifest.json",
        "parts",
    ]
    assert list((remote / "1" / "parts").glob("part-*.parquet"))
    assert not (run.path / "shards").exists()
    assert not _work_folders(run.run_id)
    with RunDB(run, with_input=False) as db:
        _, found = db.query("SELECT count(*), count(DISTINCT row_index) FROM results")
    assert found == [(30, 30)]
    assert (run.path / "shards" / "1" / "manifest.json").exists()  # the mirror
    assert simulator.stats.requests == 30
    driver = pytest.importorskip("runner.cluster.driver")
    manifest = run.read_manifest()
    manifest["ray"]["store"] = store
    session: Session = {"started_at": "", "started_epoch": 0.0, "pid": 0, "settings": {}}
    state = driver._finish(run, manifest, session, plan, 1, driver._Session(), None)
    assert state == "completed"
    summed = json.loads((tmp_path / "store" / run.run_id / "manifest.json").read_text())
    assert summed["counts"] == {"total": 30, "ok": 30, "failed": 0, "skipped": 0, "requests": 30}
    assert driver.store_of("s3://b/runs?scheme=http", "r") == "s3://b/runs/r?scheme=http"

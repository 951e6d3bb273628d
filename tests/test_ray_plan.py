"""Shard plans and the parts of Ray support that need no cluster: row ranges that cover the
input once (read back exactly as a whole-file read numbers them), the local runner never
importing ray, and a clear exit 2 when --ray is asked for without ray installed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runner.cluster.shards import plan_shards
from runner.input.source import InputFile
from runner.spec import InputSpec
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

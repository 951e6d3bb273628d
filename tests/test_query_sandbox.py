"""`runner query` is a read-only sandbox: it sees the run's parts, journal and input only.

Every escape class is tried through the command line in a real process at least once; the
other cases of a class go through the library's `query`. Each case names a file that must stay
unread (its content would show in the output) or unwritten (bytes and mtime unchanged, or
never created), and expects exit 2 with one line.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from runner.errors import UsageError
from runner.report.query import query
from runner.store.state import RunDir

from .conftest import run_cli, spec_text, write_rows, write_spec

SIBLING_SECRET = "SIBLING-SECRET-7f3a"
TMP_SECRET = "CWD-TMP-SECRET-91c2"


@dataclass(frozen=True)
class Sandbox:
    folder: Path  # the cwd of every command
    data: Path  # the input's folder
    run: RunDir

    @property
    def sibling(self) -> Path:
        return self.data / "other.csv"

    @property
    def tmp_file(self) -> Path:
        return self.folder / ".tmp" / "secret.txt"

    def cli(self, *args: str) -> tuple[int, str, str]:
        done = run_cli(*args, "--runs-dir", str(self.folder / "runs"), cwd=self.folder)
        return done.returncode, done.stdout, done.stderr


@pytest.fixture(scope="module")
def box(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sandbox]:
    """A finished 6-row run whose input sits beside another file, run from a folder that has
    a `.tmp/` of its own (DuckDB's default temp directory)."""
    folder = tmp_path_factory.mktemp("sandbox")
    data = folder / "data"
    data.mkdir()
    write_rows(data / "data.jsonl", [{"id": f"r{i}", "text": f"q {i}"} for i in range(6)])
    (data / "other.csv").write_text(f"secret\n{SIBLING_SECRET}\n")
    (folder / ".tmp").mkdir()
    (folder / ".tmp" / "secret.txt").write_text(f"{TMP_SECRET}\n")
    write_spec(folder, spec_text(input_path="data/data.jsonl"))
    done = run_cli("submit", "job.toml", "--runs-dir", "runs", cwd=folder)
    assert done.returncode == 0, done.stderr
    (path,) = (folder / "runs").iterdir()
    yield Sandbox(folder, data, RunDir(path))


def snapshot(path: Path) -> tuple[bytes, int] | None:
    """A file's bytes and mtime, or None when it does not exist."""
    if not path.exists():
        return None
    if path.is_dir():
        return (b"", path.stat().st_mtime_ns)
    return (path.read_bytes(), path.stat().st_mtime_ns)


def refused(code: int, stdout: str, stderr: str) -> str:
    """The one line of a refused query (exit 2, nothing on stdout)."""
    assert code == 2, (stdout, stderr)
    assert stdout == ""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith(("error: query refused: ", "error: query failed: ")), lines[0]
    return lines[0]


# -- writes ------------------------------------------------------------------------------


def write_cases(box: Sandbox) -> list[tuple[str, Path]]:
    """(SQL, the path it would write)."""
    run = box.run.path
    (part, *_) = sorted(box.run.parts_dir.glob("*.parquet"))
    return [
        (f"COPY (SELECT 1 AS x) TO '{run}/manifest.json'", run / "manifest.json"),
        (f"COPY (SELECT 1 AS x) TO '{part}' (FORMAT parquet, USE_TMP_FILE false)", part),
        (f"COPY (SELECT 1 AS x) TO '{box.folder}/new.csv'", box.folder / "new.csv"),
        (f"COPY results TO '{box.data}/data.jsonl'", box.data / "data.jsonl"),
        (f"EXPORT DATABASE '{box.folder}/exported'", box.folder / "exported"),
        (f"ATTACH '{box.folder}/attached.db' AS other", box.folder / "attached.db"),
        (f"ATTACH '{run}/job.toml' AS spec", run / "job.toml"),
        (f"SELECT 1; COPY (SELECT 1) TO '{box.folder}/second.csv'", box.folder / "second.csv"),
        ("CREATE TABLE t AS SELECT 1 AS x", box.folder / ".tmp" / "t"),
    ]


@pytest.mark.parametrize("case", range(9))
def test_writes_are_refused_and_nothing_changes(box: Sandbox, case: int) -> None:
    """COPY TO (the run's manifest, a part, a new file, the input), EXPORT DATABASE, ATTACH,
    a COPY after a SELECT and CREATE all fail; the target keeps its bytes and mtime, or is
    never created. COPY, EXPORT and ATTACH go through the CLI."""
    sql, target = write_cases(box)[case]
    before = snapshot(target)
    if case in (0, 4, 5):
        line = refused(*box.cli("query", box.run.run_id, sql))
    else:
        with pytest.raises(UsageError) as info:
            query(box.run, sql)
        line = f"error: {info.value}"
    assert line.startswith("error: query refused: "), line
    assert snapshot(target) == before
    # The run is intact: its manifest and results still read.
    assert box.run.read_manifest()["run_id"] == box.run.run_id
    assert query(box.run, "SELECT count(*) FROM results")[1] == [(6,)]


# -- reads -------------------------------------------------------------------------------


def read_cases(box: Sandbox) -> list[str]:
    sibling = box.sibling
    return [
        f"SELECT * FROM read_text('{sibling}')",
        f"SELECT * FROM read_csv('{sibling}')",
        f"SELECT * FROM read_blob('{sibling}')",
        f"SELECT * FROM glob('{box.data}/*')",
        "SELECT * FROM read_text('.tmp/secret.txt')",
        f"SELECT * FROM read_text('{box.tmp_file}')",
        f"SELECT * FROM read_csv('{box.data}/../data/other.csv')",
        f"SELECT * FROM read_text('file://{sibling}')",
        f"SELECT * FROM read_text(['{box.run.path}/manifest.json', '{sibling}'])",
        f"SELECT * FROM read_text('{box.data}/*.csv')",
        "SELECT * FROM read_text('/etc/hostname')",
        f"SELECT * FROM read_csv('{sibling}') UNION ALL SELECT row_id FROM results",
    ]


@pytest.mark.parametrize("case", range(12))
def test_reads_outside_the_run_are_refused(box: Sandbox, case: int) -> None:
    """read_text/read_csv/read_blob/glob of a file beside the input, of `./.tmp` of the cwd,
    of a path dressed up (`..`, file://, a list, a glob) fail, and the secret never shows.
    read_text of the sibling and of `./.tmp` go through the CLI."""
    sql = read_cases(box)[case]
    if case in (0, 4):
        code, out, err = box.cli("query", box.run.run_id, sql, "--format", "json")
        refused(code, out, err)
        assert SIBLING_SECRET not in out + err and TMP_SECRET not in out + err
        return
    with pytest.raises(UsageError) as info:
        query(box.run, sql)
    assert str(info.value).startswith(("query refused: ", "query failed: "))
    assert SIBLING_SECRET not in str(info.value) and TMP_SECRET not in str(info.value)


def test_no_temp_directory_is_used(box: Sandbox) -> None:
    """The sandbox spills nowhere: DuckDB's temp directory is off, so `./.tmp` of the
    caller (DuckDB's default, which it lets queries read and write) is not in play."""
    code, out, err = box.cli(
        "query", box.run.run_id, "SELECT current_setting('temp_directory') AS d", "--format", "csv"
    )
    assert code == 0, err
    assert out.splitlines() == ["d", '""'] or out.splitlines() == ["d", ""]
    assert sorted(os.listdir(box.folder / ".tmp")) == ["secret.txt"]


# -- configuration, extensions, secrets --------------------------------------------------

CONFIG_CASES = [
    "SET enable_external_access = true",
    "RESET lock_configuration",
    "SET allowed_paths = ['/etc/hostname']",
    "INSTALL httpfs",
    "LOAD httpfs",
    "LOAD '/nonexistent/ext.duckdb_extension'",
    "PRAGMA enable_profiling",
    "PRAGMA version",
    "CREATE SECRET s (TYPE s3, KEY_ID 'a', SECRET 'b')",
    "SELECT * FROM enable_logging()",
    "SELECT * FROM enable_profiling()",
    "CALL pragma_version()",
    "USE memory",
    "EXPLAIN ANALYZE SELECT 1",
]


@pytest.mark.parametrize("case", range(len(CONFIG_CASES)))
def test_configuration_extensions_and_secrets_are_refused(box: Sandbox, case: int) -> None:
    """SET/RESET, INSTALL/LOAD, PRAGMA, CREATE SECRET, logging and profiling switches fail;
    afterwards the sandbox still holds (a file outside stays unreadable). SET,
    INSTALL, PRAGMA and CREATE SECRET go through the CLI."""
    sql = CONFIG_CASES[case]
    if case in (0, 3, 6, 8):
        refused(*box.cli("query", box.run.run_id, sql))
    else:
        with pytest.raises(UsageError, match=r"^query (refused|failed): "):
            query(box.run, sql)
    with pytest.raises(UsageError, match=r"^query refused: "):
        query(box.run, f"SELECT * FROM read_text('{box.sibling}')")


# -- URLs --------------------------------------------------------------------------------


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A listening loopback socket nothing should connect to (a connection, even one closed
    at once, would wait in its accept queue)."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    yield server
    server.close()


def nothing_connected(server: socket.socket) -> bool:
    server.setblocking(False)
    try:
        conn, _ = server.accept()
    except BlockingIOError:
        return True
    conn.close()
    return False


@pytest.mark.parametrize(
    "template",
    [
        "SELECT * FROM read_text('http://127.0.0.1:{port}/x')",
        "SELECT * FROM read_csv('http://127.0.0.1:{port}/x.csv')",
        "SELECT * FROM read_parquet('https://127.0.0.1:{port}/x.parquet')",
        "SELECT * FROM read_json('http://127.0.0.1:{port}/x.json')",
    ],
)
def test_urls_are_refused_and_the_server_receives_nothing(
    box: Sandbox, listener: socket.socket, template: str
) -> None:
    """A URL in user SQL is refused; a server on loopback sees no connection."""
    sql = template.format(port=listener.getsockname()[1])
    if "read_text" in sql:
        refused(*box.cli("query", box.run.run_id, sql))
    else:
        with pytest.raises(UsageError, match=r"^query (refused|failed): "):
            query(box.run, sql)
    assert nothing_connected(listener)


# -- what stays allowed ------------------------------------------------------------------


@pytest.mark.parametrize(
    "sql",
    [
        "SELECT count(*) FROM results",
        "FROM attempts SELECT count(*)",
        "WITH x AS (SELECT row_id FROM results) SELECT count(*) FROM x",
        "SELECT count(*) FROM input i JOIN results r USING (row_index)",
        "SELECT count(*) FROM (DESCRIBE results)",
        "SELECT count(*) FROM costed",
    ],
)
def test_reading_the_run_still_works(box: Sandbox, sql: str) -> None:
    """SELECTs over the views, the input and the run's own part files run in the sandbox."""
    _, rows = query(box.run, sql)
    assert rows[0][0] > 0


def test_the_runs_own_part_files_read(box: Sandbox) -> None:
    """A part file of the run can be read by name: it is one of the files allowed."""
    (part, *_) = sorted(box.run.parts_dir.glob("*.parquet"))
    _, rows = query(box.run, f"SELECT count(*) AS n FROM read_parquet('{part}')")
    assert rows[0][0] > 0


def test_a_parquet_input_reads_but_its_neighbours_do_not(tmp_path: Path) -> None:
    """With a Parquet input the view reads the file itself (allowed by exact path), while a
    Parquet file beside it stays unreadable."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    write_rows(tmp_path / "data.parquet", [{"id": f"r{i}", "text": f"q {i}"} for i in range(3)])
    pq.write_table(pa.table({"secret": [SIBLING_SECRET]}), tmp_path / "other.parquet")
    write_spec(tmp_path, spec_text(input_path="data.parquet"))
    done = run_cli("submit", "job.toml", "--runs-dir", "runs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    (path,) = (tmp_path / "runs").iterdir()
    run = RunDir(path)
    _, rows = query(run, "SELECT count(*) FROM input i JOIN results r USING (row_index)")
    assert rows == [(3,)]
    with pytest.raises(UsageError, match=r"^query refused: ") as info:
        query(run, f"SELECT * FROM read_parquet('{tmp_path}/other.parquet')")
    assert SIBLING_SECRET not in str(info.value)
    with pytest.raises(UsageError, match=r"^query refused: "):
        query(run, f"COPY (SELECT 1 AS x) TO '{tmp_path}/data.parquet' (USE_TMP_FILE false)")
    assert pq.read_table(tmp_path / "data.parquet").num_rows == 3

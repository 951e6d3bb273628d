"""DuckDB over a run's committed parts and journal: summaries, user SQL and exports.

The only module that imports duckdb. Runs in memory over Parquet files (a DuckDB database
file held by a writer could not be read by anyone else), never takes the run's lock, and
never prints: it returns rows and dicts for `cli` to render.

Views:  attempts  every journaled attempt (retries included)
        results   one row per (row_id, model): the latest final record
        input     the run's input file, with its 0-based `row_index`
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from runner.errors import UsageError
from runner.journal import read_segment, segments
from runner.sink import ANSWER_COLUMNS, REUSED_COLUMNS, SCHEMA, parts, to_table
from runner.source import detect_format
from runner.state import RunDir


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


class RunDB:
    """An in-memory DuckDB connection with the run's views."""

    def __init__(self, run: RunDir, *, with_input: bool = True) -> None:
        self.run = run
        self.manifest = run.read_manifest()
        self.con = duckdb.connect(":memory:")
        files = [str(p) for p in parts(run.parts_dir)]
        journal = [r for s in segments(run.journal_dir) for r in read_segment(s)]
        self._journal = to_table(journal) if journal else SCHEMA.empty_table()
        self.con.register("journal_records", self._journal)
        if files:
            listed = ", ".join(_sql_str(f) for f in files)
            source = f"SELECT * FROM read_parquet([{listed}]) UNION ALL BY NAME "
        else:
            source = ""
        self.con.execute(f"CREATE VIEW attempts AS {source}SELECT * FROM journal_records")
        self.con.execute(
            "CREATE VIEW latest AS SELECT * EXCLUDE (final) FROM attempts WHERE final "
            "QUALIFY row_number() OVER (PARTITION BY row_id, model "
            "ORDER BY finished_at DESC, attempts DESC) = 1"
        )
        # A reused row shows the answer of the ok result it reused (same request hash).
        filled = ", ".join(f"coalesce(l.{c}, a.{c}) AS {c}" for c in REUSED_COLUMNS)
        taken = ", ".join(REUSED_COLUMNS)
        self.con.execute(
            f"CREATE VIEW results AS SELECT l.* REPLACE ({filled}) FROM latest l "
            f"LEFT JOIN (SELECT DISTINCT ON (request_hash) request_hash, {taken} FROM latest "
            "WHERE status = 'ok' AND NOT reused) a "
            "ON l.reused AND a.request_hash = l.request_hash"
        )
        self.input_path: Path | None = None
        if with_input:
            self._input_view()

    def _input_view(self) -> None:
        info = self.manifest.get("input", {})
        path = Path(info.get("path", ""))
        if not path.is_file():
            return
        self.input_path = path
        kind = detect_format(path, "auto") if path.suffix else "jsonl"
        quoted = _sql_str(str(path))
        if kind == "parquet":
            scan = (
                f"SELECT * EXCLUDE (file_row_number), file_row_number AS row_index "
                f"FROM read_parquet({quoted}, file_row_number = true)"
            )
        else:
            reader = (
                f"read_csv({quoted}, all_varchar = true)"
                if kind == "csv"
                else f"read_json({quoted}, format = 'newline_delimited')"
            )
            # One thread keeps the scan in file order, so row_number() is the row index.
            self.con.execute("SET threads = 1")
            self.con.execute(f"CREATE TEMP TABLE input_rows AS SELECT * FROM {reader}")
            self.con.execute("RESET threads")
            scan = "SELECT *, (rowid)::BIGINT AS row_index FROM input_rows"
        self.con.execute(f"CREATE VIEW input AS {scan}")

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> RunDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def query(
        self, sql: str, params: Sequence[Any] | None = None
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        try:
            cursor = self.con.execute(sql, params or [])
        except duckdb.Error as exc:
            raise UsageError(f"query failed: {str(exc).splitlines()[0]}") from None
        names = [d[0] for d in cursor.description or []]
        return names, cursor.fetchall()

    def arrow(self, sql: str) -> pa.Table:
        return self.con.sql(sql).to_arrow_table()


def summary(run: RunDir) -> dict[str, Any]:
    """Counts and token sums over the run's settled results (works mid-run)."""
    with RunDB(run, with_input=False) as db:
        names, rows = db.query(
            "SELECT count(*) FILTER (status = 'ok') AS ok, "
            "count(*) FILTER (status = 'failed') AS failed, "
            "count(*) FILTER (status = 'skipped') AS skipped, "
            "sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens, "
            "sum(cached_tokens) AS cached_tokens, sum(reasoning_tokens) AS reasoning_tokens, "
            "sum(total_tokens) AS total_tokens FROM results"
        )
        result = dict(zip(names, rows[0], strict=True))
        _, requests = db.query("SELECT count(*) FROM attempts WHERE attempts > 0")
        result["requests"] = requests[0][0]
        _, errors = db.query(
            "SELECT error_type, count(*) AS n FROM results WHERE status = 'failed' "
            "GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 5"
        )
        result["top_errors"] = [{"error_type": e, "rows": n} for e, n in errors]
    manifest = run.read_manifest()
    result["total"] = (manifest.get("counts") or {}).get("total") or (
        manifest.get("input", {}).get("rows")
    )
    result["state"] = manifest.get("state")
    result["run_id"] = run.run_id
    return result


EXPORT_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def export(run: RunDir, out: Path) -> int:
    """Write input columns + answer columns, in input order; returns rows written."""
    kind = EXPORT_FORMATS.get(out.suffix.lower())
    if kind is None:
        raise UsageError(f"{out}: unknown output type: use .parquet, .jsonl or .csv")
    with RunDB(run) as db:
        if db.input_path is None:
            raise UsageError(
                f"the input file of run {run.run_id} is gone ({db.manifest['input']['path']})"
            )
        input_columns = [c for c in db.query("SELECT * FROM input LIMIT 0")[0] if c != "row_index"]
        answer = [c for c in ANSWER_COLUMNS if c not in ("row_id",)]
        picked = ", ".join(
            f'r."{c}" AS "{"answer_" + c if c in input_columns else c}"' for c in answer
        )
        inputs = ", ".join(f'i."{c}"' for c in input_columns)
        select = (
            f"SELECT {inputs}{', ' if inputs else ''}r.row_id, {picked} FROM input i "
            "LEFT JOIN results r ON r.row_index = i.row_index ORDER BY i.row_index, r.model"
        )
        options = {"parquet": "FORMAT parquet", "json": "FORMAT json", "csv": "FORMAT csv, HEADER"}
        tmp = out.with_name(out.name + ".tmp")
        db.con.execute(f"COPY ({select}) TO {_sql_str(str(tmp))} ({options[kind]})")
        tmp.replace(out)
        _, count = db.query(f"SELECT count(*) FROM ({select})")
        return int(count[0][0])


def status(run: RunDir) -> dict[str, Any]:
    """A run's progress for `runner status`: manifest plus live counts."""
    manifest = run.read_manifest()
    live = summary(run)
    holder = run.holder_pid()
    return {
        "run_id": run.run_id,
        "job_name": manifest.get("job_name"),
        "state": "running" if holder else manifest.get("state"),
        "pid": holder,
        "total": live.get("total"),
        "ok": live["ok"],
        "failed": live["failed"],
        "skipped": live["skipped"],
        "requests": live["requests"],
        "prompt_tokens": live["prompt_tokens"],
        "completion_tokens": live["completion_tokens"],
        "created_at": manifest.get("created_at"),
        "updated_at": manifest.get("updated_at"),
        "path": str(run.path),
    }


def to_json(value: Any) -> str:
    return json.dumps(value, indent=2, default=str)

"""DuckDB over a run's committed parts and journal: summaries, user SQL and exports.

The only module that imports duckdb. Runs in memory over Parquet files (a DuckDB database
file held by a writer could not be read by anyone else), never takes the run's lock, and
never prints: it returns rows and dicts for `cli` to render.

Views:  attempts  every journaled attempt (retries included)
        results   one row per current input row and model (its key: row id, model,
                  request hash), the latest final record; `reused` rows were answered by
                  an identical request, bought once on row `reused_from`, tokens NULL
        costed    results plus cost_usd and cost_provenance (provider, override,
                  price-table, free, unpriced, unknown-usage, none)
        prices    the price table in force (model, rates per million tokens, provenance)
        input     the run's input file, with its 0-based `row_index`
        parsed    row_id, model and one typed column per top-level property of the run's
                  JSON Schema: the answer's fields, NULL where the row has no valid answer
                  (built on demand, in Python: report/parsed.py)
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import tomllib
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from runner.errors import InputError, UsageError
from runner.input.source import InputFile, detect_format
from runner.report.parsed import Fields, parsed_table, run_fields
from runner.report.pricing import (
    COST_SQL,
    PriceRow,
    PriceSource,
    load_price_file,
    parse_price_table,
    price_sql_table,
)
from runner.spec import InputSpec, input_spec_of
from runner.store.journal import read_segment
from runner.store.sink import ANSWER_COLUMNS, COLUMNS, REUSED_COLUMNS, SCHEMA, to_table
from runner.store.state import Manifest, RunDir, input_fingerprint, results_unreadable

_TOKEN_COLUMNS = (
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cached_tokens",
    "reasoning_tokens",
)


def _sql_str(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _ident(name: str) -> str:
    """A column name as a quoted SQL identifier (a `"` in it doubled)."""
    return '"' + name.replace('"', '""') + '"'


def _blank(path: Path) -> bool:
    """A text input with nothing but white space in it."""
    if path.stat().st_size > 65_536:
        return False
    return not path.read_bytes().strip()


def _costed_sql(source: str) -> str:
    """Rows of `source` with their cost and its provenance (provider, override, ...)."""
    return (
        "SELECT r.*, "
        "CASE WHEN r.provider_cost IS NOT NULL THEN r.provider_cost "
        "WHEN r.status = 'skipped' OR r.reused THEN 0.0 "
        "WHEN p.input_per_mtok IS NULL THEN NULL "
        "WHEN r.prompt_tokens IS NULL OR r.completion_tokens IS NULL THEN NULL "
        f"ELSE {COST_SQL} END AS cost_usd, "
        "CASE WHEN r.provider_cost IS NOT NULL THEN 'provider' "
        "WHEN r.status = 'skipped' OR r.reused THEN 'none' "
        "WHEN p.input_per_mtok IS NULL THEN 'unpriced' "
        "WHEN r.prompt_tokens IS NULL OR r.completion_tokens IS NULL THEN 'unknown-usage' "
        "ELSE p.provenance END AS cost_provenance "
        f"FROM {source} r LEFT JOIN prices p ON p.model = r.model"
    )


class RunDB:
    """An in-memory DuckDB connection with the run's views."""

    def __init__(
        self,
        run: RunDir,
        *,
        with_input: bool = True,
        prices: Sequence[PriceRow] = (),
        sandboxed: bool = False,
        with_parsed: bool = False,
    ) -> None:
        self.run = run
        self.manifest = run.read_manifest()
        # DuckDB spills to `.tmp` of the current folder by default, and lets queries read and
        # write its temp directory whatever else is locked: a sandbox spills nowhere, other
        # uses into a private folder removed on close.
        self._spill: weakref.finalize[Any, Any] | None = None
        temp_directory = ""
        if not sandboxed:
            temp_directory = tempfile.mkdtemp(prefix="runner-duckdb-")
            # Removed on close, or when this object goes away (a view that failed to build).
            self._spill = weakref.finalize(self, shutil.rmtree, temp_directory, True)
        self.con = duckdb.connect(":memory:", config={"temp_directory": temp_directory})
        self._files: list[str] = []
        # DuckDB draws its own progress bar on long queries; this module never prints.
        self.con.execute("SET enable_progress_bar = false")
        files = [str(p) for p in run.part_paths()]
        self._files.extend(files)
        journal = [r for s in run.journal_paths() for r in read_segment(s)]
        self._journal = to_table(journal) if journal else SCHEMA.empty_table()
        self.con.register("journal_records", self._journal)
        if files:
            listed = ", ".join(_sql_str(f) for f in files)
            # By name: parts written before a column existed (charged_usd, validation_error)
            # have it NULL, whichever part comes first.
            source = (
                f"SELECT * FROM read_parquet([{listed}], union_by_name = true) UNION ALL BY NAME "
            )
        else:
            source = ""
        try:
            self._result_views(run, source)
        except duckdb.Error as exc:
            self.con.close()
            # A part file that is not Parquet (damaged, truncated, replaced): the user's to
            # look at, not an internal error.
            raise results_unreadable(run.parts_dir, exc) from None
        self.input_path: Path | None = None
        if with_input:
            self._input_view()
        self.fields: Fields | None = None
        self.parsed_error: str | None = None  # why there is no `parsed` view
        if with_parsed:
            self._parsed_view()
        self.con.execute(
            "CREATE TABLE prices (model VARCHAR, input_per_mtok DOUBLE, "
            "cached_input_per_mtok DOUBLE, output_per_mtok DOUBLE, provenance VARCHAR)"
        )
        self.use_prices(prices)
        if sandboxed:
            self.sandbox()

    def _result_views(self, run: RunDir, source: str) -> None:
        """attempts, latest and results over the part files and the journal."""
        self.con.execute(f"CREATE VIEW attempts AS {source}SELECT * FROM journal_records")
        # A row is known by its key: (row id, model, request hash), the row id being the id
        # column's value or the row number. While the input never changed, every record is
        # of a current row; once it has, row_keys.parquet lists the current rows (with their
        # current row_index), and rows that left the input stay in `attempts` only.
        keys = run.row_keys_path
        if keys.exists():
            self._files.append(str(keys))  # read by the views: the sandbox must allow it
            self.con.execute(
                "CREATE VIEW latest AS SELECT a.* EXCLUDE (final) REPLACE (k.row_index AS "
                "row_index) FROM (SELECT * FROM attempts WHERE final QUALIFY row_number() OVER "
                "(PARTITION BY row_id, model, request_hash ORDER BY finished_at DESC, "
                f"attempts DESC) = 1) a JOIN read_parquet({_sql_str(str(keys))}) k "
                "ON k.row_id = a.row_id AND k.model = a.model "
                "AND k.request_hash = a.request_hash"
            )
        else:
            self.con.execute(
                # (row id and row number go together while the input never changed)
                "CREATE VIEW latest AS SELECT * EXCLUDE (final) FROM attempts WHERE final "
                "QUALIFY row_number() OVER (PARTITION BY row_index, model "
                "ORDER BY finished_at DESC, attempts DESC) = 1"
            )
        # A reused row shows the answer bought for its request (same request hash, whichever
        # row bought it, current or not), names that row in reused_from, and has no tokens
        # of its own: they were paid once, on that row.
        filled = ", ".join(f"coalesce(l.{c}, a.{c}) AS {c}" for c in REUSED_COLUMNS)
        unpaid = ", ".join(
            f"CASE WHEN l.reused THEN NULL ELSE l.{c} END AS {c}" for c in _TOKEN_COLUMNS
        )
        taken = ", ".join(REUSED_COLUMNS)
        # The answers reused rows take, looked up once (a scan of one column when none is).
        (any_reused,) = self.con.execute("SELECT bool_or(reused) FROM attempts").fetchone() or (
            None,
        )
        self.con.execute(
            "CREATE TEMP TABLE reused_answers AS SELECT DISTINCT ON (request_hash) "
            f"request_hash, row_id, {taken} FROM attempts WHERE final AND status = 'ok' "
            "AND NOT reused AND request_hash IN (SELECT request_hash FROM attempts WHERE reused) "
            f"{'' if any_reused else 'AND false '}ORDER BY request_hash, finished_at, row_id"
        )
        self.con.execute(
            f"CREATE VIEW results AS SELECT l.* REPLACE ({filled}, {unpaid}), "
            "a.row_id AS reused_from FROM latest l LEFT JOIN reused_answers a "
            "ON l.reused AND a.request_hash = l.request_hash"
        )

    def models(self) -> list[str]:
        return [str(m) for (m,) in self.query("SELECT DISTINCT model FROM attempts ORDER BY 1")[1]]

    def use_prices(self, prices: Sequence[PriceRow]) -> None:
        """Fill `prices`; `costed` is results with a cost and its provenance per row."""
        self.con.execute("DELETE FROM prices")
        if prices:
            self.con.executemany("INSERT INTO prices VALUES (?, ?, ?, ?, ?)", list(prices))
        self.con.execute(f"CREATE OR REPLACE VIEW costed AS {_costed_sql('results')}")

    def sandbox(self) -> None:
        """Lock user SQL in: the run's part files (and a Parquet input) by exact path, no
        other file, no URL, no extension, no temp directory, configuration locked.

        Exact paths are readable and writable alike to DuckDB: `query` runs a single SELECT
        only, so nothing writes. The order matters (DuckDB refuses other orders): views
        first, then the allowed paths, then external access off, then the lock.
        """
        if self._files:
            listed = ", ".join(map(_sql_str, self._files))
            self.con.execute(f"SET allowed_paths = [{listed}]")
        self.con.execute("SET allowed_directories = []")
        self.con.execute("SET enable_external_access = false")
        self.con.execute("SET autoload_known_extensions = false")
        self.con.execute("SET autoinstall_known_extensions = false")
        self.con.execute("SET allow_community_extensions = false")
        # Python variables of the caller's frames are not tables here.
        self.con.execute("SET python_enable_replacements = false")
        self.con.execute("SET lock_configuration = true")

    def _parsed_view(self) -> None:
        """`parsed`: the answers' fields as typed columns, from a table made in Python (the
        answers are checked against the run's schema as they were when they came in)."""
        try:
            self.fields = run_fields(self.run, self.manifest)
        except UsageError as exc:
            # No view; the reason is for whoever asks for it (a query that only mentions
            # the word, in a string say, runs as if it had not).
            self.parsed_error = str(exc)
            return
        answers = self.arrow("SELECT row_id, model, status, content FROM results")
        self._parsed = parsed_table(answers, self.fields)
        self.con.register("parsed_rows", self._parsed)
        self.con.execute("CREATE VIEW parsed AS SELECT * FROM parsed_rows")

    def _input_view(self) -> None:
        info = self.manifest.get("input", {})
        path = Path(info.get("path", ""))
        if not path.is_file():
            return
        self.input_path = path
        try:
            self._read_input(path, _frozen_input_spec(self.run, path))
        except InputError as exc:
            raise UsageError(f"the run's input cannot be read: {exc}") from None
        except (duckdb.Error, pa.ArrowException, OSError) as exc:
            raise UsageError(
                f"{path}: the run's input cannot be read ({str(exc).splitlines()[0]})"
            ) from None

    def _read_input(self, path: Path, spec: InputSpec) -> None:
        """The `input` view, the file read as the runner reads it: Parquet as it is, CSV with
        the spec's dialect and encoding, every column text, JSONL with each column's type
        taken from every line (a column whose type changes down the file is JSON)."""
        kind = detect_format(path, spec.format) if path.suffix or spec.format != "auto" else "jsonl"
        quoted = _sql_str(str(path))
        if kind != "parquet" and _blank(path):
            # DuckDB would invent a column for a file with no rows at all.
            self.con.execute("CREATE VIEW input AS SELECT NULL::BIGINT AS row_index WHERE false")
            return
        if kind == "parquet":
            self._files.append(str(path))
            scan = (
                f"SELECT * EXCLUDE (file_row_number), file_row_number AS row_index "
                f"FROM read_parquet({quoted}, file_row_number = true)"
            )
            self.con.execute(f"CREATE VIEW input AS {scan}")
            return
        # One thread keeps the scan in file order, so the row id is the row index.
        self.con.execute("SET threads = 1")
        if kind == "csv":
            source = InputFile(path, spec)
            header = source.columns()
            batches = source.csv_batches()
            schema = pa.schema([pa.field(name, pa.string()) for name in header])
            stream = pa.RecordBatchReader.from_batches(schema, batches)
            self.con.register("input_stream", stream)
            self.con.execute("CREATE TEMP TABLE input_rows AS SELECT * FROM input_stream")
            self.con.unregister("input_stream")
        else:
            self.con.execute(
                "CREATE TEMP TABLE input_rows AS SELECT * FROM read_json("
                f"{quoted}, format = 'newline_delimited', sample_size = -1, "
                f"maximum_object_size = {1 << 30})"
            )
        self.con.execute("RESET threads")
        self.con.execute(
            "CREATE VIEW input AS SELECT *, (rowid)::BIGINT AS row_index FROM input_rows"
        )

    def close(self) -> None:
        self.con.close()
        if self._spill is not None:
            self._spill()

    def __enter__(self) -> RunDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def query(
        self, sql: str, params: Sequence[Any] | None = None
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        try:
            cursor = self.con.execute(sql, params or [])
        except duckdb.PermissionException as exc:
            raise UsageError(
                "query refused: SQL here may read this run's own files only, no other file, "
                f"URL or extension ({str(exc).splitlines()[0]})"
            ) from None
        except duckdb.Error as exc:
            raise UsageError(f"query failed: {str(exc).splitlines()[0]}") from None
        names = [d[0] for d in cursor.description or []]
        return names, cursor.fetchall()

    def arrow(self, sql: str) -> pa.Table:
        return self.con.sql(sql).to_arrow_table()


def _frozen_input_spec(run: RunDir, path: Path) -> InputSpec:
    """The [input] table of the run's frozen spec (format, CSV dialect), or the defaults
    when the spec cannot be read."""
    try:
        text = run.spec_path.read_text()
    except OSError:
        text = ""
    found = input_spec_of(text, str(path))
    return found if found is not None else InputSpec(path=str(path), prompt_column="")


def summary(run: RunDir) -> dict[str, Any]:
    """Counts and token sums over the run's settled results (works mid-run)."""
    with RunDB(run, with_input=False) as db:
        names, rows = db.query(
            "SELECT count(*) FILTER (status = 'ok') AS ok, "
            # Rows `invalid` (answers that failed the [output] schema) are rows failed too.
            "count(*) FILTER (status IN ('failed', 'invalid')) AS failed, "
            "count(*) FILTER (status = 'skipped') AS skipped, "
            "count(*) FILTER (status = 'invalid') AS invalid, "
            "sum(prompt_tokens) AS prompt_tokens, sum(completion_tokens) AS completion_tokens, "
            "sum(cached_tokens) AS cached_tokens, sum(reasoning_tokens) AS reasoning_tokens, "
            "sum(total_tokens) AS total_tokens FROM results"
        )
        result = dict(zip(names, rows[0], strict=True))
        _, requests = db.query("SELECT count(*) FROM attempts WHERE attempts > 0")
        result["requests"] = requests[0][0]
        result["top_errors"] = _top_errors(db, 5)
    manifest = run.read_manifest()
    result["total"] = (manifest.get("counts") or {}).get("total") or (
        manifest.get("input", {}).get("rows")
    )
    result["state"] = manifest.get("state")
    result["run_id"] = run.run_id
    return result


def row_attempts(run: RunDir, row_id: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """One row's story, for all models: every journaled attempt, oldest first, each with its
    cost (cost_usd: NULL for an unpriced model or an attempt without usage), and its rows of
    `results` (a reused row's answer filled in from the row that bought it)."""
    prices = price_rows(run)
    with RunDB(run, with_input=False, prices=prices) as db:
        attempts = db.query(
            f"SELECT * FROM ({_costed_sql('attempts')}) WHERE row_id = ? "
            "ORDER BY model, finished_at, attempts",
            [row_id],
        )
        results = db.query("SELECT * FROM results WHERE row_id = ? ORDER BY model", [row_id])
    return _dicts(attempts), _dicts(results)


def _dicts(found: tuple[list[str], list[tuple[Any, ...]]]) -> list[dict[str, Any]]:
    names, rows = found
    return [dict(zip(names, row, strict=True)) for row in rows]


def _top_errors(db: RunDB, limit: int) -> list[dict[str, Any]]:
    _, errors = db.query(
        "SELECT error_type, error_message, count(*) AS n FROM latest WHERE status = 'failed' "
        f"GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2 LIMIT {int(limit)}"
    )
    return [{"error_type": e, "message": m, "rows": n} for e, m, n in errors]


def top_errors(run: RunDir, limit: int = 5) -> list[dict[str, Any]]:
    """The most frequent (error type, message) pairs among failed rows, with row counts:
    what an end-of-run summary shows about why rows failed."""
    with RunDB(run, with_input=False) as db:
        return _top_errors(db, limit)


def price_rows(
    run: RunDir, prices_file: Path | None = None, *, models: Sequence[str] | None = None
) -> list[PriceRow]:
    """The price table for a run: the spec's overrides, a --prices file over them, then
    genai-prices for every model the run used."""
    # The spec the run last ran with: `runner resume --spec` may have changed [prices].
    spec_path = run.path / run.read_manifest().get("spec_file", run.spec_path.name)
    try:
        frozen = tomllib.loads(spec_path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        frozen = {}
    overrides = parse_price_table(frozen.get("prices", {}), path=str(spec_path))
    if prices_file is not None:
        overrides = {**overrides, **load_price_file(prices_file)}
    if models is None:
        with RunDB(run, with_input=False) as db:
            models = db.models()
    source = PriceSource(overrides)
    return price_sql_table({m: source.price(m) for m in models}, models)


_TEXT_COLUMNS = {*REUSED_COLUMNS, "error_message", "request_hash"}
Section = tuple[str, list[str], list[tuple[Any, ...]]]  # title, column names, rows
GROUPS = {
    "model": "model",
    "status": "status",
    "finish_reason": "finish_reason",
    "error_type": "error_type",
    "hour": "strftime(date_trunc('hour', finished_at), '%Y-%m-%d %H:00Z')",
}


def report(run: RunDir, *, by: str | None = None, prices_file: Path | None = None) -> list[Section]:
    """The report's sections: a one-screen overview, or one table grouped `by` a column."""
    with RunDB(run, with_input=False) as db:
        db.use_prices(price_rows(run, prices_file, models=db.models()))
        # Every answer paid for: final ok ones and re-asked ones (non-final, with usage).
        db.con.execute(
            "CREATE TEMP VIEW paid AS SELECT * EXCLUDE (final) FROM attempts WHERE NOT reused "
            "AND (prompt_tokens IS NOT NULL OR provider_cost IS NOT NULL "
            "OR (final AND status = 'ok'))"
        )
        # One pass to settle each row's latest state, without the answer texts (reports
        # never show them); every section reads that.
        lean = ", ".join(c for c in COLUMNS if c not in _TEXT_COLUMNS and c != "final")
        db.con.execute(
            f"CREATE TEMP TABLE costed_now AS SELECT {lean}, finish_reason, request_hash, "
            f"cost_usd, cost_provenance FROM ({_costed_sql('latest')})"
        )
        # A reused row finished as the answer it reused did.
        db.con.execute(
            "UPDATE costed_now c SET finish_reason = a.finish_reason FROM (SELECT DISTINCT ON "
            "(request_hash) request_hash, finish_reason FROM costed_now "
            "WHERE status = 'ok' AND NOT reused) a "
            "WHERE c.reused AND c.finish_reason IS NULL AND a.request_hash = c.request_hash"
        )
        db.con.execute("CREATE OR REPLACE TEMP VIEW results AS SELECT * FROM costed_now")
        db.con.execute("CREATE OR REPLACE TEMP VIEW costed AS SELECT * FROM costed_now")
        if by is not None:
            return [_grouped(db, by)]
        return _overview(db)


def _grouped(db: RunDB, by: str) -> Section:
    if by not in GROUPS:
        raise UsageError(f"--by must be one of {', '.join(GROUPS)} (got {by!r})")
    key = GROUPS[by]
    names, rows = db.query(
        f"SELECT {key} AS {by}, count(*) AS rows, "
        "count(*) FILTER (status = 'ok') AS ok, count(*) FILTER (status = 'failed') AS failed, "
        "sum(prompt_tokens) AS prompt_tokens, sum(cached_tokens) AS cached_tokens, "
        "sum(completion_tokens) AS completion_tokens, sum(reasoning_tokens) AS reasoning_tokens, "
        "round(sum(cost_usd), 6) AS cost_usd, "
        "count(*) FILTER (cost_usd IS NULL AND status != 'skipped') AS uncosted_rows, "
        "string_agg(DISTINCT cost_provenance, '+' ORDER BY cost_provenance) "
        "FILTER (cost_provenance != 'none') AS cost_provenance, "
        "round(quantile_cont(latency_ms, 0.5) FILTER (attempts > 0 AND status = 'ok'), 1) "
        "AS latency_p50_ms "
        f"FROM costed GROUP BY ALL ORDER BY {by} NULLS LAST"
    )
    return (f"by {by}", names, rows)


def _overview(db: RunDB) -> list[Section]:
    manifest = db.manifest
    (row,) = db.query(
        "SELECT count(*) FILTER (status = 'ok'), count(*) FILTER (status = 'failed'), "
        "count(*) FILTER (status = 'skipped'), count(*) FILTER (reused), "
        "quantile_cont(latency_ms, [0.5, 0.9, 0.99]) FILTER (attempts > 0 AND status = 'ok'), "
        "count(*) FILTER (status = 'invalid') FROM results"
    )[1]
    ok, failed, skipped, reused, lat, invalid = row
    # Tokens of every answer paid for: re-asked answers (run.retry_finish_reasons) count too.
    (prompt, cached, completion, reasoning, total) = db.query(
        "SELECT sum(prompt_tokens), sum(cached_tokens), sum(completion_tokens), "
        "sum(reasoning_tokens), sum(total_tokens) FROM paid"
    )[1][0]
    (requests, retries, billed, reasked) = db.query(
        "SELECT count(*) FILTER (attempts > 0), count(*) FILTER (NOT final AND attempts > 0), "
        "count(*) FILTER (possibly_billed), "
        "count(*) FILTER (NOT final AND validation_error IS NOT NULL) FROM attempts"
    )[1][0]
    rows_total = (manifest.get("counts") or {}).get("total")
    settled = ok + failed + skipped + invalid
    wall = db.run.wall_seconds(manifest)
    lat = lat or [None, None, None]
    # With several models a row is asked once per model: those are answers, not rows.
    models = db.models()
    unit = "answers" if len(models) > 1 else "rows"
    apart: list[tuple[Any, ...]] = []
    if len(models) > 1:
        apart = [("input rows", (manifest.get("input") or {}).get("rows")), ("models", len(models))]
    # Answers checked against an [output] schema: shown when any failed it.
    checked: list[tuple[Any, ...]] = []
    if invalid or reasked:
        checked = [
            (f"{unit} invalid (answers failed the schema)", invalid),
            ("invalid answers re-asked (paid, counted)", reasked),
        ]
    overview: list[tuple[Any, ...]] = [
        ("run", db.run.run_id),
        ("state", _state(db.run, manifest)),
        *apart,
        (f"{unit} total", rows_total),
        (f"{unit} ok", ok),
        (f"{unit} failed", failed),
        (f"{unit} skipped", skipped),
        *checked,
        (f"{unit} pending", None if rows_total is None else max(rows_total - settled, 0)),
        (
            "rows answered by an identical request"
            if unit == "rows"
            else "answers reused from an identical request",
            reused,
        ),
        ("requests sent (retries included)", requests),
        ("retried attempts", retries),
        ("wall time s", round(wall, 1)),
        (f"throughput {unit}/s", round(settled / wall, 1) if wall else None),
        ("latency p50 ms", _round(lat[0])),
        ("latency p90 ms", _round(lat[1])),
        ("latency p99 ms", _round(lat[2])),
    ]
    tokens: list[tuple[Any, ...]] = [
        ("prompt", prompt),
        ("cached (inside prompt)", cached),
        ("completion", completion),
        ("reasoning (inside completion)", reasoning),
        ("total", total),
    ]
    cost = db.query(
        "SELECT r.model, r.rows, round(p.cost_usd, 6) AS cost_usd, r.uncosted_rows, "
        "r.provenance FROM (SELECT model, count(*) FILTER (status != 'skipped') AS rows, "
        "count(*) FILTER (cost_usd IS NULL AND status != 'skipped') AS uncosted_rows, "
        "string_agg(DISTINCT cost_provenance, '+' ORDER BY cost_provenance) "
        "FILTER (cost_provenance != 'none') AS provenance "
        "FROM costed GROUP BY model) r "
        f"LEFT JOIN (SELECT model, sum(cost_usd) AS cost_usd FROM ({_costed_sql('paid')}) "
        "GROUP BY model) p ON p.model = r.model ORDER BY r.model"
    )
    errors = db.query(
        "SELECT error_type, error_message AS message, count(*) FILTER (final) AS failed_rows, "
        "count(*) FILTER (NOT final) AS failed_attempts, "
        "count(*) FILTER (possibly_billed) AS possibly_billed "
        "FROM attempts WHERE status = 'failed' GROUP BY 1, 2 "
        "ORDER BY 3 DESC, 4 DESC, 1, 2 LIMIT 10"
    )
    crashed = sum(
        int(session.get("unanswered_at_crash") or 0) for session in manifest.get("sessions", [])
    )
    billed_rows = [
        ("failed attempts sent without a usable answer (timeouts, drops, 5xx)", billed),
        ("requests in flight at a crash, never answered", crashed),
    ]
    return [
        ("overview", ["metric", "value"], overview),
        ("tokens", ["tokens", "count"], tokens),
        ("cost", *cost),
        ("errors", *errors),
        ("possibly billed", ["metric", "value"], billed_rows),
    ]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)


def _state(run: RunDir, manifest: Manifest) -> str:
    return run.state(manifest)


def query(
    run: RunDir, sql: str, *, prices: Sequence[PriceRow] = ()
) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run user SQL over the views, sandboxed to the run's own files: one SELECT only."""
    _only_one_select(sql)
    needs_input = re.search(r"\binput\b", sql, re.IGNORECASE) is not None
    needs_parsed = re.search(r"\bparsed\b", sql, re.IGNORECASE) is not None
    with RunDB(
        run, with_input=needs_input, prices=prices, sandboxed=True, with_parsed=needs_parsed
    ) as db:
        try:
            return db.query(sql)
        except UsageError as exc:
            if db.parsed_error and "Table with name parsed does not exist" in str(exc):
                raise UsageError(db.parsed_error) from None
            gone = needs_input and db.input_path is None
            if gone and "Table with name input does not exist" in str(exc):
                path = db.manifest.get("input", {}).get("path")
                raise UsageError(
                    f"query failed: the run's input file is gone ({path}): no input view"
                ) from None
            raise


def _only_one_select(sql: str) -> None:
    """Refuse anything but one SELECT (FROM-first, WITH, VALUES, DESCRIBE, SHOW included):
    COPY, EXPORT, ATTACH, SET, PRAGMA, CALL, INSTALL/LOAD, CREATE and EXPLAIN (whose ANALYZE
    runs its statement) never reach DuckDB."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise UsageError(f"query failed: {str(exc).splitlines()[0]}") from None
    if len(statements) != 1:
        raise UsageError(
            f"query refused: give one SELECT statement (got {len(statements)} statements)"
        )
    kind = statements[0].type
    if kind != duckdb.StatementType.SELECT:
        name = str(getattr(kind, "name", kind)).upper()
        raise UsageError(
            f"query refused: only a SELECT may run here, over the run's views (got {name}); "
            "use `runner export` to write a file"
        )


EXPORT_FORMATS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".csv": "csv"}


def _check_output(run: RunDir, out: Path, *, overwrite: bool) -> None:
    """Refuse, as the user's error, an output path export cannot or must not write."""
    if out.is_dir():
        raise UsageError(f"{out}: is a folder; name a file to write")
    parent = out.absolute().parent
    if not parent.exists():
        raise UsageError(f"{out}: folder {out.parent} does not exist")
    if not parent.is_dir():
        raise UsageError(f"{out}: {out.parent} is not a folder")
    target = out.resolve()
    source = Path(run.read_manifest().get("input", {}).get("path", "")).resolve()
    if target == source:
        raise UsageError(f"{out}: is the run's input file")
    if run.path.resolve() in target.parents:
        raise UsageError(f"{out}: is inside the run's folder {run.path}; write elsewhere")
    if out.exists() and not overwrite:
        raise UsageError(f"{out}: exists; add --overwrite to replace it")
    if not os.access(parent, os.W_OK):
        raise UsageError(f"{out}: folder {out.parent} is not writable")


def export(run: RunDir, out: Path, *, overwrite: bool = False, fields: bool = False) -> int:
    """Write input columns + answer columns, in input order; returns rows written.

    `fields`: the answer's fields as typed columns (the `parsed` view's) in place of its
    text (content, refusal, tool calls and the response's ids)."""
    kind = EXPORT_FORMATS.get(out.suffix.lower())
    if kind is None:
        raise UsageError(f"{out}: unknown output type: use .parquet, .jsonl or .csv")
    _check_output(run, out, overwrite=overwrite)
    with RunDB(run, with_parsed=fields) as db:
        if db.input_path is None:
            raise UsageError(
                f"the input file of run {run.run_id} is gone ({db.manifest['input']['path']})"
            )
        if fields and db.fields is None:
            raise UsageError(db.parsed_error or f"run {run.run_id} has no typed fields")
        _check_same_input(run, db.manifest, db.input_path)
        input_columns = [c for c in db.query("SELECT * FROM input LIMIT 0")[0] if c != "row_index"]
        answer = [c for c in ANSWER_COLUMNS if c not in ("row_id",)]
        parsed_join = ""
        if db.fields is not None:
            present = set(db.query("SELECT * FROM results LIMIT 0")[0])
            answer = [c for c in _FIELDS_ANSWER_COLUMNS if c in present]
        picked = ", ".join(
            f"r.{_ident(c)} AS {_ident('answer_' + c if c in input_columns else c)}" for c in answer
        )
        if db.fields is not None:
            taken = [*input_columns, "row_id", "reused", "reused_from"]
            taken += ["answer_" + c if c in input_columns else c for c in answer]
            names = db.fields.renamed(taken)
            nested = {
                c.name
                for c in db.fields.columns
                if pa.types.is_nested(c.arrow)  # CSV has no nested values: JSON text there
            }
            typed = [
                f"to_json(p.{_ident(old)})::VARCHAR AS {_ident(new)}"
                if kind == "csv" and column.name in nested
                else f"p.{_ident(old)} AS {_ident(new)}"
                for old, new, column in zip(db.fields.names, names, db.fields.columns, strict=True)
            ]
            picked += ", " + ", ".join(typed)
            parsed_join = " LEFT JOIN parsed p ON p.row_id = r.row_id AND p.model = r.model"
        inputs = ", ".join(f"i.{_ident(c)}" for c in input_columns)
        select = (
            f"SELECT {inputs}{', ' if inputs else ''}r.row_id, {picked}, "
            "coalesce(r.reused, false) AS reused, r.reused_from "
            f"FROM input i LEFT JOIN results r ON {_export_join(db, run)}{parsed_join} "
            "ORDER BY i.row_index, r.model"
        )
        options = {"parquet": "FORMAT parquet", "json": "FORMAT json", "csv": "FORMAT csv, HEADER"}
        tmp = out.with_name(out.name + ".tmp")
        try:
            db.con.execute(f"COPY ({select}) TO {_sql_str(str(tmp))} ({options[kind]})")
            tmp.replace(out)
        except (duckdb.IOException, duckdb.PermissionException, OSError) as exc:
            tmp.unlink(missing_ok=True)
            problem = exc.strerror if isinstance(exc, OSError) else str(exc).splitlines()[0]
            raise UsageError(f"{out}: cannot be written ({problem})") from None
        _, count = db.query(f"SELECT count(*) FROM ({select})")
        return int(count[0][0])


# With --fields: the row's state and why it failed, then the fields (not the answer's text).
_FIELDS_ANSWER_COLUMNS = [
    "model",
    "status",
    "finish_reason",
    "validation_error",
    "error_type",
    "error_message",
    "attempts",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
]


def _check_same_input(run: RunDir, manifest: Manifest, path: Path) -> None:
    """Refuse to pair answers with an input file the run has not seen (edited since)."""
    seen = manifest.get("input", {})
    now = input_fingerprint(path, None)
    if any(now[k] != seen.get(k) for k in ("size", "hash")):
        raise UsageError(
            f"{path}: the input changed since run {run.run_id} last ran; run "
            f"`runner resume {run.run_id} --allow-changed-input` (it sends only new and "
            "edited rows), or restore the file, then export"
        )


_ID_TYPES = ("VARCHAR", "BIGINT", "INTEGER", "SMALLINT", "TINYINT", "UBIGINT", "UINTEGER")


def _export_join(db: RunDB, run: RunDir) -> str:
    """How input rows meet their results: by the row's key, never by its position alone.

    With an id column of text or integers, by id (what the runner keys results by); else
    by the row number, which for a run whose input changed is the row's current number, read
    through its key in row_keys.parquet (results.row_index).
    """
    try:
        frozen = tomllib.loads(run.spec_path.read_text())
    except (OSError, tomllib.TOMLDecodeError):
        frozen = {}
    spec_input = frozen.get("input", {})
    column = spec_input.get("id_column")
    if spec_input.get("format") == "openai-batch":
        column = "custom_id"
    if isinstance(column, str):
        kinds = dict(db.query("SELECT column_name, column_type FROM (DESCRIBE input)")[1])
        if kinds.get(column) in _ID_TYPES:
            return f"r.row_id = CAST(i.{_ident(column)} AS VARCHAR)"
    return "r.row_index = i.row_index"


def status(run: RunDir) -> dict[str, Any]:
    """A run's progress for `runner status`: manifest plus live counts."""
    manifest = run.read_manifest()
    live = summary(run)
    holder = run.holder_pid()
    return {
        "run_id": run.run_id,
        "job_name": manifest.get("job_name"),
        "state": run.state(manifest),
        "error": manifest.get("error"),
        "pid": holder,
        "total": live.get("total"),
        "ok": live["ok"],
        "failed": live["failed"],
        "skipped": live["skipped"],
        "invalid": live["invalid"],
        "requests": live["requests"],
        "prompt_tokens": live["prompt_tokens"],
        "completion_tokens": live["completion_tokens"],
        "created_at": manifest.get("created_at"),
        "updated_at": manifest.get("updated_at"),
        "path": str(run.path),
    }


def to_json(value: Any) -> str:
    return json.dumps(value, indent=2, default=str)

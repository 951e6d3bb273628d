"""A run folder as Python sees it: Run (results, report, status, query, export), Status and
Report; `open` and `runs` find runs as the command line does.

Reads through runner/report/query.py (imported on first use: DuckDB is not needed to start a
run) and never takes a run's lock: everything here works while another process runs it.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.parquet as pq

from runner.store.state import RunDir, default_runs_dir, list_runs, resolve_run

if TYPE_CHECKING:
    from runner.engine.job import Outcome

PathLike = str | os.PathLike[str]


def runs_dir_of(runs_dir: PathLike | None) -> Path:
    """The runs folder: as given, else RUNNER_RUNS_DIR, else ./runs (as the CLI's)."""
    return default_runs_dir() if runs_dir is None else Path(runs_dir)


def resolve(ref: str | PathLike | Run, runs_dir: PathLike | None) -> RunDir:
    """A run id, folder, job name (its latest run) or Run, as its folder."""
    if isinstance(ref, Run):
        return ref.run_dir
    return resolve_run(os.fspath(ref), runs_dir_of(runs_dir))


@dataclass(frozen=True, slots=True)
class Status:
    """A run's progress, as `runner status --json` gives it (counted from the run's files,
    so it is right while the run is in progress; never takes the run's lock)."""

    run_id: str
    job_name: str | None
    state: str  # running | interrupted | stopped | completed | failed
    error: str | None  # a failed run's one line
    pid: int | None  # the process running it, when one is
    total: int | None  # rows x models, once known
    ok: int
    failed: int
    skipped: int
    invalid: int  # of `failed`: rows whose answers never matched the [output] schema
    requests: int
    prompt_tokens: int | None
    completion_tokens: int | None
    created_at: str | None
    updated_at: str | None
    path: str

    @property
    def done(self) -> int:
        return self.ok + self.failed + self.skipped


@dataclass(frozen=True, slots=True)
class Report:
    """The figures of `runner report`, as data.

    `tables` is what `runner report --format json` prints: each section's title and its rows
    as dicts by column name ("overview", "tokens", "cost", "errors", "possibly billed"; a
    report `by` a column has the one table "by <column>"). The properties read the overview's
    sections in handier shapes.
    """

    tables: dict[str, list[dict[str, Any]]]

    @property
    def overview(self) -> dict[str, Any]:
        """Metric -> value: state, rows ok/failed/pending, requests, wall time, latency..."""
        return {r["metric"]: r["value"] for r in self.tables.get("overview", [])}

    @property
    def tokens(self) -> dict[str, int | None]:
        """prompt, cached (inside prompt), completion, reasoning (inside completion), total."""
        return {r["tokens"]: r["count"] for r in self.tables.get("tokens", [])}

    @property
    def cost(self) -> list[dict[str, Any]]:
        """One row per model: rows, cost_usd (None when unpriced), uncosted_rows, provenance."""
        return self.tables.get("cost", [])

    @property
    def errors(self) -> list[dict[str, Any]]:
        """The most frequent errors: error_type, message, failed_rows, failed_attempts..."""
        return self.tables.get("errors", [])

    @property
    def possibly_billed(self) -> dict[str, Any]:
        return {r["metric"]: r["value"] for r in self.tables.get("possibly billed", [])}


class Run:
    """A run folder (`runs/<run-id>/`) and what can be read from it.

    Made by `submit`, `run`, `resume` (then `outcome` tells how that session ended) and
    `open`. Every method reads the run's files as they are now: they work while another
    process runs it.
    """

    __slots__ = ("outcome", "run_dir")

    def __init__(self, run_dir: RunDir, outcome: Outcome | None = None) -> None:
        # Absolute: a notebook may change its working folder between calls.
        self.run_dir = run_dir if run_dir.path.is_absolute() else RunDir(run_dir.path.resolve())
        self.outcome = outcome

    def __repr__(self) -> str:
        return f"Run({self.id!r}, state={self.state!r}, path={str(self.path)!r})"

    @property
    def id(self) -> str:
        """The run id: the job's name and the time (UTC) it was submitted."""
        return self.run_dir.run_id

    @property
    def path(self) -> Path:
        """The run's folder."""
        return self.run_dir.path

    @property
    def state(self) -> str:
        """running (a process holds its lock), interrupted (crashed or killed), stopped
        (a clean stop: signal, budget, refused key), completed or failed."""
        return self.run_dir.state()

    @property
    def stop_reason(self) -> str | None:
        """Why the session of `outcome` stopped early (None: it did not, or no session ran
        in this process)."""
        return self.outcome.stop_reason if self.outcome is not None else None

    def status(self) -> Status:
        """Counts, tokens and state, as `runner status` shows them."""
        from runner.report import query as reports

        info = reports.status(self.run_dir)
        values: dict[str, Any] = {f.name: info.get(f.name) for f in dataclasses.fields(Status)}
        return Status(**values)

    def results(self, *, with_input: bool = True) -> pa.Table:
        """The answers in input order, one row per input row and model.

        With the input (the default): the input's columns, then the answer's (`row_id`,
        `model`, `status`, `content`, tokens, `error_type`, ...; a column whose name the
        input uses already is called `answer_<name>`), exactly what `runner export` writes.
        Rows not answered yet have nulls. `with_input=False`: the `results` view alone
        (no need of the input file), ordered by `row_index` and `model`.
        `.to_pandas()` and `polars.from_arrow()` take the table as it is.
        """
        from runner.report import query as reports

        if not with_input:
            with reports.RunDB(self.run_dir, with_input=False) as db:
                table: pa.Table = db.arrow("SELECT * FROM results ORDER BY row_index, model")
            return table
        with tempfile.TemporaryDirectory(prefix="runner-results-") as folder:
            out = Path(folder) / "results.parquet"
            reports.export(self.run_dir, out)
            return pq.read_table(out)

    def report(self, *, by: str | None = None, prices: PathLike | None = None) -> Report:
        """The figures of `runner report` (`by`: model, status, finish_reason, error_type or
        hour, as `--by`; `prices`: a TOML price table, as `--prices`)."""
        from runner.report import query as reports

        sections = reports.report(
            self.run_dir, by=by, prices_file=Path(prices) if prices is not None else None
        )
        return Report(
            {
                title: [dict(zip(names, row, strict=True)) for row in rows]
                for title, names, rows in sections
            }
        )

    def query(self, sql: str, *, prices: PathLike | None = None) -> pa.Table:
        """One SELECT over the run's views (results, attempts, costed, prices, input), in the
        sandbox of `runner query`: the run's own files only, nothing written."""
        from runner.report import query as reports

        run = self.run_dir
        price_rows = reports.price_rows(run, Path(prices) if prices is not None else None)
        names, rows = reports.query(run, sql, prices=price_rows)
        return _arrow_table(names, rows)

    def export(self, path: PathLike, *, overwrite: bool = False) -> int:
        """Write the input's columns and the answers, in input order, to `path` (.parquet,
        .jsonl or .csv), as `runner export`; returns the rows written."""
        from runner.report import query as reports

        return reports.export(self.run_dir, Path(path), overwrite=overwrite)

    def resume(self, **options: Any) -> Run:
        """`runner.resume(this run, **options)`."""
        from runner.api.calls import resume

        return resume(self, **options)


def _arrow_table(names: Sequence[str], rows: Sequence[Sequence[Any]]) -> pa.Table:
    """Rows of a query as a table; a column Arrow cannot type from its values is text."""
    columns = []
    for i in range(len(names)):
        values = [row[i] for row in rows]
        try:
            columns.append(pa.array(values))
        except (pa.ArrowException, TypeError, ValueError):
            columns.append(pa.array([None if v is None else str(v) for v in values]))
    return pa.Table.from_arrays(columns, names=list(names))


def open(ref: str | PathLike | Run, *, runs_dir: PathLike | None = None) -> Run:
    """A run by id, folder, or job name (its latest run), as `runner status RUN` finds it.

    Raises RunNotFound (a UsageError) when there is none.
    """
    return Run(resolve(ref, runs_dir))


def runs(*, runs_dir: PathLike | None = None) -> list[Run]:
    """Every run under `runs_dir`, oldest first (as `runner runs` lists them)."""
    folder = runs_dir_of(runs_dir)
    return [Run(RunDir(folder / str(m["run_id"]))) for m in list_runs(folder)]

"""The Python API: start, resume and read runs from a script or a notebook.

    import runner
    run = runner.submit("jobs/summaries.toml")          # blocks, draws progress, returns a Run
    run = runner.run(df, model="gpt-4o-mini", prompt_column="text", id_column="id",
                     base_url="https://api.routeway.ai/v1", api_key_env="ROUTEWAY_API_KEY")
    run.results()                                       # a pyarrow.Table in input order
    run.report(); run.status(); run.query("SELECT ..."); run.export("out.parquet")
    runner.resume(run.id); runner.open("summaries")

The same run folders as the command line (`runner status/report/resume` work on runs started
here): each call goes through runner/run/job.py, and the CLI's submit and resume go through
`submit_session` and `resume_session` below. `runner.run()` writes its spec as the run's
frozen job.toml and an in-memory table as the run's input.parquet, so a resume needs nothing
from the Python process that started the run.

Event loops: a blocking call runs the run's loop in the calling thread when no loop runs
there and it is the main thread (SIGINT/SIGTERM then drain the run as on the command line);
otherwise (inside Jupyter, whose loop is running, or in another thread) in a worker thread
with its own loop, where a KeyboardInterrupt of the waiting thread drains the run. Either
way, once the run is stopped and its folder consistent, KeyboardInterrupt goes on up. The
`*_async` variants run in the caller's loop and stop when cancelled.

Prints nothing itself (progress is drawn by runner/screens.py); imports no DataFrame
library: a pandas or polars DataFrame is recognised by its type's module and methods.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import os
import re
import sys
import tempfile
import threading
import tomllib
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.from_thread
import pyarrow as pa
import pyarrow.parquet as pq

from runner import screens, tuning
from runner.errors import InputError, SpecError, UsageError
from runner.records import Progress
from runner.run import job
from runner.run.job import Outcome, StopSwitch
from runner.run.plan import prepare_loaded
from runner.spec import check_environment, parse_spec
from runner.store.sink import fsync_dir
from runner.store.state import RunDir, check_writable, default_runs_dir, list_runs, resolve_run

# How `runner.run()` names itself in errors about its arguments (fields as the spec's).
CALL = "runner.run()"
INPUT_FILE = "input.parquet"  # an in-memory table, written into the run's folder
PathLike = str | os.PathLike[str]


# -- what a run is to Python ---------------------------------------------------------------


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

    __slots__ = ("_dir", "outcome")

    def __init__(self, run_dir: RunDir, outcome: Outcome | None = None) -> None:
        self._dir = run_dir
        self.outcome = outcome

    def __repr__(self) -> str:
        return f"Run({self.id!r}, state={self.state!r}, path={str(self.path)!r})"

    @property
    def id(self) -> str:
        """The run id: the job's name and the time (UTC) it was submitted."""
        return self._dir.run_id

    @property
    def path(self) -> Path:
        """The run's folder."""
        return self._dir.path

    @property
    def state(self) -> str:
        """running (a process holds its lock), interrupted (crashed or killed), stopped
        (a clean stop: signal, budget, refused key), completed or failed."""
        return self._dir.state()

    @property
    def stop_reason(self) -> str | None:
        """Why the session of `outcome` stopped early (None: it did not, or no session ran
        in this process)."""
        return self.outcome.stop_reason if self.outcome is not None else None

    def status(self) -> Status:
        """Counts, tokens and state, as `runner status` shows them."""
        from runner.report import query as reports

        info = reports.status(self._dir)
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
            with reports.RunDB(self._dir, with_input=False) as db:
                table: pa.Table = db.arrow("SELECT * FROM results ORDER BY row_index, model")
            return table
        with tempfile.TemporaryDirectory(prefix="runner-results-") as folder:
            out = Path(folder) / "results.parquet"
            reports.export(self._dir, out)
            return pq.read_table(out)

    def report(self, *, by: str | None = None, prices: PathLike | None = None) -> Report:
        """The figures of `runner report` (`by`: model, status, finish_reason, error_type or
        hour, as `--by`; `prices`: a TOML price table, as `--prices`)."""
        from runner.report import query as reports

        sections = reports.report(
            self._dir, by=by, prices_file=Path(prices) if prices is not None else None
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

        run = self._dir
        price_rows = reports.price_rows(run, Path(prices) if prices is not None else None)
        names, rows = reports.query(run, sql, prices=price_rows)
        return _arrow_table(names, rows)

    def export(self, path: PathLike, *, overwrite: bool = False) -> int:
        """Write the input's columns and the answers, in input order, to `path` (.parquet,
        .jsonl or .csv), as `runner export`; returns the rows written."""
        from runner.report import query as reports

        return reports.export(self._dir, Path(path), overwrite=overwrite)

    def resume(self, **options: Any) -> Run:
        """`runner.resume(this run, **options)`."""
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
    return Run(_resolve(ref, runs_dir))


def runs(*, runs_dir: PathLike | None = None) -> list[Run]:
    """Every run under `runs_dir`, oldest first (as `runner runs` lists them)."""
    folder = _runs_dir(runs_dir)
    return [Run(RunDir(folder / str(m["run_id"]))) for m in list_runs(folder)]


# -- starting and resuming -----------------------------------------------------------------


def submit(
    spec: PathLike,
    *,
    runs_dir: PathLike | None = None,
    check: bool = True,
    progress: bool = True,
) -> Run:
    """Start a run of the job spec file `spec` (TOML) and wait for it to end.

    `check=False` skips reading the whole input first (`--no-check`); otherwise the spec's
    `input.check_whole_file` decides. `progress=False` draws nothing. Returns the Run, also
    when it stopped early (`run.state == "stopped"`, `run.stop_reason`): resume it with
    `runner.resume(run.id)`. Bad specs and inputs raise UsageError (SpecError, InputError)
    before anything is sent.
    """
    return _returned(submit_session(spec, runs_dir, check=check, renderer=_renderer(progress)))


def run(
    data: object,
    /,
    *,
    model: str | Sequence[str],
    base_url: str,
    prompt_column: str | None = None,
    id_column: str | None = None,
    messages_column: str | None = None,
    template: str | None = None,
    system: str | None = None,
    api_key_env: str | None = None,
    name: str | None = None,
    concurrency: int = 64,
    max_tokens: int | None = None,
    temperature: float | None = None,
    budget_usd: float | None = None,
    spec: Mapping[str, Any] | None = None,
    runs_dir: PathLike | None = None,
    check: bool = True,
    progress: bool = True,
) -> Run:
    """Answer every row of `data` and wait for the run to end; returns the Run.

    `data`: a pandas or polars DataFrame, a pyarrow Table or RecordBatchReader (any object
    that exports an Arrow stream), or the path of a Parquet, JSONL or CSV file. A table in
    memory is written once, as Parquet, into the run's folder (`runs/<id>/input.parquet`):
    the run can be resumed after the Python process is gone. A pandas index is not kept:
    `reset_index()` first to send it along.

    The keywords are the job spec's (see the README): one of `prompt_column`,
    `messages_column` or `template` says what is sent; `id_column` keys the answers;
    `base_url` is the endpoint ("simulator" for the built-in one) and `api_key_env` the
    NAME of the environment variable that holds the key, never the key. `spec` takes any
    other spec setting as the TOML's tables, e.g. `{"request": {"seed": 1}, "run":
    {"max_attempts": 3}}` (the keywords win). `name` is the job's name (default: the file's
    stem, or "data"). The spec is written as the run's frozen job.toml.

    Raises SpecError for a bad setting (naming it as `runner.run(): section.key`) and
    InputError for a column that is not there, before anything is sent.
    """
    prepared, folder = _prepare_run(
        data,
        model=model,
        base_url=base_url,
        prompt_column=prompt_column,
        id_column=id_column,
        messages_column=messages_column,
        template=template,
        system=system,
        api_key_env=api_key_env,
        name=name,
        concurrency=concurrency,
        max_tokens=max_tokens,
        temperature=temperature,
        budget_usd=budget_usd,
        spec=spec,
        runs_dir=runs_dir,
        check=check,
    )
    return _returned(
        _session(
            lambda hooks: job.submit(prepared, folder.path.parent, run=folder, **hooks),
            _renderer(progress),
        )
    )


def _prepare_run(
    data: object,
    *,
    model: str | Sequence[str],
    base_url: str,
    prompt_column: str | None = None,
    id_column: str | None = None,
    messages_column: str | None = None,
    template: str | None = None,
    system: str | None = None,
    api_key_env: str | None = None,
    name: str | None = None,
    concurrency: int = 64,
    max_tokens: int | None = None,
    temperature: float | None = None,
    budget_usd: float | None = None,
    spec: Mapping[str, Any] | None = None,
    runs_dir: PathLike | None = None,
    check: bool = True,
) -> tuple[job.Prepared, RunDir]:
    """`run` up to its first request: the spec, the run folder and the input, checked."""
    return _prepare_data(
        data,
        name=name,
        check=check,
        runs_dir=_runs_dir(runs_dir),
        spec=_spec_table(
            spec or {},
            input={
                "prompt_column": prompt_column,
                "id_column": id_column,
                "messages_column": messages_column,
                "template": template,
                "system": system,
            },
            endpoint={"base_url": base_url, "api_key_env": api_key_env},
            request={
                "model": model if isinstance(model, str) else list(model),
                "max_tokens": max_tokens,
                "temperature": temperature,
            },
            run={"concurrency": concurrency, "budget_usd": budget_usd},
        ),
    )


def resume(
    ref: str | PathLike | Run,
    *,
    runs_dir: PathLike | None = None,
    retry_failed: bool = False,
    allow_changed_input: bool = False,
    budget_usd: float | None = None,
    spec: PathLike | None = None,
    progress: bool = True,
) -> Run:
    """Continue a run (a Run, run id, run folder, or job name for its latest run) and wait
    for it to end: only what no earlier session settled is sent.

    The options are `runner resume`'s: `retry_failed` sends failed rows again,
    `allow_changed_input` accepts an edited input (only rows whose request changed are
    sent), `budget_usd` is a new total budget, `spec` an edited spec file whose [endpoint],
    [run] and [prices] apply from now on.
    """
    return _returned(
        resume_session(
            ref,
            runs_dir,
            retry_failed=retry_failed,
            allow_changed_input=allow_changed_input,
            budget_usd=budget_usd,
            spec=spec,
            renderer=_renderer(progress),
        )
    )


async def submit_async(
    spec: PathLike,
    *,
    runs_dir: PathLike | None = None,
    check: bool = True,
    progress: bool = True,
) -> Run:
    """`submit` in the running event loop (asyncio or trio, through anyio).

    Installs no signal handler: cancelling the awaiting task stops the run (the folder is
    left consistent, state "stopped"), and the cancellation goes on up.
    """
    prepared = _prepare_file(spec, check)
    folder = _runs_dir(runs_dir)
    return await _async_session(lambda hooks: job.submit(prepared, folder, **hooks), progress)


async def run_async(data: object, /, *, progress: bool = True, **options: Any) -> Run:
    """`run` in the running event loop: the same keywords; stopped by cancellation, as
    `submit_async` is."""
    prepared, folder = _prepare_run(data, **options)
    return await _async_session(
        lambda hooks: job.submit(prepared, folder.path.parent, run=folder, **hooks), progress
    )


async def resume_async(
    ref: str | PathLike | Run,
    *,
    runs_dir: PathLike | None = None,
    retry_failed: bool = False,
    allow_changed_input: bool = False,
    budget_usd: float | None = None,
    spec: PathLike | None = None,
    progress: bool = True,
) -> Run:
    """`resume` in the running event loop; stopped by cancellation, as `submit_async` is."""
    target = _resolve(ref, runs_dir)
    return await _async_session(
        lambda hooks: job.resume(
            str(target.path),
            _runs_dir(runs_dir),
            retry_failed=retry_failed,
            allow_changed_input=allow_changed_input,
            budget_usd=budget_usd,
            spec_path=Path(spec) if spec is not None else None,
            **hooks,
        ),
        progress,
    )


# -- sessions: what the command line shares ------------------------------------------------


class _Renderer(Protocol):
    """What draws a session's progress (runner/screens.py)."""

    def start(self, run: RunDir) -> None: ...

    def update(self, progress: Progress) -> None: ...

    def signalled(self, first: bool, grace_s: float) -> None: ...

    def close(self) -> None: ...


_Start = Callable[[dict[str, Any]], Awaitable[Outcome]]


@dataclass(slots=True)
class Session:
    """How a blocking session ended: its outcome, and whether a signal or a KeyboardInterrupt
    stopped it (the API then raises KeyboardInterrupt; the CLI prints and exits 3)."""

    outcome: Outcome
    interrupted: bool = False


def submit_session(
    spec: PathLike, runs_dir: PathLike | None, *, check: bool, renderer: _Renderer | None
) -> Session:
    """Start a run of a spec file and run it to its end (what `runner submit` does)."""
    prepared = _prepare_file(spec, check)
    folder = _runs_dir(runs_dir)
    return _session(lambda hooks: job.submit(prepared, folder, **hooks), renderer)


def resume_session(
    ref: str | PathLike | Run,
    runs_dir: PathLike | None,
    *,
    retry_failed: bool = False,
    allow_changed_input: bool = False,
    budget_usd: float | None = None,
    spec: PathLike | None = None,
    renderer: _Renderer | None,
) -> Session:
    """Continue a run to its end (what `runner resume` does)."""
    folder = _runs_dir(runs_dir)
    target = ref._dir.path if isinstance(ref, Run) else ref
    return _session(
        lambda hooks: job.resume(
            str(target),
            folder,
            retry_failed=retry_failed,
            allow_changed_input=allow_changed_input,
            budget_usd=budget_usd,
            spec_path=Path(spec) if spec is not None else None,
            **hooks,
        ),
        renderer,
    )


def _session(start: _Start, renderer: _Renderer | None) -> Session:
    """Run a session to its end in a fresh event loop, here or in a worker thread."""
    interrupted = False

    def on_signal(first: bool, grace_s: float) -> None:
        nonlocal interrupted
        interrupted = True
        if renderer is not None:
            renderer.signalled(first, grace_s)

    hooks: dict[str, Any] = {
        "on_start": renderer.start if renderer is not None else None,
        "on_progress": renderer.update if renderer is not None else None,
        "on_signal": on_signal,
        "start_simulator": start_simulator,
    }
    try:
        with _collector_tuned():
            if _loop_running() or threading.current_thread() is not threading.main_thread():
                outcome, stopped = _in_worker_thread(start, hooks)
                interrupted = interrupted or stopped
            else:

                async def main() -> Outcome:
                    return await start(hooks)  # SIGINT/SIGTERM drain it (job._watch_signals)

                outcome = anyio.run(main)
    finally:
        if renderer is not None:
            renderer.close()
    return Session(outcome, interrupted)


def _in_worker_thread(start: _Start, hooks: dict[str, Any]) -> tuple[Outcome, bool]:
    """The session on its own loop in a worker thread, this thread waiting: a
    KeyboardInterrupt here asks it to stop (drain; a second one: at once), as SIGINT does."""
    switch = StopSwitch()
    hooks = {**hooks, "handle_signals": False, "stop_switch": switch}

    async def main() -> Outcome:
        return await start(hooks)

    with anyio.from_thread.start_blocking_portal(name="runner") as portal:
        future = portal.start_task_soon(main)
        while True:
            try:
                return future.result(), switch.requests > 0
            except KeyboardInterrupt:
                switch.request()


async def _async_session(start: _Start, progress: bool) -> Run:
    renderer = _renderer(progress)
    try:
        outcome = await start(
            {
                "on_start": renderer.start if renderer is not None else None,
                "on_progress": renderer.update if renderer is not None else None,
                "start_simulator": start_simulator,
                "handle_signals": False,
            }
        )
    finally:
        if renderer is not None:
            renderer.close()
    return Run(outcome.run, outcome)


def _returned(session: Session) -> Run:
    """The Run of an ended session; after an interrupt, KeyboardInterrupt, saying how to go on."""
    outcome = session.outcome
    found = Run(outcome.run, outcome)
    if session.interrupted:
        stop = KeyboardInterrupt()
        stop.add_note(
            f"run {found.id} stopped cleanly ({outcome.state}); "
            f"continue it with runner.resume({found.id!r})"
        )
        raise stop
    return found


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


@contextlib.contextmanager
def _collector_tuned() -> Iterator[None]:
    """The collector tuned for the run (runner/tuning.py), as it was afterwards."""
    thresholds = gc.get_threshold()
    tuning.tune_gc()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def _renderer(progress: bool) -> _Renderer | None:
    if not progress:
        return None
    if _in_notebook():
        return screens.NotebookRenderer("run")
    return screens.ProgressRenderer("run")


def _in_notebook() -> bool:
    """Whether this runs in a Jupyter kernel (where the terminal's escape codes show as text)."""
    shell = sys.modules.get("IPython")
    get_ipython = getattr(shell, "get_ipython", None)
    try:
        ipython = get_ipython() if get_ipython is not None else None
    except Exception:  # an IPython in a strange state: draw as for a terminal
        return False
    return ipython is not None and "IPKernelApp" in getattr(ipython, "config", {})


@contextlib.contextmanager
def start_simulator(switches: dict[str, Any]) -> Iterator[str]:
    """The built-in simulator on loopback for `base_url = "simulator"`, for one session."""
    from runner.sim.server import SimulatorConfig, SimulatorThread

    names = {f.name for f in dataclasses.fields(SimulatorConfig)}
    unknown = sorted(set(switches) - names)
    if unknown:
        raise SpecError("job spec", f"endpoint.simulator.{unknown[0]}", "unknown simulator switch")
    config = SimulatorConfig(**switches)
    with SimulatorThread(config) as sim:
        yield sim.base_url


# -- preparing: spec files, in-memory specs and tables -------------------------------------


def _runs_dir(runs_dir: PathLike | None) -> Path:
    return default_runs_dir() if runs_dir is None else Path(runs_dir)


def _resolve(ref: str | PathLike | Run, runs_dir: PathLike | None) -> RunDir:
    if isinstance(ref, Run):
        return ref._dir
    return resolve_run(os.fspath(ref), _runs_dir(runs_dir))


def _prepare_file(spec: PathLike, check: bool) -> job.Prepared:
    return job.prepare(Path(spec), check_whole_file=None if check else False, check_alongside=True)


def _spec_table(extra: Mapping[str, Any], **given: dict[str, Any]) -> dict[str, Any]:
    """The job spec as TOML tables: `extra`'s, with the keywords given (not None) over them."""
    table: dict[str, Any] = {key: value for key, value in extra.items()}
    for section, values in given.items():
        chosen = {k: v for k, v in values.items() if v is not None}
        inner = table.get(section, {})
        if not isinstance(inner, Mapping):
            raise SpecError(CALL, section, "must be a table (a dict)")
        table[section] = {**inner, **chosen}
    return table


def _prepare_data(
    data: object, *, name: str | None, check: bool, runs_dir: Path, spec: dict[str, Any]
) -> tuple[job.Prepared, RunDir]:
    """A run folder holding the spec (and an in-memory table as its input), made ready to
    run; nothing is left behind when the spec or the input is refused."""
    path: Path | None = None
    table: pa.Table | pa.RecordBatchReader | None = None
    described = CALL
    if isinstance(data, str | os.PathLike):
        path = Path(data).resolve()
        described = str(data)
        default_name = _job_name(path.stem)
    else:
        table, described = _arrow_input(data)
        default_name = "data"
    spec = {**spec, "name": spec.get("name") or name or default_name}
    spec["input"] = {**spec["input"], "path": str(path) if path is not None else INPUT_FILE}
    text = spec_toml(spec)
    _in_call(lambda: check_environment(parse_spec(text, path=Path(CALL), display=CALL)))
    check_writable(runs_dir)
    folder = RunDir.create(runs_dir, spec["name"], text)
    try:
        if table is not None:
            _write_input(table, folder.path / INPUT_FILE)
        loaded = parse_spec(text, path=folder.spec_path, display=str(folder.spec_path))
        try:
            prepared = prepare_loaded(loaded, None if check else False, check_alongside=True)
        except SpecError as exc:
            raise SpecError(CALL, exc.field, exc.message) from None
        except InputError as exc:
            if table is None:
                raise
            raise InputError(described, exc.line, exc.message) from None
    except BaseException:
        folder.discard()
        raise
    return prepared, folder


def _in_call(check: Callable[[], Any]) -> None:
    """Errors about runner.run()'s settings name the call, not a file."""
    try:
        check()
    except SpecError as exc:
        raise SpecError(CALL, exc.field, exc.message) from None


def _job_name(stem: str) -> str:
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "-", stem).strip("-_.")[:64]
    return name or "data"


def _arrow_input(data: object) -> tuple[pa.Table | pa.RecordBatchReader, str]:
    """A table in memory as Arrow, and how errors name it; pandas and polars are known by
    their types' modules, never imported here."""
    kind = type(data).__module__.split(".")[0]
    if isinstance(data, pa.Table | pa.RecordBatchReader):
        return data, f"the pyarrow {type(data).__name__}"
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data]), "the pyarrow RecordBatch"
    try:
        if kind == "pandas" and hasattr(data, "columns"):
            return pa.Table.from_pandas(data, preserve_index=False), "the pandas DataFrame"
        if kind == "polars" and hasattr(data, "to_arrow"):
            return data.to_arrow(), "the polars DataFrame"
        if hasattr(data, "__arrow_c_stream__"):
            return pa.RecordBatchReader.from_stream(data), f"the {type(data).__name__}"
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise InputError(
            f"the {kind} {type(data).__name__}", None, f"cannot be read as Arrow ({exc})"
        ) from None
    raise TypeError(
        "runner.run() takes a pandas or polars DataFrame, a pyarrow Table or "
        f"RecordBatchReader, or the path of an input file (got {type(data).__name__})"
    )


def _write_input(table: pa.Table | pa.RecordBatchReader, path: Path) -> None:
    """The run's input, written once and made durable before anything is sent."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        if isinstance(table, pa.Table):
            pq.write_table(table, tmp)
        else:
            with pq.ParquetWriter(tmp, table.schema) as writer:
                for batch in table:
                    writer.write_batch(batch)
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        from runner.errors import StorageFailed

        raise StorageFailed(f"cannot write {path} ({exc.strerror})") from None
    except pa.ArrowException as exc:
        raise UsageError(f"the input cannot be written as Parquet ({exc})") from None


# -- the spec as TOML ----------------------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_\-]+")


def spec_toml(spec: Mapping[str, Any]) -> str:
    """A job spec (TOML tables as dicts) as TOML text that reads back to the same values.

    Raises SpecError for a value TOML cannot hold (None inside a list, a date, an object).
    """
    plain = _plain(spec, "")
    top = {k: v for k, v in plain.items() if not isinstance(v, dict)}
    lines = [f"{_key(k)} = {_value(v)}" for k, v in top.items()]
    for section, values in plain.items():
        if isinstance(values, dict):
            lines += ["", f"[{_key(section)}]"]
            lines += [f"{_key(k)} = {_value(v)}" for k, v in values.items()]
    text = "# Written by runner.run() (the Python API)\n" + "\n".join(lines) + "\n"
    # The frozen spec must mean what was asked (compared as JSON: nan equals nan there).
    if json.dumps(tomllib.loads(text), sort_keys=True) != json.dumps(plain, sort_keys=True):
        raise AssertionError("the job spec did not survive TOML")
    return text


def _plain(value: Any, where: str) -> Any:
    """Values as TOML holds them: dicts of str, lists, str, int, float, bool; None drops out
    of a table."""
    if isinstance(value, Mapping):
        return {
            str(k): _plain(v, f"{where}.{k}" if where else str(k))
            for k, v in value.items()
            if v is not None
        }
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, bool | int | float | str):
        return value
    raise SpecError(CALL, where, f"cannot be written in a job spec ({type(value).__name__})")


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _string(key)


def _string(text: str) -> str:
    # JSON's escapes are TOML's too; TOML also wants DEL escaped.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # inf, -inf and nan are TOML's spelling too
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    items = ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items())
    return "{ " + items + " }" if items else "{}"


__all__ = [
    "Report",
    "Run",
    "Session",
    "Status",
    "open",
    "resume",
    "resume_async",
    "resume_session",
    "run",
    "run_async",
    "runs",
    "spec_toml",
    "start_simulator",
    "submit",
    "submit_async",
    "submit_session",
]

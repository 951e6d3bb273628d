"""The command line: parses arguments, starts the event loop, renders progress and results.

The only module that does any of those things (and the home of click and tqdm). A thin
layer: every command calls the library and prints what it returns. Heavy modules are
imported inside commands so `runner --help` starts fast. Nothing imports this module.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from runner import screens, tuning
from runner.errors import EXIT_INTERNAL, EXIT_STOPPED, EXIT_USAGE, RunnerError

if TYPE_CHECKING:
    from runner.api import Session
    from runner.store.state import Manifest

F = TypeVar("F", bound=Callable[..., Any])


def _runs_dir_option(func: F) -> F:
    return click.option(
        "--runs-dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="RUNNER_RUNS_DIR",
        default=Path("runs"),
        show_default=True,
        help="Folder holding run folders (also RUNNER_RUNS_DIR).",
    )(func)


def _ray_option(func: F) -> F:
    return click.option(
        "--ray",
        "ray_address",
        is_flag=False,
        flag_value="local",
        default=None,
        metavar="[ADDRESS]",
        help="Run across a Ray cluster in shards: alone, a local Ray started for the run; "
        "'auto', HOST:PORT or ray://... an existing cluster (needs: uv sync --extra ray).",
    )(func)


def _format_option(func: F) -> F:
    return click.option(
        "--format",
        "fmt",
        type=click.Choice(["table", "csv", "json"]),
        default="table",
        show_default=True,
        help="Output format.",
    )(func)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="runner")
def cli() -> None:
    """Run a dataset of prompts through an OpenAI-compatible chat-completions API.

    Results and token usage land in Parquet under runs/<run-id>/; runs survive crashes and
    resume without paying twice. Set RUNNER_DEBUG=1 for full tracebacks.
    """


# -- submit / resume -----------------------------------------------------------------------


@cli.command()
@click.argument("spec", type=click.Path(path_type=Path))
@_runs_dir_option
@click.option(
    "--no-check",
    is_flag=True,
    help="Skip reading the whole input before sending (for huge, trusted inputs).",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Check the spec and the whole input, print rows, estimated tokens and the cost "
    "range by model; send nothing.",
)
@_ray_option
@click.option(
    "--shards",
    type=click.IntRange(min=1),
    default=None,
    help="With --ray: how many row ranges the input is cut into (default: one per 50,000 "
    "rows, at least one per CPU).",
)
@click.option(
    "--store",
    metavar="URI",
    default=None,
    help="With --ray: keep the shards' results on an object store (a pyarrow.fs URI such "
    "as s3://bucket/runs) instead of the runs folder.",
)
@click.option(
    "--show",
    type=click.IntRange(min=1),
    default=None,
    metavar="N",
    help="With --dry-run: also print the first N request bodies as they would be sent.",
)
def submit(
    spec: Path,
    runs_dir: Path,
    no_check: bool,
    dry_run: bool,
    show: int | None,
    ray_address: str | None,
    shards: int | None,
    store: str | None,
) -> None:
    """Start a run of the job spec SPEC (a TOML file).

    Ctrl-C stops feeding rows and lets requests in flight finish; a second Ctrl-C stops at
    once. Either way, `runner resume` continues the run later.
    """
    with tuning.collector_paused():
        from runner import api
        from runner.api.session import blocking
        from runner.engine import job

    if show is not None and not dry_run:
        from runner.errors import UsageError

        raise UsageError("--show needs --dry-run (it prints requests instead of sending them)")
    if (shards is not None or store is not None) and ray_address is None:
        raise click.UsageError("--shards and --store go with --ray")

    if dry_run:
        prepared = job.prepare(spec, check_whole_file=True, need_key=False)
        found = job.estimate(prepared)
        click.echo(
            f"{spec}: {found.rows:,} rows, {found.requests:,} requests, "
            f"{found.skipped:,} skipped (empty prompt); nothing was sent"
        )
        names = [
            "model",
            "requests",
            "est_prompt_tokens",
            "max_completion_tokens",
            "cost_low_usd",
            "cost_high_usd",
            "price",
        ]
        rows = [
            (m, n, p, c, lo if lo is not None else "unpriced", _high(lo, hi, c), prov)
            for m, n, p, c, lo, hi, prov in found.models
        ]
        _emit(names, rows, "table")
        if show is not None:
            from runner.engine.plan import sample_requests

            _show_requests(sample_requests(prepared, show))
        return
    if ray_address is not None:
        driver = _ray_driver(ray_address)
        options = driver.RayOptions(address=_address(ray_address), shards=shards, store=store)
        # The whole input is checked before it is cut into shards (unless --no-check).
        ready = job.prepare(spec, check_whole_file=False if no_check else None)
        _ended(
            blocking(
                lambda hooks: driver.submit(ready, runs_dir, options, **hooks),
                _renderer(spec.stem),
            )
        )
        return
    _ended(api.submit_session(spec, runs_dir, check=not no_check, renderer=_renderer(spec.stem)))


def _show_requests(samples: Sequence[tuple[str, str, bytes]]) -> None:
    """Request bodies as pretty JSON, each under a line naming its row and model."""
    import orjson

    for row_id, model, body in samples:
        click.echo(f"\n# row {row_id}, model {model}")
        click.echo(orjson.dumps(orjson.loads(body), option=orjson.OPT_INDENT_2).decode())


def _ray_driver(address: str) -> Any:
    from runner.cluster import load_driver

    # A Ray of this machine only (started for the run, or on loopback): loopback throughout.
    host = address.rsplit(":", 1)[0].removeprefix("ray://")
    return load_driver(local=address == "local" or host in ("127.0.0.1", "localhost"))


def _address(value: str) -> str | None:
    return None if value == "local" else value


@cli.command()
@click.argument("run")
@_runs_dir_option
@click.option("--retry-failed", is_flag=True, help="Send again the rows that failed for good.")
@click.option(
    "--allow-changed-input",
    is_flag=True,
    help="Resume although the input file changed; only rows whose request changed are sent.",
)
@click.option(
    "--budget-usd",
    type=click.FloatRange(min=0),
    default=None,
    help="A new total budget for the run in USD (replaces run.budget_usd).",
)
@click.option(
    "--spec",
    "spec_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="An edited job spec: its [endpoint], [run] and [prices] settings are used from now "
    "on (recorded per session); a change to [request] or the prompt settings is refused.",
)
@_ray_option
def resume(
    run: str,
    runs_dir: Path,
    retry_failed: bool,
    allow_changed_input: bool,
    budget_usd: float | None,
    spec_path: Path | None,
    ray_address: str | None,
) -> None:
    """Continue RUN (a run id, a run folder, or a job name for its latest run).

    Sends only what no earlier session settled: answered rows are never requested again.
    Without --spec, the settings are those the run last ran with (its frozen spec).
    """
    with tuning.collector_paused():
        from runner import api
        from runner.api.session import blocking

    if ray_address is not None:
        driver = _ray_driver(ray_address)
        options = driver.RayOptions(address=_address(ray_address))
        _ended(
            blocking(
                lambda hooks: driver.resume(
                    run,
                    runs_dir,
                    options,
                    retry_failed=retry_failed,
                    allow_changed_input=allow_changed_input,
                    budget_usd=budget_usd,
                    spec_path=spec_path,
                    **hooks,
                ),
                _renderer(run),
            )
        )
        return
    session = api.resume_session(
        run,
        runs_dir,
        retry_failed=retry_failed,
        allow_changed_input=allow_changed_input,
        budget_usd=budget_usd,
        spec=spec_path,
        renderer=_renderer(run),
    )
    _ended(session)


def _renderer(label: str) -> screens.ProgressRenderer:
    return screens.ProgressRenderer(label)


def _ended(session: Session) -> None:
    """The summary of a session (runner/api.py ran it), and its exit code."""
    screens.print_outcome(session.outcome)
    sys.exit(session.outcome.exit_code)


# -- inspecting runs -----------------------------------------------------------------------


@cli.command()
@click.argument("run")
@_runs_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(run: str, runs_dir: Path, as_json: bool) -> None:
    """Show the progress of RUN, running or not (never takes the run's lock)."""
    from runner.report import query as report
    from runner.store.state import resolve_run

    target = resolve_run(run, runs_dir)
    info = report.status(target)
    if as_json:
        click.echo(report.to_json(info))
        return
    manifest = target.read_manifest()
    models = screens.spec_models(target, manifest)
    total = info["total"]
    done = info["ok"] + info["failed"] + info["skipped"]
    pct = f" ({100 * done / total:.1f} %)" if total else ""
    unit = "answers" if len(models) > 1 else "rows"
    lines = [
        f"{info['run_id']}  {info['state']}"
        + (f" (pid {info['pid']})" if info["pid"] else "")
        + (f": {info['error']}" if info.get("error") else "")
    ]
    lines.append(screens.input_line(manifest.get("input", {}).get("rows"), models))
    lines += [
        f"  {unit:<9} {done:,} of {'?' if total is None else f'{total:,}'} done{pct}: "
        f"{info['ok']:,} ok, {info['failed']:,} failed, {info['skipped']:,} skipped",
        f"  requests  {info['requests']:,}",
        f"  tokens    {info['prompt_tokens'] or 0:,} prompt, "
        f"{info['completion_tokens'] or 0:,} completion",
    ]
    if info["state"] != "running" and "cost_usd" in manifest:
        lines.append(f"  cost      {screens.money(manifest['cost_usd'])}")
    lines.append(f"  folder    {screens.relative(Path(info['path']))}")
    click.echo("\n".join(lines))


@cli.command()
@_runs_dir_option
@_format_option
def runs(runs_dir: Path, fmt: str) -> None:
    """List runs: id, job, state, rows ok/failed/total, cost (when known), start time.

    The table leaves out the job and the start time: the run id begins with the job's
    name and ends with the time it started (UTC); csv and json have them apart.
    """
    from runner.store.state import list_runs

    header = ["run_id", "job", "state", "ok", "failed", "total", "cost_usd", "created_at"]
    rows = []
    for m in list_runs(runs_dir):
        counts = _run_counts(runs_dir, m)
        state = m.get("state")
        rows.append(
            (
                m.get("run_id"),
                m.get("job_name"),
                state,
                counts.get("ok"),
                counts.get("failed"),
                counts.get("total"),
                m.get("cost_usd"),
                m.get("created_at"),
            )
        )
    if fmt == "table":
        _emit(header[:1] + header[2:-1], [r[:1] + r[2:-1] for r in rows], fmt)
        return
    _emit(header, rows, fmt)


def _run_counts(runs_dir: Path, manifest: Manifest) -> dict[str, Any]:
    """A run's row counts: the manifest's once a session ended, counted from the run's
    files while it runs (or after a crash), when the manifest has none yet."""
    counts: dict[str, Any] = dict(manifest.get("counts") or {})
    if manifest.get("state") != "running" and "ok" in counts:
        return counts
    from runner.report import query as report
    from runner.store.state import RunDir

    try:
        live = report.summary(RunDir(runs_dir / str(manifest.get("run_id"))))
    except RunnerError:
        return counts
    return {**counts, "ok": live["ok"], "failed": live["failed"], "total": live["total"]}


@cli.command()
@click.argument("run_ids", metavar="RUN...", nargs=-1, required=True)
@_runs_dir_option
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def rm(run_ids: tuple[str, ...], runs_dir: Path, yes: bool) -> None:
    """Delete runs no longer wanted: their results, journal and spec copy.

    RUN is a run id (as `runner runs` lists it) or a run folder; a job name is not enough.
    A run that a process is running is refused and kept. Asks first unless --yes.
    """
    from runner.errors import UsageError
    from runner.store.state import RunDir

    targets: dict[Path, RunDir] = {}
    for ref in run_ids:
        found = next(
            (p for p in (runs_dir / ref, Path(ref)) if (p / "manifest.json").is_file()), None
        )
        if found is None:
            raise UsageError(
                f"no run {ref!r} in {runs_dir} (give run ids, as `runner runs` lists them)"
            )
        if not RunDir(found.resolve()).is_run():
            raise UsageError(f"{found}: not a run folder (its manifest does not name it)")
        targets.setdefault(found.resolve(), RunDir(found.resolve()))
    for run in targets.values():
        holder = run.holder_pid()
        if holder:
            shown = f"process {holder}" if holder > 0 else "another process"
            raise UsageError(f"run {run.run_id} is running ({shown}); stop it first")
    if not yes:
        if not sys.stdin.isatty():
            raise UsageError("rm deletes runs for good: add --yes to confirm")
        names = ", ".join(run.run_id for run in targets.values())
        click.confirm(f"delete {names}?", abort=True, err=True)
    for run in targets.values():
        run.remove()
        click.echo(f"removed {run.run_id}", err=True)


def _prices_option(func: F) -> F:
    return click.option(
        "--prices",
        "prices_file",
        type=click.Path(dir_okay=False, exists=True, path_type=Path),
        default=None,
        help='A TOML price table ([prices."model"] input/cached_input/output in USD per '
        "million tokens) that re-prices the run over the spec's and the built-in prices.",
    )(func)


@cli.command()
@click.argument("run")
@_runs_dir_option
@_format_option
@click.option(
    "--by",
    type=click.Choice(["model", "status", "finish_reason", "error_type", "hour"]),
    default=None,
    help="One table grouped by this column instead of the overview.",
)
@_prices_option
def report(run: str, runs_dir: Path, fmt: str, by: str | None, prices_file: Path | None) -> None:
    """Rows, requests, tokens, cost, latency and errors of RUN (works while it runs).

    Costs are computed now from stored tokens: the spec's [prices] table wins over the
    built-in genai-prices data, and --prices wins over both. Every cost says where it came
    from (provider, override, price-table, free); an unpriced model is shown as unpriced.
    """
    from runner.report import query as reports
    from runner.store.state import resolve_run

    target = resolve_run(run, runs_dir)
    sections = reports.report(target, by=by, prices_file=prices_file)
    if fmt == "json":
        click.echo(
            reports.to_json(
                {
                    title: [dict(zip(names, row, strict=True)) for row in rows]
                    for title, names, rows in sections
                }
            )
        )
    elif fmt == "csv" and len(sections) > 1:
        # One table: the section's title, then that section's columns as name=value pairs.
        rows = [
            (title, " ".join(f"{n}={_plain(v)}" for n, v in zip(names, row, strict=True)))
            for title, names, rows_ in sections
            for row in rows_
        ]
        _emit(["section", "values"], rows, "csv")
    else:
        for i, (title, names, rows_) in enumerate(sections):
            if fmt == "table":
                click.echo(("\n" if i else "") + f"{title}")
            _emit(names, rows_, fmt)


def _high(low: float | None, high: float | None, cap: int | None) -> float | str:
    """The dry run's worst case: a number, or why there is none."""
    if cap is None:
        return "no max_tokens"
    return "unpriced" if low is None or high is None else high


def _plain(value: Any) -> str:
    return "" if value is None else str(value)


@cli.command()
@click.argument("run")
@click.argument("sql")
@_runs_dir_option
@_format_option
@_prices_option
def query(run: str, sql: str, runs_dir: Path, fmt: str, prices_file: Path | None) -> None:
    """Run one SELECT over RUN's views: results, attempts, costed, prices, input, parsed.

    `parsed` has row_id, model and one typed column per top-level property of the run's
    JSON Schema: the answer's fields, NULL where a row has no valid answer.

    A read-only sandbox: the SQL reads the run's own files only (no other file, no URL, no
    extension) and writes nothing; COPY, ATTACH, SET, PRAGMA, INSTALL and the like are
    refused. `runner export` writes files.
    """
    from runner.report import query as reports
    from runner.store.state import resolve_run

    target = resolve_run(run, runs_dir)
    names, rows = reports.query(target, sql, prices=reports.price_rows(target, prices_file))
    _emit(names, rows, fmt)


@cli.command()
@click.argument("run")
@click.argument("out", type=click.Path(path_type=Path))
@_runs_dir_option
@click.option("--overwrite", is_flag=True, help="Replace OUT if it exists.")
@click.option(
    "--fields",
    is_flag=True,
    help="The answers' fields as typed columns, one per top-level property of the run's JSON "
    "Schema (NULL where a row has no valid answer), instead of the answer text.",
)
def export(run: str, out: Path, runs_dir: Path, overwrite: bool, fields: bool) -> None:
    """Write RUN's input columns plus answers, in input order, to OUT (.parquet/.jsonl/.csv).

    OUT must not exist unless --overwrite is given; the run's input file and the run's own
    folder are never written. With --fields, the run needs a JSON Schema ([output] schema
    or request.response_format); nested fields are JSON text in CSV.
    """
    from runner.report import query as reports
    from runner.store.state import resolve_run

    count = reports.export(resolve_run(run, runs_dir), out, overwrite=overwrite, fields=fields)
    click.echo(f"wrote {count:,} rows to {out}", err=True)


@cli.command()
@click.argument("run")
@click.argument("row_id")
@_runs_dir_option
@click.option("--raw", is_flag=True, help="Print the request body as the bytes sent, not indented.")
@click.option("--json", "as_json", is_flag=True, help="Print everything as one JSON object.")
def show(run: str, row_id: str, runs_dir: Path, raw: bool, as_json: bool) -> None:
    """Show what was sent for ROW_ID of RUN and what came back, for each model.

    The request body is rebuilt from the run's input and frozen spec (nothing extra is
    stored per row) and checked against the hash the run journaled; then the answer, its
    validation error, every attempt (re-asks and retries) and what they cost. ROW_ID is the
    id column's value, or the row number from 0 without an id column.
    """
    from runner.engine.show import show_row
    from runner.store.state import resolve_run

    target = resolve_run(run, runs_dir)
    found = show_row(target, row_id)
    if as_json:
        click.echo(json.dumps([r.as_dict(target.run_id) for r in found], indent=2, default=str))
        return
    for i, row in enumerate(found):
        click.echo(("\n" if i else "") + _row_screen(target.run_id, row, raw=raw))


_ATTEMPT_COLUMNS = (
    "status",
    "final",
    "attempts",
    "http_status",
    "finish_reason",
    "error_type",
    "prompt_tokens",
    "completion_tokens",
    "cost_usd",
)


def _row_screen(run_id: str, row: Any, *, raw: bool) -> str:
    """`runner show` for one row x model: the request, the answer, the attempts."""
    import orjson

    lines = [f"run {run_id}  row {row.row_id}  model {row.model}"]
    if row.body is None:
        lines.append(f"not sent: {row.skipped}")
        return "\n".join(lines)
    where = {
        True: "as sent",
        False: "as it would be sent now: the run sent another body (the input changed)",
        None: "as it would be sent: not sent yet",
    }[row.sent]
    lines.append(f"request ({where}; request_hash {row.request_hash}):")
    body = row.body if raw else orjson.dumps(orjson.loads(row.body), option=orjson.OPT_INDENT_2)
    lines.append(body.decode())
    final = row.final
    if final is None:
        lines.append("answer: none yet")
    else:
        cost = screens.money(row.cost_usd) if row.cost_usd is not None else "unknown"
        lines.append(
            f"answer: {final.get('status')}, finish_reason {final.get('finish_reason')}, "
            f"{len(row.attempts)} journaled attempt(s), cost {cost}"
        )
        if final.get("reused"):
            lines.append(
                f"answered by row {final.get('reused_from')}'s identical request "
                "(nothing sent for this row, nothing paid)"
            )
        for key in ("validation_error", "error_type", "error_message", "refusal"):
            if final.get(key):
                lines.append(f"{key.replace('_', ' ')}: {final[key]}")
        for key in ("content", "tool_calls"):
            if final.get(key) is not None:
                lines += [f"{key}:", str(final[key])]
    if row.attempts:
        names = list(_ATTEMPT_COLUMNS)
        if any(a.get("validation_error") for a in row.attempts):
            names.insert(names.index("error_type"), "validation_error")
        rows = [[a.get(c) for c in names] for a in row.attempts]
        lines += ["attempts:", screens.table(names, rows, None)]
    return "\n".join(lines)


# -- the simulator -------------------------------------------------------------------------


def _simulator_options(func: F) -> F:
    from runner.sim.server import SimulatorConfig

    for f in reversed(dataclasses.fields(SimulatorConfig)):
        default = f.default
        name = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            func = click.option(f"{name}/--no-{f.name.replace('_', '-')}", default=default)(func)
        elif isinstance(default, tuple):
            func = click.option(name, multiple=True, type=int, default=default)(func)
        elif isinstance(default, int | float | str):
            func = click.option(name, type=type(default), default=default, show_default=True)(func)
        else:
            kind = int if "limit" in f.name else str
            func = click.option(name, type=kind, default=None)(func)
    return func


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8787, show_default=True, help="0 picks a free port.")
@_simulator_options
def simulate(host: str, port: int, **switches: Any) -> None:
    """Serve the built-in OpenAI-compatible simulator (deterministic answers, fault switches)."""
    from runner.sim.server import SimulatorConfig, serve

    config = SimulatorConfig(**switches)

    def ready(base_url: str) -> None:
        click.echo(f"simulator listening on {base_url}")
        sys.stdout.flush()

    serve(host, port, config, ready=ready)


# -- output helpers ------------------------------------------------------------------------


def _emit(names: Sequence[str], rows: Sequence[Sequence[Any]], fmt: str) -> None:
    if fmt == "json":
        click.echo(json.dumps([dict(zip(names, r, strict=True)) for r in rows], default=str))
    elif fmt == "csv":
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(names)
        writer.writerows(rows)
        click.echo(buffer.getvalue(), nl=False)
    else:
        width = screens.terminal_width() if sys.stdout.isatty() else None
        click.echo(screens.table(names, rows, width))


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: one clean line per error, tracebacks only with RUNNER_DEBUG=1."""
    debug = os.environ.get("RUNNER_DEBUG") == "1"
    tuning.tune_process()
    if argv is None:  # the `runner` command itself, not a caller's process
        tuning.skip_numpy(sys.argv[1:])
    try:
        cli.main(args=list(argv) if argv is not None else None, standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(EXIT_STOPPED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(EXIT_USAGE)
    except RunnerError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {exc}", err=True)
        if exc.exit_code == EXIT_STOPPED and not str(exc).startswith("stopped"):
            click.echo("the run can be resumed with: runner resume <run-id>", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(EXIT_STOPPED)
    except Exception as exc:  # the last line of defence: one line, exit 4
        if debug:
            traceback.print_exc()
        click.echo(f"internal error: {type(exc).__name__}: {exc}", err=True)
        sys.exit(EXIT_INTERNAL)

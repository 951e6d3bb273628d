"""The command line: parses arguments, starts the event loop, renders progress and results.

The only module that does any of those things (and the home of click and tqdm). A thin
layer: every command calls the library and prints what it returns. Heavy modules are
imported inside commands so `runner --help` starts fast. Nothing imports this module.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import gc
import io
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from runner.errors import EXIT_INTERNAL, EXIT_STOPPED, EXIT_USAGE, RunnerError

if TYPE_CHECKING:
    from runner.job import Outcome
    from runner.records import Progress
    from runner.state import RunDir

F = TypeVar("F", bound=Callable[..., Any])
PLAIN_EVERY_S = 5.0


def _runs_dir_option(func: F) -> F:
    return click.option(
        "--runs-dir",
        type=click.Path(file_okay=False, path_type=Path),
        envvar="RUNNER_RUNS_DIR",
        default=Path("runs"),
        show_default=True,
        help="Folder holding run folders (also RUNNER_RUNS_DIR).",
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
def submit(spec: Path, runs_dir: Path, no_check: bool, dry_run: bool) -> None:
    """Start a run of the job spec SPEC (a TOML file).

    Ctrl-C stops feeding rows and lets requests in flight finish; a second Ctrl-C stops at
    once. Either way, `runner resume` continues the run later.
    """
    from runner import job

    if dry_run:
        found = job.estimate(job.prepare(spec, check_whole_file=True, need_key=False))
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
            (m, n, p, c, _usd(lo), _usd(hi) if c is not None else "no max_tokens", prov)
            for m, n, p, c, lo, hi, prov in found.models
        ]
        _emit(names, rows, "table")
        return
    prepared = job.prepare(spec, check_whole_file=False if no_check else None, check_alongside=True)
    _run_session(lambda hooks: job.submit(prepared, runs_dir, **hooks), prepared.spec.job.name)


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
def resume(
    run: str,
    runs_dir: Path,
    retry_failed: bool,
    allow_changed_input: bool,
    budget_usd: float | None,
) -> None:
    """Continue RUN (a run id, a run folder, or a job name for its latest run).

    Sends only what no earlier session settled: answered rows are never requested again.
    """
    from runner import job

    _run_session(
        lambda hooks: job.resume(
            run,
            runs_dir,
            retry_failed=retry_failed,
            allow_changed_input=allow_changed_input,
            budget_usd=budget_usd,
            **hooks,
        ),
        run,
    )


def _run_session(start: Callable[[dict[str, Any]], Any], label: str) -> None:
    import anyio

    renderer = _ProgressRenderer(label)
    hooks: dict[str, Any] = {
        "on_start": renderer.start,
        "on_progress": renderer.update,
        "start_simulator": _simulator_starter,
    }

    async def main() -> Outcome:
        result: Outcome = await start(hooks)
        return result

    _tune_gc()
    try:
        outcome = anyio.run(main)
    finally:
        renderer.close()
    _print_outcome(outcome)
    sys.exit(outcome.exit_code)


@contextlib.contextmanager
def _simulator_starter(switches: dict[str, Any]) -> Iterator[str]:
    from runner.errors import SpecError
    from runner.simulator import SimulatorConfig, SimulatorThread

    names = {f.name for f in dataclasses.fields(SimulatorConfig)}
    unknown = sorted(set(switches) - names)
    if unknown:
        raise SpecError("job spec", f"endpoint.simulator.{unknown[0]}", "unknown simulator switch")
    config = SimulatorConfig(**switches)
    with SimulatorThread(config) as sim:
        yield sim.base_url


class _ProgressRenderer:
    """tqdm on a terminal; a plain status line every few seconds otherwise."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar: Any = None
        self.tty = sys.stderr.isatty()
        self.last_plain = 0.0
        self.run: RunDir | None = None

    def start(self, run: RunDir) -> None:
        self.run = run
        click.echo(f"run {run.run_id}: {run.path}", err=True)

    def update(self, progress: Progress) -> None:
        done = progress.rows_done_before + progress.done + progress.skipped
        tokens = progress.prompt_tokens + progress.completion_tokens
        elapsed = max(time.monotonic() - progress.started, 1e-9)
        rate = progress.requests / elapsed
        fields = (
            f"ok={progress.rows_done_before + progress.ok} failed={progress.failed} "
            f"retrying={progress.retrying} req/s={rate:.0f} tokens={tokens:,}"
        )
        if progress.concurrency is not None:
            fields += f" conc={progress.concurrency}"
        if progress.cost_usd is not None:
            fields += f" cost=${progress.cost_usd:.4f}"
            settled = progress.done + progress.skipped
            left = (progress.rows_total or 0) - progress.rows_done_before - settled
            if settled and progress.rows_total is not None:
                projected = progress.cost_usd * (1 + max(left, 0) / settled)
                fields += f" (~${projected:.4f} at the end)"
        if self.tty:
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(
                    total=progress.rows_total,
                    initial=progress.rows_done_before,
                    unit="row",
                    dynamic_ncols=True,
                    mininterval=0.2,
                    file=sys.stderr,
                )
            self.bar.n = done
            self.bar.set_postfix_str(fields, refresh=False)
            self.bar.refresh()
            return
        now = time.monotonic()
        if now - self.last_plain >= PLAIN_EVERY_S:
            self.last_plain = now
            total = "?" if progress.rows_total is None else f"{progress.rows_total:,}"
            click.echo(f"{done:,}/{total} rows  {fields}", err=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _print_outcome(outcome: Outcome) -> None:
    p = outcome.progress
    run = outcome.run
    total = p.rows_total
    done = outcome.settled_before + p.done + p.skipped
    lines = [
        f"run {run.run_id}: {outcome.state}",
        f"  rows      {p.ok:,} ok, {p.failed:,} failed, {p.skipped:,} skipped this session"
        + (f" ({outcome.settled_before:,} settled before)" if outcome.settled_before else ""),
        f"  requests  {p.requests:,} (retries included)",
        f"  tokens    {p.prompt_tokens:,} prompt, {p.completion_tokens:,} completion",
        f"  wall time {outcome.wall_s:.1f} s",
        f"  results   {run.parts_dir}",
        f"  export    runner export {run.run_id} out.parquet",
    ]
    click.echo("\n".join(lines), err=True)
    if outcome.state != "completed":
        shown = f"{total:,}" if total is not None else "?"
        reason = f" ({outcome.stop_reason})" if outcome.stop_reason else ""
        click.echo(
            f"stopped{reason}: {done:,} of {shown} rows done; "
            f"resume with: runner resume {run.run_id}",
            err=True,
        )


# -- inspecting runs -----------------------------------------------------------------------


@cli.command()
@click.argument("run")
@_runs_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the status as JSON.")
def status(run: str, runs_dir: Path, as_json: bool) -> None:
    """Show the progress of RUN, running or not (never takes the run's lock)."""
    from runner import report
    from runner.state import resolve_run

    info = report.status(resolve_run(run, runs_dir))
    if as_json:
        click.echo(report.to_json(info))
        return
    total = info["total"]
    done = info["ok"] + info["failed"] + info["skipped"]
    pct = f" ({100 * done / total:.1f} %)" if total else ""
    click.echo(
        f"{info['run_id']}  {info['state']}"
        + (f" (pid {info['pid']})" if info["pid"] else "")
        + (f": {info['error']}" if info.get("error") else "")
        + f"\n  rows      {done:,} of {'?' if total is None else f'{total:,}'} done{pct}: "
        f"{info['ok']:,} ok, {info['failed']:,} failed, {info['skipped']:,} skipped"
        f"\n  requests  {info['requests']:,}"
        f"\n  tokens    {info['prompt_tokens'] or 0:,} prompt, "
        f"{info['completion_tokens'] or 0:,} completion"
        f"\n  folder    {info['path']}"
    )


@cli.command()
@_runs_dir_option
@_format_option
def runs(runs_dir: Path, fmt: str) -> None:
    """List runs: id, job, state, rows ok/failed/total, cost (when known), start time."""
    from runner.state import list_runs

    header = ["run_id", "job", "state", "ok", "failed", "total", "cost_usd", "created_at"]
    rows = []
    for m in list_runs(runs_dir):
        counts = m.get("counts") or {}
        rows.append(
            (
                m.get("run_id"),
                m.get("job_name"),
                m.get("state"),
                counts.get("ok"),
                counts.get("failed"),
                counts.get("total"),
                m.get("cost_usd"),
                m.get("created_at"),
            )
        )
    _emit(header, rows, fmt)


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
    from runner import report as reports
    from runner.state import resolve_run

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


def _usd(value: float | None) -> str:
    return "unpriced" if value is None else f"${value:,.4f}"


def _plain(value: Any) -> str:
    return "" if value is None else str(value)


@cli.command()
@click.argument("run")
@click.argument("sql")
@_runs_dir_option
@_format_option
@_prices_option
def query(run: str, sql: str, runs_dir: Path, fmt: str, prices_file: Path | None) -> None:
    """Run SQL over RUN's views: results, attempts, costed, prices, input.

    The SQL can read the run's own files only: no other file, no URL, no extension.
    """
    from runner import report as reports
    from runner.state import resolve_run

    target = resolve_run(run, runs_dir)
    names, rows = reports.query(target, sql, prices=reports.price_rows(target, prices_file))
    _emit(names, rows, fmt)


@cli.command()
@click.argument("run")
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@_runs_dir_option
def export(run: str, out: Path, runs_dir: Path) -> None:
    """Write RUN's input columns plus answers, in input order, to OUT (.parquet/.jsonl/.csv)."""
    from runner import report as reports
    from runner.state import resolve_run

    count = reports.export(resolve_run(run, runs_dir), out)
    click.echo(f"wrote {count:,} rows to {out}", err=True)


# -- the simulator -------------------------------------------------------------------------


def _simulator_options(func: F) -> F:
    from runner.simulator import SimulatorConfig

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
    from runner.simulator import SimulatorConfig, serve

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
        click.echo(_table(names, rows))


def _table(names: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def cell(value: Any) -> str:
        if value is None:
            return ""
        if isinstance(value, float):
            return f"{value:,.6g}"
        if isinstance(value, int) and not isinstance(value, bool):
            return f"{value:,}"
        text = str(value).replace("\n", " ")
        return text if len(text) <= 60 else text[:57] + "..."

    cells = [[cell(v) for v in row] for row in rows]
    widths = [max([len(n), *(len(r[i]) for r in cells)]) for i, n in enumerate(names)]
    lines = ["  ".join(n.ljust(w) for n, w in zip(names, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells)
    return "\n".join(lines)


def _tune_malloc() -> None:
    """glibc malloc settings that keep peak RSS flat as the input grows (bench/run.py W4).

    - At most two arenas (as MALLOC_ARENA_MAX=2 would): the input check and the part writer
      run in threads, and each thread's own arena kept its peak.
    - A fixed mmap threshold of 1 MiB (as MALLOC_MMAP_THRESHOLD_ would set): by default glibc
      raises the threshold to the size of each large block freed, so after the input check's
      arrays are freed the next large blocks came from the heap, where freed memory stays
      mapped. At 1,000,000 rows that kept ~25 MB the rest of the run; blocks of 1 MiB or more
      are now mapped on their own and given back when freed.
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None)
        libc.mallopt(-8, 2)  # M_ARENA_MAX; absent outside glibc
        libc.mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD


def _tune_gc() -> None:
    """Fewer, cheaper garbage collections during a run (bench/run.py W3, 2,048 connections).

    With the default thresholds the collector ran ~440 times in a 20,000-row W3 run, four
    of them full collections of 70-140 ms each that stalled the event loop; 220 ms of
    collection fell in the first wave alone. What is alive when the run starts (the imported
    modules, the spec) is frozen out of every later collection, and the youngest generation
    is collected after 10,000 new objects rather than 700.
    """
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def main(argv: Sequence[str] | None = None) -> None:
    """Console entry point: one clean line per error, tracebacks only with RUNNER_DEBUG=1."""
    debug = os.environ.get("RUNNER_DEBUG") == "1"
    # pyarrow's default allocator keeps freed memory mapped; after the whole-file input check
    # that is ~100 MB of peak RSS a long run never gives back. The system allocator returns it.
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    _tune_malloc()
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

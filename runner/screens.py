"""What a person sees of a run: the progress lines, the summary, aligned tables, and money
and numbers written for people (never `1.3e-05`).

Used by cli.py and the Python API (runner/api.py); the home of tqdm (imported when a bar is
first drawn, so `runner --help` stays fast). Writes to stderr itself: it must not import
click. Why not rich: the tables are small and fixed, rich would be a new dependency, and
importing rich's console, table and progress took ~105 ms (tqdm ~73 ms, `python -X
importtime`).
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from runner.engine.job import Outcome
    from runner.records import Progress
    from runner.store.state import Manifest, RunDir

PLAIN_EVERY_S = 5.0


def _err(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def terminal_width() -> int:
    """The terminal's width (COLUMNS wins, as for every curses program), 80 when unknown."""
    import shutil

    return shutil.get_terminal_size((80, 24)).columns


class ProgressRenderer:
    """On a terminal: tqdm's bar on one line and the counters on a second, both fitted to the
    terminal's width. Otherwise: a plain status line every few seconds (for logs)."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.drawn = False
        self.tty = sys.stderr.isatty()
        self.last_plain = 0.0
        self.run: RunDir | None = None
        self.models = 1
        self.cost_before: float | None = 0.0
        self.last: Progress | None = None

    def start(self, run: RunDir) -> None:
        self.run = run
        manifest = run.read_manifest()
        self.models = len(spec_models(run, manifest)) or 1
        if manifest.get("sessions"):  # a resume: the cost of earlier sessions counts too
            self.cost_before = manifest.get("cost_usd", 0.0)
        _err(f"run {run.run_id}: {run.path}")

    @property
    def unit(self) -> str:
        return "rows" if self.models == 1 else "answers"

    def status(self, progress: Progress, width: int) -> str:
        """The counters, most important first, cut to whole fields that fit in width."""
        elapsed = max(time.monotonic() - progress.started, 1e-9)
        fields = [f"ok {progress.rows_done_before + progress.ok:,}"]
        fields.append(f"failed {progress.failed:,}")
        if progress.invalid or progress.reasked:
            fields.append(f"invalid {progress.invalid:,}  re-asked {progress.reasked:,}")
        cost = _cost_total(self.cost_before, progress.cost_usd)
        if cost is not None:
            settled = progress.rows_done_before + progress.done + progress.skipped
            if settled and progress.rows_total:
                end = money(cost * progress.rows_total / settled)
                fields.append(f"{money(cost)} (~{end} at end)")
            else:
                fields.append(money(cost))
        fields.append(f"{progress.requests / elapsed:,.0f} req/s")
        if progress.retrying:
            fields.append(f"retrying {progress.retrying:,}")
        fields.append(f"in flight {progress.in_flight:,}")
        if progress.concurrency is not None:
            fields.append(f"conc {progress.concurrency:,}")
        fields.append(f"tokens {progress.prompt_tokens + progress.completion_tokens:,}")
        text = ""
        for field in fields:
            joined = f"{text}  {field}" if text else f"  {field}"
            if len(joined) > width:
                break
            text = joined
        return text

    def bar(self, progress: Progress, width: int) -> str:
        """tqdm's bar, percentage, counts and times, `width` wide."""
        from tqdm import tqdm

        done = progress.rows_done_before + progress.done + progress.skipped
        elapsed = time.monotonic() - progress.started
        if progress.rows_total is None:  # an unchecked input: no end to measure against
            return f"  {done:,} {self.unit} [{tqdm.format_interval(elapsed)}]"
        line: str = tqdm.format_meter(
            min(done, progress.rows_total),
            progress.rows_total,
            elapsed,
            ncols=width,
            initial=progress.rows_done_before,  # the rate is this session's
            bar_format="{percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} "
            + self.unit
            + " [{elapsed}<{remaining}]",
        )
        return line

    def update(self, progress: Progress) -> None:
        self.last = progress
        if self.tty:
            self._draw(progress)
            return
        now = time.monotonic()
        if now - self.last_plain >= PLAIN_EVERY_S:
            self.last_plain = now
            done = progress.rows_done_before + progress.done + progress.skipped
            total = "?" if progress.rows_total is None else f"{progress.rows_total:,}"
            _err(f"{done:,}/{total} {self.unit}{self.status(progress, 1000)}")

    def _draw(self, progress: Progress, above: str = "") -> None:
        """Redraw the two lines in place (the cursor rests at the start of the first), with
        `above` written on its own line above them."""
        width = terminal_width() - 1  # a character in the last column wraps on some terminals
        out = "\r\x1b[K" + above + "\n" if above else ""
        out += (
            f"\r\x1b[K{self.bar(progress, width)}\n\r\x1b[K{self.status(progress, width)}\r\x1b[A"
        )
        sys.stderr.write(out)
        sys.stderr.flush()
        self.drawn = True

    def signalled(self, first: bool, grace_s: float) -> None:
        """A Ctrl-C (SIGINT/SIGTERM): say at once what happens now."""
        flying = self.last.in_flight if self.last is not None else 0
        if first:
            text = (
                f"stopping: waiting up to {grace_s:g} s for {flying:,} requests in flight; "
                "Ctrl-C again stops now"
            )
        else:
            text = "stopping now: requests in flight are cut, answers received are kept"
        if self.drawn and self.last is not None:
            self._draw(self.last, above=text)
        else:
            _err(text)

    def close(self) -> None:
        if self.drawn and self.last is not None:
            self._draw(self.last)
            sys.stderr.write("\n\n")  # below the two lines, which stay on the screen
            sys.stderr.flush()
            self.drawn = False


class NotebookRenderer(ProgressRenderer):
    """In a notebook (Jupyter, VS Code): one `tqdm.auto` bar, a widget when ipywidgets is
    installed, with the counters after it; the escape codes of the terminal's two lines
    would show as text there. Drawn at most every `every_s` seconds: a widget redrawn four
    times a second slows the notebook's front end, and a notebook is no terminal to watch."""

    def __init__(self, label: str, *, file: IO[str] | None = None, every_s: float = 1.0) -> None:
        super().__init__(label)
        self.file = file
        self.every_s = every_s
        self.bar: Any = None
        self.last_drawn = 0.0

    def start(self, run: RunDir) -> None:
        from tqdm.auto import tqdm

        super().start(run)
        self.bar = tqdm(
            total=None,
            desc=run.run_id,
            unit=f" {self.unit}",
            file=self.file,
            dynamic_ncols=True,
            mininterval=0,
            leave=True,
        )

    def update(self, progress: Progress) -> None:
        self.last = progress
        now = time.monotonic()
        if self.bar is not None and now - self.last_drawn >= self.every_s:
            self.last_drawn = now
            self._draw(progress)

    def _draw(self, progress: Progress, above: str = "") -> None:
        bar = self.bar
        if above:
            bar.write(above, file=self.file)
        done = progress.rows_done_before + progress.done + progress.skipped
        if progress.rows_total is not None and bar.total != progress.rows_total:
            bar.reset(total=progress.rows_total)  # known once the input check is done
        bar.n = done if progress.rows_total is None else min(done, progress.rows_total)
        bar.set_postfix_str(self.status(progress, 1000).strip(), refresh=False)
        bar.refresh()
        self.drawn = True

    def close(self) -> None:
        if self.bar is not None:
            if self.last is not None:
                self._draw(self.last)
            self.bar.close()
            self.bar = None
            self.drawn = False


def spec_models(run: RunDir, manifest: Manifest) -> list[str]:
    """The models of the spec a run last ran with (read from its frozen copy)."""
    import tomllib

    try:
        data = tomllib.loads((run.path / manifest.get("spec_file", "job.toml")).read_text())
    except (OSError, ValueError):
        return []
    model = (data.get("request") or {}).get("model")
    return [model] if isinstance(model, str) else list(model or [])


def _cost_total(before: float | None, now: float | None) -> float | None:
    return None if before is None or now is None else before + now


def print_outcome(outcome: Outcome) -> None:
    """The summary at the end of a session, and how to carry on when it stopped early."""
    p = outcome.progress
    run = outcome.run
    models = outcome.models
    per_row = max(len(models), 1)
    total = p.rows_total
    done = outcome.settled_before + p.done + p.skipped
    rows = outcome.input_rows
    if rows is None and total is not None:
        rows = total // per_row
    lines = [f"run {run.run_id}: {outcome.state} in {seconds(outcome.wall_s)}"]
    lines.append(input_line(rows, models))
    unit = "answers" if per_row > 1 else "rows"
    before = f"; {outcome.settled_before:,} settled before" if outcome.settled_before else ""
    invalid = f", {p.invalid:,} invalid" if p.invalid else ""
    lines.append(
        f"  {unit:<9} {p.ok:,} ok, {p.failed:,} failed{invalid}, {p.skipped:,} skipped "
        f"this session{before}"
    )
    if p.reasked:
        lines.append(f"  re-asked  {p.reasked:,} answers that failed the schema (paid, counted)")
    rate = p.requests / outcome.wall_s if outcome.wall_s > 0 else 0.0
    lines.append(f"  requests  {p.requests:,} (retries included), {rate:,.1f} per second")
    lines.append(f"  tokens    {p.prompt_tokens:,} prompt, {p.completion_tokens:,} completion")
    lines.append("  cost      " + _cost_line(outcome))
    if p.failed or p.invalid:
        lines.extend(_top_errors(run, terminal_width() - 1 if sys.stderr.isatty() else None))
    lines.append(f"  results   {run.path / 'shards' if outcome.on_ray else run.parts_dir}")
    lines.append(f"  next      runner report {run.run_id}")
    lines.append(f"            runner export {run.run_id} out.parquet")
    _err("\n".join(lines))
    if outcome.state != "completed":
        shown = f"{total:,}" if total is not None else "?"
        reason = f" ({outcome.stop_reason})" if outcome.stop_reason else ""
        how = f"runner resume {run.run_id}" + (" --ray [ADDRESS]" if outcome.on_ray else "")
        if outcome.stopped_by_endpoint:
            how += " --spec FILE (FILE: the spec with [endpoint] fixed)"
        if outcome.refused_model is not None:
            how += "; another model needs a new run (runner submit)"
        _err(f"stopped{reason}: {done:,} of {shown} {unit} done; resume with: {how}")


def _top_errors(run: RunDir, width: int | None, top: int = 3) -> list[str]:
    """Why rows failed: the most frequent errors over the run, with their counts."""
    from runner.report.query import RunDB

    try:
        with RunDB(run, with_input=False) as db:
            _, found = db.query(
                "SELECT count(*), http_status, "
                "CASE WHEN status = 'invalid' THEN 'invalid' ELSE error_type END, "
                "CASE WHEN status = 'invalid' THEN 'invalid: ' || validation_error "
                "ELSE error_message END FROM results "
                "WHERE status IN ('failed', 'invalid') GROUP BY ALL ORDER BY 1 DESC, 3, 4 "
                f"LIMIT {top + 1}"
            )
    except Exception:  # a summary line must not turn the end of a run into exit 4
        return [f"  failed    see: runner report {run.run_id}"]
    lines = []
    for i, (count, status, kind, message) in enumerate(found[:top]):
        label = "  failed    " if i == 0 else " " * 12
        # The message starts with the status and the provider's code when there is one.
        line = f"{label}{count:,} x {message or (f'{status} ' if status else '') + kind}"
        if width is not None and len(line) > width:
            line = line[: width - 3] + "..."
        lines.append(line)
    if len(found) > top:
        lines.append(f"            ... more in: runner report {run.run_id}")
    return lines


def relative(path: Path) -> Path:
    """A path as a person would type it here: relative to the working folder when below it."""
    try:
        return path.relative_to(Path.cwd())
    except ValueError:
        return path


def input_line(rows: int | None, models: Sequence[str]) -> str:
    """Input rows and models apart: 3,000 rows by 2 models are 6,000 answers, not rows."""
    shown = "?" if rows is None else f"{rows:,}"
    if len(models) > 1:
        return f"  input     {shown} rows x {len(models)} models ({', '.join(models)})"
    return f"  input     {shown} rows" + (f", model {models[0]}" if models else "")


def _cost_line(outcome: Outcome) -> str:
    """The run's cost over all sessions, this session's, and where the prices came from."""
    if outcome.cost_usd is None:
        unpriced = [m for m, source in outcome.prices.items() if source == "unpriced"]
        return "unknown: no price for " + ", ".join(unpriced) if unpriced else "unknown"
    text = money(outcome.cost_usd)
    if outcome.settled_before and outcome.progress.cost_usd is not None:
        text += f" over all sessions ({money(outcome.progress.cost_usd)} this session)"
    sources = sorted(set(outcome.prices.values()))
    if sources:
        text += ", estimated from tokens at " + "+".join(sources) + " prices"
    return text


def money(value: float | None, decimals: int | None = None) -> str:
    """USD for people: $12.35, $0.0123, $0.000013 (two significant digits when tiny)."""
    if value is None:
        return "unpriced"
    if decimals is None:
        decimals = money_decimals(value)
    return f"-${-value:,.{decimals}f}" if value < 0 else f"${value:,.{decimals}f}"


def money_decimals(value: float) -> int:
    size = abs(value)
    if size == 0 or size >= 1:
        return 2
    if size >= 0.01:
        return 4
    return min(10, 1 - math.floor(math.log10(size)))


def seconds(value: float) -> str:
    if value < 60:
        return f"{value:.1f} s"
    minutes, secs = divmod(round(value), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


MIN_CUT = 24  # a text column is never cut below this many characters


def table(names: Sequence[str], rows: Sequence[Sequence[Any]], width: int | None = None) -> str:
    """Columns aligned (numbers to the right, money with the same decimals down a column).
    Text is cut only when the table would not fit in `width` (a terminal's), widest first;
    `--format json` or csv always has the full text."""
    money = [n.endswith("_usd") for n in names]
    decimals = [
        max((money_decimals(r[i]) for r in rows if isinstance(r[i], float)), default=2)
        if is_money
        else 0
        for i, is_money in enumerate(money)
    ]

    def cell(value: Any, column: int) -> str:
        if value is None:
            return ""
        if isinstance(value, bool):
            return str(value).lower()
        if isinstance(value, float) and money[column]:
            return f"{value:,.{decimals[column]}f}"
        if isinstance(value, float):
            return number(value)
        if isinstance(value, int):
            return f"{value:,}"
        return str(value).replace("\n", " ")

    cells = [[cell(v, i) for i, v in enumerate(row)] for row in rows]
    numeric = [
        bool(rows) and all(isinstance(r[i], int | float) or r[i] is None for r in rows)
        for i in range(len(names))
    ]
    widths = [max([len(n), *(len(r[i]) for r in cells)]) for i, n in enumerate(names)]
    if width is not None:
        _fit(widths, [len(n) for n in names], numeric, width)

    def line(values: Sequence[str]) -> str:
        out = []
        for text, w, right in zip(values, widths, numeric, strict=True):
            if len(text) > w:
                text = text[: w - 3] + "..."
            out.append(text.rjust(w) if right else text.ljust(w))
        return "  ".join(out).rstrip()

    lines = [line(names), "  ".join("-" * w for w in widths)]
    lines.extend(line(r) for r in cells)
    return "\n".join(lines)


def _fit(widths: list[int], floors: list[int], numeric: list[bool], width: int) -> None:
    """Narrow the widest text columns until the table fits in width (or cannot)."""
    while sum(widths) + 2 * (len(widths) - 1) > width:
        text = [i for i, w in enumerate(widths) if not numeric[i] and w > max(MIN_CUT, floors[i])]
        if not text:
            return
        widest = max(text, key=lambda i: widths[i])
        over = sum(widths) + 2 * (len(widths) - 1) - width
        widths[widest] = max(widths[widest] - over, MIN_CUT, floors[widest])


def number(value: float) -> str:
    """A float for people: 1,234.5, 0.25, 0.000013 (never 1.3e-05)."""
    if value == 0 or value != value or abs(value) >= 1e15:
        return f"{value:g}"
    if value.is_integer():
        return f"{value:,.0f}"
    if abs(value) >= 0.01:
        return f"{value:,.6g}" if abs(value) < 1e6 else f"{value:,.0f}"
    return f"{value:.{1 - math.floor(math.log10(abs(value)))}f}"


__all__ = [
    "NotebookRenderer",
    "ProgressRenderer",
    "input_line",
    "money",
    "money_decimals",
    "number",
    "print_outcome",
    "relative",
    "seconds",
    "spec_models",
    "table",
    "terminal_width",
]

"""What a person sees: each screen run in a pseudo-terminal of 80 and 160 columns, rendered
by a small terminal emulator and compared with tests/golden/ (run ids, times and rates
normalised). RUNNER_UPDATE_GOLDEN=1 rewrites the golden files instead of comparing.

No tmux is needed: the pty has a fixed size (TIOCSWINSZ) and COLUMNS is set, so the CLI
sees the same terminal as a person's. `tmux` was used by hand to check that the emulator's
screens match a real terminal's (capture-pane).
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from .conftest import run_cli, spec_text, write_rows, write_spec

GOLDEN = Path(__file__).parent / "golden"
UPDATE = os.environ.get("RUNNER_UPDATE_GOLDEN") == "1"
WIDTHS = (80, 160)
HEIGHT = 50


class Screen:
    """Enough of a VT100 for what the CLI writes: text, CR, LF, backspace, cursor up and
    erase-in-line, and xterm's wrap at the last column (`wrapped` counts the wraps). Any
    other escape sequence fails the test (it would need a real emulator)."""

    def __init__(self, width: int) -> None:
        self.width = width
        self.lines: list[list[str]] = [[]]
        self.row = 0
        self.col = 0
        self.wrapped = 0
        self.continued: set[int] = set()  # rows that go on from the row above (wrapped)
        self._pending = ""

    def _down(self) -> None:
        self.row += 1
        while len(self.lines) <= self.row:
            self.lines.append([])

    def feed(self, data: str) -> None:
        data = self._pending + data
        self._pending = ""
        i = 0
        while i < len(data):
            ch = data[i]
            if ch == "\x1b":
                match = re.match(r"\x1b\[(\d*)([A-Za-z])", data[i:])
                if match is None:
                    if len(data) - i < 8:  # cut in the middle of a sequence: wait for more
                        self._pending = data[i:]
                        return
                    raise AssertionError(f"unexpected escape: {data[i : i + 8]!r}")
                count, code = int(match[1] or 1), match[2]
                if code == "A":
                    self.row = max(0, self.row - count)
                elif code == "K":
                    if match[1] in ("", "0"):
                        del self.lines[self.row][self.col :]
                    else:
                        self.lines[self.row] = [] if match[1] == "2" else self.lines[self.row]
                else:
                    raise AssertionError(f"unexpected escape: {match[0]!r}")
                i += len(match[0])
                continue
            if ch == "\r":
                self.col = 0
            elif ch == "\n":
                self._down()
            elif ch == "\b":
                self.col = max(0, self.col - 1)
            elif ch in "\x07":
                pass
            else:
                if self.col >= self.width:  # autowrap, as a terminal does
                    self._down()
                    self.col = 0
                    self.wrapped += 1
                    self.continued.add(self.row)
                line = self.lines[self.row]
                while len(line) < self.col:
                    line.append(" ")
                if self.col < len(line):
                    line[self.col] = ch
                else:
                    line.append(ch)
                self.col += 1
            i += 1

    def text(self) -> list[str]:
        """The screen's lines, a wrapped line joined back into one."""
        lines: list[str] = []
        for row, line in enumerate(self.lines):
            if row in self.continued and lines:
                lines[-1] += "".join(line)
            else:
                lines.append("".join(line))
        lines = [line.rstrip() for line in lines]
        while lines and not lines[-1]:
            lines.pop()
        return lines


def in_pty(
    args: list[str],
    cwd: Path,
    width: int,
    *,
    until: Callable[[list[str]], bool] | None = None,
    then: Callable[[subprocess.Popen[bytes], list[str]], None] | None = None,
    timeout: float = 60,
) -> Shot:
    """Run `python -m runner ARGS` on a pty of `width` columns; the final screen, the screen
    at the moment `until` first held (after which `then` ran), and the exit code."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", HEIGHT, width, 0, 0))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")}
    env.update(COLUMNS=str(width), LINES=str(HEIGHT), TERM="xterm")
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner", *args],
        cwd=cwd,
        env=env,
        stdin=slave,
        stdout=slave,
        stderr=slave,
        close_fds=True,
    )
    os.close(slave)
    screen = Screen(width)
    frame: list[str] | None = None
    wraps_at_frame = 0
    deadline = time.monotonic() + timeout
    raw = b""
    try:
        while True:
            left = deadline - time.monotonic()
            assert left > 0, "\n".join(screen.text())
            ready, _, _ = select.select([master], [], [], left)
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every holder of the pty's other end has closed it
                break
            if not chunk:
                break
            raw += chunk
            text = raw.decode("utf-8", errors="ignore" if len(raw) < 4 else "strict")
            raw = b""
            screen.feed(text)
            if until is not None and frame is None and until(screen.text()):
                frame = screen.text()
                wraps_at_frame = screen.wrapped
                if then is not None:
                    then(proc, frame)
        code = proc.wait(timeout=max(deadline - time.monotonic(), 1))
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return Shot(screen.text(), frame, code, screen.wrapped, wraps_at_frame)


@dataclass
class Shot:
    """A command's screens: at the end and (when asked) mid-run, and how many lines wrapped."""

    final: list[str]
    frame: list[str] | None
    code: int
    wraps: int
    wraps_at_frame: int


NORMALISE = [
    (re.compile(r"\b(\w+)-\d{8}T\d{6}Z"), r"\1-YYYYMMDDTHHMMSSZ"),
    (re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"), "YYYY-MM-DDTHH:MM:SSZ"),
    (re.compile(r"\d+\.\d s\b"), "#.# s"),
    (re.compile(r"[\d,]+\.\d per second"), "#.# per second"),
]


def normalise(lines: list[str], tmp: Path, *, all_digits: bool = False) -> str:
    out = []
    for line in lines:
        line = line.replace(str(tmp), "<tmp>")
        for pattern, repl in NORMALISE:
            line = pattern.sub(repl, line)
        if all_digits:
            # The bar's length follows the width of the counts beside it; the test checks
            # that the line fills the terminal.
            line = re.sub(r"^ *\d+%\|[^|]*\|", "#%|(bar)|", line)
            line = re.sub(r"(?<![\w-])\d[\d,.:]*", "#", line)
        line = re.sub(r"^((?:wall time|throughput|latency)\D.*?\s)[\d,.]+$", r"\1#", line)
        out.append(line.rstrip())
    return "\n".join(out) + "\n"


def check_golden(name: str, text: str) -> None:
    path = GOLDEN / name
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(text)
        return
    assert path.exists(), f"{path} is missing: run with RUNNER_UPDATE_GOLDEN=1 to write it"
    assert text == path.read_text(), f"{name} differs from its golden file:\n{text}"


def job(folder: Path, count: int, models: str, sim: str, concurrency: int) -> Path:
    write_rows(
        folder / "data.jsonl", [{"id": f"r{i}", "text": f"Question {i}?"} for i in range(count)]
    )
    return write_spec(
        folder,
        spec_text(
            name="screens",
            endpoint_extra=f"simulator = {{ {sim} }}",
            request_extra="",
            concurrency=concurrency,
        ).replace('model = "gpt-4o-mini"', f"model = {models}"),
    )


@pytest.mark.parametrize("width", WIDTHS)
def test_progress_frame_ctrl_c_and_stopped_summary(tmp_path: Path, width: int) -> None:
    """Mid-run the bar and the counters take two lines that fit the terminal; the first
    Ctrl-C is answered at once, while requests are still in flight; then the summary."""
    job(tmp_path, 200, '"gpt-4o-mini"', "latency_ms = 300", 4)
    seen: dict[str, Any] = {}

    def mid_run(screen: list[str]) -> bool:
        found = re.search(r"  ok (\d+)", "\n".join(screen))
        return found is not None and int(found[1]) >= 8

    def interrupt(proc: subprocess.Popen[bytes], frame: list[str]) -> None:
        proc.send_signal(signal.SIGINT)
        seen["at"] = time.monotonic()

    shot = in_pty(
        ["submit", "job.toml", "--runs-dir", "runs"],
        tmp_path,
        width,
        until=mid_run,
        then=interrupt,
    )
    final, frame = shot.final, shot.frame
    assert shot.code == 3, "\n".join(final)
    assert frame is not None
    assert shot.wraps_at_frame == 0, frame  # a wrapped progress line would scroll the screen
    bar, status = frame[1], frame[2]
    assert len(bar) == width - 1 and "rows [" in bar, frame
    assert status.startswith("  ok ") and "at end)  " in status, frame
    check_golden(f"progress-{width}.txt", normalise(frame, tmp_path, all_digits=True))
    # The Ctrl-C line comes before the summary that ends the session.
    stopping = [i for i, line in enumerate(final) if line.startswith("stopping: ")]
    summary = [i for i, line in enumerate(final) if re.match(r"run \S+: stopped in ", line)]
    assert stopping and summary and stopping[0] < summary[0], "\n".join(final)
    check_golden(f"interrupted-{width}.txt", normalise(final, tmp_path, all_digits=True))


@dataclass
class Finished:
    folder: Path
    submitted: Shot


@pytest.fixture(scope="module")
def two_models(tmp_path_factory: pytest.TempPathFactory) -> Finished:
    """A run of 20 rows by two models (deterministic simulator answers), submitted on an
    80-column terminal."""
    folder = tmp_path_factory.mktemp("screens")
    job(folder, 20, '["gpt-4o", "gpt-4o-mini"]', "seed = 1", 4)
    return Finished(folder, in_pty(["submit", "job.toml", "--runs-dir", "runs"], folder, 80))


def test_summary_of_a_two_model_run(two_models: Finished) -> None:
    """The summary counts input rows apart from models and gives the cost and its source."""
    shot = two_models.submitted
    final = shot.final
    assert shot.code == 0, "\n".join(final)
    assert shot.wraps == 0, final
    start = next(i for i, line in enumerate(final) if re.match(r"run \S+: completed in ", line))
    summary = final[start:]
    assert summary[1] == "  input     20 rows x 2 models (gpt-4o, gpt-4o-mini)"
    check_golden("summary.txt", normalise(summary, two_models.folder))


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("command", ["status", "report", "runs"])
def test_screens_of_a_finished_run(two_models: Finished, command: str, width: int) -> None:
    """`runner status`, `report` and `runs` fit the terminal; nothing is cut at 160."""
    assert two_models.submitted.code == 0
    (run,) = [p.name for p in (two_models.folder / "runs").iterdir()]
    args = [command] if command == "runs" else [command, run]
    shot = in_pty([*args, "--runs-dir", "runs"], two_models.folder, width)
    final = shot.final
    assert shot.code == 0, "\n".join(final)
    assert shot.wraps == 0, final
    if width == 160:
        assert not any(line.endswith("...") for line in final), final
    check_golden(f"{command}-{width}.txt", normalise(final, two_models.folder))


def test_report_of_a_two_model_run_counts_answers_apart_from_input_rows(
    two_models: Finished,
) -> None:
    """20 input rows by 2 models are 40 answers: the report does not call them 40 rows."""
    (run,) = [p.name for p in (two_models.folder / "runs").iterdir()]
    done = run_cli("report", run, "--format", "json", "--runs-dir", "runs", cwd=two_models.folder)
    assert done.returncode == 0, done.stderr
    overview = {m["metric"]: m["value"] for m in json.loads(done.stdout)["overview"]}
    assert overview["input rows"] == 20
    assert overview["models"] == 2
    assert overview["answers total"] == 40 and overview["answers ok"] == 40
    assert not any(name.startswith("rows ") for name in overview), overview

"""A session run to its end from blocking Python: the event loop, here or in a worker
thread, interrupts, progress and the simulator. What runner.submit/resume and the command
line's submit/resume share (`submit_session`, `resume_session`).

In the calling thread when no loop runs there and it is the main thread: SIGINT/SIGTERM then
drain the run as on the command line (runner/engine/job.py watches them). Otherwise (inside
Jupyter, whose loop is running, or in another thread) on a loop of its own in a worker thread
(an anyio blocking portal), the calling thread waiting: its KeyboardInterrupt asks the
session to stop through a job.StopSwitch, the first draining, the second cutting.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import anyio
import anyio.from_thread

from runner import screens, tuning
from runner.api.handle import PathLike, Run, runs_dir_of
from runner.engine import job
from runner.engine.job import Outcome, StopSwitch
from runner.errors import SpecError
from runner.records import Progress
from runner.store.state import RunDir


class Renderer(Protocol):
    """What draws a session's progress (runner/screens.py)."""

    def start(self, run: RunDir) -> None: ...

    def update(self, progress: Progress) -> None: ...

    def signalled(self, first: bool, grace_s: float) -> None: ...

    def close(self) -> None: ...


Start = Callable[[dict[str, Any]], Awaitable[Outcome]]


@dataclass(slots=True)
class Session:
    """How a blocking session ended: its outcome, and whether a signal or a KeyboardInterrupt
    stopped it (the API then raises KeyboardInterrupt; the CLI prints and exits 3)."""

    outcome: Outcome
    interrupted: bool = False


def submit_session(
    spec: PathLike, runs_dir: PathLike | None, *, check: bool, renderer: Renderer | None
) -> Session:
    """Start a run of a spec file and run it to its end (what `runner submit` does)."""
    prepared = prepare_file(spec, check)
    folder = runs_dir_of(runs_dir)
    return blocking(lambda hooks: job.submit(prepared, folder, **hooks), renderer)


def resume_session(
    ref: str | PathLike | Run,
    runs_dir: PathLike | None,
    *,
    retry_failed: bool = False,
    allow_changed_input: bool = False,
    budget_usd: float | None = None,
    spec: PathLike | None = None,
    renderer: Renderer | None,
) -> Session:
    """Continue a run to its end (what `runner resume` does)."""
    folder = runs_dir_of(runs_dir)
    target = ref.run_dir.path if isinstance(ref, Run) else ref
    return blocking(
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


def blocking(start: Start, renderer: Renderer | None) -> Session:
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

                outcome = anyio.run(main, backend_options=tuning.loop_options())
    finally:
        if renderer is not None:
            renderer.close()
    return Session(outcome, interrupted)


def _in_worker_thread(start: Start, hooks: dict[str, Any]) -> tuple[Outcome, bool]:
    """The session on its own loop in a worker thread, this thread waiting: a
    KeyboardInterrupt here asks it to stop (drain; a second one: at once), as SIGINT does."""
    switch = StopSwitch()
    hooks = {**hooks, "handle_signals": False, "stop_switch": switch}

    async def main() -> Outcome:
        return await start(hooks)

    with anyio.from_thread.start_blocking_portal(
        name="runner", backend_options=tuning.loop_options()
    ) as portal:
        future = portal.start_task_soon(main)
        while True:
            try:
                return future.result(), switch.requests > 0
            except KeyboardInterrupt:
                switch.request()


async def in_running_loop(start: Start, progress: bool) -> Run:
    renderer = renderer_for(progress)
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


def returned(session: Session) -> Run:
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


def renderer_for(progress: bool) -> Renderer | None:
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


def prepare_file(spec: PathLike, check: bool) -> job.Prepared:
    """A spec file made ready to run (`check=False`: no whole-file check, as --no-check)."""
    return job.prepare(Path(spec), check_whole_file=None if check else False, check_alongside=True)

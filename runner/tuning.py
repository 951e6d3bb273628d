"""Process tuning for a run: the allocators (glibc malloc, pyarrow's pool), the collector and the
event loop.

Settings measured by the benchmarks in bench/ (peak RSS and event-loop stalls); applied by the
command line at start-up and by the Python API around a run. Imports nothing from the package.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
import sys
from collections.abc import Iterator
from typing import Any


def skip_numpy(argv: list[str]) -> None:
    """A command-line process that never uses numpy does not import it.

    pyarrow imports numpy whenever it is installed (pandas brings it, so most data
    environments have it), and that import is ~190 ms of CPU, more than the rest of a short
    `runner` command's start-up. Nothing the command line does needs it (Arrow, Parquet,
    DuckDB to Arrow, JSON); Ray does, so `--ray` keeps it. Applied only to a real command
    line (never inside a Python process that called the API or the CLI's main itself).
    """
    if "numpy" in sys.modules or any(a == "--ray" or a.startswith("--ray=") for a in argv):
        return
    sys.modules["numpy"] = None  # type: ignore[assignment]  # import numpy -> ImportError


def tune_process() -> None:
    """Allocator settings, applied once before pyarrow is first imported.

    pyarrow's default allocator keeps freed memory mapped; after the whole-file input check
    that is ~100 MB of peak RSS a long run never gives back. The system allocator returns it.
    """
    os.environ.setdefault("ARROW_DEFAULT_MEMORY_POOL", "system")
    tune_malloc()


def tune_malloc() -> None:
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


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """No garbage collection while the run's modules are imported: they allocate tens of
    thousands of objects that all stay alive, and the collections they set off cost ~25 ms of
    a short run's CPU (median of 7, `import runner.cli, runner.engine.job, genai_prices` on one
    core: 0.353 s with the collector, 0.328 s without)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def tune_gc() -> None:
    """Fewer, cheaper garbage collections during a run (bench/run.py W3, 2,048 connections).

    With the default thresholds the collector ran ~440 times in a 20,000-row W3 run, four
    of them full collections of 70-140 ms each that stalled the event loop; 220 ms of
    collection fell in the first wave alone. What is alive when the run starts (the imported
    modules, the spec) is frozen out of every later collection, and the youngest generation
    is collected after 10,000 new objects rather than 700.
    """
    gc.freeze()
    gc.set_threshold(10_000, 10, 10)


def loop_options() -> dict[str, Any]:
    """anyio's backend options for a run's event loop: uvloop where it is installed.

    uvloop's transports, timers and callbacks are C where asyncio's are Python: at W1 (zero
    latency, 64 connections) a request costs ~45,000 fewer instructions, ~6 % of the runner's
    per-row work (callgrind, 4,000 rows). RUNNER_EVENT_LOOP=asyncio keeps asyncio's own loop
    (a fault that only one loop shows can then be told apart).
    """
    if os.environ.get("RUNNER_EVENT_LOOP", "").strip().lower() == "asyncio":
        return {}
    if importlib.util.find_spec("uvloop") is None:
        return {}  # not built for this platform (Windows): asyncio's loop
    return {"use_uvloop": True}

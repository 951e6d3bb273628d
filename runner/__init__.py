"""Bulk batch job runner for OpenAI-compatible chat-completion APIs.

The Python API (runner/api.py; the README's "Python API" section):

    import runner
    run = runner.submit("jobs/summaries.toml")
    run = runner.run(df, model="gpt-4o-mini", prompt_column="text", base_url="simulator")
    run.results(); run.report(); runner.resume(run.id); runner.open("summaries")

Every error the runner raises on purpose is a `runner.RunnerError`; bad specs, inputs and run
names are `runner.UsageError`s (`SpecError`, `InputError`, `RunNotFound`, `RunLocked`).

The API is imported on first use, so that `runner --help` and `import runner.errors` stay
fast. `runner.run` is both the API's function and the package runner/engine/ (the engine): the
import system sets a subpackage as an attribute of its parent, so the package's module is
made callable, calling `runner.api.run`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from runner.errors import (
    AuthFailed,
    InputError,
    Interrupted,
    ModelRefused,
    QuotaExhausted,
    RunLocked,
    RunnerError,
    RunNotFound,
    RunStopped,
    SpecError,
    StorageFailed,
    UsageError,
)

if TYPE_CHECKING:
    from runner.api import (
        Report,
        Run,
        Status,
        open,
        resume,
        resume_async,
        run,
        run_async,
        runs,
        submit,
        submit_async,
    )

_API = (
    "Report",
    "Run",
    "Status",
    "open",
    "resume",
    "resume_async",
    "run",
    "run_async",
    "runs",
    "submit",
    "submit_async",
)


def __getattr__(name: str) -> Any:
    if name in _API:
        from runner import api

        return getattr(api, name)
    raise AttributeError(f"module 'runner' has no attribute {name!r}")


__all__ = [
    "AuthFailed",
    "InputError",
    "Interrupted",
    "ModelRefused",
    "QuotaExhausted",
    "Report",
    "Run",
    "RunLocked",
    "RunNotFound",
    "RunStopped",
    "RunnerError",
    "SpecError",
    "Status",
    "StorageFailed",
    "UsageError",
    "open",
    "resume",
    "resume_async",
    "run",
    "run_async",
    "runs",
    "submit",
    "submit_async",
]

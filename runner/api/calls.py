"""runner.submit, runner.run, runner.resume and their async variants.

`run` builds the job spec from its keywords (the TOML's tables), writes it as the run's frozen
job.toml and a table in memory as the run's input.parquet, then runs it as `submit` does.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from runner.api.handle import PathLike, Run, resolve, runs_dir_of
from runner.api.session import (
    blocking,
    in_running_loop,
    prepare_file,
    renderer_for,
    resume_session,
    returned,
    submit_session,
)
from runner.api.spec_text import CALL, spec_toml
from runner.engine import job
from runner.engine.plan import prepare_loaded
from runner.errors import InputError, SpecError
from runner.input.memory import arrow_input, write_input
from runner.spec import check_environment, parse_spec
from runner.store.state import RunDir, check_writable

INPUT_FILE = "input.parquet"  # a table in memory, written into the run's folder
# Spec settings that are paths (relative to the spec's folder in a TOML file): runner.run()
# makes them absolute, relative to the caller's working folder.
PATH_SETTINGS = (("endpoint", "ca_bundle"), ("output", "schema"))


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
    return returned(submit_session(spec, runs_dir, check=check, renderer=renderer_for(progress)))


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
    return returned(
        blocking(
            lambda hooks: job.submit(prepared, folder.path.parent, run=folder, **hooks),
            renderer_for(progress),
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
        runs_dir=runs_dir_of(runs_dir),
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
    return returned(
        resume_session(
            ref,
            runs_dir,
            retry_failed=retry_failed,
            allow_changed_input=allow_changed_input,
            budget_usd=budget_usd,
            spec=spec,
            renderer=renderer_for(progress),
        )
    )


async def submit_async(
    spec: PathLike,
    *,
    runs_dir: PathLike | None = None,
    check: bool = True,
    progress: bool = True,
) -> Run:
    """`submit` in the running (asyncio) event loop.

    Installs no signal handler: cancelling the awaiting task stops the run (the folder is
    left consistent, state "stopped"), and the cancellation goes on up.
    """
    prepared = prepare_file(spec, check)
    folder = runs_dir_of(runs_dir)
    return await in_running_loop(lambda hooks: job.submit(prepared, folder, **hooks), progress)


async def run_async(data: object, /, *, progress: bool = True, **options: Any) -> Run:
    """`run` in the running event loop: the same keywords; stopped by cancellation, as
    `submit_async` is."""
    prepared, folder = _prepare_run(data, **options)
    return await in_running_loop(
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
    target = resolve(ref, runs_dir)
    return await in_running_loop(
        lambda hooks: job.resume(
            str(target.path),
            runs_dir_of(runs_dir),
            retry_failed=retry_failed,
            allow_changed_input=allow_changed_input,
            budget_usd=budget_usd,
            spec_path=Path(spec) if spec is not None else None,
            **hooks,
        ),
        progress,
    )


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
        table, described = arrow_input(data)
        default_name = "data"
    spec = {**spec, "name": spec.get("name") or name or default_name}
    spec["input"] = {**spec["input"], "path": str(path) if path is not None else INPUT_FILE}
    for section, key in PATH_SETTINGS:
        # A spec's paths are relative to its folder: the run's, once frozen, not the caller's.
        settings = spec.get(section)
        if not isinstance(settings, Mapping):
            continue
        value = settings.get(key)
        if isinstance(value, str | os.PathLike) and os.fspath(value).strip():
            spec[section] = {**settings, key: str(Path(value).expanduser().resolve())}
    text = spec_toml(spec)
    _in_call(lambda: check_environment(parse_spec(text, path=Path(CALL), display=CALL)))
    check_writable(runs_dir)
    folder = RunDir.create(runs_dir, spec["name"], text)
    try:
        if table is not None:
            write_input(table, folder.path / INPUT_FILE)
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


__all__ = ["resume", "resume_async", "run", "run_async", "submit", "submit_async"]

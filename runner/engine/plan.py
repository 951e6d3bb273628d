"""A job made ready to run: spec, environment and input checked, nothing sent yet.

`prepare` validates before any spending (the spec, the key's presence, the input's columns and,
unless deferred, every row); `estimate` is the dry run; `resumed_spec` picks the spec a resume
runs with (the run's frozen one, or an edited one that changes only what a resume may take).
runner/engine/job.py runs what this prepares.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from runner.errors import SpecError, StorageFailed, UsageError
from runner.input.source import CheckResult, InputFile, RequestBuilder, RowRange, check_input
from runner.output.schema import OutputSchema, load_output, sent_with_schema
from runner.records import WorkItem
from runner.report.pricing import PriceSource, estimate_range, parse_price_table
from runner.spec import (
    LoadedSpec,
    check_environment,
    load_spec,
    parse_spec,
    sent_fields_changed,
)
from runner.store.state import Manifest, RunDir


@dataclass(slots=True)
class Prepared:
    """A validated spec and input, ready to run."""

    spec: LoadedSpec
    source: InputFile
    builder: RequestBuilder
    prices: PriceSource  # the spec's [prices] over the bundled table: for budget and cost
    check: CheckResult | None
    # The whole-file check runs alongside the first requests instead of before them.
    check_alongside: bool = False
    # The JSON Schemas answers are checked against (None: answers are not checked).
    output: OutputSchema | None = None


def prepare(
    spec_path: str | Path,
    *,
    check_whole_file: bool | None = None,
    need_key: bool = True,
    check_alongside: bool = False,
) -> Prepared:
    """Validate the spec, the environment and the input's columns; check the whole input
    now, or (`check_alongside`) while the first requests go out."""
    spec = load_spec(spec_path)
    if need_key:
        check_environment(spec)
    return prepare_loaded(spec, check_whole_file, check_alongside)


def prepare_loaded(
    spec: LoadedSpec,
    check_whole_file: bool | None,
    check_alongside: bool = False,
    rows_range: RowRange | None = None,
    *,
    schema_text: str | None = None,
) -> Prepared:
    """`schema_text`: the run folder's frozen copy of the [output] schema file (a resume)."""
    job = spec.job
    prices = PriceSource(parse_price_table(job.prices, path=str(spec.path)))
    output = load_output(spec, frozen_text=schema_text)
    if job.run.budget_usd is not None and job.request is not None:
        _check_budgetable(spec, prices)
    source = InputFile(
        spec.input_path, job.input, shown=shown(spec.input_path), rows_range=rows_range
    )
    builder = RequestBuilder(sent_with_schema(job, output), source)
    source.check_columns()
    whole = job.input.check_whole_file if check_whole_file is None else check_whole_file
    if whole and check_alongside:
        return Prepared(spec, source, builder, prices, None, check_alongside=True, output=output)
    check = check_input(source, builder) if whole else None
    return Prepared(spec, source, builder, prices, check, output=output)


def _check_budgetable(spec: LoadedSpec, prices: PriceSource) -> None:
    """A budget needs a price for every model and a cap on every answer."""
    request = spec.job.request
    assert request is not None
    for model in request.models:
        if prices.price(model) is None:
            raise SpecError(
                str(spec.path),
                "run.budget_usd",
                f"model {model!r} has no known price; add [prices.{model!r}] to use a budget",
            )
    if request.answer_cap is None:
        raise SpecError(
            str(spec.path),
            "run.budget_usd",
            "needs request.max_tokens or max_completion_tokens (each answer's worst case)",
        )


def shown(path: Path) -> str:
    """A path as the user would type it: relative to the working folder when below it."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


@dataclass(frozen=True, slots=True)
class Estimate:
    """What a dry run found: the input's size and the cost range by model, nothing sent."""

    rows: int
    requests: int
    skipped: int
    # (model, requests, est. prompt tokens, worst-case completion tokens (None: no cap),
    #  cost low USD, cost high USD (None: unpriced or no cap), provenance)
    models: list[tuple[str, int, int, int | None, float | None, float | None, str]]


def estimate(prepared: Prepared) -> Estimate:
    """A dry run: read and check the whole input, estimate tokens and cost; send nothing."""
    check = prepared.check or check_input(prepared.source, prepared.builder)
    prices = prepared.prices
    models = []
    for model, (requests, prompt, completion) in sorted(check.by_model.items()):
        price = prices.price(model)
        cap = None if completion < 0 else completion
        low = high = None
        if price is not None:
            low_d, high_d = estimate_range(
                price, prompt_tokens=prompt, max_completion_tokens=cap or 0
            )
            low, high = float(low_d), (float(high_d) if cap is not None else None)
        provenance = price.provenance if price is not None else "unpriced"
        models.append((model, requests, prompt, cap, low, high, provenance))
    return Estimate(check.rows, check.items, check.skipped, models)


def sample_requests(prepared: Prepared, count: int) -> list[tuple[str, str, bytes]]:
    """The first `count` request bodies the job would send, as sent: (row id, model, body).

    Rows that are skipped (an empty prompt, over max_prompt_tokens) are not among them."""
    found: list[tuple[str, str, bytes]] = []
    if count <= 0:
        return found
    for row in prepared.source.rows():
        for item in prepared.builder.build(row):
            if isinstance(item, WorkItem):
                found.append((item.row_id, item.model, item.body))
                if len(found) >= count:
                    return found
    return found


def check_resumable(frozen: LoadedSpec, new: LoadedSpec, run_id: str) -> None:
    """Refuse a spec for `runner resume --spec` that would change what is sent.

    The endpoint, [run] and [prices] may change between sessions; the request and the way
    prompts are read from the input may not (answers already stored were asked that way).
    """
    field = sent_fields_changed(frozen, new)
    if field is not None:
        raise SpecError(
            str(new.path),
            field,
            f"differs from run {run_id}'s; a change to what is sent needs a new run "
            f"(runner submit {shown(new.path)})",
        )


def resumed_spec(run: RunDir, manifest: Manifest, spec_path: Path | None) -> LoadedSpec:
    """The spec this session runs with: the latest frozen one, or `spec_path` when its
    changes are ones a resume may take (then frozen beside the first as job.<n>.toml)."""
    frozen_file = run.path / manifest.get("spec_file", run.spec_path.name)
    frozen = parse_spec(
        frozen_file.read_text(), path=Path(manifest["spec_path"]), display=str(frozen_file)
    )
    if manifest.get("spec_hash") not in (None, frozen.hash):
        # What was sent so far was asked with the spec as frozen; an edit of the copy would
        # change it unchecked. A --spec is checked against the spec as frozen, when the file
        # it was frozen from is still as it was.
        original = _original_spec(manifest)
        if spec_path is None or original is None:
            raise UsageError(
                f"{frozen_file}: edited since the run froze it; put the change in a spec file "
                f"of your own and run: runner resume {run.run_id} --spec FILE"
                + ("" if spec_path is None else f" (once {frozen_file} is as it was)")
            )
        frozen = original
    if spec_path is None:
        return frozen
    spec = load_spec(spec_path)
    check_resumable(frozen, spec, run.run_id)
    name = f"job.{len(manifest.get('sessions', [])) + 1}.toml"
    try:
        tmp = run.path / f".{name}.tmp"
        tmp.write_text(spec.text)
        os.replace(tmp, run.path / name)
    except OSError as exc:
        raise StorageFailed(f"cannot write {run.path / name} ({exc.strerror})") from None
    manifest["spec_file"] = name
    manifest["spec_path"] = str(spec.path)
    manifest["spec_hash"] = spec.hash
    manifest.pop("budget_usd", None)  # the new spec's run.budget_usd, unless --budget-usd
    return spec


def _original_spec(manifest: Manifest) -> LoadedSpec | None:
    """The spec file the run's latest copy was frozen from, if it is still what was frozen."""
    path = Path(manifest["spec_path"])
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return None
    spec = parse_spec(text, path=path, display=str(path))
    return spec if spec.hash == manifest.get("spec_hash") else None


def session_settings(spec: LoadedSpec, spec_file: str) -> dict[str, Any]:
    """What a session ran with, for the manifest: endpoint, [run] and [prices] (the parts a
    resume may change) and the frozen spec file they came from. Never a secret: header
    values and the API key are left out (only the variable's name is kept)."""
    job = spec.job
    endpoint = job.endpoint
    return {
        "spec_file": spec_file,
        "spec_hash": spec.hash,
        "endpoint": {
            "base_url": endpoint.base_url,
            "api_key_env": endpoint.api_key_env,
            "timeout_s": endpoint.timeout_s,
            "connect_timeout_s": endpoint.connect_timeout_s,
            "headers": sorted(endpoint.headers),
            "simulator": {k: v for k, v in endpoint.simulator.items() if k != "api_key"},
        },
        "run": job.run.model_dump(mode="json"),
        "prices": job.prices,
    }


__all__ = [
    "Estimate",
    "Prepared",
    "check_resumable",
    "estimate",
    "prepare",
    "prepare_loaded",
    "resumed_spec",
    "sample_requests",
    "session_settings",
    "shown",
]

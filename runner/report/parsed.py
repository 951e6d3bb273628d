"""The `parsed` view's table: each answer's JSON as typed columns, one per schema property.

The run's content schema is the one its answers were checked with: the frozen spec's
`[output] schema` (the run folder's copy, refused when edited) or its
`request.response_format` json_schema. A row's columns hold its answer when the row is `ok`
and its content parses as JSON (one fenced block or prose around it only with `[output]
lenient = true`) and matches the schema; else they are NULL. The typing is
runner/output/columns.py's.

No duckdb here (report/query.py registers the table); imports output, spec and store.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from runner.errors import RunnerError, UsageError
from runner.output.columns import Column, answer_value, to_table, typed_columns
from runner.output.schema import Checker, OutputSchema, frozen_text, load_output
from runner.spec import LoadedSpec, parse_spec
from runner.store.state import Manifest, RunDir

KEY_COLUMNS = ("row_id", "model")
BATCH_ROWS = 8192


@dataclass(frozen=True, slots=True)
class Fields:
    """A run's content schema and its typed columns, each with the name it goes by."""

    checker: Checker
    lenient: bool
    columns: list[Column]
    names: list[str]  # the column names in views and exports (`answer_` before a clash)

    def renamed(self, taken: Iterable[str]) -> list[str]:
        """The names, those that clash with `taken` (input columns) with `answer_` in front."""
        return _unclashed(self.names, taken)


def _unclashed(names: Iterable[str], taken: Iterable[str]) -> list[str]:
    used = {name.lower() for name in taken}  # SQL names are case-insensitive
    found = []
    for name in names:
        while name.lower() in used:
            name = "answer_" + name
        used.add(name.lower())
        found.append(name)
    return found


def frozen_spec(run: RunDir, manifest: Manifest) -> LoadedSpec:
    """The spec the run last ran with (its latest frozen copy)."""
    path = run.path / str(manifest.get("spec_file", run.spec_path.name))
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{path}: the run's spec cannot be read ({exc})") from None
    return parse_spec(text, path=Path(str(manifest.get("spec_path", path))), display=str(path))


def run_output(run: RunDir, manifest: Manifest) -> tuple[LoadedSpec, OutputSchema | None]:
    """The run's frozen spec and the schemas its answers were checked with."""
    spec = frozen_spec(run, manifest)
    digest = manifest.get("output_schema_sha256")
    text = frozen_text(run.path, digest, spec, given=False, run_id=run.run_id)
    return spec, load_output(spec, frozen_text=text)


def run_fields(run: RunDir, manifest: Manifest) -> Fields:
    """The run's typed answer columns; a UsageError when its answers have no JSON Schema."""
    try:
        _, output = run_output(run, manifest)
    except RunnerError as exc:
        raise UsageError(f"run {run.run_id}: its output schema cannot be read: {exc}") from None
    if output is None or output.content is None or _is_any_object(output.content.schema):
        raise UsageError(
            f"run {run.run_id} has no JSON Schema for its answers ([output] schema or "
            "request.response_format json_schema): no typed fields"
        )
    columns = typed_columns(output.content.schema)
    # SQL has no empty column name, and DuckDB none with a NUL in it
    names = [c.name.replace("\0", "_") or "_" for c in columns]
    return Fields(output.content, output.settings.lenient, columns, _unclashed(names, KEY_COLUMNS))


def _is_any_object(schema: Any) -> bool:
    return bool(schema == {"type": "object"})  # json_object mode: no properties to type


def parsed_table(answers: pa.Table, fields: Fields) -> pa.Table:
    """row_id, model and the typed columns of `answers` (row_id, model, status, content):
    a row's columns are NULL unless it is ok with a valid answer. Converted a batch at a
    time, so the answers' Python objects never outgrow one batch."""
    names = [*KEY_COLUMNS, *fields.names]
    parts = []
    for batch in answers.to_batches(max_chunksize=BATCH_ROWS):
        statuses: Sequence[Any] = batch.column("status").to_pylist()
        contents: Sequence[Any] = batch.column("content").to_pylist()
        values = [
            answer_value(content, fields.checker, lenient=fields.lenient)
            if status == "ok"
            else None
            for status, content in zip(statuses, contents, strict=True)
        ]
        typed = to_table(values, fields.columns)
        keys = [batch.column(name) for name in KEY_COLUMNS]
        parts.append(pa.Table.from_arrays([*keys, *typed.columns], names=names))
    if not parts:
        empty = to_table([], fields.columns)
        keys = [pa.array([], pa.string()) for _ in KEY_COLUMNS]
        return pa.Table.from_arrays([*keys, *empty.columns], names=names)
    return pa.concat_tables(parts)


__all__ = [
    "KEY_COLUMNS",
    "Fields",
    "frozen_spec",
    "parsed_table",
    "run_fields",
    "run_output",
]

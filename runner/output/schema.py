"""The job's JSON Schemas: where they come from, their checks, and the run folder's copy.

An answer's content is checked against the first of: `[output] schema` (a JSON Schema file,
relative to the spec), `request.response_format.json_schema.schema`, or any JSON object for
`response_format = {type = "json_object"}`. A tool call's arguments are checked against the
`parameters` of the tool it names in `request.tools`. Every schema is checked against the
draft-07 meta-schema and compiled once, before anything is sent; a bad one is a SpecError
(exit 2) naming the spec field.

A run freezes the schema file's text into its folder (output.schema.json, its SHA-256 in the
manifest) as it freezes the spec: a resume validates with that copy, refuses a copy edited
since, and refuses `--spec` whose schema file says something else (what counts as a valid
answer is part of what is asked). A schema inside the spec text is frozen with the spec.

The home of fastjsonschema, imported only when a job has a schema (its import took 16-80 ms,
on the start-up of every run otherwise). Imports errors and spec only.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from runner.errors import SpecError, UsageError
from runner.output.metaschema import DRAFT7
from runner.spec import JobSpec, LoadedSpec, OutputSpec, read_text

if TYPE_CHECKING:
    from fastjsonschema import JsonSchemaValueException

FROZEN_NAME = "output.schema.json"
_MESSAGE_CHARS = 160

Check = Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class Checker:
    """One compiled schema: `error(value)` says why a value does not match, in one line."""

    schema: Any
    check: Check  # raises `invalid`

    def error(self, value: Any) -> str | None:
        """None when `value` matches the schema, else the JSON path and the reason."""
        try:
            self.check(value)
        except _invalid() as exc:
            return error_line(exc)
        except RecursionError:  # a deep answer to a recursive schema, or a $ref cycle
            return "$: nested too deeply to be checked"
        return None


def _invalid() -> type[JsonSchemaValueException]:
    from fastjsonschema import JsonSchemaValueException

    return JsonSchemaValueException


def compile_schema(schema: Any) -> Checker:
    """A schema compiled as a job's are (no remote $ref, no defaults filled in); for tests and
    tools. Raises fastjsonschema's JsonSchemaDefinitionException on a bad schema."""
    import fastjsonschema

    return Checker(schema, fastjsonschema.compile(schema, handlers=_NO_FETCH, use_default=False))


@dataclass(frozen=True, slots=True)
class OutputSchema:
    """What every answer of a job is checked against, and how invalid answers are re-asked."""

    content: Checker | None  # the answer's content (None: content is not checked)
    tools: Mapping[str, Checker] = field(default_factory=dict)  # tool name -> its arguments
    settings: OutputSpec = field(default_factory=OutputSpec)
    # The [output] schema file's text as read (what a run freezes); None without a file.
    file_text: str | None = None

    @property
    def file_sha256(self) -> str | None:
        return None if self.file_text is None else sha256(self.file_text)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def load_output(spec: LoadedSpec, *, frozen_text: str | None = None) -> OutputSchema | None:
    """The job's schemas, checked and compiled; None when answers are not checked at all.

    `frozen_text` is the run folder's copy of the schema file (a resume): used instead of
    the file the spec names."""
    job = spec.job
    display = str(spec.path)
    content: Checker | None = None
    file_text: str | None = None
    if job.output.schema_file is not None:
        path = spec.schema_path
        assert path is not None
        if frozen_text is None:
            file_text = read_schema_file(path, display)
        else:
            file_text = frozen_text
        content = _checker(_parse_file(file_text, display, path), display, "output.schema")
    request = job.request
    if content is None and request is not None and request.response_format is not None:
        content = _response_format(request.response_format, display)
    tools = _tools(request.tools if request is not None else None, display)
    if content is None and not tools:
        return None
    return OutputSchema(content, tools, job.output, file_text)


def sent_with_schema(job: JobSpec, output: OutputSchema | None) -> JobSpec:
    """The job as sent: a `response_format` of type json_schema without a `schema` carries
    the [output] schema file's (providers that take a schema get the one answers are
    checked against; `strict` and the rest are sent as written)."""
    request = job.request
    if output is None or output.file_text is None or output.content is None or request is None:
        return job
    response_format = request.response_format
    if not response_format or response_format.get("type") != "json_schema":
        return job
    inner = response_format.get("json_schema")
    if not isinstance(inner, dict) or "schema" in inner:
        return job
    filled = {**response_format, "json_schema": {**inner, "schema": output.content.schema}}
    return job.model_copy(
        update={"request": request.model_copy(update={"response_format": filled})}
    )


def read_schema_file(path: Path, display: str) -> str:
    """The schema file's text, or a SpecError on output.schema saying why not."""
    try:
        return read_text(path, str(path), "a JSON Schema file")
    except SpecError as exc:
        raise SpecError(display, "output.schema", f"{path}: {exc.message}") from None


def _parse_file(text: str, display: str, path: Path) -> Any:
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError as exc:
        raise SpecError(
            display, "output.schema", f"{path} is not JSON (line {exc.lineno}: {exc.msg})"
        ) from None


def _response_format(value: dict[str, Any], display: str) -> Checker | None:
    kind = value.get("type")
    if kind == "json_object":
        return _checker({"type": "object"}, display, "request.response_format")
    if kind != "json_schema":
        return None
    inner = value.get("json_schema")
    where = "request.response_format.json_schema"
    if not isinstance(inner, dict):
        raise SpecError(display, where, "must be a table with the schema (json_schema.schema)")
    if "schema" not in inner:
        return None  # nothing to check against (the provider may know it by name)
    return _checker(inner["schema"], display, f"{where}.schema")


def _tools(tools: list[dict[str, Any]] | None, display: str) -> dict[str, Checker]:
    found: dict[str, Checker] = {}
    for i, tool in enumerate(tools or []):
        function = tool.get("function")
        if tool.get("type", "function") != "function" or not isinstance(function, dict):
            continue
        name = function.get("name")
        where = f"request.tools[{i}].function"
        if not isinstance(name, str) or not name:
            raise SpecError(display, f"{where}.name", "is required (the tool's name)")
        if name in found:
            raise SpecError(display, f"{where}.name", f"names tool {name!r} twice")
        parameters = function.get("parameters", {"type": "object"})
        found[name] = _checker(parameters, display, f"{where}.parameters")
    return found


def _refs(schema: Any) -> Iterator[Any]:
    """Every $ref value and format name in a schema (iteratively: no recursion limit)."""
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            for key, value in node.items():
                if key in ("$ref", "format") and isinstance(value, str):
                    yield key, value
                elif isinstance(value, dict | list):
                    stack.append(value)
        elif isinstance(node, list):
            stack.extend(item for item in node if isinstance(item, dict | list))


def _no_fetch(uri: str) -> Any:
    raise ValueError(f"remote $ref {uri} is not fetched")


_NO_FETCH = {scheme: _no_fetch for scheme in ("http", "https", "file", "ftp", "data", "urn")}
_META: Check | None = None


def _meta() -> Check:
    global _META
    if _META is None:
        import fastjsonschema

        _META = fastjsonschema.compile(DRAFT7, handlers=_NO_FETCH, use_default=False)
    return _META


def _checker(schema: Any, display: str, where: str) -> Checker:
    """Check a schema against the meta-schema and compile it; SpecError naming `where`."""
    import fastjsonschema

    if not isinstance(schema, dict | bool):
        raise SpecError(display, where, "must be a JSON Schema (a JSON object)")
    known = {*fastjsonschema.draft07.CodeGeneratorDraft07.FORMAT_REGEXS, "regex"}
    try:
        _meta()(schema)
    except fastjsonschema.JsonSchemaValueException as exc:
        raise SpecError(display, where, f"is not a valid JSON Schema: {error_line(exc)}") from None
    unknown: dict[str, Callable[[str], bool]] = {}
    for key, value in _refs(schema):
        if key == "$ref" and not value.startswith("#"):
            raise SpecError(
                display, where, f"$ref {_cut(value, 60)!r}: only local references (#/...) work"
            )
        if key == "format" and value not in known:
            unknown[value] = _any_string  # JSON Schema: an unknown format asserts nothing
    try:
        check = fastjsonschema.compile(
            schema, handlers=_NO_FETCH, formats=unknown, use_default=False
        )
    except (fastjsonschema.JsonSchemaException, ValueError, LookupError, re.error) as exc:
        raise SpecError(
            display, where, f"is not a usable JSON Schema: {_cut(str(exc), _MESSAGE_CHARS)}"
        ) from None
    except RecursionError:
        raise SpecError(display, where, "is nested too deeply") from None
    return Checker(schema, check)


def _any_string(_value: str) -> bool:
    return True


def error_line(exc: JsonSchemaValueException) -> str:
    """A validation error as one short line: the JSON path, then the reason."""
    path = "".join(
        f"[{part}]" if isinstance(part, int) else f".{part}" for part in (exc.path or [])[1:]
    )
    message, name = exc.message, exc.name or ""
    if name and message.startswith(name):
        message = message[len(name) :].lstrip()
    return _cut(f"{'$' + path}: {message}", _MESSAGE_CHARS)


def _cut(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def freeze(output: OutputSchema | None, folder: Path) -> str | None:
    """Copy the schema file's text into a run folder; returns its hash, for the manifest
    (None: no schema file)."""
    if output is None or output.file_text is None:
        return None
    target = folder / FROZEN_NAME
    tmp = folder / f".{FROZEN_NAME}.tmp"
    try:
        with tmp.open("w", encoding="utf-8") as handle:
            handle.write(output.file_text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except OSError as exc:
        raise UsageError(f"cannot write {target} ({exc.strerror})") from None
    return output.file_sha256


def frozen_text(
    folder: Path, digest: str | None, spec: LoadedSpec, *, given: bool, run_id: str
) -> str | None:
    """The schema file text a resume validates with: the run folder's copy, whose hash the
    manifest holds (`digest`).

    Refuses (exit 2) a copy edited since it was frozen, and a `--spec` (`given`) whose
    schema file differs from it or that adds or drops a schema file."""
    has_file = spec.job.output.schema_file is not None
    if not isinstance(digest, str):
        if has_file and given:
            raise SpecError(
                str(spec.path),
                "output.schema",
                f"run {run_id} was not asked with a schema file; a change to what is asked "
                "needs a new run",
            )
        return None
    target = folder / FROZEN_NAME
    try:
        text = target.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        text = None
    if text is None or sha256(text) != digest:
        raise UsageError(
            f"{target}: missing or edited since the run froze it; put it back as it was "
            "(a change to the schema needs a new run)"
        )
    if given:
        path = spec.schema_path
        mine = None if path is None else read_schema_file(path, str(spec.path))
        if mine is None or sha256(mine) != digest:
            raise SpecError(
                str(spec.path),
                "output.schema",
                f"differs from run {run_id}'s; a change to what is asked needs a new run",
            )
    return text

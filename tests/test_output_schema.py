"""[output] spec keys and the job's JSON Schemas: loaded, checked against the meta-schema, frozen
into the run folder, and a resume refuses a schema changed since."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from runner.errors import SpecError
from runner.output.schema import FROZEN_NAME, load_output
from runner.spec import load_spec, parse_spec, sent_fields_changed

from .conftest import run_cli, spec_text, write_rows, write_spec

SCHEMA = {
    "type": "object",
    "required": ["sentiment", "score"],
    "additionalProperties": False,
    "properties": {
        "sentiment": {"enum": ["positive", "negative", "neutral"]},
        "score": {"type": "number"},
    },
}


ASK_JSON = 'response_format = { type = "json_schema", json_schema = { name = "s", strict = true } }'


def job(
    tmp_path: Path, output: str = 'schema = "schema.json"', request_extra: str = ASK_JSON
) -> Path:
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    write_rows(tmp_path / "data.jsonl", [{"id": str(i), "text": f"t{i}"} for i in range(3)])
    return write_spec(tmp_path, spec_text(request_extra=request_extra) + f"\n[output]\n{output}\n")


def spec_error(tmp_path: Path, output: str, request_extra: str = "") -> SpecError:
    with pytest.raises(SpecError) as info:
        load_output(load_spec(job(tmp_path, output, request_extra)))
    return info.value


def test_defaults() -> None:
    """[output] is optional; its defaults are no schema, strict parsing, 2 re-asks, resend."""
    spec = parse_spec(spec_text(), path=Path("x.toml"), display="x.toml")
    out = spec.job.output
    assert (out.schema_file, out.lenient, out.max_invalid_attempts, out.repair) == (
        None,
        False,
        2,
        "resend",
    )
    assert load_output(spec) is None


@pytest.mark.parametrize(
    ("output", "field", "message"),
    [
        ('repair = "fix"', "output.repair", "must be one of 'resend' or 'feedback' (got 'fix')"),
        ("max_invalid_attempts = -1", "output.max_invalid_attempts", "must be between 0 and 20"),
        ("lenient = 3", "output.lenient", "input should be a valid boolean"),
        ('schema = ""', "output.schema", "must be the path of a JSON Schema file"),
        ('shema = "x.json"', "output.shema", "unknown key (did you mean 'schema'?)"),
    ],
)
def test_bad_output_keys(tmp_path: Path, output: str, field: str, message: str) -> None:
    """Each bad [output] key is one line naming the field."""
    with pytest.raises(SpecError) as info:
        load_spec(job(tmp_path, output))
    assert info.value.field == field
    assert info.value.message.startswith(message), info.value.message


@pytest.mark.parametrize(
    ("schema_text", "message"),
    [
        (None, "no such file"),
        ("{not json", "is not JSON (line 1"),
        ('{"type": "strin"}', "is not a valid JSON Schema: $.type:"),
        ('{"properties": {"a": {"minimum": "x"}}}', "is not a valid JSON Schema: $.properties"),
        ('{"$ref": "https://example.com/s.json"}', "only local references"),
        ("[1, 2]", "must be a JSON Schema (a JSON object)"),
    ],
)
def test_bad_schema_file(tmp_path: Path, schema_text: str | None, message: str) -> None:
    """A missing, unreadable or invalid schema file is a SpecError on output.schema."""
    path = job(tmp_path)
    if schema_text is None:
        (tmp_path / "schema.json").unlink()
    else:
        (tmp_path / "schema.json").write_text(schema_text)
    with pytest.raises(SpecError) as info:
        load_output(load_spec(path))
    assert info.value.field == "output.schema"
    assert message in info.value.message, info.value.message
    assert "\n" not in str(info.value)


def test_schema_from_response_format_and_tools(tmp_path: Path) -> None:
    """Without a file, the schema comes from response_format; tools bring their parameters."""
    rf = (
        'response_format = { type = "json_schema", json_schema = { name = "s", strict = true, '
        f"schema = {_toml(SCHEMA)} }} }}\n"
        f'tools = [{{ type = "function", function = {{ name = "f", parameters = '
        f"{_toml({'type': 'object', 'properties': {'x': {'type': 'integer'}}})} }} }}]"
    )
    output = load_output(load_spec(job(tmp_path, "", rf)))
    assert output is not None and output.content is not None
    assert output.content.schema == SCHEMA
    assert set(output.tools) == {"f"}
    assert output.file_text is None


def test_bad_schema_in_request_names_its_field(tmp_path: Path) -> None:
    """An invalid schema inside request names that field."""
    rf = (
        'response_format = { type = "json_schema", json_schema = { name = "s", '
        'schema = { type = "objet" } } }'
    )
    err = spec_error(tmp_path, "", rf)
    assert err.field == "request.response_format.json_schema.schema"
    tools = 'tools = [{ type = "function", function = { name = "f", parameters = { type = 3 } } }]'
    err = spec_error(tmp_path, "", tools)
    assert err.field == "request.tools[0].function.parameters"


def _toml(value: Any) -> str:
    """A JSON value as a TOML inline value."""
    if isinstance(value, dict):
        return "{ " + ", ".join(f'"{k}" = {_toml(v)}' for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)


def test_cli_exit_2_on_bad_schema(tmp_path: Path) -> None:
    """`runner submit` with an invalid schema exits 2 with one line naming output.schema."""
    job(tmp_path)
    (tmp_path / "schema.json").write_text('{"type": 7}')
    result = run_cli("submit", "job.toml", "--runs-dir", "runs", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "output.schema" in lines[0], result.stderr
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_schema_is_frozen_and_resume_refuses_changes(tmp_path: Path) -> None:
    """The run keeps the schema file's text; resume uses it, refuses an edited copy and a
    --spec whose schema differs, and takes a --spec whose schema is the same."""
    job(tmp_path)
    result = run_cli("submit", "job.toml", "--runs-dir", "runs", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (run,) = (tmp_path / "runs").iterdir()
    frozen = run / FROZEN_NAME
    assert json.loads(frozen.read_text()) == SCHEMA
    manifest = json.loads((run / "manifest.json").read_text())
    assert isinstance(manifest["output_schema_sha256"], str)

    # The original file edited: a plain resume still uses the frozen copy.
    (tmp_path / "schema.json").write_text(json.dumps({**SCHEMA, "required": ["score"]}))
    result = run_cli("resume", run.name, "--runs-dir", "runs", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # ... a --spec naming the edited file is refused.
    result = run_cli("resume", run.name, "--spec", "job.toml", "--runs-dir", "runs", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "output.schema: differs from run" in result.stderr
    # ... the same content again is taken.
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    result = run_cli("resume", run.name, "--spec", "job.toml", "--runs-dir", "runs", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    # The frozen copy edited: refused.
    frozen.write_text(json.dumps({"type": "object"}))
    result = run_cli("resume", run.name, "--runs-dir", "runs", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "edited since the run froze it" in result.stderr


def test_resume_refuses_a_spec_adding_a_schema(tmp_path: Path) -> None:
    """A --spec that adds [output] schema to a run asked without one is refused."""
    path = job(tmp_path, "")
    result = run_cli("submit", "job.toml", "--runs-dir", "runs", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    (run,) = (tmp_path / "runs").iterdir()
    path.write_text(path.read_text() + 'schema = "schema.json"\n')
    result = run_cli("resume", run.name, "--spec", "job.toml", "--runs-dir", "runs", cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert "output.schema" in result.stderr


@pytest.mark.parametrize(
    ("old", "new", "field"),
    [
        ("lenient = false", "lenient = true", "output.lenient"),
        ('repair = "resend"', 'repair = "feedback"', "output.repair"),
        ("max_invalid_attempts = 2", "max_invalid_attempts = 3", "output.max_invalid_attempts"),
        ('schema = "a.json"', "", "output.schema"),
        ('schema = "a.json"', 'schema = "other/b.json"', None),  # compared by content
    ],
)
def test_resume_compares_output_settings(old: str, new: str, field: str | None) -> None:
    """[output] settings are part of what is sent; the schema path is not (its content is)."""
    base = spec_text() + '\n[output]\nschema = "a.json"\nlenient = false\nrepair = "resend"\n'
    base += "max_invalid_attempts = 2\n"
    a = parse_spec(base, path=Path("x.toml"), display="x.toml")
    b = parse_spec(base.replace(old, new), path=Path("x.toml"), display="x.toml")
    assert sent_fields_changed(a, b) == field


def test_ref_cycle_and_deep_answer_are_invalid_not_a_crash(tmp_path: Path) -> None:
    """A $ref cycle (x -> y -> x), or an answer nested deeper than Python's stack to a
    recursive schema, makes the answer invalid: never a RecursionError (exit 4)."""
    import orjson

    from runner.output.schema import compile_schema

    deep = orjson.loads('{"a":' * 1000 + "{}" + "}" * 1000)  # as an answer is parsed
    recursive = compile_schema({"type": "object", "properties": {"a": {"$ref": "#"}}})
    assert recursive.error({"a": {"a": {}}}) is None
    assert recursive.error(deep) == "$: nested too deeply to be checked"
    cycle = {
        "definitions": {"x": {"$ref": "#/definitions/y"}, "y": {"$ref": "#/definitions/x"}},
        "$ref": "#/definitions/x",
    }
    (tmp_path / "schema.json").write_text(json.dumps(cycle))
    write_rows(tmp_path / "data.jsonl", [{"id": "a", "text": "hi"}])
    rf = 'response_format = { type = "json_schema", json_schema = { name = "t" } }'
    text = spec_text(request_extra=rf) + '\n[output]\nschema = "schema.json"\n'
    text += "max_invalid_attempts = 0\n"
    write_spec(tmp_path, text)
    done = run_cli("submit", "job.toml", "--runs-dir", "runs", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    assert "nested too deeply" in done.stderr


@pytest.mark.parametrize("device", ["/dev/zero", "/dev/null"])
def test_schema_file_that_is_a_device_is_refused(tmp_path: Path, device: str) -> None:
    """`schema = "/dev/zero"` read forever (gigabytes of memory); a non-regular file is
    refused at once, naming the field."""
    write_rows(tmp_path / "data.jsonl", [{"id": "a", "text": "hi"}])
    write_spec(tmp_path, spec_text() + f'\n[output]\nschema = "{device}"\n')
    with pytest.raises(SpecError, match=r"output\.schema.*not a regular file"):
        load_output(load_spec(tmp_path / "job.toml"))

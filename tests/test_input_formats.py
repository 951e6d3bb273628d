"""Input formats as a user meets them: `;`-separated Latin-1 CSV end to end, spec keys of
[input] csv checked, missing columns listed, JSON braces in templates explained."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from runner.errors import SpecError
from runner.spec import parse_spec

from .conftest import run_cli, spec_text, write_rows, write_spec

LATIN = [("r0", "Où est le café ?", "été"), ("r1", "Ça coûte combien, señor ?", "à; là")]


def latin_csv(folder: Path) -> Path:
    """A `;`-separated CSV in Latin-1, one cell holding a quoted `;`."""
    lines = ["id;text;note"] + [f'{i};{t};"{n}"' for i, t, n in LATIN]
    path = folder / "data.csv"
    path.write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    return path


CSV_OPTIONS = 'csv = { delimiter = ";", encoding = "latin-1" }'


def cli(folder: Path, *args: str) -> tuple[int, str, str]:
    done = run_cli(*args, "--runs-dir", "runs", cwd=folder)
    return done.returncode, done.stdout, done.stderr


def one_line(code: int, stdout: str, stderr: str) -> str:
    assert code == 2, (stdout, stderr)
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def last_line(code: int, stdout: str, stderr: str) -> str:
    """The error line of a submit stopped by a bad row found while the run had started (the
    whole input is checked alongside the first requests): exit 2, the error last."""
    assert code == 2, (stdout, stderr)
    assert "Traceback" not in stderr, stderr
    return stderr.strip().splitlines()[-1]


def test_semicolon_latin1_csv_runs_exports_and_queries(tmp_path: Path) -> None:
    """With [input] csv = { delimiter = ";", encoding = "latin-1" } the file is sent decoded,
    exported with its columns intact, and the `input` view reads it the same way."""
    latin_csv(tmp_path)
    extra = f'id_column = "id"\nprompt_column = "text"\n{CSV_OPTIONS}'
    write_spec(tmp_path, spec_text(input_path="data.csv", input_extra=extra))
    code, _, err = cli(tmp_path, "submit", "job.toml")
    assert code == 0, err
    code, _, err = cli(tmp_path, "export", "t", "out.jsonl")
    assert code == 0, err
    exported = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [(r["id"], r["text"], r["note"]) for r in exported] == LATIN
    assert all(r["status"] == "ok" for r in exported)
    # The simulator quotes the prompt's first words: they arrived decoded.
    assert "Où est le café ?" in exported[0]["content"]
    sql = "SELECT id, note FROM input ORDER BY row_index"
    code, out, err = cli(tmp_path, "query", "t", sql, "--format", "json")
    assert code == 0, err
    assert json.loads(out) == [{"id": i, "note": n} for i, _, n in LATIN]


def test_latin1_csv_without_the_encoding_names_the_line_and_the_key(tmp_path: Path) -> None:
    """Read as UTF-8, a Latin-1 file is refused on its first bad line, pointing at
    input.csv.encoding."""
    latin_csv(tmp_path)
    extra = 'id_column = "id"\nprompt_column = "text"\ncsv = { delimiter = ";" }'
    write_spec(tmp_path, spec_text(input_path="data.csv", input_extra=extra))
    line = last_line(*cli(tmp_path, "submit", "job.toml"))
    assert line.endswith(
        "data.csv:2: invalid UTF-8 (for another encoding set input.csv.encoding, e.g. latin-1)"
    ), line


def test_semicolon_csv_without_the_delimiter_lists_the_columns_found(tmp_path: Path) -> None:
    """Read with commas, the `;` header is one column: the message lists what was found."""
    (tmp_path / "data.csv").write_text("id;text;note\nr0;Hello;x\n")
    write_spec(tmp_path, spec_text(input_path="data.csv"))
    line = one_line(*cli(tmp_path, "submit", "job.toml"))
    assert line.endswith("data.csv: no column 'id' (columns: id;text;note)"), line


@pytest.mark.parametrize(
    ("csv", "field", "message"),
    [
        ('{ delimiter = ";;" }', "input.csv.delimiter", "must be one character"),
        ('{ delimiter = "\\n" }', "input.csv.delimiter", "must be one character"),
        ('{ encoding = "klingon" }', "input.csv.encoding", "unknown encoding 'klingon'"),
        ('{ encoding = "base64" }', "input.csv.encoding", "unknown encoding 'base64'"),
        ('{ sep = ";" }', "input.csv.sep", "unknown key"),
        ('{ delimiter = "\\"" }', "input.csv", "delimiter and quote_char must differ"),
        ("5", "input.csv", ""),
    ],
)
def test_csv_keys_are_validated(csv: str, field: str, message: str) -> None:
    """Each bad [input] csv key is a SpecError naming the dotted field."""
    text = spec_text(input_path="data.csv", input_extra=f'prompt_column = "text"\ncsv = {csv}')
    with pytest.raises(SpecError) as info:
        parse_spec(text, path=Path("job.toml"), display="job.toml")
    assert info.value.field == field
    assert message in info.value.message


def test_a_bad_csv_key_exits_2_through_the_cli(tmp_path: Path) -> None:
    latin_csv(tmp_path)
    extra = 'prompt_column = "text"\ncsv = { delimiter = ";", encodng = "latin-1" }'
    write_spec(tmp_path, spec_text(input_path="data.csv", input_extra=extra))
    line = one_line(*cli(tmp_path, "submit", "job.toml"))
    assert line == "error: job.toml: input.csv.encodng: unknown key (did you mean 'encoding'?)"


def test_csv_options_on_a_jsonl_input_are_refused(tmp_path: Path) -> None:
    write_rows(tmp_path / "data.jsonl", [{"id": "a", "text": "x"}])
    extra = f'prompt_column = "text"\n{CSV_OPTIONS}'
    write_spec(tmp_path, spec_text(input_extra=extra))
    line = one_line(*cli(tmp_path, "submit", "job.toml"))
    assert line.endswith("data.jsonl: input.csv options are set but this is jsonl input"), line


def test_missing_jsonl_column_lists_the_columns_there_are(tmp_path: Path) -> None:
    write_rows(tmp_path / "data.jsonl", [{"id": "a", "question": "x", "lang": "en"}])
    write_spec(tmp_path, spec_text())
    line = last_line(*cli(tmp_path, "submit", "job.toml"))
    assert line.endswith("data.jsonl:1: no column 'text' (columns: id, question, lang)"), line


# -- templates ---------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_json_braces_in_a_template_say_to_double_them(tmp_path: Path, suffix: str) -> None:
    """A template with JSON braces is refused before anything is sent, naming the field it
    read and how to write a literal brace."""
    write_rows(tmp_path / f"data{suffix}", [{"id": "a", "text": "x"}])
    template = 'template = \'Reply as {"answer": "..."} to: {text}\''
    write_spec(tmp_path, spec_text(input_path=f"data{suffix}", input_extra=template))
    line = one_line(*cli(tmp_path, "submit", "job.toml"))
    assert line == (
        'error: input.template: field {"answer"} is not a column name; to write a literal '
        'brace in a template, double it: {{ and }} (e.g. {{"answer": "{title}"}})'
    )
    assert not (tmp_path / "runs").exists()


def test_a_lone_brace_in_a_template_says_to_double_it(tmp_path: Path) -> None:
    write_rows(tmp_path / "data.jsonl", [{"id": "a", "text": "x"}])
    write_spec(tmp_path, spec_text(input_extra="template = 'closing } then {text}'"))
    line = one_line(*cli(tmp_path, "submit", "job.toml"))
    assert line == (
        "error: input.template: Single '}' encountered in format string; "
        "to write a literal brace in a template, double it: {{ and }}"
    )


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_a_template_field_that_is_no_column_lists_the_columns(tmp_path: Path, suffix: str) -> None:
    write_rows(tmp_path / f"data{suffix}", [{"id": "a", "text": "x"}])
    extra = "template = 'About {topic}: {text}'"
    write_spec(tmp_path, spec_text(input_path=f"data{suffix}", input_extra=extra))
    line = last_line(*cli(tmp_path, "submit", "job.toml"))
    where = f"data{suffix}:1" if suffix == ".jsonl" else f"data{suffix}"
    assert line.endswith(
        f"{where}: input.template field {{topic}} is not a column (columns: id, text); "
        "to write a literal brace in a template, double it: {{ and }}"
    ), line


def test_doubled_braces_are_sent_as_literal_braces(tmp_path: Path) -> None:
    """`{{` and `}}` in a template reach the model as `{` and `}`."""
    write_rows(tmp_path / "data.jsonl", [{"id": "a", "text": "Paris"}])
    extra = "template = 'Reply {{\"city\": {text}}}'"
    write_spec(tmp_path, spec_text(input_extra=extra))
    code, _, err = cli(tmp_path, "submit", "job.toml")
    assert code == 0, err
    code, out, err = cli(tmp_path, "query", "t", "SELECT content FROM results", "--format", "json")
    assert code == 0, err
    assert 'Reply {"city": Paris}' in json.loads(out)[0]["content"]

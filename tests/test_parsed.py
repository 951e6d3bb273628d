"""The `parsed` view and `runner export --fields`: answers' fields as typed columns, NULL
where a row has no valid answer, in input order, from real runs over loopback."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from runner.engine.show import show_row
from runner.errors import UsageError
from runner.report.query import RunDB, export, query
from runner.store.state import RunDir

from .conftest import ROOT, spec_text, write_rows, write_spec
from .echo_server import Done, cli, echo_server, submit_prompts

SCHEMA = {
    "type": "object",
    "properties": {
        "sentiment": {"enum": ["positive", "negative", "neutral"]},
        "score": {"type": "number"},
        "stars": {"type": "integer"},
        "spam": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "who": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "age": {"type": ["integer", "null"]}},
            "additionalProperties": False,
        },
        "model": {"type": "string"},  # clashes with the key column
        "extra": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
    },
    "required": ["sentiment"],
}
GOOD = {
    "sentiment": "positive",
    "score": 0.75,
    "stars": 4,
    "spam": False,
    "tags": ["a", "b"],
    "who": {"name": "Ann", "age": None},
    "model": "m1",
    "extra": 7,
}
# Each row's prompt is what the echo server answers.
ANSWERS = [
    json.dumps(GOOD),
    json.dumps({"sentiment": "negative", "stars": 2**70}),  # stars beyond int64: NULL
    'Sure! Here is the JSON: {"sentiment": "positive"',  # not JSON
    json.dumps({"sentiment": "very happy"}),  # not in the enum
    "```json\n" + json.dumps({"sentiment": "neutral"}) + "\n```",  # fenced: lenient only
    json.dumps({"sentiment": "neutral", "tags": []}),
]


@pytest.fixture(scope="module")
def echo() -> Iterator[str]:
    with echo_server() as url:
        yield url


OUTPUT = '\n[output]\nschema = "schema.json"\n'


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory, echo: str) -> Done:
    return submit_prompts(tmp_path_factory.mktemp("strict"), echo, ANSWERS, OUTPUT, schema=SCHEMA)


def parsed_rows(run: RunDir) -> dict[str, dict[str, Any]]:
    names, rows = query(run, "SELECT * FROM parsed")
    return {row[0]: dict(zip(names, row, strict=True)) for row in rows}


def test_parsed_has_one_typed_column_per_property(strict: Done) -> None:
    """`parsed` has row_id, model, then each property typed from the schema (a property
    named like a key column gets answer_ in front; anyOf is JSON text)."""
    with RunDB(strict.run, with_input=False, with_parsed=True) as db:
        table = db.arrow("SELECT * FROM parsed")
    assert table.schema == pa.schema(
        [
            ("row_id", pa.string()),
            ("model", pa.string()),
            ("sentiment", pa.string()),
            ("score", pa.float64()),
            ("stars", pa.int64()),
            ("spam", pa.bool_()),
            ("tags", pa.list_(pa.string())),
            ("who", pa.struct([("name", pa.string()), ("age", pa.int64())])),
            ("answer_model", pa.string()),
            ("extra", pa.string()),
        ]
    )


def test_valid_answers_have_their_fields_and_invalid_ones_null(strict: Done) -> None:
    """A valid answer's fields are in the columns; an answer that is not JSON, breaks the
    schema, or is fenced without lenient is NULL in every column."""
    rows = parsed_rows(strict.run)
    assert rows["r0"]["sentiment"] == "positive" and rows["r0"]["score"] == 0.75
    assert rows["r0"]["who"] == {"name": "Ann", "age": None}
    assert rows["r0"]["tags"] == ["a", "b"] and rows["r0"]["extra"] == "7"
    assert rows["r0"]["answer_model"] == "m1" and rows["r0"]["model"] == "gpt-4o-mini"
    assert rows["r1"]["sentiment"] == "negative" and rows["r1"]["stars"] is None
    for row_id in ("r2", "r3", "r4"):
        assert {k: v for k, v in rows[row_id].items() if k not in ("row_id", "model")} == {
            k: None for k in rows[row_id] if k not in ("row_id", "model")
        }
    assert rows["r5"]["tags"] == []


def test_lenient_runs_take_a_fenced_answer(tmp_path: Path, echo: str) -> None:
    """With [output] lenient = true, a fenced JSON block is the answer."""
    done = submit_prompts(tmp_path, echo, ANSWERS[4:5], OUTPUT + "lenient = true\n", schema=SCHEMA)
    assert parsed_rows(done.run)["r0"]["sentiment"] == "neutral"


def test_parsed_in_sql_joins_and_never_fails_on_a_bad_row(strict: Done) -> None:
    """SQL over `parsed` (joined to results) runs although some answers are not JSON."""
    code, out, err = strict.cli(
        "query",
        strict.run.run_id,
        "SELECT p.sentiment, count(*) AS n FROM parsed p JOIN results r USING (row_id, model) "
        "GROUP BY 1 ORDER BY 1 NULLS LAST",
        "--format",
        "json",
    )
    assert code == 0, err
    assert json.loads(out) == [
        {"sentiment": "negative", "n": 1},
        {"sentiment": "neutral", "n": 1},
        {"sentiment": "positive", "n": 1},
        {"sentiment": None, "n": 3},
    ]


def test_a_run_without_a_schema_has_no_parsed_view(tmp_path: Path, echo: str) -> None:
    """Asking for `parsed` (query or export --fields) of a run without a schema is a
    one-line error, exit 2."""
    done = submit_prompts(tmp_path, echo, ANSWERS[:1])
    code, _, err = done.cli("query", done.run.run_id, "SELECT * FROM parsed")
    assert code == 2 and "no JSON Schema" in err and len(err.strip().splitlines()) == 1
    code, _, err = done.cli("export", done.run.run_id, "out.parquet", "--fields")
    assert code == 2 and "no JSON Schema" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.parquet").exists()


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".csv"])
def test_export_fields_in_input_order(strict: Done, suffix: str) -> None:
    """`export --fields` writes input columns, the row's state and the typed fields, in
    input order; Parquet keeps the types, JSONL nests, CSV has nested fields as JSON."""
    out = strict.folder / f"fields{suffix}"
    code, _, err = strict.cli("export", strict.run.run_id, str(out), "--fields", "--overwrite")
    assert code == 0, err
    if suffix == ".parquet":
        table = pq.read_table(out)
        assert table.schema.field("stars").type == pa.int64()
        assert table.schema.field("who").type == pa.struct(
            [("name", pa.string()), ("age", pa.int64())]
        )
        rows = table.to_pylist()
    elif suffix == ".jsonl":
        rows = [json.loads(line) for line in out.read_text().splitlines()]
    else:
        rows = (
            duckdb.sql(f"SELECT * FROM read_csv('{out}', all_varchar = true)")
            .to_arrow_table()
            .to_pylist()
        )
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(len(ANSWERS))]
    assert "content" not in rows[0] and rows[0]["status"] == "ok"
    assert rows[0]["text"] == ANSWERS[0]  # the input column
    who = rows[0]["who"]
    assert (json.loads(who) if suffix == ".csv" else who) == {"name": "Ann", "age": None}
    assert rows[2]["sentiment"] in (None, "")  # CSV writes NULL as an empty field


def test_export_fields_name_clashes_with_input_columns(tmp_path: Path, echo: str) -> None:
    """A property named like an input column (or a column export adds) is exported as
    answer_<name>; the input column keeps its name."""
    schema = {"type": "object", "properties": {"text": {"type": "string"}, "status": {}}}
    answer = json.dumps({"text": "from the answer", "status": [1]})
    done = submit_prompts(tmp_path, echo, [answer], OUTPUT, schema=schema)
    out = tmp_path / "o.parquet"
    assert export(done.run, out, fields=True) == 1
    (row,) = pq.read_table(out).to_pylist()
    assert row["text"] == answer and row["answer_text"] == "from the answer"
    assert row["status"] == "ok" and row["answer_status"] == "[1]"


def test_the_frozen_schema_types_the_answers(tmp_path: Path, echo: str) -> None:
    """`parsed` checks answers with the run's frozen schema: an edit of the spec's schema
    file after the run changes nothing; an edit of the run's copy is refused (exit 2)."""
    done = submit_prompts(tmp_path, echo, ANSWERS[:1], OUTPUT, schema=SCHEMA)
    (tmp_path / "schema.json").write_text(json.dumps({"type": "object", "properties": {"x": {}}}))
    assert parsed_rows(done.run)["r0"]["sentiment"] == "positive"
    frozen = done.run.path / "output.schema.json"
    frozen.write_text(frozen.read_text() + " ")
    with pytest.raises(UsageError, match="edited"):
        parsed_rows(done.run)


EXTRACT_TYPES = pa.schema(
    [
        ("row_id", pa.string()),
        ("model", pa.string()),
        ("customer_name", pa.string()),
        ("account_id", pa.string()),
        ("product", pa.string()),
        ("category", pa.string()),
        ("sentiment", pa.string()),
        ("urgency", pa.int64()),
        ("refund_requested", pa.bool_()),
        ("order_total", pa.float64()),
        ("tags", pa.list_(pa.string())),
        ("summary", pa.string()),
    ]
)


def test_simulator_extraction_with_reasks(tmp_path: Path) -> None:
    """jobs/extract.toml's schema against the simulator: `parsed` has the schema's types;
    rows valid after a re-ask have their fields, rows `invalid` after the cap are NULL; `show`
    of a re-asked row lists both paid answers (the first with its validation error) and
    costs them both."""
    shutil.copy(ROOT / "jobs" / "extract.schema.json", tmp_path / "schema.json")
    prompts = [
        "Ticket one.",
        "Ticket two [[sim:invalid_then_valid=1]]",
        "Bad [[sim:schema_violation]]",
    ]
    write_rows(tmp_path / "data.jsonl", [{"id": f"r{i}", "text": p} for i, p in enumerate(prompts)])
    extra = 'response_format = { type = "json_schema", json_schema = { name = "t" } }'
    text = spec_text(request_extra=extra) + OUTPUT + "max_invalid_attempts = 1\n"
    text = text.replace("max_tokens = 64", "max_tokens = 400")  # room for the whole JSON
    spec = write_spec(tmp_path, text)
    code, _, err = cli("submit", str(spec), "--runs-dir", str(tmp_path / "runs"))
    assert code == 1, err  # the always-invalid row
    (path,) = (tmp_path / "runs").iterdir()
    run = RunDir(path)
    with RunDB(run, with_input=False, with_parsed=True) as db:
        table = db.arrow("SELECT * FROM parsed ORDER BY row_id")
        statuses = dict(db.query("SELECT row_id, status FROM results")[1])
    assert table.schema == EXTRACT_TYPES
    assert statuses == {"r0": "ok", "r1": "ok", "r2": "invalid"}
    rows = table.to_pylist()
    assert rows[0]["category"] in ("billing", "shipping", "technical", "account", "other")
    assert 1 <= rows[1]["urgency"] <= 5
    assert all(v is None for k, v in rows[2].items() if k not in ("row_id", "model"))
    (reasked,) = show_row(run, "r1")
    assert [a["final"] for a in reasked.attempts] == [False, True]
    assert reasked.attempts[0]["validation_error"] and not reasked.attempts[1]["validation_error"]
    assert reasked.cost_usd == pytest.approx(sum(a["cost_usd"] for a in reasked.attempts))
    code, out, _ = cli("show", run.run_id, "r2", "--runs-dir", str(tmp_path / "runs"))
    assert code == 0
    assert "answer: invalid" in out and "validation error: $" in out


def test_a_query_that_only_mentions_parsed_runs(tmp_path: Path, echo: str) -> None:
    """The word parsed in a string of a run without a schema does not make the query fail."""
    done = submit_prompts(tmp_path, echo, ["parsed"])
    _, rows = query(done.run, "SELECT count(*) AS n FROM results WHERE content = 'parsed'")
    assert rows == [(1,)]


def test_hostile_names_export_and_query(tmp_path: Path, echo: str) -> None:
    """Property names with a NUL, a `"`, or a case-only clash with a key or input column,
    and an input column with a `"` in its name: export and `parsed` work (no exit 4)."""
    schema = {
        "type": "object",
        "properties": {
            "a\u0000b": {"type": "string"},
            'x" , 1 AS "y': {"type": "integer"},
            "ID": {"type": "string"},
            "Model": {"type": "string"},
        },
    }
    answer = {"a\u0000b": "nul", 'x" , 1 AS "y': 3, "ID": "big", "Model": "m"}
    done = submit_prompts(tmp_path, echo, [json.dumps(answer)], OUTPUT, schema=schema)
    names, rows = query(done.run, "SELECT * FROM parsed")
    assert len(names) == len({n.lower() for n in names}) == 6
    assert rows[0][2:] == ("nul", 3, "big", "m")
    for suffix in ("csv", "parquet"):
        out = tmp_path / f"out.{suffix}"
        assert export(done.run, out, fields=True) == 1
    table = pq.read_table(tmp_path / "out.parquet")
    assert len(table.column_names) == len({n.lower() for n in table.column_names})
    assert table.column("answer_ID").to_pylist() == ["big"]
    assert table.column('x" , 1 AS "y').to_pylist() == [3]


def test_input_column_with_a_quote_exports(tmp_path: Path, echo: str) -> None:
    write_rows(tmp_path / "data.jsonl", [{"id": "r0", 'a"b': "x", "text": "hello"}])
    text = spec_text(base_url=echo, input_extra='id_column = "id"\nprompt_column = "text"')
    write_spec(tmp_path, text)
    code, _, err = cli("submit", str(tmp_path / "job.toml"), "--runs-dir", str(tmp_path / "runs"))
    assert code == 0, err
    (path,) = (tmp_path / "runs").iterdir()
    out = tmp_path / "out.parquet"
    assert export(RunDir(path), out) == 1
    assert pq.read_table(out).column('a"b').to_pylist() == ["x"]

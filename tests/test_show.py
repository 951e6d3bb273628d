"""`runner show RUN ROW_ID` and `runner submit --dry-run --show N`: the request bodies they
print are the bytes a real run sends (a loopback server records what it receives)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from runner.engine.show import show_row
from runner.report.query import price_rows, query

from .conftest import write_rows
from .echo_server import RECEIVED, Done, cli, echo_server, submit_prompts

PROMPTS = ['{"a": 1}', "", "plain text", '{"a": 2}']
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
OUTPUT = '\n[output]\nschema = "schema.json"\n'


@pytest.fixture(scope="module")
def echo() -> Iterator[str]:
    with echo_server() as url:
        yield url


@pytest.fixture(scope="module")
def done(tmp_path_factory: pytest.TempPathFactory, echo: str) -> Done:
    return submit_prompts(
        tmp_path_factory.mktemp("show"),
        echo,
        PROMPTS,
        OUTPUT,
        schema=SCHEMA,
        request_extra="temperature = 0.5",
    )


def test_show_prints_the_bytes_that_were_sent(done: Done) -> None:
    """`show --raw` prints the row's body byte for byte as the server received it, says it
    was sent, and gives the answer, the attempts and the cost the report gives."""
    code, out, err = done.cli("show", done.run.run_id, "r3", "--raw")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == f"run {done.run.run_id}  row r3  model gpt-4o-mini"
    assert lines[1].startswith("request (as sent; request_hash ")
    assert lines[2].encode() in RECEIVED
    assert json.loads(lines[2])["messages"] == [{"role": "user", "content": '{"a": 2}'}]
    assert "answer: ok, finish_reason stop, 1 journaled attempt(s)" in out
    assert 'content:\n{"a": 2}' in out
    prices = price_rows(done.run)
    _, rows = query(done.run, "SELECT cost_usd FROM costed WHERE row_id = 'r3'", prices=prices)
    (row,) = show_row(done.run, "r3")
    assert row.cost_usd == pytest.approx(rows[0][0]) and row.cost_usd > 0
    assert row.sent is True and len(row.attempts) == 1


def test_show_pretty_prints_by_default_and_as_json(done: Done) -> None:
    """Without --raw the body is indented JSON; --json gives everything as one object."""
    code, out, _ = done.cli("show", done.run.run_id, "r0")
    assert code == 0
    body = out.split("):\n", 1)[1].split("\nanswer:", 1)[0]
    assert (
        "\n  " in body and orjson.dumps(json.loads(body), option=orjson.OPT_SORT_KEYS) in RECEIVED
    )
    code, out, _ = done.cli("show", done.run.run_id, "r0", "--json")
    (found,) = json.loads(out)
    assert found["request"]["temperature"] == 0.5 and found["sent"] is True
    assert found["attempts"][0]["content"] == '{"a": 1}'


def test_show_a_row_that_was_not_sent(done: Done) -> None:
    """A row skipped for an empty prompt says so instead of a body."""
    code, out, _ = done.cli("show", done.run.run_id, "r1")
    assert code == 0
    assert out.splitlines()[1] == "not sent: empty prompt"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("show", "nope", "r0"), "no run or job named 'nope'"),
        (("show", "{run}", "r9"), "no row 'r9' in its input"),
    ],
)
def test_unknown_run_or_row_is_one_line_exit_2(
    done: Done, args: tuple[str, ...], message: str
) -> None:
    """An unknown run or row id: one line, exit 2."""
    code, _, err = done.cli(*(a.format(run=done.run.run_id) for a in args))
    assert code == 2
    assert message in err and len(err.strip().splitlines()) == 1


def test_show_after_the_input_changed(tmp_path: Path, echo: str) -> None:
    """With the row edited since the run, show prints what would be sent now and says the
    run sent another body; the attempts shown are the run's."""
    done = submit_prompts(tmp_path, echo, ['{"a": 1}'], OUTPUT, schema=SCHEMA)
    write_rows(tmp_path / "data.jsonl", [{"id": "r0", "text": '{"a": 5}'}])
    code, out, err = done.cli("show", done.run.run_id, "r0")
    assert code == 0, err
    assert "run sent another body (the input changed)" in out
    assert '"content": "{\\"a\\": 5}"' in out
    (row,) = show_row(done.run, "r0")
    assert row.sent is False and row.attempts[0]["content"] == '{"a": 1}'


def test_show_one_block_per_model(tmp_path: Path, echo: str) -> None:
    """A run of two models shows the row's request for each, each as it was sent."""
    done = submit_prompts(tmp_path, echo, ["hi"], models=["gpt-4o-mini", "gpt-4o"])
    code, out, _ = done.cli("show", done.run.run_id, "r0", "--raw")
    assert code == 0
    blocks = out.split("\n\n")
    assert [b.splitlines()[0].rsplit(" ", 1)[1] for b in blocks] == ["gpt-4o-mini", "gpt-4o"]
    assert all(b.splitlines()[2].encode() in RECEIVED for b in blocks)


def test_dry_run_show_prints_the_bodies_a_run_sends(tmp_path: Path, echo: str) -> None:
    """`submit --dry-run --show 2` prints the first two bodies that would be sent (the
    empty row skipped) after the figures; a run then sends exactly those bodies."""
    write_rows(tmp_path / "data.jsonl", [{"id": f"r{i}", "text": p} for i, p in enumerate(PROMPTS)])
    done = submit_prompts(tmp_path, echo, PROMPTS, request_extra="temperature = 0.5")
    before = done.run.path.parent
    code, out, err = cli(
        "submit", str(tmp_path / "job.toml"), "--dry-run", "--show", "2", "--runs-dir", str(before)
    )
    assert code == 0, err
    assert "nothing was sent" in out.splitlines()[0]
    heads = [line for line in out.splitlines() if line.startswith("# row ")]
    assert heads == ["# row r0, model gpt-4o-mini", "# row r2, model gpt-4o-mini"]
    bodies = [json.loads(part.split("\n", 1)[1]) for part in out.split("\n# row ")[1:]]
    assert len(bodies) == 2
    for body in bodies:
        assert orjson.dumps(body, option=orjson.OPT_SORT_KEYS) in RECEIVED
    assert len(list(before.iterdir())) == 1  # the dry run made no run


def test_show_needs_dry_run(tmp_path: Path, done: Done) -> None:
    """`submit --show` without --dry-run is refused: one line, exit 2, nothing sent."""
    sent = len(RECEIVED)
    code, _, err = cli(
        "submit", str(done.folder / "job.toml"), "--show", "1", "--runs-dir", str(tmp_path)
    )
    assert code == 2 and "--show needs --dry-run" in err and len(err.strip().splitlines()) == 1
    assert len(RECEIVED) == sent and not (tmp_path / "runs").exists()


def test_show_a_body_whose_schema_comes_from_the_schema_file(tmp_path: Path, echo: str) -> None:
    """A response_format json_schema without a schema is sent with the [output] schema
    file's: show prints that body, byte for byte as sent."""
    extra = 'response_format = { type = "json_schema", json_schema = { name = "a" } }'
    done = submit_prompts(tmp_path, echo, ['{"a": 1}'], OUTPUT, schema=SCHEMA, request_extra=extra)
    code, out, err = done.cli("show", done.run.run_id, "r0", "--raw")
    assert code == 0, err
    assert out.splitlines()[1].startswith("request (as sent;")
    body = out.splitlines()[2]
    assert body.encode() in RECEIVED
    assert json.loads(body)["response_format"]["json_schema"]["schema"] == SCHEMA


def test_show_by_row_number_without_an_id_column(tmp_path: Path, echo: str) -> None:
    """Without an id column a row is shown by its number from 0; another id says so."""
    done = submit_prompts(tmp_path, echo, ["zero", "one"], input_extra='prompt_column = "text"')
    code, out, _ = done.cli("show", done.run.run_id, "1", "--raw")
    assert code == 0
    assert json.loads(out.splitlines()[2])["messages"][0]["content"] == "one"
    code, _, err = done.cli("show", done.run.run_id, "r1")
    assert code == 2 and "row ids are row numbers from 0" in err


def test_show_when_the_input_is_gone(tmp_path: Path, echo: str) -> None:
    """With the run's input file deleted the body cannot be rebuilt: one line, exit 2."""
    done = submit_prompts(tmp_path, echo, ["hi"])
    (tmp_path / "data.jsonl").unlink()
    code, _, err = done.cli("show", done.run.run_id, "r0")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "cannot be read to rebuild the request" in err and "no such file" in err


def test_show_a_row_answered_by_an_identical_request(tmp_path: Path, echo: str) -> None:
    """Of two rows with the same request, the one that reused the other's answer shows that
    answer, names the row that bought it, and costs nothing."""
    done = submit_prompts(tmp_path, echo, ['{"a": 7}', '{"a": 7}'])
    shown = {row_id: show_row(done.run, row_id)[0] for row_id in ("r0", "r1")}
    reused = [r for r in shown.values() if r.final and r.final["reused"]]
    assert len(reused) == 1
    (row,) = reused
    assert row.final is not None and row.final["content"] == '{"a": 7}'
    assert row.cost_usd == 0
    code, out, _ = done.cli("show", done.run.run_id, row.row_id)
    assert code == 0
    other = "r1" if row.row_id == "r0" else "r0"
    assert f"answered by row {other}'s identical request" in out
    assert 'content:\n{"a": 7}' in out

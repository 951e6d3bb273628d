"""Acceptance of checked structured outputs, end to end: `runner submit` as a real process
against the simulator over real HTTP, a 2,000-row extraction job with 10 % invalid first
answers, every re-ask counted in tokens and cost, rows still invalid after the cap kept with
their error; and the shipped jobs/extract.toml runs on a fresh checkout's files."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from runner.sim.answers import request_tag
from runner.sim.server import SimulatorConfig, SimulatorThread
from runner.store.state import RunDir, list_runs

from .conftest import ROOT, run_cli, sections, select, spec_text, write_rows, write_spec

ROWS = 2_000
ALWAYS_INVALID = range(0, ROWS, 100)  # 20 rows whose every answer is invalid
PRICES = {"input": 2.0, "cached_input": 0.5, "output": 8.0}  # USD per million tokens


@pytest.fixture
def sim() -> Iterator[SimulatorThread]:
    with SimulatorThread(SimulatorConfig(rate_invalid=0.1)) as s:
        yield s


def test_extraction_job_reasks_count_and_cost(tmp_path: Path, sim: SimulatorThread) -> None:
    """2,000 rows, ~10 % invalid first answers: all ok after a re-ask, the 20 rows that are
    always invalid end `invalid` with their error after 2 re-asks; the report's tokens are the
    simulator's counters and its cost is the hand computation from them."""
    schema = json.loads((ROOT / "jobs" / "extract.schema.json").read_text())
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    data = [
        {
            "id": f"a{i}",
            "text": f"Ticket {i}: the customer in Oslo reports a late parcel."
            + (" [[sim:invalid_json]]" if i in ALWAYS_INVALID else ""),
        }
        for i in range(ROWS)
    ]
    write_rows(tmp_path / "data.jsonl", data)
    rf = (
        'response_format = { type = "json_schema", '
        'json_schema = { name = "ticket", strict = true } }'
    )
    text = spec_text(base_url=sim.base_url, request_extra=rf, concurrency=64).replace(
        "max_tokens = 64", "max_tokens = 300"
    )
    prices = "".join(f"{k} = {v}\n" for k, v in PRICES.items())
    text += f'\n[output]\nschema = "schema.json"\n\n[prices."gpt-4o-mini"]\n{prices}'
    write_spec(tmp_path, text)
    done = run_cli("submit", "job.toml", "--runs-dir", "runs", cwd=tmp_path, timeout=120)
    assert done.returncode == 1, done.stderr  # the always-invalid rows
    assert f"{ROWS - len(ALWAYS_INVALID):,} ok, 0 failed, {len(ALWAYS_INVALID)} invalid" in (
        done.stderr
    )
    assert "invalid: invalid JSON" in done.stderr  # the top errors name the schema failure

    (listed,) = list_runs(tmp_path / "runs")
    run = RunDir(tmp_path / "runs" / listed["run_id"])
    results = select(run, "SELECT row_id, status, validation_error, content FROM results")
    assert len(results) == ROWS == len({r["row_id"] for r in results})
    texts = {row["id"]: row["text"] for row in data}
    invalid = {r["row_id"] for r in results if r["status"] == "invalid"}
    assert invalid == {f"a{i}" for i in ALWAYS_INVALID}
    assert all(r["status"] == "ok" for r in results if r["row_id"] not in invalid)
    for r in results:
        if r["row_id"] in invalid:
            assert r["validation_error"].startswith("invalid JSON"), r
            assert r["content"].startswith("Sure! Here is the JSON")  # the last answer kept
        else:
            assert r["validation_error"] is None
            assert set(json.loads(r["content"])) == set(schema["properties"])
        # Each answer, re-asked or not, is its own row's (the simulator tags its strings).
        messages = [{"role": "user", "content": texts[r["row_id"]]}]
        assert f"[req {request_tag('gpt-4o-mini', messages)}]" in r["content"], r

    s = sim.stats
    assert s.resent_after_ok == 0  # a re-ask is not an answer paid twice
    # Re-asks: 2 for each always-invalid row, 1 for each row drawn invalid (~10 %).
    reasks = select(run, "SELECT count(*) AS n FROM attempts WHERE NOT final")[0]["n"]
    drawn = reasks - 2 * len(ALWAYS_INVALID)
    assert 0.05 * ROWS < drawn < 0.15 * ROWS, drawn
    assert reasks == s.reasked_after_invalid == s.invalid_answers - len(ALWAYS_INVALID)
    assert s.ok == ROWS + reasks

    report = sections(run)
    tokens = {r["tokens"]: r["count"] for r in report["tokens"]}
    assert tokens["prompt"] == s.prompt_tokens
    assert tokens["completion"] == s.completion_tokens
    assert tokens["cached (inside prompt)"] == s.cached_tokens
    hand = (
        (s.prompt_tokens - s.cached_tokens) * PRICES["input"]
        + s.cached_tokens * PRICES["cached_input"]
        + s.completion_tokens * PRICES["output"]
    ) / 1e6
    (cost,) = report["cost"]
    assert cost["cost_usd"] == pytest.approx(hand, abs=1e-6)
    overview = {r["metric"]: r["value"] for r in report["overview"]}
    assert overview["rows invalid (answers failed the schema)"] == len(ALWAYS_INVALID)
    assert overview["invalid answers re-asked (paid, counted)"] == reasks
    assert overview["rows pending"] == 0


def test_shipped_extract_job_runs(tmp_path: Path) -> None:
    """jobs/extract.toml, its schema and its sample rows run as shipped (built-in simulator):
    every row ok, and the answers are JSON for the schema."""
    for name in ("jobs/extract.toml", "jobs/extract.schema.json", "sample_data/tickets.jsonl"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / name, tmp_path / name)
    done = run_cli("submit", "jobs/extract.toml", "--runs-dir", "runs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "re-asked" in done.stderr  # the sample holds rows the simulator answers invalid once
    (listed,) = list_runs(tmp_path / "runs")
    run = RunDir(tmp_path / "runs" / listed["run_id"])
    got = select(run, "SELECT status, content FROM results")
    assert got and all(r["status"] == "ok" for r in got)
    schema = json.loads((ROOT / "jobs" / "extract.schema.json").read_text())
    assert all(set(json.loads(r["content"])) <= set(schema["properties"]) for r in got)

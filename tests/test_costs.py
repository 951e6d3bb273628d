"""Costs: reports against the simulator's own counters, budgets, dry runs, the SQL sandbox."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pyarrow.parquet as pq
import pytest

from runner.engine import job
from runner.errors import SpecError, UsageError
from runner.report.query import price_rows, query
from runner.sim.server import SimulatorConfig, SimulatorThread
from runner.store.sink import parts

from .conftest import (
    run_cli,
    sections,
    select,
    spec_text,
    start_runner,
    submit_job,
    write_rows,
    write_spec,
)

OVERRIDE = '[prices."gpt-4o-mini"]\ninput = 1000.0\ncached_input = 250.0\noutput = 2000.0\n'


@pytest.fixture
def sim() -> Iterator[SimulatorThread]:
    with SimulatorThread(SimulatorConfig()) as s:
        yield s


def long_rows(count: int, marker: dict[int, str] | None = None) -> list[dict[str, Any]]:
    """Prompts long enough (>= 64 tokens) for the simulator to report cached tokens."""
    marker = marker or {}
    filler = "Please summarise the following notes about batch processing carefully. " * 4
    return [{"id": f"r{i}", "text": f"{filler} Row {i}. {marker.get(i, '')}"} for i in range(count)]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("extra", "rates", "provenance"),
    [
        ("", (0.15, 0.075, 0.60), "price-table"),  # genai-prices' gpt-4o-mini
        (OVERRIDE, (1000.0, 250.0, 2000.0), "override"),
    ],
)
async def test_report_matches_simulator_counters_and_hand_computed_cost(
    tmp_path: Path,
    sim: SimulatorThread,
    extra: str,
    rates: tuple[float, float, float],
    provenance: str,
) -> None:
    """Report tokens equal the simulator's counters; cost equals the hand computation."""
    outcome = await submit_job(tmp_path, spec_text(base_url=sim.base_url) + extra, long_rows(200))
    assert outcome.exit_code == 0
    stats = sim.stats
    assert stats.cached_tokens > 0  # the cached rate is really exercised
    got = sections(outcome.run)
    tokens = {r["tokens"]: r["count"] for r in got["tokens"]}
    assert tokens["prompt"] == stats.prompt_tokens
    assert tokens["cached (inside prompt)"] == stats.cached_tokens
    assert tokens["completion"] == stats.completion_tokens
    assert tokens["total"] == stats.total_tokens
    inp, cached, out = rates
    expected = (
        (stats.prompt_tokens - stats.cached_tokens) * inp
        + stats.cached_tokens * cached
        + stats.completion_tokens * out
    ) / 1e6
    [cost] = got["cost"]
    assert cost["cost_usd"] == pytest.approx(expected, rel=1e-9, abs=1e-6)
    assert cost["provenance"] == provenance and cost["uncosted_rows"] == 0


@pytest.mark.anyio
async def test_unpriced_model_and_missing_usage_are_never_zero(
    tmp_path: Path, sim: SimulatorThread
) -> None:
    """An unpriced model reports as unpriced and an answer without usage as unknown, not $0."""
    text = spec_text(base_url=sim.base_url).replace(
        'model = "gpt-4o-mini"', 'model = ["gpt-4o-mini", "sim-echo"]'
    )
    outcome = await submit_job(tmp_path, text, long_rows(10, {3: "[[sim:no_usage]]"}))
    assert outcome.exit_code == 0
    by_model = {r["model"]: r for r in sections(outcome.run)["cost"]}
    assert by_model["sim-echo"]["cost_usd"] is None
    assert by_model["sim-echo"]["provenance"] == "unpriced"
    assert by_model["gpt-4o-mini"]["uncosted_rows"] == 1
    assert "unknown-usage" in by_model["gpt-4o-mini"]["provenance"]
    rows = query(
        outcome.run,
        "SELECT cost_usd, cost_provenance FROM costed WHERE row_id = 'r3'",
        prices=price_rows(outcome.run),
    )
    assert {tuple(r) for r in rows[1]} == {(None, "unknown-usage"), (None, "unpriced")}


@pytest.mark.anyio
async def test_budget_is_never_exceeded_and_resume_with_more_finishes(
    tmp_path: Path, sim: SimulatorThread
) -> None:
    """With a budget for about half the rows, spend stays under it; a bigger budget finishes."""
    rates = (1000.0, 250.0, 2000.0)
    text = spec_text(base_url=sim.base_url, run_extra="budget_usd = 15.0") + OVERRIDE
    outcome = await submit_job(tmp_path, text, long_rows(400))
    assert outcome.state == "stopped" and outcome.exit_code == 3
    assert outcome.stop_reason is not None and outcome.stop_reason.startswith("budget reached")
    assert "resume with --budget-usd" in outcome.stop_reason

    def spent() -> float:
        s = sim.stats
        return (
            (s.prompt_tokens - s.cached_tokens) * rates[0]
            + s.cached_tokens * rates[1]
            + s.completion_tokens * rates[2]
        ) / 1e6

    assert 0 < sim.stats.ok < 400
    assert spent() <= 15.0
    assert spent() >= 15.0 * 0.3  # the budget was used, not refused up front

    resumed = await job.resume(
        outcome.run.run_id, tmp_path / "runs", handle_signals=False, budget_usd=1000.0
    )
    assert resumed.state == "completed"
    assert sim.stats.ok == 400 and sim.stats.resent_after_ok == 0
    # The manifest's running cost adds up both sessions (what `runner runs` shows).
    assert outcome.run.read_manifest()["cost_usd"] == pytest.approx(spent(), rel=1e-6)


CHEAP = '[prices."gpt-4o-mini"]\ninput = 10.0\noutput = 20.0\n'


def worst_case_usd(text: str, max_tokens: int = 64) -> float:
    """A row's worst case at CHEAP rates: the prompt as the simulator counts it (UTF-8 bytes
    / 4 + 4, the runner's own estimate too) plus a full-length answer."""
    return ((len(text.encode()) // 4 + 4) * 10.0 + max_tokens * 20.0) / 1e6


@pytest.mark.anyio
@pytest.mark.parametrize(
    "directive",
    [
        "no_usage",
        "usage_negative",
        "usage_string",
        "usage_float",
        "usage_bool",
        "usage_huge",
        "cost_negative",
    ],
)
async def test_budget_holds_when_usage_is_missing_or_untrustworthy(
    tmp_path: Path, sim: SimulatorThread, directive: str
) -> None:
    """Answers whose usage is missing or not non-negative integers count at their worst case:
    the answers the server sold, each at its worst case, stay within budget_usd; untrusted
    usage is kept raw, priced as unknown, never as a negative cost."""
    data = long_rows(200, dict.fromkeys(range(200), f"[[sim:{directive}]] [[sim:cost]]"))
    text = spec_text(base_url=sim.base_url, run_extra="budget_usd = 0.1") + CHEAP
    outcome = await submit_job(tmp_path, text, data)
    assert outcome.state == "stopped" and outcome.exit_code == 3
    assert outcome.stop_reason is not None and outcome.stop_reason.startswith("budget reached")
    answered = select(outcome.run, "SELECT row_id, usage_raw, prompt_tokens FROM results")
    assert 0 < sim.stats.ok == len(answered) < 200
    texts = {row["id"]: row["text"] for row in data}
    assert sum(worst_case_usd(texts[r["row_id"]]) for r in answered) <= 0.1
    assert sim.stats.ok * min(worst_case_usd(t) for t in texts.values()) <= 0.1
    assert all(r["prompt_tokens"] is None for r in answered)
    if directive != "no_usage":
        assert all(r["usage_raw"] and r["usage_raw"].startswith("{") for r in answered)
    costed = query(
        outcome.run, "SELECT DISTINCT cost_provenance FROM costed", prices=price_rows(outcome.run)
    )[1]
    assert costed == [("unknown-usage",)]
    [cost] = sections(outcome.run)["cost"]
    assert cost["cost_usd"] is None or cost["cost_usd"] >= 0


@pytest.mark.anyio
async def test_budget_over_sessions_counts_earlier_unknown_usage_at_its_worst_case(
    tmp_path: Path, sim: SimulatorThread
) -> None:
    """A resume with a larger budget counts what earlier sessions spent on answers without
    usage at their worst case: the total stays within the new budget."""
    data = long_rows(200, dict.fromkeys(range(200), "[[sim:no_usage]]"))
    text = spec_text(base_url=sim.base_url, run_extra="budget_usd = 0.05") + CHEAP
    outcome = await submit_job(tmp_path, text, data)
    assert outcome.state == "stopped"
    first = sim.stats.ok
    resumed = await job.resume(
        outcome.run.run_id, tmp_path / "runs", handle_signals=False, budget_usd=0.1
    )
    assert resumed.state == "stopped"
    answered = select(outcome.run, "SELECT row_id FROM results")
    assert first < sim.stats.ok == len(answered) < 200
    texts = {row["id"]: row["text"] for row in data}
    assert sum(worst_case_usd(texts[r["row_id"]]) for r in answered) <= 0.1


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM])
def test_budget_holds_across_a_kill_9_with_answers_of_unknown_usage(
    tmp_path: Path, sim_factory: Any, stop: signal.Signals
) -> None:
    """A session killed -9 after answers without usage (each counted at its worst case),
    with requests on the wire, then resumed to its budget: the answers the server served,
    each at its worst case, stay within budget_usd. The same after a stop that cuts the
    requests on the wire (SIGTERM with grace_s = 0): they may have been billed."""
    sim = sim_factory(latency_ms=100)
    filler = "Please summarise the following notes about batch processing carefully. " * 4
    # Prompts of one length, answers cut at max_tokens: every answer served the same tokens.
    data = [{"id": f"r{i}", "text": f"{filler} Row {i:03d}. [[sim:no_usage]]"} for i in range(300)]
    write_rows(tmp_path / "data.jsonl", data)
    extra = "budget_usd = 0.2\ngrace_s = 0"
    text = spec_text(base_url=sim.base_url, run_extra=extra, concurrency=8)
    write_spec(tmp_path, text.replace("max_tokens = 64", "max_tokens = 4") + CHEAP)
    proc = start_runner(tmp_path, "submit", "job.toml")
    assert proc.stderr is not None
    first = proc.stderr.readline()
    assert first.startswith("run "), first + proc.communicate(timeout=30)[1]
    run_id = first.split()[1].rstrip(":")
    deadline = time.monotonic() + 30
    while sim.stats.ok < 30:  # a test-side wait on another process
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.01)
    proc.send_signal(stop)
    proc.communicate(timeout=30)
    killed_at = sim.stats.served_tokens
    resumed = run_cli("resume", run_id, "--runs-dir", str(tmp_path / "runs"), cwd=tmp_path)
    assert resumed.returncode == 3, resumed.stderr
    assert "budget reached" in resumed.stderr
    prompt = len(data[0]["text"].encode()) // 4 + 4
    served, rest = divmod(sim.stats.served_tokens, prompt + 4)
    assert rest == 0 and sim.stats.served_tokens > killed_at
    assert served * worst_case_usd(data[0]["text"], max_tokens=4) <= 0.2, served


@pytest.mark.anyio
async def test_unknown_usage_charges_are_journaled_and_old_parts_without_them_still_read(
    tmp_path: Path, sim: SimulatorThread
) -> None:
    """Each answer without usage carries its worst case (charged_usd), which a resume
    counts; parts written before that column existed still read (counted as before)."""
    data = long_rows(20, dict.fromkeys(range(20), "[[sim:no_usage]]"))
    text = spec_text(base_url=sim.base_url, run_extra="budget_usd = 1.0") + CHEAP
    outcome = await submit_job(tmp_path, text, data)
    assert outcome.state == "completed"
    rows = select(outcome.run, "SELECT row_id, charged_usd FROM results")
    texts = {row["id"]: row["text"] for row in data}
    for r in rows:
        assert r["charged_usd"] == pytest.approx(worst_case_usd(texts[r["row_id"]]))
    [usage] = outcome.run.settled().usage.values()
    assert usage[3] == pytest.approx(sum(r["charged_usd"] for r in rows))
    for path in parts(outcome.run.parts_dir):
        table = pq.read_table(path)
        pq.write_table(table.drop_columns(["charged_usd"]), path)
    assert outcome.run.settled().usage == {}  # no tokens, nothing charged: as before
    assert select(outcome.run, "SELECT count(charged_usd) AS n FROM results") == [{"n": 0}]


@pytest.mark.anyio
async def test_budget_holds_when_answers_are_re_asked(tmp_path: Path, sim: SimulatorThread) -> None:
    """Re-asked answers (retry_finish_reasons) are paid too: a row asks again only while its
    next answer still fits, so the answers the server sold stay within budget_usd."""
    data = long_rows(200, dict.fromkeys(range(200), "[[sim:length]]"))
    extra = 'budget_usd = 0.05\nmax_attempts = 3\nretry_finish_reasons = ["length"]'
    text = spec_text(base_url=sim.base_url, run_extra=extra) + CHEAP
    outcome = await submit_job(tmp_path, text, data)
    assert outcome.state == "stopped"
    s = sim.stats
    assert s.ok > 0
    assert (s.prompt_tokens * 10.0 + s.completion_tokens * 20.0) / 1e6 <= 0.05
    assert all(r["status"] == "ok" for r in select(outcome.run, "SELECT status FROM results"))


def test_budget_refuses_an_unpriced_model_before_sending(tmp_path: Path) -> None:
    """A budget with a model that has no price is refused at validation, naming the field."""
    write_rows(tmp_path / "data.jsonl", long_rows(3))
    text = spec_text(run_extra="budget_usd = 1.0").replace('"gpt-4o-mini"', '"sim-echo"')
    spec = write_spec(tmp_path, text)
    with pytest.raises(SpecError, match=r"run\.budget_usd: model 'sim-echo' has no known price"):
        job.prepare(spec)


def test_dry_run_estimates_and_sends_nothing(tmp_path: Path, sim: SimulatorThread) -> None:
    """`submit --dry-run` prints rows, estimated tokens and a cost range, and sends nothing."""
    write_rows(tmp_path / "data.jsonl", long_rows(50))
    spec = write_spec(tmp_path, spec_text(base_url=sim.base_url) + OVERRIDE)
    done = run_cli("submit", str(spec), "--dry-run", "--runs-dir", "runs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "50 rows, 50 requests" in done.stdout
    line = next(x for x in done.stdout.splitlines() if x.startswith("gpt-4o-mini"))
    cells = line.split()
    prompt_tokens, completion = int(cells[2].replace(",", "")), int(cells[3].replace(",", ""))
    assert completion == 50 * 64  # max_tokens x rows
    low = float(cells[4].strip("$").replace(",", ""))
    high = float(cells[5].strip("$").replace(",", ""))
    assert low == pytest.approx(prompt_tokens * 1000 / 1e6, abs=1e-4)
    assert high == pytest.approx((prompt_tokens * 1000 + completion * 2000) / 1e6, abs=1e-4)
    assert sim.stats.requests == 0
    assert not (tmp_path / "runs").exists()


@pytest.mark.anyio
@pytest.mark.parametrize(
    "sql",
    [
        "SELECT * FROM read_csv('/etc/passwd')",
        "SELECT * FROM read_text('/etc/hostname')",
        "SELECT * FROM read_parquet('https://example.com/x.parquet')",
        "COPY (SELECT 1) TO '/tmp/runner-sandbox-escape.csv'",
        "SET enable_external_access = true",
        "INSTALL httpfs",
    ],
)
async def test_query_refuses_external_files_and_urls(
    tmp_path: Path, sim: SimulatorThread, sql: str
) -> None:
    """User SQL cannot read other files, URLs or extensions, nor unlock the sandbox."""
    outcome = await submit_job(tmp_path, spec_text(base_url=sim.base_url), long_rows(5))
    with pytest.raises(UsageError, match=r"^query (refused|failed): "):
        query(outcome.run, sql)
    assert not await anyio.Path("/tmp/runner-sandbox-escape.csv").exists()
    # The run's own files stay readable.
    [part] = list(outcome.run.parts_dir.glob("*.parquet"))
    _, rows = query(outcome.run, f"SELECT count(*) FROM read_parquet('{part}')")
    assert rows == [(5,)]

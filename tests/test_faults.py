"""Faults and bad input, end to end: server and network faults over real loopback sockets,
bad inputs through the library, the CLI and a property test, and a kill -9 loop against real
`python -m runner` processes.

Rows already covered elsewhere (400 rows, 401 at start, dropped connections, redirects at
the client, the input checks of source.py, spec refusals) are not repeated here.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.cli import main as cli_main
from runner.engine import job
from runner.store.state import RunDir, list_runs

from .conftest import run_cli, sections, select, spec_text, start_runner, write_rows, write_spec


def rows(count: int, marker: dict[int, str] | None = None) -> list[dict[str, Any]]:
    marker = marker or {}
    return [
        {"id": f"r{i}", "text": f"Question {i}: what is {i} plus {i}? {marker.get(i, '')}"}
        for i in range(count)
    ]


def make_spec(
    tmp_path: Path,
    data: list[dict[str, Any]],
    *,
    timeout_s: float = 10,
    max_tokens: int = 64,
    **pieces: Any,
) -> Path:
    """data.jsonl and job.toml in tmp_path; timeout_s and max_tokens replace the defaults."""
    write_rows(tmp_path / "data.jsonl", data)
    text = spec_text(**pieces)
    text = text.replace("timeout_s = 10\n", f"timeout_s = {timeout_s}\n")
    text = text.replace("max_tokens = 64\n", f"max_tokens = {max_tokens}\n")
    return write_spec(tmp_path, text)


async def run_job(
    tmp_path: Path, data: list[dict[str, Any]], base_url: str, **pieces: Any
) -> job.Outcome:
    spec = make_spec(tmp_path, data, base_url=base_url, **pieces)
    return await job.submit(job.prepare(spec), tmp_path / "runs", handle_signals=False)


def results(run: RunDir) -> dict[str, dict[str, Any]]:
    return {r["row_id"]: r for r in select(run, "SELECT * FROM results ORDER BY row_index")}


def attempt_start(record: dict[str, Any]) -> float:
    """When an attempt went on the wire: its end minus its latency (epoch seconds)."""
    return float(record["finished_at"].timestamp() - record["latency_ms"] / 1000)


# -- server and network faults ---------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("fmt", "retry_after_s", "run_extra", "least", "most"),
    [
        pytest.param("seconds", 0.3, "", 0.3, 1.5, id="seconds"),
        pytest.param("ms", 0.3, "", 0.3, 1.5, id="retry-after-ms"),
        # An HTTP date has whole seconds: 1.2 s from now is 0.2 to 1.2 s away.
        pytest.param("date", 1.2, "", 0.2, 2.5, id="http-date"),
        pytest.param("seconds", 300.0, "max_retry_after_s = 0.3", 0.3, 1.5, id="capped"),
    ],
)
async def test_isolated_429_retry_after_is_honoured_by_its_row_only(
    tmp_path: Path,
    sim_factory: Any,
    fmt: str,
    retry_after_s: float,
    run_extra: str,
    least: float,
    most: float,
) -> None:
    """An isolated 429's Retry-After (seconds, ms, HTTP date; capped) is waited by its row,
    while the other workers go on (no rate-limit headers, 6 % of answers: not a rate limit;
    tests/test_limiter.py checks that a real one pauses the pool); all rows finish."""
    # Without pauses the 60 rows take ~0.3 s, so other rows are still waiting at each 429.
    sim = sim_factory(
        rate_429=0.06, retry_after_s=retry_after_s, retry_after_format=fmt, latency_ms=20, seed=4
    )
    outcome = await run_job(
        tmp_path, rows(60), sim.base_url, concurrency=4, run_extra=f"max_attempts = 20\n{run_extra}"
    )
    assert outcome.exit_code == 0
    assert all(r["status"] == "ok" for r in results(outcome.run).values())
    every = select(outcome.run, "SELECT * FROM attempts WHERE attempts > 0")
    limited = [r for r in every if r["http_status"] == 429]
    assert len(limited) == sim.stats.by_status[429] >= 2
    by_attempt = {(r["row_id"], r["attempts"]): r for r in every}
    for hit in limited:
        at = hit["finished_at"].timestamp()
        # The row itself waited the hinted time (backoff alone is at most 0.05 s here)...
        waited = attempt_start(by_attempt[hit["row_id"], hit["attempts"] + 1]) - at
        assert least - 0.02 <= waited <= most, (hit, waited)
    # ...while the other workers went on sending during the waits.
    during = [
        r
        for hit in limited
        for r in every
        if hit["finished_at"].timestamp() + 0.05
        < attempt_start(r)
        < hit["finished_at"].timestamp() + least - 0.05
    ]
    assert during, "the pool was held for an isolated 429"


@pytest.mark.anyio
async def test_isolated_429s_without_headers_keep_concurrency_and_throughput(
    tmp_path: Path, sim_factory: Any
) -> None:
    """3 % random 429s without rate-limit headers (Retry-After 2 s): the concurrency limit
    never drops below the configured 16 and the pool is not held for each one: the run takes
    far less than the 429s' Retry-Afters laid end to end."""
    sim = sim_factory(rate_429=0.03, retry_after_s=2.0, latency_ms=50, seed=5)
    limits: list[int | None] = []
    spec = make_spec(
        tmp_path, rows(800), base_url=sim.base_url, concurrency=16, run_extra="max_attempts = 6"
    )
    started = time.monotonic()
    outcome = await job.submit(
        job.prepare(spec),
        tmp_path / "runs",
        handle_signals=False,
        on_progress=lambda p: limits.append(p.concurrency),
    )
    elapsed = time.monotonic() - started
    assert outcome.exit_code == 0
    assert sim.stats.rate_limited >= 12  # the 429s did happen
    assert limits and min(v for v in limits if v is not None) == 16
    # Held pool-wide for each, they would take at least half their Retry-Afters end to end.
    assert elapsed < sim.stats.rate_limited * 2.0 / 2


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("switches", "marker"),
    [({"insufficient_quota": True}, ""), ({}, "[[sim:402]]")],
    ids=["insufficient-quota", "402-billing"],
)
async def test_quota_or_billing_error_stops_the_run_early_and_resumably(
    tmp_path: Path, sim_factory: Any, switches: dict[str, Any], marker: str
) -> None:
    """insufficient_quota (429) or a 402 is no rate limit: the run stops at once (exit 3) with
    no row failed, and resumes to the end once the quota is back."""
    sim = sim_factory(**switches)
    data = rows(200, dict.fromkeys(range(200), marker))
    outcome = await run_job(tmp_path, data, sim.base_url, concurrency=8)
    assert outcome.state == "stopped" and outcome.exit_code == 3
    assert outcome.stop_reason is not None and "quota" in outcome.stop_reason
    assert outcome.progress.failed == 0 and outcome.progress.ok == 0
    assert sim.stats.requests <= 8 + 3  # the first wave, not 200 rows x 6 attempts
    assert outcome.run.read_manifest()["state"] == "stopped"
    assert not select(outcome.run, "SELECT * FROM results WHERE status = 'failed'")
    if marker:
        return  # every row asks for a 402: nothing to resume into
    sim.set_config(insufficient_quota=False)
    resumed = await job.resume(outcome.run.run_id, tmp_path / "runs", handle_signals=False)
    assert resumed.exit_code == 0
    got = results(outcome.run)
    assert len(got) == 200 and all(r["status"] == "ok" for r in got.values())


@pytest.mark.anyio
@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 409])
async def test_server_error_is_retried_then_the_row_fails_with_status_and_message(
    tmp_path: Path, sim_factory: Any, status: int
) -> None:
    """A row answered 5xx/408/409 every time is tried max_attempts times, then failed with
    the status and the provider's message; the other rows are ok."""
    sim = sim_factory()
    bad = {3: f"[[sim:{status}]]", 17: f"[[sim:{status}]]"}
    outcome = await run_job(tmp_path, rows(30, bad), sim.base_url, run_extra="max_attempts = 3")
    assert outcome.state == "completed" and outcome.exit_code == 1
    got = results(outcome.run)
    assert {k for k, r in got.items() if r["status"] == "failed"} == {"r3", "r17"}
    for key in ("r3", "r17"):
        row = got[key]
        assert (row["http_status"], row["error_type"], row["attempts"]) == (
            status,
            "server_error",
            3,
        )
        assert row["error_message"].startswith(f"{status} ")
        assert row["error_message"].endswith(f"Simulated {status} error.")
    retried = select(outcome.run, "SELECT * FROM attempts WHERE NOT final")
    assert sorted((r["row_id"], r["http_status"]) for r in retried) == sorted(
        [("r3", status), ("r17", status)] * 2
    )
    assert sim.stats.requests == 28 + 2 * 3


@pytest.mark.anyio
async def test_identical_requests_that_all_fail_settle_every_row_without_a_crash(
    tmp_path: Path, sim_factory: Any
) -> None:
    """300 rows over 3 prompts, every answer a 5xx: each row fails on its own two attempts
    (twins take over one at a time), no internal error."""
    sim = sim_factory(rate_500=1.0)
    data = [{"id": f"r{i}", "text": f"Question {i % 3}"} for i in range(300)]
    outcome = await run_job(
        tmp_path, data, sim.base_url, concurrency=32, run_extra="max_attempts = 2"
    )
    assert outcome.state == "completed"
    assert outcome.exit_code == 1
    got = results(outcome.run)
    assert len(got) == 300
    assert {r["status"] for r in got.values()} == {"failed"}
    assert sim.stats.requests == 600


@pytest.mark.anyio
@pytest.mark.parametrize(("fail_first", "status"), [(2, "ok"), (3, "failed")])
async def test_fail_first_rows_recover_within_max_attempts(
    tmp_path: Path, sim_factory: Any, fail_first: int, status: str
) -> None:
    """A row that fails its first N attempts with a 500 ends ok when N < max_attempts and
    failed (500) when N reaches it."""
    sim = sim_factory()
    marker = {1: f"[[sim:fail_first={fail_first}]]", 6: f"[[sim:fail_first={fail_first}]]"}
    outcome = await run_job(tmp_path, rows(10, marker), sim.base_url, run_extra="max_attempts = 3")
    got = results(outcome.run)
    for key in ("r1", "r6"):
        assert (got[key]["status"], got[key]["attempts"]) == (status, 3)
    assert all(got[f"r{i}"]["status"] == "ok" for i in (0, 2, 3, 4, 5, 7, 8, 9))
    assert outcome.exit_code == (0 if status == "ok" else 1)
    assert sim.stats.requests == 8 + 2 * 3


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("switches", "timeout_s", "error_type", "http_status"),
    [
        pytest.param(
            {"latency_ms": 150, "jitter_ms": 150}, 0.25, "timeout", None, id="read-timeout"
        ),
        pytest.param({"rate_reset_mid_body": 0.2}, 10, "connection_dropped", None, id="reset"),
        pytest.param({"rate_malformed": 0.2}, 10, "malformed_response", 200, id="truncated-json"),
        pytest.param({"rate_html": 0.2}, 10, "server_error", 502, id="html-error-page"),
    ],
)
async def test_network_fault_is_retried_and_reported_as_possibly_billed(
    tmp_path: Path,
    sim_factory: Any,
    switches: dict[str, Any],
    timeout_s: float,
    error_type: str,
    http_status: int | None,
) -> None:
    """Timeouts, resets mid-body, truncated JSON and HTML error pages are retried until every
    row is ok, and the report counts each failed attempt as possibly billed."""
    sim = sim_factory(seed=9, **switches)
    outcome = await run_job(
        tmp_path, rows(40), sim.base_url, timeout_s=timeout_s, run_extra="max_attempts = 10"
    )
    assert outcome.exit_code == 0
    assert all(r["status"] == "ok" for r in results(outcome.run).values())
    retried = select(outcome.run, "SELECT * FROM attempts WHERE NOT final")
    assert len(retried) >= 2
    assert {(r["error_type"], r["http_status"], r["possibly_billed"]) for r in retried} == {
        (error_type, http_status, True)
    }
    got = sections(outcome.run)
    billed = got["possibly billed"][0]
    assert billed["metric"].startswith("failed attempts sent without a usable answer")
    assert billed["value"] == len(retried)
    [errors] = got["errors"]
    assert errors.pop("message")  # the error's message, shown with its counts
    assert errors == {
        "error_type": error_type,
        "failed_rows": 0,
        "failed_attempts": len(retried),
        "possibly_billed": len(retried),
    }


@pytest.mark.anyio
async def test_slow_drip_row_fails_on_the_total_deadline_in_bounded_time(
    tmp_path: Path, sim_factory: Any
) -> None:
    """An answer dripping one byte every 0.2 s (under any per-read timeout) is cut by the
    0.5 s total deadline on each attempt; the row fails as a timeout and the run ends soon."""
    sim = sim_factory()
    started = time.monotonic()
    outcome = await run_job(
        tmp_path,
        rows(10, {4: "[[sim:slow_drip]]"}),
        sim.base_url,
        timeout_s=0.5,
        run_extra="max_attempts = 2",
    )
    assert time.monotonic() - started < 5
    assert outcome.exit_code == 1
    got = results(outcome.run)
    drip = got["r4"]
    assert (drip["status"], drip["error_type"], drip["attempts"]) == ("failed", "timeout", 2)
    assert drip["error_message"] == "no complete answer within 0.5 s"
    assert all(r["status"] == "ok" for k, r in got.items() if k != "r4")


REFUSAL = "I'm sorry, but I can't help with that request."


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("directive", "expected"),
    [
        ("content_filter", {"finish_reason": "content_filter"}),
        ("length", {"finish_reason": "length"}),
        ("refusal", {"finish_reason": "stop", "refusal": REFUSAL, "content": None}),
        (
            "no_usage",
            {
                "finish_reason": "stop",
                "prompt_tokens": None,
                "completion_tokens": None,
                "total_tokens": None,
                "cached_tokens": None,
                "reasoning_tokens": None,
            },
        ),
    ],
)
async def test_paid_200_with_an_odd_ending_is_kept_ok_and_not_retried(
    tmp_path: Path, sim_factory: Any, directive: str, expected: dict[str, Any]
) -> None:
    """A 200 that ends in content_filter or length, a refusal, or carries no usage is an ok
    row with what came back (NULL tokens, never 0), sent once."""
    sim = sim_factory()
    outcome = await run_job(
        tmp_path, rows(10, {2: f"[[sim:{directive}]]"}), sim.base_url, max_tokens=1000
    )
    assert outcome.exit_code == 0
    row = results(outcome.run)["r2"]
    assert row["status"] == "ok" and row["attempts"] == 1
    assert {k: row[k] for k in expected} == expected
    assert sim.stats.requests == 10


@pytest.mark.anyio
async def test_retry_finish_reasons_reasks_length_and_keeps_the_last_answer(
    tmp_path: Path, sim_factory: Any
) -> None:
    """With retry_finish_reasons = ["length"], a length answer is re-asked up to max_attempts
    and the last one kept as ok; content_filter, not opted in, is kept at once."""
    sim = sim_factory()
    marker = {1: "[[sim:length]]", 2: "[[sim:content_filter]]"}
    outcome = await run_job(
        tmp_path,
        rows(10, marker),
        sim.base_url,
        max_tokens=1000,  # so that only the directive ends in length
        run_extra='max_attempts = 3\nretry_finish_reasons = ["length"]',
    )
    assert outcome.exit_code == 0
    got = results(outcome.run)
    assert (got["r1"]["status"], got["r1"]["finish_reason"], got["r1"]["attempts"]) == (
        "ok",
        "length",
        3,
    )
    assert got["r1"]["content"]
    assert (got["r2"]["status"], got["r2"]["finish_reason"], got["r2"]["attempts"]) == (
        "ok",
        "content_filter",
        1,
    )
    assert sim.stats.requests == 10 + 2


@pytest.mark.anyio
async def test_retry_finish_reasons_reports_the_tokens_of_every_paid_answer(
    tmp_path: Path, sim_factory: Any
) -> None:
    """Tokens of answers re-asked because of their finish_reason still show in the report."""
    sim = sim_factory()
    outcome = await run_job(
        tmp_path,
        rows(10, {1: "[[sim:length]]"}),
        sim.base_url,
        max_tokens=1000,  # so that only the directive ends in length
        run_extra='max_attempts = 3\nretry_finish_reasons = ["length"]',
    )
    tokens = {r["tokens"]: r["count"] for r in sections(outcome.run)["tokens"]}
    assert (tokens["prompt"], tokens["completion"]) == (
        sim.stats.prompt_tokens,
        sim.stats.completion_tokens,
    )


@pytest.mark.anyio
async def test_403_after_the_key_was_accepted_fails_only_its_row(
    tmp_path: Path, sim_factory: Any
) -> None:
    """30 % of rows answered 403 (content refused for that row) once the key has been
    accepted: each such row fails with its 403 and the run goes on to the end."""
    sim = sim_factory()
    rng = random.Random(3)
    refused = {i for i in range(32, 1000) if rng.random() < 0.3}
    outcome = await run_job(
        tmp_path, rows(1000, dict.fromkeys(refused, "[[sim:403]]")), sim.base_url
    )
    assert outcome.state == "completed" and outcome.exit_code == 1
    got = results(outcome.run)
    assert len(got) == 1000
    assert {k for k, r in got.items() if r["status"] == "failed"} == {f"r{i}" for i in refused}
    assert {r["http_status"] for k, r in got.items() if r["status"] == "failed"} == {403}


@pytest.mark.anyio
async def test_401_after_the_key_was_accepted_still_stops_the_run(
    tmp_path: Path, sim_factory: Any
) -> None:
    """A key refused (401) after answers were seen is the key's problem: the run stops
    (exit 3) and the refused rows stay pending for a resume."""
    sim = sim_factory()
    data = rows(200, {i: "[[sim:401]]" for i in range(100, 200)})
    outcome = await run_job(tmp_path, data, sim.base_url, concurrency=4)
    assert outcome.state == "stopped" and outcome.exit_code == 3
    assert outcome.stop_reason is not None and "credentials refused" in outcome.stop_reason
    assert all(r["status"] == "ok" for r in results(outcome.run).values())


@pytest.mark.anyio
async def test_context_length_exceeded_fails_only_that_row(
    tmp_path: Path, sim_factory: Any
) -> None:
    """A 400 context_length_exceeded fails that row at once, with the provider's code and
    message, and every other row is answered."""
    sim = sim_factory()
    outcome = await run_job(
        tmp_path, rows(30, {5: "[[sim:context_length_exceeded]]"}), sim.base_url
    )
    assert outcome.state == "completed" and outcome.exit_code == 1
    got = results(outcome.run)
    row = got.pop("r5")
    assert (row["status"], row["http_status"], row["error_type"], row["attempts"]) == (
        "failed",
        400,
        "invalid_request",
        1,
    )
    assert row["error_message"].startswith("400 context_length_exceeded: This model's maximum")
    assert len(got) == 29 and all(r["status"] == "ok" for r in got.values())
    assert sim.stats.requests == 30


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def without_network() -> list[str]:
    """A command prefix that runs a process in a new network namespace (loopback only, down),
    so resolving a name fails at once on this machine instead of asking its nameserver."""
    usable = shutil.which("unshare") is not None and (
        subprocess.run(["unshare", "-rn", "true"], capture_output=True, check=False).returncode == 0
    )
    if not usable:
        pytest.skip("no network namespace: an unknown host would be looked up off this machine")
    return ["unshare", "-rn"]


@pytest.mark.parametrize("case", ["403", "connection-refused", "unknown-host"])
def test_start_failure_stops_early_with_exit_3_and_no_failed_row(
    tmp_path: Path, sim_factory: Any, case: str
) -> None:
    """403 on every request, a closed port or an unknown host stops the run after the first
    few requests with exit 3 and the resume hint; no row is marked failed."""
    sim = sim_factory()
    marker, endpoint_extra, prefix = "", "", []
    if case == "403":
        base_url, marker = sim.base_url, "[[sim:403]]"
    elif case == "connection-refused":
        base_url = f"http://127.0.0.1:{closed_port()}/v1"
    else:
        base_url, endpoint_extra = "http://no-such-host.invalid/v1", "allow_insecure = true"
        prefix = without_network()
    make_spec(
        tmp_path,
        rows(300, dict.fromkeys(range(300), marker)),
        base_url=base_url,
        endpoint_extra=endpoint_extra,
    )
    started = time.monotonic()
    done = subprocess.run(
        [*prefix, sys.executable, "-m", "runner", "submit", "job.toml", "--runs-dir", "runs"],
        cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith("RUNNER_")},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert time.monotonic() - started < 15
    assert done.returncode == 3, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    why = "credentials refused" if case == "403" else "endpoint unreachable"
    assert last.startswith(f"stopped ({why}: ")
    assert "resume with: runner resume " in last
    assert "Traceback" not in done.stderr
    assert sim.stats.requests <= (16 + 3 if case == "403" else 0)
    [info] = list_runs(tmp_path / "runs")
    assert info["state"] == "stopped" and info["counts"]["failed"] == 0
    run = RunDir(tmp_path / "runs" / info["run_id"])
    assert not select(run, "SELECT * FROM results")


# -- bad input ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_null_or_empty_prompt_is_skipped_counted_and_not_sent(
    tmp_path: Path, sim_factory: Any
) -> None:
    """Rows whose prompt is null, empty or blank are recorded as skipped, counted, and never
    sent; the run still exits 0."""
    sim = sim_factory()
    data = rows(6)
    data[1]["text"], data[3]["text"], data[4]["text"] = None, "", "  \n "
    outcome = await run_job(tmp_path, data, sim.base_url)
    assert outcome.exit_code == 0
    assert (outcome.progress.ok, outcome.progress.skipped) == (3, 3)
    assert sim.stats.requests == 3
    got = results(outcome.run)
    assert {k for k, r in got.items() if r["status"] == "skipped"} == {"r1", "r3", "r4"}
    overview = {r["metric"]: r["value"] for r in sections(outcome.run)["overview"]}
    assert (overview["rows skipped"], overview["rows pending"]) == (3, 0)


@pytest.mark.anyio
async def test_prompt_over_max_prompt_tokens_fails_without_being_sent(
    tmp_path: Path, sim_factory: Any
) -> None:
    """A prompt estimated above input.max_prompt_tokens fails (exit 1) and is never sent."""
    sim = sim_factory()
    data = rows(5)
    data[2]["text"] = "long " * 100
    outcome = await run_job(
        tmp_path,
        data,
        sim.base_url,
        input_extra='id_column = "id"\nprompt_column = "text"\nmax_prompt_tokens = 50',
    )
    assert outcome.exit_code == 1
    assert sim.stats.requests == 4
    row = results(outcome.run)["r2"]
    assert (row["status"], row["error_type"], row["attempts"]) == ("failed", "prompt_too_long", 0)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_empty_input_exits_0_and_exports_zero_rows(
    tmp_path: Path, sim_factory: Any, suffix: str
) -> None:
    """An empty JSONL file or a zero-row Parquet file is a completed run (exit 0), and
    `runner export` writes a valid file of 0 rows."""
    sim = sim_factory()
    path = tmp_path / f"data{suffix}"
    if suffix == ".parquet":
        empty = pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())})
        pq.write_table(empty, path)
    else:
        path.write_text("")
    write_spec(tmp_path, spec_text(input_path=path.name, base_url=sim.base_url))
    done = run_cli("submit", "job.toml", "--runs-dir", "runs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert sim.stats.requests == 0
    [info] = list_runs(tmp_path / "runs")
    assert info["state"] == "completed"
    out = tmp_path / "out.parquet"
    exported = run_cli("export", info["run_id"], str(out), "--runs-dir", "runs", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    assert "wrote 0 rows" in exported.stderr
    table = pq.read_table(out)
    assert table.num_rows == 0
    assert "json" not in table.column_names  # no column invented for an empty input
    assert {"row_id", "status", "content"} <= set(table.column_names)


def dry_run(spec: Path) -> tuple[int, str, str]:
    """`runner submit SPEC --dry-run` in this process: exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli_main(["submit", str(spec), "--dry-run"])
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 4
        else:
            code = 0
    return code, out.getvalue(), err.getvalue()


def test_invalid_utf8_in_a_csv_is_reported_as_path_and_line(tmp_path: Path) -> None:
    """A CSV row with invalid UTF-8 is refused like a JSONL one: exit 2, `data.csv:3: ...`."""
    (tmp_path / "data.csv").write_bytes(b"id,text\na,hello\nb,caf\xe9 au lait\n")
    code, _, err = dry_run(write_spec(tmp_path, spec_text(input_path="data.csv")))
    assert (code, len(err.strip().splitlines())) == (2, 1), err
    # (The path is shown relative to the working folder when below it; here it is not.)
    assert err.startswith("error: ") and "data.csv:3: invalid UTF-8" in err, err


def _nest_json(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    # A named function: hypothesis inspects `extend`'s source, which is unreliable for lambdas.
    return st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    _nest_json,
    max_leaves=8,
)
_lines = st.one_of(
    st.builds(lambda i: json.dumps({"id": f"v{i}", "text": f"prompt {i}"}), st.integers(0, 50)),
    st.builds(lambda i, t: json.dumps({"id": i, "text": t}), _json_values, _json_values),
    st.text(max_size=30),
    st.sampled_from(["{", "}", "[]", "null", '{"id": 1e999, "text": "x"}', "[" * 5000]),
).map(str.encode) | st.binary(max_size=30)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_lines, max_size=12))
def test_malformed_jsonl_dry_run_exits_0_or_2_with_one_line(lines: list[bytes]) -> None:
    """Random bytes and text mixed with valid JSONL lines never crash `submit --dry-run`: it
    exits 0, or 2 with one `path:LINE: ...` line, and never prints a traceback."""
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        (base / "data.jsonl").write_bytes(b"\n".join(lines))
        spec = write_spec(base, spec_text())
        code, out, err = dry_run(spec)
    assert code in (0, 2), (code, out, err)
    assert "Traceback" not in out + err
    if code == 2:
        assert len(err.strip().splitlines()) == 1, err
        assert err.startswith("error: ")
    else:
        assert "nothing was sent" in out


# -- process and disk: kill -9 at random moments -----------------------------------------------

# Small parts on a slow disk, so that sessions a fraction of a second long seal journal segments
# and are often killed while one is being compacted: each part is written 30 ms before its
# segment is deleted (the default 10,000 rows never fill before the kill on a slow machine).
BOOT = """
import runpy, sys, time
import runner.engine.job as job, runner.store.sink as sink
job.PART_ROWS = 50
write_part = sink.write_part
def slow_write_part(*args):
    path = write_part(*args)
    time.sleep(0.03)
    return path
sink.write_part = slow_write_part
sys.argv = ['runner', *sys.argv[1:]]
runpy.run_module('runner', run_name='__main__')
"""


@pytest.mark.slow
@pytest.mark.timeout(240)  # ~60-75 s here: 51 Python start-ups; a loaded machine needs room
def test_kill_9_fifty_times_never_duplicates_or_rebuys_more_than_in_flight(
    tmp_path: Path, sim_factory: Any
) -> None:
    """Fifty SIGKILLs at random moments of submit/resume sessions (compactions included), then
    a final resume: every row once, and re-bought answers <= in flight x kills."""
    concurrency, count, kills = 64, 20_000, 50
    # At most 64 / 0.1 s = 640 answers a second: a session killed within 0.6 s settles < 400
    # rows, so 50 sessions never finish the 20,000 and every kill lands on a live run.
    sim = sim_factory(latency_ms=100)
    make_spec(
        tmp_path,
        [{"id": f"r{i}", "text": f"Row {i}: tell me about {i}."} for i in range(count)],
        base_url=sim.base_url,
        concurrency=concurrency,
    )
    runs = tmp_path / "runs"
    rng = random.Random(2024)

    def start(*args: str) -> subprocess.Popen[str]:
        return start_runner(tmp_path, *args, entry=("-c", BOOT))

    def mid_compaction(run: Path) -> bool:
        """A kill left a sealed segment not yet compacted, a .tmp part, or a compacted
        segment not yet deleted."""
        segments = list((run / "journal").glob("segment-*.jsonl"))
        done = {p.name.split(".")[0].split("-")[1] for p in (run / "parts").glob("part-*")}
        return len(segments) > 1 or any(s.stem.split("-")[1] in done for s in segments)

    run_id: str | None = None
    sent_in_session = compactions_hit = 0
    for session in range(kills):
        proc = start("resume", run_id) if run_id else start("submit", "job.toml")
        before = sim.stats.requests
        assert proc.stderr is not None
        first = proc.stderr.readline()  # "run <id>: <folder>" once the session holds the run
        assert first.startswith("run "), first + proc.communicate(timeout=30)[1]
        run_id = first.split()[1].rstrip(":")
        if session % 2:
            # Every other kill lands once this session has requests on the wire: on a loaded
            # machine start-up alone can outlast any fixed delay (a test-side wait on another
            # process); the others land at a random instant, start-up included.
            deadline = time.monotonic() + 30
            while sim.stats.requests == before and proc.poll() is None:
                assert time.monotonic() < deadline, f"session {session} sent nothing in 30 s"
                time.sleep(0.005)
        time.sleep(rng.uniform(0.05, 0.6))
        proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, f"session {session}: {first}{err}"
        sent_in_session += sim.stats.requests > before
        compactions_hit += mid_compaction(runs / run_id)
    assert run_id is not None
    # The last session only finishes the run: no latency, and parts of the default size.
    sim.set_config(latency_ms=0)
    final = start_runner(tmp_path, "resume", run_id)
    _, err = final.communicate(timeout=90)
    assert final.returncode == 0, err
    run = RunDir(runs / run_id)
    got = select(run, "SELECT row_id, status FROM results")
    assert len(got) == count
    assert {r["row_id"] for r in got} == {f"r{i}" for i in range(count)}
    assert all(r["status"] == "ok" for r in got)
    parts = list(run.parts_dir.iterdir())
    assert all(p.suffix == ".parquet" for p in parts)  # no .tmp left behind
    assert sum(pq.ParquetFile(p).metadata.num_rows for p in parts) == count  # no duplicate
    # Kills landed while requests were on the wire, and while segments were being compacted.
    assert sent_in_session >= kills // 4
    assert compactions_hit >= kills // 10, compactions_hit
    assert sim.stats.resent_after_ok <= concurrency * kills
    sessions = run.read_manifest()["sessions"]
    crashed = len(sessions) - 1  # a kill before a session is recorded leaves none behind
    assert kills // 2 <= crashed <= kills
    assert [s["outcome"] for s in sessions] == ["crashed"] * crashed + ["completed"]
    # Counted: what was on the wire or answered but not yet journaled at each kill.
    assert all(0 <= s["unanswered_at_crash"] <= 2 * concurrency for s in sessions[:-1])
    assert sim.stats.resent_after_ok <= sum(s["unanswered_at_crash"] for s in sessions[:-1])


@pytest.mark.timeout(120)
def test_kill_9_counts_every_request_it_may_buy_again_and_the_real_wall_time(
    tmp_path: Path, sim_factory: Any
) -> None:
    """Killed sessions at a high request rate: "in flight at a crash, never answered" is an
    upper bound of what the server saw bought twice, and wall time is the sessions' own span
    (not each killed session up to the moment of the report)."""
    concurrency, count, kills = 64, 6_000, 6
    sim = sim_factory(latency_ms=20)  # ~3,000 requests a second: many start between ticks
    make_spec(
        tmp_path,
        [{"id": f"r{i}", "text": f"Row {i}: tell me about {i}."} for i in range(count)],
        base_url=sim.base_url,
        concurrency=concurrency,
    )
    rng = random.Random(7)
    run_id: str | None = None
    for _ in range(kills):
        proc = start_runner(tmp_path, *(("resume", run_id) if run_id else ("submit", "job.toml")))
        assert proc.stderr is not None
        first = proc.stderr.readline()
        assert first.startswith("run "), first + proc.communicate(timeout=30)[1]
        run_id = first.split()[1].rstrip(":")
        before = sim.stats.ok
        deadline = time.monotonic() + 30
        while sim.stats.ok < before + 200:  # a test-side wait on another process
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
    assert run_id is not None
    time.sleep(2)  # the report is read well after the last kill
    run = RunDir(tmp_path / "runs" / run_id)
    interrupted = sections(run)["overview"]
    final = start_runner(tmp_path, "resume", run_id)
    _, err = final.communicate(timeout=90)
    assert final.returncode == 0, err
    assert len(select(run, "SELECT row_id FROM results")) == count
    sessions = run.read_manifest()["sessions"]
    assert [s["outcome"] for s in sessions] == ["crashed"] * kills + ["completed"]
    unanswered = sum(s["unanswered_at_crash"] for s in sessions[:-1])
    assert 0 < sim.stats.resent_after_ok <= unanswered <= 2 * concurrency * kills
    span = sessions[-1]["ended_epoch"] - sessions[0]["started_epoch"]
    wall = {r["metric"]: r["value"] for r in sections(run)["overview"]}["wall time s"]
    assert wall <= span + 0.5
    killed = sessions[-2]["ended_epoch"] - sessions[0]["started_epoch"]
    before_resume = {r["metric"]: r["value"] for r in interrupted}["wall time s"]
    assert before_resume <= killed + 0.5  # not counted up to the moment of the report

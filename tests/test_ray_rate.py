"""Issue 17, acceptance 3: one rate budget per key across a Ray run's shards.

A local Ray cluster (one for the module) runs 4 shards against the simulator in this process.
The simulator's window is cut from 60 s to 10 s (runner/sim/answers.py WINDOW_S) and its limit
to 200 a window, the same 1,200 requests a minute, so that a test of ~20 s spans two windows
and their turnover; the run's limit is requests_per_minute = 1200 with a 10 s window
(RayOptions.rate_window_s). A shorter window is the harder case: what a lease may add to a
window weighs six times more than in a minute's.
"""

from __future__ import annotations

import bisect
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from runner.sim.server import SimulatorConfig, SimulatorThread
from tests.conftest import write_rows, write_spec

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.ray, pytest.mark.xdist_group("ray"), pytest.mark.timeout(300)]

WINDOW_S = 10.0
PER_WINDOW = 200  # 1,200 a minute
SHARDS = 4


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """One local Ray cluster for the module; the driver joins it (and leaves it running)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    ray.init(address="local", num_cpus=SHARDS, include_dashboard=False, log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture
def sim(monkeypatch: pytest.MonkeyPatch) -> Iterator[SimulatorThread]:
    """The simulator with a 10 s window of 200 requests, 429s asking for 2 s."""
    monkeypatch.setattr("runner.sim.answers.WINDOW_S", WINDOW_S)
    with SimulatorThread(SimulatorConfig(rpm_limit=PER_WINDOW, retry_after_s=2.0)) as server:
        yield server


class Sampler:
    """The simulator's counters every 50 ms, from a thread, while a run goes on."""

    def __init__(self, sim: SimulatorThread) -> None:
        self.sim = sim
        self.samples: list[tuple[float, int, int]] = []  # (monotonic, requests, 429s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.05):  # bounded by the run: stopped right after it
            stats = self.sim.stats
            self.samples.append((time.monotonic(), stats.requests, stats.rate_limited))

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def most_in_window(self, window: float) -> int:
        """An upper bound of the requests that reached the server in any `window` seconds:
        every true window lies within two samples at most `window` + 0.1 s apart."""
        times = [s[0] for s in self.samples]
        best = 0
        for at, requests, _ in self.samples:
            j = bisect.bisect_right(times, at + window + 0.1) - 1
            best = max(best, self.samples[j][1] - requests)
        return best

    def count_at(self, at: float) -> int:
        """Requests counted by the first sample at or after `at`."""
        times = [s[0] for s in self.samples]
        return self.samples[min(bisect.bisect_left(times, at), len(times) - 1)][1]


# Not adaptive: the simulator's headers say 200 "a minute" for its 10 s window, which each
# shard's own limiter would follow; the cluster's limit is the one tested.
LIMITED = "requests_per_minute = 1200\nadaptive_concurrency = false\n"


def _job(
    tmp_path: Path, sim: SimulatorThread, rows: list[dict[str, Any]], run: str = LIMITED
) -> Path:
    write_rows(tmp_path / "data.jsonl", rows)
    return write_spec(
        tmp_path,
        f'name = "rate"\n\n[input]\npath = "data.jsonl"\nid_column = "id"\n'
        f'prompt_column = "text"\n\n[endpoint]\nbase_url = "{sim.base_url}"\ntimeout_s = 10\n\n'
        '[request]\nmodel = "gpt-4o-mini"\nmax_tokens = 16\n\n'
        f"[run]\nconcurrency = 16\n{run}"
        "max_attempts = 2\nbackoff_base_s = 0.01\nbackoff_max_s = 0.05\n",
    )


def _submit(spec: Path, runs: Path) -> Any:
    from runner.cluster import load_driver
    from runner.engine import job

    driver = load_driver()
    prepared = job.prepare(spec, check_whole_file=True)
    options = driver.RayOptions(shards=SHARDS, rate_window_s=WINDOW_S)

    async def main() -> Any:
        with anyio.fail_after(240):  # a loaded machine starts Ray workers slowly
            return await driver.submit(prepared, runs, options, handle_signals=False)

    return anyio.run(main)


def test_four_shards_share_one_limit_and_never_overfill_the_window(
    ray_cluster: None, sim: SimulatorThread, tmp_path: Path
) -> None:
    """4 shards under one 1,200/min limit: no server window holds more than 3 % over it, no
    429 comes back, and the run uses at least 85 % of the limit once started."""
    rows = [{"id": f"r{i}", "text": f"question {i}"} for i in range(260)]
    spec = _job(tmp_path, sim, rows)
    with Sampler(sim) as sampler:
        outcome = _submit(spec, tmp_path / "runs")
    assert outcome.state == "completed" and outcome.progress.ok == len(rows)
    stats = sim.stats
    assert stats.requests == len(rows) and stats.rate_limited == 0
    assert sampler.most_in_window(WINDOW_S) <= PER_WINDOW * 1.03
    first = next(at for at, requests, _ in sampler.samples if requests > 0)
    last = next(at for at, requests, _ in sampler.samples if requests == len(rows))
    rate = len(rows) / max(last - first, 1e-9)  # per second, once the shards started
    assert rate >= 0.85 * PER_WINDOW / WINDOW_S


def test_a_429_storm_on_one_shard_pauses_every_shard(
    ray_cluster: None, sim: SimulatorThread, tmp_path: Path
) -> None:
    """Shard 0 meets 429s with Retry-After 2 s (rows that always get one): while it waits,
    no shard sends anything; the run then ends with those rows failed and the rest answered."""
    rows = [{"id": f"r{i}", "text": f"question {i}"} for i in range(240)]
    for i in (20, 21, 22):  # shard 0 holds the first quarter of the rows
        rows[i]["text"] += " [[sim:429]]"
    spec = _job(tmp_path, sim, rows)
    with Sampler(sim) as sampler:
        outcome = _submit(spec, tmp_path / "runs")
    assert outcome.progress.ok == len(rows) - 3 and outcome.progress.failed == 3
    first_429 = next(at for at, _, limited in sampler.samples if limited > 0)
    # The 429 came within the 50 ms before `first_429`; its pause ends 2 s after it. Other
    # shards hear of it within one call to the budget actor: from 0.5 s on, nothing is sent.
    quiet_from, quiet_to = first_429 + 0.5, first_429 + 1.8
    assert sampler.count_at(quiet_from) == sampler.count_at(quiet_to)
    # ...and they were sending before it (the pause is what stopped them).
    assert sampler.count_at(first_429) - sampler.count_at(first_429 - 1.3) >= 10


def test_the_dollar_budget_is_one_for_the_cluster(
    ray_cluster: None, simulator: SimulatorThread, tmp_path: Path
) -> None:
    """4 shards under one budget_usd: what the simulator served never costs more than it,
    and a shard of expensive rows is not held to a quarter of it (a quarter each stopped
    the run at 6.4 of 12 dollars)."""
    rows = [{"id": f"r{i}", "text": f"q {i}"} for i in range(240)]
    for row in rows[:60]:  # shard 0: rows of ~500 prompt tokens
        row["text"] += " word" * 400
    write_rows(tmp_path / "data.jsonl", rows)
    budget = 12.0
    spec = write_spec(
        tmp_path,
        f'name = "usd"\n\n[input]\npath = "data.jsonl"\nid_column = "id"\n'
        f'prompt_column = "text"\n\n[endpoint]\nbase_url = "{simulator.base_url}"\n'
        'timeout_s = 10\n\n[request]\nmodel = "gpt-4o-mini"\nmax_tokens = 16\n\n'
        '[prices."gpt-4o-mini"]\ninput = 1000\noutput = 1000\n\n'  # $0.001 a token
        f"[run]\nconcurrency = 4\nbudget_usd = {budget}\n",
    )
    outcome = _submit(spec, tmp_path / "runs")
    stats = simulator.stats
    served = (stats.prompt_tokens + stats.completion_tokens) * 0.001
    assert served <= budget + 1e-9
    assert served >= 0.8 * budget
    assert outcome.state == "stopped" and "budget" in (outcome.stop_reason or "")


def test_a_restarted_budget_actor_runs_at_half_rate(
    ray_cluster: None, sim: SimulatorThread, tmp_path: Path
) -> None:
    """The budget actor killed mid-run: Ray restarts it, it knows it was restarted and runs
    at half the rate (it forgot its grants of the window); the run completes, no 429."""
    from runner.cluster.budget import actor_name

    rows = [{"id": f"r{i}", "text": f"question {i}"} for i in range(150)]
    spec = _job(tmp_path, sim, rows)
    started: list[str] = []
    result: list[Any] = []

    def run() -> None:
        from runner.cluster import load_driver
        from runner.engine import job

        driver = load_driver()
        prepared = job.prepare(spec, check_whole_file=True)
        options = driver.RayOptions(shards=SHARDS, rate_window_s=WINDOW_S)

        async def main() -> Any:
            with anyio.fail_after(240):  # a loaded machine starts Ray workers slowly
                return await driver.submit(
                    prepared,
                    tmp_path / "runs",
                    options,
                    handle_signals=False,
                    on_start=lambda r: started.append(r.run_id),
                )

        result.append(anyio.run(main))

    with Sampler(sim) as sampler:
        driving = threading.Thread(target=run, daemon=True)
        driving.start()
        deadline = time.monotonic() + 180
        while sim.stats.requests < 80:  # bounded: three minutes at most
            assert time.monotonic() < deadline and driving.is_alive()
            time.sleep(0.05)
        actor = ray.get_actor(actor_name(started[0], None))
        ray.kill(actor, no_restart=False)
        # The kill goes through the control store and a call goes straight to the actor's
        # worker: the first calls after it may still reach the old actor. Ask until the new
        # one answers (bounded: a minute).
        deadline = time.monotonic() + 60
        state = ray.get(actor.state.remote(), timeout=60)
        while not state["restarted"] and time.monotonic() < deadline:
            time.sleep(0.05)
            state = ray.get(actor.state.remote(), timeout=60)
        back = time.monotonic()
        driving.join(240)
    assert state["restarted"] is True
    (outcome,) = result
    assert outcome.state == "completed" and outcome.progress.ok == len(rows)
    assert sim.stats.requests == len(rows) and sim.stats.rate_limited == 0
    # Half of 20 a second from the restart on (the lease's first second aside).
    after = sampler.count_at(back + 4) - sampler.count_at(back + 1)
    assert after <= 0.6 * 20 * 3


def test_a_limit_learned_from_headers_is_shared_too(
    ray_cluster: None, sim_factory: Any, tmp_path: Path
) -> None:
    """No limit in the spec, the server's headers say 1,200 a minute: after the first answers
    the shards together go at ~20 a second, not each at the server's whole limit."""
    server: SimulatorThread = sim_factory(rpm_limit=1200)
    rows = [{"id": f"r{i}", "text": f"question {i}"} for i in range(300)]
    spec = _job(tmp_path, server, rows, run="")
    with Sampler(server) as sampler:
        outcome = _submit(spec, tmp_path / "runs")
    assert outcome.state == "completed" and outcome.progress.ok == len(rows)
    assert server.stats.rate_limited == 0
    first = next(at for at, requests, _ in sampler.samples if requests > 0)
    # The first wave (16 a shard, sent before any header was read), a second's burst, then
    # 20 a second (a second more for the samples' 50 ms steps); every shard at the server's
    # whole limit would have sent all 300 rows by then.
    assert sampler.count_at(first + 5) <= SHARDS * 16 + 20 + 6 * 20

"""Randomized invariants: whatever the mix, every row once, with its own answer, paid once.

Each scenario is drawn from its seed: 20-60 rows over a few distinct prompts (so many rows
are identical requests), one or two models, with or without an id column, prompts that
always fail, fail at first, or come back without usage, random faults from the simulator
(429s with and without x-ratelimit headers, 5xx, dropped connections), sometimes a budget,
and several sessions: between sessions the input is edited (rows inserted, deleted, edited,
reordered) and a session may be cut short (cancelled in process, or a real runner process
killed with SIGKILL). After every session, and at the end, it checks against the
simulator's own counters:

  - every current input row x model is in `results` at most once (exactly once at the end,
    and in the export too), on its own row, with the answer to its own prompt: the
    simulator's answer names the request it answers (`[req <tag>]`, see sim_answers), so an
    answer put on another row is caught;
  - no answered request was bought again beyond those in flight when a session was cut
    (`resent_after_ok`, the copies of an answered body the simulator answered 200 again, <=
    the concurrency for each cancellation, twice it for each kill: on the wire plus answers
    not yet journaled), nor beyond what the run itself counted as left unanswered by its
    crashes (a copy refused with a 429 on the way is not bought, so not counted);
  - with a budget, what the simulator served stays within it.

`bench/invariants.py` runs the same scenarios, more of them and larger.
"""

from __future__ import annotations

import contextlib
import json
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pyarrow.parquet as pq
import pytest

from runner.engine import job
from runner.report.query import export
from runner.sim.answers import request_tag
from runner.sim.server import SimulatorConfig, SimulatorThread
from runner.store.journal import SEGMENT_GLOB
from runner.store.state import RunDir, list_runs

MODELS = ("gpt-4o-mini", "gpt-4o")
PRICE_PER_MTOK = 1000.0  # every token of every model: spend = tokens served x this / 1e6
MAX_TOKENS = 48
TOPICS = ("rivers", "owls", "granite", "tides", "ferns", "comets", "bridges", "salt")
ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Session:
    edit: bool = False  # edit the input before this session (then --allow-changed-input)
    cut: str | None = None  # None | "cancel" (in process) | "kill" (a real process, SIGKILL)
    cut_after: float = 0.0  # cancel: seconds; kill: share of the rows journaled first


@dataclass
class Scenario:
    seed: int
    rows: int
    id_column: bool
    models: tuple[str, ...]
    concurrency: int
    distinct: int
    sim: dict[str, Any]
    sessions: list[Session]
    budget_usd: float | None = None
    # directive by prompt number: "always" ([[sim:500]]), "fail_first", "no_usage"
    marks: dict[int, str] = field(default_factory=dict)

    def describe(self) -> str:
        cuts = [s.cut for s in self.sessions if s.cut]
        edits = sum(s.edit for s in self.sessions)
        return (
            f"seed={self.seed} rows={self.rows} id={self.id_column} models={len(self.models)} "
            f"distinct={self.distinct} conc={self.concurrency} sessions={len(self.sessions)} "
            f"edits={edits} cuts={cuts} budget={self.budget_usd} marks={self.marks} "
            f"sim={self.sim}"
        )


def make_scenario(seed: int, *, kills: bool = False, max_rows: int = 60) -> Scenario:
    rng = random.Random(seed)
    rows = rng.randint(20, max_rows)
    distinct = rng.randint(max(2, rows // 8), rows)
    models = MODELS[: rng.choice((1, 1, 2))]
    marks: dict[int, str] = {}
    for number in range(distinct):
        draw = rng.random()
        if draw < 0.08:
            marks[number] = "always"
        elif draw < 0.18:
            marks[number] = "fail_first"
        elif draw < 0.28:
            marks[number] = "no_usage"
    sim: dict[str, Any] = {
        "seed": seed,
        "latency_ms": rng.choice((2.0, 5.0, 10.0)) if not kills else 25.0,
        "jitter_ms": 3.0,
        "rate_429": rng.choice((0.0, 0.05, 0.15)),
        "retry_after_s": 0.02,
        "rate_500": rng.choice((0.0, 0.05, 0.15)),
        "rate_drop": rng.choice((0.0, 0.0, 0.05)),
    }
    if rng.random() < 0.5:  # x-ratelimit-* headers on every answer, 429s included
        sim["rpm_limit"] = 1_000_000
        sim["ratelimit_headers"] = True
    budget = None
    if not kills and rng.random() < 0.25:
        # Stops somewhere in the first half: each answer costs ~(prompt + answer) tokens.
        budget = round(rows * len(models) * rng.uniform(0.1, 0.5) * 60 * PRICE_PER_MTOK / 1e6, 4)
    sessions = [Session()]
    for _ in range(rng.randint(1, 3)):
        sessions.append(Session(edit=rng.random() < 0.7))
    for session in sessions:
        if kills and rng.random() < 0.6:
            session.cut, session.cut_after = "kill", rng.uniform(0.05, 0.7)
        elif not kills and budget is None and rng.random() < 0.35:
            session.cut, session.cut_after = "cancel", rng.uniform(0.02, 0.3)
    return Scenario(
        seed=seed,
        rows=rows,
        id_column=rng.random() < 0.6,
        models=models,
        concurrency=rng.choice((2, 4, 8)) if kills else rng.choice((4, 8, 16)),
        distinct=distinct,
        sim=sim,
        sessions=sessions,
        budget_usd=budget,
        marks=marks,
    )


class Input:
    """The input rows of a scenario, edited between sessions like a user would."""

    def __init__(self, scenario: Scenario, rng: random.Random) -> None:
        self.scenario = scenario
        self.rng = rng
        self.next_id = 0
        self.prompts = [self.prompt(n) for n in range(scenario.distinct)]
        self.rows: list[dict[str, Any]] = [self.new_row() for _ in range(scenario.rows)]

    def prompt(self, number: int) -> str:
        mark = self.scenario.marks.get(number)
        text = f"Prompt {self.scenario.seed}-{number}: tell me about {TOPICS[number % 8]}."
        if mark == "always":
            text += " [[sim:500]]"
        elif mark == "fail_first":
            text += " [[sim:fail_first=2]]"
        elif mark == "no_usage":
            text += " [[sim:no_usage]]"
        return text

    def new_row(self, text: str | None = None) -> dict[str, Any]:
        self.next_id += 1
        text = text if text is not None else self.rng.choice(self.prompts)
        return (
            {"id": f"k{self.next_id}", "text": text} if self.scenario.id_column else {"text": text}
        )

    def edit(self) -> str:
        """One to three random edits; returns what was done (for failure messages)."""
        rng, rows, done = self.rng, self.rows, []
        for _ in range(rng.randint(1, 3)):
            kind = rng.choice(("insert", "delete", "edit", "reorder"))
            if kind == "insert":
                for _ in range(rng.randint(1, 5)):
                    fresh = rng.random() < 0.5
                    text = (
                        f"Fresh prompt {self.next_id} of {self.scenario.seed}." if fresh else None
                    )
                    rows.insert(rng.randint(0, len(rows)), self.new_row(text))
            elif kind == "delete" and len(rows) > 5:
                for _ in range(rng.randint(1, min(5, len(rows) - 5))):
                    rows.pop(rng.randrange(len(rows)))
            elif kind == "edit":
                for _ in range(rng.randint(1, 4)):
                    row = rows[rng.randrange(len(rows))]
                    row["text"] = (
                        rng.choice(self.prompts)
                        if rng.random() < 0.5
                        else f"Edited prompt {rng.randrange(10**6)} of {self.scenario.seed}."
                    )
            elif kind == "reorder":
                start = rng.randrange(len(rows))
                piece = rows[start : start + rng.randint(2, 12)]
                rng.shuffle(piece)
                rows[start : start + len(piece)] = piece
            done.append(kind)
        return "+".join(done)

    def write(self, path: Path) -> None:
        path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))


def spec_for(scenario: Scenario, base_url: str) -> str:
    id_line = 'id_column = "id"\n' if scenario.id_column else ""
    models = ", ".join(f'"{m}"' for m in scenario.models)
    budget = f"budget_usd = {scenario.budget_usd}\n" if scenario.budget_usd else ""
    prices = "".join(
        f'[prices."{m}"]\ninput = {PRICE_PER_MTOK}\ncached_input = {PRICE_PER_MTOK}\n'
        f"output = {PRICE_PER_MTOK}\n"
        for m in scenario.models
    )
    return (
        f'name = "inv"\n\n[input]\npath = "data.jsonl"\n{id_line}prompt_column = "text"\n\n'
        f'[endpoint]\nbase_url = "{base_url}"\ntimeout_s = 10\n\n'
        f"[request]\nmodel = [{models}]\nmax_tokens = {MAX_TOKENS}\n\n"
        f"[run]\nconcurrency = {scenario.concurrency}\nmax_attempts = 8\n"
        f"backoff_base_s = 0.005\nbackoff_max_s = 0.02\nmax_retry_after_s = 0.5\n{budget}\n"
        f"{prices}"
    )


def expected_status(text: str) -> str:
    return "failed" if "[[sim:500]]" in text else "ok"


def tag(model: str, text: str) -> str:
    return f"[req {request_tag(model, [{'role': 'user', 'content': text}])}]"


def check_rows(
    run: RunDir, rows: list[dict[str, Any]], models: tuple[str, ...], *, whole: bool, where: str
) -> None:
    """Each current row x model at most once in results (exactly once when `whole`), on its
    own row, with the answer to its own prompt; nothing that left the input."""
    from runner.report.query import RunDB

    with RunDB(run, with_input=False) as db:
        got = db.arrow("SELECT * FROM results").to_pylist()
    keys = [(r["row_id"], r["model"]) for r in got]
    assert len(keys) == len(set(keys)), f"{where}: a row is in results twice"
    wanted = {
        (str(row.get("id", index)), model): (index, row["text"])
        for index, row in enumerate(rows)
        for model in models
    }
    for r in got:
        key = (r["row_id"], r["model"])
        assert key in wanted, f"{where}: {key} is in results but not in the input"
        index, text = wanted[key]
        assert r["row_index"] == index, f"{where}: {key} at row {r['row_index']}, not {index}"
        if r["status"] == "ok":
            assert r["content"] and tag(r["model"], text) in r["content"], (
                f"{where}: row {key} ({text!r}) holds another request's answer: {r['content']!r}"
            )
    if whole:
        missing = set(wanted) - set(keys)
        assert not missing, (
            f"{where}: {len(missing)} rows never settled, e.g. {sorted(missing)[:3]}"
        )
        for r in got:
            text = wanted[(r["row_id"], r["model"])][1]
            assert r["status"] == expected_status(text), f"{where}: {r} for {text!r}"
    for r in got:  # a reused row says so, and has no tokens of its own
        if r["reused"]:
            assert r["prompt_tokens"] is None and r.get("reused_from") is not None, (where, r)


def check_export(
    run: RunDir, rows: list[dict[str, Any]], models: tuple[str, ...], out: Path
) -> None:
    export(run, out)
    exported = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(exported) == len(rows) * len(models), "export: not one line per row and model"
    width = len(models)
    for index, row in enumerate(rows):  # in input order, a row's models next to each other
        lines = exported[index * width : (index + 1) * width]
        assert [line["text"] for line in lines] == [row["text"]] * width, "export: order"
        assert sorted(line["model"] for line in lines) == sorted(models)
        for line in lines:
            assert line["status"] == expected_status(row["text"]), line
            if line["status"] == "ok":
                assert tag(line["model"], row["text"]) in line["content"], (
                    f"export: {row['text']!r} paired with another answer {line['content']!r}"
                )
            assert isinstance(line["reused"], bool), line


@dataclass
class Tally:
    cuts: int = 0  # sessions cut short (cancelled or killed)
    kills: int = 0
    in_flight_bound: int = 0  # requests possibly on the wire at those cuts
    log: list[str] = field(default_factory=list)


def journaled(run_dir: Path) -> int:
    count = 0
    if (run_dir / "journal").is_dir():
        for seg in (run_dir / "journal").glob(SEGMENT_GLOB):  # not the start log
            with contextlib.suppress(FileNotFoundError):  # compacted meanwhile
                count += seg.read_bytes().count(b"\n")
    for part in (run_dir / "parts").glob("*.parquet"):
        try:
            count += pq.ParquetFile(part).metadata.num_rows
        except OSError:
            pass  # being renamed into place
    return count


def run_killed(folder: Path, args: list[str], target: int, tally: Tally, bound: int) -> None:
    """`runner ARGS` as a real process, SIGKILLed once `target` records are journaled."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "runner", *args, "--runs-dir", str(folder / "runs")],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    killed = False
    try:
        while proc.poll() is None:
            assert time.monotonic() < deadline, "runner process did not end"
            runs = list((folder / "runs").glob("*/manifest.json"))
            if runs and journaled(runs[-1].parent) >= target:
                proc.send_signal(signal.SIGKILL)
                killed = True
                break
            time.sleep(0.01)  # polling another process's files
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    if killed:
        tally.cuts += 1
        tally.kills += 1
        # On the wire, plus answers received but not yet journaled (one a worker at most).
        tally.in_flight_bound += 2 * bound
        tally.log.append(f"killed at {target}")
    else:
        assert proc.returncode in (0, 1, 3), f"runner exited {proc.returncode}: {err}"
        tally.log.append(f"ended {proc.returncode}")


def served_usd(sim: SimulatorThread) -> float:
    return sim.stats.served_tokens * PRICE_PER_MTOK / 1e6


async def run_scenario(scenario: Scenario, folder: Path, sim: SimulatorThread) -> Tally:
    """Play the scenario's sessions, then resume until done; check the invariants."""
    sim.set_config(**{**asdict(SimulatorConfig()), **scenario.sim})
    sim.reset()
    rng = random.Random(scenario.seed * 7919 + 1)
    data = Input(scenario, rng)
    data.write(folder / "data.jsonl")
    (folder / "job.toml").write_text(spec_for(scenario, sim.base_url))
    runs = folder / "runs"
    tally = Tally()
    budget = scenario.budget_usd
    for number, session in enumerate(scenario.sessions):
        changed = False
        if session.edit and number > 0:
            tally.log.append("edit " + data.edit())
            data.write(folder / "data.jsonl")
            changed = True
        where = f"session {number} ({'; '.join(tally.log)})"
        first = number == 0 or not list_runs(runs)
        if session.cut == "kill":
            target = max(1, int(len(data.rows) * len(scenario.models) * session.cut_after))
            if not first:
                target += journaled(runs / list_runs(runs)[-1]["run_id"])
            args = ["submit", "job.toml"] if first else ["resume", "inv"]
            if changed and not first:
                args.append("--allow-changed-input")
            run_killed(folder, args, target, tally, scenario.concurrency)
        else:
            outcome = None
            with anyio.move_on_after(
                session.cut_after if session.cut == "cancel" else 120
            ) as scope:
                if first:
                    prepared = job.prepare(folder / "job.toml")
                    outcome = await job.submit(prepared, runs, handle_signals=False)
                else:
                    outcome = await job.resume(
                        "inv", runs, allow_changed_input=changed, handle_signals=False
                    )
            if scope.cancelled_caught:
                tally.cuts += 1
                tally.in_flight_bound += scenario.concurrency
                tally.log.append("cancelled")
            elif outcome is not None:
                tally.log.append(f"{outcome.state} {outcome.stop_reason or ''}".strip())
                if budget is not None:
                    assert served_usd(sim) <= budget + 1e-9, (
                        f"{where}: served ${served_usd(sim):.6f} past the budget ${budget}"
                    )
        if list_runs(runs) and not session.cut:  # a cut may land before the input was read
            run = RunDir(runs / list_runs(runs)[-1]["run_id"])
            check_rows(run, data.rows, scenario.models, whole=False, where=where)
    # Finish: resume (raising any budget) until the run completes.
    if not list_runs(runs):
        await job.submit(job.prepare(folder / "job.toml"), runs, handle_signals=False)
    for _ in range(4):
        outcome = await job.resume(
            "inv",
            runs,
            allow_changed_input=True,
            handle_signals=False,
            budget_usd=1e6 if budget is not None else None,
            retry_failed=True,
        )
        if outcome.state == "completed":
            break
    where = f"end ({'; '.join(tally.log)})"
    assert outcome.state == "completed", f"{where}: {outcome.state} {outcome.stop_reason}"
    run = outcome.run
    check_rows(run, data.rows, scenario.models, whole=True, where=where)
    check_export(run, data.rows, scenario.models, folder / "out.jsonl")
    stats = sim.stats
    assert stats.resent_after_ok <= tally.in_flight_bound, (
        f"{where}: {stats.resent_after_ok} answered requests bought again, "
        f"at most {tally.in_flight_bound} were in flight at {tally.cuts} cuts"
    )
    manifest = run.read_manifest()
    if tally.kills == tally.cuts:  # the run's own count of what its crashes left unanswered
        unanswered = sum(s.get("unanswered_at_crash") or 0 for s in manifest["sessions"])
        assert stats.resent_after_ok <= unanswered, f"{where}: {unanswered} counted unanswered"
    assert manifest["counts"]["total"] == len(data.rows) * len(scenario.models), where
    return tally


@pytest.fixture(scope="module")
def shared_sim() -> Iterator[SimulatorThread]:
    with SimulatorThread(SimulatorConfig()) as sim:
        yield sim


IN_PROCESS = range(30)
KILLED = range(1000, 1004)


@pytest.mark.anyio
@pytest.mark.parametrize("seed", IN_PROCESS)
async def test_random_scenario_holds_every_invariant(
    seed: int, tmp_path: Path, shared_sim: SimulatorThread
) -> None:
    """Random duplicates, models, faults, budgets, edits and cancellations (in process)."""
    scenario = make_scenario(seed)
    try:
        await run_scenario(scenario, tmp_path, shared_sim)
    except AssertionError as exc:
        raise AssertionError(f"{scenario.describe()}\n{exc}") from None


@pytest.mark.anyio
@pytest.mark.parametrize("seed", KILLED)
async def test_random_scenario_with_kill_9_holds_every_invariant(
    seed: int, tmp_path: Path, shared_sim: SimulatorThread
) -> None:
    """The same with real runner processes killed with SIGKILL at random instants."""
    scenario = make_scenario(seed, kills=True)
    try:
        await run_scenario(scenario, tmp_path, shared_sim)
    except AssertionError as exc:
        raise AssertionError(f"{scenario.describe()}\n{exc}") from None


@pytest.mark.anyio
async def test_budget_holds_across_sessions_with_unknown_usage(
    tmp_path: Path, shared_sim: SimulatorThread
) -> None:
    """Answers without usage count at their worst case in the session that bought them; a
    resume under the same budget must count them too, not start again from what usage says."""
    scenario = Scenario(
        seed=77, rows=30, id_column=True, models=MODELS[:1], concurrency=4, distinct=30,
        sim={"seed": 77, "latency_ms": 2.0}, sessions=[Session(), Session()],
        budget_usd=0.5, marks=dict.fromkeys(range(30), "no_usage"),
    )  # fmt: skip
    shared_sim.set_config(**{**asdict(SimulatorConfig()), **scenario.sim})
    shared_sim.reset()
    data = Input(scenario, random.Random(1))
    data.write(tmp_path / "data.jsonl")
    (tmp_path / "job.toml").write_text(spec_for(scenario, shared_sim.base_url))
    runs = tmp_path / "runs"
    first = await job.submit(job.prepare(tmp_path / "job.toml"), runs, handle_signals=False)
    assert first.state == "stopped" and served_usd(shared_sim) <= 0.5
    await job.resume("inv", runs, handle_signals=False)
    assert served_usd(shared_sim) <= 0.5


@pytest.mark.anyio
async def test_a_crash_counts_a_resent_row_whose_earlier_session_has_a_record(
    tmp_path: Path, shared_sim: SimulatorThread
) -> None:
    """A session re-sends a row an earlier session already has a record of, with the same
    attempt number (the row was edited; or its attempt 1 met a 429 and the session ended):
    killed before that request's record was journaled, the request is unanswered, and the
    earlier session's record does not answer it. It was counted 0: an undercount of what the
    resume may buy again. (The crashed session is what a kill -9 leaves: the manifest still
    `running` with its session, and its start log.)"""
    scenario = Scenario(
        seed=5, rows=3, id_column=True, models=MODELS[:1], concurrency=2, distinct=3,
        sim={"seed": 5, "latency_ms": 2.0}, sessions=[Session()],
    )  # fmt: skip
    shared_sim.set_config(**{**asdict(SimulatorConfig()), **scenario.sim})
    shared_sim.reset()
    data = Input(scenario, random.Random(5))
    data.write(tmp_path / "data.jsonl")
    (tmp_path / "job.toml").write_text(spec_for(scenario, shared_sim.base_url))
    runs = tmp_path / "runs"
    first = await job.submit(job.prepare(tmp_path / "job.toml"), runs, handle_signals=False)
    assert first.state == "completed"
    data.rows[1]["text"] = "Edited prompt of row k2."
    data.write(tmp_path / "data.jsonl")
    # A resume sent the edited row (attempt 1, as in the first session) and was killed
    # before its answer was journaled.
    run = first.run
    manifest = run.read_manifest()
    manifest["sessions"].append(
        {"started_at": "", "started_epoch": time.time(), "pid": 0, "settings": {}}
    )
    manifest["state"] = "running"
    run.write_manifest(manifest)
    log = run.start_log()
    log.started(("k2", MODELS[0], 1))
    log.close()
    outcome = await job.resume("inv", runs, allow_changed_input=True, handle_signals=False)
    assert outcome.state == "completed"
    crashed = outcome.run.read_manifest()["sessions"][1]
    assert crashed["outcome"] == "crashed"
    assert crashed["unanswered_at_crash"] == 1
    check_rows(outcome.run, data.rows, scenario.models, whole=True, where="end")

"""The randomized invariant scenarios of tests/test_invariants.py, more of them and larger.

    uv run python bench/invariants.py [--scenarios 200] [--kills 20] [--max-rows 400]
                                      [--seed 10000] [--stop-at-first]

Each scenario (duplicates, models, faults, budgets, input edits, sessions cut by
cancellation or by SIGKILL of a real runner process) ends with the same checks as the test:
every current input row x model once in `results` and in the export with the answer to its
own prompt, nothing re-bought beyond what was in flight at the cuts, served spend within
the budget. Prints one line per failing scenario (its seed and description reproduce it)
and a summary; exits 1 if any failed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import anyio

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from runner.sim.server import SimulatorConfig, SimulatorThread  # noqa: E402
from tests.test_invariants import make_scenario, run_scenario  # noqa: E402


async def main(args: argparse.Namespace) -> int:
    failed = cuts = 0
    started = time.monotonic()
    seeds = [(args.seed + n, False) for n in range(args.scenarios)]
    seeds += [(args.seed + 500_000 + n, True) for n in range(args.kills)]
    with SimulatorThread(SimulatorConfig()) as sim:
        for seed, kills in seeds:
            scenario = make_scenario(seed, kills=kills, max_rows=args.max_rows)
            with tempfile.TemporaryDirectory(prefix="invariants-") as folder:
                try:
                    tally = await run_scenario(scenario, Path(folder), sim)
                except AssertionError as exc:
                    failed += 1
                    print(f"FAIL {scenario.describe()}", flush=True)
                    print(f"     {str(exc).splitlines()[-1][:400]}", flush=True)
                    if args.stop_at_first:
                        break
                    continue
                cuts += tally.cuts
    wall = time.monotonic() - started
    print(
        f"{len(seeds)} scenarios ({args.kills} with kill -9), {cuts} sessions cut, "
        f"{failed} failed, {wall:.1f} s"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenarios", type=int, default=200)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--max-rows", type=int, default=400)
    parser.add_argument("--seed", type=int, default=10_000)
    parser.add_argument("--stop-at-first", action="store_true")
    sys.exit(anyio.run(main, parser.parse_args()))

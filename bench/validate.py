"""Validation cost per answer: jobs/extract.toml's 10-field schema, answers as the simulator writes
them (valid, and each kind of invalid), checked the way the pool checks them.

    uv run python bench/validate.py [--answers 20000] [--repeat 5]

Times `check_answer` (orjson parse + the compiled fastjsonschema check, error line included) over
distinct answers, best of --repeat passes; prints microseconds per answer by kind. For
comparison it times jsonschema's validator on the valid answers when jsonschema is installed
(it is not a dependency of the runner).
"""

from __future__ import annotations

import argparse
import hashlib
import time
from pathlib import Path

from runner.output.schema import load_output
from runner.output.validate import check_answer
from runner.sim.structured import render
from runner.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("valid", "schema_violation", "invalid_json", "fenced")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--answers", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    output = load_output(load_spec(ROOT / "jobs" / "extract.toml"))
    assert output is not None and output.content is not None
    schema = output.content.schema
    print(f"schema: jobs/extract.schema.json, {len(schema['properties'])} top-level fields")
    for kind in KINDS:
        answers = [
            render(schema, kind, hashlib.sha256(str(i).encode()).digest(), [f"w{i}"], f"{i:012x}")
            for i in range(args.answers)
        ]
        expect_valid = kind == "valid"
        best = float("inf")
        for _ in range(args.repeat):
            start = time.perf_counter()
            verdicts = [check_answer(output, text, None) for text in answers]
            best = min(best, time.perf_counter() - start)
        assert all((v is None) == expect_valid for v in verdicts), kind
        print(f"  {kind:<17} {best / len(answers) * 1e6:6.2f} us per answer")
    try:
        import jsonschema
        import orjson
    except ImportError:
        return
    answers = [
        render(schema, "valid", hashlib.sha256(str(i).encode()).digest(), [f"w{i}"], f"{i:012x}")
        for i in range(args.answers)
    ]
    validator = jsonschema.validators.validator_for(schema)(schema)
    best = float("inf")
    for _ in range(args.repeat):
        start = time.perf_counter()
        for text in answers:
            validator.is_valid(orjson.loads(text))
        best = min(best, time.perf_counter() - start)
    print(f"  (jsonschema, valid {best / len(answers) * 1e6:6.2f} us per answer)")


if __name__ == "__main__":
    main()

"""The `parsed` view and `export --fields` on a run with 100,000 JSON answers (built
synthetically, as bench/resume.py builds its run).

    uv run python bench/parsed.py [--rows 100000] [--invalid 0.1]

The job has a 6-field JSON Schema (enum, number, integer, boolean, list of strings, object)
in request.response_format; a tenth of the answers are not valid. Each command runs in a
fresh process; wall time and peak RSS (VmHWM) are printed, with `SELECT count(*) FROM
results` as the baseline of a query that does not build `parsed`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time

from common import OUT, make_input, make_spec, pinned, simulator
from resume import PART_ROWS, _table

from runner.engine.job import prepare
from runner.store.sink import write_part
from runner.store.state import RunDir, input_fingerprint, utc_now, versions

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
            "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
            "additionalProperties": False,
        },
    },
    "required": ["sentiment", "score"],
}
CHILD = """
import json, sys, time
from runner.cli import main
start = time.perf_counter()
code = 0
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
hwm = next(l for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"exit": code, "seconds": time.perf_counter() - start,
                  "peak_rss_mb": int(hwm.split()[1]) / 1024}), file=sys.stderr)
"""


def answer(i: int, invalid: float) -> str:
    if (i * 7919) % 1000 < invalid * 1000:
        return 'Sure! {"sentiment": "very happy"'
    return json.dumps(
        {
            "sentiment": ("positive", "negative", "neutral")[i % 3],
            "score": (i % 100) / 100,
            "stars": i % 5 + 1,
            "spam": i % 11 == 0,
            "tags": [f"t{i % 7}", "x"],
            "who": {"name": f"n{i}", "age": 20 + i % 50},
        }
    )


def build_run(rows: int, invalid: float, base_url: str) -> RunDir:
    extra_format = "response_format = " + _toml_json_schema()
    spec_path = make_spec("parsed", make_input(rows), base_url, concurrency=64)
    text = spec_path.read_text().replace("max_tokens = 64\n", f"max_tokens = 64\n{extra_format}\n")
    spec_path.write_text(text)
    prepared = prepare(spec_path, check_whole_file=False)
    runs = OUT / "parsed-runs"
    shutil.rmtree(runs, ignore_errors=True)
    run = RunDir.create(runs, "parsed", prepared.spec.text)
    batch: list[dict[str, object]] = []
    number = 1
    now = time.time()
    for row in prepared.source.rows():
        for item in prepared.builder.build(row):
            batch.append(
                {
                    "row_id": item.row_id,
                    "row_index": item.row_index,
                    "model": item.model,
                    "request_hash": item.request_hash,
                    "status": "ok",
                    "final": True,
                    "attempts": 1,
                    "started_at": now,
                    "finished_at": now,
                    "latency_ms": 1.0,
                    "http_status": 200,
                    "content": answer(item.row_index, invalid),
                    "finish_reason": "stop",
                    "prompt_tokens": 40,
                    "completion_tokens": 30,
                    "total_tokens": 70,
                    "possibly_billed": False,
                    "reused": False,
                }
            )
        if len(batch) >= PART_ROWS:
            write_part(run.parts_dir, number, _table(batch))
            number += 1
            batch = []
    if batch:
        write_part(run.parts_dir, number, _table(batch))
    run.write_manifest(
        {
            "run_id": run.run_id,
            "job_name": "parsed",
            "spec_path": str(prepared.spec.path),
            "spec_hash": prepared.spec.hash,
            "input": input_fingerprint(prepared.source.path, rows),
            "state": "completed",
            "created_at": utc_now(),
            "versions": versions(),
            "counts": {"total": rows},
            "sessions": [],
        }
    )
    return run


def _toml_json_schema() -> str:
    def toml(value: object) -> str:
        if isinstance(value, dict):
            return "{" + ", ".join(f"{json.dumps(k)} = {toml(v)}" for k, v in value.items()) + "}"
        if isinstance(value, list):
            return "[" + ", ".join(toml(v) for v in value) + "]"
        return json.dumps(value)

    return toml({"type": "json_schema", "json_schema": {"name": "review", "schema": SCHEMA}})


def measure(argv: list[str]) -> dict[str, float]:
    done = subprocess.run(
        pinned(0, [sys.executable, "-c", CHILD, *argv]), capture_output=True, text=True, check=False
    )
    found: dict[str, float] = json.loads(done.stderr.strip().splitlines()[-1])
    if found["exit"] != 0:
        raise SystemExit(f"{argv} failed: {done.stderr[-2000:]}")
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--invalid", type=float, default=0.1)
    args = parser.parse_args()
    with simulator() as base_url:
        run = build_run(args.rows, args.invalid, base_url)
    where = ["--runs-dir", str(run.path.parent)]
    out = OUT / "parsed-fields.parquet"
    cases = [
        ("query results (baseline)", ["query", run.run_id, "SELECT count(*) FROM results"]),
        (
            "query parsed",
            ["query", run.run_id, "SELECT count(*), count(sentiment), avg(score) FROM parsed"],
        ),
        ("export (answer text)", ["export", run.run_id, str(out), "--overwrite"]),
        ("export --fields", ["export", run.run_id, str(out), "--overwrite", "--fields"]),
    ]
    for label, argv in cases:
        found = measure([*argv, *where])
        print(
            f"{label:<26} {args.rows:,} rows: {found['seconds']:.2f} s, "
            f"peak RSS {found['peak_rss_mb']:.0f} MB"
        )


if __name__ == "__main__":
    main()

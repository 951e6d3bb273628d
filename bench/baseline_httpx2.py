"""Baseline: a plain httpx2 loop (no retries, no journal), for bench/run.py.

    python bench/baseline_httpx2.py INPUT.parquet OUTPUT.parquet BASE_URL CONCURRENCY [DEADLINE_S]

Same input and output as the runner: one chat completion per row through a fixed pool of
CONCURRENCY workers fed by a bounded queue; content + usage written to Parquet at the end.
Prints one JSON line: rows, ok, errors, run_seconds (first send to last answer).
"""

import asyncio
import json
import os
import ssl
import sys
import time

import httpx2
import orjson
import pyarrow as pa
import pyarrow.parquet as pq


async def main(src: str, dst: str, base_url: str, concurrency: int, deadline: float) -> None:
    table = pq.read_table(src, columns=["id", "text"])
    ids, texts = table.column("id").to_pylist(), table.column("text").to_pylist()
    content, usage, errors = [None] * len(ids), [None] * len(ids), [None] * len(ids)
    queue: asyncio.Queue[int | None] = asyncio.Queue(maxsize=2 * concurrency)
    url, head = base_url.rstrip("/") + "/chat/completions", {"content-type": "application/json"}
    t: list[float] = []

    async def worker(session: httpx2.AsyncClient) -> None:
        while (i := await queue.get()) is not None:
            body = {"model": "gpt-4o-mini", "max_tokens": 64,
                    "messages": [{"role": "user", "content": texts[i]}]}  # fmt: skip
            try:
                async with asyncio.timeout(60):  # per-phase timeouts miss a slow drip
                    resp = await session.post(url, content=orjson.dumps(body), headers=head)
                data = orjson.loads(resp.content)
                content[i], usage[i] = data["choices"][0]["message"]["content"], data["usage"]
            except Exception as exc:  # a baseline records the failure and moves on
                errors[i] = f"{type(exc).__name__}: {exc}"

    lim = httpx2.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    # SSL_CERT_FILE (set by bench/run.py for the HTTPS workload) names the test CA.
    verify = ssl.create_default_context(cafile=os.environ.get("SSL_CERT_FILE"))
    client = httpx2.AsyncClient(
        limits=lim, timeout=httpx2.Timeout(60), trust_env=False, verify=verify
    )
    async with asyncio.timeout(deadline), client as session:
        workers = [asyncio.create_task(worker(session)) for _ in range(concurrency)]
        t.append(time.time())
        for i in range(len(ids)):
            await queue.put(i)
        for _ in workers:
            await queue.put(None)
        await asyncio.gather(*workers)
        t.append(time.time())
    u = [x or {} for x in usage]
    cols = {"id": ids, "content": pa.array(content, pa.string())}
    cols["error"] = pa.array(errors, pa.string())
    for k in ("prompt_tokens", "completion_tokens", "total_tokens"):
        cols[k] = pa.array([x.get(k) for x in u], pa.int64())
    pq.write_table(pa.table(cols), dst)
    bad = sum(e is not None for e in errors)
    print(json.dumps({"rows": len(ids), "ok": len(ids) - bad, "errors": bad,
                      "run_seconds": t[1] - t[0]}))  # fmt: skip


if __name__ == "__main__":
    a = sys.argv[1:]
    asyncio.run(main(a[0], a[1], a[2], int(a[3]), float(a[4]) if len(a) > 4 else 3600.0))

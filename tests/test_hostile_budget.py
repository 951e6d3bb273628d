"""The budget against a server that bills answers the runner cannot use: every 200 it sends
carries usage (what it charges), but no choices, so the runner retries the row."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import select, spec_text, submit_job
from tests.test_hostile import Exchange, Listener, response

CHEAP = '[prices."gpt-4o-mini"]\ninput = 10.0\noutput = 20.0\n'
MAX_TOKENS = 64


@pytest.mark.anyio
async def test_answers_billed_without_choices_stay_within_budget(tmp_path: Path) -> None:
    sold: list[float] = []

    async def no_choices(ex: Exchange) -> None:
        while await ex.next_request():
            prompt = len(ex.tag.encode()) // 4 + 4  # the runner's own estimate
            sold.append((prompt * 10.0 + MAX_TOKENS * 20.0) / 1e6)
            usage = {"prompt_tokens": prompt, "completion_tokens": MAX_TOKENS}
            body = {"id": f"x{len(sold)}", "choices": [], "usage": usage}
            await ex.send(response(json.dumps(body).encode()))

    with Listener(no_choices) as server:
        text = (
            spec_text(
                base_url=server.url,
                run_extra="budget_usd = 0.02\nmax_attempts = 4",
                concurrency=4,
            )
            + CHEAP
        )
        rows = [{"id": i, "text": f"question number {i} " * 8} for i in range(60)]
        outcome = await submit_job(tmp_path, text, rows)
    assert sum(sold) <= 0.02, (len(sold), sum(sold))
    # Every billed attempt, retried or final, journals its worst-case charge (charged_usd),
    # so a resume after a crash still counts it: the charges cover what the server sold.
    [charges] = select(
        outcome.run,
        "SELECT count(*) FILTER (WHERE charged_usd IS NULL) AS uncharged, "
        "sum(charged_usd) AS charged FROM attempts WHERE possibly_billed",
    )
    assert charges["uncharged"] == 0, charges
    assert charges["charged"] >= sum(sold) - 1e-9, (charges, sum(sold))

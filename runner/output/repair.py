"""The body of a `repair = "feedback"` re-ask: the row's request, the invalid answer, and a
message saying what was wrong with it.

Each re-ask is built from the row's own request and its latest invalid answer only (not every
earlier one): the body stays bounded, and a resume can rebuild it from the journaled record.
"""

from __future__ import annotations

from typing import Any

import orjson

FEEDBACK = (
    "Your answer does not match the required JSON Schema: {error}. "
    "Answer again with only the JSON, matching the schema."
)
TOOL_FEEDBACK = (
    "The arguments of this call do not match the tool's parameters: {error}. "
    "Call the tool again with arguments that match them."
)


def feedback_body(
    body: bytes, content: str | None, tool_calls: str | None, error: str
) -> tuple[bytes, list[dict[str, Any]]]:
    """The re-ask's body (keys sorted, as every body), and the messages it added."""
    request = orjson.loads(body)
    added: list[dict[str, Any]]
    calls = _calls(tool_calls)
    if calls:
        added = [{"role": "assistant", "content": content, "tool_calls": calls}]
        added += [
            {
                "role": "tool",
                "tool_call_id": str(call.get("id", "")),
                "content": TOOL_FEEDBACK.format(error=error),
            }
            for call in calls
        ]
    else:
        added = [
            {"role": "assistant", "content": content or ""},
            {"role": "user", "content": FEEDBACK.format(error=error)},
        ]
    request["messages"] = [*request["messages"], *added]
    return orjson.dumps(request, option=orjson.OPT_SORT_KEYS), added


def _calls(tool_calls: str | None) -> list[dict[str, Any]]:
    if tool_calls is None:
        return []
    try:
        calls = orjson.loads(tool_calls)
    except orjson.JSONDecodeError:
        return []
    return [c for c in calls if isinstance(c, dict)] if isinstance(calls, list) else []

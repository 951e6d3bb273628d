"""Checking one answer against the job's schemas: a verdict as one short line, or None.

The content must be JSON (orjson) matching the content schema; with `[output] lenient = true`
one fenced ```json block, or JSON with prose before or after it, is taken too. Each tool call's
arguments must be JSON matching the `parameters` of the tool it names. A valid answer costs
a few microseconds (bench/validate.py): the compiled checks are plain Python functions.
"""

from __future__ import annotations

import re
from typing import Any

import orjson

from runner.output.schema import OutputSchema

MAX_ERROR_CHARS = 200
# One `[ \t]*` before the optional tag, one after it only: two in a row backtrack
# quadratically over a long run of spaces (an answer of "```" + 50,000 spaces took 18 s)
_FENCE_RE = re.compile(r"```[ \t]*(?:(?:json|JSON)[ \t]*)?\r?\n(.*?)```", re.DOTALL)


def check_answer(output: OutputSchema, content: str | None, tool_calls: str | None) -> str | None:
    """None when the answer is valid; else why not, one line of at most MAX_ERROR_CHARS.

    An answer with tool calls is checked by its calls; one without, by its content (when
    the job has a content schema)."""
    if tool_calls is not None and output.tools:
        return _check_calls(output, tool_calls)
    checker = output.content
    if checker is None:
        return None
    if content is None:
        return "no content"
    value, error = parse_json(content, lenient=output.settings.lenient)
    if error is not None:
        return error
    error = checker.error(value)
    return None if error is None else _bounded(error)


def parse_json(text: str, *, lenient: bool) -> tuple[Any, str | None]:
    """The JSON value of `text`, or (None, why not). Lenient: one fenced block, or the JSON
    between the first opening and the last closing bracket of prose around it."""
    try:
        return orjson.loads(text), None
    except orjson.JSONDecodeError as exc:
        strict_error = f"invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
    if not lenient:
        return None, _bounded(strict_error)
    fences = _FENCE_RE.findall(text)
    if len(fences) > 1:
        return None, f"invalid JSON: {len(fences)} fenced blocks (lenient takes one)"
    candidate = fences[0] if fences else _between_brackets(text)
    if candidate is None:
        return None, _bounded(strict_error)
    try:
        return orjson.loads(candidate), None
    except orjson.JSONDecodeError as exc:
        where = "in the fenced block" if fences else "in the text"
        return None, _bounded(f"invalid JSON {where}: {exc.msg} (line {exc.lineno})")


def _between_brackets(text: str) -> str | None:
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    if not starts:
        return None
    start = min(starts)
    end = text.rfind("}" if text[start] == "{" else "]")
    return text[start : end + 1] if end > start else None


def _check_calls(output: OutputSchema, tool_calls: str) -> str | None:
    try:
        calls = orjson.loads(tool_calls)
    except orjson.JSONDecodeError:
        return "tool_calls: not JSON"
    if not isinstance(calls, list):
        return "tool_calls: not a list"
    for i, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            return f"tool call {i}: no function name"
        checker = output.tools.get(name)
        if checker is None:
            return _bounded(f"tool call {i}: unknown tool {name!r}")
        arguments = function.get("arguments") if isinstance(function, dict) else None
        if not isinstance(arguments, str):
            return f"tool call {i} ({name}): arguments are not a JSON string"
        value, error = parse_json(arguments, lenient=False)
        if error is not None:
            return _bounded(f"tool call {i} ({name}): {error}")
        error = checker.error(value)
        if error is not None:
            return _bounded(f"tool call {i} ({name}): {error}")
    return None


def _bounded(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 3] + "..."

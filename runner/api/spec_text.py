"""A job spec as TOML text: what runner.run() freezes as the run's job.toml.

The text reads back (tomllib) to exactly the values it was made from; `runner resume`,
`status` and `report` read it as they read a spec written by hand.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from collections.abc import Mapping
from typing import Any

from runner.errors import SpecError

# How `runner.run()` names itself in errors about its arguments (fields as the spec's).
CALL = "runner.run()"
_BARE_KEY = re.compile(r"[A-Za-z0-9_\-]+")


def spec_toml(spec: Mapping[str, Any]) -> str:
    """A job spec (TOML tables as dicts) as TOML text that reads back to the same values.

    Raises SpecError for a value TOML cannot hold (None inside a list, a date, an object).
    """
    plain = _plain(spec, "")
    top = {k: v for k, v in plain.items() if not isinstance(v, dict)}
    lines = [f"{_key(k)} = {_value(v)}" for k, v in top.items()]
    for section, values in plain.items():
        if isinstance(values, dict):
            lines += ["", f"[{_key(section)}]"]
            lines += [f"{_key(k)} = {_value(v)}" for k, v in values.items()]
    text = "# Written by runner.run() (the Python API)\n" + "\n".join(lines) + "\n"
    # The frozen spec must mean what was asked (compared as JSON: nan equals nan there).
    if json.dumps(tomllib.loads(text), sort_keys=True) != json.dumps(plain, sort_keys=True):
        raise AssertionError("the job spec did not survive TOML")
    return text


def _plain(value: Any, where: str) -> Any:
    """Values as TOML holds them: dicts of str, lists, str, int, float, bool; None drops out
    of a table."""
    if isinstance(value, Mapping):
        return {
            str(k): _plain(v, f"{where}.{k}" if where else str(k))
            for k, v in value.items()
            if v is not None
        }
    if isinstance(value, list | tuple):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, bool | int | float | str):
        return value
    raise SpecError(CALL, where, f"cannot be written in a job spec ({type(value).__name__})")


def _key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else _string(key)


def _string(text: str) -> str:
    # JSON's escapes are TOML's too; TOML also wants DEL escaped.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # inf, -inf and nan are TOML's spelling too
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    items = ", ".join(f"{_key(k)} = {_value(v)}" for k, v in value.items())
    return "{ " + items + " }" if items else "{}"

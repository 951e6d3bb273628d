"""Rate-limit response headers: OpenAI's (`-requests`, `-tokens`) and routeway's (`-minute`).

`parse_rate_headers` reads the request and token limits, what is left of them and when they
reset; runner/engine/limiter.py paces the run on what it finds. Values are bounded and checked: a
garbage header reads as absent, never as a huge wait.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

# `ms` and the micro spellings come before `m` and `s`: alternation takes the first that fits.
_GO_PART = re.compile("([0-9]+(?:\\.[0-9]*)?|\\.[0-9]+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")
_GO_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,  # the micro sign; Go accepts it and the Greek mu below
    "\u03bcs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_MAX_TEXT = 64  # no real header value is longer; bounds the work done on garbage
_EPOCH_S = 1e9  # a "reset" larger than this is a Unix time in seconds (2001 onwards)
_EPOCH_MS = 1e12  # ... and larger than this, in milliseconds


def parse_go_duration(text: str) -> float | None:
    """Seconds in a Go duration (`20ms`, `6m0s`, `1h2m3.5s`, `150us`); None if it is not one."""
    if not isinstance(text, str):
        return None
    s = text.strip().removeprefix("+")
    if s == "0":
        return 0.0
    if not s or len(s) > _MAX_TEXT:
        return None
    total = 0.0
    pos = 0
    while pos < len(s):
        part = _GO_PART.match(s, pos)
        if part is None:
            return None
        total += float(part.group(1)) * _GO_UNITS[part.group(2)]
        pos = part.end()
    return total if math.isfinite(total) else None


def parse_reset_seconds(text: str, now: float | None = None) -> float | None:
    """Seconds until a limit resets: a number of seconds, a Unix time, or a Go duration.

    A number above 1e9 is taken as a Unix time in seconds (above 1e12, in milliseconds) and
    `now` (wall-clock seconds, `time.time()` when None) is subtracted. Never negative; None
    when the text is none of these.
    """
    if not isinstance(text, str):
        return None
    s = text.strip()
    if len(s) > _MAX_TEXT:
        return None
    try:
        value = float(s)
    except ValueError:
        return parse_go_duration(s)
    if not math.isfinite(value) or value < 0:
        return None
    if value > _EPOCH_S:
        wall = time.time() if now is None else now
        value = (value / 1000 if value > _EPOCH_MS else value) - wall
    return max(value, 0.0)


def _parse_count(text: str | None) -> int | None:
    if not isinstance(text, str) or len(text) > _MAX_TEXT:
        return None
    try:
        value = float(text.strip())
    except ValueError:
        return None
    if not math.isfinite(value) or value < 0:
        return None
    return int(value)


@dataclass(frozen=True, slots=True)
class RateHeaders:
    """What a response said about its rate limits; a field is None when it was not said."""

    request_limit: int | None = None
    request_remaining: int | None = None
    request_reset_s: float | None = None
    token_limit: int | None = None
    token_remaining: int | None = None
    token_reset_s: float | None = None


_REQUEST_NAMES = (
    ("x-ratelimit-limit-requests", "x-ratelimit-limit-minute"),
    ("x-ratelimit-remaining-requests", "x-ratelimit-remaining-minute"),
    ("x-ratelimit-reset-requests", "x-ratelimit-reset-minute"),
)
_TOKEN_NAMES = (
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
)
_ALL_NAMES = frozenset(name for pair in _REQUEST_NAMES for name in pair) | set(_TOKEN_NAMES)


def parse_rate_headers(headers: Mapping[str, str], now: float) -> RateHeaders | None:
    """Read OpenAI-style (`-requests`, `-tokens`) and routeway-style (`-minute`) limit headers.

    Names must be lower-cased. The `-minute` trio is a per-minute request limit and is used
    where the `-requests` one is absent. `now` is wall-clock seconds, for resets given as a
    Unix time. None when no such header is present; unreadable values become None fields.
    """
    if not any(name in headers for name in _ALL_NAMES):
        return None

    def first(names: tuple[str, ...]) -> str | None:
        for name in names:
            value = headers.get(name)
            if value is not None:
                return value
        return None

    def reset(value: str | None) -> float | None:
        return None if value is None else parse_reset_seconds(value, now)

    limit, remaining, reset_at = (first(names) for names in _REQUEST_NAMES)
    return RateHeaders(
        request_limit=_parse_count(limit),
        request_remaining=_parse_count(remaining),
        request_reset_s=reset(reset_at),
        token_limit=_parse_count(headers.get(_TOKEN_NAMES[0])),
        token_remaining=_parse_count(headers.get(_TOKEN_NAMES[1])),
        token_reset_s=reset(headers.get(_TOKEN_NAMES[2])),
    )

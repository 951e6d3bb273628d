"""Prompt token estimates of a request before it is sent: text, images, tools and schemas.

Used for every request's `est_prompt_tokens`: the dry run's figures, `input.max_prompt_tokens`,
the budget's reservation (prompt estimate + answer cap at the model's price) and the TPM
bucket. Text is UTF-8 bytes / 4 plus 4 per message (within ~0.9-1.3x of real counts for
English). Tool definitions (`tools`, `functions`) and `response_format` (its JSON Schema) go
to the model as text: they count as their JSON's bytes / 4, once per request.

An image part (`{"type": "image_url", "image_url": {"url": ..., "detail": ...}}`) counts at
OpenAI's documented rate for its vision models (gpt-4o, gpt-4.1, ...): `low` detail 85
tokens; `high` and `auto` 85 + 170 per 512-pixel tile once the image is scaled to fit in
2048x2048 and then down to 768 pixels on its shortest side. The size is read from a data
URL's PNG, JPEG, GIF or WebP header (a few bytes decoded, never the whole image); for an
image whose size is not known (an http URL, another format) it is the most a high-detail
image can cost, IMAGE_DEFAULT_TOKENS = 1445 (2048x768: 8 tiles), so a budget never reserves
too little. Other providers bill images differently: this is an estimate, corrected by the
usage each answer reports.

Imports nothing of the package.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections.abc import Mapping, Sequence
from typing import Any

import orjson

IMAGE_BASE_TOKENS = 85  # a low-detail image; the base of a high-detail one
IMAGE_TILE_TOKENS = 170  # each 512x512 tile of a high-detail image
IMAGE_DEFAULT_TOKENS = IMAGE_BASE_TOKENS + 8 * IMAGE_TILE_TOKENS  # 1445: the most 'high' costs
MESSAGE_TOKENS = 4  # per message: role and separators
_HEADER_BYTES = 1 << 16  # how far into a JPEG its size is looked for


def estimate_prompt_tokens(messages: Sequence[Any]) -> int:
    """The messages' tokens: text bytes / 4, images by their tiles, 4 a message; at least 1."""
    total = 0
    for message in messages:
        if not isinstance(message, Mapping):
            continue
        content = message.get("content")
        if isinstance(content, str):
            total += len(content.encode()) // 4
        elif isinstance(content, list):
            for part in content:
                total += _part_tokens(part)
        calls = message.get("tool_calls")
        if isinstance(calls, list) and calls:
            total += _json_tokens(calls)
        total += MESSAGE_TOKENS
    return max(total, 1)


def fixed_tokens(body: Mapping[str, Any]) -> int:
    """Tokens every request with these fields carries besides its messages: the tool
    definitions and the response format's schema, as JSON text."""
    total = 0
    for key in ("tools", "functions", "response_format"):
        value = body.get(key)
        if value:
            total += _json_tokens(value)
    return total


def estimate_request_tokens(body: Mapping[str, Any]) -> int:
    """A whole request body's prompt tokens: its messages plus its fixed fields."""
    messages = body.get("messages")
    listed = messages if isinstance(messages, list) else []
    return estimate_prompt_tokens(listed) + fixed_tokens(body)


def _json_tokens(value: Any) -> int:
    try:
        return len(orjson.dumps(value)) // 4
    except TypeError:
        return len(str(value).encode()) // 4


def _part_tokens(part: Any) -> int:
    if not isinstance(part, Mapping):
        return 0
    text = part.get("text")
    if isinstance(text, str):
        return len(text.encode()) // 4
    image = part.get("image_url")
    if part.get("type") == "image_url" or image is not None:
        if isinstance(image, str):  # some clients give the URL directly
            return image_tokens(image, "auto")
        if isinstance(image, Mapping):
            url, detail = image.get("url"), image.get("detail", "auto")
            return image_tokens(url if isinstance(url, str) else "", str(detail))
        return IMAGE_DEFAULT_TOKENS
    return 0


def image_tokens(url: str, detail: str = "auto") -> int:
    """One image's tokens at OpenAI's rate for `detail` (low, high, auto)."""
    if detail == "low":
        return IMAGE_BASE_TOKENS
    size = image_size(url)
    if size is None:
        return IMAGE_DEFAULT_TOKENS
    return tile_tokens(*size)


def tile_tokens(width: int, height: int) -> int:
    """A high-detail image's tokens: fit in 2048x2048, shortest side down to 768, then
    170 per 512-pixel tile plus 85."""
    w, h = float(max(width, 1)), float(max(height, 1))
    if max(w, h) > 2048:
        scale = 2048 / max(w, h)
        w, h = w * scale, h * scale
    if min(w, h) > 768:
        scale = 768 / min(w, h)
        w, h = w * scale, h * scale
    tiles = math.ceil(math.floor(w) / 512) * math.ceil(math.floor(h) / 512)
    return IMAGE_BASE_TOKENS + IMAGE_TILE_TOKENS * max(tiles, 1)


# -- image sizes from data URLs ------------------------------------------------------------


class _Base64:
    """Byte ranges of base64 text, decoding only the characters that hold them."""

    def __init__(self, text: str) -> None:
        self.text = text

    def read(self, offset: int, count: int) -> bytes:
        if offset < 0 or count <= 0:
            return b""
        start = (offset // 3) * 4
        end = ((offset + count + 2) // 3) * 4
        chunk = self.text[start:end]
        chunk += "=" * (-len(chunk) % 4)
        try:
            data = base64.b64decode(chunk, validate=True)
        except (binascii.Error, ValueError):
            return b""
        skip = offset - (start // 4) * 3
        return data[skip : skip + count]


def image_size(url: str) -> tuple[int, int] | None:
    """(width, height) of a base64 data URL's PNG, JPEG, GIF or WebP image, else None."""
    if not url.startswith("data:"):
        return None
    header, _, payload = url.partition(",")
    if not header.endswith(";base64") or not payload:
        return None
    data = _Base64(payload.strip())
    head = data.read(0, 32)
    if head.startswith(b"\x89PNG\r\n\x1a\n") and len(head) >= 24:
        return _be(head[16:20]), _be(head[20:24])
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        return int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little")
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return _webp(head)
    if head.startswith(b"\xff\xd8"):
        return _jpeg(data)
    return None


def _be(raw: bytes) -> int:
    return int.from_bytes(raw, "big")


def _webp(head: bytes) -> tuple[int, int] | None:
    kind = head[12:16]
    if kind == b"VP8 " and len(head) >= 30:
        return (
            int.from_bytes(head[26:28], "little") & 0x3FFF,
            int.from_bytes(head[28:30], "little") & 0x3FFF,
        )
    if kind == b"VP8L" and len(head) >= 25:
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8X" and len(head) >= 30:
        return (
            int.from_bytes(head[24:27], "little") + 1,
            int.from_bytes(head[27:30], "little") + 1,
        )
    return None


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg(data: _Base64) -> tuple[int, int] | None:
    """Walk the JPEG's segments (each says its length) to its start-of-frame marker."""
    offset = 2
    while offset < _HEADER_BYTES:
        marker = data.read(offset, 4)
        if len(marker) < 4 or marker[0] != 0xFF:
            return None
        kind = marker[1]
        if kind == 0xFF:  # fill byte
            offset += 1
            continue
        if kind in (0x01, *range(0xD0, 0xD8)):  # markers without a length
            offset += 2
            continue
        length = _be(marker[2:4])
        if kind in _SOF:
            frame = data.read(offset + 5, 4)
            if len(frame) < 4:
                return None
            return _be(frame[2:4]), _be(frame[0:2])
        if length < 2:
            return None
        offset += 2 + length
    return None


__all__ = [
    "IMAGE_BASE_TOKENS",
    "IMAGE_DEFAULT_TOKENS",
    "IMAGE_TILE_TOKENS",
    "estimate_prompt_tokens",
    "estimate_request_tokens",
    "fixed_tokens",
    "image_size",
    "image_tokens",
    "tile_tokens",
]

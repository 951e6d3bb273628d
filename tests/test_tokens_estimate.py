"""Prompt token estimates count images (OpenAI's tile rate, sizes read from data URLs), tool
definitions and response schemas, and those counts reach the dry run, max_prompt_tokens and
the budget's reservations."""

from __future__ import annotations

import base64
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest

from runner.input.source import InputFile, RequestBuilder
from runner.input.tokens import (
    IMAGE_BASE_TOKENS,
    IMAGE_DEFAULT_TOKENS,
    estimate_prompt_tokens,
    estimate_request_tokens,
    fixed_tokens,
    image_size,
    image_tokens,
    tile_tokens,
)
from runner.records import WorkItem
from runner.report.pricing import Budget, PriceSource, parse_price_table
from runner.spec import parse_spec

from .conftest import run_cli, spec_text, write_rows, write_spec


def png(width: int, height: int) -> bytes:
    """A real (tiny-pixel-data) PNG of the given size."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\x00" * (1 + width) * min(height, 2))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels)


def jpeg(width: int, height: int, app_bytes: int = 5000) -> bytes:
    """A JPEG header as cameras write it: APP0, a large APP1 (EXIF), a DQT, then SOF0."""

    def segment(marker: int, data: bytes) -> bytes:
        return bytes([0xFF, marker]) + struct.pack(">H", len(data) + 2) + data

    return (
        b"\xff\xd8"
        + segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")
        + segment(0xE1, b"Exif\x00\x00" + b"\x00" * app_bytes)
        + segment(0xDB, b"\x00" + bytes(range(64)))
        + segment(0xC0, struct.pack(">BHHB", 8, height, width, 1) + b"\x01\x11\x00")
        + b"\xff\xd9"
    )


def gif(width: int, height: int) -> bytes:
    return b"GIF89a" + struct.pack("<HH", width, height) + b"\x00" * 20


def webp_vp8x(width: int, height: int) -> bytes:
    body = b"VP8X" + struct.pack("<I", 10) + b"\x00" * 4
    body += (width - 1).to_bytes(3, "little") + (height - 1).to_bytes(3, "little")
    return b"RIFF" + struct.pack("<I", len(body) + 4) + b"WEBP" + body


def data_url(raw: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(raw).decode()


@pytest.mark.parametrize(
    ("raw", "size"),
    [
        (png(1024, 768), (1024, 768)),
        (png(1, 1), (1, 1)),
        (jpeg(4032, 3024), (4032, 3024)),
        (jpeg(640, 480, app_bytes=0), (640, 480)),
        (jpeg(300, 200, app_bytes=1), (300, 200)),  # segments at every base64 alignment
        (jpeg(300, 200, app_bytes=2), (300, 200)),
        (gif(320, 240), (320, 240)),
        (webp_vp8x(800, 600), (800, 600)),
    ],
)
def test_image_size_from_a_data_url_header(raw: bytes, size: tuple[int, int]) -> None:
    """PNG, JPEG (past a large EXIF segment), GIF and WebP sizes are read from the header."""
    assert image_size(data_url(raw)) == size


@pytest.mark.parametrize(
    "url",
    [
        "https://example.com/cat.png",
        "data:image/png;base64,",
        "data:image/png;base64,not base64 at all!",
        "data:text/plain,hello",
        data_url(b"BM" + b"\x00" * 40, "bmp"),
        data_url(b"\xff\xd8\xff\xe0\x00"),  # a JPEG cut short
    ],
)
def test_unknown_sizes_are_none(url: str) -> None:
    """A URL, a broken or an unknown image has no size (and costs the default)."""
    assert image_size(url) is None
    assert image_tokens(url, "high") == IMAGE_DEFAULT_TOKENS


@pytest.mark.parametrize(
    ("size", "tokens"),
    [
        ((1024, 1024), 765),  # OpenAI's examples: 768x768, 4 tiles
        ((2048, 4096), 1105),  # 1024x2048 -> 768x1536, 6 tiles
        ((512, 512), 255),  # one tile, not scaled up
        ((4096, 8192), 1105),
        ((2048, 768), IMAGE_DEFAULT_TOKENS),  # the most a high-detail image costs
        ((100, 5000), 85 + 170 * 4),  # 41x2048 after the fit: 1x4 tiles
    ],
)
def test_tile_formula(size: tuple[int, int], tokens: int) -> None:
    """High detail: fit in 2048, shortest side down to 768, 170 a 512-pixel tile plus 85."""
    assert tile_tokens(*size) == tokens


def test_detail_levels() -> None:
    """Low detail is 85 whatever the size; high and auto follow the tiles."""
    url = data_url(png(1024, 1024))
    assert image_tokens(url, "low") == IMAGE_BASE_TOKENS
    assert image_tokens(url, "high") == image_tokens(url, "auto") == 765


def test_messages_with_images_and_tool_calls() -> None:
    """An image part counts its tiles, a text part its bytes, tool calls their JSON."""
    url = data_url(png(1024, 1024))
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "abcd" * 5},
                {"type": "image_url", "image_url": {"url": url, "detail": "high"}},
                {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}},
            ],
        }
    ]
    assert estimate_prompt_tokens(messages) == 5 + 765 + 85 + 4
    calls = [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}]
    with_calls = [{"role": "assistant", "content": None, "tool_calls": calls}]
    assert (
        estimate_prompt_tokens(with_calls) == len(json.dumps(calls, separators=(",", ":"))) // 4 + 4
    )


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "lookup",
            "description": "Find a word in the dictionary and return its meaning",
            "parameters": {"type": "object", "properties": {"word": {"type": "string"}}},
        },
    }
]
FORMAT = {
    "type": "json_schema",
    "json_schema": {
        "name": "a",
        "schema": {"type": "object", "properties": {"sentiment": {"enum": ["pos", "neg"]}}},
    },
}


def test_tools_and_response_format_count_as_text() -> None:
    """Tool definitions and the response schema count as their JSON's bytes / 4."""
    body = {
        "messages": [{"role": "user", "content": ""}],
        "tools": TOOLS,
        "response_format": FORMAT,
    }
    expected = len(json.dumps(TOOLS, separators=(",", ":"))) // 4
    expected += len(json.dumps(FORMAT, separators=(",", ":"))) // 4
    assert fixed_tokens(body) == expected
    assert estimate_request_tokens(body) == 4 + expected


def _request_extra() -> str:
    return "tools = " + _toml(TOOLS) + "\nresponse_format = " + _toml(FORMAT)


def _toml(value: Any) -> str:
    """A JSON value as a TOML inline value (JSON objects as inline tables)."""
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)


def _builder(tmp_path: Path, rows: list[dict[str, Any]], **spec: str) -> list[WorkItem]:
    path = write_rows(tmp_path / "data.jsonl", rows)
    job = parse_spec(spec_text(**spec), path=tmp_path / "job.toml", display="job.toml").job
    source = InputFile(path, job.input)
    builder = RequestBuilder(job, source)
    items = [item for row in source.rows() for item in builder.build(row)]
    assert all(isinstance(i, WorkItem) for i in items)
    return items  # type: ignore[return-value]


def test_work_items_count_tools_and_schema_once_each(tmp_path: Path) -> None:
    """Every request's estimate is its messages plus the spec's tools and response schema:
    exactly the estimate of the body that is sent."""
    (item,) = _builder(
        tmp_path, [{"id": "a", "text": "Hello there"}], request_extra=_request_extra()
    )
    body = json.loads(item.body)
    assert item.est_prompt_tokens == estimate_request_tokens(body)
    assert item.est_prompt_tokens > estimate_prompt_tokens(body["messages"]) + 50


def _image_rows(count: int) -> list[dict[str, Any]]:
    url = data_url(png(2048, 2048))  # 765 tokens at high detail
    part = {"type": "image_url", "image_url": {"url": url, "detail": "high"}}
    message = {"role": "user", "content": [{"type": "text", "text": "What is this?"}, part]}
    return [{"id": f"r{i}", "msgs": [message]} for i in range(count)]


def test_max_prompt_tokens_counts_images(tmp_path: Path) -> None:
    """A short question with a large image is over a limit its text alone is far under."""
    rows = _image_rows(1)
    extra = 'id_column = "id"\nmessages_column = "msgs"\nmax_prompt_tokens = 500'
    path = write_rows(tmp_path / "data.jsonl", rows)
    job = parse_spec(spec_text(input_extra=extra), path=tmp_path / "job.toml", display="j").job
    source = InputFile(path, job.input)
    (skip,) = [i for row in source.rows() for i in RequestBuilder(job, source).build(row)]
    assert not isinstance(skip, WorkItem) and skip.error_type == "prompt_too_long"
    assert "~772 tokens" in skip.message


def test_budget_reserves_the_image_tokens(tmp_path: Path) -> None:
    """The budget's reservation for a row with an image prices the image's tokens."""
    extra = 'id_column = "id"\nmessages_column = "msgs"'
    (item,) = _builder(tmp_path, _image_rows(1), input_extra=extra)
    prices = PriceSource(
        parse_price_table({"gpt-4o-mini": {"input": 1.0, "output": 0.0}}, path="job.toml")
    )
    budget = Budget(prices, limit_usd=1.0)
    reserved = budget.reserve(item)
    assert item.est_prompt_tokens == 765 + 3 + 4
    assert budget.worst_usd(reserved) == pytest.approx(772 / 1_000_000)


def test_dry_run_counts_images(tmp_path: Path) -> None:
    """`submit --dry-run` reports the image tokens in its prompt estimate."""
    write_rows(tmp_path / "data.jsonl", _image_rows(3))
    extra = 'id_column = "id"\nmessages_column = "msgs"'
    spec = write_spec(tmp_path, spec_text(input_extra=extra))
    done = run_cli("submit", str(spec), "--dry-run", "--runs-dir", "runs", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "2316" in done.stdout.replace(",", "")  # 3 x (765 + 3 + 4)

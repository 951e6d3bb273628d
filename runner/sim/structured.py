"""The simulator's structured answers: JSON for a request's JSON Schema, valid or not on purpose.

A request with `response_format: json_schema` (or `json_object`) gets JSON content, and one
with `tools` and a `tool_choice` that forces a call gets a call whose arguments are JSON for
that tool's `parameters`. The JSON is a pure function of the request (its digest seeds every
choice) and its free strings carry the request's tag, so a test can tell an answer put on the
wrong row. Invalid on purpose (see runner/sim/server.py for when): `invalid_json` (a prose
preamble and truncated JSON), `schema_violation` (JSON of the wrong shape), `fenced` (valid
JSON in a ```json block with prose around it: valid only to a lenient reader).

Understands the usual extraction schemas: objects, arrays, strings (enum, const, format,
length), numbers and integers (bounds), booleans, null, type lists, anyOf/oneOf/allOf and
local $ref. `pattern` is not honoured.
"""

from __future__ import annotations

from typing import Any

import orjson

MODES = ("valid", "invalid_json", "schema_violation", "fenced")
_MAX_DEPTH = 8
_FORMATS = {
    "date-time": "2024-05-17T09:30:00Z",
    "date": "2024-05-17",
    "time": "09:30:00Z",
    "email": "ada@example.com",
    "idn-email": "ada@example.com",
    "hostname": "example.com",
    "uri": "https://example.com/a",
    "uri-reference": "https://example.com/a",
    "iri": "https://example.com/a",
    "ipv4": "192.0.2.7",
    "ipv6": "2001:db8::7",
    "uuid": "123e4567-e89b-42d3-a456-426614174000",
}


def schema_of(body: dict[str, Any]) -> tuple[str, Any] | None:
    """What a request asks to be structured: ("content", schema) or ("tool:NAME", schema)."""
    choice = body.get("tool_choice")
    tools = body.get("tools")
    if isinstance(tools, list) and tools and (choice == "required" or isinstance(choice, dict)):
        wanted = choice.get("function", {}).get("name") if isinstance(choice, dict) else None
        for tool in tools:
            function = tool.get("function") if isinstance(tool, dict) else None
            if (
                isinstance(function, dict)
                and function.get("name")
                and (wanted is None or function["name"] == wanted)
            ):
                return f"tool:{function['name']}", function.get("parameters", {"type": "object"})
    response_format = body.get("response_format")
    if not isinstance(response_format, dict):
        return None
    if response_format.get("type") == "json_object":
        return "content", {"type": "object", "properties": {"answer": {"type": "string"}}}
    inner = response_format.get("json_schema")
    if response_format.get("type") == "json_schema" and isinstance(inner, dict):
        return "content", inner.get("schema", {"type": "object"})
    return None


def render(schema: Any, mode: str, digest: bytes, words: list[str], tag: str) -> str:
    """The JSON text for `schema` in `mode` (one of MODES)."""
    maker = _Maker(schema, digest, " ".join(words[:6]) or "answer", tag)
    value = maker.make(schema, 0)
    if mode == "schema_violation":
        value = _violate(schema, value, maker)
    text = orjson.dumps(value).decode()
    if mode == "invalid_json":
        return f"Sure! Here is the JSON you asked for: {text[: max(1, len(text) // 2)]}"
    if mode == "fenced":
        return f"Here is the result:\n```json\n{text}\n```\nLet me know if you need more."
    return text


class _Maker:
    __slots__ = ("digest", "root", "tag", "text", "turn")

    def __init__(self, root: Any, digest: bytes, text: str, tag: str) -> None:
        self.root, self.digest, self.text, self.tag = root, digest, text, tag
        self.turn = 0

    def byte(self) -> int:
        self.turn += 1
        return self.digest[self.turn % len(self.digest)]

    def resolve(self, schema: Any) -> Any:
        for _ in range(_MAX_DEPTH):
            ref = schema.get("$ref") if isinstance(schema, dict) else None
            if not isinstance(ref, str) or not ref.startswith("#"):
                return schema
            node = self.root
            for part in ref[1:].split("/"):
                if part:
                    key = part.replace("~1", "/").replace("~0", "~")
                    node = node[int(key)] if isinstance(node, list) else node.get(key, {})
            schema = node
        return schema

    def make(self, schema: Any, depth: int) -> Any:
        schema = self.resolve(schema)
        if not isinstance(schema, dict):
            return self.string({}) if schema is not False else None
        if "const" in schema:
            return schema["const"]
        if isinstance(schema.get("enum"), list) and schema["enum"]:
            return schema["enum"][self.byte() % len(schema["enum"])]
        for key in ("anyOf", "oneOf"):
            options = schema.get(key)
            if isinstance(options, list) and options:
                plain = [o for o in options if self.resolve(o).get("type") != "null"] or options
                return self.make(plain[0], depth + 1)
        if isinstance(schema.get("allOf"), list) and schema["allOf"]:
            merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
            for part in schema["allOf"]:
                part = self.resolve(part)
                if isinstance(part, dict):
                    merged.setdefault("properties", {}).update(part.get("properties", {}))
                    merged.update({k: v for k, v in part.items() if k != "properties"})
            return self.make(merged, depth + 1)
        kind = _kind(schema)
        if kind == "object":
            return self.object(schema, depth)
        if kind == "array":
            return self.array(schema, depth)
        if kind == "integer":
            return self.integer(schema)
        if kind == "number":
            return (
                self.integer(schema) + 0.5 if "multipleOf" not in schema else self.integer(schema)
            )
        if kind == "boolean":
            return self.byte() % 2 == 0
        if kind == "null":
            return None
        return self.string(schema)

    def object(self, schema: dict[str, Any], depth: int) -> dict[str, Any]:
        properties = schema.get("properties") or {}
        if depth >= _MAX_DEPTH:
            properties = {k: v for k, v in properties.items() if k in schema.get("required", [])}
        value = {name: self.make(sub, depth + 1) for name, sub in properties.items()}
        for name in schema.get("required", []):
            value.setdefault(name, self.string({}))
        return value

    def array(self, schema: dict[str, Any], depth: int) -> list[Any]:
        low = int(schema.get("minItems", 0))
        high = int(schema.get("maxItems", max(low, 3)))
        count = 0 if depth >= _MAX_DEPTH else min(max(low, 1 + self.byte() % 3), high)
        items = schema.get("items", {})
        if isinstance(items, list):  # draft-04 tuples
            return (
                [self.make(items[i % len(items)], depth + 1) for i in range(count)] if items else []
            )
        values = [self.make(items, depth + 1) for _ in range(count)]
        if schema.get("uniqueItems") and len(values) > 1:
            unique: list[Any] = []
            for v in values:
                if v not in unique:
                    unique.append(v)
            values = unique
        return values

    def integer(self, schema: dict[str, Any]) -> int:
        low = schema.get("minimum")
        if low is None and schema.get("exclusiveMinimum") is not None:
            low = int(schema["exclusiveMinimum"]) + 1
        high = schema.get("maximum")
        if high is None and schema.get("exclusiveMaximum") is not None:
            high = int(schema["exclusiveMaximum"]) - 1
        base = int(low) if low is not None else 0
        value = base + self.byte() % 100
        if high is not None:
            value = min(value, int(high))
        step = schema.get("multipleOf")
        if isinstance(step, int) and step > 0:
            value -= value % step
            if low is not None and value < low:
                value += step
        return value

    def string(self, schema: dict[str, Any]) -> str:
        fmt = schema.get("format")
        if isinstance(fmt, str) and fmt in _FORMATS:
            return _FORMATS[fmt]
        text = f"{self.text} [req {self.tag}]"
        low, high = int(schema.get("minLength", 0)), schema.get("maxLength")
        if high is not None and len(text) > int(high):
            text = text[: int(high)]
        if len(text) < low:
            text = text + "x" * (low - len(text))
        return text


def _kind(schema: dict[str, Any]) -> str:
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), kind[0] if kind else None)
    if isinstance(kind, str):
        return kind
    if "properties" in schema or "required" in schema:
        return "object"
    if "items" in schema:
        return "array"
    return "string"


def _violate(schema: Any, value: Any, maker: _Maker) -> Any:
    """A value of the wrong shape: a property of the wrong type, a required one missing, or
    the wrong type altogether."""
    schema = maker.resolve(schema)
    if isinstance(value, dict) and isinstance(schema, dict):
        for name, sub in (schema.get("properties") or {}).items():
            sub = maker.resolve(sub)
            if isinstance(sub, dict) and ("type" in sub or "enum" in sub or "const" in sub):
                wrong: Any = 12345 if _kind(sub) in ("string", "object", "array") else "oops"
                if "enum" in sub or "const" in sub:
                    wrong = "not-one-of-the-allowed-values"
                return {**value, name: wrong}
        required = schema.get("required") or []
        if required:
            return {k: v for k, v in value.items() if k != required[0]}
    return ["not", "an", "object"] if not isinstance(value, list) else {"not": "an array"}

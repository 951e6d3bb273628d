"""Typed columns of structured answers: a JSON Schema's top-level properties as Arrow columns.

`typed_columns(schema)` gives one column per top-level property (in the schema's order), typed
from the property's schema; `to_table(values, columns)` fills them from answers' JSON values
(None for a row that has no valid answer: every column NULL). The mapping:

    string, enum or const of strings        string
    integer, enum of integers               int64
    enum of booleans                        bool
    number                                  float64
    boolean                                 bool
    array with one `items` schema           list<item>
    object with `properties` and
      `additionalProperties: false`         struct<properties>
    ["T", "null"], anyOf/oneOf [T, null]    T (every column is nullable)
    a local $ref (#/$defs/X, #/definitions) what it points to
    anything else                           JSON text (string): anyOf/oneOf/allOf of several
                                            shapes, if/then/else, several types, no type, an
                                            enum of mixed values, an array of tuple `items` or
                                            no `items`, an object that admits other keys, a
                                            recursive $ref, deeper than MAX_DEPTH

A schema that is not an object with properties at the top gives one column, `value`.

Conversion never raises on a valid instance: a value that does not fit its column (an integer
outside int64, which orjson parses as a float anyway; a number beyond float64; text that is
not UTF-8) is NULL in that column; the answer's `content` keeps it as written. JSON text is
orjson's (compact; NaN and infinities, which JSON has not, are null). An object's struct has
every property: a property absent from an answer is NULL, as is one given as null.

`answer_value` is an answer's JSON value when it is valid for the schema, else None: the
values the `parsed` view and `runner export --fields` type.

Imports output.schema and output.validate only.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson
import pyarrow as pa

from runner.output.schema import Checker
from runner.output.validate import parse_json

MAX_DEPTH = 16  # nesting beyond this is JSON text
VALUE_COLUMN = "value"
_INT64_MIN, _INT64_MAX = -(1 << 63), (1 << 63) - 1

Convert = Callable[[Any], Any]


@dataclass(frozen=True, slots=True)
class Node:
    """The Arrow type of one schema node, how a JSON value becomes that type's Python value,
    and why (a part of) it is JSON text, if it is."""

    arrow: pa.DataType
    convert: Convert
    json_text: str | None = None  # why this node is JSON text (None: typed)


@dataclass(frozen=True, slots=True)
class Column:
    """One top-level property as a column."""

    name: str
    node: Node

    @property
    def arrow(self) -> pa.DataType:
        return self.node.arrow

    @property
    def json_text(self) -> str | None:
        return self.node.json_text


# -- converters (each returns None for a value that does not fit) ----------------------------


def _string(value: Any) -> Any:
    return value if isinstance(value, str) else None


def _int(value: Any) -> Any:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if _INT64_MIN <= value <= _INT64_MAX else None
    if isinstance(value, float) and value.is_integer():
        # orjson parses integers beyond 64 bits as floats; JSON Schema counts 1.0 an integer
        return int(value) if -(2.0**63) <= value < 2.0**63 else None
    return None


def _float(value: Any) -> Any:
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        return value
    if isinstance(value, int):
        try:
            return float(value)
        except OverflowError:
            return None
    return None


def _bool(value: Any) -> Any:
    return value if isinstance(value, bool) else None


def _json(value: Any) -> Any:
    if value is None:
        return None
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        pass  # an integer beyond 64 bits, or a value orjson does not know
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError):
        return None


def _list_of(item: Convert) -> Convert:
    def convert(value: Any) -> Any:
        return [item(v) for v in value] if isinstance(value, list) else None

    return convert


def _struct_of(fields: Sequence[tuple[str, Convert]]) -> Convert:
    def convert(value: Any) -> Any:
        if not isinstance(value, dict):
            return None
        return {name: item(value.get(name)) for name, item in fields}

    return convert


_SCALARS: dict[str, Node] = {
    "string": Node(pa.string(), _string),
    "integer": Node(pa.int64(), _int),
    "number": Node(pa.float64(), _float),
    "boolean": Node(pa.bool_(), _bool),
}


def _text(why: str) -> Node:
    return Node(pa.string(), _json, why)


# -- schema -> nodes -----------------------------------------------------------------------


class _Mapper:
    """Walks one schema document, resolving local $refs against its root."""

    def __init__(self, root: Any) -> None:
        self.root = root

    def resolve(self, ref: str) -> Any:
        """The node a local JSON pointer names, or None."""
        if ref == "#":
            return self.root
        if not ref.startswith("#/"):
            return None
        node = self.root
        for raw in ref[2:].split("/"):
            part = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return None
        return node

    def node(self, schema: Any, depth: int, refs: tuple[str, ...]) -> Node:
        if depth > MAX_DEPTH:
            return _text(f"nested deeper than {MAX_DEPTH}")
        if not isinstance(schema, dict):
            return _text("a schema that is true or false")
        ref = schema.get("$ref")
        if isinstance(ref, str):
            if ref in refs:
                return _text(f"recursive $ref {ref}")
            target = self.resolve(ref)
            if target is None:
                return _text(f"$ref {ref} not found in the schema")
            return self.node(target, depth + 1, (*refs, ref))
        for key in ("allOf", "if", "then", "else"):
            if key in schema:
                return _text(key)
        for key in ("anyOf", "oneOf"):
            if key in schema:
                return self._one_of(schema, key, depth, refs)
        if "const" in schema:
            return _SCALARS["string"] if isinstance(schema["const"], str) else _text("const")
        if "enum" in schema:
            return _enum(schema["enum"])
        kind = _single_type(schema.get("type"))
        if kind is None:
            return _text("no single type" if "type" in schema else "no type")
        if kind in _SCALARS:
            return _SCALARS[kind]
        if kind == "array":
            return self._array(schema, depth, refs)
        if kind == "object":
            return self._object(schema, depth, refs)
        return _text("type null")

    def _one_of(self, schema: dict[str, Any], key: str, depth: int, refs: tuple[str, ...]) -> Node:
        branches = schema[key]
        others = (
            [b for b in branches if not (isinstance(b, dict) and b == {"type": "null"})]
            if isinstance(branches, list)
            else []
        )
        rest = {k: v for k, v in schema.items() if k != key}
        if len(others) != 1 or set(rest) - {"description", "title", "default"}:
            return _text(f"{key} of several shapes")
        return self.node(others[0], depth + 1, refs)

    def _array(self, schema: dict[str, Any], depth: int, refs: tuple[str, ...]) -> Node:
        items = schema.get("items")
        if not isinstance(items, dict):
            return _text("an array without one items schema")
        item = self.node(items, depth + 1, refs)
        return Node(pa.list_(item.arrow), _list_of(item.convert), item.json_text)

    def _object(self, schema: dict[str, Any], depth: int, refs: tuple[str, ...]) -> Node:
        properties = schema.get("properties")
        if not isinstance(properties, dict) or not properties:
            return _text("an object without properties")
        if schema.get("additionalProperties") is not False or "patternProperties" in schema:
            return _text("an object that admits keys besides its properties")
        fields = [(str(n), self.node(s, depth + 1, refs)) for n, s in properties.items()]
        why = next((f"{n}: {node.json_text}" for n, node in fields if node.json_text), None)
        return Node(
            pa.struct([pa.field(n, node.arrow) for n, node in fields]),
            _struct_of([(n, node.convert) for n, node in fields]),
            why,
        )


def _enum(values: Any) -> Node:
    """An enum of strings is a string column; of integers, int64; of booleans, bool."""
    listed = [v for v in values if v is not None] if isinstance(values, list) else []
    if listed and all(isinstance(v, str) for v in listed):
        return _SCALARS["string"]
    if listed and all(isinstance(v, int) and not isinstance(v, bool) for v in listed):
        return _SCALARS["integer"]
    if listed and all(isinstance(v, bool) for v in listed):
        return _SCALARS["boolean"]
    return _text("an enum of mixed or other values")


def _single_type(kind: Any) -> str | None:
    """The one type a `type` keyword allows besides null, if it is one."""
    if isinstance(kind, str):
        return kind
    if isinstance(kind, list):
        rest = [k for k in kind if k != "null"]
        if len(rest) == 1 and isinstance(rest[0], str):
            return rest[0]
    return None


def typed_columns(schema: Any) -> list[Column]:
    """One column per top-level property of `schema` (or one `value` column)."""
    mapper = _Mapper(schema)
    top = schema
    refs: tuple[str, ...] = ()
    while isinstance(top, dict) and isinstance(top.get("$ref"), str) and len(refs) < MAX_DEPTH:
        ref = top["$ref"]
        if ref in refs:
            break
        refs, top = (*refs, ref), mapper.resolve(ref)
    properties = top.get("properties") if isinstance(top, dict) else None
    if (
        isinstance(properties, dict)
        and properties
        and _single_type(top.get("type"))
        in (
            "object",
            None,
        )
    ):
        return [Column(str(n), mapper.node(s, 1, refs)) for n, s in properties.items()]
    return [Column(VALUE_COLUMN, mapper.node(schema, 0, ()))]


def arrow_schema(columns: Sequence[Column]) -> pa.Schema:
    return pa.schema([pa.field(c.name, c.arrow, nullable=True) for c in columns])


def to_table(values: Iterable[Any], columns: Sequence[Column]) -> pa.Table:
    """The typed columns of each answer's JSON value (None: a row without a valid answer).

    With a `value` column the whole value is that column; else each property of an object."""
    single = len(columns) == 1 and columns[0].name == VALUE_COLUMN
    cells: list[list[Any]] = [[] for _ in columns]
    for value in values:
        if single:
            cells[0].append(columns[0].node.convert(value))
            continue
        found: Mapping[str, Any] = value if isinstance(value, dict) else {}
        for column, cell in zip(columns, cells, strict=True):
            cell.append(column.node.convert(found.get(column.name)))
    arrays = [_array(cell, column.arrow) for column, cell in zip(columns, cells, strict=True)]
    return pa.Table.from_arrays(arrays, schema=arrow_schema(columns))


def _array(values: list[Any], kind: pa.DataType) -> pa.Array:
    try:
        return pa.array(values, kind)
    except (pa.ArrowException, UnicodeError, OverflowError, TypeError, ValueError):
        pass
    # A value Arrow refuses (text with a lone surrogate, say): that value alone is NULL.
    kept = []
    for value in values:
        try:
            pa.array([value], kind)
        except (pa.ArrowException, UnicodeError, OverflowError, TypeError, ValueError):
            value = None
        kept.append(value)
    return pa.array(kept, kind)


def answer_value(content: str | None, checker: Checker, *, lenient: bool) -> Any:
    """The content's JSON value when it is valid for the schema (parsed as answers are
    checked: runner/output/validate.py), else None."""
    if content is None:
        return None
    value, error = parse_json(content, lenient=lenient)
    if error is not None:
        return None
    return value if checker.error(value) is None else None


def degraded(columns: Sequence[Column]) -> list[tuple[str, str]]:
    """(column, why) for each column that is, or holds, JSON text."""
    return [(c.name, c.json_text) for c in columns if c.json_text is not None]


__all__ = [
    "MAX_DEPTH",
    "VALUE_COLUMN",
    "Column",
    "Node",
    "answer_value",
    "arrow_schema",
    "degraded",
    "to_table",
    "typed_columns",
]

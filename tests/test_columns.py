"""Typed columns from JSON Schemas: the mapping, values that do not fit, and a round trip of
random schemas and their valid instances through Arrow and Parquet."""

from __future__ import annotations

import math
from typing import Any

import fastjsonschema
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runner.output.columns import (
    MAX_DEPTH,
    VALUE_COLUMN,
    arrow_schema,
    degraded,
    to_table,
    typed_columns,
)

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "score": {"type": "number"},
        "ok": {"type": "boolean"},
        "mood": {"enum": ["happy", "sad"]},
        "tags": {"type": "array", "items": {"type": "string"}},
        "where": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": ["integer", "null"]}},
            "additionalProperties": False,
        },
        "either": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
        "loose": {"type": "object", "properties": {"a": {"type": "string"}}},
        "anything": {},
        "level": {"enum": [1, 2, 3]},
        "flag": {"enum": [True, None]},
        "mixed": {"enum": ["a", 1]},
    },
}


def test_the_mapping_of_each_kind() -> None:
    """Each property kind gets its documented Arrow type, in the schema's order."""
    found = arrow_schema(typed_columns(SCHEMA))
    assert found == pa.schema(
        [
            ("name", pa.string()),
            ("age", pa.int64()),
            ("score", pa.float64()),
            ("ok", pa.bool_()),
            ("mood", pa.string()),
            ("tags", pa.list_(pa.string())),
            ("where", pa.struct([("city", pa.string()), ("zip", pa.int64())])),
            ("either", pa.string()),
            ("loose", pa.string()),
            ("anything", pa.string()),
            ("level", pa.int64()),
            ("flag", pa.bool_()),
            ("mixed", pa.string()),
        ]
    )
    degraded_names = [name for name, _ in degraded(typed_columns(SCHEMA))]
    assert degraded_names == ["either", "loose", "anything", "mixed"]


def test_json_text_columns_hold_compact_json() -> None:
    """A property the schema does not fully describe holds its value as JSON text."""
    table = to_table(
        [{"either": 3, "loose": {"a": "x", "b": [1]}, "anything": "s"}], typed_columns(SCHEMA)
    )
    row = table.to_pylist()[0]
    assert (row["either"], row["loose"], row["anything"]) == ("3", '{"a":"x","b":[1]}', '"s"')


def test_invalid_rows_are_null_in_every_column() -> None:
    """A row without a valid answer (None) is NULL in every column, not a default."""
    table = to_table([None, {"name": "x"}], typed_columns(SCHEMA))
    first, second = table.to_pylist()
    assert set(first.values()) == {None}
    assert second["name"] == "x" and second["age"] is None


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (2**63, None),  # beyond int64
        (-(2**63), -(2**63)),
        (2**63 - 1, 2**63 - 1),
        (1.0, 1),  # JSON Schema counts 1.0 an integer
        (1.2345678901234568e29, None),  # how orjson parses a big integer
        (True, None),  # not an integer in JSON
    ],
)
def test_integers_that_do_not_fit_are_null(value: Any, expected: Any) -> None:
    """int64 holds what fits; a bigger integer is NULL rather than an error or a wrap."""
    table = to_table([{"age": value}], typed_columns(SCHEMA))
    assert table.column("age").to_pylist() == [expected]


def test_numbers_beyond_float64_and_nan() -> None:
    """An integer too big for a double is NULL in a number column; NaN stays NaN there and
    is null in JSON text; an integer too big for orjson is still written as JSON text."""
    schema = {"type": "object", "properties": {"x": {"type": "number"}, "j": {}}}
    table = to_table(
        [{"x": 10**400, "j": float("nan")}, {"x": float("nan"), "j": 2**70}],
        typed_columns(schema),
    )
    first, second = table.to_pylist()
    assert first == {"x": None, "j": "null"}
    assert math.isnan(second["x"]) and second["j"] == str(2**70)


def test_text_arrow_refuses_is_null_alone() -> None:
    """A string Arrow cannot encode (a lone surrogate) is NULL; its neighbours are kept."""
    table = to_table([{"name": "\ud800"}, {"name": "fine"}], typed_columns(SCHEMA))
    assert table.column("name").to_pylist() == [None, "fine"]


def test_local_refs_and_nullable_any_of_are_typed() -> None:
    """Pydantic's shapes: $defs with $ref, and Optional[X] as anyOf [X, null], are typed."""
    schema = {
        "$defs": {
            "Point": {
                "type": "object",
                "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {
            "at": {"$ref": "#/$defs/Point"},
            "maybe": {"anyOf": [{"type": "integer"}, {"type": "null"}], "default": None},
            "path": {"type": "array", "items": {"$ref": "#/$defs/Point"}},
        },
    }
    point = pa.struct([("x", pa.float64()), ("y", pa.float64())])
    assert arrow_schema(typed_columns(schema)) == pa.schema(
        [("at", point), ("maybe", pa.int64()), ("path", pa.list_(point))]
    )


def test_recursive_refs_and_deep_nesting_are_json_text() -> None:
    """A recursive $ref, or nesting past MAX_DEPTH, becomes JSON text instead of looping."""
    tree = {
        "definitions": {
            "node": {
                "type": "object",
                "properties": {"kids": {"type": "array", "items": {"$ref": "#/definitions/node"}}},
                "additionalProperties": False,
            }
        },
        "type": "object",
        "properties": {"root": {"$ref": "#/definitions/node"}},
    }
    (root,) = typed_columns(tree)
    assert root.json_text is not None and "recursive" in root.json_text
    deep: dict[str, Any] = {"type": "string"}
    for _ in range(MAX_DEPTH + 5):
        deep = {"type": "array", "items": deep}
    (column,) = typed_columns({"type": "object", "properties": {"d": deep}})
    assert column.json_text is not None and "deeper" in column.json_text


def test_a_schema_without_properties_is_one_value_column() -> None:
    """A top level that is not an object with properties is one column, `value`."""
    columns = typed_columns({"type": "array", "items": {"type": "integer"}})
    assert [(c.name, c.arrow) for c in columns] == [(VALUE_COLUMN, pa.list_(pa.int64()))]
    assert to_table([[1, 2], None], columns).column(VALUE_COLUMN).to_pylist() == [[1, 2], None]


# -- the round trip --------------------------------------------------------------------------

NAMES = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)
SCALARS = st.sampled_from(
    [
        {"type": "string"},
        {"type": "integer"},
        {"type": "number"},
        {"type": "boolean"},
        {"type": ["string", "null"]},
        {"type": ["integer", "null"]},
    ]
)
ENUMS = st.lists(st.text(max_size=6), min_size=1, max_size=4, unique=True).map(
    lambda values: {"enum": values}
)


def _objects(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(NAMES, children, min_size=1, max_size=4).flatmap(
        lambda props: st.lists(st.sampled_from(sorted(props)), unique=True).map(
            lambda required: {
                "type": "object",
                "properties": props,
                "required": required,
                "additionalProperties": False,
            }
        )
    )


def _nest(children: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[dict[str, Any]]:
    """Arrays of, and objects of, smaller property schemas (a named function: hypothesis
    reads the source of an `extend` lambda to check that it recurses, which is unreliable)."""
    arrays = children.map(lambda item: {"type": "array", "items": item, "maxItems": 3})
    return arrays | _objects(children)


PROPERTY = st.recursive(SCALARS | ENUMS, _nest, max_leaves=6)
SCHEMAS = st.dictionaries(NAMES, PROPERTY, min_size=1, max_size=6).map(
    lambda props: {"type": "object", "properties": props}
)
INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
FLOATS = st.floats(allow_nan=False, allow_infinity=False)


def instances(schema: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values valid for one of the generated schemas."""
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    kind = schema["type"]
    if isinstance(kind, list):
        return st.none() | instances({**schema, "type": kind[0]})
    if kind == "string":
        return st.text(max_size=10)
    if kind == "integer":
        return INT64
    if kind == "number":
        return FLOATS | INT64
    if kind == "boolean":
        return st.booleans()
    if kind == "array":
        return st.lists(instances(schema["items"]), max_size=schema.get("maxItems", 3))
    properties = schema["properties"]
    required = set(schema.get("required", ()))
    return st.fixed_dictionaries(
        {name: instances(s) for name, s in properties.items() if name in required},
        optional={name: instances(s) for name, s in properties.items() if name not in required},
    )


@st.composite
def schema_and_rows(draw: st.DrawFn) -> tuple[dict[str, Any], list[Any]]:
    schema = draw(SCHEMAS)
    rows = draw(st.lists(st.none() | instances(schema), min_size=1, max_size=5))
    return schema, rows


def expected(value: Any, schema: dict[str, Any]) -> Any:
    """What a typed column gives back: absent properties NULL, numbers as floats."""
    if value is None:
        return None
    kind = schema.get("type")
    kind = kind[0] if isinstance(kind, list) else kind
    if kind == "number":
        return float(value)
    if kind == "array":
        return [expected(v, schema["items"]) for v in value]
    if kind == "object":
        return {n: expected(value.get(n), s) for n, s in schema["properties"].items()}
    return value


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(schema_and_rows())
def test_valid_instances_round_trip_through_parquet(
    tmp_path_factory: pytest.TempPathFactory, case: tuple[dict[str, Any], list[Any]]
) -> None:
    """Random schemas of scalar, enum, array and object properties: every valid instance,
    put in the typed columns, written to Parquet and read back, is the instance (absent
    properties NULL), and every column has the type the schema names (no JSON text)."""
    schema, rows = case
    check = fastjsonschema.compile(schema)
    for row in rows:
        if row is not None:
            check(row)  # the generator makes valid instances only
    columns = typed_columns(schema)
    assert not degraded(columns)
    path = tmp_path_factory.mktemp("rt") / "t.parquet"
    pq.write_table(to_table(rows, columns), path)
    back = pq.read_table(path)
    assert back.schema == arrow_schema(columns)
    properties = schema["properties"]
    want = [
        {n: (None if row is None else expected(row.get(n), s)) for n, s in properties.items()}
        for row in rows
    ]
    assert back.to_pylist() == want

"""Input files: lazy readers for every format, request building, and one-line input errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner.errors import InputError
from runner.input import source as source_module
from runner.input.source import (
    InputFile,
    RequestBuilder,
    Skip,
    canonical,
    check_input,
    detect_format,
    estimate_prompt_tokens,
)
from runner.records import WorkItem
from runner.spec import parse_spec

from .conftest import spec_text, write_rows

ROWS = [{"id": "a", "text": "Hello there"}, {"id": "b", "text": "Second row"}]


def open_input(
    path: Path,
    *,
    input_extra: str = 'id_column = "id"\nprompt_column = "text"',
    model: str = '"gpt-4o-mini"',
    **spec: str,
) -> tuple[InputFile, RequestBuilder]:
    """An InputFile and RequestBuilder for `path`, shown by its bare file name."""
    text = spec_text(input_path=path.name, input_extra=input_extra, **spec)
    text = text.replace('model = "gpt-4o-mini"', f"model = {model}")
    job = parse_spec(text, path=path.parent / "job.toml", display="job.toml").job
    source = InputFile(path, job.input, shown=path.name)
    return source, RequestBuilder(job, source)


def build_all(source: InputFile, builder: RequestBuilder) -> list[WorkItem | Skip]:
    source.check_columns()
    return [item for row in source.rows() for item in builder.build(row)]


def body(item: WorkItem | Skip) -> dict[str, Any]:
    assert isinstance(item, WorkItem)
    data: dict[str, Any] = json.loads(item.body)
    return data


def batch_line(custom_id: Any, request: dict[str, Any], **extra: Any) -> str:
    line = {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions"}
    return json.dumps({**line, "body": request, **extra}) + "\n"


def batch_input(tmp_path: Path, text: str, request_table: str = "") -> tuple[InputFile, Any]:
    path = tmp_path / "batch.jsonl"
    path.write_text(text)
    spec = f'name = "b"\n[input]\npath = "batch.jsonl"\nformat = "openai-batch"\n{request_table}'
    job = parse_spec(spec, path=tmp_path / "job.toml", display="job.toml").job
    source = InputFile(path, job.input, shown=path.name)
    return source, RequestBuilder(job, source)


# -- formats -> work items -------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".csv"])
def test_prompt_column_rows_become_work_items(tmp_path: Path, suffix: str) -> None:
    """Each row becomes one WorkItem per model whose body holds model, system+user messages
    and the request fields, hashed canonically."""
    path = write_rows(tmp_path / f"data{suffix}", ROWS)
    source, builder = open_input(
        path,
        input_extra='id_column = "id"\nprompt_column = "text"\nsystem = "Be brief."',
        request_extra="temperature = 0.5",
    )
    items = build_all(source, builder)
    assert [(i.row_index, i.row_id, i.model) for i in items] == [
        (0, "a", "gpt-4o-mini"),
        (1, "b", "gpt-4o-mini"),
    ]
    assert body(items[0]) == {
        "model": "gpt-4o-mini",
        "max_tokens": 64,
        "temperature": 0.5,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello there"},
        ],
    }
    for item in items:
        assert isinstance(item, WorkItem)
        assert (item.body, item.request_hash) == canonical(json.loads(item.body))
        assert item.max_tokens == 64
        assert item.est_prompt_tokens == estimate_prompt_tokens(body(item)["messages"])


def test_one_item_per_model(tmp_path: Path) -> None:
    """A list of models yields one item (or skip) per row and model, in the listed order."""
    path = write_rows(tmp_path / "data.jsonl", [ROWS[0], {"id": "b", "text": None}])
    items = build_all(*open_input(path, model='["gpt-4o-mini", "gpt-4o"]'))
    assert [(type(i), i.row_id, i.model) for i in items] == [
        (WorkItem, "a", "gpt-4o-mini"),
        (WorkItem, "a", "gpt-4o"),
        (Skip, "b", "gpt-4o-mini"),
        (Skip, "b", "gpt-4o"),
    ]
    assert items[0].request_hash != items[1].request_hash  # type: ignore[union-attr]


def test_csv_quoted_multi_line_field(tmp_path: Path) -> None:
    """A quoted CSV field spanning lines stays one prompt with its newline."""
    path = tmp_path / "data.csv"
    path.write_text('id,text\n1,"line one\nline two, with comma"\n2,plain\n')
    items = build_all(*open_input(path))
    assert [(i.row_id, body(i)["messages"][0]["content"]) for i in items] == [
        ("1", "line one\nline two, with comma"),
        ("2", "plain"),
    ]


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_template_is_filled_from_columns(tmp_path: Path, suffix: str) -> None:
    """A template is filled from the named columns of each row (null as empty text)."""
    rows = [{"title": "T1", "body": "B1"}, {"title": "T2", "body": None}]
    path = write_rows(tmp_path / f"data{suffix}", rows)
    items = build_all(*open_input(path, input_extra='template = "Title: {title}\\n{body}"'))
    assert [(i.row_id, body(i)["messages"]) for i in items] == [
        ("0", [{"role": "user", "content": "Title: T1\nB1"}]),
        ("1", [{"role": "user", "content": "Title: T2\n"}]),
    ]


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_messages_column(tmp_path: Path, suffix: str) -> None:
    """A messages column (Parquet list<struct> or JSONL list) is sent as is after the system
    message, with the null fields Parquet structs add dropped."""
    rows = [
        {
            "id": 7,
            "msgs": [
                {"role": "user", "content": "Hi", "name": None},
                {"role": "assistant", "content": "Hello", "name": "bot"},
                {"role": "user", "content": "Bye", "name": None},
            ],
        }
    ]
    path = write_rows(tmp_path / f"data{suffix}", rows)
    if suffix == ".parquet":
        assert pa.types.is_list(pq.read_schema(path).field("msgs").type)
    items = build_all(
        *open_input(path, input_extra='id_column = "id"\nmessages_column = "msgs"\nsystem = "S"')
    )
    assert [(i.row_id, body(i)["messages"]) for i in items] == [
        (
            "7",
            [
                {"role": "system", "content": "S"},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello", "name": "bot"},
                {"role": "user", "content": "Bye"},
            ],
        )
    ]


def test_openai_batch_lines_keep_their_bodies(tmp_path: Path) -> None:
    """OpenAI Batch lines become items keyed by custom_id, their body sent as is (canonically)."""
    first = {"model": "m1", "messages": [{"role": "user", "content": "x"}], "max_tokens": 5}
    second = {"messages": [{"role": "user", "content": "y"}]}
    source, builder = batch_input(
        tmp_path,
        batch_line("r1", first) + "\n" + batch_line("r2", second),
        '[request]\nmodel = "fallback"\n',
    )
    items = build_all(source, builder)
    assert [(i.row_index, i.row_id, i.model, i.max_tokens) for i in items] == [
        (0, "r1", "m1", 5),
        (1, "r2", "fallback", None),
    ]
    assert body(items[0]) == first
    assert body(items[1]) == {**second, "model": "fallback"}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (batch_line("", {"model": "m"}), "openai-batch line needs a string custom_id"),
        (batch_line(3, {"model": "m"}), "openai-batch line needs a string custom_id"),
        (batch_line("r", "text"), "openai-batch line needs a JSON object body"),
        (
            batch_line("r", {"model": "m"}, url="/v1/embeddings"),
            "url '/v1/embeddings' is not /v1/chat/completions",
        ),
        (batch_line("r", {"messages": []}), "body has no model and request.model is unset"),
    ],
)
def test_openai_batch_bad_line(tmp_path: Path, line: str, message: str) -> None:
    """A malformed OpenAI Batch line is refused as `path:line: message`."""
    good = batch_line("ok", {"model": "m", "messages": [{"role": "user", "content": "x"}]})
    with pytest.raises(InputError) as info:
        build_all(*batch_input(tmp_path, good + line))
    assert str(info.value) == f"batch.jsonl:2: {message}"


def test_openai_batch_duplicate_custom_id_is_refused(tmp_path: Path) -> None:
    """Two OpenAI Batch lines with the same custom_id are refused like duplicate ids."""
    request = {"model": "m", "messages": [{"role": "user", "content": "x"}]}
    source, builder = batch_input(tmp_path, batch_line("r1", request) * 2)
    with pytest.raises(InputError) as info:
        check_input(source, builder)
    assert str(info.value) == "batch.jsonl:2: duplicate id 'r1' (lines 1 and 2)"


# -- row ids ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ".csv"])
def test_row_id_is_the_row_number_without_an_id_column(tmp_path: Path, suffix: str) -> None:
    """Without id_column the row key is the 0-based data row number (blank lines not counted)."""
    path = write_rows(tmp_path / f"data{suffix}", [*ROWS, {"id": "c", "text": "Third"}])
    if suffix == ".jsonl":
        path.write_text(path.read_text().replace("\n", "\n\n", 1))
    items = build_all(*open_input(path, input_extra='prompt_column = "text"'))
    assert [(i.row_index, i.row_id) for i in items] == [(0, "0"), (1, "1"), (2, "2")]


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
def test_row_id_from_a_numeric_id_column(tmp_path: Path, suffix: str) -> None:
    """An integer id column gives the id as text."""
    path = write_rows(tmp_path / f"data{suffix}", [{"id": 42, "text": "x"}])
    assert [i.row_id for i in build_all(*open_input(path))] == ["42"]


def test_empty_id_is_an_input_error(tmp_path: Path) -> None:
    """A row whose id column is empty is refused with its line number."""
    path = write_rows(tmp_path / "data.jsonl", [ROWS[0], {"id": "", "text": "x"}])
    with pytest.raises(InputError) as info:
        build_all(*open_input(path))
    assert str(info.value) == "data.jsonl:2: id column 'id' is empty"


# -- JSONL line errors -----------------------------------------------------------------------

GOOD = b'{"id": "a", "text": "hi"}\n'


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (GOOD + b"\n\n" + b'{"id": "b", "text": \n', "data.jsonl:4: malformed JSON ("),
        (GOOD + b"   \n" + b"{oops}\n", "data.jsonl:3: malformed JSON ("),
        (GOOD + b"\n" + b'{"id": "b", "text": "\xff\xfe"}\n', "data.jsonl:3: invalid UTF-8"),
        (b"\n" + b"[1, 2]\n", "data.jsonl:2: expected a JSON object, got list"),
        (GOOD + b'"text"\n', "data.jsonl:2: expected a JSON object, got str"),
        (GOOD + b"12\n", "data.jsonl:2: expected a JSON object, got int"),
    ],
)
def test_jsonl_bad_line_is_reported_with_its_line_number(
    tmp_path: Path, content: bytes, expected: str
) -> None:
    """A bad JSONL line is reported as `path:LINE: ...`, counting blank lines."""
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    source, builder = open_input(path)
    with pytest.raises(InputError) as info:
        check_input(source, builder)
    assert str(info.value).startswith(expected), str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("suffix", "rows", "expected"),
    [
        (".jsonl", None, "data.jsonl:5: duplicate id 'a' (lines 1 and 5)"),
        (".parquet", [*ROWS, {"id": "a", "text": "again"}], "data.parquet: "
         "duplicate id 'a' (rows 1 and 3)"),
        (".csv", [*ROWS, {"id": "a", "text": "again"}], "data.csv: "
         "duplicate id 'a' (rows 1 and 3)"),
    ],
)  # fmt: skip
def test_duplicate_ids_name_the_first_two_places(
    tmp_path: Path, suffix: str, rows: list[dict[str, Any]] | None, expected: str
) -> None:
    """A repeated id is refused naming the first two lines (JSONL) or rows that share it."""
    path = tmp_path / f"data{suffix}"
    if rows is None:
        path.write_bytes(GOOD + b'\n{"id": "b", "text": "x"}\n\n{"id": "a", "text": "y"}\n')
    else:
        write_rows(path, rows)
    source, builder = open_input(path)
    with pytest.raises(InputError) as info:
        check_input(source, builder)
    assert str(info.value) == expected


# -- skips -----------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl"])
@pytest.mark.parametrize("prompt", [None, "", "  \n "])
def test_null_or_empty_prompt_is_skipped_not_failed(
    tmp_path: Path, suffix: str, prompt: str | None
) -> None:
    """A null, empty or blank prompt becomes a Skip that is not failed, counted by check_input."""
    rows = [ROWS[0], {"id": "b", "text": prompt}, ROWS[1] | {"id": "c"}]
    path = write_rows(tmp_path / f"data{suffix}", rows)
    source, builder = open_input(path)
    items = build_all(source, builder)
    assert items[1] == Skip(1, "b", "gpt-4o-mini", "empty_prompt", "empty prompt", False)
    assert [type(i) for i in items] == [WorkItem, Skip, WorkItem]
    result = check_input(source, builder)
    assert (result.rows, result.items, result.skipped) == (3, 2, 1)
    assert result.est_prompt_tokens == sum(
        i.est_prompt_tokens for i in items if isinstance(i, WorkItem)
    )


def test_empty_messages_and_blank_template_are_skipped(tmp_path: Path) -> None:
    """An empty messages list and a template that fills to blank text are skipped, not failed."""
    path = write_rows(tmp_path / "data.jsonl", [{"msgs": [], "t": " "}, {"msgs": None, "t": ""}])
    for extra in ('messages_column = "msgs"', 'template = "{t}"'):
        items = build_all(*open_input(path, input_extra=extra))
        assert [(type(i), i.failed) for i in items if isinstance(i, Skip)] == [
            (Skip, False),
            (Skip, False),
        ]


def test_prompt_over_max_prompt_tokens_is_a_failed_skip(tmp_path: Path) -> None:
    """A prompt estimated above input.max_prompt_tokens fails without being sent."""
    path = write_rows(tmp_path / "data.jsonl", [{"id": "a", "text": "x" * 400}, ROWS[1]])
    source, builder = open_input(
        path, input_extra='id_column = "id"\nprompt_column = "text"\nmax_prompt_tokens = 50'
    )
    items = build_all(source, builder)
    assert items[0] == Skip(
        0,
        "a",
        "gpt-4o-mini",
        "prompt_too_long",
        "prompt of ~104 tokens is over input.max_prompt_tokens = 50",
        True,
    )
    assert isinstance(items[1], WorkItem)
    assert check_input(source, builder).skipped == 1


# -- columns ---------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_missing_prompt_column_fails_before_reading_rows(tmp_path: Path, suffix: str) -> None:
    """Parquet and CSV inputs without the prompt column fail at check_columns, listing columns."""
    path = write_rows(tmp_path / f"data{suffix}", [{"id": "a", "other": "x"}])
    source, _ = open_input(path)
    with pytest.raises(InputError) as info:
        source.check_columns()
    assert str(info.value) == f"data{suffix}: no column 'text' (columns: id, other)"


def test_missing_prompt_column_in_jsonl_is_reported_per_line(tmp_path: Path) -> None:
    """JSONL has no schema: a line without the prompt key is refused with its line number,
    listing the columns that line has."""
    path = write_rows(tmp_path / "data.jsonl", [ROWS[0], {"id": "b", "other": "x"}])
    source, builder = open_input(path)
    source.check_columns()
    with pytest.raises(InputError) as info:
        check_input(source, builder)
    assert str(info.value) == "data.jsonl:2: no column 'text' (columns: id, other)"


def test_non_text_prompt_column_in_parquet_is_refused(tmp_path: Path) -> None:
    """An integer prompt column in Parquet is refused by type before any row is read."""
    path = write_rows(tmp_path / "data.parquet", [{"id": "a", "text": 5}])
    source, _ = open_input(path)
    with pytest.raises(InputError) as info:
        source.check_columns()
    assert str(info.value) == "data.parquet: column 'text' has type int64, expected text"


def test_non_text_prompt_in_jsonl_is_refused_per_line(tmp_path: Path) -> None:
    """A JSONL prompt that is not a string is refused with its line number and type."""
    path = write_rows(tmp_path / "data.jsonl", [ROWS[0], {"id": "b", "text": 5}])
    with pytest.raises(InputError) as info:
        build_all(*open_input(path))
    assert str(info.value) == "data.jsonl:2: column 'text' must be text, got int"


# -- files -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "message"),
    [("missing.jsonl", "no such file"), (".", "is a directory, not a file")],
)
def test_unusable_path(tmp_path: Path, name: str, message: str) -> None:
    """A path that does not exist or is a directory is refused by name."""
    spec = parse_spec(spec_text(), path=tmp_path / "job.toml", display="job.toml").job
    with pytest.raises(InputError) as info:
        InputFile(tmp_path / name, spec.input, shown="shown")
    assert str(info.value) == f"shown: {message}"


@pytest.mark.parametrize(
    ("name", "declared", "expected"),
    [
        ("a.parquet", "auto", "parquet"),
        ("a.PQ", "auto", "parquet"),
        ("a.jsonl", "auto", "jsonl"),
        ("a.ndjson", "auto", "jsonl"),
        ("a.csv", "auto", "csv"),
        ("a.txt", "jsonl", "jsonl"),
        ("a.jsonl", "openai-batch", "openai-batch"),
    ],
)
def test_detect_format(name: str, declared: str, expected: str) -> None:
    """The format comes from input.format, else from the file suffix."""
    assert detect_format(Path(name), declared) == expected


def test_unknown_suffix_is_refused() -> None:
    """An unknown suffix with format = auto asks for a known type or input.format."""
    with pytest.raises(InputError, match=r"^a\.txt: unknown file type"):
        detect_format(Path("a.txt"), "auto")


def test_empty_inputs_have_zero_rows(tmp_path: Path) -> None:
    """An empty JSONL file and a zero-row Parquet file read as zero rows without error."""
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("\n\n")
    parquet = tmp_path / "data.parquet"
    pq.write_table(pa.table({"id": pa.array([], pa.string()), "text": pa.array([], pa.string())}),
                   parquet)  # fmt: skip
    for path in (jsonl, parquet):
        source, builder = open_input(path)
        assert list(source.rows()) == []
        assert check_input(source, builder).rows == 0


def test_large_parquet_streams_by_batch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading a 50,000-row Parquet file pulls one record batch for the first row, then all
    rows in order."""
    count = 50_000
    path = tmp_path / "big.parquet"
    table = pa.table({"id": [f"r{i}" for i in range(count)], "text": ["p"] * count})
    pq.write_table(table, path)
    pulled: list[int] = []
    real = pq.ParquetFile.iter_batches

    def counting(self: pq.ParquetFile, *args: Any, **kwargs: Any) -> Iterator[pa.RecordBatch]:
        for batch in real(self, *args, **kwargs):
            pulled.append(batch.num_rows)
            yield batch

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", counting)
    source, _ = open_input(path)
    assert source.row_count_hint() == count
    rows = source.rows()
    first = next(rows)
    assert (first.index, first.values) == (0, {"id": "r0", "text": "p"})
    assert len(pulled) == 1 and pulled[0] < count
    rest = list(rows)
    assert len(rest) == count - 1
    assert (rest[-1].index, rest[-1].values["id"]) == (count - 1, f"r{count - 1}")
    assert sum(pulled) == count


# -- hashing and estimates -------------------------------------------------------------------


def _nest_json(inner: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    # A named function: hypothesis inspects `extend`'s source, which is unreliable for lambdas.
    return st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner)


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    _nest_json,
    max_leaves=10,
)
_bodies = st.dictionaries(st.text(max_size=8), _json, max_size=6)


def _reversed_keys(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _reversed_keys(value[k]) for k in reversed(list(value))}
    if isinstance(value, list):
        return [_reversed_keys(v) for v in value]
    return value


@settings(max_examples=100)
@given(_bodies)
def test_canonical_ignores_key_order(data: dict[str, Any]) -> None:
    """The same request with keys in another order (at any depth) has the same bytes and hash."""
    assert canonical(_reversed_keys(data)) == canonical(data)
    assert orjson.loads(canonical(data)[0]) == data


@settings(max_examples=100)
@given(_bodies, _bodies)
def test_canonical_tells_different_requests_apart(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Requests with different JSON content get different hashes."""
    if orjson.dumps(a, option=orjson.OPT_SORT_KEYS) != orjson.dumps(b, option=orjson.OPT_SORT_KEYS):
        assert canonical(a)[1] != canonical(b)[1]
    else:
        assert canonical(a)[1] == canonical(b)[1]


def test_request_fields_change_the_hash(tmp_path: Path) -> None:
    """The same row built with a different request field gets a different request hash."""
    path = write_rows(tmp_path / "data.jsonl", ROWS[:1])
    plain = build_all(*open_input(path))
    warmer = build_all(*open_input(path, request_extra="temperature = 1"))
    again = build_all(*open_input(path))
    assert plain[0].request_hash == again[0].request_hash  # type: ignore[union-attr]
    assert plain[0].request_hash != warmer[0].request_hash  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("messages", "expected"),
    [
        ([], 1),
        ([{"role": "user", "content": ""}], 4),
        ([{"role": "user", "content": "abcd" * 10}], 14),
        ([{"role": "user", "content": "é" * 8}], 8),
        ([{"role": "user", "content": [{"type": "text", "text": "abcd" * 5}, {"x": 1}]}], 9),
        ([{"role": "system", "content": "abcdefgh"}, {"role": "user", "content": None}], 10),
    ],
)
def test_estimate_prompt_tokens(messages: list[dict[str, Any]], expected: int) -> None:
    """Estimates are UTF-8 bytes / 4 plus 4 per message, text parts included, at least 1."""
    assert estimate_prompt_tokens(messages) == expected


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from(["q", "Q"]),
    st.lists(st.integers(0, 40), max_size=300),
    st.integers(1, 64),
    st.booleans(),
)
def test_repeated_values_are_exactly_those_occurring_twice(
    typecode: str, picks: list[int], slice_size: int, extremes: bool
) -> None:
    """Sorting slice by slice of the value range finds exactly the repeated values, whatever
    the slice size and including the type's extreme values."""
    import collections
    from array import array

    from runner.input import source

    bits = 63 if typecode == "q" else 64
    lowest = -(2**63) if typecode == "q" else 0
    palette = [lowest + (i * 0x9E3779B97F4A7C15) % 2**bits for i in range(41)]
    if extremes:
        palette[0], palette[1] = lowest, lowest + 2**bits - 1 if typecode == "Q" else 2**63 - 1
    values = [palette[p] for p in picks]
    expected = {v for v, n in collections.Counter(values).items() if n > 1}
    assert source._repeated_values(array(typecode, values)) == expected  # the small-input set
    old = source.SORT_SLICE, source.SMALL_SET
    source.SORT_SLICE, source.SMALL_SET = slice_size, 0  # the sliced sort of big inputs
    try:
        found = source._repeated_values(array(typecode, values))
    finally:
        source.SORT_SLICE, source.SMALL_SET = old
    assert found == expected


@pytest.mark.parametrize(
    "input_extra",
    [
        'id_column = "id"\nprompt_column = "text"',
        'id_column = "id"\nprompt_column = "text"\nsystem = "Be brief."\nmax_prompt_tokens = 14',
        'template = "Q: {text} ({n})"',
        'id_column = "id"\nmessages_column = "msgs"',
    ],
)
def test_check_finds_exactly_the_repeated_requests(
    tmp_path: Path, input_extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The whole-input check hashes each row's messages instead of building its requests;
    what it reports (counts, estimates, repeated requests) is what building every request
    says, including when unequal requests share that hash (a collision, forced here)."""
    texts = ["same", "other", "same", None, "a much longer prompt, past fourteen", "other", ""]
    rows = [
        {
            "id": f"r{i}",
            "text": text,
            "n": i % 2,
            "msgs": None if text is None else [{"role": "user", "content": text}],
        }
        for i, text in enumerate(texts)
    ]
    path = write_rows(tmp_path / "data.jsonl", rows)
    source, builder = open_input(path, input_extra=input_extra, model='["m1", "m2"]')
    items = build_all(source, builder)
    sent = [i for i in items if isinstance(i, WorkItem)]
    keys = [int(i.request_hash[:16], 16) for i in sent]
    expected = {k for k in keys if keys.count(k) > 1}
    by_model: dict[str, list[int]] = {}
    for item in sent:
        acc = by_model.setdefault(item.model, [0, 0, 0])
        acc[0], acc[1], acc[2] = acc[0] + 1, acc[1] + item.est_prompt_tokens, acc[2] + 64
    for collide in (False, True):
        if collide:  # every (model, messages) hash equal: the exact pass must sort them out
            monkeypatch.setattr(source_module, "hash", lambda value: 7, raising=False)
        check = check_input(source, builder)
        assert (check.rows, check.items, check.skipped) == (
            len(rows),
            len(sent),
            len(items) - len(sent),
        )
        assert check.est_prompt_tokens == sum(i.est_prompt_tokens for i in sent)
        assert check.by_model == by_model
        assert check.repeated == expected
    assert expected  # the input does repeat requests

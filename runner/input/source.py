"""Input datasets: lazy readers (Parquet, JSONL, CSV, OpenAI Batch) and request building.

Owns reading input files with pyarrow and turning rows into `WorkItem`s. Never holds the
dataset in memory: Parquet and CSV stream by record batch, JSONL line by line. Imports
`errors`, `records` and `spec` only; knows nothing of HTTP, runs or results.
"""

from __future__ import annotations

import codecs
import hashlib
import os
import string
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from runner.errors import InputError
from runner.input.tokens import estimate_prompt_tokens as estimate_prompt_tokens  # re-exported
from runner.input.tokens import estimate_request_tokens, fixed_tokens
from runner.records import WorkItem, hash_key
from runner.spec import InputSpec, JobSpec

BATCH_ROWS = 8192
SORT_SLICE = 1 << 17  # values sorted at a time when looking for repeated ids and requests
# Up to this many values, repeated ones are found with a Python set (a few MB at most, and
# no import of pyarrow.compute, ~30 ms of a short run's start-up).
SMALL_SET = 1 << 16
_TEXT_TYPES = (pa.string(), pa.large_string(), pa.string_view())


@dataclass(frozen=True, slots=True)
class Row:
    """One input row: its position, where it sits in the file, and the columns we need."""

    index: int  # 0-based row number among data rows
    line: int | None  # 1-based line in the file, where the format has lines
    values: dict[str, Any]


@dataclass(frozen=True, slots=True)
class RowRange:
    """A contiguous slice of the input's data rows, [start, stop) (a shard of a Ray run).

    Parquet slices are whole row groups (`row_groups`); JSONL slices start at a line's first
    byte (`byte_start`, `line`: its 1-based number) and end before `byte_stop`; CSV slices
    are read by row number (a quoted value may hold a newline, so bytes cannot split it).
    """

    start: int
    stop: int
    row_groups: tuple[int, ...] | None = None
    byte_start: int | None = None
    byte_stop: int | None = None
    line: int | None = None


@dataclass(frozen=True, slots=True)
class Skip:
    """A row that is not sent: counted, and journaled with this reason."""

    row_index: int
    row_id: str
    model: str
    error_type: str
    message: str
    failed: bool  # True: recorded as a failed row; False: recorded as skipped


def detect_format(path: Path, declared: str) -> str:
    if declared != "auto":
        return declared
    suffix = "".join(path.suffixes[-2:]).lower() if path.suffix == ".gz" else path.suffix.lower()
    formats = {".parquet": "parquet", ".pq": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}
    formats[".csv"] = "csv"
    if suffix not in formats:
        raise InputError(
            str(path), None, "unknown file type: use .parquet, .jsonl or .csv, or set input.format"
        )
    return formats[suffix]


class InputFile:
    """A readable input file with a known format and the columns the job needs."""

    def __init__(
        self,
        path: Path,
        spec: InputSpec,
        *,
        shown: str | None = None,
        rows_range: RowRange | None = None,
    ) -> None:
        self.path = path
        self.rows_range = rows_range  # only these rows (a shard); None: every row
        self.spec = spec
        self.shown = shown or str(path)
        if not path.exists():
            raise InputError(self.shown, None, "no such file")
        if path.is_dir():
            raise InputError(self.shown, None, "is a directory, not a file")
        self.format = detect_format(path, spec.format)
        if self.format != "csv" and "csv" in spec.model_fields_set:
            raise InputError(
                self.shown, None, f"input.csv options are set but this is {self.format} input"
            )
        self.needed = _needed_columns(spec)

    # -- reading -------------------------------------------------------------------------------

    def columns(self) -> list[str]:
        """Column names the file declares (JSONL: the keys of the first record)."""
        if self.format == "parquet":
            return list(self._parquet().schema_arrow.names)
        if self.format == "csv":
            return list(self._csv_header())
        for row in self.rows():
            return list(row.values)
        return []

    def row_count_hint(self) -> int | None:
        """Row count when the file says it for free (Parquet metadata, or a row range)."""
        if self.rows_range is not None:
            return self.rows_range.stop - self.rows_range.start
        return self._parquet().metadata.num_rows if self.format == "parquet" else None

    def rows(self) -> Iterator[Row]:
        if self.format == "parquet":
            return self._parquet_rows()
        if self.format == "csv":
            return self._csv_rows()
        return self._jsonl_rows()

    def _in_range(self, rows: Iterator[Row]) -> Iterator[Row]:
        """Rows of the range only, for a format read from its start (CSV)."""
        span = self.rows_range
        if span is None:
            yield from rows
            return
        for row in rows:
            if row.index >= span.stop:
                return
            if row.index >= span.start:
                yield row

    def check_columns(self) -> None:
        """Fail before any spending when a needed column is missing or of the wrong type."""
        if self.format in ("jsonl", "openai-batch"):
            return  # JSONL has no schema: checked line by line
        if self.format == "parquet":
            schema = self._parquet().schema_arrow
            names = set(schema.names)
        else:
            names = set(self._csv_header())
            schema = None
        listed = _columns_listed(dict.fromkeys(schema.names if schema else self._csv_header()))
        for column in self.needed:
            if column in names:
                continue
            if column in self._named_columns():
                raise InputError(self.shown, None, f"no column {column!r} ({listed})")
            raise InputError(
                self.shown,
                None,
                f"input.template field {{{column}}} is not a column ({listed}){_BRACE_HINT}",
            )
        prompt = self.spec.prompt_column
        if schema is not None and prompt is not None:
            kind = schema.field(prompt).type
            if kind not in _TEXT_TYPES:
                raise InputError(
                    self.shown, None, f"column {prompt!r} has type {kind}, expected text"
                )

    def _named_columns(self) -> set[str]:
        spec = self.spec
        return {c for c in (spec.id_column, spec.prompt_column, spec.messages_column) if c}

    def _parquet(self) -> pq.ParquetFile:
        try:
            # Read pages as they are decoded, 64 KiB at a time: by default a whole column chunk
            # is read up front, which for a file written as one row group is the whole column
            # (measured: 38 MB of peak RSS for a 1,000,000-row prompt file, 19 MB like this).
            return pq.ParquetFile(self.path, pre_buffer=False, buffer_size=64 * 1024)
        except (pa.ArrowInvalid, OSError) as exc:
            raise InputError(self.shown, None, f"not a readable Parquet file ({exc})") from None

    def _parquet_rows(self) -> Iterator[Row]:
        pf = self._parquet()
        names = set(pf.schema_arrow.names)
        wanted = [c for c in self.needed if c in names]
        span = self.rows_range
        index = 0 if span is None else span.start
        groups = None if span is None or span.row_groups is None else list(span.row_groups)
        # Decoded in the calling thread: Arrow's own pool started its threads on the first
        # batch, which held up the first request by ~30 ms, and rows become Python objects
        # one at a time here anyway.
        batches = pf.iter_batches(
            batch_size=BATCH_ROWS, row_groups=groups, columns=wanted or None, use_threads=False
        )
        for batch in batches:
            yield from self._batch_rows(batch, wanted, index)
            index += batch.num_rows

    def _batch_rows(self, batch: pa.RecordBatch, wanted: list[str], start: int) -> Iterator[Row]:
        columns = [batch.column(name).to_pylist() for name in wanted]
        for offset, values in enumerate(zip(*columns, strict=True) if columns else ()):
            yield Row(start + offset, None, dict(zip(wanted, values, strict=True)))
        if not columns:
            for offset in range(batch.num_rows):
                yield Row(start + offset, None, {})

    def _csv_parse(self) -> pacsv.ParseOptions:
        options = self.spec.csv
        return pacsv.ParseOptions(
            delimiter=options.delimiter, quote_char=options.quote_char, newlines_in_values=True
        )

    def _csv_read(self, block_size: int | None = None) -> pacsv.ReadOptions:
        read = pacsv.ReadOptions(encoding=self.spec.csv.encoding)
        if block_size is not None:
            read.block_size = block_size
        return read

    def _csv_header(self) -> list[str]:
        try:
            reader = pacsv.open_csv(
                self.path, parse_options=self._csv_parse(), read_options=self._csv_read()
            )
        except (pa.ArrowInvalid, OSError, UnicodeError) as exc:
            if "Empty CSV file" in str(exc):
                return []
            line = _first_undecodable_line(self.path, self.spec.csv.encoding)
            if line is not None:
                raise InputError(self.shown, line, self._not_decodable()) from None
            raise InputError(
                self.shown, None, f"not a readable CSV file ({str(exc).splitlines()[0]})"
            ) from None
        return list(reader.schema.names)

    def _not_decodable(self) -> str:
        encoding = self.spec.csv.encoding
        if codecs.lookup(encoding).name == "utf-8":
            return "invalid UTF-8 (for another encoding set input.csv.encoding, e.g. latin-1)"
        return f"invalid {encoding} text (input.csv.encoding)"

    def csv_batches(self) -> Iterator[pa.RecordBatch]:
        """Every column of a CSV input as text, batch by batch, read as the runner reads it
        (for the `input` view and export)."""
        header = self._csv_header()
        if not header:
            return
        # Every column as text: per-block type inference would drift between blocks.
        convert = pacsv.ConvertOptions(
            column_types={name: pa.string() for name in header}, strings_can_be_null=False
        )
        index = 0
        try:
            # open_csv already reads and converts the first block: it belongs in the try.
            reader = pacsv.open_csv(
                self.path,
                parse_options=self._csv_parse(),
                convert_options=convert,
                read_options=self._csv_read(1 << 22),
            )
            for batch in reader:
                yield batch
                index += batch.num_rows
        except (pa.ArrowInvalid, UnicodeError) as exc:
            line = _first_undecodable_line(self.path, self.spec.csv.encoding)
            if line is not None:
                raise InputError(self.shown, line, self._not_decodable()) from None
            raise InputError(self.shown, None, f"CSV error after row {index} ({exc})") from None

    def _csv_rows(self) -> Iterator[Row]:
        yield from self._in_range(self._all_csv_rows())

    def _all_csv_rows(self) -> Iterator[Row]:
        header = self._csv_header()
        wanted = [c for c in self.needed if c in header]
        index = 0
        for batch in self.csv_batches():
            yield from self._batch_rows(batch, wanted, index)
            index += batch.num_rows

    def _jsonl_rows(self) -> Iterator[Row]:
        span = self.rows_range
        index, first, left = 0, 1, -1  # left: bytes of the range still to read (-1: all)
        try:
            handle = self.path.open("rb")
        except OSError as exc:
            raise InputError(self.shown, None, f"cannot be read ({exc.strerror})") from None
        with handle:
            if span is not None and span.byte_start is not None:
                handle.seek(span.byte_start)
                index, first = span.start, span.line or 1
                if span.byte_stop is not None:
                    left = span.byte_stop - span.byte_start
            for number, raw in enumerate(handle, start=first):
                if left >= 0:
                    if left == 0:
                        return
                    left -= len(raw)
                if not raw.strip():
                    continue
                try:
                    value = orjson.loads(raw)
                except orjson.JSONDecodeError as exc:
                    raise InputError(self.shown, number, _json_problem(raw, exc)) from None
                if not isinstance(value, dict):
                    raise InputError(
                        self.shown, number, f"expected a JSON object, got {type(value).__name__}"
                    )
                yield Row(index, number, value)
                index += 1


def _first_undecodable_line(path: Path, encoding: str) -> int | None:
    """The 1-based number of the first line that does not decode, if any (lines split on
    b"\n": right for UTF-8 and single-byte encodings, approximate for UTF-16)."""
    decoder = codecs.getincrementaldecoder(encoding)()
    number = 0
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                decoder.decode(raw)
            except UnicodeDecodeError:
                return number
    try:
        decoder.decode(b"", final=True)  # a sequence cut short at the end of the file
    except UnicodeDecodeError:
        return number
    return None


def _json_problem(raw: bytes, exc: orjson.JSONDecodeError) -> str:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as bad:
        return f"invalid UTF-8 at byte {bad.start}"
    return f"malformed JSON ({exc.msg} at column {exc.pos + 1})"


_BRACE_HINT = "; to write a literal brace in a template, double it: {{ and }}"


def _columns_listed(values: dict[str, Any]) -> str:
    names = list(values)
    shown = ", ".join(names[:20]) + (f", ... ({len(names)} in all)" if len(names) > 20 else "")
    return f"columns: {shown}" if names else "no columns"


def _no_column(column: str, values: dict[str, Any]) -> str:
    return f"no column {column!r} ({_columns_listed(values)})"


def _needed_columns(spec: InputSpec) -> list[str]:
    needed: list[str] = []
    if spec.id_column:
        needed.append(spec.id_column)
    if spec.prompt_column:
        needed.append(spec.prompt_column)
    if spec.messages_column:
        needed.append(spec.messages_column)
    if spec.template:
        try:
            fields = [name for _, name, _, _ in string.Formatter().parse(spec.template)]
        except ValueError as exc:
            raise InputError("input.template", None, f"{exc}{_BRACE_HINT}") from None
        for name in fields:
            if name is not None:
                key = name.split(".")[0].split("[")[0]
                if not key or key.isdigit():
                    raise InputError(
                        "input.template", None, "use named fields like {title}, not {} or {0}"
                    )
                if key != key.strip() or any(c in key for c in "\"'{}:\n"):
                    # JSON in a template: {"a": ...} reads as a field named "a".
                    raise InputError(
                        "input.template",
                        None,
                        f"field {{{name}}} is not a column name{_BRACE_HINT} "
                        '(e.g. {{"answer": "{title}"}})',
                    )
                if key not in needed:
                    needed.append(key)
    return needed


# -- requests --------------------------------------------------------------------------------


def canonical(body: dict[str, Any]) -> tuple[bytes, str]:
    """The request body as sent (sorted keys) and its hash: equal requests, equal hashes."""
    data = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
    return data, hashlib.blake2b(data, digest_size=16).hexdigest()


class RequestBuilder:
    """Turns rows into work items (one per model) or skips, with the spec's request fields."""

    def __init__(self, job: JobSpec, source: InputFile) -> None:
        self.spec = job.input
        self.request = job.request
        self.models = job.request.models if job.request else []
        self.fields = job.request.body_fields() if job.request else {}
        self.cap = job.request.answer_cap if job.request else None
        # Tool definitions and the response schema: the same tokens in every request.
        self.fixed_tokens = fixed_tokens(self.fields)
        self.shown = source.shown
        self.batch = source.format == "openai-batch"
        self._prompt: Callable[[Row], list[dict[str, Any]] | None] = self._pick_prompt()

    def build(self, row: Row) -> Iterator[WorkItem | Skip]:
        if self.batch:
            yield self._batch_item(row)
            return
        row_id = self.row_id(row)
        messages = self._prompt(row)
        if messages is None:
            for model in self.models:
                yield Skip(row.index, row_id, model, "empty_prompt", "empty prompt", False)
            return
        est = estimate_prompt_tokens(messages) + self.fixed_tokens
        limit = self.spec.max_prompt_tokens
        for model in self.models:
            if limit is not None and est > limit:
                message = f"prompt of ~{est} tokens is over input.max_prompt_tokens = {limit}"
                yield Skip(row.index, row_id, model, "prompt_too_long", message, True)
                continue
            body, digest = canonical({**self.fields, "model": model, "messages": messages})
            yield WorkItem(row.index, row_id, model, body, digest, est, self.cap)

    def row_id(self, row: Row) -> str:
        if self.batch:
            custom_id = row.values.get("custom_id")
            if not isinstance(custom_id, str) or not custom_id:
                raise InputError(self.shown, row.line, "openai-batch line needs a string custom_id")
            return custom_id
        column = self.spec.id_column
        if column is None:
            return str(row.index)
        value = row.values.get(column)
        if value is None or value == "":
            raise InputError(self.shown, row.line, f"id column {column!r} is empty")
        return str(value)

    def _pick_prompt(self) -> Callable[[Row], list[dict[str, Any]] | None]:
        if self.spec.prompt_column:
            return self._from_prompt
        if self.spec.messages_column:
            return self._from_messages
        return self._from_template

    def _with_system(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if self.spec.system:
            return [{"role": "system", "content": self.spec.system}, *messages]
        return messages

    def _from_prompt(self, row: Row) -> list[dict[str, Any]] | None:
        column = self.spec.prompt_column
        assert column is not None
        if column not in row.values:
            raise InputError(self.shown, row.line, _no_column(column, row.values))
        value = row.values[column]
        if value is None or (isinstance(value, str) and not value.strip()):
            return None
        if not isinstance(value, str):
            raise InputError(
                self.shown,
                row.line,
                f"column {column!r} must be text, got {type(value).__name__}",
            )
        return self._with_system([{"role": "user", "content": value}])

    def _from_messages(self, row: Row) -> list[dict[str, Any]] | None:
        column = self.spec.messages_column
        assert column is not None
        if column not in row.values:
            raise InputError(self.shown, row.line, _no_column(column, row.values))
        value = row.values[column]
        if isinstance(value, str):
            try:
                value = orjson.loads(value)
            except orjson.JSONDecodeError:
                raise InputError(
                    self.shown, row.line, f"column {column!r} is text but not a JSON list"
                ) from None
        if value is None or value == []:
            return None
        if not isinstance(value, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) for m in value
        ):
            raise InputError(
                self.shown, row.line, f"column {column!r} must be a list of {{role, content}}"
            )
        # Parquet structs come back with every field, unused ones as None: drop those.
        messages = [{k: v for k, v in m.items() if v is not None} for m in value]
        return self._with_system(messages)

    def _from_template(self, row: Row) -> list[dict[str, Any]] | None:
        template = self.spec.template
        assert template is not None
        values = {k: ("" if v is None else v) for k, v in row.values.items()}
        try:
            text = template.format_map(values)
        except KeyError as exc:
            name = exc.args[0]
            raise InputError(
                self.shown,
                row.line,
                f"input.template field {{{name}}} is not a column "
                f"({_columns_listed(row.values)}){_BRACE_HINT}",
            ) from None
        except (ValueError, IndexError, AttributeError) as exc:
            raise InputError(
                self.shown, row.line, f"input.template cannot be filled ({exc}){_BRACE_HINT}"
            ) from None
        return self._with_system([{"role": "user", "content": text}]) if text.strip() else None

    def _batch_item(self, row: Row) -> WorkItem | Skip:
        values = row.values
        custom_id, body = values.get("custom_id"), values.get("body")
        if not isinstance(custom_id, str) or not custom_id:
            raise InputError(self.shown, row.line, "openai-batch line needs a string custom_id")
        if not isinstance(body, dict):
            raise InputError(self.shown, row.line, "openai-batch line needs a JSON object body")
        url = values.get("url", "/v1/chat/completions")
        if not str(url).rstrip("/").endswith("chat/completions"):
            raise InputError(self.shown, row.line, f"url {url!r} is not /v1/chat/completions")
        if "model" not in body and self.models:
            body = {**body, "model": self.models[0]}
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise InputError(self.shown, row.line, "body has no model and request.model is unset")
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            return Skip(row.index, custom_id, model, "empty_prompt", "empty messages", False)
        est = estimate_request_tokens(body)
        cap = body.get("max_completion_tokens") or body.get("max_tokens")
        data, digest = canonical(body)
        return WorkItem(
            row.index, custom_id, model, data, digest, est, cap if isinstance(cap, int) else None
        )


@dataclass(slots=True)
class CheckResult:
    rows: int
    items: int
    skipped: int
    est_prompt_tokens: int
    # model -> [requests, estimated prompt tokens, worst-case completion tokens or -1 unknown]
    by_model: dict[str, list[int]] = field(default_factory=dict)
    # hash_key() of the requests that occur more than once: the only ones worth deduplicating
    repeated: set[int] = field(default_factory=set)


ROW_KEYS_SCHEMA = pa.schema(
    [
        pa.field("row_index", pa.int64()),
        pa.field("row_id", pa.string()),
        pa.field("model", pa.string()),
        pa.field("request_hash", pa.string()),
    ]
)


class _KeyWriter:
    """Streams (row_index, row_id, model, request_hash) of every work item to a Parquet file."""

    def __init__(self, path: Path, metadata: dict[bytes, bytes]) -> None:
        self.tmp = path.with_name(path.name + ".tmp")
        self.path = path
        self.writer = pq.ParquetWriter(self.tmp, ROW_KEYS_SCHEMA.with_metadata(metadata))
        self.columns: tuple[list[int], list[str], list[str], list[str]] = ([], [], [], [])

    def add(self, row_index: int, row_id: str, model: str, request_hash: str) -> None:
        index, ids, models, hashes = self.columns
        index.append(row_index)
        ids.append(row_id)
        models.append(model)
        hashes.append(request_hash)
        if len(index) >= BATCH_ROWS * 8:
            self.flush()

    def flush(self) -> None:
        if self.columns[0]:
            self.writer.write_table(
                pa.Table.from_arrays(list(self.columns), schema=self.writer.schema)
            )
            self.columns = ([], [], [], [])

    def close(self) -> None:
        self.flush()
        self.writer.close()
        with self.tmp.open("rb") as handle:
            os.fsync(handle.fileno())
        self.tmp.replace(self.path)

    def abandon(self) -> None:
        self.writer.close()
        self.tmp.unlink(missing_ok=True)


def check_input(
    source: InputFile,
    builder: RequestBuilder,
    *,
    keys_to: Path | None = None,
    keys_metadata: dict[bytes, bytes] | None = None,
) -> CheckResult:
    """Read the whole input once, building every request, so bad rows fail before spending.

    Also refuses duplicate row ids, naming the first two lines (or rows) that share one.
    With `keys_to`, also writes each work item's key (row_index, row_id, model, request
    hash; "" for a row not sent) to that Parquet file, replaced atomically once whole: the
    rows of the input as it is now, which a run whose input changed matches its results to.
    """
    keys = _KeyWriter(keys_to, keys_metadata or {}) if keys_to is not None else None
    try:
        result = _check(source, builder, keys)
    except BaseException:
        if keys is not None:
            keys.abandon()
        raise
    if keys is not None:
        keys.close()
    return result


def _check(source: InputFile, builder: RequestBuilder, keys: _KeyWriter | None) -> CheckResult:
    source.check_columns()
    # 8 bytes a row: a set of Python ints would cost ~60 and grow the run's memory with input.
    hashes = array("q")
    requests = array("Q")  # hash_key() of every request: 8 bytes each
    ids_can_repeat = builder.spec.id_column is not None or builder.batch
    rows = items = skipped = tokens = 0
    by_model: dict[str, list[int]] = {}
    for row in source.rows():
        rows += 1
        for item in builder.build(row):
            if keys is not None:
                digest = item.request_hash if isinstance(item, WorkItem) else ""
                keys.add(item.row_index, item.row_id, item.model, digest)
            if isinstance(item, Skip):
                skipped += 1
            else:
                items += 1
                tokens += item.est_prompt_tokens
                requests.append(hash_key(item.request_hash))
                acc = by_model.setdefault(item.model, [0, 0, 0])
                acc[0] += 1
                acc[1] += item.est_prompt_tokens
                if acc[2] >= 0:
                    acc[2] = -1 if item.max_tokens is None else acc[2] + item.max_tokens
        if ids_can_repeat:
            hashes.append(hash(builder.row_id(row)))
    # Equal hashes (a duplicate, or rarely a collision) trigger an exact second pass.
    suspects = _repeated_values(hashes)
    if suspects:
        _find_duplicate(source, builder, suspects)
    del hashes
    repeated = _repeated_values(requests)
    return CheckResult(rows, items, skipped, tokens, by_model, repeated)


def _repeated_values(values: array[int]) -> set[int]:
    """The values that occur more than once, found by sorting one slice of the value range
    at a time: the array is viewed in place, and each pass needs a few bytes a value of its
    slice only (one sort of the whole array needed ~24 bytes a value at its peak, and a hash
    table, value_counts, ~50)."""
    count = len(values)
    if count < 2:
        return set()
    if count <= SMALL_SET:
        seen: set[int] = set()
        repeated: set[int] = set()
        for value in values:
            if value in seen:
                repeated.add(value)
            else:
                seen.add(value)
        return repeated
    import pyarrow.compute as pc  # ~30 ms: big inputs only

    kind = pa.int64() if values.typecode == "q" else pa.uint64()
    column = pa.Array.from_buffers(kind, count, [None, pa.py_buffer(values)])
    bounds = pc.min_max(column)
    low, high = bounds["min"].as_py(), bounds["max"].as_py()
    step = (high - low) // max(count // SORT_SLICE, 1) + 1
    found: set[int] = set()
    for start in range(low, high + 1, step):
        inside = pc.and_(
            pc.greater_equal(column, pa.scalar(start, kind)),
            pc.less_equal(column, pa.scalar(min(start + step - 1, high), kind)),
        )
        part = column.filter(inside)
        if len(part) < 2:
            continue
        ordered = pc.take(part, pc.array_sort_indices(part))
        same = pc.equal(ordered.slice(1), ordered.slice(0, len(ordered) - 1))
        found.update(ordered.slice(1).filter(same).to_pylist())
    return found


def _find_duplicate(source: InputFile, builder: RequestBuilder, suspects: set[int]) -> None:
    """Name the first two places of a repeated id, among the ids whose hash is a suspect."""
    first: dict[str, int] = {}
    for row in source.rows():
        row_id = builder.row_id(row)
        if hash(row_id) not in suspects:
            continue
        where = row.line if row.line is not None else row.index + 1
        if row_id in first:
            kind = "lines" if row.line is not None else "rows"
            raise InputError(
                source.shown,
                row.line,
                f"duplicate id {row_id!r} ({kind} {first[row_id]} and {where})",
            )
        first[row_id] = where

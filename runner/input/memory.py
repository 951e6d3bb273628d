"""Tables in memory as a run's input: a pandas or polars DataFrame, a pyarrow Table or
RecordBatchReader (anything that exports an Arrow stream), written once as Parquet.

Imports no DataFrame library: pandas and polars are known by their types' modules and
methods, so neither is a dependency. The file is fsynced before anything is sent: it is the
run's input for every later resume, after the Python process that held the table is gone.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from runner.errors import InputError, StorageFailed, UsageError


def arrow_input(data: object) -> tuple[pa.Table | pa.RecordBatchReader, str]:
    """A table in memory as Arrow, and how errors name it; pandas and polars are known by
    their types' modules, never imported here."""
    kind = type(data).__module__.split(".")[0]
    if isinstance(data, pa.Table | pa.RecordBatchReader):
        return data, f"the pyarrow {type(data).__name__}"
    if isinstance(data, pa.RecordBatch):
        return pa.Table.from_batches([data]), "the pyarrow RecordBatch"
    try:
        if kind == "pandas" and hasattr(data, "columns"):
            return pa.Table.from_pandas(data, preserve_index=False), "the pandas DataFrame"
        if kind == "polars" and hasattr(data, "to_arrow"):
            return data.to_arrow(), "the polars DataFrame"
        if hasattr(data, "__arrow_c_stream__"):
            return pa.RecordBatchReader.from_stream(data), f"the {type(data).__name__}"
    except (pa.ArrowException, TypeError, ValueError) as exc:
        raise InputError(
            f"the {kind} {type(data).__name__}", None, f"cannot be read as Arrow ({exc})"
        ) from None
    raise TypeError(
        "runner.run() takes a pandas or polars DataFrame, a pyarrow Table or "
        f"RecordBatchReader, or the path of an input file (got {type(data).__name__})"
    )


def write_input(table: pa.Table | pa.RecordBatchReader, path: Path) -> None:
    """The run's input, written once and made durable before anything is sent."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        if isinstance(table, pa.Table):
            pq.write_table(table, tmp)
        else:
            with pq.ParquetWriter(tmp, table.schema) as writer:
                for batch in table:
                    writer.write_batch(batch)
        os.chmod(tmp, 0o600)  # a run folder is its owner's only, the input included
        fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
        folder = os.open(path.parent, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(folder)  # the rename itself survives a crash
        finally:
            os.close(folder)
    except OSError as exc:
        raise StorageFailed(f"cannot write {path} ({exc.strerror})") from None
    except pa.ArrowException as exc:
        raise UsageError(f"the input cannot be written as Parquet ({exc})") from None


__all__ = ["arrow_input", "write_input"]

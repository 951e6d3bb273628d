"""A Ray run's results on an object store (or any `pyarrow.fs` URI): read, write, mirror.

The run's own folder stays on the driver's disk (manifest, lock, frozen spec); its shards
write their manifests, attempt files and parts under the store URI (`s3://bucket/prefix/
<run-id>/shards/<k>/...`, S3 options in the query string, e.g. `?endpoint_override=host:port
&scheme=http`; credentials from the usual AWS variables of each process, never the URI).
Readers (status, report, query, export) get a local mirror of the shards' files: parts are
immutable, so only new ones are downloaded. No HTTP client of our own: pyarrow.fs does it.
Imports nothing from runner but errors.
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs

from runner.errors import StorageFailed

# Files of a shard that readers need (the journal stays on the node until compacted).
_MIRRORED = ("attempt-", "manifest.json", "part-")


def open_store(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and base path of a store URI; a clear error when it is not one."""
    try:
        fs, base = pafs.FileSystem.from_uri(uri)
    except (pa.ArrowInvalid, OSError, ValueError) as exc:
        raise StorageFailed(f"{_shown(uri)}: not a usable store ({exc})") from None
    return fs, base.rstrip("/")


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a whole object (one PUT on an object store: readers see all of it or nothing)."""
    try:
        parent = path.rsplit("/", 1)[0]
        fs.create_dir(parent, recursive=True)
        with fs.open_output_stream(path) as out:
            out.write(data)
    except (OSError, pa.ArrowException) as exc:
        raise StorageFailed(f"cannot write {path} to the store ({exc})") from None


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes | None:
    """A whole object, or None when there is none."""
    try:
        with fs.open_input_stream(path) as stream:
            data: bytes = stream.read()
            return data
    except FileNotFoundError:
        return None
    except (OSError, pa.ArrowException) as exc:
        if fs.get_file_info(path).type == pafs.FileType.NotFound:
            return None
        raise StorageFailed(f"cannot read {path} from the store ({exc})") from None


def list_files(fs: pafs.FileSystem, folder: str) -> list[pafs.FileInfo]:
    """Every file below `folder` (none when it does not exist)."""
    try:
        found = fs.get_file_info(pafs.FileSelector(folder, recursive=True, allow_not_found=True))
    except (OSError, pa.ArrowException) as exc:
        raise StorageFailed(f"cannot list {folder} on the store ({exc})") from None
    return [info for info in found if info.type == pafs.FileType.File]


def mirror_shards(uri: str, local: Path) -> None:
    """Bring `local/shards/` up to date with the store's: attempt files and manifests
    always (small, and they change), parts only when new (they never change)."""
    fs, base = open_store(uri)
    prefix = f"{base}/shards/"
    for info in list_files(fs, prefix.rstrip("/")):
        relative = info.path[len(prefix) :]
        name = relative.rsplit("/", 1)[-1]
        if not name.startswith(_MIRRORED) or name.endswith(".tmp"):
            continue
        target = local / "shards" / relative
        if name.startswith("part-") and target.is_file() and target.stat().st_size == info.size:
            continue
        data = read_bytes(fs, info.path)
        if data is None:
            continue
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_bytes(data)
        os.replace(tmp, target)


def _shown(uri: str) -> str:
    """A URI without its query string (where options, never secrets, go)."""
    return uri.split("?", 1)[0]

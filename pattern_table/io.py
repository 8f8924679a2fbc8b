"""File-system helpers shared by the store and exports: URI resolution and whole-or-nothing writes."""

from __future__ import annotations

import os
import uuid

import pyarrow as pa
import pyarrow.fs as pafs

# Object stores whose single PUT is atomic and whose "move" would be a non-atomic copy + delete.
OBJECT_STORES = frozenset({"s3", "gcs"})

# What pyarrow file systems raise for I/O trouble (permissions, missing paths, network).
IO_ERRORS = (OSError, pa.ArrowException)


def one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def is_uri(s: str) -> bool:
    return "://" in s or s.startswith("file:")


def normalise(uri_or_path: str) -> str:
    """A URI as given, or a local path made absolute (pyarrow needs absolute local paths)."""
    s = str(uri_or_path)
    if is_uri(s):
        return s.rstrip("/")
    return os.path.abspath(s)


def resolve(uri_or_path: str) -> tuple[pafs.FileSystem, str]:
    s = normalise(uri_or_path)
    if is_uri(s):
        fs, path = pafs.FileSystem.from_uri(s)
        return fs, path.rstrip("/") or "/"
    return pafs.LocalFileSystem(), s


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write `data` at `path` so that no reader ever sees a partial file.

    Where the file system renames (local, NFS, HDFS): a hidden temporary name in the same folder (readers skip
    names starting with '.'), then a move. On object stores: a single PUT of the final name, atomic by itself.
    """
    if fs.type_name in OBJECT_STORES:
        with fs.open_output_stream(path) as out:
            out.write(data)
        return
    folder, name = path.rsplit("/", 1)
    tmp = f"{folder}/.tmp-{uuid.uuid4().hex}-{name}"
    try:
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, path)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except IO_ERRORS:
            pass  # never created, or the folder is not writable: hidden either way
        raise

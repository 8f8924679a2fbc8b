"""File-system helpers shared by the store and exports: URI resolution and whole-or-nothing writes."""

from __future__ import annotations

import contextlib
import os
import stat
import uuid

import pyarrow as pa
import pyarrow.fs as pafs

# Object stores whose single PUT is atomic and whose "move" would be a non-atomic copy + delete.
OBJECT_STORES = frozenset({"s3", "gcs"})

# What pyarrow file systems raise for I/O trouble (permissions, missing paths, network).
IO_ERRORS = (OSError, pa.ArrowException)


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
    Local files are fsynced before the rename (and the folder after it): without that, a power cut after the
    rename can leave the final name holding an empty or partial file.
    """
    if fs.type_name == "local":
        _write_local(path, data)
        return
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


def _write_local(path: str, data: bytes) -> None:
    folder, name = os.path.split(path)
    tmp = os.path.join(folder, f".tmp-{uuid.uuid4().hex}-{name}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # never created
            os.unlink(tmp)
        raise
    try:
        dfd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return  # a folder we may not open for reading: the file itself is on disk
    try:
        os.fsync(dfd)
    except OSError:
        pass  # some file systems refuse fsync on folders; the rename itself is still atomic
    finally:
        os.close(dfd)


def refuse_unsafe_target(fs: pafs.FileSystem, path: str, shown: str) -> None:
    """An export may replace a regular file and nothing else: not a device file, a link, a folder or a pipe
    (the rename would put a regular file in its place: `/dev/null` turned into a file, a link cut)."""
    from fact_ray.errors import TableError

    if fs.type_name == "local":
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        except OSError as e:
            raise TableError(f"cannot export to {shown}: {e.strerror}") from None
        if not stat.S_ISREG(st.st_mode):
            kind = ("a link" if stat.S_ISLNK(st.st_mode) else "a folder" if stat.S_ISDIR(st.st_mode)
                    else "a device or special file")
            raise TableError(f"cannot export to {shown}: it is {kind}, and export only writes or replaces a "
                             "regular file")
        return
    info = fs.get_file_info(path)
    if info.type not in (pafs.FileType.NotFound, pafs.FileType.File):
        raise TableError(f"cannot export to {shown}: it exists and is not a file")

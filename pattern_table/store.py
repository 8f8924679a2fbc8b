"""The pattern table store: append-only Parquet files over any `pyarrow.fs` URI.

Layout under the table's root URI::

    <root>/parts/arch=../policy=../rule=../<utc-time>-<uuid>.parquet   one file per commit (its partition)
    <root>/rows/<utc-time>-<uuid>.parquet   flat: older tables, and commits whose rows span partitions
    <root>/libs/<sha256>.so                 compiled libraries, content-addressed

Commit files are never rewritten; `fact-ray table compact` (`pattern_table.compact`) merges a partition's files
into one and retires them through a generation file, so the number of files stays small as nights accumulate
(`pattern_table.partition` says which files count, and why a reader never counts a row twice).

Why one file per commit: several writers (Ray table-writer actors on different nodes, two CLI runs) can commit
at once with no lock and no lost rows, on a local disk, NFS and object stores alike, and the whole history stays.

Atomicity: on file systems with a rename (local, NFS, HDFS) a file is written under a hidden temporary name in
the same folder (`.tmp-...`, which readers ignore) and then moved to its final name; on object stores (S3, GCS)
a single PUT of the final name is atomic by itself, so no rename is needed (and theirs would be copy + delete).
A reader therefore sees a commit whole or not at all. A file that is damaged anyway (a truncated copy, a disk
error) is skipped with a warning and listed in `damaged`; it never stops a read.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
import warnings
from datetime import datetime, timezone
from typing import Iterable, Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fact_ray.errors import TableError, first_line
from fact_ray.pattern_table import partition as part
from fact_ray.pattern_table import schema as sch
from fact_ray.pattern_table.export import export_rows, rows_to_table
from fact_ray.pattern_table.io import IO_ERRORS, normalise, resolve, write_atomic
from fact_ray.pattern_table.row import TableKey, TableRow
from fact_ray.pattern_table.truth import current

_HASH_RE = re.compile(r"^[0-9a-f]{64}$")


class PatternTable:
    """The store. Cheap to construct (touches nothing); pickles as its URI, so it can be sent to Ray actors.

    Reads cache what they parsed per file: files are immutable, so a later query reads only new names.
    """

    def __init__(self, uri: str) -> None:
        self.uri = normalise(uri)
        self._fs: pafs.FileSystem | None = None
        self._root = ""
        self._files: dict[str, tuple[TableRow, ...]] = {}  # relpath -> its rows
        self._live: list[str] = []  # relpaths that count (see partition.live_files), as of the last refresh
        self._key_cache: dict[tuple[str, TableKey], tuple[TableRow, ...]] = {}  # (relpath, key) -> its rows
        self._damaged: dict[str, str] = {}  # file uri -> reason

    def __reduce__(self):
        return (PatternTable, (self.uri,))

    def __repr__(self) -> str:
        return f"PatternTable({self.uri!r})"

    # ------------------------------------------------------------------ file system

    @property
    def fs(self) -> pafs.FileSystem:
        if self._fs is None:
            try:
                self._fs, self._root = resolve(self.uri)
            except (*IO_ERRORS, ValueError) as e:
                raise TableError(f"pattern table {self.uri}: cannot open ({first_line(e)})") from None
        return self._fs

    def _path(self, *parts: str) -> str:
        self.fs  # noqa: B018 -- resolves _root on first use
        return "/".join([self._root.rstrip("/"), *parts])

    def _uri_of(self, *parts: str) -> str:
        return "/".join([self.uri.rstrip("/"), *parts])

    # ------------------------------------------------------------------ writing

    def check_writable(self) -> None:
        """Fail fast, before any work, when the table cannot be written: one clear TableError line."""
        try:
            fs = self.fs
            for folder in ("rows", "parts", "libs"):
                fs.create_dir(self._path(folder), recursive=True)
                # A real write through the same path commits take; the probe's name is hidden from readers,
                # and it is removed so probes do not pile up.
                probe = f".probe-{uuid.uuid4().hex}"
                write_atomic(fs, self._path(folder, probe), b"")
                fs.delete_file(self._path(folder, probe))
        except TableError:
            raise
        except IO_ERRORS as e:
            raise TableError(f"pattern table {self.uri} is not writable: {first_line(e)}") from None

    def commit(self, rows: Sequence[TableRow] | Iterable[TableRow]) -> str:
        """Append `rows` as one new file, atomically. Returns its URI ('' when there was nothing to commit)."""
        rows = tuple(rows)
        if not rows:
            return ""
        for r in rows:
            if not isinstance(r, TableRow):
                raise TypeError(f"commit takes TableRow, got {type(r).__name__}")
        sink = pa.BufferOutputStream()
        pq.write_table(rows_to_table(rows), sink)
        data = sink.getvalue().to_pybytes()
        now = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        folder = part.commit_dir(rows)
        rel = f"{folder}/{now}-{uuid.uuid4().hex}.parquet"
        try:
            self.fs.create_dir(self._path(folder), recursive=True)
            write_atomic(self.fs, self._path(rel), data)
        except IO_ERRORS as e:
            raise TableError(f"pattern table {self.uri} is not writable: {first_line(e)}") from None
        self._files[rel] = rows
        return self._uri_of(rel)

    # ------------------------------------------------------------------ libraries

    def library_uri(self, digest: str) -> str:
        return self._uri_of("libs", f"{digest}.so")

    def put_library(self, data: bytes) -> str:
        """Store compiled library bytes under their sha256 and return their URI. Idempotent and atomic."""
        digest = hashlib.sha256(data).hexdigest()
        name = f"{digest}.so"
        try:
            fs = self.fs
            info = fs.get_file_info(self._path("libs", name))
            if info.type == pafs.FileType.File and info.size == len(data):
                return self.library_uri(digest)
            fs.create_dir(self._path("libs"), recursive=True)
            write_atomic(fs, self._path("libs", name), data)
        except IO_ERRORS as e:
            raise TableError(f"pattern table {self.uri}: cannot store library ({first_line(e)})") from None
        return self.library_uri(digest)

    def get_library(self, uri: str) -> bytes:
        """The bytes of a library stored by put_library (any table's URI). Checked against the hash in its name:
        a missing or damaged library is a TableError, never wrong bytes."""
        digest = uri.rsplit("/", 1)[-1].removesuffix(".so")
        if not _HASH_RE.match(digest):
            raise TableError(f"{uri} is not a library URI of the pattern table (no content hash in its name)")
        try:
            fs, path = resolve(uri)
            with fs.open_input_stream(path) as f:
                data = f.read()
        except (*IO_ERRORS, ValueError) as e:
            raise TableError(f"cannot read library {uri}: {first_line(e)}") from None
        if hashlib.sha256(data).hexdigest() != digest:
            raise TableError(f"library {uri} is damaged (its content does not match its hash)")
        return data

    def fetch_library(self, uri: str, dest_dir: str) -> str:
        """Copy a stored library to a local folder (for ctypes on a GPU node); returns the local path.
        Content-addressed: an existing, intact copy is reused; written with temp file + rename."""
        digest = uri.rsplit("/", 1)[-1].removesuffix(".so")
        path = os.path.join(dest_dir, f"{digest}.so")
        if os.path.isfile(path):
            with open(path, "rb") as f:
                if hashlib.sha256(f.read()).hexdigest() == digest:
                    return path
        data = self.get_library(uri)
        try:
            os.makedirs(dest_dir, exist_ok=True)
            tmp = os.path.join(dest_dir, f".tmp-{uuid.uuid4().hex}.so")
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:
            raise TableError(f"cannot write library to {dest_dir}: {first_line(e)}") from None
        return path

    # ------------------------------------------------------------------ reading

    @property
    def damaged(self) -> dict[str, str]:
        """Files (URI) and rows (URI#row<i>) skipped so far as damaged or unreadable here -> reason."""
        return dict(self._damaged)

    def forget(self) -> None:
        """Drop what was read (after a compaction replaced files: their names are gone for good)."""
        self._files.clear()
        self._key_cache.clear()
        self._live = []

    def _live_files(self, folders=None) -> list[str]:
        try:
            return part.live_files(self.fs, self._path(), folders)[1]
        except (*IO_ERRORS, ValueError, KeyError) as e:
            raise TableError(f"pattern table {self.uri} cannot be read: {first_line(e)}") from None

    def _refresh(self) -> None:
        self._live = self._live_files()
        for rel in self._live:
            where = self._uri_of(rel)
            if rel in self._files or where in self._damaged:
                continue
            self._files[rel] = self._read_file(self._path(rel), where)

    def _read_file(self, path: str, where: str, key: TableKey | None = None) -> tuple[TableRow, ...]:
        """The rows of one file (only those of `key` when given: the filter is pushed down to the Parquet reader,
        which skips row groups whose statistics rule the key out)."""
        try:
            dataset = ds.dataset(path, format="parquet", filesystem=self.fs)
            flt = None if key is None else _key_filter(key)
            table = dataset.to_table(filter=flt).replace_schema_metadata(dataset.schema.metadata)
            version = sch.file_version(table.schema)
            if version is None:
                raise pa.ArrowInvalid("no pattern table schema version in its metadata")
            table = sch.to_current(table, version, where)  # TableError: a version this fact-ray cannot read
            records = table.to_pylist()
        except TableError as e:
            # One foreign or newer file must not block every read of the table: it is skipped like a damaged one.
            reason = first_line(e)
            self._damaged[where] = reason
            warnings.warn(f"pattern table: skipping {where}: {reason}", stacklevel=2)
            return ()
        except (*IO_ERRORS, ValueError, KeyError) as e:
            reason = first_line(e)
            self._damaged[where] = reason
            warnings.warn(f"pattern table: skipping damaged file {where}: {reason}", stacklevel=2)
            return ()
        rows = []
        for i, rec in enumerate(records):
            try:
                row = TableRow.from_record(rec)
                row.config  # noqa: B018 -- parsed now, so a bad config_json is one skipped row, not a failed run
            except (TableError, ValueError, KeyError, TypeError) as e:
                reason = first_line(e)
                self._damaged[f"{where}#row{i}"] = reason
                warnings.warn(f"pattern table: skipping row {i} of {where}: {reason}", stacklevel=2)
                continue
            rows.append(row)
        return tuple(rows)

    def _ordered(self) -> list[TableRow]:
        """All rows, oldest first: by creation time, then commit file name, then order within the commit."""
        self._refresh()
        return _in_order((rel, self._files.get(rel, ())) for rel in self._live)

    def all_rows(self) -> list[TableRow]:
        return self._ordered()

    def history(self, key: TableKey) -> list[TableRow]:
        """Every row of `key`, any status, oldest first. Reads only the key's partition and the flat folder, and
        inside the partition only the rows of the key (a `pyarrow.dataset` filter on the key's columns, which also
        skips the row groups whose statistics rule the key out)."""
        files = self._live_files(part.key_folders(key))
        return _in_order((rel, self._key_rows(rel, key)) for rel in files)

    def _key_rows(self, rel: str, key: TableKey) -> tuple[TableRow, ...]:
        if rel in self._files:
            return tuple(r for r in self._files[rel] if key.matches(r))
        where = self._uri_of(rel)
        if where in self._damaged:
            return ()
        if not rel.startswith(part.PARTS + "/"):
            self._files[rel] = self._read_file(self._path(rel), where)  # flat files hold any key: read whole
            return self._key_rows(rel, key)
        cached = self._key_cache.get((rel, key))
        if cached is None:
            cached = self._key_cache[(rel, key)] = self._read_file(self._path(rel), where, key)
        return cached

    def top_k(self, key: TableKey, k: int) -> list[TableRow]:
        """The best `k` valid rows of `key` as it stands now: each kernel by its latest row, invalidated kernels
        never (see `truth.current`), then `rank`."""
        return rank(current(self.history(key)))[: max(k, 0)]

    def best(self, key: TableKey) -> TableRow | None:
        """The best valid row of `key`, or None when the table has none."""
        top = self.top_k(key, 1)
        return top[0] if top else None

    def is_empty(self) -> bool:
        """No rows at all (a first run): nothing can be served, so there is nothing to look up. Lists files only:
        a run asks this before anything else, and reading every night's rows for it would cost more than the run."""
        return not self._live_files()

    def keys(self, by_gpu: bool = False) -> list[TableKey]:
        """The distinct reuse keys, in order of first appearance (per GPU name when `by_gpu`)."""
        seen: dict[TableKey, None] = {}
        for r in self._ordered():
            k = r.key
            if not by_gpu:
                k = TableKey(k.match_key, k.policy, k.arch, k.toolchain, None)
            seen.setdefault(k, None)
        return list(seen)

    def find(self, text: str) -> list[TableRow]:
        """Rows whose match key or config name contains `text`, oldest first (for `fact-ray table show`)."""
        return [r for r in self._ordered() if text in r.match_key or text in r.config_name]

    def export(self, path_or_uri: str, format: str = "parquet") -> str:
        return export_rows(self.all_rows(), path_or_uri, format, table_uri=self.uri)


def _key_filter(key: TableKey) -> pc.Expression:
    """`key.matches` as an Arrow expression (the stored `toolchain` column is the fingerprint)."""
    flt = ((pc.field("match_key") == key.match_key) & (pc.field("policy") == key.policy.value)
           & (pc.field("arch") == key.arch.value) & (pc.field("toolchain") == key.toolchain))
    return flt if key.gpu_name is None else flt & (pc.field("gpu_name") == key.gpu_name)


def _in_order(files: Iterable[tuple[str, Sequence[TableRow]]]) -> list[TableRow]:
    """Rows oldest first: by creation time, then file relpath, then order within the file."""
    seq = [(r.created_at, rel, i, r) for rel, rows in files for i, r in enumerate(rows)]
    seq.sort(key=lambda t: t[:3])
    return [t[3] for t in seq]


def rank(rows: Iterable[TableRow]) -> list[TableRow]:
    """Valid rows (status ok, timed), best first.

    Within one GPU: lowest median time, ties broken by the newest row. When the rows span several GPU names,
    absolute times are not comparable (measuring.md), so the order is by speedup over the PyTorch op measured
    side by side on each GPU (highest first), then median, then newest. A row with no GPU name (a v1 row)
    counts as a GPU of its own: nothing says its times are comparable.
    """
    indexed = [(i, r) for i, r in enumerate(rows) if r.valid]
    mixed = len({r.gpu_name for _, r in indexed}) > 1

    def order(item: tuple[int, TableRow]):
        i, r = item
        newest = (-r.created_at.timestamp(), -i)
        if mixed:
            sp = r.speedup if r.speedup is not None else float("-inf")
            return (-sp, r.median_ms, *newest)
        return (r.median_ms, *newest)

    return [r for _, r in sorted(indexed, key=order)]

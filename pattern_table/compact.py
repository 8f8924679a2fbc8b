"""`fact-ray table compact`: merge each partition's small commit files into one, losing no row and counting none
twice, whatever point a crash stops it at.

Steps (see `partition` for why each reader state is consistent):

1. read the generation and the live files; group every live row by partition (rows of flat `rows/` files move
   into their partitions);
2. per partition with more than one file (or flat rows): write one compacted file (`c-...parquet`, atomic), read it
   back and check its row count and content hash against the inputs', else delete it and stop;
3. write the next generation: the new compacted files count, their inputs are replaced (one atomic write: the only
   step that changes what readers see);
4. delete the replaced inputs, and compacted files no generation lists that are older than an hour (left by a
   compaction that crashed before step 3: they never counted).

A crash before 3 leaves inputs that still count and compacted files that do not; after 3, compacted files that
count and inputs that do not, whether or not they were deleted yet. Run one compaction at a time per table (the
nightly job runs it once after its commits); commits may go on meanwhile: files written after step 1 are not inputs
and keep counting.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from fact_ray.errors import TableError, first_line
from fact_ray.pattern_table import partition as part
from fact_ray.pattern_table import schema as sch
from fact_ray.pattern_table.io import IO_ERRORS, write_atomic

ORPHAN_AGE = timedelta(hours=1)


@dataclass(frozen=True)
class CompactReport:
    generation: int
    partitions: int  # partitions compacted
    files_in: int  # files merged (and replaced)
    files_out: int
    rows: int  # rows in the compacted files (equal to the rows of the inputs, or nothing was committed)
    deleted: int  # replaced files and orphans removed
    skipped: tuple[str, ...] = ()  # inputs left as they were (unreadable: damaged or from a newer fact-ray)


def content_hash(records: list[dict[str, Any]]) -> str:
    """An order-free hash of rows' contents: equal for the same multiset of rows."""
    lines = sorted(json.dumps(r, sort_keys=True, default=str) for r in records)
    h = hashlib.sha256()
    for line in lines:
        h.update(line.encode())
        h.update(b"\n")
    return h.hexdigest()


def _records(fs: pafs.FileSystem, path: str, where: str) -> list[dict[str, Any]]:
    with fs.open_input_file(path) as f:
        table = pq.read_table(f)
    version = sch.file_version(table.schema)
    if version is None:
        raise pa.ArrowInvalid("no pattern table schema version in its metadata")
    return sch.to_current(table, version, where).to_pylist()


# Rows per row group of a compacted file: sorted by match key, so a key lookup's filter skips most groups.
ROW_GROUP = 1024


def _encode(records: list[dict[str, Any]]) -> bytes:
    meta = {**sch.metadata(), b"fact_ray.compacted": b"1"}
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pylist(records, schema=sch.SCHEMA.with_metadata(meta)), sink,
                   row_group_size=ROW_GROUP)
    return sink.getvalue().to_pybytes()


def _partition_of_record(rec: dict[str, Any]) -> str:
    return part.partition_dir(rec["arch"], rec["policy"], rec["rule"])


def compact(table, on_step: Callable[[str, str], None] | None = None) -> CompactReport:
    """Compact `table` (a PatternTable). `on_step(step, relpath)` is called after each durable step ("written",
    "generation", "deleted"): the crash tests stop the process there."""
    step = on_step or (lambda _s, _p: None)
    fs, root = table.fs, table._path()
    try:
        gen, files = part.live_files(fs, root)
        by_part: dict[str, list[tuple[Any, str, int, dict[str, Any]]]] = {}
        sources: dict[str, set[str]] = {}
        skipped: list[str] = []
        for rel in files:
            try:
                recs = _records(fs, f"{root}/{rel}", table._uri_of(rel))
            except (TableError, *IO_ERRORS, ValueError, KeyError) as e:
                skipped.append(f"{rel}: {first_line(e)}")
                continue
            for i, rec in enumerate(recs):
                p = _partition_of_record(rec)
                by_part.setdefault(p, []).append((rec["created_at"], rel, i, rec))
                sources.setdefault(p, set()).add(rel)
        # A partition is worth merging when its rows are in more than one file or in the flat folder.
        todo = {p: rows for p, rows in by_part.items()
                if len(sources[p]) > 1 or any(not s.startswith(part.PARTS + "/") for s in sources[p])}
        # A flat file is replaced only when every partition it feeds is merged here (all of them are: any flat row
        # makes its partition due), so none of its rows is dropped.
        inputs = sorted({s for p in todo for s in sources[p]})
        written: list[str] = []
        n_rows = 0
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        for p, rows in sorted(todo.items()):
            rows.sort(key=lambda t: (t[3]["match_key"], *t[:3]))  # by key, then in history order
            recs = [t[3] for t in rows]
            rel = f"{p}/{part.COMPACTED_PREFIX}{stamp}-{uuid.uuid4().hex}.parquet"
            fs.create_dir(f"{root}/{p}", recursive=True)
            write_atomic(fs, f"{root}/{rel}", _encode(recs))
            written.append(rel)
            back = _records(fs, f"{root}/{rel}", table._uri_of(rel))
            if len(back) != len(recs) or content_hash(back) != content_hash(recs):
                _delete_all(fs, root, written)
                raise TableError(f"compaction of {table.uri}/{p}: the merged file does not read back as its "
                                 f"{len(recs)} input rows; nothing was changed")
            n_rows += len(recs)
            step("written", rel)
        if not written:
            deleted = _sweep(fs, root, gen, step)
            return CompactReport(gen.number, 0, 0, 0, 0, deleted, tuple(skipped))
        new = part.Generation(
            gen.number + 1,
            compacted=(gen.compacted - set(inputs)) | set(written),
            # Replaced files of earlier generations stay listed until they are gone from disk (the sweep checks).
            replaced=gen.replaced | set(inputs),
        )
        part.write_generation(fs, root, new)
        step("generation", part._gen_name(new.number))
        deleted = _sweep(fs, root, new, step)
    except IO_ERRORS as e:
        raise TableError(f"cannot compact the pattern table {table.uri}: {first_line(e)}") from None
    table.forget()
    return CompactReport(new.number, len(written), len(inputs), len(written), n_rows, deleted, tuple(skipped))


def _delete_all(fs: pafs.FileSystem, root: str, rels: list[str]) -> None:
    for rel in rels:
        try:
            fs.delete_file(f"{root}/{rel}")
        except IO_ERRORS:
            pass  # a compacted file no generation lists never counts; the next sweep removes it


def _sweep(fs: pafs.FileSystem, root: str, gen: part.Generation, step: Callable[[str, str], None]) -> int:
    """Delete what `gen` says no longer counts; then write a generation whose replaced list holds only what is
    still on disk, so the list does not grow night after night."""
    deleted = 0
    present = {p for folder, rec in ((part.ROWS, False), (part.PARTS, True))
               for p in part._parquet_files(fs, root, folder, rec)}
    for rel in sorted(gen.replaced & present):
        try:
            fs.delete_file(f"{root}/{rel}")
            deleted += 1
            step("deleted", rel)
        except IO_ERRORS:
            continue
    cutoff = datetime.now(timezone.utc) - ORPHAN_AGE
    for rel in sorted(p for p in present if part.is_compacted(p) and p not in gen.compacted):
        info = fs.get_file_info(f"{root}/{rel}")
        if info.mtime is not None and info.mtime.astimezone(timezone.utc) < cutoff:
            try:
                fs.delete_file(f"{root}/{rel}")
                deleted += 1
            except IO_ERRORS:
                pass
    still = {p for folder, rec in ((part.ROWS, False), (part.PARTS, True))
             for p in part._parquet_files(fs, root, folder, rec)}
    if gen.number and (gen.replaced - still):
        tidy = part.Generation(gen.number + 1, gen.compacted, gen.replaced & still)
        part.write_generation(fs, root, tidy)
        part.prune_generations(fs, root, keep_from=tidy.number - 1)
    return deleted

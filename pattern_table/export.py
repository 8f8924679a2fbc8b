"""Export of table rows to one file: Parquet (same schema and version metadata as the table), CSV or JSON lines.

The target is a local path or any `pyarrow.fs` URI; it is written whole or not at all (temp name + move, or one
PUT on object stores), so an interrupted export never leaves a half file under the requested name.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Sequence

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from fact_ray.errors import TableError, first_line
from fact_ray.pattern_table import schema as sch
from fact_ray.pattern_table.io import IO_ERRORS, is_uri, normalise, refuse_unsafe_target, resolve, write_atomic
from fact_ray.pattern_table.row import TableRow

FORMATS = ("parquet", "csv", "jsonl")


def rows_to_table(rows: Sequence[TableRow]) -> pa.Table:
    """Rows as an Arrow table in the current schema, with the version metadata."""
    return pa.Table.from_pylist([r.to_record() for r in rows], schema=sch.SCHEMA.with_metadata(sch.metadata()))


def _jsonl(rows: Sequence[TableRow]) -> bytes:
    def enc(v):
        return v.isoformat() if isinstance(v, datetime) else v

    lines = [json.dumps({k: enc(v) for k, v in r.to_record().items()}, sort_keys=True) for r in rows]
    return ("\n".join(lines) + ("\n" if lines else "")).encode()


def encode(rows: Sequence[TableRow], format: str) -> bytes:
    if format not in FORMATS:
        raise TableError(f"unknown export format {format!r}: choose one of {', '.join(FORMATS)}")
    if format == "jsonl":
        return _jsonl(rows)
    sink = pa.BufferOutputStream()
    if format == "parquet":
        pq.write_table(rows_to_table(rows), sink)
    else:
        pacsv.write_csv(rows_to_table(rows), sink)
    return sink.getvalue().to_pybytes()


def export_rows(rows: Sequence[TableRow], path_or_uri: str, format: str = "parquet", *,
                table_uri: str = "") -> str:
    """Write `rows` to `path_or_uri` in `format`; returns where it wrote. Refuses a target that exists and is not
    a regular file, and one inside `table_uri` (the table would read the export as more rows)."""
    from fact_ray.redact import redact

    target = normalise(path_or_uri)
    shown = redact(target)
    if table_uri:
        root = os.path.realpath(table_uri) if not is_uri(table_uri) else normalise(table_uri)
        where = os.path.realpath(target) if not is_uri(target) else target
        if where == root or where.startswith(root.rstrip("/") + "/"):
            raise TableError(f"cannot export to {shown}: it is inside the pattern table {redact(table_uri)} (its "
                             "rows would be read back as new rows); choose a path outside it")
    data = encode(rows, format)
    try:
        fs, path = resolve(target)
        refuse_unsafe_target(fs, path, shown)
        parent = path.rsplit("/", 1)[0]
        if parent:
            fs.create_dir(parent, recursive=True)
        write_atomic(fs, path, data)
    except (*IO_ERRORS, ValueError) as e:
        raise TableError(f"cannot export the pattern table to {shown}: {redact(first_line(e))}") from None
    return target

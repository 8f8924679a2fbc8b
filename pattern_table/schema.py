"""The Arrow schema of the pattern table, its versions, and how older files are read.

Every Parquet file the table writes carries its schema version in the file's key-value metadata
(`fact_ray.schema_version`). Readers accept:

- the current version (``SCHEMA_VERSION``) as is;
- an older version that has a documented upgrade in ``_UPGRADES`` (read, then upgraded in memory: the file on
  disk is never rewritten, history stays as it was written);
- nothing newer: a file from a newer fact-ray is refused with a `TableError` naming both versions, because
  guessing the meaning of columns we do not know would silently mix incompatible rows.

Version history
---------------
v1  The first layout: one timing per row (median only, no p10/p90 spread on either the candidate or the
    baseline), no max abs error, no GPU name, no host, and no library storage (no content hash, no URI, no
    symbol: GPU nodes rebuilt the kernel from its config).
v2  Adds `gpu_name`, `p10_ms`, `p90_ms`, `baseline_p10_ms`, `baseline_p90_ms`, `max_abs_err`, `library_hash`,
    `library_uri`, `library_symbol` and `host`. Upgrade from v1: the new columns are null. Every key column
    (match key, policy, arch, toolchain) already existed in v1, so upgraded rows keep matching the same keys
    and stay reusable; a null library URI tells the farm to rebuild from the config.
v3  Adds `driver`, `cublas` and `cudnn` (recorded, not keyed), and `cuda_version` holds nvcc's parsed version
    ("13.0.88") where v2 writers stored the banner line naming it ("Cuda compilation tools, release 13.0,
    V13.0.88"). Upgrade from v1/v2: the new columns are null and the banner line is read as the version it names,
    so a v2 row matches the key the same host builds now (a value that names no version is kept as it was).
"""

from __future__ import annotations

from typing import Callable

import pyarrow as pa

from fact_ray.errors import TableError
from fact_ray.toolchain import parse_nvcc_version

SCHEMA_VERSION = 3
VERSION_KEY = b"fact_ray.schema_version"
KIND_KEY = b"fact_ray.kind"
KIND = b"pattern_table"

_TS = pa.timestamp("us", tz="UTC")

# Key columns first (what makes a row reusable), then what was chosen, how it measured, and where it came from.
SCHEMA = pa.schema(
    [
        pa.field("rule", pa.string(), nullable=False),
        pa.field("match_key", pa.string(), nullable=False),
        pa.field("shape_signature", pa.string(), nullable=False),
        pa.field("dtype", pa.string(), nullable=False),
        pa.field("policy", pa.string(), nullable=False),
        pa.field("arch", pa.string(), nullable=False),
        pa.field("gpu_name", pa.string()),
        pa.field("cuda_version", pa.string(), nullable=False),
        pa.field("cutlass_version", pa.string(), nullable=False),
        pa.field("torch_version", pa.string(), nullable=False),
        pa.field("bench_method", pa.string(), nullable=False),
        # Derived from the four columns above; stored so that exports and outside tools can group by it.
        pa.field("toolchain", pa.string(), nullable=False),
        pa.field("config_json", pa.string()),  # null: the PyTorch op stays
        pa.field("config_name", pa.string(), nullable=False),
        pa.field("library_key", pa.string()),
        pa.field("library_hash", pa.string()),
        pa.field("library_uri", pa.string()),
        pa.field("library_symbol", pa.string()),
        pa.field("median_ms", pa.float64()),
        pa.field("p10_ms", pa.float64()),
        pa.field("p90_ms", pa.float64()),
        pa.field("reps", pa.int64()),
        pa.field("baseline_median_ms", pa.float64()),
        pa.field("baseline_p10_ms", pa.float64()),
        pa.field("baseline_p90_ms", pa.float64()),
        pa.field("speedup", pa.float64()),
        pa.field("rel_err", pa.float64()),
        pa.field("max_abs_err", pa.float64()),
        pa.field("tflops", pa.float64()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("run_id", pa.string()),
        pa.field("created_at", _TS, nullable=False),
        pa.field("host", pa.string()),
        pa.field("driver", pa.string()),
        pa.field("cublas", pa.string()),
        pa.field("cudnn", pa.string()),
    ]
)

# The columns v2 added; in a v1 file they are absent and read as nulls.
V2_ADDED = (
    "gpu_name", "p10_ms", "p90_ms", "baseline_p10_ms", "baseline_p90_ms", "max_abs_err",
    "library_hash", "library_uri", "library_symbol", "host",
)


def metadata() -> dict[bytes, bytes]:
    """Key-value metadata every file written now carries."""
    return {VERSION_KEY: str(SCHEMA_VERSION).encode(), KIND_KEY: KIND}


def file_version(schema: pa.Schema) -> int | None:
    """The schema version a file declares, or None when it declares none (not one of ours)."""
    meta = schema.metadata or {}
    raw = meta.get(VERSION_KEY)
    if raw is None:
        return None
    try:
        return int(raw.decode())
    except ValueError:
        return None


def _fill_missing(table: pa.Table) -> pa.Table:
    """Add every current column the table lacks as nulls (the documented v1 -> v2 upgrade)."""
    for f in SCHEMA:
        if f.name not in table.column_names:
            table = table.append_column(f.name, pa.nulls(table.num_rows, type=f.type))
    return table


def _nvcc_version_of(value: str) -> str:
    try:
        return parse_nvcc_version(value)
    except ValueError:
        return value  # not a version (a path some v2 writers could store): it matches no key, and is kept


def _to_v3(table: pa.Table) -> pa.Table:
    """v1/v2 -> v3: the new columns as nulls, and `cuda_version` as the version its banner line names."""
    table = _fill_missing(table)
    i = table.column_names.index("cuda_version")
    cuda = [None if v is None else _nvcc_version_of(v) for v in table.column(i).to_pylist()]
    return table.set_column(i, "cuda_version", pa.array(cuda, type=pa.string()))


_UPGRADES: dict[int, Callable[[pa.Table], pa.Table]] = {1: _to_v3, 2: _to_v3}


def to_current(table: pa.Table, version: int, where: str) -> pa.Table:
    """The file's table in the current schema: upgraded from an older version, or refused.

    Raises TableError for a newer version, or an older one without an upgrade; ValueError-family Arrow errors
    (a column of the wrong type, a null where none is allowed) propagate to the caller, which treats the file
    as damaged.
    """
    if version > SCHEMA_VERSION:
        raise TableError(
            f"{where} has pattern table schema v{version}, newer than v{SCHEMA_VERSION} that this fact-ray "
            f"reads: upgrade fact-ray"
        )
    if version < SCHEMA_VERSION:
        upgrade = _UPGRADES.get(version)
        if upgrade is None:
            raise TableError(
                f"{where} has pattern table schema v{version}, which this fact-ray (v{SCHEMA_VERSION}) "
                f"cannot upgrade"
            )
        table = upgrade(table)
    missing = [f.name for f in SCHEMA if f.name not in table.column_names]
    if missing:
        raise pa.ArrowInvalid(f"missing columns {missing}")
    # Select in schema order (extra columns are ignored) and cast, which also checks non-null columns.
    return table.select(SCHEMA.names).cast(SCHEMA)

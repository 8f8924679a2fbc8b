"""The pattern table: verified winners (and the trials behind them) on Arrow storage, shared across runs.

Importing this package has no side effects; a store touches its URI only when used.

    table = PatternTable("s3://bucket/fact-ray/table")   # or a local path (the default .fact-ray/pattern_table)
    table.check_writable()                                 # fail fast, before any tuning work
    table.commit([row_from_winner(winner, match, RowContext(toolchain, run_id, gpu_name, host))])
    table.best(TableKey.of(match.key, policy, arch, toolchain))

See `row` for what makes a winner reusable, `schema` for the versions, `store` for layout and atomicity.
"""

from fact_ray.pattern_table.export import FORMATS, export_rows, rows_to_table
from fact_ray.pattern_table.row import (
    RowContext,
    TableKey,
    TableRow,
    Toolchain,
    config_from_json,
    config_to_json,
    row_from_trial,
    row_from_winner,
)
from fact_ray.pattern_table.schema import SCHEMA, SCHEMA_VERSION
from fact_ray.pattern_table.store import PatternTable, rank
from fact_ray.pattern_table.view import format_rows

__all__ = [
    "FORMATS", "PatternTable", "RowContext", "SCHEMA", "SCHEMA_VERSION", "TableKey", "TableRow", "Toolchain",
    "config_from_json", "config_to_json", "export_rows", "format_rows", "rank", "row_from_trial",
    "row_from_winner", "rows_to_table",
]

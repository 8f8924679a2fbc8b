"""The single table writer of a run: one actor commits every row and stores every winning library.

One writer per run keeps the commits of a run in a known order (one file per pattern) and leaves one process
holding the table's file-system client. The store itself is safe for several writers (each commit is its own
file), so a writer of another run, or a CLI beside it, loses nothing.

The actor runs on the driver's node (the farm pins it there) so that a local-path table means the driver's disk,
as the user who typed the path expects.
"""

from __future__ import annotations

from typing import Sequence

import ray

from fact_ray.pattern_table import PatternTable, TableRow


@ray.remote(num_cpus=0, max_restarts=0)
class TableWriter:
    def __init__(self, uri: str) -> None:
        self._table = PatternTable(uri)
        self._commits: list[str] = []

    def check_writable(self) -> None:
        self._table.check_writable()

    def put_library(self, data: bytes) -> str:
        """Store a compiled library's bytes (content-addressed, idempotent); returns its URI."""
        return self._table.put_library(data)

    def commit(self, rows: Sequence[TableRow]) -> str:
        uri = self._table.commit(rows)
        if uri:
            self._commits.append(uri)
        return uri

    def commits(self) -> list[str]:
        return list(self._commits)

"""Readable views of table rows for the CLI (`fact-ray table list|show`)."""

from __future__ import annotations

from typing import Sequence

from rich.markup import escape
from rich.table import Table

from fact_ray.pattern_table.row import TableRow


def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.4g}"


def _spread(r: TableRow) -> str:
    if r.median_ms is None:
        return "-"
    if r.p10_ms is None or r.p90_ms is None:
        return _ms(r.median_ms)
    return f"{_ms(r.median_ms)} [{_ms(r.p10_ms)}-{_ms(r.p90_ms)}]"


def format_rows(rows: Sequence[TableRow], title: str | None = "pattern table") -> Table:
    """A rich Table with one line per row: what was tuned, under which key, what won, and how it measured."""
    t = Table(title=title, show_lines=False)
    for col, kw in (
        ("rule", {}), ("shapes", {}), ("dtype", {}), ("policy", {}), ("arch", {}), ("gpu", {}),
        ("toolchain", {}), ("kernel", {"overflow": "fold"}), ("status", {}),
        (escape("ms [p10-p90]"), {"justify": "right"}), ("torch ms", {"justify": "right"}),
        ("speedup", {"justify": "right"}), ("rel err", {"justify": "right"}), ("when (UTC)", {}),
    ):
        t.add_column(col, **kw)
    for r in rows:
        kernel = r.config_name if r.config_json is not None else f"{r.config_name} (PyTorch op)"
        cells = (
            r.rule, r.shape_signature, r.dtype, r.policy.value, r.arch.value, r.gpu_name or "-",
            r.toolchain.fingerprint[:8], kernel, r.status if not r.error else f"{r.status}: {r.error}",
            _spread(r), _ms(r.baseline_median_ms),
            "-" if r.speedup is None else f"{r.speedup:.2f}x",
            "-" if r.rel_err is None else f"{r.rel_err:.1e}",
            r.created_at.strftime("%Y-%m-%d %H:%M:%S"),
        )
        # Escaped: names, errors and spreads contain brackets that rich would take for markup.
        t.add_row(*(escape(c) for c in cells))
    return t

"""Matches for people (a rich table) and for programs (--json)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

from fact_ray.types import Match, to_jsonable


def format_seconds(s: float) -> str:
    if s >= 1.0:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.2f} ms"
    if s >= 1e-6:
        return f"{s * 1e6:.1f} µs"
    return f"{s * 1e9:.1f} ns"


def _nodes_cell(m: Match) -> str:
    if len(m.nodes) == 1:
        return f"1: {m.nodes[0]}"
    return f"{len(m.nodes)}: {m.nodes[0]} … {m.nodes[-1]}"


def _shapes_cell(m: Match) -> str:
    return ", ".join("x".join(str(d) for d in s) if s else "scalar" for s in m.shapes)


def format_matches(matches: list[Match], title: str | None = None) -> Table:
    """One row per match in the given (ranked) order; measured times are marked."""
    measured = any(m.measured for m in matches)
    table = Table(title=title)
    for col, justify in (("#", "right"), ("rule", "left"), ("family", "left"), ("nodes", "left"),
                         ("shapes", "left"), ("dtype", "left"),
                         ("time (measured)" if measured else "est. time", "right"), ("share", "right")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    from fact_ray.discover.rules import NOT_REALIZED

    for i, m in enumerate(matches, 1):
        family = f"{m.family} (not realized yet)" if m.family in NOT_REALIZED else m.family
        table.add_row(str(i), m.rule, family, _nodes_cell(m), _shapes_cell(m), m.dtype,
                      format_seconds(m.est_time_s), f"{100 * m.share:.1f}%")
    return table


def _params_json(params: tuple[tuple[str, Any], ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in params:
        if k == "operands":
            v = dict(v)
        out[k] = to_jsonable(v)
    return out


def matches_to_json(matches: list[Match]) -> list[dict[str, Any]]:
    """JSON-ready dicts, in rank order; params (operands included) as objects, plus the table key."""
    out = []
    for i, m in enumerate(matches, 1):
        out.append({
            "rank": i, "rule": m.rule, "family": m.family, "anchor": m.anchor, "nodes": list(m.nodes),
            "params": _params_json(m.params), "dtype": m.dtype, "shapes": [list(s) for s in m.shapes],
            "flops": m.flops, "bytes": m.bytes, "est_time_s": m.est_time_s, "share": m.share,
            "measured": m.measured, "key": m.key,
        })
    return out

"""The night's report as files a person opens and a scheduler reads: JSON, text, PNG and HTML; and the webhook.

    <out>/night.json   everything (`NightReport.to_json`), what tools and the webhook consumer read
    <out>/night.txt    the printed table
    <out>/night.png    per model and pattern: speedup over the PyTorch op tonight beside the previous night's
    <out>/night.html   one self-contained page: the summary line, the table (regressions in red), the PNG inlined

Every file is written under a temporary name and moved into place, so a half-written report never stands in for
a night's. The webhook gets the summary (a POST of JSON); one that fails is a note in the report, never a lost night.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from fact_ray.nightly import NightReport


@dataclass(frozen=True)
class NightFiles:
    json: Path
    text: Path
    png: Path | None  # None where matplotlib is not installed (said in the text and HTML)
    html: Path


def _num(v: float | None, fmt: str, unit: str = "") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:{fmt}}{unit}"


def rows(report: NightReport) -> list[dict[str, str]]:
    """One row per model, policy and pattern, with what a person compares."""
    out = []
    for m in report.models:
        if m.failed:
            out.append({"model": m.model, "policy": m.policy, "pattern": "-", "winner": "-", "tonight ms": "-",
                        "previous ms": "-", "change": "-", "PyTorch ms": "-", "speedup": "-", "rel err": "-",
                        "changed": "-", "flag": f"FAILED: {m.failed}"})
            continue
        for v in m.verdicts:
            flags = [f for f, on in (("REGRESSION", v.regressed), ("INVALIDATED", v.invalidated),
                                     ("re-verified", bool(v.reverified))) if on]
            out.append({"model": m.model, "policy": m.policy, "pattern": f"{v.rule} {v.shapes}",
                        "winner": v.winner, "tonight ms": _num(v.winner_ms, ".4g"),
                        "previous ms": _num(v.previous_ms, ".4g"),
                        "change": _num(v.change_vs_previous * 100 if v.change_vs_previous == v.change_vs_previous
                                       else math.nan, "+.1f", " %"),
                        "PyTorch ms": _num(v.baseline_ms, ".4g"), "speedup": _num(v.speedup, ".2f", "x"),
                        "rel err": _num(v.rel_err, ".1e"), "changed": "yes" if v.changed else "",
                        "flag": " ".join(flags) + (f" ({v.note})" if v.note and flags else "")})
    return out


def text(report: NightReport) -> str:
    from rich.console import Console
    from rich.table import Table

    con = Console(width=200, record=True, file=open(os.devnull, "w"))
    con.print(report.summary_line(), markup=False)
    body = rows(report)
    if body:  # none on a night that measured nothing: the notes below say why
        t = Table()
        for c in body[0]:
            t.add_column(c, overflow="fold")
        for r in body:
            t.add_row(*r.values())
        con.print(t)
    for m in report.models:
        for n in m.notes:
            con.print(f"{m.model} {m.policy}: {n}", markup=False)
    for n in report.notes:
        con.print(f"note: {n}", markup=False)
    return con.export_text()


def _png(report: NightReport) -> bytes | None:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        return None
    labels, now, prev, bad = [], [], [], []
    for m in report.models:
        for v in m.verdicts:
            labels.append(f"{m.model} {m.policy}\n{v.rule}")
            now.append(v.speedup if v.speedup == v.speedup else 0.0)
            prev.append(v.previous_speedup if v.previous_speedup == v.previous_speedup else 0.0)
            bad.append(v.regressed or v.invalidated)
    fig = Figure(figsize=(max(6.0, 0.9 * len(labels) + 2), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    xs = range(len(labels))
    ax.bar([x - 0.2 for x in xs], prev, width=0.4, label="previous night", color="#9aa7b8")
    ax.bar([x + 0.2 for x in xs], now, width=0.4, label="tonight",
           color=["#d62728" if b else "#2c7fb8" for b in bad])
    ax.axhline(1.0, color="black", linewidth=0.8, linestyle="--")
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("speedup over the PyTorch op")
    ax.set_title(f"{report.fleet} {report.night} (red: regression or invalidated)")
    ax.legend()
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    return buf.getvalue()


def _html(report: NightReport, png: bytes | None) -> str:
    body = rows(report)
    cols = list(body[0]) if body else []
    head = "".join(f"<th>{html.escape(c)}</th>" for c in cols)
    trs = []
    for r in body:
        cls = ' class="bad"' if r["flag"].startswith(("REGRESSION", "INVALIDATED", "FAILED")) else ""
        trs.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(r[c])}</td>" for c in cols) + "</tr>")
    img = (f'<img alt="speedups" src="data:image/png;base64,{base64.b64encode(png).decode()}">' if png
           else "<p>(no plot: matplotlib is not installed)</p>")
    notes = "".join(f"<li>{html.escape(f'{m.model} {m.policy}: {n}')}</li>" for m in report.models for n in m.notes)
    notes += "".join(f"<li>{html.escape(n)}</li>" for n in report.notes)
    state = "clean" if report.clean else "alert"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>fact-ray {html.escape(report.fleet)} {report.night}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;font-size:13px}} tr.bad td{{background:#fdd}}
.clean{{color:#2a7}} .alert{{color:#c22}}</style></head>
<body><h1>fact-ray night {report.night}: fleet {html.escape(report.fleet)}</h1>
<p class="{state}"><b>{html.escape(report.summary_line())}</b></p>
<table><tr>{head}</tr>{''.join(trs)}</table>
{img}
<ul>{notes}</ul>
<p>threshold {report.threshold:.0%}; exit code {report.exit_code}</p></body></html>
"""


def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write(report: NightReport, out_dir: str | os.PathLike) -> NightFiles:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    png = _png(report)
    files = NightFiles(json=out / "night.json", text=out / "night.txt", png=out / "night.png" if png else None,
                       html=out / "night.html")
    _write(files.json, (json.dumps(report.to_json(), indent=2) + "\n").encode())
    _write(files.text, text(report).encode())
    if png:
        _write(files.png, png)
    _write(files.html, _html(report, png).encode())
    return files


def post_webhook(url: str, report: NightReport, timeout_s: float = 10.0) -> str:
    """POST the night's summary as JSON; "" on success, else the one-line reason (the caller keeps it as a note)."""
    payload = {"text": report.summary_line(), "fleet": report.fleet, "night": report.night, "clean": report.clean,
               "exit_code": report.exit_code,
               "regressions": [{"model": m, "pattern": f"{v.rule} {v.shapes}", "note": v.note}
                               for m, v in report.regressions],
               "invalidated": [{"model": m, "pattern": f"{v.rule} {v.shapes}", "note": v.note}
                               for m, v in report.invalidations],
               "failed": [{"model": m.model, "policy": m.policy, "error": m.failed} for m in report.failures]}
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            if not 200 <= r.status < 300:
                return f"webhook {url} answered HTTP {r.status}"
    except (urllib.error.URLError, OSError, ValueError) as e:
        from fact_ray.errors import first_line

        return f"webhook {url} failed: {first_line(e, named=False)}"
    return ""

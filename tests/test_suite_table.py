"""benchmarks/suite.py's table from bench results (the GPU runs write them; the summary is plain arithmetic)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

from fact_ray import bench as bn
from fact_ray.types import Precision, TimeStats

_spec = importlib.util.spec_from_file_location("suite", Path(__file__).resolve().parents[1] / "benchmarks" / "suite.py")
suite = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(suite)


def result(model: str, eager_ms: float, **ups: float) -> bn.BenchResult:
    rows = [bn.VariantRow("eager", bn.OK, time=TimeStats(eager_ms, eager_ms, eager_ms, 5), speedup=1.0)]
    for name, up in ups.items():
        rows.append(bn.VariantRow(name.replace("_", "-").replace("plus", "+"), bn.OK,
                                  time=TimeStats(eager_ms / up, eager_ms / up, eager_ms / up, 5), speedup=up,
                                  rel_err=1e-3 if name.startswith("composed") else 1e-4, kernels=3))
    return bn.BenchResult(model=model, model_ref=f"{model}.py", policy=Precision.BF16, gpu="H200", versions=(),
                          artifact="", reps=5, warmup=1, tolerance=2e-2, allclose_tol=1e-2, created_at="t",
                          rows=tuple(rows))


def test_suite_table_geomean_over_the_best_compile_mode(tmp_path):
    (tmp_path / "bench").mkdir()
    for r in (result("a", 1.0, compile_default=1.2, compile_max_autotune=1.5, composed=1.1, composedpluscompile=1.8),
              result("b", 2.0, compile_default=2.0, composed=0.9)):
        (tmp_path / "bench" / f"bench-{r.model}.json").write_text(json.dumps(bn.to_json(r)))
    summary = suite.collect(tmp_path, {"a": 4096}, {"c": "run: error: no GPU"})
    a, b, c = summary["rows"]
    assert a["best_composed"] == "composed+compile" and a["best_compile"] == "compile-max-autotune"
    assert a["composed_over_best_compile"] == pytest.approx(1.2) and a["tokens"] == 4096
    assert b["composed_over_best_compile"] == pytest.approx(0.45) and c == {"model": "c", "error": "run: error: no GPU"}
    assert summary["geomean_composed_over_best_compile"] == pytest.approx(math.sqrt(1.2 * 0.45))
    assert summary["models_below_eager"] == ["b", "c"]
    text = suite.markdown(summary)
    assert "| a | bf16 | 4096 | 1 | 1.20x | 1.50x | 1.10x | 1.80x | - | 1.20x |" in text

"""Real table rows for the fault tests (the same shapes as tests/test_pattern_table.py's)."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from fact_ray.pattern_table import RowContext, TableKey, TableRow, Toolchain, row_from_trial
from fact_ray.types import Arch, KernelConfig, Match, Precision, TimeStats, Trial

TC = Toolchain(cuda="13.0", cutlass="4.2.0", torch="2.13.0", bench_method="1")
T0 = datetime(2026, 5, 1, 12, 0, 0, tzinfo=timezone.utc)
MATCH = Match(rule="linear", family="gemm", nodes=("linear",), anchor="linear",
              params=(("M", 64), ("N", 128), ("K", 256)), dtype="float32", shapes=((64, 256), (128, 256)))
KEY = TableKey.of(MATCH.key, "fp32", "sm80", TC)


def config(name: str) -> KernelConfig:
    return KernelConfig(template="sm80_gemm", name=name, arch=Arch.SM80, precision=Precision.FP32, element="float",
                        opclass="simt", math_op="multiply_add", instruction=(1, 1, 1), tile=(128, 128, 8),
                        warps=(4, 2, 1), stages=3, alignment=(1, 1, 1))


def row(name: str, median: float, minutes: int = 0) -> TableRow:
    t = Trial(candidate_name=name, status="ok", error="", rel_err=1e-7, max_abs_err=2e-6,
              time=TimeStats(median, median * 0.9, median * 1.1, 50), baseline=TimeStats(2.0, 1.9, 2.1, 50),
              tflops=1.5)
    return row_from_trial(t, MATCH, RowContext(TC, "run-1", "NVIDIA A100", "node-1"), policy=Precision.FP32,
                          arch=Arch.SM80, config=config(name), created_at=T0 + timedelta(minutes=minutes))

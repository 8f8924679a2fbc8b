"""NVIDIA's matmul heuristics (`nvidia-matmul-heuristics`, module `nvMatmulHeuristics`) as an optional ranker.

The package is a small C library with an analytic model of CUTLASS kernels per GPU; it runs without a GPU (a
predefined hardware descriptor stands in for the device: tested here with 0.1.0.27 on a CPU-only host). It is
not a dependency of fact-ray: `available()` says whether it imports and answers, and why not, and the ranker is
used only where it is. It knows 16-bit and TF32 tensor-op GEMMs; it does not model 3xTF32 or our tf32x3 family,
so under the fp32 policy (and for any config it cannot estimate) it returns None and the analytic order stays.

Each of our configs is estimated as the library's own kernel configuration of the same CTA tile, cluster, split,
stages and raster, with the warp and instruction shapes the library itself proposes for that problem. Configs
it has no estimate for keep the analytic prior's score, calibrated to the estimates' scale.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from fact_ray.types import Arch, GemmProblem, KernelConfig, Precision

from fact_ray.search_spaces import rank

# Precision codes (A/B, C/D, compute) for the policies it models.
PRECISION = {Precision.BF16: "BBS", Precision.FP16: "HHS", Precision.TF32: "TSS"}
# The GPU each arch is estimated for (the H200 is what the benchmarks ran on; A100 for sm80).
GPU = {Arch.SM90: "H200_SXM", Arch.SM80: "A100_SXM_80GB"}
# With fewer configs estimated than this, the library does not know the problem well enough to rank it.
MIN_ESTIMATED = 4


@dataclass(frozen=True)
class Availability:
    ok: bool
    why: str = ""  # one line when not ok


@functools.lru_cache(maxsize=None)
def available() -> Availability:
    """Whether nvMatmulHeuristics imports and estimates a GEMM on this host (cached per process)."""
    try:
        import nvMatmulHeuristics  # noqa: F401
    except ImportError:
        return Availability(False, "nvidia-matmul-heuristics is not installed (pip install "
                                   "nvidia-matmul-heuristics)")
    try:
        est = _Estimator.get(Arch.SM90, Precision.BF16)
        t = est.estimate(GemmProblem(M=1024, N=1024, K=1024, dtype="bfloat16"),
                         (128, 128, 64), (1, 1), 1, 0, "", 0)
    except (OSError, AssertionError, AttributeError, RuntimeError) as e:
        return Availability(False, f"nvidia-matmul-heuristics does not run here: {type(e).__name__}: {e}")
    if not (t and math.isfinite(t) and t > 0):
        return Availability(False, "nvidia-matmul-heuristics answered no estimate for a 1024^3 bf16 GEMM")
    return Availability(True)


class _Estimator:
    """One library handle per (arch, precision, backend), with its discovery set loaded."""

    _cache: dict[tuple, "_Estimator"] = {}

    def __init__(self, arch: Arch, precision: Precision, cutlass3: bool) -> None:
        import nvMatmulHeuristics as nv

        self.nv = nv
        target = nv.NvMatmulHeuristicsTarget.CUTLASS3 if cutlass3 else nv.NvMatmulHeuristicsTarget.CUTLASS
        self.h = nv.NvMatmulHeuristicsInterfaceEx(backend=target, load_discovery_implicitly=True,
                                                  gpu=getattr(nv.NvMatmulHeuristicsNvidiaGpu, GPU[arch]))
        self.code = PRECISION[precision]
        self.templates: dict[tuple, Any] = {}

    @classmethod
    def get(cls, arch: Arch, precision: Precision, cutlass3: bool = True) -> "_Estimator":
        key = (arch, precision, cutlass3)
        if key not in cls._cache:
            cls._cache[key] = cls(arch, precision, cutlass3)
        return cls._cache[key]

    def _problem(self, p: GemmProblem) -> Any:
        # Row-major D; "col" B is stored [N, K] (transposed in the library's NT naming).
        layout = self.nv.boolsToNvMatmulHeuristicsLayout(p.layout_a == "col", p.layout_b == "col")
        return self.h.makeNvMatmulHeuristicsProblem(p.M, p.N, p.K, layout, p.L)

    def _template(self, problem: Any, key: tuple) -> Any:
        """The library's own best configuration for the problem: its warp/instruction shapes are reused."""
        if key not in self.templates:
            got = self.h.get(problem, 1, precision=self.code)
            self.templates[key] = got[0]["nvmmhKernelConfiguration"] if got else None
        return self.templates[key]

    def estimate(self, p: GemmProblem, cta: tuple[int, int, int], cluster: tuple[int, int], split_k: int,
                 stages: int, raster: str, swizzle: int, warps: Optional[tuple[int, int, int]] = None) -> float:
        problem = self._problem(p)
        base = self._template(problem, (p.M, p.N, p.K, p.L, p.layout_a, p.layout_b))
        if base is None:
            return float("nan")
        k = type(base).from_buffer_copy(base)
        for i in range(3):
            k.cta[i] = cta[i]
        if warps is not None:  # 2.x: the warp tile follows from the CTA tile and warp count
            for i in range(3):
                k.warp[i] = max(1, cta[i] // warps[i])
        else:  # 3.x: a warpgroup's 64 rows; the library's own N and K split of the tile
            k.warp[0], k.warp[1], k.warp[2] = 64, min(cta[1], int(base.warp[1])), max(1, cta[2] // 2)
        k.splitK = max(1, split_k)
        if stages:
            k.loadStages = stages
        k.cluster[0], k.cluster[1] = cluster
        k.ctaOrder = 1 if raster == "along_n" else 0
        k.gridSwizzle = max(1, swizzle)
        t = self._estimate(problem, k)
        if not t > 0:
            # It answers 0 for a tile K outside its own discovery set (its sm90 bf16 kernels all use K = 128 where
            # CUTLASS's generator makes 64): estimate the tile with the library's K instead; tile K is the
            # dimension that changes its estimate least.
            k.cta[2], k.warp[2] = base.cta[2], base.warp[2]
            t = self._estimate(problem, k)
        return float(t) if t > 0 else float("nan")

    def _estimate(self, problem: Any, k: Any) -> float:
        import ctypes

        return float(self.h.nvMatmulHeuristicsEstimateRuntime(
            self.h.handle, self.code.encode("ascii"), ctypes.c_int(self.h.target), ctypes.byref(problem),
            ctypes.byref(k), self.h.hardware_descriptor))


@dataclass(frozen=True)
class NvMatmulHeuristicsRanker:
    """rank.order scores from the library's runtime estimates (higher is better: 1 / estimated seconds)."""

    policy: Precision
    name: str = "nvmmh"

    def scores(self, problem: GemmProblem, configs: Sequence[KernelConfig], arch: Arch) -> Optional[list[float]]:
        arch, policy = Arch(arch), Precision(self.policy)
        if policy not in PRECISION or arch not in GPU or not configs or not available().ok:
            return None
        times = []
        for c in configs:
            if c.template not in ("sm80_gemm", "sm90_gemm"):
                times.append(float("nan"))
                continue
            est = _Estimator.get(arch, policy, cutlass3=c.template == "sm90_gemm")
            sw = c.max_swizzle or (int(c.swizzle.removeprefix("Identity")) if c.swizzle.startswith("Identity")
                                   else 1)
            times.append(est.estimate(problem, c.tile, c.cluster[:2], c.split_k, c.stages, c.raster, sw,
                                      c.warps if c.template == "sm80_gemm" else None))
        known = [i for i, t in enumerate(times) if math.isfinite(t) and t > 0]
        if len(known) < MIN_ESTIMATED:
            return None
        # Where it has no estimate (its discovery set holds no such tile: e.g. no CTA narrower than 128 columns on
        # a 4096^3 bf16 GEMM) the analytic prior speaks, put on the estimates' scale by the configs both score.
        prior = [rank.score(c, problem, arch) for c in configs]
        ratios = sorted((1.0 / times[i]) / prior[i] for i in known if prior[i] > 0)
        scale = ratios[len(ratios) // 2] if ratios else 0.0
        return [1.0 / t if math.isfinite(t) and t > 0 else prior[i] * scale for i, t in enumerate(times)]

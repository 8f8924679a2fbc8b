"""A cost model learned from the pattern table's own trial history: features of problem and config -> time.

Every trial of every run and night is a training sample (its problem, its config, its measured median). Time
depends on the problem far more than on the config, and the ranker only compares configs of one problem, so the
model is fitted within problems: features and log times are centred per problem (the fixed-effects form of
ridge regression), and it predicts how much slower or faster than that problem's average config a config will
run. numpy only, closed form, deterministic; trained in well under a second on tens of thousands of rows.

The features are the analytic prior's own terms (rank.score and its parts: tile fit, wave fill, operand reuse,
K split) plus what the prior does not weigh (clusters, raster and swizzle against the grid's aspect, schedules,
stages), with a few problem x config interactions so that the model can learn shape-dependent preferences.

`fit` needs MIN_SAMPLES timed samples over MIN_PROBLEMS problems with at least two configs each; with less it
returns None and the caller keeps the analytic order (and says so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from fact_ray.types import Arch, GemmProblem, KernelConfig, config_from_dict

from fact_ray.search_spaces import catalog, rank

MIN_SAMPLES = 24
MIN_PROBLEMS = 2
RIDGE = 1.0  # L2 weight on standardised features: enough to tame collinear one-hots, small beside the signal

_SCHEDULES = ("TmaWarpSpecializedCooperative", "TmaWarpSpecializedPingpong", "TmaWarpSpecialized",
              "CpAsyncWarpSpecializedCooperative", "CpAsyncWarpSpecializedPingpong", "CpAsyncWarpSpecialized")
_TEMPLATES = ("sm80_gemm", "sm90_gemm", "sm90_tf32x3")

FEATURES = (
    "log_prior", "log_tile_m", "log_tile_n", "log_tile_k", "log_cluster_m", "log_cluster_n", "tile_fit",
    "wave_fill", "k_fit", "log_split", "stream_k", "forced_stream_k", "raster_m", "raster_n", "log_swizzle",
    "raster_m_x_aspect", "raster_n_x_aspect", "log_stages", "log_warps", "tma_epilogue", "simt",
    "log_area_x_log_mn", "log_split_x_log_k", "log_tile_k_x_log_k", "log_waves",
    *(f"schedule_{s}" for s in _SCHEDULES), *(f"template_{t}" for t in _TEMPLATES),
)


@dataclass(frozen=True)
class Sample:
    """One timed trial: the problem it ran (`group` names it: one tuning key), its config, its median time."""

    group: str
    problem: GemmProblem
    config: KernelConfig
    time_ms: float


def _log2(x: float) -> float:
    return math.log2(max(x, 1e-12))


def features(problem: GemmProblem, cfg: KernelConfig, arch: Arch) -> np.ndarray:
    """The feature vector of `cfg` on `problem` (FEATURES order)."""
    arch = Arch(arch)
    tm, tn, tk = cfg.tile
    cm, cn, _ = cfg.cluster
    sms = rank.SM_COUNT[arch]
    tiles_m, tiles_n = math.ceil(problem.M / tm), math.ceil(problem.N / tn)
    tiles = tiles_m * tiles_n * problem.L
    fit = problem.M * problem.N / (tiles_m * tm * tiles_n * tn)
    units = tiles * max(cfg.split_k, 1)
    k_tiles = math.ceil(problem.K / tk)
    aspect = _log2(tiles_m / tiles_n)  # > 0: more tiles along M than along N
    raster_m, raster_n = float(cfg.raster == "along_m"), float(cfg.raster == "along_n")
    swizzle = cfg.max_swizzle or (int(cfg.swizzle.removeprefix("Identity")) if cfg.swizzle.startswith("Identity")
                                  else 1)
    schedule = rank.kernel_schedule(cfg)
    values = [
        _log2(rank.score(cfg, problem, arch)), _log2(tm), _log2(tn), _log2(tk), _log2(cm), _log2(cn), fit,
        rank.wave_fill(units, sms), problem.K / (k_tiles * tk), _log2(cfg.split_k),
        float(cfg.tile_scheduler == "stream_k" or cfg.swizzle == "StreamK"), float(cfg.decomposition == "stream_k"),
        raster_m, raster_n, _log2(swizzle), raster_m * aspect, raster_n * aspect, _log2(max(cfg.stages, 1)),
        _log2(cfg.warps[0] * cfg.warps[1] * cfg.warps[2]),
        float(cfg.epilogue_schedule in ("TmaWarpSpecialized", "TmaWarpSpecializedCooperative")),
        float(cfg.opclass == "simt"),
        _log2(tm * tn) * _log2(problem.M * problem.N * problem.L), _log2(cfg.split_k) * _log2(problem.K),
        _log2(tk) * _log2(problem.K), _log2(units / sms),
        *(float(schedule == s) for s in _SCHEDULES), *(float(cfg.template == t) for t in _TEMPLATES),
    ]
    return np.asarray(values, dtype=np.float64)


@dataclass(frozen=True)
class CostModel:
    """Ridge weights over standardised, per-problem-centred features; predicts relative log2 time."""

    arch: Arch
    weights: tuple[float, ...]
    scale: tuple[float, ...]
    samples: int
    problems: int
    name: str = "learned"

    def predict(self, problem: GemmProblem, configs: Sequence[KernelConfig]) -> np.ndarray:
        """Relative log2 time of each config on `problem` (lower is faster; only differences mean anything)."""
        if not configs:
            return np.zeros(0)
        x = np.stack([features(problem, c, self.arch) for c in configs])
        return (x / np.asarray(self.scale)) @ np.asarray(self.weights)

    def scores(self, problem: GemmProblem, configs: Sequence[KernelConfig], arch: Arch) -> Optional[list[float]]:
        """Higher is better (rank.order's convention): 2 ** -predicted relative log2 time. None for another arch:
        a model learned on one GPU generation says nothing about another."""
        if Arch(arch) is not self.arch:
            return None
        pred = self.predict(problem, configs)
        pred = pred - (pred.min() if len(pred) else 0.0)
        return [float(2.0 ** -p) for p in pred]


def fit(samples: Iterable[Sample], arch: Arch, *, ridge: float = RIDGE) -> Optional[CostModel]:
    """Fit the model on `samples` of `arch`; None when the history is too thin (see the module's doc)."""
    arch = Arch(arch)
    by_group: dict[str, list[Sample]] = {}
    for s in samples:
        if s.time_ms > 0 and math.isfinite(s.time_ms) and Arch(s.config.arch) is arch:
            by_group.setdefault(s.group, []).append(s)
    groups = {g: ss for g, ss in by_group.items() if len({s.config.name for s in ss}) >= 2}
    n = sum(len(ss) for ss in groups.values())
    if n < MIN_SAMPLES or len(groups) < MIN_PROBLEMS:
        return None
    xs, ys = [], []
    for ss in groups.values():
        x = np.stack([features(s.problem, s.config, arch) for s in ss])
        y = np.log2([s.time_ms for s in ss])
        xs.append(x - x.mean(axis=0))
        ys.append(y - y.mean())
    x, y = np.concatenate(xs), np.concatenate(ys)
    scale = x.std(axis=0)
    scale[scale < 1e-9] = 1.0  # a feature constant within every problem carries nothing: weight ~0
    xs_ = x / scale
    w = np.linalg.solve(xs_.T @ xs_ + ridge * np.eye(xs_.shape[1]), xs_.T @ y)
    return CostModel(arch=arch, weights=tuple(float(v) for v in w), scale=tuple(float(v) for v in scale),
                     samples=n, problems=len(groups))


# ------------------------------------------------------------------------------------------ table history

_TRUSTED = {"ok", "slower"}  # verified and timed; other statuses carry no time of a correct kernel


def problem_from_key(match_key: str, cfg: KernelConfig) -> Optional[GemmProblem]:
    """The GemmProblem of a stored row: extents from the match key's parameters (`rule|shapes|dtype|M=..,N=..`),
    dtype, layouts and epilogue from the config that ran it. None when the key holds no GEMM extents."""
    parts = match_key.split("|")
    if len(parts) < 4:
        return None
    params: dict[str, str] = {}
    for item in parts[3].split(","):
        k, sep, v = item.partition("=")
        if sep:
            params[k.strip()] = v.strip()
    try:
        m, n, k = int(params["M"]), int(params["N"]), int(params["K"])
        batch = int(params.get("L", 1))
    except (KeyError, ValueError):
        return None
    return GemmProblem(M=m, N=n, K=k, L=batch, dtype=catalog.TORCH_DTYPE.get(cfg.element, "float32"),
                       layout_a=cfg.layout_a, layout_b=cfg.layout_b, epilogue=cfg.epilogue,
                       activation=cfg.activation,
                       broadcast_b=params.get("broadcast_b", "False").lower() in ("true", "1"))


def samples_from_rows(rows: Iterable[Any]) -> list[Sample]:
    """Training samples from pattern-table rows (anything with the TableRow fields used here): timed GEMM
    trials that verified. Rows of other families, the PyTorch op's rows and unparseable keys are skipped."""
    import json

    out = []
    for r in rows:
        if r.config_json is None or r.status not in _TRUSTED or not r.median_ms:
            continue
        try:
            cfg = config_from_dict(json.loads(r.config_json))
        except ValueError:
            continue
        if not isinstance(cfg, KernelConfig):
            continue
        problem = problem_from_key(r.match_key, cfg)
        if problem is None:
            continue
        group = f"{r.match_key}|{r.policy.value}|{r.arch.value}|{r.gpu_name or ''}"
        out.append(Sample(group=group, problem=problem, config=cfg, time_ms=float(r.median_ms)))
    return out

"""Rows of the pattern table, the keys they are found by, and conversions from the realization types.

What makes a stored winner reusable (the `TableKey`)
----------------------------------------------------
A row answers "which kernel to run for this tuning problem" only when everything that decides correctness and
speed is the same:

- the **match key** (`Match.key`): rule, input shapes, dtype and the rule's parameters (activation, eps, ...);
- the **precision policy**: an fp32 winner says nothing about bf16, and a bf16 winner is not accurate enough for fp32;
- the **arch** (sm80 / sm90): the emitted C++ and the compiled library differ per arch;
- the **toolchain** (`fact_ray.toolchain.key_toolchain`, its only builder): nvcc, CUTLASS and torch versions and
  the benchmark method's version. A new compiler or CUTLASS changes the kernels' speed (and which configs compile
  at all); a new torch changes the baseline we must beat; a new benchmark method makes old timings incomparable.
  Any change is a new key, so a re-tune runs. The NVIDIA driver, cuBLAS and cuDNN are recorded with each row
  (`driver`, `cublas`, `cudnn`) but are not in the key.

The **GPU name** (H100 vs H200, both sm90) is *not* part of the reuse key by default: a config verified on one
GPU of an arch is correct on another, and usually close to best. A key with `gpu_name` set restricts a query to
rows measured on that GPU. Absolute times are never compared across GPUs (measuring.md): when the rows of one
key come from several GPUs, ranking uses the speedup over the PyTorch op, measured side by side on each GPU.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from typing import Any

from fact_ray.errors import TableError
from fact_ray.toolchain import Host, Toolchain
from fact_ray.types import (
    Arch,
    AnyConfig,
    config_from_dict,
    Match,
    Precision,
    TimeStats,
    Trial,
    TrialStatus,
    Winner,
    to_jsonable,
)


@dataclass(frozen=True)
class TableKey:
    """What a query asks for. `toolchain` is a `Toolchain.fingerprint`; `gpu_name` None means any GPU of the arch."""

    match_key: str
    policy: Precision
    arch: Arch
    toolchain: str
    gpu_name: str | None = None

    def __post_init__(self) -> None:
        # Accept the plain strings a CLI or JSON gives; store the enums.
        object.__setattr__(self, "policy", Precision(self.policy))
        object.__setattr__(self, "arch", Arch(self.arch))

    @classmethod
    def of(cls, match_key: str, policy: Precision | str, arch: Arch | str, toolchain: Toolchain,
           gpu_name: str | None = None) -> "TableKey":
        return cls(match_key, Precision(policy), Arch(arch), toolchain.fingerprint, gpu_name)

    def matches(self, row: "TableRow") -> bool:
        return (
            row.match_key == self.match_key
            and row.policy == self.policy
            and row.arch == self.arch
            and row.toolchain.fingerprint == self.toolchain
            and (self.gpu_name is None or row.gpu_name == self.gpu_name)
        )


_HEX64 = re.compile(r"^[0-9a-f]{64}$")

_FLOAT_FIELDS = (
    "median_ms", "p10_ms", "p90_ms", "baseline_median_ms", "baseline_p10_ms", "baseline_p90_ms",
    "speedup", "rel_err", "max_abs_err", "tflops",
)


@dataclass(frozen=True)
class TableRow:
    """One stored outcome: a pattern, the key context, the chosen config (or the PyTorch op), its measurements
    and provenance. Unknown numbers are None (NaN is normalised to None so rows compare equal after a
    round trip)."""

    rule: str
    match_key: str
    shape_signature: str
    dtype: str
    policy: Precision
    arch: Arch
    toolchain: Toolchain
    config_json: str | None  # JSON of the family's config; None: the PyTorch op stays
    config_name: str  # the config's name, or "torch"
    status: str  # a Trial status: ok | compile_error | cannot_implement | wrong | crashed | timeout | slower
    created_at: datetime  # UTC
    gpu_name: str | None = None
    median_ms: float | None = None
    p10_ms: float | None = None
    p90_ms: float | None = None
    reps: int | None = None
    baseline_median_ms: float | None = None
    baseline_p10_ms: float | None = None
    baseline_p90_ms: float | None = None
    speedup: float | None = None
    rel_err: float | None = None
    max_abs_err: float | None = None
    tflops: float | None = None
    error: str = ""
    library_key: str | None = None  # build cache key (source, compiler, flags, CUTLASS, arch)
    library_hash: str | None = None  # sha256 of the .so bytes
    library_uri: str | None = None  # where put_library stored them
    library_symbol: str | None = None  # exported C symbol prefix of this config inside the library
    run_id: str = ""
    host: str | None = None
    driver: str | None = None  # NVIDIA driver of the GPU that timed it (recorded, not keyed)
    cublas: str | None = None  # cuBLAS the PyTorch op ran on
    cudnn: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "policy", Precision(self.policy))
        object.__setattr__(self, "arch", Arch(self.arch))
        if self.created_at.tzinfo is None:
            raise ValueError("TableRow.created_at must be timezone-aware (UTC)")
        object.__setattr__(self, "created_at", self.created_at.astimezone(timezone.utc))
        for name in _FLOAT_FIELDS:
            v = getattr(self, name)
            if v is not None:
                v = float(v)
                object.__setattr__(self, name, None if math.isnan(v) else v)

    # ------------------------------------------------------------------ views

    @property
    def key(self) -> TableKey:
        return TableKey(self.match_key, self.policy, self.arch, self.toolchain.fingerprint, self.gpu_name)

    @property
    def valid(self) -> bool:
        """Eligible as a best entry: verified, faster-or-kept (status ok), and timed."""
        return self.status == TrialStatus.OK and self.median_ms is not None

    @property
    def config(self) -> AnyConfig | None:
        return None if self.config_json is None else config_from_json(self.config_json)

    def to_winner(self) -> Winner:
        """The row as the Winner the farm and composer use when reusing it."""
        time = _stats(self.median_ms, self.p10_ms, self.p90_ms, self.reps)
        base = _stats(self.baseline_median_ms, self.baseline_p10_ms, self.baseline_p90_ms, self.reps)
        trial = Trial(
            candidate_name=self.config_name,
            status=self.status,
            error=self.error,
            rel_err=_nan(self.rel_err),
            max_abs_err=_nan(self.max_abs_err),
            time=time,
            baseline=base,
            tflops=self.tflops or 0.0,
        )
        return Winner(
            match_key=self.match_key, rule=self.rule, precision=self.policy, arch=self.arch, config=self.config,
            trial=trial, library_key=self.library_key or "",
            trials=(),  # nothing was tried in the run that reuses this row
        )

    # ------------------------------------------------------------------ storage records

    def to_record(self) -> dict[str, Any]:
        """A flat dict in the Arrow schema's columns."""
        rec: dict[str, Any] = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "toolchain":
                rec.update(cuda_version=v.cuda, cutlass_version=v.cutlass, torch_version=v.torch,
                           bench_method=v.bench_method, toolchain=v.fingerprint)
            elif f.name in ("policy", "arch"):
                rec[f.name] = v.value
            else:
                rec[f.name] = v
        return rec

    @classmethod
    def from_record(cls, rec: dict[str, Any]) -> "TableRow":
        tc = Toolchain(rec["cuda_version"], rec["cutlass_version"], rec["torch_version"], rec["bench_method"])
        kw = {f.name: rec[f.name] for f in fields(cls) if f.name != "toolchain"}
        kw["error"] = kw["error"] or ""
        kw["run_id"] = kw["run_id"] or ""
        return cls(toolchain=tc, **kw)


def _nan(v: float | None) -> float:
    return float("nan") if v is None else v


def _stats(median: float | None, p10: float | None, p90: float | None, reps: int | None) -> TimeStats | None:
    if median is None:
        return None
    return TimeStats(median_ms=median, p10_ms=_nan(p10), p90_ms=_nan(p90), reps=reps or 0)


# ---------------------------------------------------------------------------- configs <-> JSON

def config_to_json(config: AnyConfig) -> str:
    return json.dumps(to_jsonable(config), sort_keys=True)


def config_from_json(text: str) -> AnyConfig:
    """Rebuild a stored config as its family's type (types.config_from_dict); what does not load is a TableError."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise TableError(f"stored kernel config is not valid JSON ({e})") from None
    try:
        return config_from_dict(data)
    except ValueError as e:
        raise TableError(str(e)) from None


# ---------------------------------------------------------------------------- conversions from realization


@dataclass(frozen=True)
class RowContext:
    """Where and how a result was obtained: the part of a row that no Winner or Trial carries."""

    toolchain: Toolchain
    run_id: str = ""
    gpu_name: str | None = None
    host: str | None = None
    facts: Host | None = None  # the host's recorded versions (driver, cuBLAS, cuDNN); None: not known


def row_from_trial(
    trial: Trial,
    match: Match,
    ctx: RowContext,
    *,
    policy: Precision,
    arch: Arch,
    config: AnyConfig | None,
    library_key: str | None = None,
    library_hash: str | None = None,
    library_uri: str | None = None,
    library_symbol: str | None = None,
    created_at: datetime | None = None,
) -> TableRow:
    """A row for one trial of `match`. `config` None means the trial is the PyTorch op itself.
    `library_hash` defaults to the content hash in a `put_library` URI's name."""
    t, b = trial.time, trial.baseline
    if library_hash is None and library_uri:
        stem = library_uri.rsplit("/", 1)[-1].removesuffix(".so")
        library_hash = stem if _HEX64.match(stem) else None
    return TableRow(
        rule=match.rule,
        match_key=match.key,
        shape_signature=match.shape_signature,
        dtype=match.dtype,
        policy=policy,
        arch=arch,
        toolchain=ctx.toolchain,
        config_json=None if config is None else config_to_json(config),
        config_name=trial.candidate_name if config is None else config.name,
        status=trial.status.value,  # stored as its plain string
        created_at=created_at or datetime.now(timezone.utc),
        gpu_name=ctx.gpu_name,
        median_ms=t.median_ms if t else None,
        p10_ms=t.p10_ms if t else None,
        p90_ms=t.p90_ms if t else None,
        reps=t.reps if t else None,
        baseline_median_ms=b.median_ms if b else None,
        baseline_p10_ms=b.p10_ms if b else None,
        baseline_p90_ms=b.p90_ms if b else None,
        speedup=trial.speedup,
        rel_err=trial.rel_err,
        max_abs_err=trial.max_abs_err,
        tflops=trial.tflops,
        error=trial.error,
        library_key=library_key or None,
        library_hash=library_hash,
        library_uri=library_uri,
        library_symbol=library_symbol,
        run_id=ctx.run_id,
        host=ctx.host,
        driver=(ctx.facts.driver or None) if ctx.facts else None,
        cublas=(ctx.facts.cublas or None) if ctx.facts else None,
        cudnn=(ctx.facts.cudnn or None) if ctx.facts else None,
    )


def row_from_winner(
    winner: Winner,
    match: Match,
    ctx: RowContext,
    *,
    library_hash: str | None = None,
    library_uri: str | None = None,
    library_symbol: str | None = None,
    created_at: datetime | None = None,
) -> TableRow:
    """The row recording `winner` (a kernel, or the PyTorch op when `winner.config` is None)."""
    if winner.match_key != match.key:
        raise ValueError(f"winner is for {winner.match_key!r}, match is {match.key!r}")
    return row_from_trial(
        winner.trial, match, ctx, policy=winner.precision, arch=winner.arch, config=winner.config,
        library_key=winner.library_key, library_hash=library_hash, library_uri=library_uri,
        library_symbol=library_symbol, created_at=created_at,
    )

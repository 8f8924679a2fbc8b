"""`fact-ray bench`: eager, `torch.compile` (default and max-autotune) and the composed module, side by side.

Every variant runs the same module weights on the same input tensors, under the same precision policy (the
model's dtype from `capture.under_policy`, TF32 math only under `tf32`, for timing and for compile warm-up
alike), timed side by side in one process as a serving system sees it (`fact_ray.realize.bench.time_serving`):
the latency of one synchronised call and the per-call time of back-to-back calls, each variant warmed up in its
own loop first (docs/bench.md says why). Errors are measured against the original module in float64 on the
same inputs. The composed module also runs under torch.compile (`composed+compile`, `composed+max-autotune`,
`composed+cudagraphs`: mode reduce-overhead), and the result names the best composed variant.

A variant that cannot be built or run (Inductor missing, a composition that fails its check) becomes a `failed`
row with its one-line reason; the others go on. Results: `format_table` (rich), `to_json` / `from_json`, `plot`
(a PNG bar chart), `write_outputs` (all three as files) and `log_to_mlflow` (one run tagged fact_ray.kind=bench).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from fact_ray.errors import ArtifactError, ModelRaised, NotAvailable, UserError, first_line
from fact_ray.types import Precision, TimeStats, to_jsonable

EAGER, COMPILE_DEFAULT, COMPILE_MAX, COMPOSED = "eager", "compile-default", "compile-max-autotune", "composed"
COMPOSED_COMPILE, COMPOSED_MAX, COMPOSED_CUDAGRAPHS = "composed+compile", "composed+max-autotune", "composed+cudagraphs"
VARIANTS = (EAGER, COMPILE_DEFAULT, COMPILE_MAX, COMPOSED, COMPOSED_COMPILE, COMPOSED_MAX, COMPOSED_CUDAGRAPHS)
COMPOSED_VARIANTS = (COMPOSED, COMPOSED_COMPILE, COMPOSED_MAX, COMPOSED_CUDAGRAPHS)
_COMPILE_MODE = {COMPILE_DEFAULT: None, COMPILE_MAX: "max-autotune"}
# The composed module stacked under torch.compile: Inductor fuses the glue between our kernels (issue 18).
_COMPOSED_MODE = {COMPOSED_COMPILE: None, COMPOSED_MAX: "max-autotune", COMPOSED_CUDAGRAPHS: "reduce-overhead"}

OK, INACCURATE, FAILED = "ok", "inaccurate", "failed"
SCHEMA_VERSION = 2  # 2: time is the synchronised latency, throughput added; 1 (read too): interleaved events
METHOD = "serving: latency of one synchronised call (L2 flushed), throughput of back-to-back calls"
KIND = "fact-ray-bench"

Say = Callable[[str], None]


@dataclass(frozen=True)
class VariantRow:
    """One variant's outcome. Absent values are None (a failed variant has no time), never invented."""

    name: str
    status: str  # ok | inaccurate (ran, error above the policy tolerance or not finite) | failed (did not run)
    reason: str = ""  # one line: why failed / inaccurate, or a note
    time: Optional[TimeStats] = None  # latency of one synchronised call (schema 1: one interleaved call)
    speedup: Optional[float] = None  # eager median / this median, both from the same rounds
    rel_err: Optional[float] = None  # ||out - ref|| / ||ref|| against float64; None when outputs are not finite
    max_abs_err: Optional[float] = None
    allclose: Optional[bool] = None  # KernelBench's torch.allclose(atol = rtol = policy.allclose_tol)
    compile_s: Optional[float] = None  # compiled variants: the first call (compile + one run), wall seconds
    kernels: Optional[int] = None  # composed: patterns that call a fact-ray kernel
    throughput: Optional[TimeStats] = None  # ms per call of back-to-back calls
    throughput_speedup: Optional[float] = None  # eager's per-call time / this one's


@dataclass(frozen=True)
class BenchResult:
    model: str
    model_ref: str
    policy: Precision
    gpu: str
    versions: tuple[tuple[str, str], ...]
    artifact: str  # the composed artifact that was benched ("" when composed was not asked for or failed)
    reps: int
    warmup: int
    tolerance: float  # the policy's relative Frobenius tolerance
    allclose_tol: float
    created_at: str
    rows: tuple[VariantRow, ...]
    notes: tuple[str, ...] = ()
    families: tuple[str, ...] = ()  # the composed variant replaces only these pattern families (empty: all)
    calls: int = 0  # back-to-back calls per throughput sample (0: schema 1, no throughput)
    method: str = ""
    best_composed: str = ""  # the fastest ok composed variant by latency ("" when none ran)

    @property
    def label(self) -> str:
        """Names files and titles: a composition limited to some families is not the full one."""
        return _label(self.policy, self.families)

    def row(self, name: str) -> VariantRow:
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(name)


@dataclass(frozen=True)
class Variant:
    """A runnable variant: `fn(*inputs)`; `compiled` makes its first call count as compile time."""

    fn: Callable[..., Any]
    compiled: bool = False
    kernels: Optional[int] = None
    note: str = ""  # said once in its row (a composed module's replacements that kept their PyTorch op)


Builder = Callable[[], Variant]


# --------------------------------------------------------------------------------------------- pure helpers


def parse_variants(text: str | None) -> tuple[str, ...]:
    """A comma list of variant names, in the canonical order. Eager is required: speedups are over eager.
    max-autotune always stands beside the others (added when left out): it is the peer to beat."""
    if not text:
        return VARIANTS
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise UserError(f"unknown variant {unknown[0]!r}: choose from {', '.join(VARIANTS)}")
    if EAGER not in names:
        raise UserError("--variants must include eager: every speedup is measured over it")
    return tuple(v for v in VARIANTS if v in names or v == COMPILE_MAX)


def speedups(times: Mapping[str, TimeStats], baseline: str = EAGER) -> dict[str, float]:
    """baseline median / each median. Only meaningful for times from the same interleaved rounds."""
    base = times[baseline].median_ms
    return {n: base / t.median_ms for n, t in times.items() if t.median_ms > 0}


def check_artifact_policy(manifest: Mapping[str, Any], policy: Precision | str, where: str) -> None:
    """An artifact runs in the dtype and math of the policy it was composed under; benching it beside variants
    of another policy would compare different numerics."""
    theirs, ours = str(manifest.get("policy")), Precision(policy).value
    if theirs != ours:
        raise ArtifactError(f"{where} was composed under policy {theirs}, the bench runs under {ours}: pass "
                            f"--policy {theirs}, or compose it again under {ours}")


def output_errors(out: Any, ref: Any, policy: Precision) -> tuple[Optional[float], Optional[float], bool]:
    """(worst relative Frobenius error, worst max abs error, allclose) of `out` against the float64 `ref`, over
    every output tensor. A non-finite output has no errors (None, None) and never passes allclose."""
    from fact_ray.compose import _leaves

    import torch

    outs, refs = _leaves(out), _leaves(ref)
    if len(outs) != len(refs):
        raise ValueError(f"the variant returns {len(outs)} tensors, the original {len(refs)}")
    worst_rel, worst_abs, close = 0.0, 0.0, True
    # KernelBench's atol = rtol, one value per policy for all of fact-ray (Precision.allclose_tol): 1e-4 fp32 and
    # 1e-2 bf16 as measuring.md says; 1e-2 for fp16 and tf32 too (1xTF32 errs about 1e-2 near zero outputs
    # at K = 768 even in cuBLAS, see realize/verify.py), so eager itself passes under its own policy.
    tol = policy.allclose_tol
    for o, r in zip(outs, refs):
        if tuple(o.shape) != tuple(r.shape):
            raise ValueError(f"output shape {tuple(o.shape)} != original {tuple(r.shape)}")
        o64, r64 = o.detach().to(torch.float64), r.detach().to(torch.float64)
        if not bool(torch.isfinite(o64).all()):
            return None, None, False
        diff = o64 - r64
        norm = float(torch.linalg.vector_norm(r64))
        rel = float(torch.linalg.vector_norm(diff)) / (norm if norm > 0 else 1.0)
        worst_rel = max(worst_rel, rel)
        worst_abs = max(worst_abs, float(diff.abs().max()) if diff.numel() else 0.0)
        close = close and bool(torch.allclose(o64, r64, rtol=tol, atol=tol))
    return worst_rel, worst_abs, close


def _status(rel_err: Optional[float], policy: Precision) -> tuple[str, str]:
    if rel_err is None:
        return INACCURATE, "outputs are not finite"
    if rel_err > policy.tolerance:
        return INACCURATE, f"relative error {rel_err:.3g} exceeds the {policy.value} tolerance {policy.tolerance:g}"
    return OK, ""


# --------------------------------------------------------------------------------------------- measuring


def measure(loaded: Any, policy: Precision, builders: Mapping[str, Builder], *, device: Any, reps: int,
            warmup: int, calls: int = 20, timer: Any = None, say: Say = lambda _: None) -> tuple[VariantRow, ...]:
    """Build each variant, run it once (compile time for compiled ones), time all that run side by side on the
    same inputs (`time_serving`: `reps` rounds of a latency call and a throughput loop of `calls` calls), then
    measure each one's error against `loaded.module` in float64.

    `loaded.module` and `loaded.inputs` must already be on `device` and in the policy's dtype. `timer` replaces
    CUDA events (see `time_serving`); tests pass one to run on a CPU.
    """
    import torch

    from fact_ray.realize.bench import time_serving
    from fact_ray.realize.verify import precision_mode

    inputs = loaded.inputs
    failed: dict[str, VariantRow] = {}
    ready: dict[str, Variant] = {}
    first: dict[str, float] = {}
    with torch.no_grad(), precision_mode(policy):
        reference = _reference_outputs(loaded, inputs, device)
        for name, build in builders.items():
            say(f"{name}: building and running once")
            try:
                v = build()
                first[name] = _timed_call(v.fn, inputs, device)
                ready[name] = v
            except Exception as e:  # reported as a failed row with its reason; the other variants go on
                if name == EAGER:
                    raise ModelRaised(f"{loaded.name}: the eager module raised on {device}: "
                                      f"{first_line(e, 240)}") from e
                failed[name] = VariantRow(name, FAILED, reason=first_line(e, 240))
        say(f"timing {', '.join(ready)}: each warmed up in its own loop, then {reps} rounds of one synchronised "
            f"call and {calls} back-to-back calls")
        fns = {n: (lambda f=v.fn: f(*inputs)) for n, v in ready.items()}
        times, per_call = time_serving(fns, rounds=reps, calls=calls, warmup=warmup, timer=timer)
        # Errors come from one more call after timing: the steady state (CUDA-graph replay under max-autotune),
        # each compared at once, before another call could reuse its output buffers.
        errors = {n: _errors_of(v.fn, inputs, reference, policy) for n, v in ready.items()}
    ups, thr_ups = speedups(times), speedups(per_call)
    rows = []
    for name in builders:
        if name in failed:
            rows.append(failed[name])
            continue
        v, err = ready[name], errors[name]
        if isinstance(err, str):  # its outputs do not line up with the original's: timed, but not comparable
            rows.append(VariantRow(name, INACCURATE, reason=err, time=times[name], speedup=ups.get(name),
                                   compile_s=first[name] if v.compiled else None, kernels=v.kernels,
                                   throughput=per_call[name], throughput_speedup=thr_ups.get(name)))
            continue
        rel, mx, close = err
        status, reason = _status(rel, policy)
        reason = reason or v.note
        rows.append(VariantRow(name, status, reason=reason, time=times[name], speedup=ups.get(name), rel_err=rel,
                               max_abs_err=mx, allclose=close, compile_s=first[name] if v.compiled else None,
                               kernels=v.kernels, throughput=per_call[name], throughput_speedup=thr_ups.get(name)))
    return tuple(rows)


def _errors_of(fn: Callable[..., Any], inputs: Sequence[Any], reference: Any,
               policy: Precision) -> tuple[Optional[float], Optional[float], bool] | str:
    try:
        return output_errors(fn(*inputs), reference, policy)
    except ValueError as e:
        return str(e)


def _reference_outputs(loaded: Any, inputs: Sequence[Any], device: Any) -> Any:
    """The original module in float64 on the same inputs (measuring.md): a fresh instance loaded with the model's
    state (fact_ray.reference), dropped at once."""
    import torch

    from fact_ray.reference import float64_reference

    reference = float64_reference(loaded.module, rebuild=getattr(loaded, "rebuild", None), device=device)
    out = reference(*[x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs])
    del reference
    return out


def _timed_call(fn: Callable[..., Any], inputs: Sequence[Any], device: Any) -> float:
    import torch

    t0 = time.perf_counter()
    fn(*inputs)
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def _compiled(module: Any, mode: Optional[str]) -> Builder:
    def build() -> Variant:
        import torch

        return Variant(torch.compile(module, mode=mode), compiled=True)

    return build


def _composed_variant(composed: Any, inputs: Sequence[Any] = ()) -> Variant:
    from fact_ray.compose import composition_of
    from fact_ray.shapes import ShapeDispatch

    if isinstance(composed, ShapeDispatch):  # a dispatch artifact: the bucket these inputs fall in, if any
        served = composed.module_for(*inputs)
        if served is composed.original:
            return Variant(composed, kernels=0, note=f"shapes {bucket_of_inputs(inputs)}: no tuned bucket, the "
                                                    "PyTorch ops (rule exact-input-shapes)")
        return dataclasses.replace(_composed_variant(served), fn=composed)
    comp = composition_of(composed)
    note = ""
    if comp.fallbacks:
        more = f" (and {len(comp.fallbacks) - 1} more)" if len(comp.fallbacks) > 1 else ""
        note = f"{len(comp.fallbacks)} winner(s) kept the PyTorch op: {comp.fallbacks[0][1]}{more}"
    return Variant(composed, kernels=len(comp.replacements), note=note)


def bucket_of_inputs(inputs: Sequence[Any]) -> str:
    from fact_ray.shapes import bucket_of

    return bucket_of(inputs).spec


# --------------------------------------------------------------------------------------------- the bench


def require_gpu() -> str:
    """The local GPU's name; NotAvailable before any work where there is none."""
    import torch

    if not torch.cuda.is_available():
        raise NotAvailable("no CUDA GPU: fact-ray bench times every variant on a GPU; nothing was done")
    return torch.cuda.get_device_name()


def require_plotting() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise NotAvailable("matplotlib is not installed, so the comparison cannot be plotted: "
                           "pip install 'fact-ray[plot]'") from None


def safe_name(name: str) -> str:
    from fact_ray.tracking import _safe

    return _safe(name)


def artifact_dir(settings: Any, model_name: str, policy: Precision, families: frozenset[str] = frozenset(),
                 against: str = "eager") -> Path:
    """Where a bench without --artifact saves the composition it makes from the table (the one for the variants
    under torch.compile, guaranteed against compile, beside it)."""
    suffix = "-vs-compile" if against == "compile" else ""
    return Path(settings.home) / "artifacts" / f"{safe_name(model_name)}-{_label(policy, families)}{suffix}"


def _family_groups(families: Sequence[str]) -> list[str]:
    """Family names for labels, every GEMM family shortened to one "gemm"."""
    from fact_ray.discover.rules import GEMM_FAMILIES

    return sorted({"gemm" if f in GEMM_FAMILIES else f for f in families})


def _label(policy: Precision, families: Sequence[str]) -> str:
    """`fp32`, or `fp32-only-gemm` for a composition limited to some families."""
    only = f"-only-{'-'.join(_family_groups(families))}" if families else ""
    return f"{Precision(policy).value}{only}"


def run_bench(ref: str, settings: Any, *, artifact: str | None = None, variants: Sequence[str] = VARIANTS,
              reps: int = 50, warmup: int = 10, families: frozenset[str] = frozenset(), calls: int = 20,
              say: Say = lambda _: None) -> BenchResult:
    """Bench `ref` under `settings.policy` on the local GPU; see the module docstring.

    With `artifact`, the composed variant is that artifact (its policy must be the bench's); without, it is
    composed from the pattern table (`artifact.compose_from_table`) into `artifact_dir(...)`, from the winners of
    `families` only when given (compose.parse_families).
    """
    from fact_ray import artifact as art
    from fact_ray.capture import load_model, under_policy

    if reps < 1 or warmup < 0 or calls < 1:
        raise UserError(f"--reps and --calls must be at least 1 and --warmup at least 0 (got {reps}, {calls} and "
                        f"{warmup})")
    if any(v in variants for v in COMPOSED_VARIANTS[1:]) and COMPOSED not in variants:
        variants = (*variants, COMPOSED)  # the compiled forms stand beside the module they compile
    if artifact and COMPOSED not in variants:
        raise UserError(f"--artifact {artifact} is benched as the composed variant, which --variants leaves out")
    if artifact and families:
        raise UserError("--families chooses what to compose from the table; an --artifact is already composed")
    gpu = require_gpu()
    policy = settings.policy
    if artifact:
        from fact_ray.shapes import policy_manifest

        check_artifact_policy(policy_manifest(artifact), policy, f"artifact {artifact}")
    loaded = _on_cuda(under_policy(load_model(ref), policy))
    notes: list[str] = []
    builders: dict[str, Builder] = {EAGER: lambda: Variant(loaded.module)}
    for name in variants:
        if name in _COMPILE_MODE:
            builders[name] = _compiled(loaded.module, _COMPILE_MODE[name])
    used = {"path": ""}
    stacked = [v for v in variants if v in _COMPOSED_MODE]
    if COMPOSED in variants:
        if artifact:
            # A given artifact that does not fit (another model, arch, torch) is the user's error: it stops here.
            composed = art.load(artifact, loaded, device="cuda")
            used["path"] = str(artifact)
            builders[COMPOSED] = lambda: _composed_variant(composed, loaded.inputs)
            builders.update(_stacked(builders[COMPOSED], stacked))
        else:
            builders[COMPOSED] = _from_table(ref, settings, loaded, policy, used, families, say)
            # What stands under torch.compile is the composition a user who compiles would ship: the one whose
            # whole-module guarantee ran under torch.compile (default mode), so a kernel that blocks Inductor's
            # fusions more than it gains is dropped there. Stacking the eager-guaranteed one lost to compiling
            # the original on the H200's Llama-style block (1.31x vs 1.67x over eager).
            if stacked:
                for_compile = _from_table(ref, settings, loaded, policy, {}, families, say, against="compile")
                builders.update({n: b for n, b in _stacked(for_compile, stacked).items() if n != COMPOSED})
    order = {n: builders[n] for n in VARIANTS if n in builders}
    rows = measure(loaded, policy, order, device="cuda", reps=reps, warmup=warmup, calls=calls, say=say)
    notes += _notes(rows, policy, bool(artifact))
    best = best_composed(rows)
    if best:
        notes.append(best_note(rows, best))
    return BenchResult(
        model=loaded.name, model_ref=str(ref), policy=policy, gpu=gpu, versions=tuple(sorted(_versions().items())),
        artifact=used["path"], reps=reps, warmup=warmup, tolerance=policy.tolerance,
        allclose_tol=policy.allclose_tol, created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        rows=rows, notes=tuple(notes), families=tuple(sorted(families)), calls=calls, method=METHOD,
        best_composed=best)


def _stacked(composed: Builder, names: Sequence[str]) -> dict[str, Builder]:
    """Builders of the composed module under torch.compile, one per mode, sharing the one composed module (built
    once, by whichever variant asks first; a composition that fails fails them all with its reason)."""
    made: dict[str, Any] = {}

    def module() -> Any:
        if "e" in made:  # composing failed once: every stacked variant fails with the same reason, no retry
            raise made["e"]
        if "v" not in made:
            try:
                made["v"] = composed()
            except Exception as e:
                made["e"] = e
                raise
        return made["v"]

    def build(mode: Optional[str]) -> Builder:
        def b() -> Variant:
            import torch

            base = module()
            return Variant(torch.compile(base.fn, mode=mode), compiled=True, kernels=base.kernels, note=base.note)

        return b

    out: dict[str, Builder] = {COMPOSED: lambda: module()}
    out.update({n: build(_COMPOSED_MODE[n]) for n in names})
    return out


def best_composed(rows: Sequence[VariantRow]) -> str:
    """The composed variant (plain or stacked under torch.compile) with the lowest latency among those that ran
    within tolerance; "" when none did."""
    ok = [r for r in rows if r.name in COMPOSED_VARIANTS and r.status == OK and r.time is not None]
    return min(ok, key=lambda r: r.time.median_ms).name if ok else ""


def best_note(rows: Sequence[VariantRow], best: str) -> str:
    """One line: the best composed variant against eager and against the best torch.compile variant."""
    by = {r.name: r for r in rows}
    b = by[best]
    line = f"best composed variant: {best}, {b.time.median_ms:.4g} ms, {b.speedup:.2f}x over eager"
    peers = [r for r in rows if r.name in _COMPILE_MODE and r.status == OK and r.time is not None]
    if peers:
        peer = min(peers, key=lambda r: r.time.median_ms)
        line += f", {peer.time.median_ms / b.time.median_ms:.2f}x over {peer.name} (the best torch.compile)"
    if b.throughput is not None and b.throughput_speedup is not None:
        line += f"; back to back {b.throughput.median_ms:.4g} ms per call, {b.throughput_speedup:.2f}x over eager"
    return line


def _on_cuda(loaded: Any) -> Any:
    import torch

    loaded.module.to("cuda")
    inputs = tuple(x.to("cuda") if isinstance(x, torch.Tensor) else x for x in loaded.inputs)
    return dataclasses.replace(loaded, inputs=inputs)


def _from_table(ref: str, settings: Any, loaded: Any, policy: Precision, used: dict[str, str],
                families: frozenset[str], say: Say, against: str = "eager") -> Builder:
    def build() -> Variant:
        from fact_ray import artifact as art

        out = artifact_dir(settings, loaded.name, policy, families, against)
        only = f" (families: {', '.join(_family_groups(families))})" if families else ""
        say(f"composed: composing {loaded.name}{only} from the table {settings.resolved_table_uri} into {out}, "
            f"guaranteed against {'torch.compile' if against == 'compile' else 'eager'}")
        # checked end to end on this GPU before it is saved; the guarantee says what it drops and why
        path = art.compose_from_table(ref, settings, out, families, against=against, say=say)
        composed = art.load(path, loaded, device="cuda")  # on the very weights the other variants run
        used["path"] = str(path)
        variant = _composed_variant(composed)
        if against == "compile":  # its row says which composition it compiles (docs/bench.md)
            said = "; ".join(x for x in ("composition guaranteed against torch.compile", variant.note) if x)
            variant = dataclasses.replace(variant, note=said)
        return variant

    return build


def _notes(rows: Sequence[VariantRow], policy: Precision, given_artifact: bool) -> list[str]:
    notes = []
    for r in rows:
        if r.name == COMPOSED and r.kernels == 0:
            where = "the artifact" if given_artifact else "the pattern table"
            notes.append(f"composed: 0 kernels; {where} holds no faster verified kernel for this model under "
                         f"{policy.value}, so the composed module runs every PyTorch op")
    return notes


def _versions() -> dict[str, str]:
    import platform
    from importlib import metadata

    from fact_ray.toolchain import detect

    def dist(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return ""

    host = detect(nvcc=None)  # what timed the variants; benching compiles nothing
    return {**host.recorded(), "cuda": host.torch_cuda, "triton": dist("triton"),
            "python": platform.python_version(), "fact_ray": dist("fact-ray")}


# --------------------------------------------------------------------------------------------- reporting


def _ms(x: Optional[float]) -> str:
    return "-" if x is None else f"{x:.4g}"


def format_table(result: BenchResult):
    """The comparison as a rich Table: one row per variant."""
    from rich.table import Table
    from rich.text import Text

    how = (f"latency of one synchronised call and ms per call of {result.calls} back-to-back calls, medians of "
           f"{result.reps} rounds" if result.calls else f"median of {result.reps} interleaved rounds")
    title = (f"{result.model}  {result.label}  {result.gpu}  ({how}; "
             f"errors vs float64, tolerance {result.tolerance:g}, allclose {result.allclose_tol:g})")
    t = Table(title=Text(title))
    right = {"justify": "right", "no_wrap": True}
    # Eleven columns, so the table fits 120 characters with its notes; max abs err is in the JSON and MLflow.
    for col, kw in (("variant", {"no_wrap": True}), ("status", {"no_wrap": True}),
                    ("latency ms" if result.calls else "median ms", right), ("p10-p90", right),
                    ("speedup", right), ("b2b ms", right), ("b2b x", right), ("rel err", right),
                    ("allclose", {"no_wrap": True}), ("compile s", right), ("kernels", right),
                    ("note", {"overflow": "fold", "ratio": 1})):  # the note takes what the numbers leave
        t.add_column(col, **kw)
    style = {OK: "green", INACCURATE: "yellow", FAILED: "red"}
    for r in result.rows:
        tm = r.time
        t.add_row(r.name, Text(r.status, style=style.get(r.status, "")), _ms(tm and tm.median_ms),
                  "-" if tm is None else f"{tm.p10_ms:.4g}-{tm.p90_ms:.4g}",
                  "-" if r.speedup is None else f"{r.speedup:.2f}x",
                  _ms(r.throughput and r.throughput.median_ms),
                  "-" if r.throughput_speedup is None else f"{r.throughput_speedup:.2f}x",
                  "-" if r.rel_err is None else f"{r.rel_err:.2e}",
                  "-" if r.allclose is None else ("yes" if r.allclose else "NO"),
                  "-" if r.compile_s is None else f"{r.compile_s:.1f}",
                  "-" if r.kernels is None else str(r.kernels), Text(r.reason))
    return t


def table_text(result: BenchResult) -> str:
    """The table and the notes as plain text (for MLflow and files)."""
    from fact_ray.progress import plain_text

    return plain_text(format_table(result), result.notes, width=180)


def to_json(result: BenchResult) -> dict[str, Any]:
    return {"kind": KIND, "schema_version": SCHEMA_VERSION, **to_jsonable(result),
            "versions": dict(result.versions)}


def from_json(data: Mapping[str, Any]) -> BenchResult:
    """A result of this schema version or of version 1 (interleaved timings, no throughput)."""
    if data.get("kind") != KIND or data.get("schema_version") not in (1, SCHEMA_VERSION):
        raise UserError(f"not a {KIND} result of schema version 1 or {SCHEMA_VERSION}")

    def stats(x: Any) -> Optional[TimeStats]:
        return None if x is None else TimeStats(**x)

    rows = tuple(VariantRow(**{**r, "time": stats(r["time"]), "throughput": stats(r.get("throughput"))})
                 for r in data["rows"])
    fields = {f.name for f in dataclasses.fields(BenchResult)}
    kw = {k: v for k, v in data.items() if k in fields}
    kw.update(policy=Precision(data["policy"]), versions=tuple(sorted(data["versions"].items())), rows=rows,
              notes=tuple(data["notes"]), families=tuple(data.get("families", ())))
    return BenchResult(**kw)


def plot(result: BenchResult, png_path: str | Path) -> Path:
    """A bar chart of median ms per variant (p10-p90 as error bars), labelled with the speedup over eager;
    failed variants stand as an empty slot labelled 'failed'."""
    from matplotlib.figure import Figure

    rows = result.rows
    x = list(range(len(rows)))
    timed = [(i, r.time) for i, r in enumerate(rows) if r.time is not None]
    colors = {OK: "tab:blue", INACCURATE: "tab:orange", FAILED: "tab:gray"}
    fig = Figure(figsize=(1.8 * len(rows) + 3, 4.5), dpi=120)
    ax = fig.add_subplot()
    ax.bar(x, [r.time.median_ms if r.time else 0.0 for r in rows],
           color=[colors.get(r.status, "tab:blue") for r in rows])
    ax.errorbar([i for i, _ in timed], [t.median_ms for _, t in timed], fmt="none", ecolor="black", capsize=4,
                yerr=[[t.median_ms - t.p10_ms for _, t in timed], [t.p90_ms - t.median_ms for _, t in timed]])
    top = max((t.p90_ms for _, t in timed), default=0.0) or 1.0
    for i, r in enumerate(rows):
        label = ("failed" if r.status == FAILED else
                 f"{r.speedup:.2f}x" if r.speedup is not None else "-")
        if r.status == INACCURATE:
            label += "\n(inaccurate)"
        ax.text(i, (r.time.p90_ms if r.time else 0.0) + 0.02 * top, label, ha="center", va="bottom")
    ax.set_xticks(x, [r.name for r in rows])
    b2b = [(i, r.throughput.median_ms) for i, r in enumerate(rows) if r.throughput is not None]
    if b2b:
        ax.scatter([i for i, _ in b2b], [t for _, t in b2b], marker="_", s=900, color="black", zorder=3,
                   label="per call, back to back")
        ax.legend(loc="upper right", fontsize=8)
    ax.set_ylabel("latency of one call (ms)" if result.calls else "median time per call (ms)")
    ax.set_ylim(0, top * 1.25)
    how = (f"latency of one synchronised call, medians of {result.reps} rounds" if result.calls
           else f"median of {result.reps} interleaved rounds")
    ax.set_title(f"{result.model}, policy {result.label}, {result.gpu}\nspeedup over eager, {how}", fontsize=10)
    fig.tight_layout()
    path = Path(png_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    return path


@dataclass(frozen=True)
class Outputs:
    json: Path
    png: Path
    text: Path


def write_outputs(result: BenchResult, out_dir: str | Path) -> Outputs:
    """`<out>/bench-<model>-<policy>.{json,png,txt}`."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write bench results to {out}: {e.strerror or e}") from None
    stem = out / f"bench-{safe_name(result.model)}-{result.label}"
    paths = Outputs(json=stem.with_suffix(".json"), png=stem.with_suffix(".png"), text=stem.with_suffix(".txt"))
    paths.json.write_text(json.dumps(to_json(result), indent=1, sort_keys=True, allow_nan=False))
    paths.text.write_text(table_text(result))
    plot(result, paths.png)
    return paths


# --------------------------------------------------------------------------------------------- MLflow


def log_to_mlflow(result: BenchResult, outputs: Outputs, tracking_uri: str,
                  experiment: str = "fact-ray") -> str:
    """One MLflow run, tagged fact_ray.kind=bench: params, per-variant metrics, and the JSON, PNG and text table
    as artifacts. Returns the MLflow run id."""
    from mlflow.entities import Metric, Param, RunTag

    from fact_ray.tracking import _HTTP_ENV_DEFAULTS, TAG_KIND, _client, _experiment_id, _is_http, check_reachable

    if _is_http(tracking_uri):  # short retries, as for `fact-ray run`: a dead server is one line, not minutes
        for k, v in _HTTP_ENV_DEFAULTS.items():
            os.environ.setdefault(k, v)
    check_reachable(tracking_uri)
    client = _client(tracking_uri)
    exp_id = _experiment_id(client, experiment, create=True)
    run = client.create_run(exp_id, run_name=f"bench {result.model} {result.label}",
                            tags={TAG_KIND: "bench"})
    run_id = run.info.run_id
    now = int(time.time() * 1000)
    params = {"model": result.model, "model_ref": result.model_ref, "policy": result.policy.value,
              "gpu": result.gpu, "artifact": result.artifact or "none", "reps": result.reps,
              "warmup": result.warmup, "families": ",".join(result.families) or "all", "calls": result.calls,
              "best_composed": result.best_composed or "none",
              **{f"version.{k}": v for k, v in result.versions}}
    metrics = [Metric(k, v, now, 0) for k, v in _metrics(result).items()]
    tags = [RunTag(f"fact_ray.status.{mlflow_key(r.name)}", r.status) for r in result.rows]
    client.log_batch(run_id, metrics=metrics, params=[Param(k, str(v)) for k, v in params.items()], tags=tags)
    for p in (outputs.json, outputs.png, outputs.text):
        client.log_artifact(run_id, str(p))
    client.set_terminated(run_id, "FINISHED")
    return run_id


def mlflow_key(variant: str) -> str:
    """A variant name as MLflow accepts it in metric and tag names (no "+"): composed+compile -> composed_compile."""
    return variant.replace("+", "_")


def _metrics(result: BenchResult) -> dict[str, float]:
    """Per variant `<variant>.<metric>`; a value that was not measured is left out, never logged as a number."""
    out: dict[str, float] = {}
    for r in result.rows:
        values = {"median_ms": r.time.median_ms if r.time else None, "p10_ms": r.time.p10_ms if r.time else None,
                  "p90_ms": r.time.p90_ms if r.time else None, "speedup": r.speedup, "rel_err": r.rel_err,
                  "throughput_ms": r.throughput.median_ms if r.throughput else None,
                  "throughput_speedup": r.throughput_speedup,
                  "max_abs_err": r.max_abs_err, "compile_s": r.compile_s,
                  "allclose": None if r.allclose is None else float(r.allclose),
                  "kernels": None if r.kernels is None else float(r.kernels)}
        out.update({f"{mlflow_key(r.name)}.{k}": float(v) for k, v in values.items()
                    if v is not None and math.isfinite(v)})
    return out

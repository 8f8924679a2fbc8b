"""KernelConfigs -> translation units of CUTLASS C++ (Sources), rendered from the files in templates/.

The C++ lives in the templates: a TU template per kernel family (`sm80_gemm.cu.in` for CUTLASS 2.x,
`sm90_gemm.cu.in` for 3.x, `sm90_tf32x3.cu.in` for Hopper's fp32-class 3xTF32 over K-concatenated splits), a
per-config instance template for each, and shared headers (`fr_abi.h`, the C ABI; `fr_common.h`, C++ helpers;
a family's own, such as `fr_tf32x3_mainloop.hpp`; `fr_sm90_launch.hpp`, the 3.x launch choices, for sm90_gemm and
sm90_swiglu) pasted into every TU so that a Source is self-contained and its text is the whole build input.
Python only fills `{{name}}` slots with numbers and C++ type spellings (most from cutlass_library's own *Tag
tables).

Several configs share a TU (compile time is dominated by per-TU template parsing and NVVM): 2.x instances are
cheap (~1 s each), so up to 16 per TU; sm90 instances cost 5-11 s each after the first, so up to 8, grouped by
schedule and fusion so that a TU instantiates few distinct collectives. Configs that differ only in what is a
run-time argument (the K split) share one instance and one symbol; configs that differ only in their 3.x launch
choices (raster, swizzle, decomposition) have their own symbols over one kernel, compiled once in their TU.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from fact_ray.realize.targets import AMPERE_AND_HOPPER, HOPPER_ONLY
from fact_ray.types import Arch, KernelConfig, Source, to_jsonable

TEMPLATE_DIR = Path(__file__).parent / "templates"
ABI_VERSION = 1
LAUNCH_HEADER = "fr_sm90_launch.hpp"  # fr::Launch and the scheduler arguments it sets, for 3.x TUs that take them


@dataclass(frozen=True)
class GemmTemplate:
    """One of the GEMM family's TU templates (`<name>.cu.in`) and what emitting and building its TUs needs."""

    name: str
    instance: str  # the per-config instance template file
    max_per_tu: int  # configs per TU (compile time is dominated by per-TU parsing and NVVM)
    flags: tuple[str, ...]  # nvcc targets, carried on its Sources
    compile_fields: tuple[str, ...]  # KernelConfig fields that change the C++ of an instance
    headers: tuple[tuple[str, str], ...] = ()  # (TU slot, header file) pasted beside fr_abi.h and fr_common.h


# Fields that change the C++ of an instance. Not: name, split_k (run-time), precision and arch (implied by
# element/math_op; the Source's flags decide the targets).
_SHARED_FIELDS = ("template", "element", "opclass", "math_op", "tile", "stages", "alignment", "layout_a",
                  "layout_b", "epilogue", "activation")
_SM90_FIELDS = _SHARED_FIELDS + ("cluster", "kernel_schedule", "epilogue_schedule", "tile_scheduler")
# 3.x launch choices (sm90_gemm, and sm90_swiglu in realize/swiglu.py): compile-time constants of an instance (so
# they change its symbol) that leave the kernel itself alone (fr::Launch of fr_sm90_launch.hpp, not the Spec). They
# join the compile key only when set, so configs from before they existed keep their symbols, and stored winners
# still find their kernels.
LAUNCH_FIELDS = {"raster": "", "max_swizzle": 0, "decomposition": ""}
RASTER = {"": 0, "along_m": 1, "along_n": 2}
DECOMPOSITION = {"": 0, "stream_k": 1, "data_parallel": 2}
GEMM_TEMPLATES = {t.name: t for t in (
    # 2.x kernels run on A100 and on Hopper (mma.sync; the only 3xTF32 path on sm90); cheap, ~1 s an instance.
    GemmTemplate("sm80_gemm", "sm80_instance.cu.in", 16, AMPERE_AND_HOPPER,
                 _SHARED_FIELDS + ("instruction", "warps", "swizzle")),
    # 3.x: WGMMA/TMA code for sm_90a, 5-11 s an instance after the first.
    GemmTemplate("sm90_gemm", "sm90_instance.cu.in", 8, HOPPER_ONLY, _SM90_FIELDS + tuple(LAUNCH_FIELDS),
                 headers=(("launch_header", LAUNCH_HEADER),)),
    # tf32x3 TUs also carry the split kernels and compile slower per distinct kernel (~35 s for the first, ~5-10 s
    # each after; instances that differ only in operand layouts or promotion share one kernel and cost ~nothing).
    # kernel_schedule carries the promotion ("TF32x3PromotedG4Stagger"); layouts change the split calls.
    GemmTemplate("sm90_tf32x3", "sm90_tf32x3_instance.cu.in", 4, HOPPER_ONLY, _SM90_FIELDS,
                 headers=(("mainloop_header", "fr_tf32x3_mainloop.hpp"),)),
)}
# Views by template name (tests and search spaces read these).
TEMPLATES = tuple(GEMM_TEMPLATES)
MAX_PER_TU = {n: t.max_per_tu for n, t in GEMM_TEMPLATES.items()}
COMPILE_FIELDS = {n: t.compile_fields for n, t in GEMM_TEMPLATES.items()}

# fr::EpilogueKind in fr_common.h
EPILOGUE_KIND = {"none": 0, "bias": 1, "bias_act": 2, "bias_residual": 3, "act": 4, "residual": 5}
# Epilogues that read C (the residual, beta = 1), and those that need a 3.x fusion operation (a TMA epilogue).
C_EPILOGUES = {"bias_residual", "residual"}
FUSED_EPILOGUES = {"bias", "bias_act", "bias_residual", "act"}

# cutlass/epilogue/thread/activation.h functors; GELU is erf-exact (F.gelu), GELU_taylor is the tanh form.
ACTIVATION_TAG = {
    "none": "cutlass::epilogue::thread::Identity",
    "relu": "cutlass::epilogue::thread::ReLu",
    "gelu": "cutlass::epilogue::thread::GELU",
    "gelu_tanh": "cutlass::epilogue::thread::GELU_taylor",
    "silu": "cutlass::epilogue::thread::SiLu",
}

ELEMENT_TAG = {"float": "float", "bfloat16_t": "cutlass::bfloat16_t", "half_t": "cutlass::half_t",
               "tfloat32_t": "cutlass::tfloat32_t"}

# A "col" B is an nn.Linear weight stored [N, K]: ColumnMajor in CUTLASS's K x N view (the TN case).
LAYOUT_TAG = {"row": "cutlass::layout::RowMajor", "col": "cutlass::layout::ColumnMajor"}

TMA_EPILOGUES = {"TmaWarpSpecialized", "TmaWarpSpecializedCooperative"}

_SLOT = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")


def render(text: str, values: Mapping[str, object]) -> str:
    """Fill `{{name}}` slots. A slot without a value, or a value without a slot, is a bug: raise."""
    slots = set(_SLOT.findall(text))
    missing, unused = slots - set(values), set(values) - slots
    if missing or unused:
        raise KeyError(f"template slots missing values {sorted(missing)}, values without slots {sorted(unused)}")
    return _SLOT.sub(lambda m: str(values[m.group(1)]), text)


@functools.lru_cache(maxsize=None)
def template_text(name: str) -> str:
    return (TEMPLATE_DIR / name).read_text()


def abi_header() -> str:
    """The C ABI every library exports (fr_abi.h), for loaders and documentation."""
    return template_text("fr_abi.h")


def key_of(cfg: KernelConfig, fields: Iterable[str]) -> tuple:
    """((field, value), ...) of `fields`; a launch field joins only when set, so configs from before launch
    choices existed keep their symbols."""
    return tuple((f, to_jsonable(getattr(cfg, f))) for f in fields
                 if f not in LAUNCH_FIELDS or getattr(cfg, f) != LAUNCH_FIELDS[f])


def compile_key(cfg: KernelConfig) -> tuple:
    if cfg.template not in COMPILE_FIELDS:
        raise ValueError(f"unknown kernel template {cfg.template!r} (have {', '.join(TEMPLATES)})")
    return key_of(cfg, COMPILE_FIELDS[cfg.template])


def kernel_of(key: tuple) -> str:
    """A compile key without its launch choices, as a JSON string: equal for configs that differ only in raster,
    swizzle or decomposition, whose kernel one TU then compiles once."""
    return json.dumps([(f, v) for f, v in key if f not in LAUNCH_FIELDS])


def kernel_key(cfg: KernelConfig) -> str:
    """The compiled kernel of a config (kernel_of its compile key)."""
    return kernel_of(compile_key(cfg))


def symbol(cfg: KernelConfig) -> str:
    """The C symbol prefix of a config's instance: equal for configs that compile to the same code."""
    digest = hashlib.sha256(json.dumps(compile_key(cfg), sort_keys=True).encode()).hexdigest()
    return f"fr_{digest[:20]}"


def describe(cfg: KernelConfig) -> str:
    """A one-line, split-free description of an instance (for the TU's comments)."""
    return " ".join(f"{f}={_short(v)}" for f, v in compile_key(cfg))


def _short(v: object) -> str:
    if isinstance(v, list):
        return "x".join(str(x) for x in v)
    return str(v) if v != "" else "-"


def _instance_values(cfg: KernelConfig, sym: str) -> dict[str, object]:
    from cutlass_library import library as lib

    if cfg.epilogue not in EPILOGUE_KIND:
        raise ValueError(f"{cfg.name}: unknown epilogue {cfg.epilogue!r}")
    if cfg.activation not in ACTIVATION_TAG:
        raise ValueError(f"{cfg.name}: unknown activation {cfg.activation!r}")
    if cfg.template != "sm90_gemm":
        set_launch = {f: getattr(cfg, f) for f, v in LAUNCH_FIELDS.items() if getattr(cfg, f) != v}
        if set_launch:
            raise ValueError(f"{cfg.name}: {cfg.template} takes no launch choices, the config sets {set_launch}")
    if cfg.template == "sm90_tf32x3":
        return _tf32x3_values(cfg, sym)
    common = {
        "sym": sym, "name": describe(cfg), "element": ELEMENT_TAG[cfg.element],
        "layout_a": LAYOUT_TAG[cfg.layout_a], "layout_b": LAYOUT_TAG[cfg.layout_b],
        "activation": ACTIVATION_TAG[cfg.activation], "epilogue_kind": EPILOGUE_KIND[cfg.epilogue],
        "tile_m": cfg.tile[0], "tile_n": cfg.tile[1], "tile_k": cfg.tile[2], "stages": cfg.stages,
        "align_a": cfg.alignment[0], "align_b": cfg.alignment[1], "align_c": cfg.alignment[2],
    }
    if cfg.template == "sm80_gemm":
        return common | {
            "opclass": lib.OpcodeClassTag[lib.OpcodeClass.Simt if cfg.opclass == "simt" else lib.OpcodeClass.TensorOp],
            "math_op": lib.MathOperationTag[lib.MathOperation[cfg.math_op]],
            "swizzle": lib.SwizzlingFunctorTag[lib.SwizzlingFunctor[cfg.swizzle]],
            "warps_m": cfg.warps[0], "warps_n": cfg.warps[1], "warps_k": cfg.warps[2],
            "inst_m": cfg.instruction[0], "inst_n": cfg.instruction[1], "inst_k": cfg.instruction[2],
        }
    tma_epilogue = cfg.epilogue_schedule in TMA_EPILOGUES
    if cfg.epilogue in FUSED_EPILOGUES and not tma_epilogue:
        raise ValueError(f"{cfg.name}: epilogue {cfg.epilogue} needs a TMA epilogue schedule, "
                         f"not {cfg.epilogue_schedule}")
    # C is loaded only for a residual; without one TMA epilogues drop it entirely (void), the others never read it.
    c_void = tma_epilogue and cfg.epilogue not in C_EPILOGUES
    scheduler = {"": lib.TileSchedulerType.Default, "persistent": lib.TileSchedulerType.Persistent,
                 "stream_k": lib.TileSchedulerType.StreamK}[cfg.tile_scheduler]
    return common | {
        "element_c": "void" if c_void else ELEMENT_TAG[cfg.element],
        "kernel_schedule": lib.KernelScheduleTag[lib.KernelScheduleType[cfg.kernel_schedule or "ScheduleAuto"]],
        "epilogue_schedule": lib.EpilogueScheduleTag[lib.EpilogueScheduleType[cfg.epilogue_schedule or "ScheduleAuto"]],
        "tile_scheduler": lib.TileSchedulerTag[scheduler],
        "cluster_m": cfg.cluster[0], "cluster_n": cfg.cluster[1], "cluster_k": cfg.cluster[2],
        **launch_values(cfg),
    }


def launch_values(cfg: KernelConfig) -> dict[str, object]:
    """fr::Launch's arguments; a choice the config's scheduler cannot take is refused here, before nvcc."""
    if cfg.raster not in RASTER or cfg.decomposition not in DECOMPOSITION or cfg.max_swizzle not in (0, 1, 2, 4, 8):
        raise ValueError(f"{cfg.name}: unknown launch choice raster={cfg.raster!r} "
                         f"max_swizzle={cfg.max_swizzle!r} decomposition={cfg.decomposition!r}")
    if (cfg.raster or cfg.max_swizzle) and cfg.tile_scheduler not in ("persistent", "stream_k") and \
            not _persistent_kernel(cfg):
        raise ValueError(f"{cfg.name}: raster and swizzle need a persistent or stream-K tile scheduler")
    if cfg.decomposition and cfg.tile_scheduler != "stream_k":
        raise ValueError(f"{cfg.name}: decomposition {cfg.decomposition} needs the stream-K tile scheduler")
    return {"raster": RASTER[cfg.raster], "max_swizzle": cfg.max_swizzle,
            "decomposition": DECOMPOSITION[cfg.decomposition]}


def _persistent_kernel(cfg: KernelConfig) -> bool:
    # The default scheduler of the cooperative and ping-pong kernels is the persistent one; ScheduleAuto with a
    # TMA-able config resolves to one of them (rules.resolve_kernel_schedule).
    return "Cooperative" in cfg.kernel_schedule or "Pingpong" in cfg.kernel_schedule


def _tf32x3_values(cfg: KernelConfig, sym: str) -> dict[str, object]:
    """Slots of sm90_tf32x3_instance.cu.in. The family fixes what its template does not read (fp32 operands,
    the cooperative TMA epilogue, A/B of any alignment): a config that says otherwise is refused, not ignored."""
    from cutlass_library import library as lib

    from fact_ray.search_spaces import tf32x3

    try:
        group, stagger = tf32x3.promotion(cfg.kernel_schedule)
    except ValueError as e:
        raise ValueError(f"{cfg.name}: {e}") from None
    fixed = {"element": "float", "opclass": "tensorop", "math_op": tf32x3.MATH_OP,
             "epilogue_schedule": tf32x3.EPILOGUE_SCHEDULE, "alignment": tf32x3.ALIGNMENT}
    wrong = {f: getattr(cfg, f) for f, v in fixed.items() if getattr(cfg, f) != v}
    if wrong or cfg.cluster[2] != 1 or cfg.tile_scheduler not in ("persistent", "stream_k"):
        raise ValueError(f"{cfg.name}: not a tf32x3 config ({wrong or (cfg.cluster, cfg.tile_scheduler)}; the "
                         f"family takes {fixed}, a cluster of depth 1 and a persistent or stream-K scheduler)")
    scheduler = {"persistent": lib.TileSchedulerType.Persistent,
                 "stream_k": lib.TileSchedulerType.StreamK}[cfg.tile_scheduler]
    return {
        "sym": sym, "name": describe(cfg), "epilogue_kind": EPILOGUE_KIND[cfg.epilogue],
        "activation": ACTIVATION_TAG[cfg.activation],
        "a_k_contiguous": "true" if cfg.layout_a == "row" else "false",
        "b_k_contiguous": "true" if cfg.layout_b == "col" else "false",
        "promotion_group": group, "stagger": "true" if stagger else "false",
        "tile_m": cfg.tile[0], "tile_n": cfg.tile[1], "tile_k": cfg.tile[2], "stages": cfg.stages,
        "cluster_m": cfg.cluster[0], "cluster_n": cfg.cluster[1], "tile_scheduler": lib.TileSchedulerTag[scheduler],
    }


def instance(cfg: KernelConfig) -> str:
    """The C++ block (types + extern "C" entry points) of one config."""
    return render(template_text(GEMM_TEMPLATES[cfg.template].instance), _instance_values(cfg, symbol(cfg)))


def translation_unit(template: str, configs: Iterable[KernelConfig]) -> str:
    """One TU holding one instance per distinct symbol among `configs` (in first-seen order)."""
    blocks: dict[str, str] = {}
    for cfg in configs:
        if cfg.template != template:
            raise ValueError(f"{cfg.name}: template {cfg.template} in a {template} translation unit")
        sym = symbol(cfg)
        if sym not in blocks:
            blocks[sym] = instance(cfg)
    listing = "\n".join(f"//   {sym}" for sym in blocks)
    headers = {slot: template_text(name) for slot, name in GEMM_TEMPLATES[template].headers}
    return render(template_text(f"{template}.cu.in"), {
        "listing": listing, "abi_header": abi_header(), "common_header": template_text("fr_common.h"),
        "instances": "\n".join(blocks.values()), **headers,
    })


def balanced(items: list, most: int) -> list[list]:
    """`items` in order, in as few consecutive chunks of at most `most` as they need, as even as they go: 9 with 8
    -> 5 + 4, not 8 + 1 (TUs compile in parallel, so the largest one sets the wall time)."""
    n = math.ceil(len(items) / most)
    chunks, start = [], 0
    for i in range(n):
        size = len(items) // n + (1 if i < len(items) % n else 0)
        chunks.append(items[start:start + size])
        start += size
    return chunks


def _group_key(cfg: KernelConfig) -> tuple:
    # sm90: one TU per element, fusion and schedule family, so each TU instantiates few distinct collectives
    # (a new schedule family costs ~11 s of compile, a new tile ~5 s). 2.x instances are cheap whatever they
    # hold, so any sm80 configs may share a TU.
    if cfg.template == "sm90_gemm":
        return (cfg.template, cfg.element, cfg.epilogue, cfg.activation, cfg.kernel_schedule,
                cfg.epilogue_schedule, cfg.tile_scheduler)
    # tf32x3: the promotion (kernel_schedule) and the layouts are run-time or split-side differences that share
    # one kernel instantiation, so they stay together; fusion and tile scheduler change the kernel.
    if cfg.template == "sm90_tf32x3":
        return (cfg.template, cfg.epilogue, cfg.activation, cfg.tile_scheduler)
    return (cfg.template,)


def emit(configs: Iterable[KernelConfig], arch: Arch) -> list[Source]:
    """Group configs into TUs (configs of one compile key always land together) and render them.

    Source.configs keeps the given configs of that TU in their given order; Source.symbols has each one's
    symbol prefix (repeated for configs that share an instance).
    """
    arch = Arch(arch)
    groups: dict[tuple, list[KernelConfig]] = {}
    for cfg in configs:
        if Arch(cfg.arch) is not arch:
            raise ValueError(f"{cfg.name}: config for {cfg.arch}, emitting for {arch.value}")
        if cfg.template not in TEMPLATES:
            raise ValueError(f"{cfg.name}: unknown kernel template {cfg.template!r}")
        groups.setdefault(_group_key(cfg), []).append(cfg)
    sources = []
    for key, group in groups.items():
        template = key[0]
        # Chunks count distinct kernels (launch variants of one kernel cost nothing more and stay together).
        kernels = list(dict.fromkeys(kernel_key(c) for c in group))
        for members in map(set, balanced(kernels, MAX_PER_TU[template])):
            chunk = [cfg for cfg in group if kernel_key(cfg) in members]
            code = translation_unit(template, chunk)
            name = f"{template}_{hashlib.sha256(code.encode()).hexdigest()[:16]}"
            sources.append(Source(name=name, arch=arch, code=code, configs=tuple(chunk),
                                  symbols=tuple(symbol(c) for c in chunk), flags=GEMM_TEMPLATES[template].flags))
    return sources

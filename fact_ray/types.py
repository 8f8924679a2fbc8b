"""The nouns of fact-ray: frozen dataclasses passed between stages.

Data flows one way (see docs/architecture in the shared folder):

    ModelSpec -> Graph -> [Match] -> [Candidate] -> [Source] -> [Library] -> [Trial] -> Winner

Every value here is immutable and made of plain Python values (str, int, float, tuples), so it pickles across
Ray processes and hashes into cache keys. Nothing here imports torch, Ray, MLflow or any other stage.
"""

from __future__ import annotations

import enum
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any, ClassVar, Mapping


class Precision(str, enum.Enum):
    """A user's choice of numerics. Part of every key, report and comparison."""

    FP32 = "fp32"  # fp32-class accuracy: SIMT or 3xTF32 tensor ops
    TF32 = "tf32"  # 1xTF32 tensor ops allowed
    BF16 = "bf16"  # bf16 operands, fp32 accumulation
    FP16 = "fp16"  # fp16 operands, fp32 accumulation

    @property
    def tolerance(self) -> float:
        """Relative Frobenius-norm tolerance of measuring.md."""
        return {"fp32": 1e-5, "tf32": 1e-3, "bf16": 2e-2, "fp16": 2e-2}[self.value]

    @property
    def allclose_tol(self) -> float:
        """KernelBench's atol = rtol for this policy."""
        return {"fp32": 1e-4, "tf32": 1e-2, "bf16": 1e-2, "fp16": 1e-2}[self.value]

    def serves(self, policy: "Precision") -> bool:
        """Whether a kernel of this numeric class may run under `policy`: its own, and fp32-class kernels (3xTF32,
        SIMT) under tf32, whose operands are the same float32 tensors held to a looser tolerance."""
        return self == policy or (self == Precision.FP32 and policy == Precision.TF32)


class Arch(str, enum.Enum):
    """Target architectures. sm90 means sm_90a (H100/H200) for 3.x kernels."""

    SM80 = "sm80"
    SM90 = "sm90"

    @property
    def cc(self) -> int:
        return int(self.value[2:])


def freeze(mapping: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """A mapping as a sorted tuple of pairs, so that it can live in a frozen dataclass and hash."""
    return tuple(sorted((str(k), _freeze_value(v)) for k, v in mapping.items()))


def _freeze_value(v: Any) -> Any:
    if isinstance(v, dict):
        return freeze(v)
    if isinstance(v, list):
        return tuple(_freeze_value(x) for x in v)
    return v


def to_jsonable(obj: Any) -> Any:
    """Dataclasses, enums and tuples as JSON-ready values (for --json, reports and tables)."""
    if hasattr(obj, "__dataclass_fields__"):
        return {f.name: to_jsonable(getattr(obj, f.name)) for f in fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    return obj


def content_hash(*parts: Any) -> str:
    """A stable sha256 over JSON-serialised parts (dataclasses included)."""
    h = hashlib.sha256()
    for p in parts:
        h.update(json.dumps(to_jsonable(p), sort_keys=True, default=str).encode())
        h.update(b"\0")
    return h.hexdigest()


def file_sha256(path: Any) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (compiled libraries are a few MB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- capture


@dataclass(frozen=True)
class ModelSpec:
    """What the user pointed us at: a KernelBench-format file or `pkg.module:factory`."""

    ref: str  # the path or "pkg.module:factory" as given


@dataclass(frozen=True)
class TensorMeta:
    shape: tuple[int, ...]
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "float32"
    stride: tuple[int, ...]

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    @property
    def contiguous(self) -> bool:
        expect, acc = [], 1
        for s in reversed(self.shape):
            expect.append(acc)
            acc *= s
        return tuple(reversed(expect)) == self.stride or self.numel <= 1

    @property
    def itemsize(self) -> int:
        return DTYPE_BYTES.get(self.dtype, 4)


DTYPE_BYTES = {"float64": 8, "float32": 4, "bfloat16": 2, "float16": 2, "int64": 8, "int32": 4, "bool": 1,
               "int8": 1, "uint8": 1}


@dataclass(frozen=True)
class Ref:
    """A reference to another node inside Node.args."""

    name: str


@dataclass(frozen=True)
class Node:
    """One node of the traced graph, in the order the graph runs them."""

    name: str
    op: str  # "placeholder" | "get_attr" | "call_function" | "output"
    target: str  # canonical op name, e.g. "aten.linear.default"; the input kind for placeholders
    args: tuple[Any, ...] = ()  # Ref for node inputs, plain values otherwise (nested tuples allowed)
    kwargs: tuple[tuple[str, Any], ...] = ()
    meta: TensorMeta | None = None  # output tensor (first output for multi-output ops)
    kind: str = ""  # placeholders: "input" | "parameter" | "buffer" | "constant"

    def kwarg(self, key: str, default: Any = None) -> Any:
        return dict(self.kwargs).get(key, default)


@dataclass(frozen=True)
class Graph:
    model_name: str
    model_hash: str  # content hash of the model's source and init args
    capture: str  # "export" | "fx"
    nodes: tuple[Node, ...]

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def users(self, name: str) -> tuple[str, ...]:
        out = []
        for n in self.nodes:
            if any(isinstance(a, Ref) and a.name == name for a in _walk(n.args)) or any(
                isinstance(a, Ref) and a.name == name for a in _walk(tuple(v for _, v in n.kwargs))
            ):
                out.append(n.name)
        return tuple(out)


def _walk(args: Any):
    for a in args:
        if isinstance(a, (tuple, list)):
            yield from _walk(a)
        else:
            yield a


# --------------------------------------------------------------------------------------------- discover


@dataclass(frozen=True)
class Match:
    """A subgraph that one rule recognised, with the parameters its kernel family needs."""

    rule: str  # rule name, e.g. "linear_bias_act"
    family: str  # kernel family: gemm | gemm_bias | gemm_bias_act | gemm_bias_residual | bmm | attention | layernorm | rmsnorm | swiglu
    nodes: tuple[str, ...]  # graph nodes covered, in graph order
    anchor: str  # the node whose value the subgraph produces
    params: tuple[tuple[str, Any], ...]  # frozen mapping, e.g. M, N, K, L, activation, eps, causal, scale
    dtype: str
    shapes: tuple[tuple[int, ...], ...]  # shapes of the subgraph's tensor inputs
    flops: int = 0
    bytes: int = 0
    est_time_s: float = 0.0
    share: float = 0.0  # share of the module's estimated (or measured) time
    measured: bool = False  # est_time_s comes from an eager profile on a GPU

    def param(self, key: str, default: Any = None) -> Any:
        return dict(self.params).get(key, default)

    @property
    def shape_signature(self) -> str:
        return ";".join("x".join(str(d) for d in s) for s in self.shapes)

    @property
    def key(self) -> str:
        """What makes two matches the same tuning problem (policy, arch and toolchain are added by the table)."""
        ps = ",".join(f"{k}={v}" for k, v in self.params if k != "operands")
        return f"{self.rule}|{self.shape_signature}|{self.dtype}|{ps}"


# --------------------------------------------------------------------------------------------- realize


@dataclass(frozen=True)
class GemmProblem:
    """One GEMM-family problem as a kernel sees it: D[L,M,N] = epilogue(A[L,M,K] @ B[L,K,N]).

    layout_b "col" means B is stored as [N, K] row-major (an nn.Linear weight): the TN case.
    A batch stride of 0 broadcasts that operand over L.
    """

    M: int
    N: int
    K: int
    L: int = 1
    dtype: str = "float32"  # torch dtype of A, B and D
    layout_a: str = "row"  # "row": A[M,K] row-major | "col": A stored [K,M]
    layout_b: str = "col"  # "col": B stored [N,K] (Linear weight) | "row": B stored [K,N]
    epilogue: str = "none"  # none | bias | bias_act | bias_residual | act | residual (no bias)
    activation: str = "none"  # none | relu | gelu | gelu_tanh | silu
    broadcast_b: bool = False  # B shared across the batch (batch stride 0)

    @property
    def flops(self) -> int:
        return 2 * self.M * self.N * self.K * self.L


@dataclass(frozen=True)
class KernelConfig:
    """One point of a search space: everything that changes the emitted C++."""

    template: str  # template file family: "sm80_gemm" (CUTLASS 2.x) | "sm90_gemm" (3.x CollectiveBuilder)
    name: str  # unique, readable name (the cutlass_library procedural name plus our suffixes)
    arch: Arch
    precision: Precision
    element: str  # CUTLASS operand element: float | tfloat32_t | bfloat16_t | half_t
    opclass: str  # tensorop | simt
    math_op: str  # multiply_add | multiply_add_fast_f32 | ...
    instruction: tuple[int, int, int]
    tile: tuple[int, int, int]
    warps: tuple[int, int, int] = (1, 1, 1)  # 2.x only
    cluster: tuple[int, int, int] = (1, 1, 1)  # 3.x only
    stages: int = 0  # 0: the builder decides (3.x)
    kernel_schedule: str = ""  # 3.x
    epilogue_schedule: str = ""  # 3.x
    tile_scheduler: str = ""  # 3.x: "" (default) | persistent | stream_k
    swizzle: str = "Identity8"  # 2.x threadblock swizzle
    split_k: int = 1  # serial split-K (2.x) or stream-K splits (3.x)
    alignment: tuple[int, int, int] = (1, 1, 1)  # A, B, C/D in elements
    layout_a: str = "row"
    layout_b: str = "col"
    epilogue: str = "none"
    activation: str = "none"
    # 3.x persistent and stream-K tile schedulers: which way the grid walks the output tiles, and how many tiles
    # along the other mode one swizzle group holds (L2 reuse of A rows or B columns). Compile-time constants of
    # the instance; the kernel they launch is the same, so emit compiles it once per TU for all of them.
    raster: str = ""  # "" (the scheduler's heuristic) | "along_m" | "along_n"
    max_swizzle: int = 0  # 0: CUTLASS's default (1)
    # 3.x stream-K scheduler: how the MAC loop is shared out. "" lets its heuristic choose (split-K when
    # split_k > 1); "stream_k" forces stream-K units, "data_parallel" forces one CTA per output tile.
    decomposition: str = ""


@dataclass(frozen=True)
class AttentionConfig:
    """One attention kernel (CUTLASS example 41 in one block shape, or the Hopper FMHA of example 88)."""

    TEMPLATES: ClassVar[tuple[str, ...]] = ("attention_sm80", "fmha_sm90")

    template: str  # attention_sm80 (example 41) | fmha_sm90 (example 88)
    name: str
    arch: Arch
    precision: Precision
    element: str  # CUTLASS element of q, k, v: float | bfloat16_t | half_t
    math_op: str  # how float32 multiplies: multiply_add_fast_f32 (3xTF32) | multiply_add (one TF32 product)
    block: tuple[int, int, int]  # queries, keys, max head dim of one thread block


@dataclass(frozen=True)
class NormConfig:
    """Our row LayerNorm/RMSNorm kernel for one element type, in one launch shape (realize/norm.py). lanes 0 is the
    general kernel alone (what was stored before launch shapes were searched)."""

    TEMPLATES: ClassVar[tuple[str, ...]] = ("norm",)

    template: str
    name: str
    arch: Arch
    precision: Precision
    element: str  # float | bfloat16_t | half_t
    lanes: int = 0  # threads per row of the row kernel (32 .. 1024); 0: the general kernel only
    rows_per_block: int = 1
    items: int = 0  # 16-byte vectors per thread, held in registers


@dataclass(frozen=True)
class RopeConfig:
    """Our rotary position embedding kernel (realize/rope.py) for one element type, in one launch shape."""

    TEMPLATES: ClassVar[tuple[str, ...]] = ("rope",)

    template: str
    name: str
    arch: Arch
    precision: Precision
    element: str  # float | bfloat16_t | half_t
    threads: int  # threads a block
    units: int  # 16-byte units a thread


GemmConfig = KernelConfig  # the GEMM families' config (sm80_gemm, sm90_gemm, sm90_tf32x3) under its own name
AnyConfig = KernelConfig | AttentionConfig | NormConfig | RopeConfig
CONFIG_TYPES: tuple[type, ...] = (KernelConfig, AttentionConfig, NormConfig, RopeConfig)
# Before configs had family types, attention and norm configs were stored as KernelConfigs, whose GEMM fields
# carried no meaning for them (tile was the attention block): such a stored config still loads.
_LEGACY_FIELDS = frozenset(f.name for f in fields(KernelConfig))


def config_from_dict(data: Mapping[str, Any]) -> AnyConfig:
    """A stored config (table row, artifact manifest) as its family's type, chosen by its template. Raises
    ValueError (one line) for an unknown template or a field this version does not know: every field changes the
    emitted C++, so dropping one would silently run a different kernel."""
    data = dict(data)
    template = data.get("template")
    cls = next((c for c in CONFIG_TYPES[1:] if template in c.TEMPLATES), KernelConfig)
    names = {f.name for f in fields(cls)}
    if cls is not KernelConfig and "opclass" in data and set(data) <= _LEGACY_FIELDS:
        if cls is AttentionConfig:
            data["block"] = data.get("tile")
        data = {k: v for k, v in data.items() if k in names}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"stored kernel config {data.get('name', '?')!r} has fields this fact-ray does not know: "
                         f"{', '.join(unknown)}")
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
    try:
        kw["arch"], kw["precision"] = Arch(kw["arch"]), Precision(kw["precision"])
        return cls(**kw)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"stored kernel config {data.get('name', '?')!r} does not load: {e}") from None


@dataclass(frozen=True)
class Candidate:
    """A configuration to try on one problem."""

    match_key: str  # stable key of the pattern being tuned
    problem: GemmProblem
    config: KernelConfig


@dataclass(frozen=True)
class Source:
    """One translation unit of emitted C++: several configurations behind one plain C ABI."""

    name: str  # file stem, unique per content
    arch: Arch
    code: str
    configs: tuple[Any, ...]  # one family's configs (KernelConfig, AttentionConfig, NormConfig, ...)
    symbols: tuple[str, ...]  # exported C symbols, in config order (prefixes: <sym>_workspace, _can_implement, _run)
    # What the family that wrote it needs from nvcc, so that the build knows no family: -gencode targets and other
    # flags (keyed), and include folders beyond CUTLASS's (not keyed: machine paths). An include folder is a path,
    # "cutlass:<folder under the CUTLASS package>" or "header:<file>" (a folder of the CUDA toolkit or of an
    # nvidia-* wheel that holds that header), resolved by the build on the node that compiles.
    flags: tuple[str, ...] = ()
    include_dirs: tuple[str, ...] = ()


@dataclass(frozen=True)
class Library:
    """A compiled translation unit, or the record of a failed compile."""

    source: Source
    key: str  # content key of the build (source, compiler, flags, CUTLASS version, arch)
    ok: bool
    path: str = ""  # the .so in the build cache when ok
    log: str = ""  # compiler output (the whole log on failure)
    seconds: float = 0.0
    cached: bool = False


@dataclass(frozen=True)
class TimeStats:
    median_ms: float
    p10_ms: float
    p90_ms: float
    reps: int


class TrialStatus(str, enum.Enum):
    """How one candidate's trial ended. A str enum: stored rows and events keep the plain string values."""

    OK = "ok"  # verified and faster than the PyTorch op beyond noise (the op's own trial is "ok" too)
    SLOWER = "slower"  # verified, not faster
    WRONG = "wrong"  # verification failed
    COMPILE_ERROR = "compile_error"  # its library did not build or load
    CANNOT_IMPLEMENT = "cannot_implement"  # operand checks or the kernel's can_implement refused the real shapes
    CRASHED = "crashed"  # its launch failed or faulted, or its worker died
    TIMEOUT = "timeout"  # no result within the trial time limit; the worker was killed
    FAILED = "failed"  # our own trial code raised (a bug): recorded, the worker replaced
    # Written by the nightly re-tune (fact_ray.nightly) about an incumbent, never by a first tuning:
    INVALIDATED = "invalidated"  # failed verification on a re-check: never served again for its key
    DEMOTED = "demoted"  # verified on a re-measurement, but no longer the winner
    REVERIFIED = "reverified"  # a note: re-checked under a new environment (its ok row follows)

    @property
    def correct(self) -> bool:
        """Verified against float64 (whether or not it is faster)."""
        return self in (TrialStatus.OK, TrialStatus.SLOWER, TrialStatus.DEMOTED)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Trial:
    """The outcome of one candidate: verified and timed, or the reason it was not."""

    candidate_name: str  # the config's name, or "torch" for the PyTorch op
    status: TrialStatus  # a plain string is accepted and parsed
    error: str = ""  # reason, one line
    rel_err: float = float("nan")
    max_abs_err: float = float("nan")
    time: TimeStats | None = None
    baseline: TimeStats | None = None  # the PyTorch op, timed interleaved in the same process
    tflops: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "status", TrialStatus(self.status))

    @property
    def speedup(self) -> float:
        if self.time is None or self.baseline is None or self.time.median_ms <= 0:
            return float("nan")
        return self.baseline.median_ms / self.time.median_ms


@dataclass(frozen=True)
class Winner:
    """The selected realization of one pattern: a verified kernel, or the PyTorch op itself."""

    match_key: str
    rule: str
    precision: Precision
    arch: Arch
    config: Any  # the family's config (KernelConfig, AttentionConfig, ...); None: the PyTorch op stays
    trial: Trial
    library_key: str = ""
    trials: tuple[Trial, ...] = field(default=())


def as_dict(obj: Any) -> dict[str, Any]:
    return asdict(obj)

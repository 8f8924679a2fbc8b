"""A roofline cost model: FLOPs and the fewest bytes of every match, time = max(flops / rate, bytes / bandwidth),
and each match's share of the module's estimated time (Amdahl: what tuning it can win at most).

The module total also counts every op no rule matched, at its memory time (its inputs read and output written;
views and identities move nothing), so shares are not inflated by leaving the glue out.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from fact_ray.discover.rules import GEMM_FAMILIES
from fact_ray.discover.view import IDENTITY_OPS, VIEW_OPS, GraphView, is_assertion
from fact_ray.config import parse_arch, parse_policy
from fact_ray.errors import UnknownArch
from fact_ray.types import DTYPE_BYTES, Arch, Graph, Match, Precision


@dataclass(frozen=True)
class Roofline:
    tensor_flops: dict[Precision, float]  # dense GEMM rate per precision policy, FLOP/s
    simt_flops: float  # plain fp32 FLOP/s (norms, softmax, elementwise)
    bandwidth: float  # DRAM bytes/s, reads and writes counted


# sm80: A100 datasheet (312 TFLOP/s bf16/fp16 dense, 156 TF32, 19.5 fp32, 2.0 TB/s).
# sm90: the ceilings measuring.md reads on an H200 (bf16 dense cuBLAS 675-800 -> 790, TF32 ~380, fp32 SIMT ~51,
# device copy 4.3 TB/s; an H100 copies at ~3.0 TB/s, so memory-bound estimates are optimistic there).
# fp32 policy: the SIMT rate (3xTF32 may beat it; the estimate stays on the safe side).
ROOFLINES: dict[Arch, Roofline] = {
    Arch.SM80: Roofline({Precision.FP32: 19.5e12, Precision.TF32: 156e12, Precision.BF16: 312e12,
                         Precision.FP16: 312e12}, simt_flops=19.5e12, bandwidth=2.0e12),
    Arch.SM90: Roofline({Precision.FP32: 51e12, Precision.TF32: 380e12, Precision.BF16: 790e12,
                         Precision.FP16: 790e12}, simt_flops=51e12, bandwidth=4.3e12),
}


def resolve_arch(arch: Arch | str) -> Arch:
    """An arch this cost model has a roofline for (a string is parsed as --arch is, config.parse_arch)."""
    a = arch if isinstance(arch, Arch) else parse_arch(str(arch))
    if a not in ROOFLINES:
        raise UnknownArch(f"no cost model for architecture {a.value}: choose one of "
                          f"{', '.join(x.value for x in ROOFLINES)}")
    return a


def resolve_policy(policy: Precision | str) -> Precision:
    return policy if isinstance(policy, Precision) else parse_policy(str(policy))


def element_bytes(dtype: str, policy: Precision) -> int:
    """Bytes per operand element a kernel under this policy moves: bf16/fp16 policies cast operands to 2 bytes."""
    if policy in (Precision.BF16, Precision.FP16):
        return 2
    return DTYPE_BYTES.get(dtype, 4)


def _prod(xs) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def work(m: Match, policy: Precision) -> tuple[int, int, bool]:
    """(FLOPs, fewest bytes, runs on tensor cores) of one match."""
    p = dict(m.params)
    e = element_bytes(m.dtype, policy)
    if m.family in GEMM_FAMILIES or m.family == "baddbmm":
        M, N, K, L = p["M"], p["N"], p["K"], p["L"]
        b_copies = 1 if p.get("broadcast_b") else L
        if m.family == "swiglu":  # two GEMMs sharing A, one output
            flops = 2 * (2 * M * N * K * L)
            nbytes = e * (M * K * L + 2 * K * N * b_copies + M * N * L) + (2 * e * N if p.get("has_bias") else 0)
            return flops, nbytes, True
        flops = 2 * M * N * K * L
        nbytes = e * (M * K * L + K * N * b_copies + M * N * L)
        if p.get("has_bias"):
            nbytes += e * N
        if p.get("residual"):
            nbytes += e * M * N * L
        return flops, nbytes, True
    if m.family == "attention":
        B, H, S, D = p["B"], p["H"], p["S"], p["D"]
        kv = p.get("kv_heads", H)  # grouped-query attention reads K and V once per key/value head
        # QK^T and PV; a causal kernel skips the blocks above the diagonal, about half the work.
        flops = 4 * B * H * S * S * D
        if p.get("causal"):
            flops //= 2
        return flops, e * 2 * (H + kv) * B * S * D, True
    if m.family in ("layernorm", "rmsnorm"):
        rows, cols = p["rows"], p["cols"]
        params = (2 if m.family == "layernorm" else 1) * cols if p.get("affine") else 0
        return 8 * rows * cols, e * (2 * rows * cols + params), False
    if m.family == "rope":  # x read, y written, the cos and sin tables read once
        n = _prod(p["x_shape"])
        return 3 * n, e * (2 * n + _prod(p["cos_shape"]) + _prod(p["sin_shape"])), False
    raise ValueError(f"no cost formula for family {m.family!r}")


def _nbytes(view: GraphView, name: str) -> int:
    meta = view.meta(name)
    return meta.numel * meta.itemsize if meta is not None else 0


def unmatched_time(graph: Graph, matches: list[Match], roof: Roofline) -> float:
    """Memory time of the ops no match covers (each reads its tensor inputs once and writes its output)."""
    view = GraphView(graph)
    covered = {n for m in matches for n in m.nodes}
    total = 0.0
    for node in graph.nodes:
        if node.op != "call_function" or node.name in covered or is_assertion(node.target) or node.meta is None:
            continue
        p = view.packet(node.name)
        if p in VIEW_OPS:
            continue
        if p in IDENTITY_OPS and view.is_identity(node.name):
            # eval dropout, detach and same-dtype casts hand back their input; clone copies, and so does
            # contiguous() of a strided tensor.
            copies = p == "aten.clone" or (p == "aten.contiguous" and not _input_contiguous(view, node.name))
            if not copies:
                continue
        nbytes = _nbytes(view, node.name) + sum(_nbytes(view, r) for r in set(view.inputs(node.name)))
        flops = 0
        if p in ("aten.mm", "aten.matmul", "aten.bmm", "aten.linear", "aten.addmm", "aten.baddbmm"):
            # A GEMM no rule took (a vector product, an odd broadcast): still compute-heavy, count its FLOPs.
            ins = [view.meta(r) for r in view.inputs(node.name)]
            k = next((m.shape[-1] for m in ins if m is not None and m.shape), 1)
            flops = 2 * node.meta.numel * k
        total += max(nbytes / roof.bandwidth, flops / roof.simt_flops)
    return total


def _input_contiguous(view: GraphView, name: str) -> bool:
    ins = view.inputs(name)
    meta = view.meta(ins[0]) if ins else None
    return meta is not None and meta.contiguous


def estimate(graph: Graph, matches: list[Match], arch: Arch | str, policy: Precision | str) -> list[Match]:
    """Matches with flops, bytes, est_time_s and share filled, ranked by estimated time (largest first)."""
    roof = ROOFLINES[resolve_arch(arch)]
    pol = resolve_policy(policy)
    costed = []
    for m in matches:
        flops, nbytes, tensor = work(m, pol)
        rate = roof.tensor_flops[pol] if tensor else roof.simt_flops
        costed.append(dataclasses.replace(m, flops=flops, bytes=nbytes,
                                          est_time_s=max(flops / rate, nbytes / roof.bandwidth), measured=False))
    total = sum(m.est_time_s for m in costed) + unmatched_time(graph, matches, roof)
    order = {n.name: i for i, n in enumerate(graph.nodes)}
    ranked = sorted(costed, key=lambda m: (-m.est_time_s, order.get(m.anchor, 0)))
    return [dataclasses.replace(m, share=(m.est_time_s / total if total > 0 else 0.0)) for m in ranked]

"""How each rule reads its kernel family's parameters off a match (the conventions later stages rely on).

GEMM family (gemm, gemm_bias, gemm_bias_act, gemm_bias_residual, bmm): M, N, K, L (batch count; a Linear on
[B, T, C] is M = B*T, L = 1), layout_a, layout_b ("col" when B is stored [N, K] like an nn.Linear weight, "row"
when stored [K, N]), activation, has_bias, residual, broadcast_b, operands (role -> node: a, b, bias, residual).
Attention: B, H, S, D, kv_heads (only for grouped-query attention: H_kv < H, K and V read
un-repeated), causal, scale, spelling, operands q, k, v. Norms: rows, cols, eps, affine, operands x,
weight, bias. SwiGLU: M, N, K, L, layout_a, layout_b, has_bias, activation, operands a, b_gate, b_up (+ biases).

A reader returns None to reject a match its family cannot express (a vector product, a partly broadcast batch,
a mask that is not causal); the nodes then stay free for smaller rules. Every reader also returns "dtype" (the
compute dtype, taken off the operands) and "operands"; match.to_match moves them to their Match fields.
"""

from __future__ import annotations

import math
from typing import Any

from fact_ray.discover import evaluate
from fact_ray.discover.match import Bound
from fact_ray.discover.view import GraphView, packet
from fact_ray.types import Node, Ref, TensorMeta


def _prod(xs: tuple[int, ...]) -> int:
    out = 1
    for x in xs:
        out *= x
    return out


def _layout(m: TensorMeta) -> str:
    """Storage of a logical [.., R, C] operand: "row" (C contiguous) or "col" (R contiguous)."""
    if m.stride[-1] == 1 or m.shape[-1] == 1:
        return "row"
    if m.stride[-2] == 1:
        return "col"
    return "row"  # neither dimension is contiguous: the kernel side copies to row-major


# ------------------------------------------------------------------------------------------- checks for rules


def swaps_last_two(view: GraphView, node: Node) -> bool:
    """t / transpose / permute that exchanges exactly the last two dimensions."""
    if not node.args or not isinstance(node.args[0], Ref):
        return False
    src = view.meta(node.args[0].name)
    if src is None:
        return False
    nd = len(src.shape)
    p = packet(node.target)
    if p in ("aten.t", "aten.numpy_T"):
        return nd == 2
    if p == "aten.mT":
        return nd >= 2
    if p == "aten.transpose" and len(node.args) >= 3 and nd >= 2:
        dims = {d % nd for d in node.args[1:3] if isinstance(d, int)}
        return dims == {nd - 2, nd - 1}
    if p == "aten.permute" and len(node.args) >= 2 and isinstance(node.args[1], tuple) and nd >= 2:
        dims = [d % nd for d in node.args[1] if isinstance(d, int)]
        return dims == [*range(nd - 2), nd - 1, nd - 2]
    return False


def keeps_rows(view: GraphView, node: Node) -> bool:
    """A view that only regroups the leading (row) dimensions: [M, N] <-> [B, T, N], the last dim unchanged."""
    if not node.args or not isinstance(node.args[0], Ref) or node.meta is None:
        return False
    src = view.meta(node.args[0].name)
    return src is not None and bool(src.shape) and bool(node.meta.shape) and src.shape[-1] == node.meta.shape[-1]


def plain_add(view: GraphView, node: Node) -> bool:
    """An add without a scaling alpha (x + y, not x + 2*y)."""
    return node.kwarg("alpha", 1) == 1 and len(node.args) == 2


def ignores_input(view: GraphView, node: Node) -> bool:
    """baddbmm(input, A, B) with beta = 0: the input (a zeros or empty scores buffer) is never read."""
    return node.kwarg("beta", 1) == 0 and len(node.args) == 3


def unit_addmm(view: GraphView, node: Node) -> bool:
    return node.kwarg("beta", 1) == 1 and node.kwarg("alpha", 1) == 1 and len(node.args) == 3


def is_vector(node: Node) -> bool:
    """A tensor that is a row vector once leading 1s are dropped (a bias)."""
    m = node.meta
    return m is not None and len(m.shape) >= 1 and all(s == 1 for s in m.shape[:-1])


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def is_nonzero_number(v: Any) -> bool:
    return is_number(v) and v != 0


def is_neg_inf(v: Any) -> bool:
    """-inf, or a number so negative that softmax makes it 0 (finfo.min, -1e9, -1e4)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and v <= -1e4


# ------------------------------------------------------------------------------------------- GEMM family


def gemm_problem(b: Bound, p: str = "") -> dict[str, Any] | None:
    """M, N, K, L, layouts and broadcast of the GEMM bound under prefix p, or None if not a GEMM we can run."""
    g, a = b.node(p + "gemm"), b.meta("a")
    b_src = b.meta(p + "b")
    b_log = b.meta(p + "b_view") or b_src  # B as the op reads it: logically [.., K, N]
    if g is None or g.meta is None or a is None or b_src is None or b_log is None:
        return None
    kind = packet(g.target)
    batched, broadcast_b = False, False
    if kind == "aten.linear":
        if len(b_src.shape) != 2 or len(a.shape) < 2 or a.shape[-1] != b_src.shape[1]:
            return None
        N, K = b_src.shape
        M, L = _prod(a.shape[:-1]), 1
        # B is the weight transposed: a weight stored [N, K] row-major is the "col" (TN) case.
        layout_b = "col" if (b_src.stride[-1] == 1 or K == 1) else ("row" if b_src.stride[-2] == 1 else "col")
    elif kind in ("aten.mm", "aten.addmm"):
        if len(a.shape) != 2 or len(b_log.shape) != 2 or a.shape[1] != b_log.shape[0]:
            return None
        (M, K), N, L = a.shape, b_log.shape[1], 1
        layout_b = _layout(b_log)
    elif kind == "aten.bmm":
        if len(a.shape) != 3 or len(b_log.shape) != 3 or a.shape[2] != b_log.shape[1]:
            return None
        L, M, K = a.shape
        N = b_log.shape[2]
        batched, broadcast_b = True, L > 1 and b_log.stride[0] == 0
        layout_b = _layout(b_log)
    elif kind == "aten.matmul":
        na, nb = len(a.shape), len(b_log.shape)
        if na < 2 or nb < 2 or a.shape[-1] != b_log.shape[-2]:
            return None  # a vector operand is a GEMV: not this family
        K, N = a.shape[-1], b_log.shape[-1]
        if nb == 2:  # [.., M, K] @ [K, N]: one GEMM over the flattened rows
            M, L = _prod(a.shape[:-1]), 1
        else:
            out_batch = tuple(g.meta.shape[:-2])
            L, M = _prod(out_batch), a.shape[-2]
            if _prod(tuple(a.shape[:-2])) != L:
                return None  # A broadcast over the batch: no kernel of ours takes that
            b_batch = tuple(b_log.shape[:-2])
            b_batch_strides = tuple(b_log.stride[:-2])
            if _prod(b_batch) == 1 or all(s == 0 for s in b_batch_strides):
                broadcast_b = L > 1
            elif (1,) * (len(out_batch) - len(b_batch)) + b_batch != out_batch:
                return None  # B broadcast over some batch dims only
            batched = True
        layout_b = _layout(b_log)
    else:
        return None
    if a.dtype != b_src.dtype:
        return None
    return {"M": M, "N": N, "K": K, "L": L, "layout_a": _layout(a), "layout_b": layout_b,
            "broadcast_b": broadcast_b, "batched": batched, "dtype": a.dtype}


def _bias_ok(b: Bound, key: str, n: int) -> bool:
    m = b.meta(key)
    return m is not None and m.numel == n and m.shape[-1] == n


def _gemm_params(b: Bound, *, batched: bool, bias: bool, activation: str = "none",
                 residual: bool = False) -> dict[str, Any] | None:
    prob = gemm_problem(b)
    if prob is None or prob.pop("batched") != batched:
        return None
    operands = {"a": b.get("a"), "b": b.get("b")}
    if bias:
        if not _bias_ok(b, "bias", prob["N"]) or b.meta("bias").dtype != prob["dtype"]:
            return None
        operands["bias"] = b.get("bias")
    if residual:
        res, out = b.meta("residual"), b.meta("residual_add")
        if res is None or out is None or res.shape != out.shape or res.dtype != prob["dtype"]:
            return None
        operands["residual"] = b.get("residual")
    return {**prob, "activation": activation, "has_bias": bias, "residual": residual, "operands": operands}


def read_matmul(b: Bound) -> dict[str, Any] | None:
    return _gemm_params(b, batched=False, bias=False)


def read_batched_matmul(b: Bound) -> dict[str, Any] | None:
    return _gemm_params(b, batched=True, bias=False)


def read_linear_bias(b: Bound) -> dict[str, Any] | None:
    return _gemm_params(b, batched=False, bias=True)


def read_linear_bias_act(b: Bound) -> dict[str, Any] | None:
    return _gemm_params(b, batched=False, bias=True, activation=b.get("activation"))


def read_linear_bias_residual(b: Bound) -> dict[str, Any] | None:
    return _gemm_params(b, batched=False, bias=True, residual=True)


def read_swiglu(b: Bound) -> dict[str, Any] | None:
    gate, up = gemm_problem(b, "gate_"), gemm_problem(b, "up_")
    if gate is None or up is None or gate["batched"] or up["batched"]:
        return None
    if any(gate[k] != up[k] for k in ("M", "N", "K", "L", "layout_b", "dtype")):
        return None
    has_bias = b.has("gate_bias") and b.has("up_bias")
    if b.has("gate_bias") != b.has("up_bias"):
        return None
    operands = {"a": b.get("a"), "b_gate": b.get("gate_b"), "b_up": b.get("up_b")}
    if has_bias:
        if not (_bias_ok(b, "gate_bias", gate["N"]) and _bias_ok(b, "up_bias", up["N"])):
            return None
        operands.update(bias_gate=b.get("gate_bias"), bias_up=b.get("up_bias"))
    gate.pop("batched")
    return {**gate, "activation": "silu", "has_bias": has_bias, "residual": False, "operands": operands}


# ------------------------------------------------------------------------------------------- attention


def _heads(m: TensorMeta) -> tuple[int, int, int, int] | None:
    if len(m.shape) == 4:
        return m.shape  # type: ignore[return-value]
    if len(m.shape) == 3:
        return m.shape[0], 1, m.shape[1], m.shape[2]
    return None


def _kv_heads(b: Bound, role: str, B: int, H: int, S: int, D: int) -> int | None:
    """The key/value heads of `role` ("k" or "v") as bound (before any repeat the match covers), or None when it is
    not [B, H_kv, S, D] with H_kv dividing H, or is repeated in another order than repeat_interleave's."""
    m, out = b.meta(role), b.meta(role + "_repeat")
    if m is None or len(m.shape) != 4:
        return None
    kb, g, ks, kd = m.shape
    if (kb, ks, kd) != (B, S, D) or g < 1 or H % g:
        return None
    if out is None:
        return g
    if tuple(out.shape) != (B, H, S, D) or out.dtype != m.dtype:
        return None
    r = H // g
    if b.has(role + "_repeats"):  # repeat_interleave(x, r, dim=1): query head h reads h // r
        node = b.node(role + "_repeat")
        dim = node.args[2] if len(node.args) > 2 else node.kwarg("dim")
        return g if b.get(role + "_repeats") == r and isinstance(dim, int) and dim % 4 == 1 else None
    # x[:, :, None].expand(B, g, r, S, D).reshape(B, H, S, D): the same order; unsqueezing at dim 1 would tile
    unsq, exp = b.meta(role + "_unsqueeze"), b.meta(role + "_expand")
    if unsq is None or exp is None or tuple(unsq.shape) != (B, g, 1, S, D) or tuple(exp.shape) != (B, g, r, S, D):
        return None
    return g


def _grouped(H: int, kv_heads: int) -> dict[str, int]:
    """kv_heads as a parameter only where K and V have fewer heads than Q: a multi-head match keeps the key (and
    the pattern-table rows) it had before grouped-query attention was realized."""
    return {"kv_heads": kv_heads} if kv_heads != H else {}


def _flat_ok(b: Bound, B: int, H: int, S: int, D: int) -> bool:
    """Either nothing is folded, or the bmm/baddbmm spelling folds batch and heads consistently: q, k, v flattened
    to [B * H, S, D], scores viewed as [B, H, S, S] for the mask and back, the output unfolded to [B, H, S, D]."""
    keys = ("q_flat", "k_flat", "v_flat", "scores_view", "probs_view", "out_view")
    if not any(b.has(k) for k in keys):
        return True
    want = {"q_flat": (B * H, S, D), "k_flat": (B * H, S, D), "v_flat": (B * H, S, D), "scores_view": (B, H, S, S),
            "probs_view": (B * H, S, S), "out_view": (B, H, S, D)}
    for k in keys:
        m = b.meta(k)
        if m is None or tuple(m.shape) != want[k]:
            return False
    return True


def read_attention(b: Bound) -> dict[str, Any] | None:
    if b.has("sdpa"):
        return _read_sdpa(b)
    q, k, v, scores = b.meta("q"), b.meta("k"), b.meta("v"), b.meta("qk")
    if q is None or k is None or v is None or scores is None or not (q.dtype == k.dtype == v.dtype):
        return None
    if len(q.shape) == 4:
        B, H, S, D = q.shape
        kv_heads = _kv_heads(b, "k", B, H, S, D)
        if kv_heads is None or _kv_heads(b, "v", B, H, S, D) != kv_heads or not _flat_ok(b, B, H, S, D):
            return None
    else:
        dims = _heads(q)  # [B * H, S, D] as it is: one head per batch entry
        if dims is None or q.shape != k.shape or v.shape != k.shape or b.has("k_repeat") or b.has("v_repeat") \
                or not _flat_ok(b, -1, -1, -1, -1):
            return None
        B, H, S, D = dims
        kv_heads = H
    dim = b.get("softmax_dim")
    if dim not in (-1, len(b.meta("softmax").shape) - 1):
        return None
    causal = b.has("mask")
    if causal and b.get("mask_n") != S:
        return None
    scale = 1.0
    if b.has("scale_mul"):
        scale = float(b.get("scale_mul"))
    elif b.has("scale_div"):
        scale = 1.0 / float(b.get("scale_div"))
    qk = b.node("qk")
    if qk is not None and packet(qk.target) == "aten.baddbmm":
        alpha = qk.kwarg("alpha", 1)
        if not is_nonzero_number(alpha):
            return None
        scale *= float(alpha)
    return {"B": B, "H": H, "S": S, "D": D, **_grouped(H, kv_heads), "causal": causal, "scale": scale,
            "spelling": "explicit", "dtype": q.dtype,
            "operands": {"q": b.get("q"), "k": b.get("k"), "v": b.get("v")}}


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = (None, None, None, None, 0.0, False, None, False)


def _sdpa_args(node: Node) -> dict[str, Any]:
    return {name: (node.args[i] if i < len(node.args) else node.kwarg(name, _SDPA_DEFAULTS[i]))
            for i, name in enumerate(_SDPA_ARGS)}


def _read_sdpa(b: Bound) -> dict[str, Any] | None:
    node = b.node("sdpa")
    assert node is not None
    arg = _sdpa_args(node)
    q, k, v = b.meta("q"), b.meta("k"), b.meta("v")
    if q is None or k is None or v is None or k.shape != v.shape:
        return None  # cross-attention or a different value width: not this family
    dims = _heads(q)
    if dims is None or not (q.dtype == k.dtype == v.dtype) or arg["dropout_p"] not in (0, 0.0):
        return None
    B, H, S, D = dims
    if len(q.shape) == 4:
        kv_heads = _kv_heads(b, "k", B, H, S, D)
        if kv_heads is None or _kv_heads(b, "v", B, H, S, D) != kv_heads:
            return None
        repeated = b.has("k_repeat") or b.has("v_repeat")
        if kv_heads != H and not repeated and arg["enable_gqa"] is not True:
            return None  # fewer key/value heads without enable_gqa: SDPA itself refuses it
    elif q.shape != k.shape:
        return None
    else:
        kv_heads = H
    causal = bool(arg["is_causal"])
    mask = arg["attn_mask"]
    if isinstance(mask, Ref) and evaluate.all_visible(b.view, mask.name):
        mask = None  # a mask that hides nothing (HF's BERT and ViT without padding): no mask
    if mask is not None:
        found = evaluate.mask_form(b.view, mask.name) if isinstance(mask, Ref) else None
        if found is None or found[0] not in ("keep", "additive") or found[1] != S or causal:
            return None  # an arbitrary mask: no kernel of this family takes it
        causal = True
    scale = arg["scale"]
    scale = float(scale) if is_number(scale) else 1.0 / math.sqrt(D)
    # "sdpa_gqa": SDPA reads the grouped K and V itself (enable_gqa); "sdpa" after a repeat the match covers
    spelling = "sdpa_gqa" if kv_heads != H and not (b.has("k_repeat") or b.has("v_repeat")) else "sdpa"
    return {"B": B, "H": H, "S": S, "D": D, **_grouped(H, kv_heads), "causal": causal, "scale": scale,
            "spelling": spelling, "dtype": q.dtype,
            "operands": {"q": b.get("q"), "k": b.get("k"), "v": b.get("v")}}


def read_baddbmm(b: Bound) -> dict[str, Any] | None:
    """beta * input + alpha * (A @ B) over [L, M, K] @ [L, K, N]: listed, not realized."""
    g, a, bl = b.node("gemm"), b.meta("a"), b.meta("b_view") or b.meta("b")
    if g is None or a is None or bl is None or len(a.shape) != 3 or len(bl.shape) != 3:
        return None
    L, M, K = a.shape
    return {"M": M, "N": bl.shape[2], "K": K, "L": L, "beta": g.kwarg("beta", 1), "alpha": g.kwarg("alpha", 1),
            "dtype": a.dtype, "operands": {"input": b.get("input"), "a": b.get("a"), "b": b.get("b")}}


# ------------------------------------------------------------------------------------------- normalisation


def _norm_operands(b: Bound) -> dict[str, str]:
    ops = {"x": b.get("x")}
    for role in ("weight", "bias"):
        if b.has(role):
            ops[role] = b.get(role)
    return ops


def read_layernorm(b: Bound) -> dict[str, Any] | None:
    x = b.meta("x")
    shape = b.get("normalized_shape")
    if x is None or not isinstance(shape, tuple) or not shape or tuple(x.shape[-len(shape):]) != shape:
        return None
    cols = _prod(shape)
    eps = b.get("eps", 1e-5)
    for role in ("weight", "bias"):
        if b.has(role) and b.meta(role) is not None and b.meta(role).numel != cols:
            return None
    return {"rows": x.numel // cols, "cols": cols, "eps": float(eps), "affine": b.has("weight"),
            "dtype": x.dtype, "operands": _norm_operands(b)}


def read_rmsnorm(b: Bound) -> dict[str, Any] | None:
    x = b.meta("x")
    if x is None or not x.shape:
        return None
    if b.has("upcast"):  # computed in float32 between two casts: only as x's own dtype back again, never a
        up, down, w = b.meta("upcast"), b.meta("downcast"), b.meta("weight")  # float32 model's rows
        if up is None or down is None or w is None or up.dtype != "float32" or x.dtype == "float32" \
                or down.dtype != x.dtype or w.dtype != x.dtype:
            return None
    if b.has("normalized_shape"):  # aten.rms_norm
        shape = b.get("normalized_shape")
        if not isinstance(shape, tuple) or tuple(x.shape[-len(shape):]) != shape:
            return None
        cols = _prod(shape)
    else:  # written out: the mean must run over the last dimension only
        dims = b.get("mean_dims")
        if not isinstance(dims, tuple) or len(dims) != 1 or dims[0] % len(x.shape) != len(x.shape) - 1:
            return None
        cols = x.shape[-1]
    eps = b.get("eps")
    if eps is None:  # torch's default for rms_norm: the dtype's machine epsilon
        import torch

        eps = torch.finfo(getattr(torch, x.dtype)).eps
    if b.has("weight") and (b.meta("weight") is None or b.meta("weight").numel != cols):
        return None
    return {"rows": x.numel // cols, "cols": cols, "eps": float(eps), "affine": b.has("weight"),
            "dtype": x.dtype, "operands": _norm_operands(b)}


# ------------------------------------------------------------------------------------------- rotary embedding

_END = 2 ** 62  # a slice end at or past this is "to the end" (torch spells it 2**63 - 1)


def _slice_is(b: Bound, part: str, ndim: int, D: int, start: int, end: int, step: int) -> bool:
    """x[..., start:end:step] over the last dim (an end past D counts as D)."""
    dim = b.get(part + "_dim")
    if not isinstance(dim, int) or dim % ndim != ndim - 1:
        return False
    got = (b.get(part + "_start", 0) or 0, b.get(part + "_end", _END), b.get(part + "_step", 1) or 1)
    if not all(isinstance(v, int) for v in got):
        return False
    s, e, st = got
    return (s, min(e if e is not None else D, D), st) == (start, end, step)


def _last_dim(value: Any, ndim: int, default: Any = None) -> bool:
    value = default if value is None else value
    return isinstance(value, int) and value % ndim == ndim - 1


def read_rope(b: Bound) -> dict[str, Any] | None:
    """x * cos + rot(x) * sin over x's last dim D, cos and sin broadcast to x: the half form (rotate_half) or the
    interleaved one (rotate_every_two). None for anything else that looks alike (another split, a rotation
    over another dim, tables that do not broadcast to x, mixed dtypes)."""
    x, cos, sin, out = b.meta("x"), b.meta("cos"), b.meta("sin"), b.meta("rope")
    if x is None or cos is None or sin is None or out is None or not 1 <= len(x.shape) <= 4:
        return None
    nd, D = len(x.shape), x.shape[-1]
    if D < 2 or D % 2 or tuple(out.shape) != tuple(x.shape) or not x.stride or x.stride[-1] != 1:
        return None
    rotated = b.meta("rotate")
    if rotated is None or tuple(rotated.shape) != tuple(x.shape):
        return None
    for t in (cos, sin):
        if t.dtype != x.dtype or len(t.shape) > nd or t.shape[-1] != D or \
                any(s not in (1, n) for s, n in zip(t.shape[::-1], x.shape[::-1])):
            return None
    if b.has("odd"):  # interleaved pairs
        if not (_slice_is(b, "odd", nd, D, 1, D, 2) and _slice_is(b, "even", nd, D, 0, D, 2)):
            return None
        stack = b.meta("stack")
        if stack is None or len(stack.shape) != nd + 1 or not _last_dim(b.get("stack_dim"), nd + 1, 0):
            return None
        start = b.get("flatten_start")  # flatten(-2): the stacked pairs' two dims become the last one
        if b.has("flatten_start") and (not isinstance(start, int) or start % (nd + 1) != nd - 1 or
                                       not _last_dim(b.get("flatten_end"), nd + 1, -1)):
            return None
        form = "interleaved"
    else:  # rotate_half: cat(-second, first) over the last dim
        if not _last_dim(b.get("cat_dim"), nd, 0):
            return None
        if b.has("split"):
            if b.get("first_index") != 0 or b.get("second_index") != 1 or not _last_dim(b.get("split_dim"), nd, 0):
                return None
            split = b.node("split")
            how = split.target if split is not None else ""
            arg = b.get("split_arg")
            if not ((arg == 2 and "chunk" in how) or (arg == D // 2 and "split" in how)):
                return None
        elif not (_slice_is(b, "first", nd, D, 0, D // 2, 1) and _slice_is(b, "second", nd, D, D // 2, D, 1)):
            return None
        form = "half"
    return {"x_shape": tuple(x.shape), "x_stride": tuple(x.stride), "cos_shape": tuple(cos.shape),
            "sin_shape": tuple(sin.shape), "form": form, "dtype": x.dtype,
            "operands": {"x": b.get("x"), "cos": b.get("cos"), "sin": b.get("sin")}}

"""The rule table: which subgraphs fact-ray knows how to realise, written as data.

A rule is a name, a pattern (patterns.py: a tree from the subgraph's output towards its inputs), the kernel
family that realises it, the reader that takes its parameters off a match (params.py), and the order of its
operand roles (for Match.shapes). The patterns accept every spelling ATen gives the same computation: `linear`,
`addmm`, `mm`/`matmul` + bias add, a transpose looked through on B, activations recognised by value (see
patterns.Activation), causal masks recognised by value (see patterns.CausalMask).

Overlaps are settled by the matcher: the match covering more nodes wins, then the earlier rule in this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from fact_ray.discover import params as P
from fact_ray.discover.patterns import Absent, Activation, CausalMask, Const, Pattern, Var, alt, op, seq

MATMULS = ("aten.mm", "aten.matmul", "aten.bmm")
TRANSPOSES = ("aten.t", "aten.transpose", "aten.permute", "aten.numpy_T", "aten.mT")
SOFTMAXES = ("aten.softmax", "aten._softmax", "aten._safe_softmax")
VIEWS = ("aten.view", "aten.reshape", "aten._unsafe_view")


@dataclass(frozen=True)
class Rule:
    name: str
    family: str
    pattern: Pattern
    read: Callable[[Any], "dict[str, Any] | None"]
    roles: tuple[str, ...]
    priority: int = 0  # position in the table: breaks ties between matches of equal size


# ------------------------------------------------------------------------------------------- GEMM building blocks


def b_operand(role: str) -> Pattern:
    """B as stored: through a transpose of the last two dims (B = W^T) or as it is."""
    return alt(op(*TRANSPOSES, args=(Var(role),), name=role + "_view", check=P.swaps_last_two), Var(role))


def gemm_plain(p: str = "") -> Pattern:
    """A GEMM with no bias: mm, matmul or bmm of (A, B), or a linear without bias. A binds to "a", shared by all
    prefixes, so the two GEMMs of a SwiGLU must read the same input."""
    return alt(
        op(*MATMULS, args=(Var("a"), b_operand(p + "b")), name=p + "gemm"),
        op("aten.linear", args=(Var("a"), Var(p + "b"), Absent()), name=p + "gemm"),
    )


def gemm_with_bias(p: str = "") -> Pattern:
    return alt(
        op("aten.linear", args=(Var("a"), Var(p + "b"), Var(p + "bias")), name=p + "gemm"),
        op("aten.addmm", args=(Var(p + "bias"), Var("a"), b_operand(p + "b")), name=p + "gemm", check=P.unit_addmm),
        op("aten.add", args=(gemm_plain(p), Var(p + "bias", check=P.is_vector)), name=p + "bias_add",
           commutative=True, check=P.plain_add),
    )


def rows_viewed(inner: Pattern) -> Pattern:
    """The GEMM's [M, N] output as it is, or viewed back to [..., N] rows: HF's `Conv1D` (GPT-2) runs
    `addmm(bias, x.view(-1, K), W).view(B, T, N)` before its activation and residual add. The kernel's output is
    reshaped the same way by composition."""
    return alt(inner, op(*VIEWS, args=(inner, Const("out_shape")), name="out_view", check=P.keeps_rows))


GEMM = gemm_plain()
GEMM_BIAS = gemm_with_bias()
GEMM_BIAS_ACT = Activation("activation", rows_viewed(GEMM_BIAS))
GEMM_BIAS_RESIDUAL = op("aten.add", args=(rows_viewed(GEMM_BIAS), Var("residual")), name="residual_add",
                        commutative=True, check=P.plain_add)
SWIGLU = op(
    "aten.mul",
    args=(Activation("activation", alt(gemm_with_bias("gate_"), gemm_plain("gate_")), kinds=("silu",)),
          alt(gemm_with_bias("up_"), gemm_plain("up_"))),
    name="swiglu_mul", commutative=True,
)

# ------------------------------------------------------------------------------------------- attention


def _scaled(inner: Pattern) -> Pattern:
    return alt(
        op("aten.mul", args=(inner, Const("scale_mul", P.is_number)), name="scale_op", commutative=True),
        op("aten.div", args=(inner, Const("scale_div", P.is_nonzero_number)), name="scale_op"),
    )


def _masked(inner: Pattern) -> Pattern:
    return alt(
        op("aten.masked_fill", args=(inner, CausalMask("mask", "fill"), Const("fill", P.is_neg_inf)), name="mask_op"),
        op("aten.where", args=(CausalMask("mask", "keep"), inner, Const("fill", P.is_neg_inf)), name="mask_op"),
        op("aten.add", args=(inner, CausalMask("mask", "additive")), name="mask_op", commutative=True,
           check=P.plain_add),
    )


def _repeated_heads(role: str) -> Pattern:
    """K or V with its heads repeated to the query heads (grouped-query attention), or as it is. The repeats a
    model spells (`repeat_interleave(k, g, dim=1)`; HF's `repeat_kv`: `k[:, :, None].expand(B, G, g, S, D)
    .reshape(B, G * g, S, D)`) become part of the match, `role` binds the tensor before them, and the reader
    checks that the order is repeat_interleave's (query head h reads key/value head h // g): the replacement
    reads the un-repeated tensor and never materialises the repeat."""
    p = role + "_"
    unsqueezed = op("aten.unsqueeze", args=(Var(role), Const(p + "unsqueeze_dim")), name=p + "unsqueeze")
    expanded = op("aten.expand", args=(unsqueezed, Const(p + "expand_shape")), name=p + "expand")
    return alt(
        op("aten.repeat_interleave", args=(Var(role), Const(p + "repeats", P.is_number)), name=p + "repeat"),
        op(*VIEWS, args=(expanded, Const(p + "repeat_shape")), name=p + "repeat"),
        Var(role),
    )


def _flat(inner: Pattern, name: str) -> Pattern:
    """`inner` as it is, or reshaped (batch and heads folded into one dim for bmm/baddbmm, or unfolded again)."""
    return alt(op(*VIEWS, args=(inner, Const(name + "_shape")), name=name), inner)


# q @ k^T: matmul/bmm, or baddbmm over a zero (or uninitialised) bias with beta = 0 and the scale as alpha.
_QK_OPERANDS = (_flat(Var("q"), "q_flat"),
                op(*TRANSPOSES, args=(_flat(_repeated_heads("k"), "k_flat"),), name="k_view", check=P.swaps_last_two))
_QK = _flat(alt(
    op(*MATMULS, args=_QK_OPERANDS, name="qk"),
    op("aten.baddbmm", args=(op("aten.zeros", "aten.empty", name="qk_bias"), *_QK_OPERANDS), name="qk",
       check=P.ignores_input),
), "scores_view")
_SCORES = alt(_masked(_scaled(_QK)), _scaled(_masked(_QK)), _masked(_QK), _scaled(_QK), _QK)
_PV = op(*MATMULS, args=(_flat(op(*SOFTMAXES, args=(_SCORES, Const("softmax_dim")), name="softmax"), "probs_view"),
                         _flat(_repeated_heads("v"), "v_flat")), name="pv")
ATTENTION_EXPLICIT = alt(_PV, op(*VIEWS, args=(_PV, Const("out_shape")), name="out_view"))
# SDPA, with K and V repeated to the query heads first or given with fewer heads and enable_gqa=True.
ATTENTION_SDPA = op("aten.scaled_dot_product_attention", args=(Var("q"), _repeated_heads("k"), _repeated_heads("v")),
                    name="sdpa")

# Spellings discovery recognises but no kernel family realizes yet: listed (family in NOT_REALIZED), costed, and
# kept as PyTorch ops by the run, so a model's time is never silently unaccounted for. Each covers one node only,
# so it never takes nodes from a rule that can be realized.
BADDBMM = op("aten.baddbmm", args=(Var("input"), Var("a"), b_operand("b")), name="gemm")
NOT_REALIZED = {
    "baddbmm": "baddbmm (beta * input + alpha * A @ B): no kernel family yet",
}

# ------------------------------------------------------------------------------------------- normalisation

_OPT_WEIGHT = alt(Absent(), Var("weight"))
LAYERNORM = op("aten.layer_norm", args=(Var("x"), Const("normalized_shape"), _OPT_WEIGHT, alt(Absent(), Var("bias")),
                                        alt(Absent(), Const("eps"))), name="norm")

def _square(x: Pattern) -> Pattern:
    return alt(
        op("aten.pow", args=(x, Const("power", lambda v: v == 2))),
        op("aten.mul", args=(x, x)),
        op("aten.square", args=(x,)),
    )


def _normed(x: Pattern) -> Pattern:
    """x * rsqrt(mean(x^2) + eps), in its spellings, over the row values `x`."""
    mean_sq = op("aten.mean", args=(_square(x), Const("mean_dims"), Const("keepdim", lambda v: v is True)),
                 name="mean")
    denom = op("aten.add", args=(mean_sq, Const("eps", P.is_number)), name="eps_add", commutative=True,
               check=P.plain_add)
    return alt(
        op("aten.mul", args=(x, alt(op("aten.rsqrt", args=(denom,)),
                                    op("aten.reciprocal", args=(op("aten.sqrt", args=(denom,)),)))),
           name="normed", commutative=True),
        op("aten.div", args=(x, op("aten.sqrt", args=(denom,))), name="normed"),
    )


_NORMED = _normed(Var("x"))
CASTS = ("aten.to", "aten._to_copy")
# HF's LlamaRMSNorm in a bf16 model: the rows upcast to float32, normalised, cast back, then scaled by the weight
# (`weight * hidden.to(input_dtype)`). The kernel reads and writes x's dtype and computes in float32 inside.
_RMSNORM_UPCAST = op("aten.mul", args=(op(*CASTS, args=(_normed(op(*CASTS, args=(Var("x"),), name="upcast")),),
                                          name="downcast"),
                                       Var("weight", check=P.is_vector)), name="scaled", commutative=True)
RMSNORM = alt(
    op("aten.rms_norm", args=(Var("x"), Const("normalized_shape"), _OPT_WEIGHT, alt(Absent(), Const("eps"))),
       name="norm"),
    _RMSNORM_UPCAST,
    op("aten.mul", args=(_NORMED, Var("weight", check=P.is_vector)), name="scaled", commutative=True),
    _NORMED,
)

# ------------------------------------------------------------------------------------------- rotary embedding


def _opt(name: str) -> Pattern:
    return alt(Absent(), Const(name))


def _slice(part: str) -> Pattern:
    """x[..., start:end:step] over the rotated tensor x, the part named `part` (its bounds checked by the reader)."""
    return op("aten.slice", args=(Var("x"), Const(part + "_dim"), _opt(part + "_start"), _opt(part + "_end"),
                                  _opt(part + "_step")), name=part)


def _half(part: str) -> Pattern:
    """One half of x's last dim: a slice, or one of the two pieces of chunk(2) / split(D/2)."""
    pieces = op("aten.chunk", "aten.split", args=(Var("x"), Const("split_arg"), _opt("split_dim")), name="split")
    return alt(_slice(part), op("getitem", args=(pieces, Const(part + "_index")), name=part))


# rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2]) (HF's Llama, GPT-NeoX); rotate_every_two(x) =
# stack(-x[..., 1::2], x[..., ::2]) with the last two dims flattened (GPT-J's interleaved pairs).
_ROTATE_HALF = op("aten.cat", args=(seq(op("aten.neg", args=(_half("second"),), name="neg"), _half("first")),
                                    _opt("cat_dim")), name="rotate")
_PAIRS = op("aten.stack", args=(seq(op("aten.neg", args=(_slice("odd"),), name="neg"), _slice("even")),
                                _opt("stack_dim")), name="stack")
_ROTATE_PAIRS = alt(op("aten.flatten", args=(_PAIRS, Const("flatten_start"), _opt("flatten_end")), name="rotate"),
                    op(*VIEWS, args=(_PAIRS, Const("rotate_shape")), name="rotate"))
ROPE = op("aten.add", args=(op("aten.mul", args=(Var("x"), Var("cos")), name="x_cos", commutative=True),
                            op("aten.mul", args=(alt(_ROTATE_HALF, _ROTATE_PAIRS), Var("sin")), name="rot_sin",
                               commutative=True)),
          name="rope", commutative=True, check=P.plain_add)

# ------------------------------------------------------------------------------------------- the table

_GEMM_ROLES = ("a", "b", "bias", "residual")

RULES: tuple[Rule, ...] = tuple(
    Rule(name, family, pattern, read, roles, priority=i)
    for i, (name, family, pattern, read, roles) in enumerate((
        ("attention", "attention", alt(ATTENTION_EXPLICIT, ATTENTION_SDPA), P.read_attention, ("q", "k", "v")),
        ("swiglu", "swiglu", SWIGLU, P.read_swiglu, ("a", "b_gate", "b_up", "bias_gate", "bias_up")),
        ("linear_bias_act", "gemm_bias_act", GEMM_BIAS_ACT, P.read_linear_bias_act, _GEMM_ROLES),
        ("linear_bias_residual", "gemm_bias_residual", GEMM_BIAS_RESIDUAL, P.read_linear_bias_residual,
         _GEMM_ROLES),
        ("linear_bias", "gemm_bias", GEMM_BIAS, P.read_linear_bias, _GEMM_ROLES),
        ("matmul", "gemm", GEMM, P.read_matmul, _GEMM_ROLES),
        ("batched_matmul", "bmm", GEMM, P.read_batched_matmul, _GEMM_ROLES),
        ("layernorm", "layernorm", LAYERNORM, P.read_layernorm, ("x", "weight", "bias")),
        ("rmsnorm", "rmsnorm", RMSNORM, P.read_rmsnorm, ("x", "weight")),
        ("rope", "rope", ROPE, P.read_rope, ("x", "cos", "sin")),
        ("baddbmm", "baddbmm", BADDBMM, P.read_baddbmm, ("input", "a", "b")),
    ))
)

FAMILIES = tuple(sorted({r.family for r in RULES}))
GEMM_FAMILIES = ("gemm", "gemm_bias", "gemm_bias_act", "gemm_bias_residual", "bmm", "swiglu")

"""A discovered GEMM-family Match -> the GemmProblem a kernel sees.

The policy, not the model, fixes the operand dtype: fp32 and tf32 run float32 operands, bf16 and fp16 their
16-bit types (a bf16 policy on an fp32 model casts weights and inputs, per measuring.md).
"""

from __future__ import annotations

from fact_ray.errors import CannotImplement
from fact_ray.types import GemmProblem, Match, Precision

from fact_ray.search_spaces import check_problem

FAMILY_EPILOGUE = {
    "gemm": "none",
    "bmm": "none",
    "gemm_bias": "bias",
    "gemm_bias_act": "bias_act",
    "gemm_bias_residual": "bias_residual",
}

POLICY_DTYPE = {
    Precision.FP32: "float32",
    Precision.TF32: "float32",
    Precision.BF16: "bfloat16",
    Precision.FP16: "float16",
}

FLOAT_DTYPES = {"float32", "float16", "bfloat16", "float64"}

# Spellings torch/discovery may use for the same activation.
ACTIVATION_ALIASES = {
    "": "none", "none": "none", "identity": "none",
    "relu": "relu",
    "gelu": "gelu", "gelu_erf": "gelu",
    "gelu_tanh": "gelu_tanh", "tanh_gelu": "gelu_tanh", "gelu_approx_tanh": "gelu_tanh",
    "silu": "silu", "swish": "silu",
}


INT32_MAX = 2**31 - 1


def _extent(match: Match, key: str, default: int | None = None) -> int:
    value = match.param(key, default)
    if value is None:
        raise CannotImplement(f"{match.rule}: match has no {key}")
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise CannotImplement(f"{match.rule}: {key}={value!r} is not an integer (dynamic shape?)") from None
    if n < 1:
        raise CannotImplement(f"{match.rule}: {key}={n} must be positive")
    if n > INT32_MAX:  # refused before planning: CUTLASS's GemmCoord holds int extents, a larger one wraps
        raise CannotImplement(f"{match.rule}: {key}={n} is over CUTLASS's 32-bit extent ({INT32_MAX}); the "
                              "PyTorch op stays")
    return n


def _flag(value: object) -> bool:
    # `residual` may be a node name or a boolean; anything present and not false means "there is one".
    if isinstance(value, str):
        return value.strip().lower() not in ("", "false", "0", "none", "no")
    return bool(value)


def problem_from_match(match: Match, policy: Precision) -> GemmProblem:
    """Raise CannotImplement (one line) for families or parameters no GEMM template here realizes."""
    policy = Precision(policy)
    if match.family not in FAMILY_EPILOGUE:
        raise CannotImplement(f"{match.rule}: family {match.family!r} is not a GEMM "
                              f"(GEMM families: {', '.join(FAMILY_EPILOGUE)})")
    if match.dtype not in FLOAT_DTYPES:
        raise CannotImplement(f"{match.rule}: dtype {match.dtype} is not a floating-point GEMM")
    family_epilogue = FAMILY_EPILOGUE[match.family]
    has_bias = _flag(match.param("has_bias", family_epilogue != "none"))
    residual = _flag(match.param("residual", family_epilogue == "bias_residual"))
    raw_act = str(match.param("activation", "none") or "none").lower()
    if raw_act not in ACTIVATION_ALIASES:
        raise CannotImplement(f"{match.rule}: activation {raw_act!r} has no CUTLASS epilogue here")
    activation = ACTIVATION_ALIASES[raw_act]
    # A family's subgraph holds at most its own parts: anything more is not in the nodes the kernel replaces.
    extra = [name for name, present, allowed in (
        ("a bias", has_bias, family_epilogue != "none"),
        ("an activation", activation != "none", family_epilogue == "bias_act"),
        ("a residual", residual, family_epilogue == "bias_residual"),
    ) if present and not allowed]
    if extra:
        raise CannotImplement(f"{match.rule}: family {match.family} cannot carry {' or '.join(extra)}")
    # Its parts may be absent (no bias, an identity activation, no residual): the epilogue is what is left.
    if activation != "none" and residual:
        raise CannotImplement(f"{match.rule}: activation together with a residual is not implemented")
    if activation != "none":
        epilogue = "bias_act" if has_bias else "act"
    elif residual:
        epilogue = "bias_residual" if has_bias else "residual"
    else:
        epilogue = "bias" if has_bias else "none"

    default_b = "row" if match.family == "bmm" else "col"  # torch.bmm's B is [L, K, N]; Linear's weight [N, K]
    problem = GemmProblem(
        M=_extent(match, "M"), N=_extent(match, "N"), K=_extent(match, "K"), L=_extent(match, "L", 1),
        dtype=POLICY_DTYPE[policy],
        layout_a=str(match.param("layout_a", "row")), layout_b=str(match.param("layout_b", default_b)),
        epilogue=epilogue, activation=activation, broadcast_b=_flag(match.param("broadcast_b", False)),
    )
    check_problem(problem, policy)
    return problem

"""Layouts as they are: can a kernel take a match's operands with the strides the captured graph really has?

Real model code hands GEMMs views: q, k, v sliced out of one fused projection (`c_attn(x).split(C, dim=2)`) then
`view` + `transpose` have strides like (T*3C, D, 3C, 1); a GEMM kernel here reads dense operands (row- or
column-major as its layout says, batches packed), and the attention and norm kernels have their own rules. The
captured graph carries every node's strides (fake tensors under torch.export), so composition can tell before it
rewrites anything: a replacement whose operands do not fit keeps its PyTorch op, and the composition records
why (`Composition.fallbacks`), instead of the whole composition failing at its first call.

A stride-aware GEMM (CUTLASS takes a leading dimension and a batch stride, but not two non-foldable batch strides
as in [B, H, T, D] views of [B, T, 3, H, D]) or a copy counted in the trial's time would let some of these run a
kernel too; until then the PyTorch op is the honest answer.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

# The kernels' pointer alignment (realize/kernel.POINTER_ALIGN): a slice may start mid-vector.
ALIGN_BYTES = 16
_ITEM_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


def is_contiguous(shape: Sequence[int], stride: Sequence[int]) -> bool:
    """torch's rule: row-major dense, where dimensions of extent 1 may have any stride."""
    expected = 1
    for size, st in zip(reversed(tuple(shape)), reversed(tuple(stride))):
        if size != 1 and st != expected:
            return False
        expected *= size
    return True


def operand_misfit(family: str, role: str, shape: Sequence[int], stride: Sequence[int], dtype: str,
                   offset: Optional[int] = None) -> str:
    """Why a kernel of `family` cannot take this operand as the graph holds it ("" when it can)."""
    shape, stride = tuple(shape), tuple(stride)
    if offset is not None and (offset * _ITEM_BYTES.get(dtype, 1)) % ALIGN_BYTES:
        return f"{role} starts {offset} elements into its storage, not {ALIGN_BYTES}-byte aligned"
    if family in ("attention", "rope"):  # q, k, v / x, cos, sin: any strides, the head dim dense (realize/attention,
        # realize/rope: both read through strides)
        if stride and stride[-1] != 1 and shape[-1] != 1:
            return f"{role}'s head dim is not contiguous (stride {stride})"
        return ""
    if family in ("layernorm", "rmsnorm"):  # x: dense rows, or a 2-D view with strided rows (realize/norm)
        if role == "x" and len(shape) == 2 and stride[-1] == 1 and stride[0] >= shape[1]:
            return ""
        return "" if is_contiguous(shape, stride) else f"{role} is not contiguous (stride {stride})"
    # GEMM families: every operand dense (realize/kernel.check_operands)
    return "" if is_contiguous(shape, stride) else f"{role} is not contiguous (stride {stride})"


def misfit(family: str, operands: Mapping[str, Any], metas: Mapping[str, Any],
           offsets: Mapping[str, Optional[int]] | None = None) -> str:
    """The first operand of a match (role -> graph node name) a kernel of `family` cannot take, as one line
    ("" when all fit). `metas` maps node names to TensorMeta (shape, stride, dtype); absent metas are not judged."""
    offsets = offsets or {}
    for role, name in operands.items():
        meta = metas.get(name) if name else None
        if meta is None or meta.stride is None:
            continue
        why = operand_misfit(family, role, meta.shape, meta.stride, meta.dtype, offsets.get(name))
        if why:
            return f"{why}: operand {name}"
    return ""

"""The composed module's graph calls PyTorch through the same Python bindings eager code uses.

torch.export writes every op as an overload, `torch.ops.aten.linear.default(x, w)`. Calling one from Python goes
through `OpOverload.__call__` and a schema-driven argument parser; `torch._C._nn.linear(x, w)`, what
`F.linear` is, goes through PyTorch's generated fast argument parser. Same op, same kernels, but 1-3 us more host
time per call for the overload (measured on this project's CPU machine: linear 6.9 vs 3.9 us, mul 3.4 vs 1.9,
transpose 3.6 vs 2.1, view 4.0 vs 2.8). On the H200, the composed Llama-style block with nothing replaced spent
0.661 ms of host time per call against eager's 0.426 ms with the very same 35 CUDA kernels
(benchmarks/results/2026-12-02-h200-s6/2-gap-suite/composed_gap.json): at serving sizes a transformer block is
host-bound, so that gap was the composed module's whole loss.

`use_python_bindings` swaps each aten overload in the graph for the binding that eager code would have called
(`torch.<name>`, `torch._C._nn.<name>` or the Tensor method), but only where that is provably the same call: the
binding and the overload, run on meta tensors shaped like the node's operands, must dispatch the same sequence of
aten ops (a TorchDispatchMode records it below autograd and composite decompositions, so `linear` is checked as
what it becomes). A binding that resolves another overload, takes other keyword names or fails keeps the overload.
The original target stays in `node.meta["aten_target"]`.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ATEN_TARGET = "aten_target"


class _Recorder(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[Any] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls.append(func)
        return func(*args, **(kwargs or {}))


def _candidates(op: torch._ops.OpOverload) -> list[Callable[..., Any]]:
    name = op._schema.name.split("::", 1)[1]
    if name.startswith("__"):  # operators (aten.__and__): FX's code generation cannot name torch.__and__
        return []
    found = []
    for holder in (torch._C._VariableFunctions, torch._C._nn, torch._C.TensorBase):
        fn = getattr(holder, name, None)
        if fn is not None and callable(fn) and _nameable(fn):
            found.append(fn)
    return found


def _nameable(fn: Callable[..., Any]) -> bool:
    """Whether FX can write a call of `fn` into the graph's code (it looks the function up by module and name)."""
    try:
        torch.fx.node._get_qualified_name(fn)
    except (RuntimeError, AttributeError):  # a Tensor method torch.Tensor overrides in Python: no name to write
        return False
    return True


def _meta(value: Any) -> Any:
    """A meta stand-in for an operand (a tensor keeps shape, strides and dtype; a device becomes meta)."""
    if isinstance(value, torch.Tensor):
        if any(not isinstance(s, int) for s in (*value.shape, *value.stride())):
            raise _Symbolic
        return torch.empty_strided(tuple(value.shape), tuple(value.stride()), dtype=value.dtype, device="meta")
    if isinstance(value, torch.device):
        return torch.device("meta")
    if isinstance(value, (list, tuple)):
        return type(value)(_meta(v) for v in value)
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        raise _Symbolic
    return value


class _Symbolic(Exception):
    """An operand with a symbolic size: the check cannot build it, the overload stays."""


def _trace(fn: Callable[..., Any], args: tuple, kwargs: dict) -> Optional[list[Any]]:
    try:
        with _Recorder() as rec:
            fn(*args, **kwargs)
    except Exception:  # this spelling does not take these operands: not the same call
        return None
    return rec.calls


def _operand(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Any:
    if node.op == "get_attr":
        obj: Any = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        return obj
    return node.meta.get("val", node.meta.get("example_value", _Missing))


class _Missing:
    pass


def binding_for(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Optional[Callable[..., Any]]:
    """The Python binding that makes the same call as `node`'s aten overload, or None."""
    op = node.target
    if not isinstance(op, torch._ops.OpOverload) or op.namespace != "aten":
        return None
    missing = []

    def value(n: torch.fx.Node) -> Any:
        v = _operand(gm, n)
        if v is _Missing:
            missing.append(n)
        return v

    args = torch.fx.node.map_arg(node.args, value)
    kwargs = torch.fx.node.map_arg(node.kwargs, value)
    if missing:
        return None
    try:
        args, kwargs = _meta(tuple(args)), {k: _meta(v) for k, v in kwargs.items()}
    except _Symbolic:
        return None
    want = _trace(op, args, kwargs)
    if not want:
        return None
    for fn in _candidates(op):
        if _trace(fn, args, kwargs) == want:
            return fn
    return None


def use_python_bindings(gm: torch.fx.GraphModule) -> int:
    """Swap the graph's aten overloads for their eager Python bindings where provably the same call; returns how
    many nodes changed. The caller recompiles."""
    changed = 0
    cache: dict[tuple[Any, ...], Optional[Callable[..., Any]]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
            continue
        key = _signature(gm, node)
        fn = cache[key] if key is not None and key in cache else binding_for(gm, node)
        if key is not None:
            cache[key] = fn
        if fn is not None:
            node.meta[ATEN_TARGET] = node.target
            node.target = fn
            changed += 1
    return changed


def _signature(gm: torch.fx.GraphModule, node: torch.fx.Node) -> Optional[tuple[Any, ...]]:
    """What decides the check's outcome: the overload and its operands' kinds (tensor shape, strides, dtype; other
    values as they are); None where a value cannot be a key (the check then runs for this node alone)."""
    def kind(v: Any) -> Any:
        if isinstance(v, torch.fx.Node):
            v = _operand(gm, v)
            if isinstance(v, torch.Tensor):
                return ("T", tuple(v.shape), tuple(v.stride()), v.dtype)
            return ("N", v)  # a value the graph computes (a size, a device): keyed as it is, or not at all
        if isinstance(v, (list, tuple)):
            return tuple(kind(x) for x in v)
        return v

    try:
        key = (node.target, kind(tuple(node.args)), tuple(sorted((k, kind(v)) for k, v in node.kwargs.items())))
        hash(key)
        return key
    except TypeError:
        return None


def aten_name(node: torch.fx.Node) -> str:
    """The node's op as export wrote it ("aten.linear.default"), whether or not its call was swapped."""
    return str(node.meta.get(ATEN_TARGET, node.target))

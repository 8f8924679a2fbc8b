"""Evaluate small pieces of a Graph on the CPU, so rules can recognise what a subgraph computes, not how it is
spelled: an activation region is run on sample values and compared with the known activations; a mask is
computed from its buffer's content tag (set by capture) and compared with a causal mask.

Only what is needed is evaluated: a region of elementwise ops on a probe vector, or the few ops (slice, compare,
cast, tril) between a mask buffer and its use. Nothing here runs a model.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from fact_ray.discover.view import GraphView, packet
from fact_ray.types import Ref, TensorMeta

MAX_NUMEL = 1 << 24  # never materialise more than this (a 4096 x 4096 mask) while recognising a pattern

# Elementwise ops an activation may be written with. Each takes tensors of one shape and numbers.
ELEMENTWISE = frozenset({
    "aten.add", "aten.sub", "aten.rsub", "aten.mul", "aten.div", "aten.pow", "aten.neg", "aten.tanh",
    "aten.sigmoid", "aten.exp", "aten.erf", "aten.sqrt", "aten.rsqrt", "aten.reciprocal", "aten.relu",
    "aten.gelu", "aten.silu", "aten.clamp_min", "aten.clamp", "aten.abs", "aten.square", "aten.dropout",
    "aten.alias", "aten.clone", "aten.contiguous", "aten.detach", "aten.to", "aten._to_copy", "aten.type_as",
    "aten.hardtanh", "aten.log1p", "aten.expm1", "aten.tanh_",
})
_CASTS = frozenset({"aten.to", "aten._to_copy", "aten.type_as"})
# Never evaluated: random or uninitialised values.
_IMPURE_PREFIXES = ("aten.rand", "aten.bernoulli", "aten.normal", "aten.empty", "aten.uniform", "aten.multinomial",
                    "aten.native_dropout")


class NotEvaluable(Exception):
    """This value cannot be computed from the graph alone."""


def synth(tag: str, meta: TensorMeta) -> torch.Tensor:
    """Rebuild a buffer from its content tag (see capture.content_tag)."""
    dtype = getattr(torch, meta.dtype, None)
    if not isinstance(dtype, torch.dtype):
        raise NotEvaluable(f"dtype {meta.dtype}")
    if tag.startswith("scalar="):
        return torch.full(meta.shape, float(tag.split("=", 1)[1]), dtype=dtype)
    if len(meta.shape) < 2 or meta.shape[-1] != meta.shape[-2]:
        raise NotEvaluable(tag)
    n = meta.shape[-1]
    below = torch.ones(n, n, dtype=torch.bool).tril()
    if tag == "tril":
        value = below.to(dtype)
    elif tag == "triu1":
        value = (~below).to(dtype)
    elif tag == "causal_additive":
        value = torch.zeros(n, n, dtype=dtype).masked_fill(~below, float("-inf"))
    else:
        raise NotEvaluable(tag)
    return value.reshape(meta.shape)


def _resolve(target: str) -> Any:
    if target == "getitem":
        import operator

        return operator.getitem
    parts = target.split(".")
    if len(parts) != 3 or parts[0] != "aten":
        raise NotEvaluable(target)
    packet_ = getattr(torch.ops.aten, parts[1], None)
    if packet_ is None:
        raise NotEvaluable(target)
    overload = getattr(packet_, parts[2], None) if parts[2] in packet_.overloads() else None
    return overload if overload is not None else packet_


def _plain(value: Any) -> Any:
    """Graph argument -> torch argument (dtype names back to dtypes, every device to the CPU)."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, str):
        if value.startswith("device="):
            return torch.device("cpu")
        if value.startswith("torch."):
            obj = getattr(torch, value[len("torch."):], None)
            if isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
    return value


class Evaluator:
    """Computes node values from given leaves and tagged buffers, memoised; raises NotEvaluable otherwise."""

    def __init__(self, view: GraphView, leaves: dict[str, torch.Tensor] | None = None, *,
                 allowed: frozenset[str] | None = None, probe: bool = False) -> None:
        self.view = view
        self.values: dict[str, Any] = dict(leaves or {})
        self.allowed = allowed  # restrict to these nodes (besides leaves)
        # probe: leaves are sample vectors, not the graph's shapes; node sizes do not apply and casts are
        # skipped so that a region is judged in float64 whatever dtype the model runs in.
        self.probe = probe
        self._depth = 0

    def value(self, name: str) -> Any:
        if name in self.values:
            return self.values[name]
        # Patterns worth recognising are a few ops deep; a deep chain means we are walking into the model.
        if self._depth > 32:
            raise NotEvaluable(name)
        self._depth += 1
        try:
            v = self._compute(name)
        finally:
            self._depth -= 1
        self.values[name] = v
        return v

    def _arg(self, a: Any) -> Any:
        if isinstance(a, Ref):
            return self.value(a.name)
        if isinstance(a, tuple):
            return [self._arg(x) for x in a]
        return _plain(a)

    def _compute(self, name: str) -> Any:
        view = self.view
        node = view.nodes[name]
        if self.allowed is not None and name not in self.allowed:
            raise NotEvaluable(name)
        if node.op in ("placeholder", "get_attr"):
            tag = node.kwarg("content", "")
            if not tag or node.meta is None or node.meta.numel > MAX_NUMEL:
                raise NotEvaluable(name)
            return synth(tag, node.meta)
        if node.op != "call_function":
            raise NotEvaluable(name)
        p = packet(node.target)
        if p.startswith(_IMPURE_PREFIXES):
            raise NotEvaluable(name)
        if not self.probe and node.meta is not None and node.meta.numel > MAX_NUMEL:
            raise NotEvaluable(name)
        if self.probe and p in _CASTS:
            return self._arg(node.args[0])
        fn = _resolve(node.target)
        args = [self._arg(a) for a in node.args]
        kwargs = {k: self._arg(v) for k, v in node.kwargs if k not in ("pin_memory",)}
        if "device" in kwargs:
            kwargs["device"] = torch.device("cpu")
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # an op we cannot replay here: the rule simply does not fire
            raise NotEvaluable(f"{name}: {type(e).__name__}") from None


# ---------------------------------------------------------------------------------------------- activations

_PROBE = torch.linspace(-6.0, 6.0, 241, dtype=torch.float64)


def _references() -> dict[str, torch.Tensor]:
    x = _PROBE
    return {
        "relu": x.clamp_min(0),
        "gelu": 0.5 * x * (1 + torch.erf(x / math.sqrt(2.0))),
        "gelu_tanh": 0.5 * x * (1 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3))),
        "silu": x * torch.sigmoid(x),
    }


_REFERENCES = _references()


def identify_activation(view: GraphView, region: frozenset[str], root: str, leaf: str) -> str | None:
    """Which activation the region computes from `leaf` to `root`, judged on sample values; None if none.

    exact GELU and its tanh approximation differ by up to 5e-4 on the probe, far above the 1e-5 allowed here, so
    the two are never confused; casts inside the region are skipped so a bf16 model's region is judged exactly.
    """
    ev = Evaluator(view, {leaf: _PROBE}, allowed=region, probe=True)
    try:
        out = ev.value(root)
    except NotEvaluable:
        return None
    if not isinstance(out, torch.Tensor) or out.shape != _PROBE.shape:
        return None
    out = out.to(torch.float64)
    for kind, ref in _REFERENCES.items():
        if bool(((out - ref).abs() <= 1e-5 * (1 + ref.abs())).all()):
            return kind
    return None


# ---------------------------------------------------------------------------------------------- masks


def mask_form(view: GraphView, name: str) -> tuple[str, int] | None:
    """(form, n) when node `name` evaluates to an n x n causal mask, the same for every leading index.

    form: "fill" (True strictly above the diagonal: what masked_fill hides), "keep" (True on and below it: what
    where and SDPA keep), "additive" (-inf, or any value <= -1e4, above it and 0 elsewhere).
    """
    try:
        value = Evaluator(view).value(name)
    except NotEvaluable:
        return None
    if not isinstance(value, torch.Tensor) or value.dim() < 2 or value.shape[-1] != value.shape[-2]:
        return None
    n = value.shape[-1]
    if n < 2:
        return None
    flat = value.reshape(-1, n, n)
    below = torch.ones(n, n, dtype=torch.bool).tril()
    if value.dtype == torch.bool:
        if bool((flat == ~below).all()):
            return "fill", n
        if bool((flat == below).all()):
            return "keep", n
        return None
    if value.is_floating_point():
        f = flat.to(torch.float64)
        if bool((f[:, below] == 0).all()) and bool((f[:, ~below] <= -1e4).all()):
            return "additive", n
    return None


def all_visible(view: GraphView, name: str) -> bool:
    """Whether node `name` evaluates, from the graph alone, to a mask that hides nothing: all True (a boolean
    keep-mask) or all 0 (an additive mask). HF's BERT and ViT pass SDPA such a mask built from an all-ones padding
    mask; attention with it is attention without a mask. A mask computed from a user input is not evaluable here,
    so it is never taken for visible."""
    try:
        value = Evaluator(view).value(name)
    except NotEvaluable:
        return False
    if not isinstance(value, torch.Tensor) or value.numel() == 0:
        return False
    if value.dtype == torch.bool:
        return bool(value.all())
    return value.is_floating_point() and bool((value == 0).all())


def scalar_value(view: GraphView, value: Any) -> float | None:
    """A number given inline, or a node evaluating to a one-element tensor (a lifted constant)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, Ref):
        meta = view.meta(value.name)
        if meta is None or meta.numel != 1:
            return None
        try:
            v = Evaluator(view).value(value.name)
        except NotEvaluable:
            return None
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            return float(v.reshape(()))
    return None

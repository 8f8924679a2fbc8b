"""Composed modules are inference only: their kernels have forward code and no backward.

Without a guard, a call with autograd on would run, and the failure would come later and far away: a custom op
without an autograd formula raises only in `backward()` (or, registered from C++, warns and returns no
gradient). So a composed module that holds any fact-ray kernel raises `InferenceOnly` at the call when grad mode
is on and an input or a parameter requires grad: in its first graph node (fact_ray/entry.py), or, for any other
module, through the forward pre-hook `guard` attaches. Under `torch.no_grad()` or `torch.inference_mode()` the
check costs one `torch.is_grad_enabled()` call; `torch.compile` traces it into a guard on grad mode, and
`torch.export` (run under no_grad, as for any inference export) drops it.
"""

from __future__ import annotations

from typing import Any

from fact_ray.errors import InferenceOnly


def _requires_grad(x: Any) -> bool:
    import torch

    return any(isinstance(t, torch.Tensor) and t.requires_grad for t in torch.utils._pytree.tree_leaves(x))


def inference_only(module: Any, args: Any) -> None:
    """The forward pre-hook (see the module docstring)."""
    import torch

    if not torch.is_grad_enabled():
        return None
    refuse_autograd(type(module).__name__, args, module.parameters())
    return None


def refuse_autograd(name: str, args: Any, params: Any) -> None:
    """Raise InferenceOnly when an input or a parameter requires grad (grad mode on: the caller checked)."""
    if _requires_grad(args) or any(p.requires_grad for p in params):
        raise InferenceOnly(
            f"{name}: the composed module is inference only (its fact-ray kernels have no "
            "backward); call it under torch.no_grad() or torch.inference_mode(), or train the original module")


def guard(module: Any) -> Any:
    """Attach the hook once; returns the module."""
    if not getattr(module, "_fact_ray_inference_only", False):
        module.register_forward_pre_hook(inference_only)
        module._fact_ray_inference_only = True
    return module

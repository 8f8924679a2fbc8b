"""The composed module's entry: what a call costs before its first op, made as cheap as eager's.

A module from `torch.export` is entered through three layers that eager code does not pay for: GraphModule's
wrapped `__call__` and `nn.Module.__call__`'s hook path (export's own input-check pre-hook is always registered,
so the fast path never applies), forward pre-hooks (ours: the input guard and the inference-only check), and a
pytree flatten of the arguments plus an unflatten of the outputs in the generated `forward`. On a small
Llama-style block on this project's CPU machine (tiny tensors, host time only) these were 45 us of a 211 us call,
more than eager's whole difference to the ops themselves; on a GPU at serving sizes the block is host-bound, so
they show up in its latency.

`direct_entry` keeps every check and drops the layers:
- The checks become the graph's first node, `check_call(spec, *inputs)`: the inputs' count, shapes and dtypes as
  captured (one `ComposeError` line otherwise) and, for a module holding fact-ray kernels, the inference-only
  refusal of fact_ray/inference.py. Being in the graph, they survive `recompile()`, `copy.deepcopy` and
  `torch.compile` (Dynamo traces them into guards), and cost nothing in an exported program (they are Python
  checks on static shapes; export runs under no_grad).
- Plain FX code generation where the inputs are positional tensors and the outputs plain containers (the
  pytree specs hold nothing then); otherwise the pytree code stays.
- The instance's class calls `forward` directly while no hook is registered on the module or globally; once any
  is, calls go through `nn.Module.__call__` as before, so hooks a user adds still run.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from fact_ray.errors import ComposeError

SPEC_ATTR = "_fact_ray_call_spec"
_CONTAINERS = (tuple, list, dict)


@dataclass(frozen=True, eq=False)
class CallSpec:
    """What `check_call` holds a call to: one (shape, dtype) per tensor input (None for other inputs) and, where
    the module holds fact-ray kernels, the parameters whose requires_grad makes a call with autograd on a
    training call."""
    want: tuple[Optional[tuple[tuple[int, ...], torch.dtype]], ...]
    inference_only: bool
    params: tuple[torch.nn.Parameter, ...]
    name: str


def _signature(args: Sequence[Any]) -> tuple[Optional[tuple[tuple[int, ...], torch.dtype]], ...]:
    return tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else None for x in args)


def _show(sig: Sequence[Any]) -> str:
    return ", ".join("-" if s is None else f"{'x'.join(map(str, s[0]))} {str(s[1]).replace('torch.', '')}"
                     for s in sig)


def check_call(spec: CallSpec, *args: Any) -> None:
    """The composed module's first node (see the module docstring)."""
    got = _signature(args)
    if got != spec.want:
        raise ComposeError(f"composed module called with inputs [{_show(got)}]; it was composed for "
                           f"[{_show(spec.want)}] (compose with --shapes to serve more shapes)")
    if spec.inference_only and torch.is_grad_enabled():
        from fact_ray.inference import refuse_autograd

        refuse_autograd(spec.name, args, spec.params)


def _children(spec: Any) -> list[Any]:
    # TreeSpec.children() replaced the `children_specs` field in recent torch; the GPU image's may predate it
    return spec.children() if callable(getattr(spec, "children", None)) else list(spec.children_specs)


def _flat_specs(gm: torch.fx.GraphModule) -> Optional[Any]:
    """The output spec when the pytree code generation can give way to plain code (see the module docstring)."""
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is None:
        return None
    args_spec, kwargs_spec = _children(info.in_spec) if info.in_spec.num_children == 2 else (None, None)
    if args_spec is None or args_spec.type is not tuple or kwargs_spec.type is not dict or kwargs_spec.num_children:
        return None
    if not all(c.is_leaf() for c in _children(args_spec)):
        return None

    def plain(spec: Any) -> bool:
        return spec.is_leaf() or (spec.type in _CONTAINERS and all(plain(c) for c in _children(spec)))

    return info.out_spec if plain(info.out_spec) else None


def _plain_codegen(gm: torch.fx.GraphModule) -> None:
    out_spec = _flat_specs(gm)
    if out_spec is None:
        return
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    output.args = (torch.utils._pytree.tree_unflatten(list(output.args[0]), out_spec),)
    gm.graph._codegen = torch.fx.graph.CodeGen()


def _has_hooks(module: torch.nn.Module) -> bool:
    from torch.nn.modules import module as m

    return bool(module._forward_pre_hooks or module._forward_hooks or module._backward_hooks
                or module._backward_pre_hooks or m._global_forward_pre_hooks or m._global_forward_hooks
                or m._global_backward_hooks or m._global_backward_pre_hooks or m._global_forward_hooks_always_called)


def _direct_call(self: torch.fx.GraphModule, *args: Any, **kwargs: Any) -> Any:
    spec = getattr(self, SPEC_ATTR)
    if len(args) + len(kwargs) != len(spec.want):  # forward's own signature would say it in a TypeError
        check_call(spec, *args, *kwargs.values())
    if _has_hooks(self):
        return torch.nn.Module.__call__(self, *args, **kwargs)
    return type(self).forward(self, *args, **kwargs)


def direct_entry(gm: torch.fx.GraphModule, inputs: Sequence[Any]) -> torch.fx.GraphModule:
    """Give `gm` (a runnable module from torch.export) the cheap entry of the module docstring; returns it."""
    gm._forward_pre_hooks.clear()  # export's input check (ours is `check_call`)
    setattr(gm, SPEC_ATTR, CallSpec(_signature(inputs), False, (), type(gm).__name__))
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    # after the last placeholder (they open the graph), before any op
    with graph.inserting_after(placeholders[-1]) if placeholders else graph.inserting_before(), \
            warnings.catch_warnings():
        # FX warns that the attribute is no parameter, buffer or submodule: it is a plain one, on purpose
        warnings.simplefilter("ignore", UserWarning)
        spec = graph.get_attr(SPEC_ATTR)
    with graph.inserting_after(spec):
        graph.call_function(check_call, (spec, *placeholders))
    # a node without users is dead code to FX's eliminate_dead_code unless its target is known to have effects
    torch.fx.node._side_effectful_functions.add(check_call)
    _plain_codegen(gm)
    graph.lint()
    return recompile(gm)


def inference_only(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """From now on a call with autograd on is refused (the module holds fact-ray kernels: fact_ray/inference.py)."""
    spec = getattr(gm, SPEC_ATTR)
    setattr(gm, SPEC_ATTR, CallSpec(spec.want, True, tuple(gm.parameters()), spec.name))
    return gm


def recompile(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """`gm.recompile()`, which puts GraphModule's wrapped `__call__` back, then the direct one again where `gm` has
    the cheap entry (a module captured by FX, not export, has none)."""
    gm.recompile()
    if hasattr(gm, SPEC_ATTR):
        type(gm).__call__ = _direct_call  # the class is gm's own (GraphModule makes one per instance)
    return gm

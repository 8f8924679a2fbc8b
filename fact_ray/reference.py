"""The float64 reference of a user's model: a fresh instance, never a deep copy.

Every end-to-end error fact-ray reports (the bench's rows, `compose.check`) is measured against the model run in
float64. Converting a `copy.deepcopy` of the module is not enough for real model code: `deepcopy` copies a
lambda or a bound closure as the same function object, so `self.mlpf = lambda x: m.c_proj(act(m.c_fc(x)))`
(KernelBench's MiniGPT, over an `nn.ModuleDict` `m`) keeps calling the *original* float32 (or bf16) modules, and
the float64 copy fails with "mat1 and mat2 must have the same dtype". A fresh instance built by the model's own
code (`Model(*get_init_inputs())`, or the factory called again) has closures over its own modules, and those are
registered, so `.to(torch.float64)` reaches them.

The fresh instance is loaded with the original's state dict (strict: every parameter and persistent buffer, so
it computes with the very weights, rounded as the policy rounded them), then converted whole. It is built under
`torch.random.fork_rng`, so building it does not move the random stream the caller draws inputs from.

Where there is no way to rebuild (a bare `nn.Module` handed to the API), a deep copy is used only if it is safe:
if the module holds, outside its registered tree (in a closure, a plain list or dict), a module with floating
tensors, the copy could not be converted whole and `ReferenceUnavailable` says so instead of giving a reference
that is not float64.
"""

from __future__ import annotations

import copy
import types
from typing import Any, Callable, Iterator, Optional

import torch

from fact_ray.errors import ModelInvalid, first_line

Rebuild = Callable[[], torch.nn.Module]


class ReferenceUnavailable(ModelInvalid):
    """The model cannot be converted whole to float64 (modules held outside its registered tree, no rebuild)."""


def float64_reference(module: torch.nn.Module, *, rebuild: Optional[Rebuild] = None,
                      device: Any = None) -> torch.nn.Module:
    """`module` as a float64 model on `device`, in eval mode: a fresh instance from `rebuild` loaded with
    `module`'s state, or (without `rebuild`) a deep copy when no closure escapes it. See the module docstring."""
    ref = _fresh(module, rebuild) if rebuild is not None else copy.deepcopy(module)
    # Checked on the instance that will run: a deep copy's closures still call the original's modules, and a
    # fresh instance's modules held in a plain list would keep their random initial weights.
    escaped = next(escaped_modules(ref), None)
    if escaped is not None:
        where, held = escaped
        how = ("load the model from its file or factory (fact_ray.capture.load_model) so it can be built again"
               if rebuild is None else "register it as a submodule (nn.ModuleList / nn.ModuleDict)")
        raise ReferenceUnavailable(
            f"{type(module).__name__}: {where} holds a {type(held).__name__} outside the module's registered "
            f"submodules (a closure, list or dict), so a float64 reference would not be converted whole; {how}")
    ref = ref.to(device=device, dtype=torch.float64).eval() if device is not None else \
        ref.to(dtype=torch.float64).eval()
    stray = next(_non_float64(ref), None)
    if stray is not None:
        raise ReferenceUnavailable(f"{type(module).__name__}: {stray} stays {_dtype_of(ref, stray)} after converting "
                                   "the reference to float64")
    return ref


def _fresh(module: torch.nn.Module, rebuild: Rebuild) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        fresh = rebuild()
    if not isinstance(fresh, torch.nn.Module):
        raise ModelInvalid(f"rebuilding the model for its float64 reference gave a {type(fresh).__name__}")
    state = module.state_dict()
    try:
        fresh.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelInvalid(f"{type(module).__name__}: a fresh instance does not take the model's state for its "
                           f"float64 reference ({first_line(e, 200, named=False)})") from None
    return fresh


def _non_float64(module: torch.nn.Module) -> Iterator[str]:
    for name, t in (*module.named_parameters(), *module.named_buffers()):
        if t.is_floating_point() and t.dtype != torch.float64:
            yield name


def _dtype_of(module: torch.nn.Module, name: str) -> str:
    t = dict((*module.named_parameters(), *module.named_buffers()))[name]
    return str(t.dtype).removeprefix("torch.")


def escaped_modules(module: torch.nn.Module, depth: int = 4) -> Iterator[tuple[str, torch.nn.Module]]:
    """(where, module) for each module with floating tensors that `module`'s attributes reach through closures,
    bound methods, lists, tuples or dicts but that is not one of `module.modules()`."""
    registered = {id(m) for m in module.modules()}
    seen: set[int] = set()

    def walk(obj: Any, where: str, left: int) -> Iterator[tuple[str, torch.nn.Module]]:
        if left < 0 or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.nn.Module):
            if id(obj) not in registered:
                if any(t.is_floating_point() for t in (*obj.parameters(), *obj.buffers())):
                    yield where, obj
                return
            for name, value in vars(obj).items():
                if name not in ("_parameters", "_buffers", "_modules") and not name.startswith("__"):
                    yield from walk(value, f"{where}.{name}", left - 1)
            for name, sub in obj._modules.items():
                if sub is not None:
                    yield from walk(sub, f"{where}.{name}", left)
            return
        if isinstance(obj, types.MethodType):
            yield from walk(obj.__func__, where, left)
            return
        if isinstance(obj, types.FunctionType):
            for cell in obj.__closure__ or ():
                try:
                    value = cell.cell_contents
                except ValueError:  # an empty cell
                    continue
                yield from walk(value, f"{where} (closure)", left - 1)
            return
        if isinstance(obj, (list, tuple, set, frozenset)):
            for i, value in enumerate(obj):
                yield from walk(value, f"{where}[{i}]", left - 1)
        elif isinstance(obj, dict):
            for k, value in obj.items():
                yield from walk(value, f"{where}[{k!r}]", left - 1)

    yield from walk(module, type(module).__name__, depth)

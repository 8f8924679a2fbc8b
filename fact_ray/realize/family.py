"""The kernel-family seam: what a kind of kernel (GEMM, attention, norms, ...) tells the rest of fact-ray, and the
registry that finds the family of a match or of a stored config.

A family is one object with the protocol below. The pipeline (plan -> build -> trial -> select, realize/pipeline.py),
the farm, `fact-ray tune` and compose only ever talk to it through this protocol, so adding a family is one module
plus one `register` call (the built-in families are listed once, in `_builtin`). The build knows no family: a
family's `Source`s carry their own nvcc flags and include folders.

Nothing here imports torch, Ray or a family module at import time: the built-in families load on first use.
"""

from __future__ import annotations

from typing import Any, Optional, Protocol, Sequence, runtime_checkable

from fact_ray.types import Arch, Library, Match, Precision, Source, Trial


@runtime_checkable
class KernelFamily(Protocol):
    """One kind of kernel. `problem` and `candidates` raise CannotImplement (one line) for what it does not run."""

    name: str  # "gemm", "attention", "norm", ...
    serves: tuple[str, ...]  # the Match.family values it realizes
    templates: tuple[str, ...]  # the config.template values of its kernels (how a stored config finds its family)
    problem_type: type  # its problem's frozen dataclass (an artifact stores a problem as that type's fields)

    def problem(self, match: Match, policy: Precision) -> Any:
        """The kernel's view of a match: a `problem_type` of plain values (it travels to GPU workers), with the
        operand `dtype` (a torch dtype name) its kernel computes in."""

    def candidates(self, problem: Any, policy: Precision, arch: Arch, budget: int,
                   hinted: Sequence[str] = ()) -> list[Any]:
        """At most `budget` configs to try, in the order to try them; `hinted` names lead (vetted LLM hints).
        A family whose class sets `takes_ranker = True` also takes `ranker=` (search_spaces.rankers): the model
        that orders its space, chosen once per run; the others are never passed one."""

    def sources(self, configs: Sequence[Any], arch: Arch) -> list[Source]:
        """The translation units holding `configs` (every config in exactly one), with their flags and includes."""

    def trial(self, problem: Any, config: Any, library: Library, policy: Precision,
              device: Any) -> tuple[Trial, Trial]:
        """(the PyTorch op's trial, the config's trial): verified in float64 against the model's own op and timed
        beside it, on `device` (a GPU). A candidate's failure is its trial's status, never an exception."""

    def operands(self, problem: Any) -> tuple[Optional[str], ...]:
        """The match operand roles the op takes, in its argument order; None where the op gets None."""

    def accepts(self, config: Any, problem: Any) -> str:
        """"" when `config`'s kernel computes `problem`, else why not (compose refuses a mismatched winner)."""

    def register_op(self, problem: Any, config: Any, library: Library) -> tuple[str, Any]:
        """`torch.ops.fact_ray.<name>` calling the kernel (with a fake implementation): (name, op)."""

    def bind(self, problem: Any, config: Any, library: Library, symbol: str, native: bool,
             digest: Optional[str] = None) -> Any:
        """How a composed graph calls the kernel (realize/dispatch.Binding): the native dispatcher's op where
        `native` and it runs this family, else the Python custom op of `register_op`."""

    def output_shape(self, problem: Any, first_operand: tuple[int, ...]) -> Optional[tuple[int, ...]]:
        """The op's output shape when it differs from the graph's (compose reshapes); None: the graph's own."""


_REGISTRY: list[KernelFamily] = []
_LOADED = False


def _builtin() -> list[KernelFamily]:
    from fact_ray.realize.attention_family import AttentionFamily
    from fact_ray.realize.gemm_family import GemmFamily
    from fact_ray.realize.norm_family import NormFamily
    from fact_ray.realize.rope_family import RopeFamily
    from fact_ray.realize.swiglu_family import SwiGluFamily

    return [GemmFamily(), AttentionFamily(), NormFamily(), RopeFamily(), SwiGluFamily()]


def families() -> tuple[KernelFamily, ...]:
    global _LOADED
    if not _LOADED:
        _LOADED = True
        _REGISTRY[:0] = _builtin()
    return tuple(_REGISTRY)


def register(family: KernelFamily) -> KernelFamily:
    """Add a family (a test's, a plug-in's). Its match families and templates must be new: one owner each."""
    if not isinstance(family, KernelFamily):
        raise TypeError(f"{family!r} does not implement the KernelFamily protocol")
    for other in families():
        if other.name == family.name:
            if other is family:
                return family
            raise ValueError(f"a kernel family named {family.name!r} is already registered")
        clash = set(other.serves) & set(family.serves) or set(other.templates) & set(family.templates)
        if clash:
            raise ValueError(f"family {family.name}: {sorted(clash)} already belong to family {other.name}")
    _REGISTRY.append(family)
    return family


def unregister(family: KernelFamily) -> None:
    families()
    if family in _REGISTRY:
        _REGISTRY.remove(family)


def for_match(match: Match) -> Optional[KernelFamily]:
    """The family realizing `match`, or None (no kernel family yet: the PyTorch op stays)."""
    return next((f for f in families() if match.family in f.serves), None)


def by_name(name: str) -> KernelFamily:
    for f in families():
        if f.name == name:
            return f
    raise KeyError(f"no kernel family named {name!r} is registered")


def for_config(config: Any) -> Optional[KernelFamily]:
    return next((f for f in families() if getattr(config, "template", None) in f.templates), None)


def served() -> tuple[str, ...]:
    """Every Match.family value some registered family realizes."""
    return tuple(name for f in families() for name in f.serves)


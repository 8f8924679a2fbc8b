"""The pattern language the rule table is written in (the matcher in match.py gives it meaning).

A pattern is a tree rooted at the node whose value a subgraph produces and read towards its inputs:

- `Op(ops, args)`: a call to one of the ATen packets `ops` ("aten.mm", ...) whose leading positional arguments
  match `args`; `name` binds the node, `commutative` also tries the first two arguments swapped, `check` is a
  predicate over (view, node). Identity ops (eval dropout, alias, clone, contiguous, same-dtype casts) between a
  consumer and the op are looked through and become part of the match.
- `Var(name)`: any tensor node, an input of the subgraph. The same name used twice must bind the same node.
- `Const(name)`: a plain argument (a number, a list of ints), or a node that evaluates to a one-element tensor.
- `Absent()`: the argument is missing or None.
- `Seq(items)`: a list argument (`cat`'s tensors) whose elements match `items` in order, no more, no fewer.
- `Alt(options)`: any one of the options.
- `Activation(name, input)`: a closed region of elementwise ops over one input that computes a known activation,
  whatever its spelling (the region is evaluated on sample values and compared); binds `name` to its kind.
- `CausalMask(name, form)`: a mask whose value, evaluated from the graph (buffers carry a content tag from
  capture), is causal in the given form: "fill" (True where a score is hidden, for masked_fill), "keep" (True
  where it is seen, for where and SDPA) or "additive" (-inf where hidden, 0 elsewhere).

Every node a pattern matched, except the root, must feed only nodes of the same match: a subgraph is replaceable
only when nothing outside it reads its intermediate values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Union


@dataclass(frozen=True)
class Var:
    name: str
    check: Callable[[Any], bool] | None = None  # predicate over the bound Node


@dataclass(frozen=True)
class Const:
    name: str
    check: Callable[[Any], bool] | None = None  # predicate over the value


@dataclass(frozen=True)
class Absent:
    pass


@dataclass(frozen=True)
class Seq:
    items: tuple["Pattern", ...]


@dataclass(frozen=True)
class Op:
    ops: tuple[str, ...]
    args: tuple["Pattern", ...] = ()
    name: str = ""
    commutative: bool = False
    check: Callable[[Any, Any], bool] | None = None  # predicate over (GraphView, Node)


@dataclass(frozen=True)
class Alt:
    options: tuple["Pattern", ...]


ACTIVATIONS = ("relu", "gelu", "gelu_tanh", "silu")


@dataclass(frozen=True)
class Activation:
    name: str
    input: "Pattern"
    kinds: tuple[str, ...] = ACTIVATIONS


@dataclass(frozen=True)
class CausalMask:
    name: str
    form: str  # fill | keep | additive


Pattern = Union[Var, Const, Absent, Seq, Op, Alt, Activation, CausalMask]


def op(*ops: str, args: tuple[Pattern, ...] = (), name: str = "", commutative: bool = False,
       check: Callable[[Any, Any], bool] | None = None) -> Op:
    return Op(ops=tuple(ops), args=tuple(args), name=name, commutative=commutative, check=check)


def alt(*options: Pattern) -> Alt:
    return Alt(tuple(options))


def seq(*items: Pattern) -> Seq:
    return Seq(tuple(items))

"""Shape buckets of a model's user inputs (see fact_ray/shapes.py for what they are for): parsing, the bucket of a
call, example inputs drawn at a bucket's shapes, and `model.py@shapes=<bucket>` references. A module of the capture
layer of its own: `capture.load_model` reads these, and shapes.py (which composes and serves per bucket) sits above
compose."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from fact_ray.errors import UserError

SHAPES_MARK = "@shapes="


@dataclass(frozen=True)
class Bucket:
    """The shapes of a model's user inputs, one per input (None: not a tensor)."""

    shapes: tuple[Optional[tuple[int, ...]], ...]

    @property
    def spec(self) -> str:
        return ",".join("-" if s is None else "x".join(str(d) for d in s) for s in self.shapes)

    def __str__(self) -> str:
        return self.spec


def parse_bucket(text: str) -> Bucket:
    shapes: list[Optional[tuple[int, ...]]] = []
    for part in (p.strip() for p in text.split(",")):
        if part == "-":
            shapes.append(None)
            continue
        try:
            dims = tuple(int(d) for d in part.split("x"))
        except ValueError:
            raise UserError(f"--shapes: {part!r} is not a shape (write dims joined by x, e.g. 8x512x1024; inputs "
                            "separated by ',', buckets by ';')") from None
        if not dims or any(d < 1 for d in dims):
            raise UserError(f"--shapes: {part!r} has a dimension below 1")
        shapes.append(dims)
    return Bucket(tuple(shapes))


def parse_shapes(text: str | None) -> tuple[Bucket, ...]:
    """`--shapes "1x512x1024;8x2048x1024"` -> buckets, in order, without repeats."""
    if not text or not text.strip():
        return ()
    buckets = [parse_bucket(b) for b in text.split(";") if b.strip()]
    return tuple(dict.fromkeys(buckets))


def buckets_from(values: Any, where: str) -> tuple[Bucket, ...]:
    """A `get_shapes()` return value -> buckets: a list of buckets, each a list of per-input shapes."""
    if not isinstance(values, (list, tuple)) or not values:
        raise UserError(f"{where}: get_shapes() must return a non-empty list of buckets (each a list of input "
                        "shapes)")
    out = []
    for b in values:
        if not isinstance(b, (list, tuple)):
            raise UserError(f"{where}: get_shapes() bucket {b!r} is not a list of input shapes")
        shapes = []
        for s in b:
            if s is None:
                shapes.append(None)
            elif isinstance(s, (list, tuple, torch.Size)) and all(isinstance(d, int) and d >= 1 for d in s):
                shapes.append(tuple(int(d) for d in s))
            else:
                raise UserError(f"{where}: get_shapes() shape {s!r} is not a tuple of positive ints")
        out.append(Bucket(tuple(shapes)))
    return tuple(dict.fromkeys(out))


def bucket_of(args: Sequence[Any]) -> Bucket:
    """The bucket a call falls in: its arguments' shapes."""
    return Bucket(tuple(tuple(int(d) for d in a.shape) if isinstance(a, torch.Tensor) else None for a in args))


def inputs_for(examples: Sequence[Any], bucket: Bucket, seed: int = 0) -> tuple[Any, ...]:
    """Example inputs at `bucket`'s shapes, drawn like the model's own (see the module docstring)."""
    if len(bucket.shapes) != len(examples):
        raise UserError(f"shapes {bucket.spec} name {len(bucket.shapes)} input(s), the model takes {len(examples)}")
    gen = torch.Generator().manual_seed(seed)
    out: list[Any] = []
    for i, (x, shape) in enumerate(zip(examples, bucket.shapes)):
        if not isinstance(x, torch.Tensor):
            if shape is not None:
                raise UserError(f"shapes {bucket.spec}: input {i} is not a tensor (write '-' for it)")
            out.append(x)
            continue
        if shape is None or len(shape) != x.dim():
            raise UserError(f"shapes {bucket.spec}: input {i} has {x.dim()} dims ({'x'.join(map(str, x.shape))}), "
                            f"the bucket gives {'-' if shape is None else 'x'.join(map(str, shape))}")
        if x.is_floating_point():
            out.append(torch.randn(shape, generator=gen, dtype=torch.float32).to(x.dtype))
        elif x.dtype == torch.bool:
            out.append(torch.ones(shape, dtype=torch.bool))
        else:
            high = int(x.max()) + 1 if x.numel() else 2
            out.append(torch.randint(0, max(high, 1), shape, generator=gen, dtype=x.dtype))
    return tuple(out)


def shaped_ref(ref: str, bucket: Bucket) -> str:
    """The model reference that loads `ref` with inputs at `bucket`'s shapes."""
    return f"{split_ref(ref)[0]}{SHAPES_MARK}{bucket.spec}"


def split_ref(ref: str) -> tuple[str, Optional[Bucket]]:
    """`model.py@shapes=8x512x1024` -> ("model.py", Bucket); a plain reference -> (ref, None)."""
    if SHAPES_MARK not in ref or Path(ref).exists():
        return ref, None
    base, spec = ref.rsplit(SHAPES_MARK, 1)
    return base, parse_bucket(spec)

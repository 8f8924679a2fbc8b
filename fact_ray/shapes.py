"""Several input shapes: tune a model for a few shape buckets, serve every shape.

A captured graph, and so a composition, is specialised to the shapes it was captured with (torch.export guards
them). Production traffic comes in many batch sizes and sequence lengths, so a model is tuned for a few
**buckets** and the composed module dispatches per call:

* A bucket is the shapes of the model's user inputs, one per input (`Bucket`, written `1x512x1024` per input,
  inputs separated by `,`, a non-tensor input as `-`). A model names its buckets with `fact-ray run --shapes
  "1x512x1024;8x2048x1024"` (buckets separated by `;`), or with a `get_shapes()` in its KernelBench-format file
  returning a list of buckets, each a list of per-input shapes (`[[(1, 512, 1024)], [(8, 2048, 1024)]]`).
* Each bucket is captured, discovered, tuned and composed as a model of its own: its reference is the model's with
  `@shapes=<bucket>` appended (`shaped_ref`), which `capture.load_model` understands: the model is built as
  usual and its example inputs are drawn anew at the bucket's shapes (`inputs_for`: floating inputs from a seeded
  normal, integer inputs such as token ids below the largest value of the example, so ids stay in the
  vocabulary; non-tensor inputs as given).
* `ShapeDispatch(original, {bucket: composed})` is the served module. Its bucket rule, `RULE`
  ("exact-input-shapes"), is the simplest that is never wrong: a call whose input shapes equal a tuned bucket's
  runs that bucket's composition; any other call runs the original module, the PyTorch ops (correct, never an
  error, at eager speed). The rule is written in the dispatch artifact's manifest (`dispatch.json`, beside one
  ordinary artifact folder per bucket); `fact_ray.load` of such a folder returns the `ShapeDispatch`, and an
  ordinary artifact (every manifest written before buckets existed) loads as it always did.

Not yet: symbolic dims (`torch.export` with `Dim`s) so that one composition serves a range of shapes, and
padding a call up to the next bucket.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

import torch

from fact_ray.buckets import (  # noqa: F401 - re-exported: the bucket helpers live in the capture layer
    SHAPES_MARK, Bucket, bucket_of, buckets_from, inputs_for, parse_bucket, parse_shapes, shaped_ref, split_ref)
from fact_ray.errors import ArtifactError, ComposeError, first_line

RULE = "exact-input-shapes"
DISPATCH_FILE = "dispatch.json"
DISPATCH_KIND = "fact-ray-dispatch"
DISPATCH_SCHEMA = 1


# --------------------------------------------------------------------------------------------- the served module


class ShapeDispatch(torch.nn.Module):
    """The served module: per call, the composition tuned for the call's input shapes, else the original.

    `original` is the model (its own PyTorch ops); each composition shares its parameters. Compositions are
    registered as submodules so `.to()` moves them all.
    """

    def __init__(self, original: torch.nn.Module, compositions: Mapping[Bucket, torch.nn.Module]) -> None:
        super().__init__()
        self.original = original
        self.compositions = torch.nn.ModuleDict({f"b{i}": m for i, m in enumerate(compositions.values())})
        self.buckets = tuple(compositions)
        self._by_bucket = {b: f"b{i}" for i, b in enumerate(self.buckets)}
        self.rule = RULE

    def module_for(self, *args: Any) -> torch.nn.Module:
        name = self._by_bucket.get(bucket_of(args))
        return self.original if name is None else self.compositions[name]

    def forward(self, *args: Any) -> Any:
        return self.module_for(*args)(*args)


# --------------------------------------------------------------------------------------------- the artifact


def save_dispatch(out_dir: str | os.PathLike, buckets: Sequence[tuple[Bucket, str]],
                  model: Mapping[str, Any], skipped: Sequence[tuple[Bucket, str]] = ()) -> Path:
    """Write `dispatch.json` into `out_dir` (which holds one artifact folder per bucket, named relative to it)."""
    out = Path(out_dir)
    for _, sub in buckets:
        if not (out / sub / "manifest.json").is_file():
            raise ArtifactError(f"dispatch artifact {out}: bucket folder {sub} holds no manifest.json")
    data = {"kind": DISPATCH_KIND, "schema_version": DISPATCH_SCHEMA, "rule": RULE, "model": dict(model),
            "buckets": [{"shapes": [None if s is None else list(s) for s in b.shapes], "spec": b.spec,
                         "artifact": sub} for b, sub in buckets],
            "untuned": "the original module (PyTorch ops)",
            "skipped": [{"spec": b.spec, "reason": why} for b, why in skipped]}
    tmp = out / (DISPATCH_FILE + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
    os.replace(tmp, out / DISPATCH_FILE)
    return out


def read_dispatch(path: str | os.PathLike) -> Optional[dict[str, Any]]:
    """The dispatch manifest of an artifact folder, or None for an ordinary (single-shape) artifact."""
    f = Path(path) / DISPATCH_FILE
    if not f.is_file():
        return None
    try:
        data = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"artifact {path}: {DISPATCH_FILE} is damaged ({e})") from None
    if data.get("kind") != DISPATCH_KIND or data.get("schema_version") != DISPATCH_SCHEMA:
        raise ArtifactError(f"artifact {path}: {DISPATCH_FILE} is not a {DISPATCH_KIND} of schema "
                            f"{DISPATCH_SCHEMA}")
    if data.get("rule") != RULE:
        raise ArtifactError(f"artifact {path}: bucket rule {data.get('rule')!r} is not one this fact-ray knows "
                            f"({RULE})")
    return data


def policy_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest that says an artifact's policy: its own, or a dispatch artifact's first bucket's (every bucket
    of one is composed under one policy)."""
    from fact_ray.artifact import read_manifest

    data = read_dispatch(path)
    return read_manifest(path if data is None else Path(path) / data["buckets"][0]["artifact"])


def load_dispatch(path: str | os.PathLike, data: Mapping[str, Any], loaded: Any, *, device: Any = None,
                  **load_kw: Any) -> ShapeDispatch:
    """Each bucket's artifact composed over the very module `loaded` holds (inputs drawn at its shapes)."""
    import dataclasses

    from fact_ray.artifact import load

    compositions: dict[Bucket, torch.nn.Module] = {}
    for entry in data["buckets"]:
        bucket = Bucket(tuple(None if s is None else tuple(s) for s in entry["shapes"]))
        at = dataclasses.replace(loaded, inputs=inputs_for(loaded.inputs, bucket))
        compositions[bucket] = load(Path(path) / entry["artifact"], at, device=device, **load_kw)
    served = ShapeDispatch(loaded.module, compositions)
    return served.to(device) if device is not None else served


# --------------------------------------------------------------------------------------------- the pipeline


def model_buckets(ref: str, text: str | None) -> tuple[Bucket, ...]:
    """The buckets to tune `ref` for: `--shapes` when given, else the model file's get_shapes(), else none."""
    buckets = parse_shapes(text)
    if buckets or not _defines_get_shapes(ref):
        return buckets
    from fact_ray.capture import load_model

    return tuple(load_model(ref).buckets)


def _defines_get_shapes(ref: str) -> bool:
    """Whether a model file defines get_shapes() at its top level, read off its source: a run of a model without
    buckets does not pay for building the model once more to find out."""
    import ast

    path = Path(split_ref(ref)[0])
    if not path.is_file():
        return False  # a factory reference names no buckets; a missing file fails in the run, with its own line
    try:
        tree = ast.parse(path.read_text())
    except (OSError, SyntaxError, UnicodeDecodeError):
        return False
    return any(isinstance(n, ast.FunctionDef) and n.name == "get_shapes" for n in tree.body)


def compose_buckets(ref: str, settings: Any, out_dir: str | os.PathLike, buckets: Sequence[Bucket],
                    families: frozenset[str] = frozenset(), **compose_kw: Any) -> Path:
    """`fact-ray compose MODEL --shapes ...`: each bucket composed from the table, checked end to end and saved as
    an artifact folder `bucket-<i>` under `out_dir`, then `dispatch.json` naming them and the bucket rule.
    `compose_kw` goes to each `compose_from_table` (the whole-module guarantee's settings)."""
    from fact_ray.artifact import compose_from_table, read_manifest

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    saved: list[tuple[Bucket, str]] = []
    skipped: list[tuple[Bucket, str]] = []
    model: dict[str, Any] = {}
    for i, bucket in enumerate(buckets):
        sub = f"bucket-{i}"
        try:
            compose_from_table(shaped_ref(ref, bucket), settings, out / sub, families, **compose_kw)
        except ComposeError as e:  # nothing to replace, or a failed check: this bucket runs the PyTorch ops
            skipped.append((bucket, first_line(e, named=False)))
            continue
        model = {k: v for k, v in read_manifest(out / sub)["model"].items() if k in ("name", "hash")}
        saved.append((bucket, sub))
    if not saved:
        raise ComposeError(f"{ref}: no shape bucket could be composed ({skipped[0][1] if skipped else 'none given'})")
    return save_dispatch(out, saved, model, skipped)

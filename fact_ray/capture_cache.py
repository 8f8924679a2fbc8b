"""Captured graphs kept between runs, so that a model whose code, inputs and toolchain have not changed is not
traced again (torch.export costs seconds, most of them importing TorchDynamo: a large share of a run that the
pattern table serves entirely).

The key is everything the traced graph depends on: the model's code (its file, and every module loaded from
the folder it lives in), its init arguments (both in `model_hash`), the shapes and dtypes of its example inputs,
parameters and buffers, the torch version, and fact-ray's own capture code. A changed file anywhere in the
model's folder is a new key; nothing is ever served for a model that changed. Entries are pickles of frozen
dataclasses written atomically under `<home>/captures/`; an unreadable one is traced again and overwritten.

A pickle can name any function to call while it loads, so a file planted in the captures folder would run code.
Entries are read with an unpickler that resolves only the few classes an entry is made of (`_ALLOWED`: the graph's
dataclasses); a file naming anything else is refused as foreign (traced again and overwritten), never run.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pickle
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fact_ray.types import Graph, file_sha256

log = logging.getLogger("fact_ray.capture_cache")

CACHE_VERSION = 1
_OWN_CODE = ("capture.py", "types.py")  # what turns a module into a Graph here


@dataclass(frozen=True)
class CachedCapture:
    graph: Graph
    method: str  # "export" | "fx"
    notes: tuple[str, ...] = ()


def _model_dir(loaded: Any) -> Path | None:
    if loaded.ref and Path(loaded.ref).is_file():
        return Path(loaded.ref).resolve().parent
    module = sys.modules.get(type(loaded.module).__module__)
    where = getattr(module, "__file__", None)
    return Path(where).resolve().parent if where else None


def _beside_model(folder: Path | None) -> list[tuple[str, str]]:
    """(path relative to the model's folder, sha256) of every loaded module that lives in that folder or below."""
    if folder is None:
        return []
    out = []
    for module in list(sys.modules.values()):
        where = getattr(module, "__file__", None)
        if not where or not where.endswith(".py"):
            continue
        path = Path(where).resolve()
        if folder in path.parents and path.is_file():
            out.append((str(path.relative_to(folder)), file_sha256(path)))
    return sorted(set(out))


def _metas(tensors: Any) -> list[tuple[str, tuple[int, ...], str, str]]:
    import torch

    return [(name, tuple(t.shape), str(t.dtype), t.device.type) for name, t in tensors if isinstance(t, torch.Tensor)]


def _buffer_contents(module: Any) -> list[tuple[str, str]]:
    """sha256 of each buffer small enough for capture to read (its causal-mask tags come from buffer values)."""
    import torch

    from fact_ray.capture import _CONTENT_MAX_NUMEL

    out = []
    for name, t in module.named_buffers():
        if isinstance(t, torch.Tensor) and t.numel() <= _CONTENT_MAX_NUMEL and t.device.type != "meta":
            raw = t.detach().cpu().contiguous().view(-1).view(torch.uint8)
            out.append((name, hashlib.sha256(raw.numpy().tobytes()).hexdigest()))
    return out


def key_of(loaded: Any) -> str:
    import torch

    from fact_ray import __file__ as pkg_file

    here = Path(pkg_file).parent
    parts = [
        f"v{CACHE_VERSION}", torch.__version__, loaded.name, loaded.model_hash,
        *(f"{name}:{file_sha256(here / name)}" for name in _OWN_CODE),
        repr(_beside_model(_model_dir(loaded))),
        repr(_metas((str(i), x) for i, x in enumerate(loaded.inputs))),
        repr([(i, type(x).__name__, x) for i, x in enumerate(loaded.inputs)
              if isinstance(x, (int, float, bool, str, type(None)))]),
        repr(_metas(loaded.module.named_parameters())), repr(_metas(loaded.module.named_buffers())),
        repr(_buffer_contents(loaded.module)),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()


# What an entry is made of; everything else a pickle could name (os.system, builtins.eval...) is refused.
_ALLOWED = frozenset({("fact_ray.capture_cache", "CachedCapture"),
                      *(("fact_ray.types", n) for n in ("Graph", "Node", "Ref", "TensorMeta", "Precision", "Arch")),
                      *(("builtins", n) for n in ("slice", "frozenset", "set", "complex", "range"))})


class _EntryUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refers to {module}.{name}, which no capture entry holds")
        return super().find_class(module, name)


def read_entry(path: str | os.PathLike) -> Any:
    """An entry's object, resolving only `_ALLOWED` classes (UnpicklingError for anything else)."""
    with open(path, "rb") as f:
        return _EntryUnpickler(f).load()


def captured(loaded: Any, cache_dir: str | os.PathLike) -> tuple[CachedCapture, bool]:
    """The model's graph, from the cache when its key is there, else traced (and stored). Returns (it, hit)."""
    from fact_ray.capture import capture

    path = Path(cache_dir) / f"{key_of(loaded)}.pkl"
    if path.is_file():
        try:
            entry = read_entry(path)
            if isinstance(entry, CachedCapture):
                return entry, True
            log.warning("capture cache entry %s holds a %s; tracing again", path, type(entry).__name__)
        except Exception as e:  # a truncated or foreign file: trace again and overwrite it
            log.warning("capture cache entry %s unreadable (%s); tracing again", path, e)
    c = capture(loaded)
    entry = CachedCapture(graph=c.graph, method=c.method, notes=tuple(c.notes))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(entry, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return entry, False

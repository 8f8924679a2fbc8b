"""Test-only CPU ops registered the way fact-ray registers its kernels (a `torch.library` custom op with a schema
and a fake implementation), and a two-layer model whose Linear layers can be swapped for them: enough to run
the whole-module guarantee, torch.compile stacking and AOTInductor packaging on a CPU.

Importing this module registers the ops (once per process); a fresh process that loads an AOTInductor package
of a module calling them imports it first, as a deployment loads the artifact's libraries first.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

_SCHEMA = "(Tensor x, Tensor w, Tensor b) -> Tensor"


def _linear(x, w, b):
    return F.linear(x, w, b)


def _slow_linear(x, w, b):
    # Really slow: the same GEMM twenty times over (a planted loser that the GPU test's CUDA events see).
    y = F.linear(x, w, b)
    for _ in range(19):
        y = F.linear(x, w, b)
    return y


def _fake(x, w, b):
    if x.shape[-1] != w.shape[1] or b.shape[0] != w.shape[0]:
        raise ValueError("fr_test op: shapes do not fit")
    return x.new_empty((*x.shape[:-1], w.shape[0]))


fast_linear = torch.library.custom_op("fr_test::fast_linear", _linear, mutates_args=(), schema=_SCHEMA)
fast_linear.register_fake(_fake)
slow_linear = torch.library.custom_op("fr_test::slow_linear", _slow_linear, mutates_args=(), schema=_SCHEMA)
slow_linear.register_fake(_fake)

OPS = {"fast": torch.ops.fr_test.fast_linear.default, "slow": torch.ops.fr_test.slow_linear.default}


class TwoLayers(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, 2 * d)
        self.fc2 = nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.fc2(F.relu(self.fc1(x)))


class Replaced(nn.Module):
    """`TwoLayers` with some layers computed by the test ops: `use` maps "fc1"/"fc2" to "fast" or "slow".
    It shares the original's parameters, as a composed module does."""

    def __init__(self, original: TwoLayers, use: dict) -> None:
        super().__init__()
        self.fc1, self.fc2 = original.fc1, original.fc2
        self.ops = {k: OPS[v] for k, v in use.items()}

    def _layer(self, name, x):
        layer = getattr(self, name)
        op = self.ops.get(name)
        return layer(x) if op is None else op(x, layer.weight, layer.bias)

    def forward(self, x):
        return x + self._layer("fc2", F.relu(self._layer("fc1", x)))

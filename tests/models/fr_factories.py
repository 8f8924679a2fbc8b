"""Test-only factories for `pkg.module:factory` references (the tests put this folder on sys.path)."""
import torch
import torch.nn as nn


def make_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)), (torch.randn(4, 16),)


def make_raises():
    raise RuntimeError("no weights at /nowhere")


def make_wrong():
    return nn.Linear(4, 4)


not_callable = 3

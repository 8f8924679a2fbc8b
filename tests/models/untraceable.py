"""Test-only: data-dependent control flow, which neither torch.export nor torch.fx can trace."""
import torch
import torch.nn as nn


class Model(nn.Module):
    def forward(self, a, b):
        if a.sum() > 0:
            return a @ b
        return b @ a


def get_inputs():
    return [torch.randn(8, 8), torch.randn(8, 8)]


def get_init_inputs():
    return []

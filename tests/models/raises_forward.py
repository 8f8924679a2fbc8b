"""Test-only: forward raises (operand shapes do not fit)."""
import torch
import torch.nn as nn


class Model(nn.Module):
    def forward(self, a, b):
        return torch.matmul(a, b)


def get_inputs():
    return [torch.randn(4, 5), torch.randn(6, 3)]


def get_init_inputs():
    return []

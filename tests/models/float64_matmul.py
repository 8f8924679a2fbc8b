"""Test-only: a float64 GEMM, a dtype fact-ray does not tune."""
import torch
import torch.nn as nn


class Model(nn.Module):
    def forward(self, a, b):
        return a @ b


def get_inputs():
    return [torch.randn(16, 8, dtype=torch.float64), torch.randn(8, 4, dtype=torch.float64)]


def get_init_inputs():
    return []

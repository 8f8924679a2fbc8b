"""Test-only: a tiny MLP block for composition (Linear+GELU, then Linear+bias+residual), KernelBench format."""
import torch
import torch.nn as nn
import torch.nn.functional as F


class Model(nn.Module):
    def __init__(self, d: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, hidden)
        self.fc2 = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(x)))


def get_inputs():
    return [torch.randn(2, 8, 64)]


def get_init_inputs():
    return [64, 128]

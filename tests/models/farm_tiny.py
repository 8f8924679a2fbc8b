"""A tiny KernelBench-format model for the farm tests: one Linear + bias + ReLU (a GEMM-family pattern whose
sm80 translation unit compiles in about ten seconds) followed by a LayerNorm (a family with no kernel yet)."""
import torch
import torch.nn as nn

BATCH, IN, OUT = 64, 128, 256


class Model(nn.Module):
    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, out_features)
        self.norm = nn.LayerNorm(out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(torch.relu(self.fc(x)))


def get_inputs():
    return [torch.rand(BATCH, IN)]


def get_init_inputs():
    return [IN, OUT]

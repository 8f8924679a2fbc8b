"""Batched fp32 matrix multiplication: 128 x (512x1024 @ 1024x2048) (KernelBench format)."""
import torch
import torch.nn as nn

BATCH, M, K, N = 128, 512, 1024, 2048


class Model(nn.Module):
    """C[b] = A[b] @ B[b]."""

    def forward(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return torch.bmm(A, B)


def get_inputs():
    return [torch.rand(BATCH, M, K), torch.rand(BATCH, K, N)]


def get_init_inputs():
    return []

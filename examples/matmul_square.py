"""Square fp32 matrix multiplication, N = 4096 (KernelBench format)."""
import torch
import torch.nn as nn

N = 4096


class Model(nn.Module):
    """C = A @ B for square matrices."""

    def forward(self, A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
        return torch.matmul(A, B)


def get_inputs():
    return [torch.rand(N, N), torch.rand(N, N)]


def get_init_inputs():
    return []

"""A KernelBench-format model whose constructor raises: the farm must report it as one line (ModelRaised)."""
import torch
import torch.nn as nn


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        raise RuntimeError("planted failure in Model.__init__")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def get_inputs():
    return [torch.rand(4, 4)]


def get_init_inputs():
    return []

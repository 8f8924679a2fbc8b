"""Test-only: Model.__init__ raises."""
import torch
import torch.nn as nn


class Model(nn.Module):
    def __init__(self, width):
        super().__init__()
        raise ValueError(f"width {width} is not supported")


def get_inputs():
    return [torch.randn(4, 4)]


def get_init_inputs():
    return [7]

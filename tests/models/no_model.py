"""Test-only: a file with get_inputs but no Model class."""
import torch


def get_inputs():
    return [torch.randn(4, 4)]


def get_init_inputs():
    return []

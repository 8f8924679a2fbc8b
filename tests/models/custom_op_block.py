"""A block whose first op has no fake (meta) kernel: torch.export cannot trace it, torch.fx can.

Test-only model (KernelBench format) for the FX fallback of capture.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

if not hasattr(torch.ops.fact_ray_test, "double_it"):
    torch.library.define("fact_ray_test::double_it", "(Tensor x) -> Tensor")
    torch.library.impl("fact_ray_test::double_it", "CPU")(lambda x: x * 2)


class Model(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)
        self.heads = heads
        self.register_buffer("mask", torch.tril(torch.ones(8, 8)).view(1, 1, 8, 8))

    def forward(self, x):
        x = torch.ops.fact_ray_test.double_it(x)
        B, T, C = x.shape
        q, k, v = self.qkv(self.ln(x)).chunk(3, dim=-1)
        q = q.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        k = k.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        v = v.view(B, T, self.heads, C // self.heads).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(C // self.heads)
        att = att.masked_fill(self.mask == 0, float("-inf"))
        y = (F.softmax(att, dim=-1) @ v).transpose(1, 2).reshape(B, T, C)
        h = self.fc(x + y)
        h = 0.5 * h * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (h + 0.044715 * torch.pow(h, 3.0))))
        return x + self.proj(h)


def get_inputs():
    return [torch.randn(2, 8, 32)]


def get_init_inputs():
    return [32, 4]

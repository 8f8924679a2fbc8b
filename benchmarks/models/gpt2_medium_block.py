"""A GPT-2-medium-style transformer block (KernelBench format), issue 18's second block: pre-LayerNorms, a fused
QKV projection with bias split into 16 heads of 64, causal `F.scaled_dot_product_attention`, the output
projection plus residual, an MLP of 4d with the exact (erf) GELU, residual adds.

d 1024, 16 heads, batch 8 x sequence 256 by default; FR_BATCH, FR_SEQ, FR_EMBD, FR_HEADS override them (read when
called). Issue 18 runs it in bf16: `fact-ray run ... --policy bf16`.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F


def _env(name, default):
    return int(os.environ.get(name, default))


class Model(nn.Module):
    def __init__(self, d, n_head):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)
        self.act = nn.GELU()

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.proj(self.act(self.fc(self.ln_2(x))))


def get_inputs():
    return [torch.randn(_env("FR_BATCH", 8), _env("FR_SEQ", 256), _env("FR_EMBD", 1024))]


def get_init_inputs():
    return [_env("FR_EMBD", 1024), _env("FR_HEADS", 16)]

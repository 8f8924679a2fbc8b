"""Attention whose batched GEMMs read strided views (KernelBench format): q, k, v are slices of one fused
projection, `c_attn(x).split(C, dim=2)`, each `view`ed to heads and `transpose`d, so the scores GEMM reads q and k
with strides (T*3C, D, 3C, 1): not contiguous. No causal mask (a bidirectional encoder layer), softmax through
`masked_fill` of a padding-free boolean mask, heads merged with `contiguous().view`.

Sizes: FR_BATCH (default 8), FR_SEQ (512), FR_EMBD (768), FR_HEADS (12).
"""
import math
import os

import torch
import torch.nn as nn


def _env(name, default):
    return int(os.environ.get(name, default))


class Model(nn.Module):
    def __init__(self, n_embd, n_head):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.n_head, self.n_embd = n_head, n_embd

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(C // self.n_head)
        att = torch.softmax(att, dim=-1)
        y = torch.matmul(att, v)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


def get_inputs():
    return [torch.randn(_env("FR_BATCH", 8), _env("FR_SEQ", 512), _env("FR_EMBD", 768))]


def get_init_inputs():
    return [_env("FR_EMBD", 768), _env("FR_HEADS", 12)]

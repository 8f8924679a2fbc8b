"""Grouped-query attention spelled the long way (KernelBench format): `F.linear` calls on raw parameters, K and V
heads repeated with `repeat_interleave` to the query heads, scores through `torch.baddbmm` over a zero bias with
`alpha` = 1/sqrt(D), a causal `masked_fill`, softmax, then `bmm` with V; an `nn.SiLU` gated MLP (SwiGLU) through
an `nn.ModuleDict`; heads merged with `transpose(1, 2).contiguous().view`.

Sizes: FR_BATCH (default 4), FR_SEQ (512), FR_EMBD (1024), FR_HEADS (16), FR_KV_HEADS (4).
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F


def _env(name, default):
    return int(os.environ.get(name, default))


class Model(nn.Module):
    def __init__(self, n_embd, n_head, n_kv_head, max_seqlen):
        super().__init__()
        d = n_embd // n_head
        self.wq = nn.Parameter(torch.randn(n_embd, n_embd) / math.sqrt(n_embd))
        self.wk = nn.Parameter(torch.randn(n_kv_head * d, n_embd) / math.sqrt(n_embd))
        self.wv = nn.Parameter(torch.randn(n_kv_head * d, n_embd) / math.sqrt(n_embd))
        self.wo = nn.Parameter(torch.randn(n_embd, n_embd) / math.sqrt(n_embd))
        self.mlp = nn.ModuleDict(dict(gate=nn.Linear(n_embd, 2 * n_embd, bias=False),
                                      up=nn.Linear(n_embd, 2 * n_embd, bias=False),
                                      down=nn.Linear(2 * n_embd, n_embd, bias=False), act=nn.SiLU()))
        self.register_buffer("causal", torch.ones(max_seqlen, max_seqlen, dtype=torch.bool).triu(1))
        self.n_head, self.n_kv_head, self.d = n_head, n_kv_head, d

    def forward(self, x):
        B, T, C = x.shape
        H, G, D = self.n_head, self.n_kv_head, self.d
        q = F.linear(x, self.wq).view(B, T, H, D).transpose(1, 2)
        k = F.linear(x, self.wk).view(B, T, G, D).transpose(1, 2).repeat_interleave(H // G, dim=1)
        v = F.linear(x, self.wv).view(B, T, G, D).transpose(1, 2).repeat_interleave(H // G, dim=1)
        q, k, v = (t.reshape(B * H, T, D) for t in (q, k, v))
        scores = torch.baddbmm(torch.zeros(B * H, T, T, dtype=x.dtype, device=x.device), q, k.transpose(1, 2),
                               beta=0.0, alpha=1.0 / math.sqrt(D))
        scores = scores.view(B, H, T, T).masked_fill(self.causal[:T, :T], float("-inf"))
        y = torch.bmm(torch.softmax(scores, dim=-1).view(B * H, T, T), v)
        y = y.view(B, H, T, D).transpose(1, 2).contiguous().view(B, T, C)
        x = x + F.linear(y, self.wo)
        m = self.mlp
        return x + m.down(m.act(m.gate(x)) * m.up(x))


def get_inputs():
    return [torch.randn(_env("FR_BATCH", 4), _env("FR_SEQ", 512), _env("FR_EMBD", 1024))]


def get_init_inputs():
    return [_env("FR_EMBD", 1024), _env("FR_HEADS", 16), _env("FR_KV_HEADS", 4), _env("FR_SEQ", 512)]

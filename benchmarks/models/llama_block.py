"""A Llama-style transformer block (KernelBench format), issue 18's first block: pre-RMSNorm, bias-free q/k/v/o
projections, rotary position embeddings (rotate-half form, cos/sin buffers), `F.scaled_dot_product_attention`
(causal), a SwiGLU MLP (`silu(gate(x)) * up(x)` then `down`), residual adds.

d 1024, 16 heads of 64, MLP 2816, batch 4 x sequence 512 by default; FR_BATCH, FR_SEQ, FR_EMBD, FR_HEADS,
FR_FFN override them (read when called). Issue 18 runs it in bf16: `fact-ray run ... --policy bf16`.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F


def _env(name, default):
    return int(os.environ.get(name, default))


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Model(nn.Module):
    def __init__(self, d, n_head, ffn, max_seqlen, theta=10000.0):
        super().__init__()
        self.n_head, self.hd = n_head, d // n_head
        self.attn_norm, self.mlp_norm = RMSNorm(d), RMSNorm(d)
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.gate_proj = nn.Linear(d, ffn, bias=False)
        self.up_proj = nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)
        inv = 1.0 / theta ** (torch.arange(0, self.hd, 2).float() / self.hd)
        freqs = torch.outer(torch.arange(max_seqlen).float(), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, x):
        B, T, C = x.shape
        h = self.attn_norm(x)
        q = self.q_proj(h).view(B, T, self.n_head, self.hd).transpose(1, 2)
        k = self.k_proj(h).view(B, T, self.n_head, self.hd).transpose(1, 2)
        v = self.v_proj(h).view(B, T, self.n_head, self.hd).transpose(1, 2)
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o_proj(y.transpose(1, 2).reshape(B, T, C))
        h = self.mlp_norm(x)
        return x + self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


def get_inputs():
    return [torch.randn(_env("FR_BATCH", 4), _env("FR_SEQ", 512), _env("FR_EMBD", 1024))]


def get_init_inputs():
    return [_env("FR_EMBD", 1024), _env("FR_HEADS", 16), _env("FR_FFN", 2816), _env("FR_SEQ", 512)]

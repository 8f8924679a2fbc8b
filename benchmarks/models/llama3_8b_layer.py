"""One Llama-3-8B decoder layer (KernelBench format) at its true sizes by default: d 4096, 32 query heads over 8
key/value heads of head dim 128 (grouped-query attention through SDPA's `enable_gqa`, causal), SwiGLU MLP of
14336 (`down(silu(gate(x)) * up(x))`), RMSNorm eps 1e-5 in HF's form (rows upcast to float32, normalised, cast
back, times the weight), rotary embeddings in HF's rotate-half form with theta 500000, residual adds, no biases.

Issue 16 measures it in bf16 at 8 x 2048 tokens: `fact-ray run benchmarks/models/llama3_8b_layer.py --policy bf16`
(the policy casts the model and its inputs). Sizes are read when called: FR_BATCH (8), FR_SEQ (2048), FR_EMBD
(4096), FR_HEADS (32), FR_KV_HEADS (8), FR_HEAD_DIM (128), FR_FFN (14336). A CPU-sized layer for tests:
FR_BATCH=1 FR_SEQ=32 FR_EMBD=256 FR_HEADS=4 FR_KV_HEADS=2 FR_HEAD_DIM=64 FR_FFN=512.
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

EPS = 1e-5
ROPE_THETA = 500000.0


def _env(name, default):
    return int(os.environ.get(name, default))


class RMSNorm(nn.Module):
    """LlamaRMSNorm: the statistics in float32 whatever the model's dtype."""

    def __init__(self, dim, eps=EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class MLP(nn.Module):
    """LlamaMLP: down_proj(act_fn(gate_proj(x)) * up_proj(x)) with act_fn = SiLU."""

    def __init__(self, d, ffn):
        super().__init__()
        self.gate_proj = nn.Linear(d, ffn, bias=False)
        self.up_proj = nn.Linear(d, ffn, bias=False)
        self.down_proj = nn.Linear(ffn, d, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class Model(nn.Module):
    def __init__(self, d, n_head, n_kv_head, head_dim, ffn, max_seqlen, theta=ROPE_THETA):
        super().__init__()
        self.n_head, self.n_kv_head, self.hd = n_head, n_kv_head, head_dim
        self.input_layernorm, self.post_attention_layernorm = RMSNorm(d), RMSNorm(d)
        self.q_proj = nn.Linear(d, n_head * head_dim, bias=False)
        self.k_proj = nn.Linear(d, n_kv_head * head_dim, bias=False)
        self.v_proj = nn.Linear(d, n_kv_head * head_dim, bias=False)
        self.o_proj = nn.Linear(n_head * head_dim, d, bias=False)
        self.mlp = MLP(d, ffn)
        inv = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
        freqs = torch.outer(torch.arange(max_seqlen).float(), inv)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, x):
        B, T, _ = x.shape
        h = self.input_layernorm(x)
        q = self.q_proj(h).view(B, T, self.n_head, self.hd).transpose(1, 2)
        k = self.k_proj(h).view(B, T, self.n_kv_head, self.hd).transpose(1, 2)
        v = self.v_proj(h).view(B, T, self.n_kv_head, self.hd).transpose(1, 2)
        cos, sin = self.cos[:T].to(x.dtype), self.sin[:T].to(x.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_head != self.n_head)
        x = x + self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_head * self.hd))
        return x + self.mlp(self.post_attention_layernorm(x))


def get_inputs():
    return [torch.randn(_env("FR_BATCH", 8), _env("FR_SEQ", 2048), _env("FR_EMBD", 4096))]


def get_init_inputs():
    return [_env("FR_EMBD", 4096), _env("FR_HEADS", 32), _env("FR_KV_HEADS", 8), _env("FR_HEAD_DIM", 128),
            _env("FR_FFN", 14336), _env("FR_SEQ", 2048)]

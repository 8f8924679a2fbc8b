"""A MiniGPT block as KernelBench level 3 problem 44 writes it (KernelBench format): the MLP is a closure,
`self.mlpf = lambda x: ...`, over an `nn.ModuleDict`; q, k, v come from `c_attn(x).split(...)` then `view` +
`transpose`; the causal mask is a `masked_fill` over a tril buffer; the heads are merged with
`transpose(1, 2).contiguous().view(...)`; the GELU is GPT-2's `NewGELU` module, spelled out.

Sizes (read when called, so one process can build several): FR_BATCH (default 8), FR_SEQ (512), FR_EMBD (768),
FR_HEADS (12). Run it under the policy you mean (`--policy bf16` for the suite's bf16 numbers).
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F


def _env(name, default):
    return int(os.environ.get(name, default))


class NewGELU(nn.Module):
    def forward(self, x):
        return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd, n_head, max_seqlen):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)
        self.register_buffer("bias", torch.tril(torch.ones(max_seqlen, max_seqlen)).view(1, 1, max_seqlen, max_seqlen))
        self.n_head, self.n_embd = n_head, n_embd

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.c_proj(y)


class Model(nn.Module):
    def __init__(self, n_embd, n_head, max_seqlen):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = CausalSelfAttention(n_embd, n_head, max_seqlen)
        self.ln_2 = nn.LayerNorm(n_embd)
        self.mlp = nn.ModuleDict(dict(
            c_fc=nn.Linear(n_embd, 4 * n_embd),
            c_proj=nn.Linear(4 * n_embd, n_embd),
            act=NewGELU(),
            dropout=nn.Dropout(0.0),
        ))
        m = self.mlp
        self.mlpf = lambda x: m.dropout(m.c_proj(m.act(m.c_fc(x))))  # the closure a deep copy does not convert

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlpf(self.ln_2(x))
        return x


def get_inputs():
    return [torch.randn(_env("FR_BATCH", 8), _env("FR_SEQ", 512), _env("FR_EMBD", 768))]


def get_init_inputs():
    return [_env("FR_EMBD", 768), _env("FR_HEADS", 12), _env("FR_SEQ", 512)]

"""GPT-2 from `transformers` (KernelBench format): a GPT2Model built from a GPT2Config with random weights (no
download), eager attention (HF's own spelling: `Conv1D` projections, which are `addmm` over [K, N] weights; q, k, v
from `c_attn(x).split` + view + transpose; `NewGELUActivation`; the causal mask built by the model).

Sizes (read when called): FR_BATCH (default 8) x FR_SEQ (512) tokens; FR_EMBD (768), FR_HEADS (12), FR_LAYERS (2).
Needs `pip install 'fact-ray[models]'`. Run it under the policy you mean (`--policy bf16` for the suite).
"""
import os

import torch
import torch.nn as nn


def _env(name, default):
    return int(os.environ.get(name, default))


class Model(nn.Module):
    def __init__(self, n_embd, n_head, n_layer, n_positions, attn="eager"):
        super().__init__()
        from transformers import GPT2Config, GPT2Model

        config = GPT2Config(n_embd=n_embd, n_head=n_head, n_layer=n_layer, n_positions=n_positions,
                            vocab_size=8192, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False)
        config._attn_implementation = attn
        self.model = GPT2Model(config)

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).last_hidden_state


def get_inputs():
    return [torch.randint(0, 8192, (_env("FR_BATCH", 8), _env("FR_SEQ", 512)))]


def get_init_inputs():
    return [_env("FR_EMBD", 768), _env("FR_HEADS", 12), _env("FR_LAYERS", 2), max(_env("FR_SEQ", 512), 1024)]

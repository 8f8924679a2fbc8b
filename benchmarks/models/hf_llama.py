"""Llama from `transformers` (KernelBench format): a LlamaModel built from a LlamaConfig with random weights (no
download) and grouped-query attention (16 query heads over 4 key/value heads), SDPA attention as HF runs it
(K and V heads repeated with `repeat_kv`'s expand + reshape, or SDPA's `enable_gqa`), RMSNorm, RoPE, SwiGLU MLP.

Sizes (read when called): FR_BATCH (default 4) x FR_SEQ (512) tokens; FR_EMBD (1024), FR_HEADS (16), FR_KV_HEADS (4),
FR_FFN (2816), FR_LAYERS (2). Needs `pip install 'fact-ray[models]'`. Run it under `--policy bf16` for the suite.
"""
import os

import torch
import torch.nn as nn


def _env(name, default):
    return int(os.environ.get(name, default))


class Model(nn.Module):
    def __init__(self, hidden, heads, kv_heads, ffn, layers, max_positions, attn="sdpa"):
        super().__init__()
        from transformers import LlamaConfig, LlamaModel

        config = LlamaConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
                             intermediate_size=ffn, num_hidden_layers=layers, max_position_embeddings=max_positions,
                             vocab_size=8192, use_cache=False)
        config._attn_implementation = attn
        self.model = LlamaModel(config)

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).last_hidden_state


def get_inputs():
    return [torch.randint(0, 8192, (_env("FR_BATCH", 4), _env("FR_SEQ", 512)))]


def get_init_inputs():
    return [_env("FR_EMBD", 1024), _env("FR_HEADS", 16), _env("FR_KV_HEADS", 4), _env("FR_FFN", 2816),
            _env("FR_LAYERS", 2), max(_env("FR_SEQ", 512), 2048)]

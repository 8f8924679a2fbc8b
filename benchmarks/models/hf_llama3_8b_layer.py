"""One Llama-3-8B decoder layer as `transformers` writes it (KernelBench format): `LlamaDecoderLayer` built from a
`LlamaConfig` with Llama-3-8B's sizes and random weights (no download), its rotary embedding computed per call by
`LlamaRotaryEmbedding` as `LlamaModel` does (theta 500000), SDPA attention as HF runs it (32 query heads over 8
key/value heads of 128, causal), HF's RMSNorm (eps 1e-5) and SwiGLU MLP (14336). The same layer as
`llama3_8b_layer.py`, in the third-party code a user would bring (issue 16: "the `transformers` Llama layer").

Issue 16 measures it in bf16 at 8 x 2048 tokens (the input is the layer's hidden states, [B, T, d]). Sizes are
read when called: FR_BATCH (8), FR_SEQ (2048), FR_EMBD (4096), FR_HEADS (32), FR_KV_HEADS (8), FR_FFN (14336).
A CPU-sized layer for tests: FR_BATCH=1 FR_SEQ=32 FR_EMBD=256 FR_HEADS=4 FR_KV_HEADS=2 FR_FFN=512. Needs
`pip install 'fact-ray[models]'`.
"""
import os

import torch
import torch.nn as nn


def _env(name, default):
    return int(os.environ.get(name, default))


class Model(nn.Module):
    def __init__(self, hidden, heads, kv_heads, ffn, max_positions, attn="sdpa"):
        super().__init__()
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        config = LlamaConfig(hidden_size=hidden, num_attention_heads=heads, num_key_value_heads=kv_heads,
                             head_dim=hidden // heads, intermediate_size=ffn, num_hidden_layers=1,
                             max_position_embeddings=max_positions, rms_norm_eps=1e-5, rope_theta=500000.0,
                             vocab_size=8192, use_cache=False)
        config._attn_implementation = attn
        self.layer = LlamaDecoderLayer(config, layer_idx=0)
        self.rotary = LlamaRotaryEmbedding(config)

    def forward(self, hidden_states):
        positions = torch.arange(hidden_states.shape[1], device=hidden_states.device)[None, :]
        cos, sin = self.rotary(hidden_states, positions)
        # no mask: HF's SDPA path then asks SDPA for the causal mask itself (is_causal), as LlamaModel's does
        out = self.layer(hidden_states, attention_mask=None, position_ids=positions, position_embeddings=(cos, sin))
        return out[0] if isinstance(out, tuple) else out  # transformers 4.x returns a tuple, 5.x the tensor


def get_inputs():
    return [torch.randn(_env("FR_BATCH", 8), _env("FR_SEQ", 2048), _env("FR_EMBD", 4096))]


def get_init_inputs():
    return [_env("FR_EMBD", 4096), _env("FR_HEADS", 32), _env("FR_KV_HEADS", 8), _env("FR_FFN", 14336),
            max(_env("FR_SEQ", 2048), 2048)]

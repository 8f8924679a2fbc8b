"""BERT from `transformers` (KernelBench format): a BertModel built from a BertConfig with random weights (no
download): post-LayerNorm encoder layers, bidirectional attention (no mask: every token attends to every token),
exact GELU in the intermediate layer, no pooler.

Sizes (read when called): FR_BATCH (default 8) x FR_SEQ (512) tokens; FR_EMBD (768), FR_HEADS (12), FR_LAYERS (2).
Needs `pip install 'fact-ray[models]'`. Run it under `--policy bf16` for the suite.
"""
import os

import torch
import torch.nn as nn


def _env(name, default):
    return int(os.environ.get(name, default))


class Model(nn.Module):
    def __init__(self, hidden, heads, layers, max_positions, attn="sdpa"):
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
                            intermediate_size=4 * hidden, max_position_embeddings=max_positions, vocab_size=8192,
                            hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        config._attn_implementation = attn
        self.model = BertModel(config, add_pooling_layer=False)

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).last_hidden_state


def get_inputs():
    return [torch.randint(0, 8192, (_env("FR_BATCH", 8), _env("FR_SEQ", 512)))]


def get_init_inputs():
    return [_env("FR_EMBD", 768), _env("FR_HEADS", 12), _env("FR_LAYERS", 2), max(_env("FR_SEQ", 512), 512)]

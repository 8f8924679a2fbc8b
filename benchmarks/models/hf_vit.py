"""ViT from `transformers` (KernelBench format): a ViTModel built from a ViTConfig with random weights (no
download): a patch-embedding convolution, pre-LayerNorm encoder layers, bidirectional attention, exact GELU.

Sizes (read when called): FR_BATCH (default 8) images of FR_IMAGE (224) pixels in patches of 16, i.e. 197 tokens
per image (8 x 197 = 1576 tokens); FR_EMBD (768), FR_HEADS (12), FR_LAYERS (2). Needs `pip install
'fact-ray[models]'`. Run it under `--policy bf16` for the suite.
"""
import os

import torch
import torch.nn as nn


def _env(name, default):
    return int(os.environ.get(name, default))


class Model(nn.Module):
    def __init__(self, hidden, heads, layers, image, attn="sdpa"):
        super().__init__()
        from transformers import ViTConfig, ViTModel

        config = ViTConfig(hidden_size=hidden, num_attention_heads=heads, num_hidden_layers=layers,
                           intermediate_size=4 * hidden, image_size=image, patch_size=16,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        config._attn_implementation = attn
        self.model = ViTModel(config, add_pooling_layer=False)

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).last_hidden_state


def get_inputs():
    image = _env("FR_IMAGE", 224)
    return [torch.randn(_env("FR_BATCH", 8), 3, image, image)]


def get_init_inputs():
    return [_env("FR_EMBD", 768), _env("FR_HEADS", 12), _env("FR_LAYERS", 2), _env("FR_IMAGE", 224)]

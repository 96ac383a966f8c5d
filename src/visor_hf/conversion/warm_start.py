"""Initialisation of the modules that VISOR adds to a LLaVA-OneVision model."""

from __future__ import annotations

import torch

from ..modeling import VisorForConditionalGeneration


@torch.no_grad()
def warm_start_new_modules(model: VisorForConditionalGeneration) -> None:
    """Start every cross-attention block from its host layer, so a freshly converted model already sees the image.

    - query/key/value/output projections: copies of the host layer's `self_attn` projections;
    - text and visual norms: copies of the host layer's `input_layernorm`;
    - conv position embedding: zero weights and bias (identity: `pos(v) = v`).
    The router keeps its random initialisation (it is trained on its own, with everything else frozen). The token
    packing module (when the config has one) starts as average pooling: each merge `[I/k, ..., I/k]`, bias 0.
    """
    layers = model.model.language_model.layers
    for name, block in model.model.cross_attention_blocks.items():
        host = layers[int(name)]
        for projection in ("q_proj", "k_proj", "v_proj", "o_proj"):
            source, target = getattr(host.self_attn, projection), getattr(block.cross_attn, projection)
            target.weight.copy_(source.weight)
            if target.bias is not None:
                target.bias.copy_(source.bias)
        block.input_layernorm.weight.copy_(host.input_layernorm.weight)
        block.visual_layernorm.weight.copy_(host.input_layernorm.weight)
        block.position_embedding.weight.zero_()
        block.position_embedding.bias.zero_()
    if getattr(model.model, "token_packing", None) is not None:
        model.model.token_packing.reset_to_average(guarded=False)

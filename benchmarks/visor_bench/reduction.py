"""Training-free visual token reduction (VisionZip) before the LLM, as benchmark rows: the reduction runs inside the
timed prefill (its scoring pass over the ranking layer's queries/keys and its merge) on the row's random features,
then the model runs on the kept tokens. The tower itself is not run (as for every row): the ranking layer's input
is a random `[crops, 729, 1152]` tensor, which costs what the real one does."""

from __future__ import annotations

import math

import torch

from visor_hf.modeling.flops_visor import decode_flops, prefill_flops
from visor_hf.modeling.reduction_visor import TokenReduction, attention_received, reduce_image_tokens, reduction_flops

from .shapes import TOKENS_PER_CROP


def ranking_layer_input(config, n_visual: int, dtype, device, seed: int = 0) -> torch.Tensor:
    """A random input of the ranking layer (the tower's last) for the crops of an image of `n_visual` tokens."""
    crops = max(1, math.ceil(n_visual / TOKENS_PER_CROP))
    generator = torch.Generator().manual_seed(seed + 7)
    hidden = config.vision_config.hidden_size
    return torch.randn(crops, TOKENS_PER_CROP, hidden, generator=generator).to(device=device, dtype=dtype)


@torch.inference_mode()
def reduce_features(model, features: torch.Tensor, layer_input: torch.Tensor, reduction: TokenReduction) -> torch.Tensor:
    """VisionZip on `features` (`[n, d]`, one image without newline tokens): attention received in the tower's last
    layer, computed from `layer_input`, then the dominant + contextual tokens."""
    attention = model.model.vision_tower.encoder.layers[-1].self_attn
    normed = model.model.vision_tower.encoder.layers[-1].layer_norm1(layer_input)
    scores, keys = attention_received(attention, normed)
    n_visual = features.shape[0]
    return reduce_image_tokens(features, scores.flatten()[:n_visual], keys.flatten(0, 1)[:n_visual], reduction)


def reduction_row_flops(shape, config, n_text: int, n_visual: int, reduction: TokenReduction, layers=None, ca=()):
    """(prefill, decode) FLOPs of the LLM on the kept tokens plus the reduction's own cost (prefill)."""
    kept = reduction.count(n_visual)
    crops = max(1, math.ceil(n_visual / TOKENS_PER_CROP))
    own = reduction_flops(config, crops, n_visual, reduction)
    return prefill_flops(shape, n_text, kept, layers, ca) + own, decode_flops(shape, n_text, kept, layers, ca)

"""Training-free visual token reduction (VisionZip) before the LLM, as benchmark rows: the reduction runs inside the
timed prefill (its attention map over the ranking layer's queries/keys and its merge) on the row's random features,
then the model runs on the kept tokens. The tower itself is not run (as for every row): the ranking layer's
queries and keys, which the tower computes anyway, are random `[crops, 729, 1152]` tensors made outside the timing."""

from __future__ import annotations

import math

import torch

from visor_hf.modeling.flops_visor import decode_flops, prefill_flops
from visor_hf.modeling.reduction_visor import TokenReduction, attention_received, reduce_image_tokens, reduction_flops

from .shapes import TOKENS_PER_CROP


def ranking_layer_input(config, n_visual: int, dtype, device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random queries and keys of the ranking layer (the tower's last) for the crops of an image of `n_visual`
    tokens, `[crops, 729, hidden]` each."""
    crops = max(1, math.ceil(n_visual / TOKENS_PER_CROP))
    generator = torch.Generator().manual_seed(seed + 7)
    hidden = config.vision_config.hidden_size
    q, k = torch.randn(2, crops, TOKENS_PER_CROP, hidden, generator=generator).to(device=device, dtype=dtype)
    return q, k


@torch.inference_mode()
def reduce_features(model, features: torch.Tensor, layer_input: tuple, reduction: TokenReduction) -> torch.Tensor:
    """VisionZip on `features` (`[n, d]`, one image without newline tokens): attention received in the tower's last
    layer, computed from its queries and keys `layer_input`, then the dominant + contextual tokens."""
    attention = model.model.vision_tower.encoder.layers[-1].self_attn
    scores, keys = attention_received(attention, *layer_input)
    n_visual = features.shape[0]
    return reduce_image_tokens(features, scores.flatten()[:n_visual], keys.flatten(0, 1)[:n_visual], reduction)


def reduction_row_flops(shape, config, n_text: int, n_visual: int, reduction: TokenReduction, layers=None, ca=()):
    """(prefill, decode) FLOPs of the LLM on the kept tokens plus the reduction's own cost (prefill)."""
    ca = ca if layers is not None else ()  # dense LLaVA-OV (layers=None) has no CA layer
    kept = reduction.count(n_visual)
    crops = max(1, math.ceil(n_visual / TOKENS_PER_CROP))
    own = reduction_flops(config, crops, n_visual, reduction)
    return prefill_flops(shape, n_text, kept, layers, ca) + own, decode_flops(shape, n_text, kept, layers, ca)

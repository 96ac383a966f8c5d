"""FastV (K=2, R=50 %) on the dense model: a small custom forward over the Qwen2 layers, and its FLOPs.

Layers 0..K-1 run over every token; before layer K the visual tokens that received the most attention in layer
K-1 (mean over heads of the attention from the text tokens after the image) are kept, with their original
positions, for the remaining layers and their cache.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from visor_hf.modeling.flops_visor import FlopsShape

from .shapes import IMAGE_TOKEN_ID, TEXT_AFTER, TEXT_BEFORE


@torch.inference_mode()
def fastv_prefill(llava, input_ids, features, n_visual: int, k: int = 2, keep_ratio: float = 0.5):
    lm = llava.model.language_model
    embeds = lm.embed_tokens(input_ids)
    image = (input_ids == IMAGE_TOKEN_ID)[..., None]
    hidden = embeds.masked_scatter(image, features.to(embeds.dtype))
    length = input_ids.shape[1]
    positions = torch.arange(length, device=input_ids.device)[None]
    cache = DynamicCache(config=lm.config)
    rotary = lm.rotary_emb(hidden, positions)
    previous = hidden
    for index, layer in enumerate(lm.layers):
        if index == k:
            scores = fastv_scores(lm.layers[k - 1], previous, rotary, cache.layers[k - 1].keys, n_visual)
            keep = max(1, int(round(n_visual * keep_ratio)))
            chosen = scores.topk(keep).indices.sort().values + TEXT_BEFORE
            device = input_ids.device
            index_kept = torch.cat([
                torch.arange(TEXT_BEFORE, device=device), chosen,
                torch.arange(TEXT_BEFORE + n_visual, length, device=device),
            ])
            hidden = hidden[:, index_kept]
            positions = positions[:, index_kept]
            rotary = lm.rotary_emb(hidden, positions)
        if index == k - 1:
            previous = hidden
        hidden = layer(hidden, attention_mask=None, position_embeddings=rotary, position_ids=positions,
                       past_key_values=cache, use_cache=True)
    logits = llava.lm_head(lm.norm(hidden[:, -1:]))
    return logits, cache, length


def fastv_scores(layer, hidden, rotary, key, n_visual: int) -> torch.Tensor:
    """Attention each visual token receives in `layer` from the text tokens after the image (mean over heads and
    queries). Only those query rows are computed (the full N x N map would not fit at 7k tokens); the keys are the
    layer's own cached keys (after RoPE), so the only extra work is the query projection of those rows and their
    scores, which a FastV kernel returning its attention map would have computed anyway."""
    attn = layer.self_attn
    start = TEXT_BEFORE + n_visual
    length = hidden.shape[1]
    normed = layer.input_layernorm(hidden[:, start:])
    query = attn.q_proj(normed).view(*normed.shape[:2], -1, attn.head_dim).transpose(1, 2)
    cos, sin = rotary
    query, _ = apply_rotary_pos_emb(query, query, cos[:, start:], sin[:, start:])
    key = key.repeat_interleave(attn.num_key_value_groups, dim=1)
    logits = (query @ key.transpose(-1, -2)) * attn.scaling  # [B, H, n_after, N]
    rows = torch.arange(start, length, device=hidden.device)[:, None]
    logits = logits.masked_fill(torch.arange(length, device=hidden.device)[None] > rows, float("-inf"))
    weights = logits.float().softmax(-1).mean(dim=(1, 2))  # [B, N]
    return weights[0, TEXT_BEFORE:start]


@torch.inference_mode()
def fastv_decode_step(llava, token, cache, position: int):
    lm = llava.model.language_model
    hidden = lm.embed_tokens(token)
    positions = torch.tensor([[position]], device=token.device)
    rotary = lm.rotary_emb(hidden, positions)
    for layer in lm.layers:
        hidden = layer(hidden, attention_mask=None, position_embeddings=rotary, position_ids=positions,
                       past_key_values=cache, use_cache=True)
    return llava.lm_head(lm.norm(hidden))


def fastv_flops(shape: FlopsShape, n_text: int, n_visual: int, k: int = 2, keep_ratio: float = 0.5):
    """Prefill and first-decode-step FLOPs of FastV (layers < k over everything, the rest over the kept tokens).
    The scoring pass (query projection of the text after the image, its scores against all keys of layer k-1) is
    added; it is < 0.1 % here."""
    full = n_text + n_visual
    kept = n_text + max(1, int(round(n_visual * keep_ratio)))
    pairs = lambda n: n * (n + 1) // 2  # noqa: E731
    prefill = k * (shape.projections(full) + shape.attention(pairs(full)))
    prefill += (shape.num_layers - k) * (shape.projections(kept) + shape.attention(pairs(kept)))
    scoring = 2 * TEXT_AFTER * shape.hidden_size * shape.num_heads * shape.head_dim + shape.attention(TEXT_AFTER * full) // 2
    prefill += scoring + shape.lm_head(1)
    decode = k * (shape.projections(1) + shape.attention(full + 1))
    decode += (shape.num_layers - k) * (shape.projections(1) + shape.attention(kept + 1)) + shape.lm_head(1)
    return prefill, decode

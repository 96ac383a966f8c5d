"""VISOR's attention masks as mask functions, and the attention implementations VISOR runs.

A mask function `(batch_idx, head_idx, q_idx, kv_idx) -> bool` (True: the query may attend the key) is what
transformers' `masking_utils` composes and what torch's flex attention takes as `mask_mod`. Every mask of VISOR is
one (see docs/model.md, "Attention backends"):

- self-attention over the whole sequence (SA layers) and over the compact text stream (text-only and CA layers):
  `masking_utils.create_causal_mask` with the stream's own padding mask. The text stream keeps the original order,
  so causality over its slots is causality by original position;
- the visual keys that samples skipping an SA layer must not see: `plan_visor.hide_keys`, an `and_mask_function`;
- cross-attention: `cross_attention_mask_function` (prefill: causal by original position) and
  `decoding_cross_attention_mask_function` (every visual token of the prompt precedes the new tokens).

eager and sdpa get the mask materialised (the very booleans, so their numbers do not depend on this module), flex
attention a `BlockMask` built from the same function.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers.masking_utils import and_masks, padding_mask_function
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import is_torch_flex_attn_available

if is_torch_flex_attn_available():
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask

FLEX = "flex_attention"
# what the layers of VISOR run with; any other implementation (flash attention, hub kernels, paged attention) is
# refused: they take a padding mask at most, not VISOR's masks
ATTENTION_IMPLEMENTATIONS = ("eager", "sdpa", FLEX)


def check_attention_implementation(implementation: str | None, model_name: str, flex: bool = True) -> None:
    """Raise a `ValueError` naming what to use instead unless VISOR can run `implementation` (None: the default)."""
    if implementation is None or isinstance(implementation, dict):
        return  # the default (sdpa), or per-sub-config choices that the sub-models check
    offered = ATTENTION_IMPLEMENTATIONS if flex else ATTENTION_IMPLEMENTATIONS[:-1]
    known = implementation in ALL_ATTENTION_FUNCTIONS.valid_keys() or "flash" in implementation or "/" in implementation
    if implementation in offered or not known:
        return  # an unknown name gets transformers' own error (it lists the valid names)
    names = ", ".join(f'"{name}"' for name in offered)
    why = (
        "its text-only and cross-attention passes need arbitrary masks (causal by original position, visual keys "
        "hidden per sample), which flash attention, attention kernels and paged attention do not take"
    )
    if not flex and implementation == FLEX:
        why = "the family's own transformers model (its vision tower) does not run flex attention"
    raise ValueError(
        f'{model_name} does not support attn_implementation="{implementation}": {why}. Use one of {names} instead '
        '(see "Attention backends" in docs/model.md of visor_hf).'
    )


def cross_attention_mask_function(text_index: torch.Tensor, visual_index: torch.Tensor, visual_valid: torch.Tensor) -> Callable:
    """At prefill: text token q sees visual token j iff j holds a visual token the attention mask shows and comes
    before q in the original sequence (`text_index` [B, N_text], `visual_index` [B, N_vis]: original positions)."""

    def inner(batch_idx, head_idx, q_idx, kv_idx):
        return visual_valid[batch_idx, kv_idx] & (visual_index[batch_idx, kv_idx] < text_index[batch_idx, q_idx])

    return inner


def decoding_cross_attention_mask_function(visual_valid: torch.Tensor) -> Callable:
    """While decoding: a new token sees every visual token of the prompt that the attention mask showed."""

    def inner(batch_idx, head_idx, q_idx, kv_idx):
        return visual_valid[batch_idx, kv_idx]

    return inner


def padding_without_sync(
    config, valid: torch.Tensor, and_mask_function: Callable | None
) -> tuple[torch.Tensor | None, Callable | None]:
    """The arguments `attention_mask` and `and_mask_function` of `create_causal_mask` for a decoding step with key
    padding `valid` ([B, K]). Under flex the padding becomes a mask function: given as a 2-D mask, transformers first
    checks on the host whether it is all True (a host sync per mask and step). Other implementations: unchanged."""
    if config._attn_implementation != FLEX:
        return valid, and_mask_function
    padding = padding_mask_function(valid)
    return None, padding if and_mask_function is None else and_masks(and_mask_function, padding)


def materialise(mask_function: Callable, batch: int, q_length: int, kv_length: int, device) -> torch.Tensor:
    """`[B, Q, K]` booleans of a mask function, by broadcasting index tensors (no vmap, as transformers' sdpa masks)."""
    batch_idx = torch.arange(batch, device=device)[:, None, None]
    q_idx = torch.arange(q_length, device=device)[None, :, None]
    kv_idx = torch.arange(kv_length, device=device)[None, None, :]
    return mask_function(batch_idx, None, q_idx, kv_idx).expand(batch, q_length, kv_length)


def block_mask(mask_function: Callable, batch: int, q_length: int, kv_length: int, device) -> BlockMask:
    """Flex attention's `BlockMask` of a mask function (compiled as transformers builds its own)."""
    return create_block_mask(mask_function, B=batch, H=None, Q_LEN=q_length, KV_LEN=kv_length, device=device, _compile=True)


__all__ = [
    "ATTENTION_IMPLEMENTATIONS",
    "check_attention_implementation",
    "cross_attention_mask_function",
    "decoding_cross_attention_mask_function",
    "materialise",
    "padding_without_sync",
    "block_mask",
]

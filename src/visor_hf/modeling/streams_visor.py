"""The two token streams of VISOR and the moves between them and the original sequence order.

The text and the visual tokens of a prompt live in two compact, right-aligned streams (`[B, N_text, d]` and
`[B, N_vis, d]`) so that a text-only or CA layer never touches the visual tokens; they are merged back into the
original order only for an SA layer that runs over the whole sequence, and for the output.
"""

from __future__ import annotations

import torch
from torch import nn


def compact_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-aligned positions of the True entries of each row of `mask` ([B, T]).

    Returns `(index, filled)`, both `[B, N]` with `N` the largest row count; empty slots (on the left) hold `T`,
    one past the end, so that scattering them lands in a dummy column.
    """
    batch, length = mask.shape
    counts = mask.sum(1)
    width = int(counts.max()) if batch and length else 0  # one host sync, at prefill only
    slot = mask.long().cumsum(1) - 1 + (width - counts)[:, None]
    slot = torch.where(mask, slot, width)
    positions = torch.arange(length, device=mask.device).expand(batch, length)
    index = torch.full((batch, width + 1), length, dtype=torch.long, device=mask.device)
    index = index.scatter(1, slot, positions)[:, :width]
    return index, index < length


def gather_tokens(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`states[b, index[b, i]]` for `[B, T, ...]` states; out-of-range (empty) slots read position T-1."""
    index = index.clamp(max=max(states.shape[1] - 1, 0))
    if states.dim() == 2:
        return states.gather(1, index)
    return states.gather(1, index[..., None].expand(-1, -1, *states.shape[2:]))


def merge_streams(text: torch.Tensor, text_index: torch.Tensor, visual: torch.Tensor, visual_index: torch.Tensor, length: int) -> torch.Tensor:
    """Put the text and visual streams back into the original order ([B, length, d])."""
    batch, _, hidden = text.shape
    merged = text.new_zeros(batch, length + 1, hidden)
    merged = merged.scatter(1, text_index[..., None].expand(-1, -1, hidden), text)
    merged = merged.scatter(1, visual_index[..., None].expand(-1, -1, hidden), visual)
    return merged[:, :length]


def embedded_token_mask(embeddings: nn.Module, inputs_embeds: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """`[B, T]` positions of `inputs_embeds` that hold the embedding of one of `token_ids`: how LLaVA-OV finds image
    placeholders when it is given embeddings instead of ids."""
    ids = torch.tensor(token_ids, device=inputs_embeds.device)
    embedded = embeddings(ids).to(inputs_embeds.dtype)
    return (inputs_embeds[:, :, None, :] == embedded).all(-1).any(-1)


def segment_ids(lengths: list[int], first: int, device) -> torch.Tensor:
    """`first + k` repeated `lengths[k]` times: the image id of every visual token of consecutive images."""
    ids = torch.arange(first, first + len(lengths), device=device)
    return ids.repeat_interleave(torch.tensor(lengths, dtype=torch.long, device=device))


def scatter_attention(weights: torch.Tensor, index: torch.Tensor, length: int) -> torch.Tensor:
    """Attention weights `[B, H, N, N]` among the compact tokens at `index` (`[B, N]`, empty slots = `length`) laid out
    in the original order: `[B, H, length, length]`, zero for every row or column outside `index`."""
    batch, heads, count, _ = weights.shape
    out = weights.new_zeros(batch, length + 1, length + 1, heads)
    rows = index[:, :, None].expand(batch, count, count)
    cols = index[:, None, :].expand(batch, count, count)
    samples = torch.arange(batch, device=weights.device)[:, None, None].expand(batch, count, count)
    out[samples, rows, cols] = weights.permute(0, 2, 3, 1)
    return out[:, :length, :length].permute(0, 3, 1, 2)

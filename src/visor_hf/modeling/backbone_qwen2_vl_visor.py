"""The backbone seam for the Qwen2-VL family (Qwen2-VL, Qwen2.5-VL): what VISOR takes from it.

The same methods as `backbone_visor.LlavaOnevisionBackbone` (see docs/model.md, "The backbone seam"), on top of
transformers' own `Qwen2VLModel` / `Qwen2_5_VLModel` (`get_image_features`, `get_placeholder_mask`,
`get_rope_index`, the vision tower and the text model):

- `embed_visual`: the vision tower's merged tokens placed on the `<|image_pad|>` / `<|video_pad|>` placeholders,
  one segment per image and per video (the CA blocks' position convolution stops at their boundaries);
- positions are M-RoPE's 3-D ones. Inside VISOR they travel as `[B, T, 3]` (temporal, height, width), so that the
  streams gather them as they gather hidden states; `backbone_rotary` hands them to the family's rotary embedding
  as `[3, B, T]`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.utils import logging

from .streams_visor import segment_ids

logger = logging.get_logger(__name__)


class QwenVLBackbone:
    """Qwen2-VL / Qwen2.5-VL (ViT with 2x2 patch merger, M-RoPE LLM) as VISOR's backbone. A mixin of the VISOR model,
    which also inherits the family's `*Model` (`get_image_features`, `get_rope_index`, `language_model`, ...)."""

    def embed_visual(self, input_ids, inputs_embeds, pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, encoded):
        """Scatter image/video features into the embeddings; return the visual mask, an image id per token and the
        image and video features. Features come from the pixels or from `mm_encoder_outputs` (as the family's own
        forward takes them, and as `generate` pre-encodes them)."""
        visual_mask = torch.zeros(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
        segments = torch.full(visual_mask.shape, -1, dtype=torch.long, device=visual_mask.device)
        encoded = dict(encoded or {})
        if encoded.get("image") is None and pixel_values is not None:
            encoded["image"] = self.get_image_features(pixel_values, image_grid_thw, return_dict=True)
        if encoded.get("video") is None and pixel_values_videos is not None:
            encoded["video"] = self.get_video_features(pixel_values_videos, video_grid_thw, return_dict=True)
        features, segment_count = {}, 0
        for modality in ("image", "video"):
            if encoded.get(modality) is None:
                continue
            parts = encoded[modality].pooler_output
            flat = torch.cat(list(parts), dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
            masks = self.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, **{f"{modality}_features": flat})
            mask = masks[0 if modality == "image" else 1]
            inputs_embeds = inputs_embeds.masked_scatter(mask, flat)
            visual_mask |= mask[..., 0]
            # item k's tokens fill the placeholders in row-major order (masked_scatter): tag them with k
            segments[mask[..., 0]] = segment_ids([p.shape[0] for p in parts], segment_count, segments.device)
            segment_count += len(parts)
            features[modality] = flat
        if not features and input_ids is not None:
            placeholders = (input_ids == self.config.image_token_id) | (input_ids == self.config.video_token_id)
            if placeholders.any():  # as the family's model (and LLaVA-OV's VISOR): ordinary text tokens, with a warning
                logger.warning_once(
                    "input_ids hold image/video placeholder tokens but no pixel_values / pixel_values_videos were "
                    "given: they run as ordinary text tokens (as in Qwen2-VL)"
                )
        return inputs_embeds, visual_mask, segments, features.get("image"), features.get("video")

    def backbone_position_ids(self, position_ids, batch: int, start: int, length: int, device) -> torch.Tensor:
        """`[B, length, 3]` M-RoPE positions. Given ones may be the family's `[3, B, T]`, `generate`'s `[4, B, T]`
        (text positions first, dropped as the family's text model drops them) or 1-D `[B, T]` (all three equal)."""
        if position_ids is None:
            position_ids = torch.arange(start, start + length, device=device)[None]
        if position_ids.dim() == 3:
            return position_ids[-3:].permute(1, 2, 0).expand(batch, -1, -1)
        return position_ids[..., None].expand(batch, -1, 3)

    def backbone_rotary(self, states: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.language_model.rotary_emb(states, position_ids.permute(2, 0, 1))

    def backbone_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    def backbone_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.language_model.norm(hidden_states)

    def prompt_position_ids(self, input_ids, attention_mask, image_grid_thw, video_grid_thw, mm_token_type_ids, **grid_kwargs):
        """`[3, B, T]`: the family's 3-D positions of a prompt (`get_rope_index`; plain `arange` without images, as its
        text model does)."""
        batch, length = attention_mask.shape
        if input_ids is not None and (image_grid_thw is not None or video_grid_thw is not None):
            if mm_token_type_ids is None:  # as the family's processor makes them: text 0, image 1, video 2
                mm_token_type_ids = (input_ids == self.config.image_token_id).int() + 2 * (input_ids == self.config.video_token_id).int()
            return self.get_rope_index(
                input_ids, mm_token_type_ids=mm_token_type_ids, image_grid_thw=image_grid_thw,
                video_grid_thw=video_grid_thw, attention_mask=attention_mask, **grid_kwargs,
            )[0]
        return torch.arange(length, device=attention_mask.device).view(1, 1, -1).expand(3, batch, -1)

    def decoding_position_ids(self, batch: int, start: int, new: int, device) -> torch.Tensor:
        """`[B, new]` positions of new tokens at indices `start ..` of the padded sequence: index + `rope_deltas`."""
        deltas = self.rope_deltas if self.rope_deltas is not None else torch.zeros(batch, 1, dtype=torch.long, device=device)
        deltas = deltas.to(device).repeat_interleave(batch // deltas.shape[0], dim=0)  # beams / returned sequences
        return (torch.arange(new, device=device) + start)[None] + deltas  # `start` may be a device tensor


__all__ = ["QwenVLBackbone"]

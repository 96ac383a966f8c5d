"""The backbone seam: what VISOR takes from LLaVA-OneVision, as the methods a backbone provides.

VISOR itself (the layer plan, the two streams, the cross-attention blocks, the router, the cache) does not know
how visual features are computed and placed in the sequence, how position ids are made or which decoder-layer
class runs. A backbone says it through these methods (see docs/model.md, "The backbone seam"):

- `embed_visual`: the prompt's embeddings with the visual features placed, which positions are visual, and the
  image each visual token belongs to (for the CA blocks' position convolution, which stops at image boundaries);
- `backbone_position_ids`: position ids of `length` new tokens after `start` (1-D here; M-RoPE backbones make
  3-D ones);
- `backbone_rotary`: the rotary embeddings of the decoder layers for given positions;
- `backbone_layers` / `backbone_norm`: the decoder layers (each called as a transformers decoder layer with
  `attention_mask`, `position_embeddings`, `position_ids`, `past_key_values`) and the final norm.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.utils import logging

from .packing_visor import image_token_layouts, images_of_samples, packing_per_sample
from .streams_visor import segment_ids

logger = logging.get_logger(__name__)


class LlavaOnevisionBackbone:
    """LLaVA-OneVision (SigLIP tower, projector with anyres packing, Qwen2 LLM) as VISOR's backbone. A mixin of
    `VisorModel`, which also inherits `LlavaOnevisionModel` (`get_image_features`, `get_placeholder_mask`, ...)."""

    decoder_layer_class = "Qwen2DecoderLayer"

    def embed_visual(self, input_ids, inputs_embeds, pixel_values, image_sizes, pixel_values_videos, vision_kwargs):
        """Scatter image/video features into the embeddings; return the visual mask, an image id per token and the
        image and video features. Features come from the pixels or, as in LLaVA-OV, from `mm_encoder_outputs`
        (`{"image": ..., "video": ...}` outputs of `get_image_features` / `get_video_features`)."""
        visual_mask = torch.zeros(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
        factors = None  # per-sample packing factors, checked here also for a prompt without images
        if vision_kwargs.get("packing") is not None:
            factors = packing_per_sample(vision_kwargs["packing"], inputs_embeds.shape[0], self.config.packing_factors)
        encoded = dict(vision_kwargs.get("encoded") or {})
        segment_lengths = []
        image_features = video_features = None
        segments = torch.full(visual_mask.shape, -1, dtype=torch.long, device=visual_mask.device)
        if encoded.get("image") is None and pixel_values is not None:
            encoded["image"] = self.get_image_features(pixel_values, image_sizes, return_dict=True, **vision_kwargs["image"])
        if encoded.get("image") is not None:
            features = encoded["image"].pooler_output
            if factors is not None:
                features = self.pack_visual_tokens(features, factors, input_ids, inputs_embeds, image_sizes, vision_kwargs["image"])
            segment_lengths += [f.shape[0] for f in features]
            image_features = torch.cat(features, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
            image_mask, _ = self.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=image_features)
            inputs_embeds = inputs_embeds.masked_scatter(image_mask, image_features)
            visual_mask |= image_mask[..., 0]
            # image k's features fill the image tokens in row-major order (masked_scatter): tag them with k
            segments[image_mask[..., 0]] = segment_ids(segment_lengths, 0, segments.device)
        if encoded.get("video") is None and pixel_values_videos is not None:
            encoded["video"] = self.get_video_features(pixel_values_videos, return_dict=True, **vision_kwargs["video"])
        if encoded.get("video") is not None:
            video = encoded["video"].pooler_output
            video_features = video.flatten(0, 1).to(inputs_embeds.device, inputs_embeds.dtype)
            _, video_mask = self.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, video_features=video_features)
            inputs_embeds = inputs_embeds.masked_scatter(video_mask, video_features)
            visual_mask |= video_mask[..., 0]
            # one segment per video (all its frames), numbered after the images
            segments[video_mask[..., 0]] = segment_ids([video.shape[1]] * video.shape[0], len(segment_lengths), segments.device)
        if image_features is None and video_features is None and input_ids is not None:
            placeholders = (input_ids == self.config.image_token_id) | (input_ids == self.config.video_token_id)
            if placeholders.any():  # as LLaVA-OV: embedded as ordinary tokens (text), with a warning
                logger.warning_once(
                    "input_ids hold image/video placeholder tokens but no pixel_values / pixel_values_videos were "
                    "given: they run as ordinary text tokens (as in LLaVA-OneVision)"
                )
        return inputs_embeds, visual_mask, segments, image_features, video_features

    def pack_visual_tokens(self, features, factors, input_ids, inputs_embeds, image_sizes, image_options) -> list[torch.Tensor]:
        """Each image's features packed by its sample's factor (`factors`, from `visor_packing=`, see
        `packing_visor.py`). The prompt's image tokens must hold the packed counts (a `ValueError` otherwise)."""
        if getattr(self, "token_reduction", None) is not None and any(f != 1 for f in factors):
            # the reduction already changed each image's layout, which packing needs intact
            raise ValueError("visor_packing > 1 cannot be combined with token reduction (apply_token_reduction): use one")
        if image_sizes is None:
            raise ValueError("visor_packing needs image_sizes (the layout of each image's tokens follows from its size)")
        layouts = image_token_layouts(self.config, image_sizes, image_options.get("vision_aspect_ratio"), image_options.get("batch_num_images"))
        if len(layouts) != len(features):
            raise ValueError(f"visor_packing needs image_sizes for every image: {len(features)} images, {len(layouts)} sizes")
        image_mask, _ = self.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds)
        image_tokens = image_mask[..., 0].sum(1).tolist()  # one host sync, at prefill
        owners = images_of_samples(image_tokens, layouts, factors, image_options.get("batch_num_images"))
        return [self.token_packing.pack_image(f, layout, factors[b]) if factors[b] != 1 else f
                for f, layout, b in zip(features, layouts, owners)]

    def backbone_position_ids(self, position_ids, batch: int, start: int, length: int, device) -> torch.Tensor:
        """`[B, length]` position ids of tokens `start .. start + length - 1` (given ones are broadcast). `start` may
        be a device tensor (a static cache's position: no host sync, no recompilation per step)."""
        if position_ids is None:
            position_ids = (torch.arange(length, device=device) + start)[None]
        return position_ids.expand(batch, -1)

    def backbone_rotary(self, states: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.language_model.rotary_emb(states, position_ids)

    def backbone_layers(self) -> nn.ModuleList:
        return self.language_model.layers

    def backbone_norm(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.language_model.norm(hidden_states)


__all__ = ["LlavaOnevisionBackbone"]

"""VISOR on the Qwen2-VL family: Qwen2-VL and Qwen2.5-VL whose LLM meets the visual tokens only at a few layers.

transformers' own `Qwen2VLModel` / `Qwen2_5_VLModel` give the vision tower, the placeholders, the 3-D M-RoPE
positions (`get_rope_index`) and the decoder layers; `backbone_qwen2_vl_visor.QwenVLBackbone` is the seam; the layer
plan, the streams, the CA blocks, the router and the cache are VISOR's, the very functions `VisorModel` runs.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache
from transformers.modeling_utils import PreTrainedModel
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
    Qwen2_5_VLModel,
    Qwen2_5_VLPreTrainedModel,
    Qwen2_5_VLTextModel,
)
from transformers.models.qwen2_vl.modeling_qwen2_vl import (
    Qwen2VisionTransformerPretrainedModel,
    Qwen2VLModel,
    Qwen2VLPreTrainedModel,
    Qwen2VLTextModel,
)
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults

from .arguments_visor import check_forward_kwargs
from .backbone_qwen2_vl_visor import QwenVLBackbone
from .configuration_qwen2_vl_visor import VisorQwen2_5_VLConfig, VisorQwen2VLConfig
from .generation_visor import VisorGenerationMixin
from .grouping_visor import check_visor_batching
from .hub_visor import VisorHubMixin
from .modeling_visor import (
    VisorForConditionalGeneration,
    VisorModel,
    VisorPreTrainedMixin,
    check_visor_inputs,
)
from .outputs_visor import OutputCapture, VisorCausalLMOutputWithPast, VisorModelOutputWithPast
from .requests_visor import ConfigurationRequest


class VisorEngine:
    """The backbone-independent part of `VisorModel` (routing, the prefill and decoding passes over the layer plan):
    the same functions, so that every backbone runs the very same VISOR code."""

    _routing_mask = VisorModel._routing_mask
    _router_logits = VisorModel._router_logits
    _route = VisorModel._route
    _cache_for = VisorModel._cache_for
    _decoder_loop = VisorModel._decoder_loop
    _cross_attention_block = VisorModel._cross_attention_block
    _router_step = VisorModel._router_step
    _prefill = VisorModel._prefill
    _prefill_rows = VisorModel._prefill_rows
    _prefill_streams = VisorModel._prefill_streams
    _prefill_plan = VisorModel._prefill_plan
    _configuration_outputs = VisorModel._configuration_outputs
    _decode = VisorModel._decode


class VisorQwen2VLPreTrainedModel(VisorHubMixin, VisorPreTrainedMixin, Qwen2VLPreTrainedModel):
    config_class = VisorQwen2VLConfig
    visor_auto_map = {
        "AutoConfig": "configuration_qwen2_vl_visor.VisorQwen2VLConfig",
        "AutoModel": "modeling_qwen2_vl_visor.VisorQwen2VLModel",
        "AutoModelForImageTextToText": "modeling_qwen2_vl_visor.VisorQwen2VLForConditionalGeneration",
    }
    config: VisorQwen2VLConfig
    _supports_flex_attn = False  # as the family's own model (its vision tower runs varlen attention): eager, sdpa
    _no_split_modules = ["Qwen2VLDecoderLayer", "Qwen2VLVisionBlock", "VisorCrossAttentionBlock"]


class VisorQwen2_5_VLPreTrainedModel(VisorHubMixin, VisorPreTrainedMixin, Qwen2_5_VLPreTrainedModel):
    config_class = VisorQwen2_5_VLConfig
    visor_auto_map = {
        "AutoConfig": "configuration_qwen2_vl_visor.VisorQwen2_5_VLConfig",
        "AutoModel": "modeling_qwen2_vl_visor.VisorQwen2_5_VLModel",
        "AutoModelForImageTextToText": "modeling_qwen2_vl_visor.VisorQwen2_5_VLForConditionalGeneration",
    }
    config: VisorQwen2_5_VLConfig
    _supports_flex_attn = False  # as the family's own model (its vision tower runs varlen attention): eager, sdpa
    _no_split_modules = ["Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock", "VisorCrossAttentionBlock"]


class VisorQwenVLModelMixin(VisorEngine, QwenVLBackbone):
    """The VISOR model of the family: the family's vision tower and LLM, plus VISOR's CA blocks and router."""

    vision_class: type[nn.Module]
    text_class: type[nn.Module]

    def __init__(self, config):
        PreTrainedModel.__init__(self, config)  # not the family's `*Model.__init__`: the modules are built here
        self.visual = self.vision_class._from_config(config.vision_config)
        self.language_model = self.text_class._from_config(config.text_config)
        self.rope_deltas = None  # as the family's model: set at prefill, read by decoding steps
        self.add_visor_modules(config)
        self.post_init()

    @merge_with_config_defaults
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        mm_encoder_outputs: dict | None = None,
        visor_configuration: ConfigurationRequest = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        visor_router_threshold: float | list[float] | torch.Tensor | None = None,
        visor_batching: str | None = None,
        **kwargs,
    ) -> VisorModelOutputWithPast:
        r"""
        The family's inputs (`image_grid_thw`, `mm_token_type_ids`, 3-D `position_ids`, ...), plus
        visor_configuration / output_router_logits / visor_router_threshold / visor_batching as for [`VisorModel`]. Without `position_ids` the prompt's come from
        `get_rope_index` (`mm_token_type_ids` are derived from the placeholders when not given), and decoding steps
        add `rope_deltas` to the token's index.
        """
        has_pixels = pixel_values is not None or pixel_values_videos is not None
        check_visor_inputs(input_ids, inputs_embeds, has_pixels, mm_encoder_outputs, attention_mask)
        visor_batching = check_visor_batching(visor_batching)
        grid_kwargs = {k: kwargs.pop(k) for k in ("second_per_grid_ts",) if k in kwargs}
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        batch, new = inputs_embeds.shape[:2]
        capture = OutputCapture.start(self.config, output_hidden_states, kwargs.pop("output_attentions", None))
        cache = self._cache_for(past_key_values, use_cache)
        if cache is not None and cache.visor_state is not None:  # the cache holds a prompt: a decoding step
            if pixel_values is not None or pixel_values_videos is not None or mm_encoder_outputs:
                raise ValueError("images must be given in the first forward (prefill); this cache already holds a prompt")
            if position_ids is None:
                position_ids = self.decoding_position_ids(batch, cache.decode_start(), new, inputs_embeds.device)
            return self._decode(inputs_embeds, attention_mask, position_ids, cache, capture, kwargs)
        if attention_mask is None:
            # an explicit mask: masks are then never inferred from the (non-consecutive) M-RoPE positions
            attention_mask = torch.ones((batch, new), dtype=torch.long, device=inputs_embeds.device)
        if position_ids is None:
            position_ids = self.prompt_position_ids(
                input_ids, attention_mask, image_grid_thw, video_grid_thw, mm_token_type_ids, **grid_kwargs
            )
        # the family's `rope_deltas`: how far the next token's position is from its index in the padded sequence
        positions = self.backbone_position_ids(position_ids, batch, 0, new, inputs_embeds.device)
        self.rope_deltas = positions.amax(dim=(1, 2))[:, None] + 1 - new
        visual_inputs = (pixel_values, image_grid_thw, pixel_values_videos, video_grid_thw, mm_encoder_outputs)
        return self._prefill(
            input_ids, inputs_embeds, visual_inputs, attention_mask, position_ids, cache, visor_configuration, capture,
            output_router_logits, kwargs, visor_router_threshold, visor_batching,
        )


class VisorQwen2VLModel(VisorQwenVLModelMixin, VisorQwen2VLPreTrainedModel, Qwen2VLModel):
    """Qwen2-VL's vision tower and LLM, plus VISOR's cross-attention blocks and router."""

    vision_class = Qwen2VisionTransformerPretrainedModel
    text_class = Qwen2VLTextModel


class VisorQwen2_5_VLModel(VisorQwenVLModelMixin, VisorQwen2_5_VLPreTrainedModel, Qwen2_5_VLModel):
    """Qwen2.5-VL's vision tower and LLM, plus VISOR's cross-attention blocks and router."""

    vision_class = Qwen2_5_VisionTransformerPretrainedModel
    text_class = Qwen2_5_VLTextModel


class VisorQwenVLForConditionalGenerationMixin(VisorGenerationMixin):
    """The family's `*ForConditionalGeneration` on a VISOR model: lm head, loss, FLOPs report, `generate`."""

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}
    model_class: type[nn.Module]

    _visor_request = VisorForConditionalGeneration._visor_request
    _visor_output = VisorForConditionalGeneration._visor_output
    _forward_flops = VisorForConditionalGeneration._forward_flops
    visor_flops = VisorForConditionalGeneration.visor_flops

    def __init__(self, config):
        super().__init__(config)
        self.model = self.model_class(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_image_features(self, pixel_values, image_grid_thw=None, **kwargs):
        return self.model.get_image_features(pixel_values, image_grid_thw, **kwargs)

    def get_video_features(self, pixel_values_videos, video_grid_thw=None, **kwargs):
        return self.model.get_video_features(pixel_values_videos, video_grid_thw, **kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict | None = None,
        visor_configuration: ConfigurationRequest = None,
        output_router_logits: bool | None = None,
        visor_budget: float | list[float] | torch.Tensor | None = None,
        visor_router_threshold: float | list[float] | torch.Tensor | None = None,
        visor_batching: str | None = None,
        **kwargs,
    ) -> VisorCausalLMOutputWithPast:
        r"""
        The family's inputs and `labels`, plus `visor_configuration`, `visor_budget`, `visor_router_threshold` and
        `visor_batching` as for [`VisorForConditionalGeneration`].
        """
        check_forward_kwargs(self.forward, kwargs)
        visual_inputs = pixel_values is not None or pixel_values_videos is not None or bool(mm_encoder_outputs)
        prefill, counts, visor_configuration = self._visor_request(
            past_key_values, input_ids, attention_mask, inputs_embeds, visor_configuration, visor_budget, visual_inputs
        )
        outputs = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, past_key_values=past_key_values,
            inputs_embeds=inputs_embeds, use_cache=use_cache, pixel_values=pixel_values,
            pixel_values_videos=pixel_values_videos, image_grid_thw=image_grid_thw, video_grid_thw=video_grid_thw,
            mm_token_type_ids=mm_token_type_ids, mm_encoder_outputs=mm_encoder_outputs,
            visor_configuration=visor_configuration, output_router_logits=output_router_logits,
            visor_router_threshold=visor_router_threshold, visor_batching=visor_batching, **kwargs,
        )
        return self._visor_output(outputs, prefill, counts, labels, logits_to_keep, kwargs)

    def _prepare_position_ids_for_generation(self, inputs_tensor, model_kwargs):
        """As the family's `generate`: `[4, B, T]`, the text positions (for the masks) then the 3-D M-RoPE ones."""
        text_positions = super()._prepare_position_ids_for_generation(inputs_tensor, model_kwargs)
        input_ids = model_kwargs.get("input_ids", inputs_tensor)
        is_ids = input_ids is not None and input_ids.dim() == 2 and not input_ids.is_floating_point()
        grids = model_kwargs.get("image_grid_thw") is not None or model_kwargs.get("video_grid_thw") is not None
        if is_ids and grids:
            attention_mask = model_kwargs.get("attention_mask")
            if attention_mask is None:
                attention_mask = torch.ones_like(input_ids)
            vision_positions = self.model.prompt_position_ids(
                input_ids, attention_mask, model_kwargs.get("image_grid_thw"), model_kwargs.get("video_grid_thw"),
                model_kwargs.get("mm_token_type_ids"),
                **{k: model_kwargs[k] for k in ("second_per_grid_ts",) if model_kwargs.get(k) is not None},
            )
        else:
            vision_positions = text_positions[None].expand(3, -1, -1)
        return torch.cat([text_positions[None], vision_positions], dim=0)


class VisorQwen2VLForConditionalGeneration(VisorQwenVLForConditionalGenerationMixin, VisorQwen2VLPreTrainedModel):
    model_class = VisorQwen2VLModel


class VisorQwen2_5_VLForConditionalGeneration(VisorQwenVLForConditionalGenerationMixin, VisorQwen2_5_VLPreTrainedModel):
    model_class = VisorQwen2_5_VLModel


__all__ = [
    "VisorQwen2VLPreTrainedModel",
    "VisorQwen2VLModel",
    "VisorQwen2VLForConditionalGeneration",
    "VisorQwen2_5_VLPreTrainedModel",
    "VisorQwen2_5_VLModel",
    "VisorQwen2_5_VLForConditionalGeneration",
]

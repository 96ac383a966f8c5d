"""Configurations of VISOR on the Qwen2-VL family: Qwen2-VL's and Qwen2.5-VL's configs plus the layer layout."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

from .configuration_visor import VisorLayoutMixin

_LAYOUT_DOC = """
    The layout fields are those of [`VisorConfig`]: `cross_attention_layers`, `self_attention_layers`,
    `configurations`, `router_layer`, `router_hidden_size`, `routing_token_id`, `default_configuration`,
    `position_embedding_kernel_size` (the default layout, every layer an SA layer, computes exactly what the source
    model computes).
"""


@strict
class VisorQwen2VLConfig(VisorLayoutMixin, Qwen2VLConfig):
    __doc__ = "Configuration of VISOR on Qwen2-VL: everything [`Qwen2VLConfig`] holds, plus the layer layout.\n" + _LAYOUT_DOC

    model_type = "visor_qwen2_vl"


@strict
class VisorQwen2_5_VLConfig(VisorLayoutMixin, Qwen2_5_VLConfig):
    __doc__ = "Configuration of VISOR on Qwen2.5-VL: everything [`Qwen2_5_VLConfig`] holds, plus the layer layout.\n" + _LAYOUT_DOC

    model_type = "visor_qwen2_5_vl"


__all__ = ["VisorQwen2VLConfig", "VisorQwen2_5_VLConfig"]

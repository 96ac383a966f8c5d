"""VISOR model files; this folder also ships to the Hub as remote code (relative imports only)."""

from .cache_visor import VisorCache, VisorState
from .configuration_visor import VisorConfig, uniform_layer_layout
from .flops_visor import FlopsShape, VisorFlopsReport, decode_flops, prefill_flops, vision_flops
from .modeling_visor import (
    VisorCausalLMOutputWithPast,
    VisorForConditionalGeneration,
    VisorModel,
    VisorModelOutputWithPast,
    VisorPreTrainedModel,
    resolve_configuration_request,
)

__all__ = [
    "FlopsShape",
    "VisorFlopsReport",
    "decode_flops",
    "prefill_flops",
    "vision_flops",
    "VisorCache",
    "VisorState",
    "VisorConfig",
    "uniform_layer_layout",
    "VisorCausalLMOutputWithPast",
    "VisorForConditionalGeneration",
    "VisorModel",
    "VisorModelOutputWithPast",
    "VisorPreTrainedModel",
    "resolve_configuration_request",
]

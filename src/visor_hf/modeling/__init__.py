"""VISOR model files; this folder also ships to the Hub as remote code (relative imports only)."""

from .cache_visor import VisorCache, VisorState, VisorStaticCache
from .configuration_visor import VisorConfig, uniform_layer_layout
from .flops_visor import (
    FlopsCount,
    FlopsShape,
    VisorFlopsReport,
    count_flops,
    decode_flops,
    prefill_flops,
    projector_flops,
    vision_flops,
)
from .modeling_visor import (
    VisorCausalLMOutputWithPast,
    VisorForConditionalGeneration,
    VisorModel,
    VisorModelOutputWithPast,
    VisorPreTrainedModel,
)
from .reduction_visor import TokenReduction, apply_token_reduction, token_reduction
from .requests_visor import resolve_configuration_request

__all__ = [
    "FlopsCount",
    "FlopsShape",
    "count_flops",
    "projector_flops",
    "VisorFlopsReport",
    "decode_flops",
    "prefill_flops",
    "vision_flops",
    "VisorCache",
    "VisorStaticCache",
    "VisorState",
    "VisorConfig",
    "uniform_layer_layout",
    "VisorCausalLMOutputWithPast",
    "VisorForConditionalGeneration",
    "VisorModel",
    "VisorModelOutputWithPast",
    "VisorPreTrainedModel",
    "resolve_configuration_request",
    "TokenReduction",
    "apply_token_reduction",
    "token_reduction",
]

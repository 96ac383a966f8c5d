"""Conversion of LLaVA-OneVision checkpoints into VISOR checkpoints (see `docs/conversion.md`)."""

from .convert import (
    ConversionError,
    add_routing_token,
    check_source,
    convert,
    default_configurations,
    default_router_layer,
    resolve_layout,
    resolve_source,
)
from .warm_start import warm_start_new_modules

__all__ = [
    "ConversionError",
    "add_routing_token",
    "check_source",
    "convert",
    "default_configurations",
    "default_router_layer",
    "resolve_layout",
    "resolve_source",
    "warm_start_new_modules",
]

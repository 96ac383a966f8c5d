"""Conversion of LLaVA-OneVision checkpoints into VISOR checkpoints."""

from .warm_start import warm_start_new_modules

__all__ = ["warm_start_new_modules"]

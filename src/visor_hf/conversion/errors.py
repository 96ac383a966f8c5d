"""The converter's error type (its own module so that every conversion module can raise it)."""


class ConversionError(ValueError):
    """The source cannot be converted (not LLaVA-OneVision, missing or corrupt weights, bad layout, unsafe output...)."""

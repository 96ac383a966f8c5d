"""visor_hf: VISOR (VISion On Request) for Hugging Face Transformers.

Importing the package registers the VISOR classes with `AutoConfig`, `AutoModel` and
`AutoModelForImageTextToText` and `AutoProcessor`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .modeling import (
    VisorCache,
    VisorCausalLMOutputWithPast,
    VisorConfig,
    VisorForConditionalGeneration,
    VisorModel,
    VisorModelOutputWithPast,
    VisorPreTrainedModel,
    uniform_layer_layout,
)
from .modeling.processing_visor import VisorProcessor

__version__ = "0.1.0"

AutoConfig.register("visor", VisorConfig, exist_ok=True)
AutoModel.register(VisorConfig, VisorModel, exist_ok=True)
AutoModelForImageTextToText.register(VisorConfig, VisorForConditionalGeneration, exist_ok=True)
AutoProcessor.register(VisorConfig, VisorProcessor, exist_ok=True)



def __getattr__(name: str):
    # the training collator without importing the Trainer machinery at `import visor_hf`
    if name == "VisorDataCollator":
        from .training.data import VisorDataCollator

        return VisorDataCollator
    raise AttributeError(f"module 'visor_hf' has no attribute {name!r}")


__all__ = [
    "VisorCache",
    "VisorCausalLMOutputWithPast",
    "VisorConfig",
    "VisorDataCollator",
    "VisorForConditionalGeneration",
    "VisorModel",
    "VisorModelOutputWithPast",
    "VisorPreTrainedModel",
    "VisorProcessor",
    "uniform_layer_layout",
]

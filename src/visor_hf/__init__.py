"""visor_hf: VISOR (VISion On Request) for Hugging Face Transformers.

Importing the package registers the VISOR classes with `AutoConfig`, `AutoModel` and
`AutoModelForImageTextToText` and `AutoProcessor`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .modeling import (
    TokenReduction,
    VisorCache,
    VisorCausalLMOutputWithPast,
    VisorConfig,
    VisorForConditionalGeneration,
    VisorModel,
    VisorModelOutputWithPast,
    VisorPreTrainedModel,
    VisorStaticCache,
    apply_token_reduction,
    token_reduction,
    uniform_layer_layout,
)
from .modeling.configuration_qwen2_vl_visor import VisorQwen2_5_VLConfig, VisorQwen2VLConfig
from .modeling.modeling_qwen2_vl_visor import (
    VisorQwen2_5_VLForConditionalGeneration,
    VisorQwen2_5_VLModel,
    VisorQwen2VLForConditionalGeneration,
    VisorQwen2VLModel,
)
from .modeling.processing_qwen2_vl_visor import VisorQwen2VLProcessor
from .modeling.processing_visor import VisorProcessor

__version__ = "0.1.0"

AutoConfig.register("visor", VisorConfig, exist_ok=True)
AutoModel.register(VisorConfig, VisorModel, exist_ok=True)
AutoModelForImageTextToText.register(VisorConfig, VisorForConditionalGeneration, exist_ok=True)
AutoProcessor.register(VisorConfig, VisorProcessor, exist_ok=True)
# the Qwen2-VL family (docs/model.md, "Supported backbones")
for _config, _model, _generation in (
    (VisorQwen2VLConfig, VisorQwen2VLModel, VisorQwen2VLForConditionalGeneration),
    (VisorQwen2_5_VLConfig, VisorQwen2_5_VLModel, VisorQwen2_5_VLForConditionalGeneration),
):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)
    AutoModelForImageTextToText.register(_config, _generation, exist_ok=True)
    AutoProcessor.register(_config, VisorQwen2VLProcessor, exist_ok=True)



def __getattr__(name: str):
    # the training collator without importing the Trainer machinery at `import visor_hf`
    if name == "VisorDataCollator":
        from .training.data import VisorDataCollator

        return VisorDataCollator
    raise AttributeError(f"module 'visor_hf' has no attribute {name!r}")


__all__ = [
    "VisorCache",
    "VisorStaticCache",
    "VisorCausalLMOutputWithPast",
    "VisorConfig",
    "VisorDataCollator",
    "VisorForConditionalGeneration",
    "VisorModel",
    "VisorModelOutputWithPast",
    "VisorPreTrainedModel",
    "VisorProcessor",
    "VisorQwen2VLConfig",
    "VisorQwen2VLForConditionalGeneration",
    "VisorQwen2VLModel",
    "VisorQwen2VLProcessor",
    "VisorQwen2_5_VLConfig",
    "VisorQwen2_5_VLForConditionalGeneration",
    "VisorQwen2_5_VLModel",
    "TokenReduction",
    "apply_token_reduction",
    "token_reduction",
    "uniform_layer_layout",
]

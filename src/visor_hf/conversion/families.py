"""The source families `visor-hf convert` knows: each maps a source `model_type` to transformers' source class and
to the VISOR classes (local, and as the remote code of a converted folder names them)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class SourceFamily:
    """One convertible family. Class references are `module.Class` inside `visor_hf.modeling` (the remote-code
    layout), except `source_class`, a transformers class name."""

    model_type: str
    name: str
    source_class: str
    config: str
    model: str
    generation: str
    processor: str

    @property
    def visor_model_type(self) -> str:
        return self.visor_class("config").model_type

    def visor_class(self, kind: str) -> type:
        """The local class of `kind` ("config", "model", "generation" or "processor")."""
        module, name = getattr(self, kind).rsplit(".", 1)
        return getattr(importlib.import_module(f"visor_hf.modeling.{module}"), name)

    def source_model_class(self) -> type:
        import transformers

        return getattr(transformers, self.source_class)

    @property
    def auto_map(self) -> dict:
        return {"AutoConfig": self.config, "AutoModel": self.model, "AutoModelForImageTextToText": self.generation}

    @property
    def processor_auto_map(self) -> dict:
        return {"AutoProcessor": self.processor}


FAMILIES = {
    family.model_type: family
    for family in (
        SourceFamily(
            "llava_onevision", "LLaVA-OneVision", "LlavaOnevisionForConditionalGeneration",
            "configuration_visor.VisorConfig", "modeling_visor.VisorModel",
            "modeling_visor.VisorForConditionalGeneration", "processing_visor.VisorProcessor",
        ),
        SourceFamily(
            "qwen2_vl", "Qwen2-VL", "Qwen2VLForConditionalGeneration",
            "configuration_qwen2_vl_visor.VisorQwen2VLConfig", "modeling_qwen2_vl_visor.VisorQwen2VLModel",
            "modeling_qwen2_vl_visor.VisorQwen2VLForConditionalGeneration",
            "processing_qwen2_vl_visor.VisorQwen2VLProcessor",
        ),
        SourceFamily(
            "qwen2_5_vl", "Qwen2.5-VL", "Qwen2_5_VLForConditionalGeneration",
            "configuration_qwen2_vl_visor.VisorQwen2_5_VLConfig", "modeling_qwen2_vl_visor.VisorQwen2_5_VLModel",
            "modeling_qwen2_vl_visor.VisorQwen2_5_VLForConditionalGeneration",
            "processing_qwen2_vl_visor.VisorQwen2VLProcessor",
        ),
    )
}
VISOR_MODEL_TYPES = ("visor", "visor_qwen2_vl", "visor_qwen2_5_vl")


def supported_sources() -> str:
    return ", ".join(f"{f.name} (model_type {f.model_type!r})" for f in FAMILIES.values())


def family_of(model_type: str | None) -> SourceFamily | None:
    return FAMILIES.get(model_type)


__all__ = ["FAMILIES", "SourceFamily", "VISOR_MODEL_TYPES", "family_of", "supported_sources"]


def family_of_visor(model_type: str | None) -> SourceFamily:
    """The family of a VISOR config's `model_type` (`"visor"`: LLaVA-OneVision)."""
    for family in FAMILIES.values():
        if family.visor_model_type == model_type:
            return family
    raise ValueError(f"model_type {model_type!r} is not a VISOR model type; VISOR model types: {', '.join(VISOR_MODEL_TYPES)}")


__all__ += ["family_of_visor"]

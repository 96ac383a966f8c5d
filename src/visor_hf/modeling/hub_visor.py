"""What a VISOR model needs beyond its forward pass to live on the Hub: saves that always carry the remote code,
`auto_map` and a model card, and the LoRA target preset (shipped as remote code with the model files)."""

from __future__ import annotations

import os
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData
from transformers.utils import logging

logger = logging.get_logger(__name__)

# `auto_map` of every saved VISOR checkpoint: the classes live in the code files saved next to the weights
MODEL_AUTO_MAP = {
    "AutoConfig": "configuration_visor.VisorConfig",
    "AutoModel": "modeling_visor.VisorModel",
    "AutoModelForImageTextToText": "modeling_visor.VisorForConditionalGeneration",
}
VISOR_TAGS = ("visor", "llava-onevision", "custom_code")
PROCESSOR_AUTO_MAP = {"AutoProcessor": "processing_visor.VisorProcessor"}

# PEFT matches a regex against the full module name: the LLM's attention and MLP projections and the cross-attention
# blocks' projections. SigLIP's `vision_tower...self_attn.q_proj` does not match (it is not under `language_model`).
LORA_TARGET_MODULES = (
    r".*model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
    r"|.*model\.cross_attention_blocks\.\d+\.cross_attn\.(q|k|v|o)_proj"
)
# Added to the targets when the vision tower trains under LoRA.
LORA_VISION_TARGET_MODULES = r"|.*model\.vision_tower\..*\.(self_attn\.(q|k|v|out)_proj|mlp\.fc(1|2))"
LORA_MODULES_TO_SAVE = ("router",)
ROUTER_NOT_TRAINED = (
    "the router gets no gradient from the language-modelling loss (its decision is discrete): LoRA or full fine-tuning "
    "leaves it as it is; train it on its own labels afterwards (`visor-hf label` then `visor-hf train-router`)"
)


def loading_section(routing_token: str = "<route>") -> str:
    """The "Loading" part of VISOR model cards (markdown)."""
    return f"""## Loading

```python
from transformers import AutoModelForImageTextToText, AutoProcessor

model = AutoModelForImageTextToText.from_pretrained("path/or/repo", trust_remote_code=True)
processor = AutoProcessor.from_pretrained("path/or/repo", trust_remote_code=True)
conversation = [{{"role": "user", "content": [{{"type": "image"}}, {{"type": "text", "text": "What is shown?"}}]}}]
prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)  # carries {routing_token}
inputs = processor(images=[image], text=prompt, return_tensors="pt")
output = model.generate(**inputs, max_new_tokens=32)  # visor_configuration="auto" | "max" | index | [layers]
```

The code files in this folder are the model's (`trust_remote_code=True`). Where the `visor_hf` package is installed,
importing it registers the same classes and `trust_remote_code` is not needed.
"""


def visor_model_card(config, base_model: str | None = None, text: str = "") -> ModelCard:
    """A model card with Hub metadata (library, pipeline, tags, base model) and the layer layout of `config`."""
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        tags=list(VISOR_TAGS),
        base_model=base_model,
    )
    rows = "\n".join(f"| {i} | {list(c)} | {len(c)} |" for i, c in enumerate(config.configurations))
    body = f"""
# VISOR (VISion On Request) model

A LLaVA-OneVision model whose language model meets the visual tokens only at a few layers: cross-attention layers
{list(config.cross_attention_layers)} and switchable self-attention layers {list(config.self_attention_layers)}; a router
(at layer {config.router_layer}, routing token id {config.routing_token_id}) picks which self-attention layers run.
{text}
| configuration | SA layers | count |
|---|---|---|
{rows}

{loading_section(getattr(config, "routing_token", None) or "<route>")}"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


class VisorHubMixin:
    """Mixed into `VisorPreTrainedModel`: `save_pretrained` (hence `Trainer.save_model` and `push_to_hub`) always
    writes the code files and `auto_map`, so that the folder loads without `visor_hf` (`trust_remote_code=True`), and
    a model card when the folder has none. `visor_auto_map`: the backbone's classes (LLaVA-OneVision's by default)."""

    visor_auto_map = MODEL_AUTO_MAP

    def save_pretrained(self, save_directory: str | os.PathLike, *args, is_main_process: bool = True, **kwargs):
        # transformers copies a class's code file (and its relative imports) when the class is registered for an auto
        # class, as classes loaded with `trust_remote_code` are; the package's own classes are registered for the
        # duration of the save only (no lasting change to the running process)
        model_class, config_class = type(self), type(self.config)
        previous = model_class._auto_class, config_class._auto_class
        try:
            if model_class._auto_class is None:
                model_class.register_for_auto_class("AutoModelForImageTextToText" if hasattr(self, "lm_head") else "AutoModel")
            if config_class._auto_class is None:
                config_class.register_for_auto_class("AutoConfig")
            self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **self.visor_auto_map}
            result = super().save_pretrained(save_directory, *args, is_main_process=is_main_process, **kwargs)
        finally:
            model_class._auto_class, config_class._auto_class = previous
        card = Path(save_directory) / "README.md"
        if is_main_process and not card.exists():
            base = getattr(self.config, "_name_or_path", None) or None
            base = base if base and "/" in base and not Path(base).exists() else None
            visor_model_card(self.config, base_model=base).save(card)
        return result

    def push_to_hub(self, *args, tags: list[str] | str | None = None, **kwargs):
        # transformers writes the Hub's card (the repo's own, or its template) over ours: it gets VISOR's tags at least
        tags = [tags] if isinstance(tags, str) else list(tags or [])
        return super().push_to_hub(*args, tags=[*VISOR_TAGS, *(t for t in tags if t not in VISOR_TAGS)], **kwargs)

    def visor_lora_targets(self, include_vision_tower: bool = False) -> dict:
        """The LoRA preset of VISOR models, as `peft.LoraConfig` keyword arguments: the LLM's attention and MLP
        projections and the cross-attention projections (and the vision tower's with `include_vision_tower`); the
        router is kept as a full copy (`modules_to_save`). Warns that the router is not trained by the LM loss."""
        if getattr(self.config, "router_layer", None) is not None:
            logger.warning_once(ROUTER_NOT_TRAINED)
        targets = LORA_TARGET_MODULES + (LORA_VISION_TARGET_MODULES if include_vision_tower else "")
        return {"target_modules": targets, "modules_to_save": list(LORA_MODULES_TO_SAVE)}


__all__ = ["LORA_TARGET_MODULES", "MODEL_AUTO_MAP", "PROCESSOR_AUTO_MAP", "VisorHubMixin", "visor_model_card"]

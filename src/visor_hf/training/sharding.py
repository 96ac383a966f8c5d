"""Sharded training (FSDP2, DeepSpeed ZeRO-3) of VISOR: the wrapping plan, and what keeps every rank in step.

A sharded module's parameters are all-gathered when its forward starts and its gradients reduce-scattered in the
backward; both are collectives, so every rank must call the same sharded modules in the same order. VISOR's
forward does that for its decoder layers on every batch (each layer runs once, in the SA or text-only layout,
and the per-step configuration is the same on every rank), but not for the visual path: a micro-batch without
images skips the vision tower, the projector and every cross-attention (CA) block, and a rank that skips them
leaves the others waiting. Two things fix that here, on the training side:

- `append_unseen_image`: a text-only micro-batch gets one small image after its last token. Nothing attends to
  it (attention is causal and a CA block only lets a text token see visual tokens placed before it, adding
  exactly nothing to a text token that sees none) and its positions have no label, so the loss is unchanged and
  every visual-path parameter gets an exact zero gradient, but every rank runs the whole visual path.
- `register_fsdp_methods`: a CA block computes its visual keys/values in `visual_key_values`, a method the model
  calls outside the block's `forward`; FSDP2 gathers the block's parameters for it once it is registered as a
  forward method.

`FSDP_PLAN` shards each decoder layer, each CA block and the router as its own unit (the rest stays in the root
unit), for `from_pretrained(..., distributed_config=DistributedConfig(fsdp_size=N, fsdp_plan=FSDP_PLAN))`;
`FSDP_WRAP_CLASSES` is the same policy for accelerate's FSDP plugin (`fsdp_transformer_layer_cls_to_wrap`).
"""

from __future__ import annotations

import torch

from .data import IGNORE_INDEX

FSDP_PLAN = {
    "model.language_model.layers.*": "free_full_weight",
    "model.cross_attention_blocks.*": "free_full_weight",
    "model.router": "free_full_weight",
}
FSDP_WRAP_CLASSES = ("Qwen2DecoderLayer", "VisorCrossAttentionBlock", "VisorRouter")
UNSEEN_IMAGE_SIZE = 32  # pixels: a square picture smaller than one crop gets the fewest crops (visual tokens)


def fsdp_config(fsdp_size: int, **kwargs):
    """transformers' `DistributedConfig` for FSDP2 over `fsdp_size` ranks with VISOR's wrapping plan."""
    from transformers.distributed import DistributedConfig

    return DistributedConfig(fsdp_size=fsdp_size, fsdp_plan=dict(FSDP_PLAN), **kwargs)


def is_sharded(trainer) -> bool:
    """Whether the trainer's model is sharded over the ranks (FSDP at load time or by accelerate, ZeRO-3)."""
    if getattr(trainer.model, "is_distributed_loading_by_transformers", False):
        return True
    if getattr(trainer, "is_fsdp_enabled", False):
        return True
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None) if getattr(trainer, "is_deepspeed_enabled", False) else None
    return getattr(plugin, "zero_stage", 0) == 3


def register_fsdp_methods(model) -> int:
    """Register `visual_key_values` of every FSDP2-sharded CA block as a forward method (idempotent); returns how
    many blocks were registered now."""
    from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

    count = 0
    for module in model.modules():
        if type(module).__name__.endswith("VisorCrossAttentionBlock") and isinstance(module, FSDPModule):
            if not getattr(module, "_visor_fsdp_methods", False):
                register_fsdp_forward_method(module, "visual_key_values")
                module._visor_fsdp_methods = True
                count += 1
    return count


class UnseenImage:
    """The image tensors and image-token count of one small blank image, as the processor makes them."""

    def __init__(self, processor, image_token_id: int):
        from PIL import Image

        blank = Image.new("RGB", (UNSEEN_IMAGE_SIZE, UNSEEN_IMAGE_SIZE))
        encoded = processor(text=[processor.image_token], images=[[blank]], return_tensors="pt", padding=True)
        self.image_token_id = image_token_id
        self.num_tokens = int((encoded["input_ids"] == image_token_id).sum())
        self.images = {k: encoded[k] for k in ("pixel_values", "image_sizes") if k in encoded}


def append_unseen_image(inputs: dict, image: UnseenImage, pad_token_id: int = 0) -> dict:
    """A text-only batch with `image` placed after the last token of its first row (see the module docstring);
    a batch with images is returned as it is. `labels` and a boolean `logits_to_keep` mask get the new positions
    switched off."""
    if inputs.get("pixel_values") is not None or inputs.get("pixel_values_videos") is not None:
        return inputs
    input_ids = inputs["input_ids"]
    batch, length = input_ids.shape
    extra = torch.full((batch, image.num_tokens), pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    extra[0] = image.image_token_id
    seen = torch.zeros_like(extra)
    seen[0] = 1
    out = dict(inputs)
    out["input_ids"] = torch.cat([input_ids, extra], dim=1)
    attention_mask = inputs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    out["attention_mask"] = torch.cat([attention_mask, seen.to(attention_mask.dtype)], dim=1)
    if inputs.get("labels") is not None:
        out["labels"] = torch.cat([inputs["labels"], torch.full_like(extra, IGNORE_INDEX)], dim=1)
    keep = inputs.get("logits_to_keep")
    if isinstance(keep, torch.Tensor) and keep.dtype == torch.bool and keep.shape == input_ids.shape:
        out["logits_to_keep"] = torch.cat([keep, torch.zeros_like(extra, dtype=torch.bool)], dim=1)
    out.update({k: v.to(input_ids.device) for k, v in image.images.items()})
    out["batch_num_images"] = torch.tensor([1] + [0] * (batch - 1), device=input_ids.device)
    return out


class ShardedStep:
    """What a trainer does per micro-batch when its model is sharded: the unseen image for text-only batches, and
    the CA blocks' `visual_key_values` registered with FSDP2 before the first forward."""

    def __init__(self, trainer):
        self.enabled = is_sharded(trainer)
        self.trainer = trainer
        self._image = None

    def __call__(self, model, inputs: dict) -> dict:
        if not self.enabled:
            return inputs
        register_fsdp_methods(model)
        if self._image is None:
            if self.trainer.processing_class is None:
                raise ValueError("sharded training needs the trainer's processing_class (the VISOR processor): it "
                                 "encodes the image that keeps a text-only rank in step")
            config = self.trainer.accelerator.unwrap_model(model).config
            self._image = UnseenImage(self.trainer.processing_class, config.image_token_id)
        tokenizer = getattr(self.trainer.processing_class, "tokenizer", None)
        pad = getattr(tokenizer, "pad_token_id", None) or 0
        out = append_unseen_image(inputs, self._image, pad)
        packing = out.get("visor_packing")
        if out is not inputs and packing is not None:  # a packed batch: the unseen image packed too
            from .data import repack_placeholders

            config = self.trainer.accelerator.unwrap_model(model).config
            out = repack_placeholders(out, config, [int(k) for k in packing.tolist()], pad)
        return out


__all__ = [
    "FSDP_PLAN",
    "FSDP_WRAP_CLASSES",
    "ShardedStep",
    "UnseenImage",
    "append_unseen_image",
    "fsdp_config",
    "is_sharded",
    "register_fsdp_methods",
]

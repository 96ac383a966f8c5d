"""Adaptive inference with the shipped toy VISOR checkpoint (what `visor-hf toy` runs)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import ProcessorMixin

from .data import Example, make_scene, render, sample_questions

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "assets" / "toy-visor"
# the toy VISOR-TR: the toy continued with token packing (2x, 4x) in its universal fine-tuning, router relabelled
TR_CHECKPOINT = DEFAULT_CHECKPOINT.parent / "toy-visor-tr"
SHIPPED_TOYS = {"toy-visor": DEFAULT_CHECKPOINT, "toy-visor-tr": TR_CHECKPOINT}


def resolve_toy(path: str | Path | None = None, packing: int = 1) -> Path | str:
    """The checkpoint folder to load: `path`, a shipped toy's name (`toy-visor`, `toy-visor-tr`) when no such folder
    exists, or by default the toy VISOR, or the toy VISOR-TR for a packing factor above 1 (the toy VISOR has no
    packing module)."""
    if path is None:
        return TR_CHECKPOINT if packing != 1 else DEFAULT_CHECKPOINT
    if str(path) in SHIPPED_TOYS and not Path(path).is_dir():
        return SHIPPED_TOYS[str(path)]
    return path


def load_toy(path: str | Path | None = None, attn_implementation: str = "sdpa") -> tuple:
    """The toy VISOR model and its processor (`from_pretrained` on the shipped folder by default; a shipped toy's name
    is resolved by `resolve_toy`)."""
    from transformers import AutoProcessor

    import visor_hf  # noqa: F401  (registers the VISOR classes with the Auto classes)

    from ..modeling import VisorForConditionalGeneration

    path = str(resolve_toy(path))
    model = VisorForConditionalGeneration.from_pretrained(path, attn_implementation=attn_implementation).eval()
    processor = AutoProcessor.from_pretrained(path)
    return model, processor


@dataclass
class Answer:
    example: Example
    answer: str
    sa_layers: tuple
    prefill_flops: int
    dense_prefill_flops: int

    @property
    def correct(self) -> bool:
        return self.answer == self.example.question.answer

    @property
    def flops_ratio(self) -> float:
        return self.prefill_flops / self.dense_prefill_flops


def prompt(processor: ProcessorMixin, question: str) -> str:
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


@torch.no_grad()
def answer_examples(model: torch.nn.Module, processor: ProcessorMixin, examples: list[Example],
                    visor_configuration: str | int | list = "auto", batch_size: int = 25,
                    router_threshold: float | None = None, token_reduction=None, packing: int = 1) -> list[Answer]:
    """Greedy answers with `generate` (a left-padded batch; every sample gets its own configuration), the SA layers
    that ran and the analytical prefill FLOPs of the LLM against dense LLaVA-OV on the same tokens.
    `router_threshold`: the calibrated router's threshold (default: the checkpoint's). `token_reduction`: a visual
    token reduction (e.g. `"visionzip:0.25"`, see `reduction_visor`) on the model and the processor for these
    answers; the dense FLOPs are then those of LLaVA-OV on the unreduced tokens (the reduction's own cost is not
    counted). `packing`: the images' token packing factor (VISOR-TR; the checkpoint needs the packing module); the
    dense FLOPs are then those of LLaVA-OV on every visual token."""
    from ..modeling.reduction_visor import token_reduction as reducing

    if packing != 1 and token_reduction is not None:
        raise ValueError("token packing and token reduction cannot be combined (the reduction reads the unpacked layout)")

    with reducing(token_reduction, model, processor):
        return _answer_examples(model, processor, examples, visor_configuration, batch_size, router_threshold,
                                token_reduction, packing)


def _answer_examples(model, processor, examples, visor_configuration, batch_size, router_threshold,
                     token_reduction, packing) -> list[Answer]:
    from ..modeling.flops_visor import FlopsShape, prefill_flops
    from ..modeling.packing_visor import image_token_layouts

    tokenizer = processor.tokenizer
    shape = FlopsShape.from_config(model.config)
    cross = model.config.cross_attention_layers
    image_id = model.config.image_token_id
    results = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        texts = [prompt(processor, e.question.text) for e in chunk]
        packed = {"packing": packing} if packing != 1 else {}
        inputs = processor(images=[e.image for e in chunk], text=texts, return_tensors="pt", padding=True, **packed)
        extra = {"visor_router_threshold": router_threshold} if router_threshold is not None else {}
        if packing != 1:
            extra["visor_packing"] = packing
        # dense LLaVA-OV's count: every visual token of the picture (unpacked, unreduced)
        unpacked = [layout.num_tokens(1) for layout in image_token_layouts(model.config, inputs["image_sizes"])]
        out = model.generate(**inputs, max_new_tokens=2, do_sample=False, visor_configuration=visor_configuration,
                             pad_token_id=tokenizer.pad_token_id, **extra)
        report = model.last_visor_report
        new = out[:, inputs["input_ids"].shape[1] :]
        for i, e in enumerate(chunk):
            words = tokenizer.decode(new[i], skip_special_tokens=True).split()
            ids = inputs["input_ids"][i][inputs["attention_mask"][i].bool()]
            n_visual = int((ids == image_id).sum())
            n_text = len(ids) - n_visual
            layers = tuple(report.configurations[i])
            results.append(Answer(
                example=e,
                answer=words[0] if words else "",
                sa_layers=layers,
                prefill_flops=prefill_flops(shape, n_text, n_visual, layers, cross),
                dense_prefill_flops=prefill_flops(shape, n_text - 1, unpacked[i]),  # LLaVA-OV has no routing token
            ))
    return results


def fresh_examples(seed: int, num_images: int) -> list[Example]:
    """One question of each kind on each of `num_images` new pictures (picture seeds derived from `seed`)."""
    examples = []
    for i in range(num_images):
        scene = make_scene(50_000_000 + seed * 1000 + i)
        examples += [Example(scene, q) for q in sample_questions(scene)]
    return examples


__all__ = [
    "DEFAULT_CHECKPOINT",
    "SHIPPED_TOYS",
    "TR_CHECKPOINT",
    "Answer",
    "answer_examples",
    "fresh_examples",
    "load_toy",
    "render",
    "resolve_toy",
]

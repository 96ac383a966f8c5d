"""Evaluation of a toy VISOR checkpoint: exact-match accuracy per question kind and analytical LLM FLOPs.

The answer is the greedy first token after the prompt (every toy answer is one word); FLOPs are the prefill FLOPs
of the LLM (`flops_visor.prefill_flops`, LM head on one token) against dense LLaVA-OV on the same prompt without the
routing token. The vision tower is the same for both and is not counted.
"""

from __future__ import annotations

import numpy as np
import torch

from .data import KINDS, Example
from .model import IMAGE_ID, PAD_ID, encode_batch, num_pooled_tokens, toy_image_processor


def summarize(correct: list[bool], kinds: list[str]) -> dict:
    """Accuracy per question kind, per difficulty ("easy", "hard") and overall ("all")."""
    out = {}
    for k in KINDS:
        v = [c for c, kk in zip(correct, kinds) if kk == k]
        if v:
            out[k] = sum(v) / len(v)
    for diff in ("easy", "hard"):
        v = [c for c, kk in zip(correct, kinds) if KINDS[kk] == diff]
        if v:
            out[diff] = sum(v) / len(v)
    out["all"] = sum(correct) / max(1, len(correct))
    return out


def _model_inputs(batch: dict) -> dict:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")}


@torch.no_grad()
def evaluate_visor(model: torch.nn.Module, examples: list[Example], configuration: str | int | list = "auto",
                   batch_size: int = 50, packing: int = 1) -> dict:
    """Per-sample correctness, loss, SA layers that ran and prefill FLOPs (VISOR and dense) of `examples`. `packing`:
    the pictures' token packing factor (VISOR-TR); the dense FLOPs stay those of LLaVA-OV on every visual token."""
    from ..modeling.flops_visor import FlopsShape, prefill_flops

    model.eval()
    routing_id = model.config.routing_token_id
    processor = toy_image_processor()
    shape = FlopsShape.from_config(model.config)
    cross = model.config.cross_attention_layers
    correct, losses, chosen, flops, dense = [], [], [], [], []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        batch = encode_batch(chunk, routing_id, processor, packing)
        extra = {"visor_packing": packing} if packing != 1 else {}
        out = model(**_model_inputs(batch), visor_configuration=configuration, logits_to_keep=1, **extra)
        logits = out.logits[:, -1].float()
        correct += (logits.argmax(-1) == batch["answers"]).tolist()
        losses += torch.nn.functional.cross_entropy(logits, batch["answers"], reduction="none").tolist()
        for row, layers in zip(batch["input_ids"], out.visor_configurations):
            n_visual = int((row == IMAGE_ID).sum())
            n_text = int((row != PAD_ID).sum()) - n_visual
            chosen.append(tuple(layers))
            flops.append(prefill_flops(shape, n_text, n_visual, layers, cross))
            # dense LLaVA-OV: no routing token, every visual token
            dense.append(prefill_flops(shape, n_text - 1, n_visual * num_pooled_tokens(1) // num_pooled_tokens(packing)))
    return {"correct": correct, "loss": losses, "configurations": chosen, "flops": flops, "dense_flops": dense}


def report(result: dict, examples: list[Example]) -> dict:
    """Accuracies, mean FLOPs, FLOPs ratio and saving against dense, mean SA layers per difficulty."""
    kinds = [e.question.kind for e in examples]
    mean_flops = float(np.mean(result["flops"]))
    dense = float(np.mean(result["dense_flops"]))
    out = {"accuracy": summarize(result["correct"], kinds), "flops": mean_flops, "dense_flops": dense,
           "flops_ratio": mean_flops / dense, "saving": dense / mean_flops, "loss": float(np.mean(result["loss"]))}
    if result.get("configurations"):
        for diff in ("easy", "hard"):
            sizes = [len(c) for c, e in zip(result["configurations"], examples) if e.question.difficulty == diff]
            out[f"mean_sa_layers_{diff}"] = float(np.mean(sizes))
    return out

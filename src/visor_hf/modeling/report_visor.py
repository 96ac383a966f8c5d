"""FLOPs of a VISOR forward, the compute budget (`visor_budget=`) and the per-sample report of `generate`.

The analytical counts themselves are `flops_visor`'s; this module applies them to what a forward or a generation
actually ran (token counts of each prompt, the configuration of each sample, the decoding steps).
"""

from __future__ import annotations

import torch
from torch import nn

from .arguments_visor import check_visor_budget
from .cache_visor import FULL
from .flops_visor import FlopsShape, VisorFlopsReport, decode_flops, prefill_flops, select_by_budget
from .requests_visor import AUTO, resolve_configuration
from .streams_visor import embedded_token_mask


def prompt_token_counts(
    config, embeddings: nn.Module, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
    inputs_embeds: torch.Tensor | None = None, visual_inputs: bool = True,
) -> tuple[list[int], list[int]] | None:
    """Real text and visual tokens of each prompt (one host sync, at prefill only). Placeholders are found in
    `input_ids`, or in `inputs_embeds` as LLaVA-OV finds them (the image/video token's own embedding); None
    without either. Without visual inputs (`visual_inputs=False`) placeholders run as text and count as text."""
    source = input_ids if input_ids is not None else inputs_embeds
    if source is None:
        return None
    if not visual_inputs:
        visual = torch.zeros(source.shape[:2], dtype=torch.bool, device=source.device)
    elif input_ids is not None:
        visual = (input_ids == config.image_token_id) | (input_ids == config.video_token_id)
    else:
        visual = embedded_token_mask(embeddings, inputs_embeds, [config.image_token_id, config.video_token_id])
    valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(visual)
    counts = torch.stack([(valid & ~visual).sum(1), (valid & visual).sum(1)]).tolist()
    return counts[0], counts[1]


def budget_request(config, budget, request, counts) -> list[tuple[int, ...]]:
    """The SA layers a compute budget picks for each sample: one tuple per sample, so that the result always reads
    as a per-sample request (a plain list of indices would read as one layer set for the whole batch)."""
    check_visor_budget(budget)
    if request is not None and not (isinstance(request, str) and request == AUTO):
        raise ValueError("pass either visor_configuration or visor_budget, not both")
    if counts is None:
        raise ValueError("visor_budget needs input_ids or inputs_embeds (to count the text and visual tokens of each sample)")
    batch = len(counts[0])
    if isinstance(budget, torch.Tensor):
        budget = budget.tolist()
    budgets = list(budget) if isinstance(budget, (list, tuple)) else [budget] * batch
    if len(budgets) != batch:
        raise ValueError(f"visor_budget has {len(budgets)} entries for a batch of {batch}")
    return [
        resolve_configuration(config, select_by_budget(config, b, t, v), has_router=False)
        for b, t, v in zip(budgets, *counts)
    ]


def prefill_flops_per_sample(config, configurations, counts, kept_positions: int, logits_to_keep) -> torch.Tensor:
    """`[B]` FLOPs of a prefill, each sample running the SA layers `configurations[b]` over its tokens (its own
    configuration: as if alone; its computed layers: what the batch computed for it); the LM head runs on the
    positions whose logits are kept (padding excluded)."""
    shape = FlopsShape.from_config(config)
    flops = []
    for layers, n_text, n_visual in zip(configurations, *counts):
        head = n_text + n_visual
        if not isinstance(logits_to_keep, int) or logits_to_keep > 0:
            head = min(head, kept_positions)
        flops.append(prefill_flops(shape, n_text, n_visual, layers, config.cross_attention_layers, lm_head_tokens=head))
    return torch.tensor(flops, dtype=torch.long)


def decoding_layers(state) -> tuple[int, ...]:
    """The layers a decoding step runs over the whole cached sequence (visual keys included) for every sample: the
    cache's full slots (a masked or merged cache is one layout for the whole batch)."""
    return tuple(i for i, layout in enumerate(state.layouts) if layout == FULL)


def decode_flops_per_sample(config, state, new: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B]` FLOPs of a decoding forward that fed `new` tokens (already counted in `state.decode_steps`), twice: what
    it computed for each sample (the cache's full layers), and each sample's own configuration alone. Samples (and
    the two figures) that share layers and prompt counts share the arithmetic."""
    shape = FlopsShape.from_config(config)
    cross = config.cross_attention_layers
    before = state.decode_steps - new
    steps = sum(before + j for j in range(new))
    known = {}

    def step_flops(layers, n_text: int, n_visual: int) -> int:
        key = (tuple(layers), n_text, n_visual)
        if key not in known:
            # a decoding step costs a base plus a fixed amount per token already fed after the prompt
            base = decode_flops(shape, n_text, n_visual, layers, cross)
            increment = decode_flops(shape, n_text + 1, n_visual, layers, cross) - base
            known[key] = new * base + steps * increment
        return known[key]

    computed = decoding_layers(state)
    counts = list(zip(state.prompt_text, state.prompt_visual))
    together = [step_flops(computed, n_text, n_visual) for n_text, n_visual in counts]
    alone = [step_flops(layers, n_text, n_visual) for layers, (n_text, n_visual) in zip(state.configurations, counts)]
    return torch.tensor(together, dtype=torch.long), torch.tensor(alone, dtype=torch.long)


def single_sample_flops(config, n_text: int, n_visual: int, visor_configuration="max", decode_context: int = 0) -> dict:
    """What `VisorForConditionalGeneration.visor_flops` returns (see there)."""
    layers = resolve_configuration(config, visor_configuration, has_router=False)
    shape = FlopsShape.from_config(config)
    cross = config.cross_attention_layers
    context = n_text + decode_context
    return {
        "configuration": layers,
        "prefill": prefill_flops(shape, n_text, n_visual, layers, cross),
        "decode_step": decode_flops(shape, context, n_visual, layers, cross),
        "dense_prefill": prefill_flops(shape, n_text, n_visual),
        "dense_decode_step": decode_flops(shape, context, n_visual),
    }


def generation_report(config, state, prompts: int | None, rows: int) -> VisorFlopsReport | None:
    """The report of a generation from the VISOR state its cache ended with: one row per returned sequence."""
    if state is None or not state.prompt_text:
        return None
    held = len(state.configurations)
    if held == rows or not prompts or held % prompts or rows % prompts:
        index = list(range(min(held, rows)))
    else:  # beam search: `held` beams per prompt, `rows` returned sequences per prompt
        index = [(r // (rows // prompts)) * (held // prompts) for r in range(rows)]
    shape = FlopsShape.from_config(config)
    cross = config.cross_attention_layers
    known = {tuple(c): i for i, c in enumerate(config.configurations)}
    steps = state.decode_steps
    decoding = decoding_layers(state)
    report = VisorFlopsReport([], [], [], [], [], [], [], [])
    for i in index:
        layers, n_text, n_visual = state.configurations[i], state.prompt_text[i], state.prompt_visual[i]
        computed = state.computed_layers[i] if state.computed_layers else layers
        report.configurations.append(tuple(layers))
        report.configuration_index.append(known.get(tuple(layers), -1))
        report.num_text_tokens.append(n_text)
        report.num_visual_tokens.append(n_visual)
        report.computed_layers.append(tuple(computed))
        report.prefill_flops.append(prefill_flops(shape, n_text, n_visual, computed, cross))
        report.prefill_flops_alone.append(prefill_flops(shape, n_text, n_visual, layers, cross))
        report.dense_prefill_flops.append(prefill_flops(shape, n_text, n_visual))
        report.decode_flops.append([decode_flops(shape, n_text + k, n_visual, decoding, cross) for k in range(steps)])
        report.decode_flops_alone.append([decode_flops(shape, n_text + k, n_visual, layers, cross) for k in range(steps)])
        report.dense_decode_flops.append([decode_flops(shape, n_text + k, n_visual) for k in range(steps)])
    return report


__all__ = [
    "budget_request",
    "decode_flops_per_sample",
    "generation_report",
    "prefill_flops_per_sample",
    "prompt_token_counts",
    "single_sample_flops",
]

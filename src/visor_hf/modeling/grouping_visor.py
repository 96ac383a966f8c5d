"""Mixed batches: one sub-batch per configuration at prefill ("grouped"), or one batch with masks ("masked").

A batch whose samples run different SA layers can run its prefill two ways:

- **masked**: one pass over the whole batch; an SA layer that some sample runs is a full layer for every sample, and
  the samples whose configuration does not hold it have the visual keys hidden (`plan_visor`). Every sample pays for
  the union of the batch's SA layers over its visual tokens.
- **grouped**: one pass per group of samples that run the same SA layers; each group's SA layers are plain full
  layers, its other layers text-only. The groups' caches are then merged, in the batch order, into the one
  `VisorCache` that decoding continues with (`VisorCache.start_merged_prompt`): the layouts are the union's, a
  group's text-only slot is scattered into a full slot where another group needed one, its visual slots hidden by
  the cache's per-layer `visual_keys_for`, exactly as a masked prefill leaves them. Decoding is the same in both.

Groups: samples with the same explicit layer set; samples without visual tokens together (every configuration
computes the same for them); samples that ask the router ("auto") together, masked inside their group (their
configuration is only known after `router_layer`, once the layers before it ran).

`visor_batching="auto"` groups when the grouped prefill's analytical FLOPs are at most `1 - GROUPING_MIN_SAVING` of
the masked one's (see docs/generation.md for the measurement behind the margin).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from transformers.cache_utils import DynamicLayer

from .cache_visor import VisorCache
from .flops_visor import FlopsShape, prefill_flops
from .outputs_visor import OutputCapture, VisorModelOutputWithPast
from .requests_visor import AUTO, resolve_configuration_request
from .routing_visor import resolve_router_threshold

MASKED = "masked"
GROUPED = "grouped"
BATCHING_MODES = (AUTO, GROUPED, MASKED)
# "auto" groups when grouping saves at least this fraction of the masked prefill's analytical FLOPs: each group is
# one more pass of every layer's fixed costs (kernel launches, Python, masks) and the cache is copied once to merge
GROUPING_MIN_SAVING = 0.1
_NO_VISUAL = "no visual tokens"


def check_visor_batching(value) -> str:
    """`visor_batching=`: "auto" (default, None), "grouped" or "masked"."""
    if value is None:
        return AUTO
    if not isinstance(value, str) or value not in BATCHING_MODES:
        raise ValueError(f"visor_batching must be one of {', '.join(repr(m) for m in BATCHING_MODES)}; got {value!r}")
    return value


@dataclass
class PrefillInputs:
    """A prompt after embedding, before the layers: what a (sub-)batch's prefill reads. Batch first everywhere."""

    inputs_embeds: torch.Tensor  # [B, T, d]
    visual_mask: torch.Tensor  # [B, T] image / video tokens
    segments: torch.Tensor  # [B, T] image id per visual token
    position_ids: torch.Tensor  # [B, T] (or [B, T, 3] for M-RoPE)
    valid: torch.Tensor  # [B, T] the attention mask as bool
    attention_mask: torch.Tensor | None
    routing_mask: torch.Tensor | None  # [B, T] routing tokens (None without a router)

    def select(self, rows: torch.Tensor) -> PrefillInputs:
        """The same prompt for the samples `rows` (same padded length: positions and masks are unchanged)."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return PrefillInputs(**{k: v.index_select(0, rows.to(v.device)) if v is not None else None for k, v in values.items()})


def _union(layer_sets) -> tuple[int, ...]:
    return tuple(sorted(set().union(*map(set, layer_sets)))) if layer_sets else ()


def batching_groups(requests: list, has_visual: list[bool]) -> list[list[int]]:
    """Rows of the batch per group, in order of first appearance (see the module docstring)."""
    groups: dict = {}
    for row, (request, visual) in enumerate(zip(requests, has_visual)):
        key = AUTO if request == AUTO else (tuple(request) if visual else _NO_VISUAL)
        groups.setdefault(key, []).append(row)
    return list(groups.values())


def prefill_layer_sets(config, requests: list, rows: list[int], has_visual: list[bool]) -> tuple[int, ...]:
    """The SA layers a (sub-)batch of `rows` runs as full layers at prefill: the union of its samples' (an "auto"
    sample counted with the layers every configuration holds, its provisional set); none without visual tokens."""
    if not any(has_visual[r] for r in rows):
        return ()
    provisional = tuple(set.intersection(*(set(c) for c in config.configurations)))
    return _union([provisional if requests[r] == AUTO else requests[r] for r in rows])


def batch_prefill_cost(config, requests, groups, counts) -> int:
    """Analytical prefill FLOPs of the batch run as `groups` (one group: masked), each sample over its real tokens."""
    shape = FlopsShape.from_config(config)
    has_visual = [v > 0 for v in counts[1]]
    total = 0
    for rows in groups:
        layers = prefill_layer_sets(config, requests, rows, has_visual)
        total += sum(prefill_flops(shape, counts[0][r], counts[1][r], layers, config.cross_attention_layers) for r in rows)
    return total


def choose_groups(
    config, mode: str, request, prompt: PrefillInputs, has_router: bool, cache, training: bool = False
) -> list[list[int]] | None:
    """The groups a prefill runs as (None: one masked batch). `mode`: a checked `visor_batching`. In training "auto"
    keeps one pass: sharded training gathers a layer's parameters at every call and activation checkpointing
    recomputes every call, costs the FLOPs rule does not see (`"grouped"` still groups)."""
    if mode == MASKED or (mode == AUTO and training):
        return None
    batch = prompt.inputs_embeds.shape[0]
    requests = resolve_configuration_request(config, request, batch, has_router)
    if batch < 2 or all(r == requests[0] for r in requests):
        return None  # one configuration: the masked pass is the plain pass
    if cache is not None and any(type(layer) is not DynamicLayer for layer in cache.layers):
        if mode == GROUPED:
            raise ValueError("visor_batching='grouped' needs a cache of plain DynamicLayer slots (no sliding window)")
        return None
    real = prompt.valid & prompt.visual_mask
    text = prompt.valid & ~prompt.visual_mask
    counts = tuple(torch.stack([text.sum(1), real.sum(1)]).tolist())  # one host sync, at prefill only
    groups = batching_groups(requests, [v > 0 for v in counts[1]])
    if len(groups) < 2:
        return None
    if mode == GROUPED:
        return groups
    masked = batch_prefill_cost(config, requests, [list(range(batch))], counts)
    grouped = batch_prefill_cost(config, requests, groups, counts)
    return groups if grouped <= (1 - GROUPING_MIN_SAVING) * masked else None


def select_per_sample(value, rows: list[int]):
    """A per-sample argument (list / 1-D tensor) for the samples `rows`; a scalar or None as it is."""
    if isinstance(value, torch.Tensor) and value.dim() == 1:
        return value[torch.tensor(rows, device=value.device)]
    if isinstance(value, (list, tuple)):
        return [value[r] for r in rows]
    return value


def _in_order(parts: list[torch.Tensor | None], inverse: torch.Tensor) -> torch.Tensor | None:
    """The groups' `[g, ...]` tensors as one `[B, ...]` tensor in the batch order."""
    if any(p is None for p in parts):
        return None
    return torch.cat(parts).index_select(0, inverse.to(parts[0].device))


def merge_group_outputs(outputs: list, groups: list[list[int]], inputs_embeds: torch.Tensor, capture_template) -> dict:
    """The fields of one `VisorModelOutputWithPast` from the groups' outputs: every per-sample tensor in the batch
    order, the router logits in the order a masked pass gives them (by sample, then by position)."""
    order = [row for rows in groups for row in rows]
    inverse = torch.empty(len(order), dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(len(order))
    merged = {
        "last_hidden_state": _in_order([o.last_hidden_state for o in outputs], inverse),
        "visor_configurations": [None] * len(order),
        "visor_computed_layers": [None] * len(order),
        "configuration_index": _in_order([o.configuration_index for o in outputs], inverse),
    }
    for output, rows in zip(outputs, groups):
        for k, row in enumerate(rows):
            merged["visor_configurations"][row] = output.visor_configurations[k]
            merged["visor_computed_layers"][row] = output.visor_computed_layers[k]
    for name in ("hidden_states", "attentions"):
        if getattr(capture_template, name) is None:
            merged[name] = None
            continue
        per_layer = zip(*(getattr(o, name) for o in outputs))
        merged[name] = tuple(_in_order(list(states), inverse) for states in per_layer)
    if merged["hidden_states"] is not None and merged["hidden_states"][0] is not None:
        merged["hidden_states"] = (inputs_embeds, *merged["hidden_states"][1:])  # the very tensor, as a masked pass
    scored = [
        (o.router_logits, o.routing_token_batch_index, rows) for o, rows in zip(outputs, groups) if o.router_logits is not None
    ]
    if scored:
        logits = torch.cat([s[0] for s in scored])
        samples = torch.cat([torch.tensor(rows, device=index.device)[index] for _, index, rows in scored])
        by_sample = torch.sort(samples, stable=True).indices
        merged["router_logits"], merged["routing_token_batch_index"] = logits[by_sample], samples[by_sample]
    return merged


def grouped_prefill(
    model,
    prompt: PrefillInputs,
    groups: list[list[int]],
    cache: VisorCache | None,
    request,
    capture: OutputCapture,
    output_router_logits,
    kwargs,
    threshold=None,
) -> VisorModelOutputWithPast:
    """The prefill of `prompt` as one pass per group (`model._prefill_rows`), merged into one output and, with a
    cache, into `cache` (the one decoding continues with)."""
    config = model.config
    batch = prompt.inputs_embeds.shape[0]
    requests = resolve_configuration_request(config, request, batch, model.router is not None)
    routed_batch = any(r == AUTO for r in requests)
    resolve_router_threshold(config, threshold, routed_batch, batch)  # its errors, batch-wide
    # a masked pass that runs the router scores every sample's routing tokens: so does every group then
    scores = bool(output_router_logits) or routed_batch
    outputs, parts = [], []
    for rows in groups:
        part = VisorCache(config=config.text_config) if cache is not None else None
        routed = any(requests[r] == AUTO for r in rows)
        fresh = OutputCapture(
            () if capture.hidden_states is not None else None, () if capture.attentions is not None else None, capture.selected
        )
        outputs.append(
            model._prefill_rows(
                prompt.select(torch.tensor(rows, device=prompt.inputs_embeds.device)),
                part,
                [requests[r] for r in rows],
                fresh,
                scores,
                kwargs,
                select_per_sample(threshold, rows) if routed else None,
            )
        )
        parts.append(part)
    if cache is not None:
        cache.start_merged_prompt(parts, groups)
    return VisorModelOutputWithPast(past_key_values=cache, **merge_group_outputs(outputs, groups, prompt.inputs_embeds, capture))


__all__ = [
    "grouped_prefill",
    "BATCHING_MODES",
    "GROUPING_MIN_SAVING",
    "PrefillInputs",
    "batch_prefill_cost",
    "batching_groups",
    "check_visor_batching",
    "choose_groups",
    "merge_group_outputs",
    "prefill_layer_sets",
    "select_per_sample",
]

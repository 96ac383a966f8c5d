"""How the router's scores become one configuration per sample (see `docs/model.md`, "Router").

Two router heads share `VisorRouter` (one output per configuration) and differ in what the outputs mean:

- `"argmax"` (the paper's): the outputs are class logits; a routing token picks its arg-max configuration.
- `"calibrated"`: output `c` is the logit of the probability that configuration `c` keeps the maximal
  configuration's answer; a routing token picks the cheapest configuration whose probability is at least the
  threshold (ties in cost: the higher probability, then the lower index), and the maximal configuration when none
  is. The threshold is an inference-time knob (`visor_router_threshold=`, default `config.router_threshold`): a higher
  threshold never picks a cheaper configuration.

A sample with several routing tokens (several questions) runs the most expensive of its tokens' choices (ties: the
higher index); a sample without one gets -1 (the caller falls back to the default configuration). Cost is the
number of SA layers: every SA layer costs the same prefill FLOPs for a given sample.
"""

from __future__ import annotations

import numbers

import torch

ROUTER_TYPES = ("argmax", "calibrated")


def check_threshold(value, what: str = "visor_router_threshold") -> float:
    """`value` as a float in [0, 1], else a `ValueError` naming it."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a number in [0, 1], got {value!r}")
    value = float(value)
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise ValueError(f"{what} must be in [0, 1] (a probability), got {value}")
    return value


def resolve_router_threshold(config, threshold, asks_router: bool, batch_size: int) -> list[float] | None:
    """One threshold per sample for the calibrated router, or None for the arg-max router.

    `threshold`: None (the config's `router_threshold`), a number, or one per sample (list / 1-D tensor).
    `asks_router`: whether some sample's resolved `visor_configuration` is "auto"; a threshold given while no sample
    asks the router is refused, as is a threshold for an arg-max router (it has no probabilities to compare)."""
    if threshold is None:
        if getattr(config, "router_type", "argmax") != "calibrated":
            return None
        return [check_threshold(config.router_threshold, "config.router_threshold")] * batch_size
    if not asks_router:
        raise ValueError("visor_router_threshold only applies to samples the router decides: do not pass it together "
                         "with an explicit visor_configuration (an index, a layer list or 'max') or a visor_budget")
    if getattr(config, "router_type", "argmax") != "calibrated":
        raise ValueError("visor_router_threshold needs a calibrated router (config.router_type='calibrated'); this "
                         f"model's router is {getattr(config, 'router_type', 'argmax')!r}")
    if isinstance(threshold, torch.Tensor):
        if threshold.dim() > 1:
            raise ValueError(f"visor_router_threshold must be a number or one per sample, got shape {tuple(threshold.shape)}")
        threshold = threshold.tolist()
    if isinstance(threshold, (list, tuple)):
        if len(threshold) != batch_size:
            raise ValueError(f"visor_router_threshold has {len(threshold)} entries for a batch of {batch_size}")
        return [check_threshold(t) for t in threshold]
    return [check_threshold(threshold)] * batch_size


def select_configurations(
    router_logits: torch.Tensor | None,
    batch_index: torch.Tensor | None,
    batch_size: int,
    configurations: list[list[int]],
    thresholds: list[float] | None = None,
) -> list[int]:
    """Configuration index per sample from the router's outputs (`[N, C]`, one row per routing token; `batch_index`
    names each row's sample). `thresholds` None: the paper's arg-max; else the calibrated rule with one threshold per
    sample. -1 where a sample has no routing token."""
    count = len(configurations)
    if router_logits is None or router_logits.shape[0] == 0:
        return [-1] * batch_size
    device = router_logits.device
    cost = torch.tensor([len(c) for c in configurations], device=device)
    if thresholds is None:
        predicted = router_logits.argmax(-1)
    else:
        probability = torch.sigmoid(router_logits.float())
        limit = torch.tensor(thresholds, dtype=probability.dtype, device=device)[batch_index]
        above = probability >= limit[:, None]
        maximal = max(range(count), key=lambda c: (cost[c].item(), c))
        above[:, maximal] = True  # nothing above the threshold: the maximal configuration
        # cheapest first, then the higher probability, then the lower index: a key that sorts those three
        rank = torch.argsort(torch.argsort(-probability, dim=-1, stable=True), dim=-1)  # 0 = most probable
        key = (cost[None] * count + rank) * count + torch.arange(count, device=device)[None]
        key = torch.where(above, key, torch.iinfo(key.dtype).max)
        predicted = key.argmin(-1)
    score = cost[predicted] * count + predicted
    best = torch.full((batch_size,), -1, dtype=score.dtype, device=device)
    best = best.scatter_reduce(0, batch_index, score, reduce="amax", include_self=True)
    return torch.where(best >= 0, best % count, -1).tolist()  # one host sync per prefill


__all__ = ["ROUTER_TYPES", "check_threshold", "resolve_router_threshold", "select_configurations"]

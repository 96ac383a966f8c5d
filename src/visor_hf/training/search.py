"""Configuration search: which subsets of the SA layers are viable.

Candidates. SA layers at or before the router layer cannot be switched off (the router decides after them), so
they are in every candidate; the other SA layers ("free" layers, `F` of them) are searched:

- `exhaustive` (default when `F <= max_exhaustive`, 8 by default: 256 subsets): every subset of the free layers;
- `greedy` (default for larger `F`): backward elimination. Start from the maximal configuration; at each round
  evaluate every configuration that drops one more free layer from the current one, and keep the best of them
  (highest accuracy, then lowest loss, then the earlier layer dropped) as the next current configuration; stop
  when no free layer is left. `F (F + 1) / 2` evaluations; every evaluated subset is reported and can be viable;
- `sampled`: the maximal and the minimal configuration plus `num_samples` distinct random subsets (seeded), spread
  over the sizes (size uniform in 0..F-1, then a uniform subset of that size).

Viability (`metric`, `threshold`): with `"accuracy"`, a candidate is viable when its accuracy is at least
`(1 - threshold) x` the maximal configuration's accuracy (relative; default 0.01, i.e. >= 99 %); with `"loss"`,
when its loss is at most `(1 + threshold) x` the maximal configuration's loss. The maximal configuration is always
viable. Viable configurations are sorted by cost (SA-layer count, then layer indices) and written into the
checkpoint's `config.configurations`; the router's output layer is resized to match (it is trained afterwards).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import torch

from ..logging_utils import get_logger
from ..modeling.modeling_visor import VisorRouter
from .evaluation import _accelerator, score_dataset, summarize, write_jsonl

logger = get_logger(__name__)

STRATEGIES = ("auto", "exhaustive", "greedy", "sampled")
METRICS = ("accuracy", "loss")


def fixed_and_free_layers(config) -> tuple[list[int], list[int]]:
    """SA layers that every candidate keeps (at or before the router layer) and those the search may drop."""
    router = config.router_layer
    selfs = list(config.self_attention_layers)
    fixed = [i for i in selfs if router is not None and i <= router]
    return fixed, [i for i in selfs if i not in fixed]


def exhaustive_candidates(fixed: list[int], free: list[int]) -> list[list[int]]:
    """Every subset of `free`, plus `fixed`; from the largest to the smallest."""
    out = []
    for size in range(len(free), -1, -1):
        for subset in itertools.combinations(free, size):
            out.append(sorted(fixed + list(subset)))
    return out


def sampled_candidates(fixed: list[int], free: list[int], num_samples: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    chosen = {tuple(free), ()}
    limit = 2 ** len(free)
    attempts = 0
    while len(chosen) < min(num_samples + 2, limit) and attempts < 100 * (num_samples + 2):
        attempts += 1
        size = int(rng.integers(0, max(len(free), 1)))
        chosen.add(tuple(sorted(rng.choice(free, size=size, replace=False).tolist())))
    return [sorted(fixed + list(c)) for c in sorted(chosen, key=lambda c: (-len(c), c))]


def _better(a: dict, b: dict | None) -> bool:
    if b is None:
        return True
    return (a["accuracy"], -a["loss"]) > (b["accuracy"], -b["loss"])


def is_viable(candidate: dict, reference: dict, metric: str = "accuracy", threshold: float = 0.01) -> bool:
    """`candidate` and `reference` (the maximal configuration) are summaries with `accuracy` and `loss`."""
    if metric == "accuracy":
        return candidate["accuracy"] >= (1.0 - threshold) * reference["accuracy"] - 1e-12
    if metric == "loss":
        return candidate["loss"] <= (1.0 + threshold) * reference["loss"] + 1e-12
    raise ValueError(f"unknown metric {metric!r}: use one of {METRICS}")


def search_configurations(
    model,
    dataset,
    collator,
    *,
    strategy: str = "auto",
    metric: str = "accuracy",
    threshold: float = 0.01,
    max_exhaustive: int = 8,
    num_samples: int = 32,
    seed: int = 0,
    batch_size: int = 8,
    accelerator=None,
) -> dict:
    """Evaluate candidate configurations; returns `{"candidates": [...], "viable": [[layers]...], ...}`.

    Each candidate entry: `layers`, `num_layers`, the `summarize` fields (accuracy, loss, average FLOPs, ratios)
    and `viable`.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown search strategy {strategy!r}: use one of {STRATEGIES}")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: use one of {METRICS}")
    config = model.config
    fixed, free = fixed_and_free_layers(config)
    if strategy == "auto":
        strategy = "exhaustive" if len(free) <= max_exhaustive else "greedy"
    accelerator = _accelerator(accelerator)
    cache: dict[tuple, dict] = {}

    def run(layers: list[int]) -> dict:
        key = tuple(layers)
        if key not in cache:
            summary = summarize(score_dataset(model, dataset, collator, list(layers), batch_size, accelerator, progress=False))
            summary.pop("configuration_histogram", None)
            cache[key] = {"layers": list(layers), "num_layers": len(layers), **summary}
            logger.info("configuration %s: accuracy %.4f loss %.4f flops/max %.3f", list(layers), summary["accuracy"], summary["loss"], summary["flops_ratio_to_max"] or 0)
        return cache[key]

    maximal = sorted(fixed + free)
    reference = run(maximal)
    if strategy == "exhaustive":
        for layers in exhaustive_candidates(fixed, free):
            run(layers)
    elif strategy == "sampled":
        for layers in sampled_candidates(fixed, free, num_samples, seed):
            run(layers)
    else:  # greedy backward elimination
        current = list(free)
        while current:
            best, best_drop = None, None
            for drop in current:
                result = run(sorted(fixed + [i for i in current if i != drop]))
                if _better(result, best):
                    best, best_drop = result, drop
            current = [i for i in current if i != best_drop]
    candidates = sorted(cache.values(), key=lambda c: (c["num_layers"], c["layers"]))
    for candidate in candidates:
        candidate["viable"] = candidate["layers"] == maximal or is_viable(candidate, reference, metric, threshold)
    viable = [c["layers"] for c in candidates if c["viable"]]
    return {
        "strategy": strategy,
        "metric": metric,
        "threshold": threshold,
        "fixed_layers": fixed,
        "free_layers": free,
        "reference": reference,
        "candidates": candidates,
        "viable": viable,
    }


@torch.no_grad()
def set_configurations(model, configurations: list[list[int]]) -> None:
    """Replace `config.configurations` and resize the router's output layer (rows of configurations that survive
    keep their weights; new rows start at zero). `default_configuration` falls back to `"max"` if it no longer
    points at the same configuration."""
    config = model.config
    old = [list(c) for c in config.configurations]
    new = [sorted(int(i) for i in c) for c in configurations]
    if isinstance(config.default_configuration, int):
        previous = old[config.default_configuration] if config.default_configuration < len(old) else None
        config.default_configuration = new.index(previous) if previous in new else "max"
    config.configurations = new
    if config.router_layer is None and len(new) > 1 and config.routing_token_id is not None:
        from ..conversion.convert import default_router_layer

        config.router_layer = default_router_layer(config)  # None when layer 0 is switchable: no router possible
    config.validate_architecture()
    router = model.model.router
    if config.router_layer is None or len(new) < 2:
        model.model.router = None
        config.router_layer = None
    elif router is None:
        model.model.router = VisorRouter(config).to(device=model.device, dtype=model.dtype)
    else:
        fresh = VisorRouter(config).to(device=router.fc2.weight.device, dtype=router.fc2.weight.dtype)
        fresh.norm.load_state_dict(router.norm.state_dict())
        fresh.fc1.load_state_dict(router.fc1.state_dict())
        fresh.fc2.weight.zero_()
        fresh.fc2.bias.zero_()
        for row, layers in enumerate(new):
            if layers in old:
                fresh.fc2.weight[row] = router.fc2.weight[old.index(layers)]
                fresh.fc2.bias[row] = router.fc2.bias[old.index(layers)]
        model.model.router = fresh


def search(
    model_path,
    data,
    output_dir,
    *,
    strategy: str = "auto",
    metric: str = "accuracy",
    threshold: float = 0.01,
    max_exhaustive: int = 8,
    num_samples: int = 32,
    max_configurations: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    image_root=None,
    limit=None,
    dtype=None,
    attn_implementation=None,
) -> dict:
    """Search the configurations of a checkpoint on `data` and write `output_dir`: the checkpoint with the viable
    configurations in its config (router resized), `search_results.jsonl` (one line per candidate) and
    `search_summary.json`. `max_configurations` keeps at most that many viable configurations: the maximal one and
    the cheapest others, one per SA-layer count (the best by the metric), from the cheapest count up."""
    from .data import VisorDataCollator, load_processor, load_records
    from .stages import load_model, save_checkpoint

    model = load_model(model_path, dtype, attn_implementation)
    processor = load_processor(model_path)
    dataset = load_records(data, image_root, limit)
    accelerator = _accelerator()
    result = search_configurations(
        model, dataset, VisorDataCollator(processor), strategy=strategy, metric=metric, threshold=threshold,
        max_exhaustive=max_exhaustive, num_samples=num_samples, seed=seed, batch_size=batch_size, accelerator=accelerator,
    )
    viable = result["viable"]
    if max_configurations is not None and len(viable) > max_configurations:
        viable = thin_configurations(result["candidates"], max_configurations)
    result["written"] = viable
    if accelerator.is_main_process:
        set_configurations(model, viable)
        output_dir = Path(output_dir)
        save_checkpoint(model, processor, output_dir)
        write_jsonl(output_dir / "search_results.jsonl", result["candidates"])
        summary = {k: v for k, v in result.items() if k != "candidates"}
        (output_dir / "search_summary.json").write_text(json.dumps(summary, indent=2))
    accelerator.wait_for_everyone()
    return result


def thin_configurations(candidates: list[dict], limit: int) -> list[list[int]]:
    """At most `limit` viable configurations: the maximal one, then per SA-layer count (cheapest first) the best
    viable one (accuracy, then loss)."""
    viable = [c for c in candidates if c["viable"]]
    maximal = max(viable, key=lambda c: c["num_layers"])
    by_count: dict[int, dict] = {}
    for c in viable:
        if c is maximal:
            continue
        best = by_count.get(c["num_layers"])
        if best is None or _better(c, best):
            by_count[c["num_layers"]] = c
    chosen = [by_count[k]["layers"] for k in sorted(by_count)][: max(limit - 1, 0)]
    return sorted(chosen + [maximal["layers"]], key=lambda layers: (len(layers), layers))


__all__ = ["exhaustive_candidates", "fixed_and_free_layers", "is_viable", "sampled_candidates", "search", "search_configurations", "set_configurations", "thin_configurations"]

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

Viability (`metric`, `threshold`): with `"accuracy"`, a candidate keeps a set of samples when its accuracy on them
is at least `(1 - threshold) x` the maximal configuration's accuracy on them (relative; default 0.01, i.e. >= 99 %);
with `"loss"`, when its loss is at most `(1 + threshold) x` the maximal configuration's loss.

Rules (`rule`):

- `"group"` (default, the paper's "viable at least in certain cases"): the search records are cut into groups by a
  record field (`group_field`, default `"source"`: the dataset / task a record comes from; records without the field
  form one group `"(none)"`). A candidate is viable when it keeps at least one group; the union over the groups is
  then thinned by cost: a candidate is written when it is the cheapest viable candidate of some group (ties: higher
  accuracy on that group, then on the whole set, then lower loss). So each group's cheapest adequate configuration is
  offered to the router, and configurations that are neither cheap for a group nor the maximal one are dropped.
- `"pooled"`: a candidate is viable when it keeps the whole search set; every viable candidate is written.

The maximal configuration is always viable and written. `max_configurations` caps the written set (see `search`).
The written configurations are sorted by cost (SA-layer count, then layer indices) and become the checkpoint's
`config.configurations`; the router's output layer is resized to match (it is trained afterwards), and the router
layer moves to the layer before the first SA layer that a written configuration switches off.
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
RULES = ("group", "pooled")
NO_GROUP = "(none)"


def record_groups(dataset, field: str) -> list[str]:
    """The group of every record of `dataset`: its `field` as a string, `"(none)"` without it."""
    records = getattr(dataset, "records", dataset)
    if hasattr(records, "column_names"):  # a `datasets.Dataset`: read the column, do not decode the images
        if field not in records.column_names:
            return [NO_GROUP] * len(records)
        return [NO_GROUP if v is None else str(v) for v in records[field]]
    return [str(r[field]) if isinstance(r, dict) and r.get(field) is not None else NO_GROUP for r in records]


def group_summaries(results: list[dict], groups: list[str]) -> dict[str, dict]:
    """Accuracy, loss per answer token and sample count of per-sample `results` in each group."""
    by_group: dict[str, list[dict]] = {}
    for r in results:
        by_group.setdefault(groups[r["index"]], []).append(r)
    out = {}
    for name in sorted(by_group):
        rows = by_group[name]
        tokens = sum(r["answer_tokens"] for r in rows)
        out[name] = {"samples": len(rows), "accuracy": sum(r["correct"] for r in rows) / len(rows),
                     "loss": sum(r["loss"] * r["answer_tokens"] for r in rows) / max(tokens, 1)}
    return out


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
    rule: str = "group",
    group_field: str = "source",
    groups: list[str] | None = None,
    max_exhaustive: int = 8,
    num_samples: int = 32,
    seed: int = 0,
    batch_size: int = 8,
    accelerator=None,
) -> dict:
    """Evaluate candidate configurations; returns `{"candidates": [...], "viable": [[layers]...], "kept": ...}`.

    Each candidate entry: `layers`, `num_layers`, the `summarize` fields (accuracy, loss, average FLOPs, ratios),
    `groups` (accuracy, loss, samples per group), `viable_groups` and `viable`. `kept`: the viable candidates after
    the rule's thinning (`"group"`: each group's cheapest; `"pooled"`: all). `groups`: the group of every record
    (default: `record_groups(dataset, group_field)`).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown search strategy {strategy!r}: use one of {STRATEGIES}")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}: use one of {METRICS}")
    if rule not in RULES:
        raise ValueError(f"unknown search rule {rule!r}: use one of {RULES}")
    config = model.config
    fixed, free = fixed_and_free_layers(config)
    if strategy == "auto":
        strategy = "exhaustive" if len(free) <= max_exhaustive else "greedy"
    accelerator = _accelerator(accelerator)
    cache: dict[tuple, dict] = {}
    if groups is None:
        groups = record_groups(dataset, group_field) if dataset is not None else None

    def run(layers: list[int]) -> dict:
        key = tuple(layers)
        if key not in cache:
            results = score_dataset(model, dataset, collator, list(layers), batch_size, accelerator, progress=False)
            summary = summarize(results)
            summary.pop("configuration_histogram", None)
            per_group = group_summaries(results, groups if groups is not None else [NO_GROUP] * (1 + max(r["index"] for r in results)))
            cache[key] = {"layers": list(layers), "num_layers": len(layers), **summary, "groups": per_group}
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
        candidate["viable_groups"] = [g for g, score in candidate["groups"].items()
                                      if is_viable(score, reference["groups"][g], metric, threshold)]
        keeps = bool(candidate["viable_groups"]) if rule == "group" else is_viable(candidate, reference, metric, threshold)
        candidate["viable"] = candidate["layers"] == maximal or keeps
    viable = [c["layers"] for c in candidates if c["viable"]]
    kept = cheapest_per_group(candidates, maximal) if rule == "group" else viable
    return {
        "strategy": strategy,
        "metric": metric,
        "threshold": threshold,
        "rule": rule,
        "group_field": group_field,
        "fixed_layers": fixed,
        "free_layers": free,
        "reference": reference,
        "candidates": candidates,
        "viable": viable,
        "kept": kept,
        "cheapest_per_group": _group_picks(candidates),
    }


def _group_picks(candidates: list[dict]) -> dict[str, list[int]]:
    """Each group's cheapest candidate among those viable on it (ties: higher accuracy on the group, then on the
    whole set, then lower loss, then the layer list)."""
    picks = {}
    for group in sorted({g for c in candidates for g in c.get("viable_groups", [])}):
        viable = [c for c in candidates if group in c["viable_groups"]]
        best = min(viable, key=lambda c: (c.get("average_flops", c["num_layers"]), c["num_layers"], -c["groups"][group]["accuracy"],
                                          -c["accuracy"], c["loss"], c["layers"]))
        picks[group] = best["layers"]
    return picks


def cheapest_per_group(candidates: list[dict], maximal: list[int]) -> list[list[int]]:
    """Thinning by cost of the per-group rule: the maximal configuration plus each group's cheapest viable one."""
    kept = {tuple(maximal)} | {tuple(layers) for layers in _group_picks(candidates).values()}
    return sorted((list(k) for k in kept), key=lambda layers: (len(layers), layers))


@torch.no_grad()
def set_configurations(model, configurations: list[list[int]], recompute_router_layer: bool = False) -> None:
    """Replace `config.configurations` and resize the router's output layer (rows of configurations that survive
    keep their weights; new rows start at zero). `default_configuration` falls back to `"max"` if it no longer
    points at the same configuration. `recompute_router_layer`: move the router to the layer before the first SA
    layer that a configuration switches off (`convert.default_router_layer`), the latest point where it can decide;
    otherwise the router layer is only set when there was none."""
    config = model.config
    old = [list(c) for c in config.configurations]
    new = [sorted(int(i) for i in c) for c in configurations]
    if isinstance(config.default_configuration, int):
        previous = old[config.default_configuration] if config.default_configuration < len(old) else None
        config.default_configuration = new.index(previous) if previous in new else "max"
    config.configurations = new
    if (recompute_router_layer or config.router_layer is None) and len(new) > 1 and config.routing_token_id is not None:
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
    rule: str = "group",
    group_field: str = "source",
    max_exhaustive: int = 8,
    num_samples: int = 32,
    max_configurations: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    image_root=None,
    limit=None,
    dtype=None,
    attn_implementation=None,
    packing: int = 1,
) -> dict:
    """Search the configurations of a checkpoint on `data` and write `output_dir`: the checkpoint with the kept
    configurations in its config (router resized, router layer recomputed), `search_results.jsonl` (one line per
    candidate, with its accuracy per group) and `search_summary.json`. `rule`, `group_field`: see the module
    documentation. `max_configurations` keeps at most that many: the maximal one and the cheapest others, one per
    SA-layer count (the best by the metric), from the cheapest count up. `packing`: the images' token packing factor
    the configurations are judged at (the maximal configuration at the same factor is the reference)."""
    from .data import VisorDataCollator, load_processor, load_records
    from .stages import load_model, save_checkpoint

    model = load_model(model_path, dtype, attn_implementation)
    processor = load_processor(model_path)
    dataset = load_records(data, image_root, limit)
    accelerator = _accelerator()
    result = search_configurations(
        model, dataset, VisorDataCollator(processor, packing=packing), strategy=strategy, metric=metric, threshold=threshold, rule=rule,
        group_field=group_field, max_exhaustive=max_exhaustive, num_samples=num_samples, seed=seed, batch_size=batch_size, accelerator=accelerator,
    )
    kept = result["kept"]
    if max_configurations is not None and len(kept) > max_configurations:
        kept = thin_configurations([c for c in result["candidates"] if c["layers"] in kept], max_configurations)
    result["written"] = kept
    result["packing"] = packing
    if accelerator.is_main_process:
        set_configurations(model, kept, recompute_router_layer=True)
        result["router_layer"] = model.config.router_layer
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


__all__ = [
    "cheapest_per_group", "exhaustive_candidates", "fixed_and_free_layers", "group_summaries", "is_viable", "record_groups",
    "sampled_candidates", "search", "search_configurations", "set_configurations", "thin_configurations",
]

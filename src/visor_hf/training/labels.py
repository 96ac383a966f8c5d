"""Pseudo-labels for the router: run every configuration on a training subset and pick one per sample.

The table (`pseudo_label_table.jsonl`, one line per sample and configuration) holds `index`, `configuration`,
`layers`, `num_layers`, `correct`, `loss` and `flops` (see `evaluation.py` for their definitions).

The rule ([`assign_labels`], a pure function of the table), per sample, as the issue and the paper state it: the
label is **the cheapest configuration that keeps at least `keep` (99 %) of the maximal configuration's accuracy on
that sample; ties: fewer SA layers, then lower loss**.

- A sample's accuracy under a configuration is its `score` when the table has one (a graded metric in [0, 1]), else
  `correct` (0 or 1). A configuration *keeps* the accuracy when `score >= keep x score of the maximal configuration`.
  With exact-match correctness this reads: when the maximal configuration answers the sample, the label is the
  cheapest configuration that answers it too; when it does not, every configuration keeps its (zero) accuracy and
  the label is the cheapest configuration overall (spending compute buys nothing on that sample).
- Cost order: the sample's prompt FLOPs (`flops`; without that column, the SA-layer count), then fewer SA layers,
  then lower loss on the sample, then the configuration index.

Every sample keeps at least `keep` of its maximal-configuration accuracy, so the labelled set keeps at least `keep`
of the maximal configuration's accuracy on the subset (with exact match: at least all of it).

`spend_slack=True` (opt-in, not the paper's rule) adds a set-level step: while the labelled set's accuracy stays
`>= keep x` the maximal configuration's, the sample with the largest FLOPs saving (ties: higher loss under its label,
then lower index) moves to its cheapest configuration.

`groups` (a group name per sample) switches to **group-level labels**: a configuration keeps a sample when its
accuracy on the sample's whole group is `>= keep x` the maximal configuration's accuracy on that group; every sample
of a group gets the group's cheapest such configuration. One sample's 0/1 correctness under a cheap configuration is
partly luck (a one-word answer can be right by chance); a group's accuracy is not.

Targets of the calibrated router ([`keep_targets`]): for every sample and configuration, 1 when the configuration
keeps the sample (the per-sample test above), else 0. Trained with binary cross-entropy, the router's output `c`
estimates the probability that configuration `c` keeps the maximal configuration's answer on questions like this
one: the luck of single samples averages out instead of being learned as a class.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from pathlib import Path

from .evaluation import _accelerator, read_jsonl, score_dataset, write_jsonl

TOLERANCE = 1e-9


def _num_layers(row: dict) -> int:
    return int(row["num_layers"]) if "num_layers" in row else len(row["layers"])


def _score(row: dict) -> float:
    """A sample's accuracy under one configuration: `score` (graded) if present, else `correct` (0 / 1)."""
    value = row["score"] if row.get("score") is not None else row["correct"]
    return float(value)


def _cost_key(row: dict):
    layers = _num_layers(row)
    return (row["flops"] if row.get("flops") is not None else layers, layers, float(row["loss"]), int(row["configuration"]))


def _by_sample(table: list[dict], max_configuration: int | None) -> tuple[dict[int, dict[int, dict]], int]:
    """`{sample: {configuration: row}}` (every sample with every configuration) and the maximal configuration."""
    by_sample: dict[int, dict[int, dict]] = defaultdict(dict)
    for row in table:
        index, configuration = int(row["index"]), int(row["configuration"])
        if configuration in by_sample[index]:
            raise ValueError(f"sample {index} has two rows for configuration {configuration}")
        by_sample[index][configuration] = row
    if not by_sample:
        return {}, max_configuration
    configurations = sorted({c for rows in by_sample.values() for c in rows})
    for index, rows in by_sample.items():
        if sorted(rows) != configurations:
            raise ValueError(f"sample {index} lacks a row for configurations {sorted(set(configurations) - set(rows))}")
    if max_configuration is None:
        some = next(iter(by_sample.values()))
        max_configuration = max(configurations, key=lambda c: (_num_layers(some[c]), c))
    elif max_configuration not in configurations:
        raise ValueError(f"max_configuration {max_configuration} is not in the table (configurations {configurations})")
    return by_sample, max_configuration


def keep_targets(table: list[dict], keep: float = 0.99, max_configuration: int | None = None,
                 groups: dict[int, str] | None = None) -> dict[int, list[float]]:
    """`{sample index: [target per configuration]}`, the calibrated router's targets.

    Per sample (`groups` None): 1.0 when the configuration keeps `>= keep` of the maximal configuration's accuracy on
    the sample, else 0.0. Per group (`groups`: `{sample index: group}`): the fraction of the maximal configuration's
    accuracy that the configuration keeps on the sample's group, `min(1, accuracy_c / accuracy_max)` (1 when the
    maximal configuration answers nothing of the group); every sample of a group gets the same soft targets, and a
    router threshold `t` then reads "keep at least `t` of the maximal configuration's accuracy on this kind of
    question"."""
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must be in [0, 1], got {keep}")
    by_sample, max_configuration = _by_sample(table, max_configuration)
    if groups is not None:
        targets = {}
        for indices in _group_members(by_sample, groups).values():
            configurations = sorted(by_sample[indices[0]])
            total = {c: sum(_score(by_sample[i][c]) for i in indices) for c in configurations}
            ratio = [1.0 if total[max_configuration] <= 0 else min(1.0, total[c] / total[max_configuration]) for c in configurations]
            targets.update(dict.fromkeys(indices, ratio))
        return targets
    targets = {}
    for index, rows in by_sample.items():
        bar = keep * _score(rows[max_configuration]) - TOLERANCE
        targets[index] = [float(_score(rows[c]) >= bar) for c in sorted(rows)]
    return targets


def assign_labels(table: list[dict], keep: float = 0.99, max_configuration: int | None = None, spend_slack: bool = False,
                  groups: dict[int, str] | None = None) -> tuple[dict[int, int], dict]:
    """Labels `{sample index: configuration index}` and a report, from table rows (`index`, `configuration`,
    `num_layers` or `layers`, `correct` or `score`, `loss`, optionally `flops`). `max_configuration`: the index of
    the maximal configuration (default: the one with the most SA layers; ties: the highest index). Every sample must
    have a row for every configuration. `groups` (`{sample index: group}`): group-level labels. See the module
    documentation for the rules."""
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must be in [0, 1], got {keep}")
    by_sample, max_configuration = _by_sample(table, max_configuration)
    if not by_sample:
        return {}, {"samples": 0}

    labels, cheapest = {}, {}
    group_label = _group_labels(by_sample, groups, keep, max_configuration) if groups is not None else None
    for index, rows in by_sample.items():
        bar = keep * _score(rows[max_configuration]) - TOLERANCE
        ranked = sorted(rows.values(), key=_cost_key)
        cheapest[index] = int(ranked[0]["configuration"])
        if group_label is not None:
            labels[index] = group_label[groups[index]]
        else:
            labels[index] = int(next(r for r in ranked if _score(r) >= bar)["configuration"])

    def total(assignment) -> float:
        return sum(_score(by_sample[i][assignment[i]]) for i in assignment)

    max_total = sum(_score(rows[max_configuration]) for rows in by_sample.values())
    strict_total = total(labels)
    label_total = strict_total
    moved = []
    if spend_slack:
        moves = []
        for index, label in labels.items():
            if label != cheapest[index]:
                chosen, low = by_sample[index][label], by_sample[index][cheapest[index]]
                saving = _cost_key(chosen)[0] - _cost_key(low)[0]
                moves.append((-saving, -float(chosen["loss"]), index))
        for _saving, _loss, index in sorted(moves):
            loss_of_score = _score(by_sample[index][labels[index]]) - _score(by_sample[index][cheapest[index]])
            if label_total - loss_of_score >= keep * max_total - TOLERANCE:
                labels[index] = cheapest[index]
                label_total -= loss_of_score
                moved.append(index)

    n = len(labels)

    def average_flops(assignment) -> float | None:
        values = [by_sample[i][assignment[i]].get("flops") for i in assignment]
        return None if any(v is None for v in values) else sum(values) / n

    flops_label = average_flops(labels)
    flops_max = average_flops(dict.fromkeys(labels, max_configuration))
    report = {
        "samples": n,
        "keep": keep,
        "rule": ("per-group" if groups is not None else "per-sample") + (" + spend_slack" if spend_slack else ""),
        "max_configuration": max_configuration,
        "max_accuracy": max_total / n,
        "per_sample_label_accuracy": strict_total / n,
        "label_accuracy": label_total / n,
        "moved_to_cheapest": sorted(moved),
        "average_flops_labels": flops_label,
        "average_flops_max": flops_max,
        "flops_ratio_to_max": flops_label / flops_max if flops_label is not None and flops_max else None,
        "label_histogram": {str(k): v for k, v in sorted(Counter(labels.values()).items())},
    }
    return labels, report


def _group_members(by_sample, groups: dict[int, str]) -> dict[str, list[int]]:
    """`{group: [sample index, ...]}`; every sample of the table must have a group."""
    missing = sorted(set(by_sample) - set(groups))
    if missing:
        raise ValueError(f"samples {missing[:5]} have no group")
    members: dict[str, list[int]] = defaultdict(list)
    for index in by_sample:
        members[groups[index]].append(index)
    return members


def _group_labels(by_sample, groups: dict[int, str], keep: float, max_configuration: int) -> dict[str, int]:
    """Each group's cheapest configuration (mean cost over the group's samples, then fewer layers, then lower mean
    loss, then index) whose accuracy on the group is `>= keep x` the maximal configuration's."""
    out = {}
    for group, indices in _group_members(by_sample, groups).items():
        configurations = sorted(by_sample[indices[0]])

        def mean(c, field, indices=indices):
            return sum(float(by_sample[i][c][field] if field != "score" else _score(by_sample[i][c])) for i in indices) / len(indices)

        bar = keep * mean(max_configuration, "score") - TOLERANCE
        keeping = [c for c in configurations if mean(c, "score") >= bar]
        has_flops = all(by_sample[i][c].get("flops") is not None for i in indices for c in configurations)
        out[group] = min(keeping, key=lambda c: (mean(c, "flops") if has_flops else 0, _num_layers(by_sample[indices[0]][c]),
                                                 mean(c, "loss"), c))
    return out


def build_table(model, dataset, collator, batch_size: int = 8, accelerator=None) -> list[dict]:
    """Run every configuration of `model.config.configurations` on `dataset`: one row per sample and configuration."""
    accelerator = _accelerator(accelerator)
    table = []
    for index, layers in enumerate(model.config.configurations):
        for result in score_dataset(model, dataset, collator, index, batch_size, accelerator):
            table.append({
                "index": result["index"],
                "configuration": index,
                "layers": list(layers),
                "num_layers": len(layers),
                "correct": result["correct"],
                "loss": result["loss"],
                "flops": result["flops"],
                "flops_dense": result["flops_dense"],
                "answer_tokens": result["answer_tokens"],
            })
    return table


def pseudo_label(
    model_path,
    data,
    output_dir,
    *,
    keep: float = 0.99,
    spend_slack: bool = False,
    group_field: str | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    image_root=None,
    dtype=None,
    attn_implementation=None,
    packing: int = 1,
) -> dict:
    """Write `pseudo_label_table.jsonl` (every configuration on the first `limit` records of `data`),
    `pseudo_labels.jsonl` (`index`, `label`, `layers` and the calibrated router's `targets` per sample) and
    `pseudo_label_summary.json`; returns the summary. `keep`, `spend_slack`: see [`assign_labels`]; `group_field`:
    group-level labels with the records' groups by that field (`search.record_groups`). `packing`: the images' token
    packing factor the labels are for (a router trained on them routes packed prompts)."""
    from .data import VisorDataCollator, load_processor, load_records
    from .stages import load_model

    model = load_model(model_path, dtype, attn_implementation)
    if len(model.config.configurations) < 2:
        raise ValueError("the checkpoint has a single configuration: run `visor-hf search` first")
    processor = load_processor(model_path)
    dataset = load_records(data, image_root, limit)
    accelerator = _accelerator()
    table = build_table(model, dataset, VisorDataCollator(processor, packing=packing), batch_size, accelerator)
    max_index = max(range(len(model.config.configurations)), key=lambda c: (len(model.config.configurations[c]), c))
    groups = None
    if group_field is not None:
        from .search import record_groups

        groups = dict(enumerate(record_groups(dataset, group_field)))
    labels, report = assign_labels(table, keep, max_index, spend_slack=spend_slack, groups=groups)
    targets = keep_targets(table, keep, max_index, groups=groups)
    report["group_field"] = group_field
    report["target_means"] = [sum(t[c] for t in targets.values()) / len(targets) for c in range(len(model.config.configurations))]
    report["checkpoint"] = str(model_path)
    report["packing"] = packing
    report["configurations"] = model.config.configurations
    if accelerator.is_main_process:
        output_dir = Path(output_dir)
        write_jsonl(output_dir / "pseudo_label_table.jsonl", table)
        configurations = model.config.configurations
        write_jsonl(output_dir / "pseudo_labels.jsonl", [{"index": i, "label": c, "layers": configurations[c], "targets": targets[i]}
                                                          for i, c in sorted(labels.items())])
        (output_dir / "pseudo_label_summary.json").write_text(json.dumps(report, indent=2))
    accelerator.wait_for_everyone()
    return report


def read_labels(path) -> dict[int, int]:
    """`{sample index: configuration index}` from a `pseudo_labels.jsonl` file (or a folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "pseudo_labels.jsonl"
    return {int(r["index"]): int(r["label"]) for r in read_jsonl(path)}


def read_targets(path) -> dict[int, list[float]]:
    """`{sample index: [target per configuration]}` (the calibrated router's) from a `pseudo_labels.jsonl` file or
    its folder."""
    path = Path(path)
    if path.is_dir():
        path = path / "pseudo_labels.jsonl"
    rows = read_jsonl(path)
    if any("targets" not in r for r in rows):
        raise ValueError(f"{path} has no per-configuration `targets` (written by `visor-hf label` of this version)")
    return {int(r["index"]): [float(t) for t in r["targets"]] for r in rows}


__all__ = ["assign_labels", "build_table", "keep_targets", "pseudo_label", "read_labels", "read_targets"]

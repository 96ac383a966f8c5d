"""Pseudo-labels for the router: run every configuration on a training subset and pick one per sample.

The table (`pseudo_label_table.jsonl`, one line per sample and configuration) holds `index`, `configuration`,
`layers`, `num_layers`, `correct`, `loss` and `flops` (see `evaluation.py` for their definitions).

The rule ([`assign_labels`], a pure function of the table). "Keep >= 99 % of the maximal configuration's accuracy"
is a property of a *set*; a label is chosen per sample in two steps:

1. **Per sample.** Order the configurations by cost: FLOPs of the sample's prompt, then fewer SA layers, then lower
   loss on the sample, then the index. The label is the first (cheapest) configuration that answers the sample
   correctly; when none does, the first one overall (spending compute buys nothing on that sample). Every sample
   that the maximal configuration answers correctly gets a configuration that also answers it, so the labelled
   set is at least as accurate as the maximal configuration.
2. **On the set.** Let `A_max` be the number of samples the maximal configuration answers correctly and
   `A_label` the number the labels answer correctly. The criterion is `A_label >= keep x A_max` (`keep = 0.99`).
   While it holds with room to spare, the sample with the largest FLOPs saving (its label's FLOPs minus the
   cheapest configuration's; ties: higher loss under its label, then lower index) is moved to its cheapest
   configuration, which answers it wrongly (every cheaper one does, by step 1), as long as the criterion still
   holds afterwards. Step 2 spends only the room that the criterion leaves: none when the per-sample labels are
   exactly as accurate as the maximal configuration and `keep = 1`; `spend_slack=False` skips it.

Hence the labels are the cheapest per-sample assignment, greedily by FLOPs saved, whose accuracy on the subset is at
least 99 % of the maximal configuration's.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path

from .evaluation import _accelerator, read_jsonl, score_dataset, write_jsonl


def _cost_key(row: dict):
    return (row["flops"], row["num_layers"], row["loss"], row["configuration"])


def assign_labels(table: list[dict], keep: float = 0.99, max_configuration: int | None = None, spend_slack: bool = True) -> tuple[dict[int, int], dict]:
    """Labels `{sample index: configuration index}` and a report, from table rows (`index`, `configuration`,
    `num_layers`, `correct`, `loss`, `flops`). `max_configuration`: the index of the maximal configuration
    (default: the one with the most SA layers; ties: the highest index). Every sample must have a row for every
    configuration."""
    if not 0.0 <= keep <= 1.0:
        raise ValueError(f"keep must be in [0, 1], got {keep}")
    by_sample: dict[int, dict[int, dict]] = defaultdict(dict)
    for row in table:
        by_sample[int(row["index"])][int(row["configuration"])] = row
    if not by_sample:
        return {}, {"samples": 0}
    configurations = sorted({c for rows in by_sample.values() for c in rows})
    for index, rows in by_sample.items():
        if sorted(rows) != configurations:
            raise ValueError(f"sample {index} lacks a row for configurations {sorted(set(configurations) - set(rows))}")
    if max_configuration is None:
        some = next(iter(by_sample.values()))
        max_configuration = max(configurations, key=lambda c: (some[c]["num_layers"], c))

    labels, order = {}, {}
    for index, rows in by_sample.items():
        ranked = sorted(rows.values(), key=_cost_key)
        order[index] = ranked
        correct = [r for r in ranked if r["correct"]]
        labels[index] = int((correct[0] if correct else ranked[0])["configuration"])

    max_correct = sum(bool(rows[max_configuration]["correct"]) for rows in by_sample.values())
    required = math.ceil(keep * max_correct - 1e-9)
    label_correct = sum(bool(by_sample[i][labels[i]]["correct"]) for i in labels)
    strict_correct = label_correct
    moves = []
    for index in labels:
        cheapest = order[index][0]
        chosen = by_sample[index][labels[index]]
        if chosen["correct"] and int(cheapest["configuration"]) != labels[index]:
            moves.append((chosen["flops"] - cheapest["flops"], chosen["loss"], -index, index))
    moves.sort(reverse=True)
    moved = []
    for _saving, _loss, _neg, index in moves:
        if not spend_slack or label_correct - 1 < required:
            break
        labels[index] = int(order[index][0]["configuration"])
        label_correct -= 1
        moved.append(index)

    n = len(labels)
    flops_label = sum(by_sample[i][labels[i]]["flops"] for i in labels) / n
    flops_max = sum(by_sample[i][max_configuration]["flops"] for i in labels) / n
    report = {
        "samples": n,
        "keep": keep,
        "max_configuration": max_configuration,
        "max_accuracy": max_correct / n,
        "per_sample_label_accuracy": strict_correct / n,
        "label_accuracy": label_correct / n,
        "moved_to_cheapest": sorted(moved),
        "average_flops_labels": flops_label,
        "average_flops_max": flops_max,
        "flops_ratio_to_max": flops_label / flops_max if flops_max else None,
        "label_histogram": {str(k): v for k, v in sorted(Counter(labels.values()).items())},
    }
    return labels, report


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
                "answer_tokens": result["answer_tokens"],
            })
    return table


def pseudo_label(
    model_path,
    data,
    output_dir,
    *,
    keep: float = 0.99,
    limit: int | None = None,
    batch_size: int = 8,
    image_root=None,
    dtype=None,
    attn_implementation=None,
) -> dict:
    """Write `pseudo_label_table.jsonl` (every configuration on the first `limit` records of `data`),
    `pseudo_labels.jsonl` (`index`, `label`, `layers` per sample) and `pseudo_label_summary.json`; returns the
    summary."""
    from .data import VisorDataCollator, load_processor, load_records
    from .stages import load_model

    model = load_model(model_path, dtype, attn_implementation)
    if len(model.config.configurations) < 2:
        raise ValueError("the checkpoint has a single configuration: run `visor-hf search` first")
    processor = load_processor(model_path)
    dataset = load_records(data, image_root, limit)
    accelerator = _accelerator()
    table = build_table(model, dataset, VisorDataCollator(processor), batch_size, accelerator)
    max_index = max(range(len(model.config.configurations)), key=lambda c: (len(model.config.configurations[c]), c))
    labels, report = assign_labels(table, keep, max_index)
    report["checkpoint"] = str(model_path)
    report["configurations"] = model.config.configurations
    if accelerator.is_main_process:
        output_dir = Path(output_dir)
        write_jsonl(output_dir / "pseudo_label_table.jsonl", table)
        configurations = model.config.configurations
        write_jsonl(output_dir / "pseudo_labels.jsonl", [{"index": i, "label": c, "layers": configurations[c]} for i, c in sorted(labels.items())])
        (output_dir / "pseudo_label_summary.json").write_text(json.dumps(report, indent=2))
    accelerator.wait_for_everyone()
    return report


def read_labels(path) -> dict[int, int]:
    """`{sample index: configuration index}` from a `pseudo_labels.jsonl` file (or a folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "pseudo_labels.jsonl"
    return {int(r["index"]): int(r["label"]) for r in read_jsonl(path)}


__all__ = ["assign_labels", "build_table", "pseudo_label", "read_labels"]

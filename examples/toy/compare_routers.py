"""Compare router heads and label rules on one VISOR checkpoint (the measurements behind the toy's defaults):

    HF_HUB_OFFLINE=1 python examples/toy/compare_routers.py --model RUN/stages/universal \\
        --table RUN/stages/labels/pseudo_label_table.jsonl --train-data RUN/data/labels/data.jsonl \\
        --test-data RUN/data/test/data.jsonl [--steps 200,2000]

(RUN: the `--out` of `train_toy.py`.) Label rules, from the pipeline (`visor_hf.training.labels`), all on the same
table of every configuration on the labelling records:

- `argmax, per-sample labels`: the paper's router on the paper's rule (cheapest configuration keeping the sample);
- `argmax, group labels`: the same head on each question kind's cheapest configuration keeping 99 % of max's
  accuracy on the kind (`assign_labels(groups=...)`);
- `calibrated, per-sample targets`: binary cross-entropy on "does this configuration keep the sample";
- `calibrated, group targets`: on the share of max's accuracy each configuration keeps on the sample's kind.

Each router is trained exactly as `train_router` trains it (`RouterOnFeatures` on the router inputs computed once,
HF `Trainer`, lr 3e-3, batch 64, cosine), for each `--steps`; its choices on the test records (at several
thresholds for a calibrated head) are looked up in the table of every configuration on the test records (exact: the
router's input does not depend on the configuration). Prints one line per router and threshold: accuracy overall,
easy, hard, cell lookup, and LLM prefill FLOPs over dense.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile

import torch
from transformers import Trainer

from visor_hf.modeling.routing_visor import select_configurations
from visor_hf.training import (
    VisorDataCollator,
    assign_labels,
    build_table,
    keep_targets,
    load_model,
    load_processor,
    load_records,
    record_groups,
)
from visor_hf.training.evaluation import read_jsonl
from visor_hf.training.router import RouterOnFeatures, RoutingFeatures, routing_features
from visor_hf.training.stages import make_training_arguments

EASY = ("background", "red")


def accuracy_line(choice: dict[int, int], table: dict, kinds: list[str]) -> str:
    rows = [table[(i, c)] for i, c in sorted(choice.items())]

    def acc(selected):
        return sum(r["correct"] for r in selected) / max(len(selected), 1)

    easy = [r for r in rows if kinds[r["index"]] in EASY]
    hard = [r for r in rows if kinds[r["index"]] not in EASY]
    cell = [r for r in rows if kinds[r["index"]] == "cell"]
    ratio = sum(r["flops"] for r in rows) / sum(r["flops_dense"] for r in rows)
    return f"all {acc(rows):.3f}  easy {acc(easy):.3f}  hard {acc(hard):.3f}  cell {acc(cell):.3f}  FLOPs/dense {ratio:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="the checkpoint whose router is trained (after universal fine-tuning)")
    parser.add_argument("--table", required=True, help="pseudo_label_table.jsonl of the labelling records")
    parser.add_argument("--train-data", required=True, help="the labelling records (with `source`)")
    parser.add_argument("--test-data", required=True, help="held-out records (with `source`)")
    parser.add_argument("--steps", default="200,2000")
    parser.add_argument("--thresholds", default="0.8,0.9,0.95,0.97,0.98,0.99")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    model = load_model(args.model, attn_implementation="sdpa").eval()
    config = model.config
    collator = VisorDataCollator(load_processor(args.model))
    train_records, test_records = load_records(args.train_data), load_records(args.test_data)
    table = read_jsonl(args.table)
    maximal = max(range(len(config.configurations)), key=lambda c: (len(config.configurations[c]), c))
    groups = dict(enumerate(record_groups(train_records, "source")))
    per_sample, _ = assign_labels(table, 0.99, maximal)
    per_group, _ = assign_labels(table, 0.99, maximal, groups=groups)
    variants = {
        "argmax, per-sample labels": per_sample,
        "argmax, group labels": per_group,
        "calibrated, per-sample targets": keep_targets(table, 0.99, maximal),
        "calibrated, group targets": keep_targets(table, 0.99, maximal, groups=groups),
    }
    test_table = {(r["index"], r["configuration"]): r for r in build_table(model, test_records, collator, batch_size=50)}
    kinds = record_groups(test_records, "source")
    for layers in config.configurations:
        c = config.configurations.index(layers)
        print(f"{'fixed ' + str(layers):44s} {accuracy_line(dict.fromkeys(range(len(test_records)), c), test_table, kinds)}", flush=True)
    train_features, train_samples = routing_features(model, train_records, collator, batch_size=50)
    test_features, test_samples = routing_features(model, test_records, collator, batch_size=50)
    thresholds = [float(t) for t in args.thresholds.split(",")]
    for name, labels in variants.items():
        calibrated = name.startswith("calibrated")
        for steps in (int(s) for s in args.steps.split(",")):
            router = copy.deepcopy(model.model.router).train()
            with tempfile.TemporaryDirectory() as scratch:
                training_args = make_training_arguments(scratch, {
                    "max_steps": steps, "learning_rate": 3e-3, "per_device_train_batch_size": 64, "warmup_steps": 10,
                    "lr_scheduler_type": "cosine", "weight_decay": 0.0, "adam_beta2": 0.98, "save_strategy": "no",
                    "use_cpu": True, "disable_tqdm": True, "logging_steps": steps, "seed": args.seed, "data_seed": args.seed})
                Trainer(model=RouterOnFeatures(router), args=training_args,
                        train_dataset=RoutingFeatures(train_features, train_samples, labels)).train()
            with torch.no_grad():
                logits = router.eval()(test_features)
            for t in thresholds if calibrated else [None]:
                chosen = select_configurations(logits, test_samples, len(test_records), config.configurations,
                                               None if t is None else [t] * len(test_records))
                label = f"{name}, {steps} steps" + (f", t={t:g}" if t is not None else "")
                print(f"{label:44s} {accuracy_line(dict(enumerate(chosen)), test_table, kinds)}", flush=True)


if __name__ == "__main__":
    main()

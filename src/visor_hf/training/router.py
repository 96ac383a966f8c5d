"""Router training: cross-entropy on the pseudo-labels, everything but the router frozen (HF `Trainer`).

Every routing token of a sample is a training example with the sample's label. The forward runs the cheapest
configuration with `logits_to_keep=1`: the router reads the routing token at the output of `config.router_layer`,
which comes before every switchable SA layer, so its input does not depend on the configuration that runs after it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.nn import functional as F
from transformers import Trainer

from ..logging_utils import get_logger
from .data import VisorDataCollator, load_processor, load_records, model_inputs
from .evaluation import _accelerator, score_dataset, summarize
from .labels import read_labels
from .resume import CompleteCheckpointMixin
from .sharding import ShardedStep
from .stages import load_model, make_training_arguments, save_trained, set_trainable

logger = get_logger(__name__)


class LabelledRecords(torch.utils.data.Dataset):
    """The records of `dataset` that have a label, each with its `route_label`."""

    def __init__(self, dataset, labels: dict[int, int]):
        self.dataset = dataset
        self.indices = [i for i in range(len(dataset)) if i in labels]
        self.labels = labels
        if not self.indices:
            raise ValueError("no record of the dataset has a pseudo-label (do the label file and the data match?)")

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> dict:
        record = self.dataset[self.indices[position]]
        record["route_label"] = self.labels[self.indices[position]]
        return record


class RouterCollator:
    """The VISOR collator plus `route_labels`; the LM `labels` are dropped (the router loss does not use them)."""

    def __init__(self, collator: VisorDataCollator):
        self.collator = collator

    def __call__(self, records):
        batch = self.collator(records)
        batch.pop("labels", None)
        batch["route_labels"] = torch.tensor([r["route_label"] for r in records], dtype=torch.long)
        return batch


class RouterTrainer(CompleteCheckpointMixin, Trainer):
    """`Trainer` whose loss is the router's cross-entropy against `route_labels`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # the loss is a mean: let the Trainer scale it for accumulation
        self.sharded_step = ShardedStep(self)  # sharded model: every rank runs the visual path (see `sharding`)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        targets = inputs["route_labels"]
        config = self.accelerator.unwrap_model(model).config
        cheapest = min(range(len(config.configurations)), key=lambda c: (len(config.configurations[c]), c))
        outputs = model(**self.sharded_step(model, model_inputs(inputs, keep_labels=False)), visor_configuration=cheapest, output_router_logits=True, logits_to_keep=1, use_cache=False)
        logits = outputs.router_logits
        if logits is None or logits.shape[0] == 0:
            raise ValueError("no routing token in the batch: the data must be built by a processor that adds the routing token")
        loss = F.cross_entropy(logits.float(), targets[outputs.routing_token_batch_index])
        return (loss, outputs) if return_outputs else loss

    def _remove_unused_columns(self, dataset, description=None):
        return dataset


def router_report(model, dataset, collator, labels: dict[int, int], batch_size: int = 8, accelerator=None, prepare_inputs=None) -> dict:
    """Router accuracy against the labels, and accuracy / average FLOPs with the router against always-max.
    `prepare_inputs`: see `score_dataset`."""
    accelerator = _accelerator(accelerator)
    routed = score_dataset(model, dataset, collator, "auto", batch_size, accelerator, prepare_inputs=prepare_inputs)
    maximal = score_dataset(model, dataset, collator, "max", batch_size, accelerator, prepare_inputs=prepare_inputs)
    labelled = [r for r in routed if r["index"] in labels]
    hits = sum(r["configuration"] == labels[r["index"]] for r in labelled)
    config = model.config
    cost = {i: len(c) for i, c in enumerate(config.configurations)}
    at_least = sum(r["configuration"] >= 0 and cost[r["configuration"]] >= cost[labels[r["index"]]] for r in labelled)
    summary_router, summary_max = summarize(routed), summarize(maximal)
    return {
        "samples": len(routed),
        "router_accuracy": hits / len(labelled) if labelled else None,
        "router_at_least_label_cost": at_least / len(labelled) if labelled else None,
        "accuracy_router": summary_router["accuracy"],
        "accuracy_max": summary_max["accuracy"],
        "average_flops_router": summary_router["average_flops"],
        "average_flops_max": summary_max["average_flops"],
        "flops_ratio_router_to_max": summary_router["flops_ratio_to_max"],
        "flops_saving_vs_dense": summary_router["flops_saving_vs_dense"],
        "configuration_histogram": summary_router["configuration_histogram"],
    }


def train_router(
    model_path,
    data,
    labels_path,
    output_dir,
    *,
    eval_data=None,
    eval_labels_path=None,
    training_args: dict | None = None,
    seed: int = 0,
    image_root=None,
    batch_size: int = 8,
    dtype=None,
    attn_implementation=None,
    resume_from_checkpoint=None,
    fsdp_size: int | None = None,
) -> dict:
    """Train the router of a checkpoint on pseudo-labels; write the checkpoint (with `visor_training.json`) and
    `router_report.json` (on `eval_data` and its labels when given, else on the labelled training records).
    `fsdp_size`: shard the model with FSDP2 over that many ranks, as in `train_stage`."""
    model = load_model(model_path, dtype, attn_implementation, fsdp_size)
    if model.model.router is None:
        raise ValueError("this checkpoint has no router (a single configuration, or no router layer)")
    processor = load_processor(model_path)
    labels = read_labels(labels_path)
    bad = sorted({c for c in labels.values() if not 0 <= c < len(model.config.configurations)})
    if bad:
        raise ValueError(f"labels name configurations {bad} that the checkpoint does not have ({len(model.config.configurations)})")
    set_trainable(model, "router")
    records = load_records(data, image_root)
    train_dataset = LabelledRecords(records, labels)
    collator = VisorDataCollator(processor)
    args = make_training_arguments(output_dir, training_args, seed=seed)
    trainer = RouterTrainer(model=model, args=args, data_collator=RouterCollator(collator), train_dataset=train_dataset, processing_class=processor)
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    trainer.log_metrics("train", result.metrics)

    if eval_data is not None:
        report_records = load_records(eval_data, image_root)
        report_labels = read_labels(eval_labels_path) if eval_labels_path is not None else {}
    else:
        report_records, report_labels = torch.utils.data.Subset(records, train_dataset.indices), labels
    model = trainer.accelerator.unwrap_model(trainer.model)
    report = router_report(model, report_records, collator, report_labels, batch_size, trainer.accelerator, trainer.sharded_step)
    report["train_metrics"] = result.metrics
    save_trained(trainer, processor, output_dir, {"stage": "router", "source": str(model_path), "labels": str(labels_path), "global_step": trainer.state.global_step})
    if trainer.is_world_process_zero():
        (Path(output_dir) / "router_report.json").write_text(json.dumps(report, indent=2, default=str))
    trainer.accelerator.wait_for_everyone()
    return report


__all__ = ["LabelledRecords", "RouterCollator", "RouterTrainer", "router_report", "train_router"]

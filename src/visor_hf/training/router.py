"""Router training on the pseudo-labels, everything but the router frozen (HF `Trainer`).

Two heads (`config.router_type`, see `modeling/routing_visor.py`): the paper's `"argmax"` router learns the label
(cross-entropy); the `"calibrated"` router learns, for every configuration, whether it keeps the maximal
configuration's answer (binary cross-entropy on the label file's `targets`), so that its sigmoid outputs are
probabilities and a threshold chooses between them at inference.

Every routing token of a sample is a training example with the sample's label (or targets). The router reads the
routing token at the output of `config.router_layer`, which comes before every switchable SA layer, so its input
does not depend on the configuration that runs after it, nor, with everything but the router frozen, on the training
step. By default (`cache_features=True`) the router's inputs are therefore computed once, one forward of the
cheapest configuration per batch, and the `Trainer` then trains the router alone on them: thousands of steps cost
seconds. `cache_features=False` runs the model's forward at every step instead (the same loss; needed only for a
model with dropout before the router layer).
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
from .labels import read_labels, read_targets
from .resume import CompleteCheckpointMixin
from .sharding import ShardedStep
from .stages import load_model, make_training_arguments, save_checkpoint, save_trained, set_trainable

logger = get_logger(__name__)


class LabelledRecords(torch.utils.data.Dataset):
    """The records of `dataset` that have a label, each with its `route_label` (a configuration index, or a list of
    per-configuration targets for the calibrated router)."""

    def __init__(self, dataset, labels: dict[int, int | list[float]]):
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
        values = [r["route_label"] for r in records]
        batch["route_labels"] = torch.tensor(values, dtype=torch.float if isinstance(values[0], list) else torch.long)
        return batch


class RouterTrainer(CompleteCheckpointMixin, Trainer):
    """`Trainer` whose loss is the router's cross-entropy against `route_labels` (configuration indices), or its
    binary cross-entropy per configuration against `route_labels` of shape `[batch, configurations]` (targets in
    [0, 1], the calibrated router)."""

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
        targets = targets[outputs.routing_token_batch_index]
        if targets.is_floating_point():
            loss = F.binary_cross_entropy_with_logits(logits.float(), targets.to(logits.device))
        else:
            loss = F.cross_entropy(logits.float(), targets)
        return (loss, outputs) if return_outputs else loss

    def _remove_unused_columns(self, dataset, description=None):
        return dataset


@torch.no_grad()
def routing_features(model, dataset, collator, batch_size: int = 8, accelerator=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's input for every routing token of `dataset` (`[N, hidden]`) and the dataset index of its sample
    (`[N]`): the hidden states the router module receives, captured with a forward hook while the cheapest
    configuration runs."""
    from torch.utils.data import DataLoader

    accelerator = _accelerator(accelerator)
    unwrapped = accelerator.unwrap_model(model)
    if next(model.parameters()).device != accelerator.device:
        model.to(accelerator.device)
    config = unwrapped.config
    cheapest = min(range(len(config.configurations)), key=lambda c: (len(config.configurations[c]), c))
    captured = []
    hook = unwrapped.model.router.register_forward_hook(lambda module, args, output: captured.append(args[0].detach()))
    was_training = model.training
    model.eval()
    features, samples = [], []
    try:
        for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collator, shuffle=False):
            batch = {k: v.to(accelerator.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            out = model(**model_inputs(batch, keep_labels=False), visor_configuration=cheapest, output_router_logits=True,
                        logits_to_keep=1, use_cache=False)
            features.append(captured.pop().float().cpu())
            samples.append(batch["sample_index"][out.routing_token_batch_index].cpu())
    finally:
        hook.remove()
        model.train(was_training)
    if not features or sum(len(f) for f in features) == 0:
        raise ValueError("no routing token in the data: it must be built by a processor that adds the routing token")
    return torch.cat(features), torch.cat(samples)


class RoutingFeatures(torch.utils.data.Dataset):
    """Cached router inputs with the label (or targets) of their sample."""

    def __init__(self, features: torch.Tensor, samples: torch.Tensor, labels: dict[int, int | list[float]]):
        keep = [i for i, s in enumerate(samples.tolist()) if s in labels]
        if not keep:
            raise ValueError("no record of the dataset has a pseudo-label (do the label file and the data match?)")
        self.features = features[keep]
        values = [labels[int(samples[i])] for i in keep]
        self.targets = torch.tensor(values, dtype=torch.float if isinstance(values[0], list) else torch.long)

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, i: int) -> dict:
        return {"features": self.features[i], "route_labels": self.targets[i]}


class RouterOnFeatures(torch.nn.Module):
    """The model's router module (shared, so training it trains the model's) with the router loss on cached inputs:
    cross-entropy on configuration indices, binary cross-entropy on per-configuration targets."""

    def __init__(self, router: torch.nn.Module):
        super().__init__()
        self.router = router

    def forward(self, features: torch.Tensor, route_labels: torch.Tensor) -> dict:
        logits = self.router(features.to(self.router.fc2.weight.dtype)).float()
        if route_labels.is_floating_point():
            loss = F.binary_cross_entropy_with_logits(logits, route_labels)
        else:
            loss = F.cross_entropy(logits, route_labels)
        return {"loss": loss, "logits": logits}


class FeatureTrainer(CompleteCheckpointMixin, Trainer):
    """`Trainer` of the router alone on cached router inputs (`RouterOnFeatures`)."""


def router_report(model, dataset, collator, labels: dict[int, int], batch_size: int = 8, accelerator=None,
                  prepare_inputs=None, targets: dict[int, list[float]] | None = None) -> dict:
    """Router accuracy against the labels, the share of samples routed to a configuration that keeps them (with
    `targets`), and accuracy / average FLOPs with the router against always-max. `prepare_inputs`: see
    `score_dataset`."""
    accelerator = _accelerator(accelerator)
    routed = score_dataset(model, dataset, collator, "auto", batch_size, accelerator, prepare_inputs=prepare_inputs)
    maximal = score_dataset(model, dataset, collator, "max", batch_size, accelerator, prepare_inputs=prepare_inputs)
    labelled = [r for r in routed if r["index"] in labels]
    hits = sum(r["configuration"] == labels[r["index"]] for r in labelled)
    config = model.config
    cost = {i: len(c) for i, c in enumerate(config.configurations)}
    at_least = sum(r["configuration"] >= 0 and cost[r["configuration"]] >= cost[labels[r["index"]]] for r in labelled)
    summary_router, summary_max = summarize(routed), summarize(maximal)
    kept = [targets[r["index"]][r["configuration"]] for r in routed if targets and r["index"] in targets and r["configuration"] >= 0]
    return {
        "samples": len(routed),
        "router_type": config.router_type,
        "router_threshold": config.router_threshold if config.router_type == "calibrated" else None,
        "routed_configuration_keeps": sum(kept) / len(kept) if kept else None,
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
    router_type: str | None = None,
    router_threshold: float | None = None,
    cache_features: bool | None = None,
    packing: int = 1,
) -> dict:
    """Train the router of a checkpoint on pseudo-labels; write the checkpoint (with `visor_training.json`) and
    `router_report.json` (on `eval_data` and its labels when given, else on the labelled training records).
    `fsdp_size`: shard the model with FSDP2 over that many ranks, as in `train_stage`.
    `router_type` (`"argmax"` or `"calibrated"`; default: the checkpoint's) and `router_threshold` (the calibrated
    router's default threshold) are written into the config. `cache_features` (default: on, unless the model is
    sharded): train on the router inputs computed once (see the module documentation); a sharded model runs its
    forward at every step (every rank must call its sharded modules in step, see `sharding`). `packing`: the images'
    token packing factor of the router's inputs (as the labels were made)."""
    from ..modeling.routing_visor import ROUTER_TYPES, check_threshold

    if cache_features is None:
        cache_features = fsdp_size is None
    if cache_features and fsdp_size is not None:
        raise ValueError("cache_features=True trains the router alone on one process; with fsdp_size use cache_features=False")
    model = load_model(model_path, dtype, attn_implementation, fsdp_size)
    if model.model.router is None:
        raise ValueError("this checkpoint has no router (a single configuration, or no router layer)")
    if router_type is not None:
        if router_type not in ROUTER_TYPES:
            raise ValueError(f"router_type must be one of {ROUTER_TYPES}, got {router_type!r}")
        model.config.router_type = router_type
    if router_threshold is not None:
        model.config.router_threshold = check_threshold(router_threshold, "router_threshold")
    calibrated = model.config.router_type == "calibrated"
    processor = load_processor(model_path)
    labels = read_labels(labels_path)
    targets = read_targets(labels_path) if calibrated else None
    count = len(model.config.configurations)
    bad = sorted({c for c in labels.values() if not 0 <= c < count})
    if bad:
        raise ValueError(f"labels name configurations {bad} that the checkpoint does not have ({count})")
    if targets is not None and any(len(t) != count for t in targets.values()):
        raise ValueError(f"the label file's targets do not have one entry per configuration ({count})")
    set_trainable(model, "router")
    records = load_records(data, image_root)
    train_dataset = LabelledRecords(records, targets if calibrated else labels)
    collator = VisorDataCollator(processor, packing=packing)
    args = make_training_arguments(output_dir, training_args, seed=seed)
    if cache_features:
        features, samples = routing_features(model, torch.utils.data.Subset(records, train_dataset.indices), collator, batch_size)
        head = RouterOnFeatures(model.model.router)
        # the router alone runs in training: no layer activations to recompute
        args.activation_checkpointing = args.gradient_checkpointing = False
        trainer = FeatureTrainer(model=head, args=args, train_dataset=RoutingFeatures(features, samples, targets if calibrated else labels))
    else:
        trainer = RouterTrainer(model=model, args=args, data_collator=RouterCollator(collator), train_dataset=train_dataset,
                                processing_class=processor)
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    trainer.log_metrics("train", result.metrics)

    if eval_data is not None:
        report_records = load_records(eval_data, image_root)
        report_labels = read_labels(eval_labels_path) if eval_labels_path is not None else {}
        report_targets = read_targets(eval_labels_path) if eval_labels_path is not None and calibrated else None
    else:
        report_records, report_labels, report_targets = torch.utils.data.Subset(records, train_dataset.indices), labels, targets
    prepare_inputs = None
    if not cache_features:
        model = trainer.accelerator.unwrap_model(trainer.model)
        prepare_inputs = trainer.sharded_step
    report = router_report(model, report_records, collator, report_labels, batch_size, trainer.accelerator,
                           prepare_inputs=prepare_inputs, targets=report_targets)
    report["train_metrics"] = result.metrics
    summary = {"stage": "router", "source": str(model_path), "labels": str(labels_path), "global_step": trainer.state.global_step,
               "router_type": model.config.router_type, "cache_features": cache_features, "packing": packing}
    if cache_features:  # the trainer holds the router alone: write the whole model
        if trainer.is_world_process_zero():
            save_checkpoint(model, processor, output_dir, {**summary, "training_args": trainer.args.to_dict()})
    else:
        save_trained(trainer, processor, output_dir, summary)
    if trainer.is_world_process_zero():
        (Path(output_dir) / "router_report.json").write_text(json.dumps(report, indent=2, default=str))
    trainer.accelerator.wait_for_everyone()
    return report


__all__ = ["FeatureTrainer", "LabelledRecords", "RouterCollator", "RouterOnFeatures", "RouterTrainer", "RoutingFeatures", "router_report",
           "routing_features", "train_router"]

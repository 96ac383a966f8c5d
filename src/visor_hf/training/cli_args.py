"""Command-line options shared by the training commands (`visor-hf train`, `train-router`, ...).

The common `TrainingArguments` fields have their own options; any other field goes through `--training-args`
(a JSON object or a path to a JSON file), which wins over the options. Names follow `TrainingArguments`.
"""

from __future__ import annotations

import argparse
import json
import os

# option name -> (TrainingArguments field, type, help)
COMMON = {
    "--learning-rate": ("learning_rate", float, "peak learning rate"),
    "--num-train-epochs": ("num_train_epochs", float, "epochs"),
    "--max-steps": ("max_steps", int, "optimisation steps (overrides epochs)"),
    "--per-device-train-batch-size": ("per_device_train_batch_size", int, "micro-batch size per device"),
    "--gradient-accumulation-steps": ("gradient_accumulation_steps", int, "micro-batches per optimisation step"),
    "--warmup-steps": ("warmup_steps", float, "warm-up steps (a value below 1 is a fraction of the training steps)"),
    "--weight-decay": ("weight_decay", float, "AdamW weight decay (paper: 0)"),
    "--lr-scheduler-type": ("lr_scheduler_type", str, "cosine, linear, constant, ..."),
    "--logging-steps": ("logging_steps", float, "log every N steps"),
    "--save-steps": ("save_steps", float, "checkpoint every N steps"),
    "--save-total-limit": ("save_total_limit", int, "keep at most N checkpoints"),
    "--dataloader-num-workers": ("dataloader_num_workers", int, "data-loading worker processes"),
    "--report-to": ("report_to", str, "none, tensorboard, wandb, ..."),
    "--deepspeed": ("deepspeed", str, "DeepSpeed config file"),
    "--fsdp": ("fsdp", str, "FSDP options, e.g. 'full_shard auto_wrap'"),
}
FLAGS = {
    "--bf16": ("bf16", "bfloat16 mixed precision"),
    "--fp16": ("fp16", "float16 mixed precision"),
    "--activation-checkpointing": ("activation_checkpointing", "activation (gradient) checkpointing"),
    "--gradient-checkpointing": ("activation_checkpointing", "alias of --activation-checkpointing"),
    "--use-cpu": ("use_cpu", "train on the CPU even if a GPU is present"),
}


def add_training_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("Trainer options (TrainingArguments)")
    group.add_argument("--output-dir", required=True, help="output folder: checkpoints and the final model")
    for option, (_field, kind, text) in COMMON.items():
        group.add_argument(option, type=kind, default=None, help=text)
    for option, (_field, text) in FLAGS.items():
        group.add_argument(option, action="store_true", help=text)
    group.add_argument("--seed", type=int, default=0, help="random seed (also the universal configuration schedule's)")
    group.add_argument("--resume-from-checkpoint", default=None, help="a checkpoint-N folder, or 'latest' (the newest in --output-dir)")
    group.add_argument("--training-args", default=None, help="more TrainingArguments fields: a JSON object or a JSON file")
    group.add_argument("--fsdp-size", type=int, default=None,
                       help="shard the model with FSDP2 over N ranks as it loads (transformers' DistributedConfig, CPU or "
                       "GPU; launch N processes with torchrun). Not a TrainingArguments field; see docs/training.md")


def training_args_from(args) -> dict:
    fields = {}
    for option, (field, _kind, _text) in COMMON.items():
        value = getattr(args, option[2:].replace("-", "_"))
        if value is not None:
            fields[field] = value
    for option, (field, _text) in FLAGS.items():
        if getattr(args, option[2:].replace("-", "_")):
            fields[field] = True
    for key in ("logging_steps", "save_steps"):
        if key in fields and float(fields[key]).is_integer():
            fields[key] = int(fields[key])
    if fields.get("save_steps") is not None:
        fields.setdefault("save_strategy", "steps")
    if args.training_args:
        text = args.training_args
        extra = json.load(open(text)) if os.path.isfile(text) else json.loads(text)
        fields.update(extra)
    return fields


def resume_value(value):
    """`latest` → True (the Trainer picks the newest checkpoint in the output folder)."""
    return True if value == "latest" else value


__all__ = ["add_training_arguments", "training_args_from", "resume_value"]

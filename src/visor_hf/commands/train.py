"""`visor-hf train --stage 1|2|universal`: stage training on the HF Trainer (see docs/training.md)."""

from __future__ import annotations

import json

from ..training.cli_args import add_training_arguments, resume_value, training_args_from
from .paths import check_data_path, check_model_path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a VISOR checkpoint: stage 1 (new modules), stage 2 (full or LoRA) or universal fine-tuning",
        description="Stage 1 freezes the converted LLaVA-OV weights and trains the new modules with the maximal "
        "configuration; stage 2 trains everything (or LoRA adapters) with the maximal configuration; 'universal' "
        "trains like stage 2 with one viable configuration per optimisation step, drawn from (seed, step). "
        "Launch with `accelerate launch -m visor_hf.cli train ...` or `torchrun` for several GPUs.",
    )
    parser.add_argument("--stage", required=True, choices=["1", "2", "universal"], help="1 (new modules), 2 (everything or LoRA) or universal (one configuration per step)")
    parser.add_argument("--model", required=True, help="VISOR checkpoint folder (from `visor-hf convert` or an earlier stage)")
    parser.add_argument("--data", required=True, help="training records: .json / .jsonl (LLaVA conversations) or a saved `datasets` folder")
    parser.add_argument("--eval-data", default=None, help="evaluation records (for --training-args '{\"eval_strategy\": \"steps\"}')")
    parser.add_argument("--image-root", default=None, help="folder of the relative image paths (default: the data file's folder)")
    parser.add_argument("--max-length", type=int, default=None, help="cut longer sequences (right padding only)")
    parser.add_argument("--limit", type=int, default=None, help="use the first N records")
    parser.add_argument("--dtype", default=None, help="load the weights in this dtype (float32, bfloat16, ...)")
    parser.add_argument("--attn-implementation", default=None, help="eager or sdpa")
    parser.add_argument("--train-vision-tower", action="store_true", help="train the SigLIP tower too (stage 2 / universal)")
    lora = parser.add_argument_group("LoRA (stage 2 / universal)")
    lora.add_argument("--lora", action="store_true", help="train LoRA adapters (LLM attention/MLP and CA blocks) instead of the full model")
    lora.add_argument("--lora-r", type=int, default=16, help="LoRA rank")
    lora.add_argument("--lora-alpha", type=int, default=32, help="LoRA scaling alpha")
    lora.add_argument("--lora-dropout", type=float, default=0.05, help="dropout on the LoRA inputs")
    lora.add_argument("--no-merge", action="store_true", help="write only the adapter (output/adapter), not the merged model")
    universal = parser.add_argument_group("universal fine-tuning")
    universal.add_argument("--sampling", choices=["cycle", "uniform"], default="cycle", help="configuration schedule (see docs)")
    universal.add_argument("--configurations", default=None, help="indices of config.configurations to sample, e.g. '0,2,3' (default: all)")
    universal.add_argument(
        "--packing", default=None,
        help="token packing factors to sample, e.g. '1,2,4' (default: no packing): universal fine-tuning runs one "
        "(configuration, packing) pair per step; stages 1 and 2 one factor per step at the maximal configuration "
        "(stage 1 then trains the packing module too)",
    )
    add_training_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..training import LoraOptions, train_stage

    check_model_path(args.model)
    check_data_path(args.data)
    check_data_path(args.eval_data, "--eval-data")

    lora = None
    if args.lora:
        lora = LoraOptions(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, merge=not args.no_merge)
    configurations = [int(i) for i in args.configurations.replace(",", " ").split()] if args.configurations else None
    packing = [int(i) for i in args.packing.replace(",", " ").split()] if args.packing else None
    trainer = train_stage(
        args.model, args.data, args.output_dir, args.stage,
        eval_data=args.eval_data, training_args=training_args_from(args), lora=lora,
        train_vision_tower=args.train_vision_tower, seed=args.seed, sampling=args.sampling,
        configurations=configurations, resume_from_checkpoint=resume_value(args.resume_from_checkpoint),
        image_root=args.image_root, max_length=args.max_length, limit=args.limit, dtype=args.dtype,
        attn_implementation=args.attn_implementation, fsdp_size=args.fsdp_size, packing=packing,
    )
    if trainer.is_world_process_zero():
        print(json.dumps({"stage": args.stage, "output_dir": args.output_dir, "global_step": trainer.state.global_step}))
    return 0

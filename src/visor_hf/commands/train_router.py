"""`visor-hf train-router`: router cross-entropy on pseudo-labels, everything else frozen (docs/training.md)."""

from __future__ import annotations

import json

from ..training.cli_args import add_training_arguments, resume_value, training_args_from
from .paths import check_data_path, check_model_path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "train-router",
        help="train the router on pseudo-labels (everything else frozen); report router accuracy and FLOPs",
        description="Cross-entropy on the labels of `visor-hf label`; writes the checkpoint and router_report.json "
        "(router accuracy, accuracy and average FLOPs with the router against always-max).",
    )
    parser.add_argument("--model", required=True, help="VISOR checkpoint folder (after `visor-hf label`)")
    parser.add_argument("--data", required=True, help="the training records that were labelled")
    parser.add_argument("--labels", required=True, help="pseudo_labels.jsonl (or the folder of `visor-hf label`)")
    parser.add_argument("--eval-data", default=None, help="report on these records (default: the labelled training records)")
    parser.add_argument("--eval-labels", default=None, help="labels of --eval-data (for the router accuracy)")
    parser.add_argument("--image-root", default=None, help="folder of the relative image paths (default: the data file's folder)")
    parser.add_argument("--batch-size", type=int, default=8, help="evaluation batch size of the report")
    parser.add_argument("--dtype", default=None, help="load the weights in this dtype (float32, bfloat16, ...)")
    parser.add_argument("--attn-implementation", default=None, help="eager or sdpa")
    parser.add_argument("--router-type", choices=["argmax", "calibrated"], default=None,
                        help="argmax: the paper's router (cross-entropy on the labels); calibrated: a probability per "
                        "configuration that it keeps the maximal one's answer (binary cross-entropy on the targets). "
                        "Default: the checkpoint's config.router_type")
    parser.add_argument("--router-threshold", type=float, default=None, help="default threshold of a calibrated router, in [0, 1]")
    parser.add_argument("--packing", type=int, choices=[1, 2, 4], default=1, help="token packing factor of the images (as labelled)")
    add_training_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..training import train_router

    check_model_path(args.model)
    check_data_path(args.data)
    check_data_path(args.labels, "--labels")
    check_data_path(args.eval_data, "--eval-data")

    report = train_router(
        args.model, args.data, args.labels, args.output_dir, eval_data=args.eval_data, eval_labels_path=args.eval_labels,
        training_args=training_args_from(args), seed=args.seed, image_root=args.image_root, batch_size=args.batch_size,
        dtype=args.dtype, attn_implementation=args.attn_implementation, resume_from_checkpoint=resume_value(args.resume_from_checkpoint),
        fsdp_size=args.fsdp_size,
        router_type=args.router_type, router_threshold=args.router_threshold, packing=args.packing,
    )
    print(json.dumps({k: v for k, v in report.items() if k != "train_metrics"}, indent=2))
    return 0

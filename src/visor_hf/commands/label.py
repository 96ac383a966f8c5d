"""`visor-hf label`: pseudo-labels for the router (every configuration on a training subset; docs/training.md)."""

from __future__ import annotations

import json

from .paths import check_data_path, check_model_path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "label",
        help="run every configuration on a training subset and label each sample with the cheapest adequate one",
        description="Writes pseudo_label_table.jsonl (per sample and configuration: correct, loss, FLOPs), "
        "pseudo_labels.jsonl and pseudo_label_summary.json. Label: the cheapest configuration keeping >= --keep of "
        "the maximal configuration's accuracy on the sample (ties: fewer layers, then lower loss); see docs/training.md.",
    )
    parser.add_argument("--model", required=True, help="VISOR checkpoint folder (after search / universal fine-tuning)")
    parser.add_argument("--data", required=True, help="training records")
    parser.add_argument("--output-dir", required=True, help="folder for the results (summary.json, per_sample.jsonl / the label files)")
    parser.add_argument("--keep", type=float, default=0.99, help="fraction of the maximal configuration's accuracy to keep")
    parser.add_argument(
        "--spend-slack", action="store_true",
        help="also move samples to their cheapest configuration while the labelled set keeps >= --keep of the maximal "
        "configuration's accuracy (set-level; not the paper's per-sample rule)",
    )
    parser.add_argument("--limit", type=int, default=None, help="label the first N records")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward pass")
    parser.add_argument("--image-root", default=None, help="folder of the relative image paths (default: the data file's folder)")
    parser.add_argument("--dtype", default=None, help="load the weights in this dtype (float32, bfloat16, ...)")
    parser.add_argument("--attn-implementation", default=None, help="eager or sdpa")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..training import pseudo_label

    check_model_path(args.model)
    check_data_path(args.data)

    report = pseudo_label(
        args.model, args.data, args.output_dir, keep=args.keep, spend_slack=args.spend_slack, limit=args.limit, batch_size=args.batch_size,
        image_root=args.image_root, dtype=args.dtype, attn_implementation=args.attn_implementation,
    )
    print(json.dumps({k: v for k, v in report.items() if k != "moved_to_cheapest"}, indent=2))
    return 0

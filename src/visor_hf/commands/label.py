"""`visor-hf label`: pseudo-labels for the router (every configuration on a training subset; docs/training.md)."""

from __future__ import annotations

import json

from .paths import add_scoring_arguments, scoring_options


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
    parser.add_argument("--group-field", default=None,
                        help="group-level labels: the cheapest configuration keeping >= --keep of the maximal one's accuracy "
                        "on the record's group (this record field)")
    add_scoring_arguments(parser, limit_help="label the first N records")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..training import pseudo_label

    options = scoring_options(args)

    report = pseudo_label(
        args.model, args.data, args.output_dir, keep=args.keep, spend_slack=args.spend_slack, group_field=args.group_field,
        **options,
    )
    print(json.dumps({k: v for k, v in report.items() if k != "moved_to_cheapest"}, indent=2))
    return 0

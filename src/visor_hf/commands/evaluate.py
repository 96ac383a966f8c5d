"""`visor-hf evaluate`: accuracy, average FLOPs and configuration histogram of a checkpoint (docs/training.md)."""

from __future__ import annotations

import json

from ..modeling.requests_visor import parse_configuration
from . import argument_type
from .paths import add_scoring_arguments, scoring_options


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="run a checkpoint on an evaluation set with a fixed configuration or the router",
        description="Teacher-forced evaluation on conversation records: exact-match accuracy of the answers, loss, "
        "average prompt FLOPs (against the maximal configuration and dense LLaVA-OV) and the histogram of the "
        "configurations that ran. Writes summary.json and per_sample.jsonl to --output-dir when given.",
    )
    parser.add_argument("--model", required=True, help="VISOR checkpoint folder (or Hub id)")
    parser.add_argument("--data", required=True, help="evaluation records: .json / .jsonl, a saved `datasets` folder or a Hub dataset id")
    parser.add_argument("--configuration", type=argument_type(parse_configuration), default="auto", help="'auto' (router), 'max', an index, or a layer list '0,3'")
    parser.add_argument("--output-dir", default=None, help="folder for the results (summary.json, per_sample.jsonl / the label files)")
    parser.add_argument("--router-threshold", type=float, default=None,
                        help="threshold of a calibrated router (default: the checkpoint's router_threshold)")
    parser.add_argument("--curve", action="store_true",
                        help="instead: every configuration and the router at each --thresholds; writes curve.json, curve.md, curve.png")
    parser.add_argument("--thresholds", default=None, help="comma-separated thresholds of --curve (default 0, 0.1, ..., 0.99, 1)")
    parser.add_argument("--group-field", default="source", help="--curve: report accuracy per value of this record field")
    add_scoring_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..training import evaluate
    from ..training.evaluation import DEFAULT_THRESHOLDS, curve_table, evaluate_curve

    options = scoring_options(args)

    if args.curve:
        thresholds = [float(t) for t in args.thresholds.split(",")] if args.thresholds else DEFAULT_THRESHOLDS
        curve = evaluate_curve(
            args.model, args.data, thresholds=thresholds, group_field=args.group_field or None, output=args.output_dir, **options
        )
        print(curve_table(curve))
        return 0
    summary = evaluate(
        args.model, args.data, visor_configuration=args.configuration, output=args.output_dir,
        router_threshold=args.router_threshold, **options,
    )
    print(json.dumps(summary, indent=2))
    return 0

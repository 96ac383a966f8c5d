"""`visor-hf evaluate`: accuracy, average FLOPs and configuration histogram of a checkpoint (docs/training.md)."""

from __future__ import annotations

import json

from ..modeling.requests_visor import parse_configuration
from . import argument_type


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="run a checkpoint on an evaluation set with a fixed configuration or the router",
        description="Teacher-forced evaluation on conversation records: exact-match accuracy of the answers, loss, "
        "average prompt FLOPs (against the maximal configuration and dense LLaVA-OV) and the histogram of the "
        "configurations that ran. Writes summary.json and per_sample.jsonl to --output-dir when given.",
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--configuration", type=argument_type(parse_configuration), default="auto", help="'auto' (router), 'max', an index, or a layer list '0,3'")
    parser.add_argument("--output-dir", default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--limit", type=int, default=None)
    parser.add_argument("--image-root", default=None)
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--attn-implementation", default=None)
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..training import evaluate

    summary = evaluate(
        args.model, args.data, visor_configuration=args.configuration, batch_size=args.batch_size,
        image_root=args.image_root, limit=args.limit, output=args.output_dir, dtype=args.dtype,
        attn_implementation=args.attn_implementation,
    )
    print(json.dumps(summary, indent=2))
    return 0

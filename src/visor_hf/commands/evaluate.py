"""`visor-hf evaluate`: accuracy, average FLOPs and configuration histogram of a checkpoint (docs/training.md)."""

from __future__ import annotations

import json

from ..modeling.requests_visor import parse_configuration
from . import argument_type
from .paths import check_data_path, check_model_path


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
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward pass")
    parser.add_argument("--limit", type=int, default=None, help="use the first N records")
    parser.add_argument("--image-root", default=None, help="folder of the relative image paths (default: the data file's folder)")
    parser.add_argument("--dtype", default=None, help="load the weights in this dtype (float32, bfloat16, ...)")
    parser.add_argument("--attn-implementation", default=None, help="eager or sdpa")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..training import evaluate

    check_model_path(args.model)
    check_data_path(args.data)

    summary = evaluate(
        args.model, args.data, visor_configuration=args.configuration, batch_size=args.batch_size,
        image_root=args.image_root, limit=args.limit, output=args.output_dir, dtype=args.dtype,
        attn_implementation=args.attn_implementation,
    )
    print(json.dumps(summary, indent=2))
    return 0

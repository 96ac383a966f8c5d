"""`visor-hf search`: evaluate SA-layer subsets and write the viable ones into a checkpoint (docs/training.md)."""

from __future__ import annotations

import json

from .paths import check_data_path, check_model_path


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "search",
        help="evaluate subsets of the SA layers and write the viable ones into the checkpoint's config",
        description="Evaluate SA-layer subsets on a dataset (exhaustive for few switchable layers, greedy backward "
        "elimination or random sampling for many); report accuracy, loss and FLOPs of each; write a checkpoint whose "
        "config.configurations holds the viable ones (within --threshold of the maximal configuration).",
    )
    parser.add_argument("--model", required=True, help="VISOR checkpoint folder")
    parser.add_argument("--data", required=True, help="evaluation records (.json / .jsonl / saved datasets folder)")
    parser.add_argument("--output-dir", required=True, help="output checkpoint folder (+ search_results.jsonl, search_summary.json)")
    parser.add_argument("--strategy", choices=["auto", "exhaustive", "greedy", "sampled"], default="auto", help="auto (exhaustive up to --max-exhaustive switchable layers, else greedy), exhaustive, greedy or sampled")
    parser.add_argument("--metric", choices=["accuracy", "loss"], default="accuracy", help="what decides viability: answer accuracy or teacher-forced loss")
    parser.add_argument("--threshold", type=float, default=0.01, help="relative tolerance to the maximal configuration (0.01: >= 99 %% of its accuracy)")
    parser.add_argument("--max-exhaustive", type=int, default=8, help="'auto' searches exhaustively up to this many switchable layers")
    parser.add_argument("--num-samples", type=int, default=32, help="random subsets of the 'sampled' strategy")
    parser.add_argument("--max-configurations", type=int, default=None, help="keep at most N viable configurations")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward pass")
    parser.add_argument("--limit", type=int, default=None, help="use the first N records")
    parser.add_argument("--image-root", default=None, help="folder of the relative image paths (default: the data file's folder)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (sampled strategy)")
    parser.add_argument("--dtype", default=None, help="load the weights in this dtype (float32, bfloat16, ...)")
    parser.add_argument("--attn-implementation", default=None, help="eager or sdpa")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..training import search

    check_model_path(args.model)
    check_data_path(args.data)

    result = search(
        args.model, args.data, args.output_dir, strategy=args.strategy, metric=args.metric, threshold=args.threshold,
        max_exhaustive=args.max_exhaustive, num_samples=args.num_samples, max_configurations=args.max_configurations,
        seed=args.seed, batch_size=args.batch_size, image_root=args.image_root, limit=args.limit, dtype=args.dtype,
        attn_implementation=args.attn_implementation,
    )
    for c in result["candidates"]:
        print(f"{str(c['layers']):<28} acc {c['accuracy']:.4f}  loss {c['loss']:.4f}  flops/max {c['flops_ratio_to_max']:.3f}  {'viable' if c['viable'] else ''}")
    print(json.dumps({"written": result["written"], "output_dir": args.output_dir}))
    return 0

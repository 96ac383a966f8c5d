"""`visor-hf search`: evaluate SA-layer subsets and write the viable ones into a checkpoint (docs/training.md)."""

from __future__ import annotations

import json

from .paths import add_scoring_arguments, scoring_options


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
    parser.add_argument("--rule", choices=["group", "pooled"], default="group",
                        help="group (default): viable when it keeps one group of the data (--group-field), then each group's "
                        "cheapest is written; pooled: viable when it keeps the whole set")
    parser.add_argument("--group-field", default="source", help="record field that names a record's group (dataset / task)")
    parser.add_argument("--max-exhaustive", type=int, default=8, help="'auto' searches exhaustively up to this many switchable layers")
    parser.add_argument("--num-samples", type=int, default=32, help="random subsets of the 'sampled' strategy")
    parser.add_argument("--max-configurations", type=int, default=None, help="keep at most N viable configurations")
    parser.add_argument("--seed", type=int, default=0, help="random seed (sampled strategy)")
    add_scoring_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..training import search

    options = scoring_options(args)

    result = search(
        args.model, args.data, args.output_dir, strategy=args.strategy, metric=args.metric, threshold=args.threshold,
        rule=args.rule, group_field=args.group_field,
        max_exhaustive=args.max_exhaustive, num_samples=args.num_samples, max_configurations=args.max_configurations,
        seed=args.seed, **options,
    )
    for c in result["candidates"]:
        groups = " ".join(f"{g}={v['accuracy']:.3f}" for g, v in c["groups"].items())
        print(f"{str(c['layers']):<28} acc {c['accuracy']:.4f}  loss {c['loss']:.4f}  flops/max {c['flops_ratio_to_max']:.3f}  "
              f"{'viable' if c['viable'] else '      '}  {groups}")
    print(json.dumps({"written": result["written"], "router_layer": result.get("router_layer"), "output_dir": args.output_dir}))
    return 0

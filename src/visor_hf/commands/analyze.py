"""`visor-hf analyze`: the layer-drop analysis (accuracy per data group against the layers that keep vision)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _subsets(text: str) -> list[tuple[int, ...]]:
    """`"1,3;6,7;"` -> [(1, 3), (6, 7), ()]: the given subsets of layers that keep vision (`;` between subsets)."""
    from ..modeling.requests_visor import parse_layers

    try:
        return [tuple(sorted(parse_layers(item))) for item in text.split(";")]
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"--layers takes layer lists like '1,3;6,7;' (';' between subsets), got {text!r}") from error


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "analyze",
        help="layer-drop analysis: accuracy per data group when vision is dropped from subsets of layers",
        description="Drop the visual tokens from random (or given) subsets of the layers that can skip them (a VISOR "
        "model's SA layers; every layer of a dense-layout checkpoint from `visor-hf convert SRC DST --dense`), measure "
        "the accuracy of every data group against the layers that keep vision, and report a per-layer vision "
        "sensitivity, the easy/hard clustering of the groups and a suggested CA/SA layout for `visor-hf convert`.",
    )
    parser.add_argument("model", help="VISOR checkpoint folder ('toy' = the shipped toy VISOR)")
    parser.add_argument("--data", default="toy", help="'toy' or 'toy:IMAGES' (fresh toy pictures, groups = question kinds; "
                        "default 100 pictures), or a record file (.json/.jsonl/saved dataset) scored by teacher-forced exact match")
    parser.add_argument("--group-key", default="group", help="record field naming its data group (records only; default 'group')")
    parser.add_argument("--limit", type=int, default=None, help="first N records only")
    parser.add_argument("--subsets", type=int, default=None, help="random subsets per size (default: every subset when there "
                        "are at most 4096, else 8 per size)")
    parser.add_argument("--layers", type=_subsets, default=None, help="the subsets to run instead, e.g. '1,3;6,7;' ('' = no layer)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random subsets and of the toy pictures")
    parser.add_argument("--sa-count", type=int, default=None, help="SA layers of the suggested layout (default: from the sensitivity)")
    parser.add_argument("--batch-size", type=int, default=50, help="questions per generate call (default: 50)")
    parser.add_argument("--out", default=None, help="write analysis.json (and layer_drop.png) into this folder")
    parser.add_argument("--plot", default=None, help="figure path (default OUT/layer_drop.png when --out is given; needs matplotlib)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.set_defaults(func=run)


def _toy_scorer(model, spec: str, seed: int, batch_size: int):
    from ..toy.evaluation import evaluate_visor
    from ..toy.inference import fresh_examples

    images = int(spec.split(":", 1)[1]) if ":" in spec else 100
    examples = fresh_examples(seed, images)
    groups = [e.question.kind for e in examples]
    return (lambda subset: evaluate_visor(model, examples, subset, batch_size)["correct"]), groups


def _record_scorer(model, model_path: str, path: str, group_key: str, limit, batch_size: int):
    from ..training.data import VisorDataCollator, load_processor, load_records
    from ..training.evaluation import score_dataset

    dataset = load_records(path, limit=limit)
    groups = [str(dataset.records[i].get(group_key, "all")) for i in range(len(dataset))]
    collator = VisorDataCollator(load_processor(model_path))

    def score(subset):
        return [r["correct"] for r in score_dataset(model, dataset, collator, subset, batch_size, progress=False)]

    return score, groups


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from ..analysis.layer_drop import layer_subsets, plot, run_layer_drop
    from ..training.stages import load_model

    torch.set_num_threads(args.threads)
    if args.model == "toy":
        from ..toy.inference import DEFAULT_CHECKPOINT

        args.model = str(DEFAULT_CHECKPOINT)
    try:
        model = load_model(args.model).eval()
    except (OSError, ValueError) as error:
        print(f"visor-hf analyze: error: cannot load the VISOR checkpoint {args.model}: {error}", file=sys.stderr)
        return 2
    config = model.config
    layers = list(config.self_attention_layers)
    if not layers:
        print("visor-hf analyze: error: the model has no SA layer, so no layer can drop vision", file=sys.stderr)
        return 2
    if args.layers is not None:
        extra = sorted({x for s in args.layers for x in s} - set(layers))
        if extra:
            print(f"visor-hf analyze: error: --layers: {extra} are not SA layers of the model (SA layers: {layers})", file=sys.stderr)
            return 2
        subsets = args.layers
    else:
        per_size = args.subsets if args.subsets is not None else (None if 2 ** len(layers) <= 4096 else 8)
        subsets = layer_subsets(layers, per_size, args.seed)
    if args.data == "toy" or args.data.startswith("toy:"):
        score, groups = _toy_scorer(model, args.data, args.seed, args.batch_size)
    else:
        score, groups = _record_scorer(model, args.model, args.data, args.group_key, args.limit, args.batch_size)
    result = run_layer_drop(score, layers, subsets, groups, list(config.cross_attention_layers), config.text_config.num_hidden_layers)
    summary = result.to_dict()
    _print(result, summary)
    plot_path = args.plot or (os.path.join(args.out, "layer_drop.png") if args.out else None)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        Path(args.out, "analysis.json").write_text(json.dumps(summary, indent=2))
    if plot_path:
        try:
            plot(result, plot_path)
            print(f"figure: {plot_path}")
        except ImportError:
            print("visor-hf analyze: no figure: matplotlib is not installed (pip install matplotlib)", file=sys.stderr)
    return 0


def _cell(value) -> str:
    return f"{'-':>7s}" if value is None else f"{value:7.3f}"


def _print(result, summary: dict) -> None:
    layers = result.layers
    print(f"layers that can drop vision: {layers}; CA layers (always see vision): {result.cross_attention_layers}; "
          f"{len(result.subsets)} subsets; samples per group: {summary['samples']}\n")
    width = max(len(g) for g in result.groups) + 2
    print("mean accuracy against the number of layers keeping vision")
    print(f"{'group':{width}s}" + "".join(f"{k:>7d}" for k in range(len(layers) + 1)) + "  cluster")
    for g in result.groups:
        print(f"{g:{width}s}" + "".join(_cell(v) for v in summary["curve"][g]) + f"  {summary['clusters'][g]}")
    print("\nvision sensitivity per layer (accuracy with vision in the layer minus without)")
    print(f"{'group':{width}s}" + "".join(f"{layer:>7d}" for layer in layers))
    for g in result.groups:
        print(f"{g:{width}s}" + "".join(_cell(summary["sensitivity"][g][str(layer)]) for layer in layers))
    layout = summary["suggested_layout"]
    print(f"\nsuggested layout: CA {layout['cross_attention_layers']}, SA {layout['self_attention_layers']}: "
          f"visor-hf convert SRC DST {layout['command']}")

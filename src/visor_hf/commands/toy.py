"""`visor-hf toy`: adaptive inference with the shipped toy VISOR checkpoint on freshly generated pictures."""

from __future__ import annotations

import argparse
import os
import random
import sys

from ..modeling.requests_visor import check_configuration, parse_configuration
from . import argument_type


def _integer(text: str, minimum: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from error
    if value < minimum:
        raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
    return value


def _positive(text: str) -> int:
    return _integer(text, 1, "a positive integer")


def _images(text: str) -> int:
    value = _positive(text)
    if value > 1000:  # picture seeds are 50_000_000 + 1000 * seed + i: more would reuse the next seed's pictures
        raise argparse.ArgumentTypeError(f"at most 1000 pictures per run, got {value}")
    return value


def _threshold(text: str) -> float:
    try:
        value = float(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text!r}") from error
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {value}")
    return value


def _seed(text: str) -> int:
    return _integer(text, 0, "a non-negative integer (the picture seed)")


def _reduction(text: str):
    from ..modeling.reduction_visor import TokenReduction

    try:
        return TokenReduction.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "toy",
        help="answer synthetic visual questions with the shipped toy VISOR (router picks the SA layers per question)",
        description="Generate new pictures, ask easy (background colour, any red) and hard (counting, cell content) "
        "questions, and answer them with the toy VISOR checkpoint that ships with the package. Prints per question "
        "the answer, the truth, the SA layers the router chose and the LLM prefill FLOPs against dense LLaVA-OV.",
    )
    parser.add_argument("--images", type=_images, default=4, help="number of new pictures (5 questions each)")
    parser.add_argument("--seed", type=_seed, default=None, help="picture seed (default: a random one, printed)")
    parser.add_argument("--model", default=None,
                        help="checkpoint folder, or a shipped toy's name: toy-visor, toy-visor-tr (default: toy-visor; "
                        "with --packing 2 or 4, toy-visor-tr, the toy trained with token packing)")
    parser.add_argument("--configuration", type=argument_type(parse_configuration), default="auto",
                        help="'auto' (router, default), 'max', a configuration index, or SA layers like '1,6' or '[]'")
    parser.add_argument("--router-threshold", type=_threshold, default=None,
                        help="threshold of the calibrated router with --configuration auto (default: the checkpoint's "
                        "router_threshold): higher answers more questions with more SA layers")
    parser.add_argument("--reduction", type=_reduction, default=None,
                        help="visual token reduction before the LLM, e.g. 'visionzip:0.25' (a fraction of each "
                        "image's tokens) or 'visionzip:22' (tokens per image); see docs/token_reduction.md")
    parser.add_argument("--packing", type=int, choices=[1, 2, 4], default=1,
                        help="VISOR-TR token packing factor of the pictures (1: every visual token; 2: horizontal pairs; "
                        "4: 2x2 blocks); FLOPs stay against dense LLaVA-OV on every visual token")
    parser.add_argument("--save-images", default=None, help="folder to write the pictures to (PNG)")
    parser.add_argument("--quiet", action="store_true", help="print the summary only")
    parser.add_argument("--threads", type=_positive, default=1, help="torch threads (default 1)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from ..toy.inference import answer_examples, fresh_examples, load_toy, resolve_toy

    torch.set_num_threads(args.threads)
    seed = args.seed if args.seed is not None else random.randrange(100_000)
    configuration = args.configuration
    if args.model and not os.path.isdir(args.model) and (os.path.isabs(args.model) or args.model.startswith(".")):
        print(f"visor-hf toy: error: --model {args.model}: no such checkpoint folder", file=sys.stderr)
        return 2
    checkpoint = resolve_toy(args.model, args.packing)
    try:
        model, processor = load_toy(checkpoint)
    except (OSError, ValueError) as error:
        print(f"visor-hf toy: error: cannot load the checkpoint {checkpoint}: {error}", file=sys.stderr)
        return 2
    config = model.config
    try:
        check_configuration(config, configuration)
        problem = None
    except ValueError as error:
        problem = str(error)
    if problem is None and args.router_threshold is not None:
        if configuration != "auto":
            problem = "--router-threshold only applies to --configuration auto (the router decides)"
        elif config.router_type != "calibrated":
            problem = f"--router-threshold needs a calibrated router; this checkpoint's router is {config.router_type!r}"
    if problem is None and args.packing != 1 and args.packing not in (getattr(config, "packing_factors", None) or []):
        problem = f"--packing {args.packing}: this checkpoint has no packing module for it (packing_factors {config.packing_factors})"
    if problem is None and args.packing != 1 and args.reduction is not None:
        problem = "--packing and --reduction cannot be combined (token reduction reads the unpacked layout)"
    if problem:
        print(f"visor-hf toy: error: {problem}", file=sys.stderr)
        return 2
    params = sum(p.numel() for p in model.parameters())
    print(f"toy VISOR from {checkpoint}: {params / 1e6:.2f} M parameters, "
          f"{config.text_config.num_hidden_layers} LLM layers, CA {config.cross_attention_layers}, "
          f"SA {config.self_attention_layers}, router after layer {config.router_layer}")
    router = config.router_type
    if router == "calibrated":
        threshold = args.router_threshold if args.router_threshold is not None else config.router_threshold
        router = f"calibrated, threshold {threshold:g}"
    print(f"configurations: {config.configurations}; router: {router}; token packing {args.packing}x; "
          f"pictures seed {seed} (--seed {seed} repeats this run)\n")
    examples = fresh_examples(seed, args.images)
    if args.save_images:
        os.makedirs(args.save_images, exist_ok=True)
    if args.reduction is not None:
        print(f"visual token reduction: {args.reduction} (dense FLOPs: LLaVA-OV on the unreduced tokens)\n")
    try:
        answers = answer_examples(model, processor, examples, visor_configuration=configuration,
                                  router_threshold=args.router_threshold, token_reduction=args.reduction,
                                  packing=args.packing)
    except ValueError as error:  # e.g. a keep count larger than the pictures' tokens
        print(f"visor-hf toy: error: {error}", file=sys.stderr)
        return 2
    current = None
    for a in answers:
        e = a.example
        if e.scene.seed != current:
            current = e.scene.seed
            where = ""
            if args.save_images:
                where = os.path.join(args.save_images, f"toy-{e.scene.seed}.png")
                e.image.save(where)
                where = f" -> {where}"
            if not args.quiet:
                print(f"picture {e.scene.seed}{where}")
        if not args.quiet:
            mark = "ok " if a.correct else "BAD"
            print(f"  [{e.question.difficulty}] {e.question.text:42s} answer {a.answer:9s} truth {e.question.answer:9s} "
                  f"{mark} SA layers {list(a.sa_layers)!s:13s} FLOPs {a.flops_ratio:.2f}x dense")
    print()
    for diff in ("easy", "hard"):
        part = [a for a in answers if a.example.question.difficulty == diff]
        if not part:
            continue
        acc = sum(a.correct for a in part) / len(part)
        layers = sum(len(a.sa_layers) for a in part) / len(part)
        ratio = sum(a.prefill_flops for a in part) / sum(a.dense_prefill_flops for a in part)
        print(f"{diff:4s}: accuracy {acc:.3f} ({sum(a.correct for a in part)}/{len(part)}), "
              f"mean SA layers {layers:.2f}, FLOPs {ratio:.2f}x dense")
    total = sum(a.prefill_flops for a in answers)
    dense = sum(a.dense_prefill_flops for a in answers)
    acc = sum(a.correct for a in answers) / len(answers)
    print(f"all : accuracy {acc:.3f}, LLM prefill FLOPs {total / len(answers) / 1e6:.1f} M vs dense "
          f"{dense / len(answers) / 1e6:.1f} M per question: average saving {dense / total:.2f}x")
    return 0

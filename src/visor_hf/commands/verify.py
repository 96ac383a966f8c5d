"""`visor-hf verify DST [--against SRC]`: load a VISOR checkpoint, run a forward and a short generate on a generated
image; with `--against`, check that the dense layout of DST reproduces the LLaVA-OneVision source's logits."""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="load a VISOR checkpoint, run forward + generate; with --against, check dense equivalence with LLaVA-OV",
    )
    parser.add_argument("dst", help="VISOR checkpoint folder (or Hub id)")
    parser.add_argument("--against", default=None, help="the LLaVA-OneVision source (folder or Hub id)")
    parser.add_argument("--max-new-tokens", type=int, default=8)
    parser.add_argument("--atol", type=float, default=1e-4, help="logit tolerance: atol + rtol * max|source logit|")
    parser.add_argument("--rtol", type=float, default=1e-4)
    parser.add_argument("--trust-remote-code", action="store_true", help="load through the checkpoint's remote code")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def generated_image(height: int, width: int, seed: int = 0):
    """A picture with a colour gradient and a filled square (deterministic)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([255 * x / max(width - 1, 1), 255 * y / max(height - 1, 1), np.full_like(x, 128)], -1)
    top, left = height // 4, width // 4
    pixels[top : top + height // 3, left : left + width // 3] = rng.integers(0, 256, 3)
    return Image.fromarray(pixels.astype(np.uint8))


def _image_size(processor) -> tuple[int, int]:
    size = getattr(processor.image_processor, "size", None) or {}
    side = size.get("height") or size.get("shortest_edge") or 384
    return int(side), int(size.get("width", side)) * 2  # twice as wide: exercises anyres


def run(args: argparse.Namespace) -> int:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if not args.trust_remote_code:
        import visor_hf  # noqa: F401  (registers the local classes)

    torch.manual_seed(args.seed)
    failures: list[str] = []
    report: list[str] = []
    remote = {"trust_remote_code": True} if args.trust_remote_code else {}
    try:
        model = AutoModelForImageTextToText.from_pretrained(args.dst, dtype=torch.float32, attn_implementation="eager", **remote).eval()
        processor = AutoProcessor.from_pretrained(args.dst, **remote)
    except Exception as error:
        print(f"visor-hf verify: FAILED to load {args.dst}: {error}", file=sys.stderr)
        return 1
    config = model.config
    origin = "remote code" if type(model).__module__.startswith("transformers_modules") else "visor_hf"
    report.append(f"checkpoint {args.dst}: {type(model).__name__} ({origin}), {sum(p.numel() for p in model.parameters()):,} parameters")
    report.append(
        f"  CA layers {config.cross_attention_layers}, SA layers {config.self_attention_layers}, "
        f"{len(config.configurations)} configurations, router layer {config.router_layer}, routing token id {config.routing_token_id}"
    )
    image = generated_image(*_image_size(processor), seed=args.seed)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=[image], text=prompt, return_tensors="pt")
    routing = int((inputs["input_ids"] == config.routing_token_id).sum()) if config.routing_token_id is not None else 0
    report.append(f"  prompt: {inputs['input_ids'].shape[1]} tokens, {routing} routing token(s)")
    if config.routing_token_id is not None and routing != 1:
        failures.append(f"the processor placed {routing} routing tokens in a one-question prompt (expected 1)")
    with torch.no_grad():
        output = model(**inputs)
    if not torch.isfinite(output.logits).all():
        failures.append("forward: logits are not finite")
    report.append(f"  forward: logits {tuple(output.logits.shape)}, configuration {output.visor_configurations}")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    new_tokens = generated[0, inputs["input_ids"].shape[1] :]
    report.append(f"  generate: {len(new_tokens)} new tokens {processor.tokenizer.decode(new_tokens)!r}")
    if len(new_tokens) == 0:
        failures.append("generate produced no token")

    if args.against:
        plain = processor.apply_chat_template(conversation, add_generation_prompt=True, add_routing_token=False)
        failures += _check_against(args, report, processor, image, plain, remote)

    print("\n".join(report))
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print("OK")
    return 0


def _check_against(args, report, processor, image, prompt, remote) -> list[str]:
    from transformers import AutoModelForImageTextToText, LlavaOnevisionForConditionalGeneration

    from ..conversion import check_source, resolve_source

    failures = []
    source = resolve_source(args.against)
    check_source(source)
    llava = LlavaOnevisionForConditionalGeneration.from_pretrained(
        str(source), dtype=torch.float32, use_safetensors=True, attn_implementation="eager"
    ).eval()
    num_layers = llava.config.get_text_config().num_hidden_layers
    every = list(range(num_layers))
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the CA blocks and router of DST are unused by the dense layout: no load report
    try:
        dense = AutoModelForImageTextToText.from_pretrained(
            args.dst,
            dtype=torch.float32,
            attn_implementation="eager",
            cross_attention_layers=[],
            self_attention_layers=every,
            configurations=[every],
            router_layer=None,
            **remote,
        ).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
    # LLaVA-OV inputs: the same prompt without the routing token (dense equivalence is judged on the source's ids).
    inputs = processor(images=[image], text=prompt, return_tensors="pt", add_routing_token=False)
    if processor.routing_token_id is not None and (inputs["input_ids"] == processor.routing_token_id).any():
        raise AssertionError("internal error: the LLaVA-OV prompt holds the routing token")
    with torch.no_grad():
        reference = llava(**inputs).logits
        logits = dense(**inputs).logits
    # the source's vocabulary without the routing token's column (its LM-head row is new)
    keep = torch.ones(reference.shape[-1], dtype=torch.bool)
    if processor.routing_token_id is not None and processor.routing_token_id < keep.numel():
        keep[processor.routing_token_id] = False
    reference, logits = reference[..., keep], logits[..., : keep.numel()][..., keep]
    difference = (logits - reference).abs().max().item()
    tolerance = args.atol + args.rtol * reference.abs().max().item()
    report.append(f"against {args.against}: dense layout, max |logit difference| {difference:.3g} (tolerance {tolerance:.3g})")
    if not difference <= tolerance:
        failures.append(f"dense layout differs from the source: max |logit difference| {difference:.3g} > {tolerance:.3g}")
    with torch.no_grad():
        expected = llava.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        got = dense.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
    same = torch.equal(expected, got)
    report.append(f"  greedy tokens {'identical' if same else 'DIFFER'} over {args.max_new_tokens} new tokens")
    if not same:
        failures.append(f"greedy tokens differ: source {expected[0, -args.max_new_tokens:].tolist()}, dense {got[0, -args.max_new_tokens:].tolist()}")
    return failures



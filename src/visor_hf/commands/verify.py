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
    parser.add_argument("--max-new-tokens", type=int, default=8, help="greedy tokens compared in the generation check")
    parser.add_argument("--atol", type=float, default=1e-4, help="logit tolerance: atol + rtol * max|source logit|")
    parser.add_argument("--rtol", type=float, default=1e-4, help="relative tolerance of the logits comparison")
    parser.add_argument(
        "--trust-remote-code", action="store_true",
        help="also load DST through its remote code in a fresh Python process that never imports visor_hf, and check "
        "that it gives the same logits and the same prompt as the visor_hf classes",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the random test inputs")
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


def _image_size(image_processor) -> tuple[int, int]:
    size = getattr(image_processor, "size", None) or {}
    side = size.get("height") or size.get("shortest_edge") or 384
    return int(side), int(size.get("width", side)) * 2  # twice as wide: exercises anyres


class PromptBuilder:
    """Inputs for the checks: through the checkpoint's processor when it has one, otherwise (a checkpoint converted
    from a source without tokenizer) from its image processor (or LLaVA-OneVision's default one for its config) and
    token ids built by hand: a few text ids, the image placeholders (as many as the model's feature extractor
    yields), a few more text ids, then the routing token."""

    def __init__(self, folder: str, model):
        from transformers import AutoProcessor

        self.model, self.processor = model, None
        try:
            self.processor = AutoProcessor.from_pretrained(folder)
        except Exception:
            self.processor = None
        if self.processor is not None and getattr(self.processor, "tokenizer", None) is not None:
            self.image_processor = self.processor.image_processor
            self.description = f"{type(self.processor).__name__}, chat template"
            return
        self.processor = None
        from transformers import AutoImageProcessor

        from ..conversion.convert import default_image_processor

        try:
            self.image_processor = AutoImageProcessor.from_pretrained(folder)
        except Exception:
            self.image_processor = default_image_processor(model.config.to_dict())
        self.description = "no processor in the checkpoint: image processor and token ids built by hand"

    @property
    def decode(self):
        if self.processor is not None:
            return self.processor.tokenizer.decode
        return lambda ids: str(ids.tolist())

    def __call__(self, image, routing: bool) -> dict:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]}]
        if self.processor is not None:
            add = {} if routing else {"add_routing_token": False}
            prompt = self.processor.apply_chat_template(conversation, add_generation_prompt=True, **add)
            return dict(self.processor(images=[image], text=prompt, return_tensors="pt", **add))
        config = self.model.config
        pixels = self.image_processor([image], return_tensors="pt")
        with torch.no_grad():
            features = self.model.model.get_image_features(pixels["pixel_values"], pixels["image_sizes"], return_dict=True)
        num_image_tokens = features.pooler_output[0].shape[0]
        special = {config.image_token_id, config.video_token_id, config.routing_token_id, config.get_text_config().pad_token_id}
        words = [i for i in range(1, config.get_text_config().vocab_size) if i not in special][:8]
        ids = words[:4] + [config.image_token_id] * num_image_tokens + words[4:]
        if routing and config.routing_token_id is not None:
            ids.append(config.routing_token_id)
        input_ids = torch.tensor([ids])
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), **pixels}


def run(args: argparse.Namespace) -> int:
    from transformers import AutoModelForImageTextToText

    import visor_hf  # noqa: F401  (registers the local classes; the remote code runs in its own process)

    torch.manual_seed(args.seed)
    failures: list[str] = []
    report: list[str] = []
    try:
        model = AutoModelForImageTextToText.from_pretrained(args.dst, dtype=torch.float32, attn_implementation="eager").eval()
        from ..conversion.families import VISOR_MODEL_TYPES

        if model.config.model_type not in VISOR_MODEL_TYPES:
            raise ValueError(f"model_type is {model.config.model_type!r}, not a VISOR checkpoint ({', '.join(VISOR_MODEL_TYPES)})")
        prompts = PromptBuilder(args.dst, model)
    except Exception as error:
        print(f"visor-hf verify: FAILED to load {args.dst}: {error}", file=sys.stderr)
        return 1
    config = model.config
    report.append(f"checkpoint {args.dst}: {type(model).__name__} (visor_hf), {sum(p.numel() for p in model.parameters()):,} parameters")
    report.append(
        f"  CA layers {config.cross_attention_layers}, SA layers {config.self_attention_layers}, "
        f"{len(config.configurations)} configurations, router layer {config.router_layer}, routing token id {config.routing_token_id}"
    )
    try:
        image = generated_image(*_image_size(prompts.image_processor), seed=args.seed)
        inputs = prompts(image, routing=True)
        routing = int((inputs["input_ids"] == config.routing_token_id).sum()) if config.routing_token_id is not None else 0
        report.append(f"  prompt ({prompts.description}): {inputs['input_ids'].shape[1]} tokens, {routing} routing token(s)")
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
        report.append(f"  generate: {len(new_tokens)} new tokens {prompts.decode(new_tokens)!r}")
        if len(new_tokens) == 0:
            failures.append("generate produced no token")
        if args.trust_remote_code:
            failures += _check_remote_code(args.dst, report, inputs, output.logits, prompts.processor is not None)
        if args.against:
            failures += _check_against(args, report, prompts(image, routing=False))
    except Exception as error:  # a checkpoint that does not run, or a source that is not LLaVA-OneVision
        failures.append(f"{type(error).__name__}: {error}")

    print("\n".join(report))
    if failures:
        print("FAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    print("OK")
    return 0


REMOTE_CODE_SCRIPT = """
import json, sys
import torch
torch.set_num_threads(1)
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

folder, inputs_file, out_file, with_processor = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
model = AutoModelForImageTextToText.from_pretrained(
    folder, trust_remote_code=True, dtype=torch.float32, attn_implementation="eager"
).eval()
prompt = None
if with_processor:
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
with torch.no_grad():
    logits = model(**load_file(inputs_file)).logits
save_file({"logits": logits.contiguous()}, out_file)
print(json.dumps({
    "class": type(model).__module__ + "." + type(model).__name__,
    "prompt": prompt,
    "visor_hf_imported": any(name == "visor_hf" or name.startswith("visor_hf.") for name in sys.modules),
}))
"""


def _check_remote_code(folder: str, report: list[str], inputs: dict, expected: torch.Tensor, with_processor: bool) -> list[str]:
    """Load `folder` with `trust_remote_code=True` in a fresh process that never imports visor_hf (as a Hub user
    without the package would), run the same inputs, compare the logits (and the rendered prompt) with ours."""
    import json
    import os
    import subprocess
    import tempfile

    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory() as scratch:
        inputs_file, out_file = os.path.join(scratch, "inputs.safetensors"), os.path.join(scratch, "out.safetensors")
        save_file({k: v.contiguous() for k, v in inputs.items() if isinstance(v, torch.Tensor)}, inputs_file)
        env = {**os.environ, "HF_MODULES_CACHE": os.path.join(scratch, "modules"), "PYTHONPATH": ""}
        result = subprocess.run(
            [sys.executable, "-c", REMOTE_CODE_SCRIPT, os.path.abspath(folder) if os.path.isdir(folder) else folder,
             inputs_file, out_file, "1" if with_processor else "0"],
            cwd=scratch, env=env, capture_output=True, text=True,
        )
        if result.returncode != 0:
            return [f"remote code: loading with trust_remote_code=True failed in a fresh process:\n{result.stderr[-2000:]}"]
        info = json.loads(result.stdout.strip().splitlines()[-1])
        logits = load_file(out_file)["logits"]
    failures = []
    if not info["class"].startswith("transformers_modules."):
        failures.append(f"remote code: the fresh process loaded {info['class']}, not the checkpoint's code")
    if info["visor_hf_imported"]:
        failures.append("remote code: the fresh process imported visor_hf")
    difference = (logits - expected).abs().max().item() if logits.shape == expected.shape else float("inf")
    report.append(f"remote code (fresh process, visor_hf not imported): {info['class']}, max |logit difference| {difference:.3g}")
    if not difference <= 1e-5:
        failures.append(f"remote code: logits differ from visor_hf's by {difference:.3g}")
    if with_processor:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in this image?"}]}]
        from transformers import AutoProcessor

        local = AutoProcessor.from_pretrained(folder).apply_chat_template(conversation, add_generation_prompt=True)
        if info["prompt"] != local:
            failures.append(f"remote code: the processor renders {info['prompt']!r}, visor_hf's renders {local!r}")
    return failures


def _check_against(args, report: list[str], inputs: dict) -> list[str]:
    from transformers import AutoModelForImageTextToText

    from ..conversion import check_source, resolve_source
    from ..conversion.families import family_of

    failures = []
    source = resolve_source(args.against)
    family = family_of(check_source(source)["model_type"])
    llava = family.source_model_class().from_pretrained(
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
        ).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
    # LLaVA-OV inputs: the same prompt without the routing token (dense equivalence is judged on the source's ids).
    routing_token_id = dense.config.routing_token_id
    if routing_token_id is not None and (inputs["input_ids"] == routing_token_id).any():
        raise AssertionError("internal error: the LLaVA-OV prompt holds the routing token")
    with torch.no_grad():
        reference = llava(**inputs).logits
        logits = dense(**inputs).logits
    # the source's vocabulary: a routing token that got a new row adds a logit column the source does not have
    logits = logits[..., : reference.shape[-1]]
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



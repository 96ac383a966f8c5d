"""`visor-hf demo`: build a tiny VISOR model, run it on generated images, print what happened."""

from __future__ import annotations

import argparse
import os

import torch


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("demo", help="run a tiny random VISOR model end to end and print what happened")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random tiny model and picture")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from ..testing import ROUTE_ID, TINY_LAYOUT, build_batch, tiny_llava, visor_from_llava, word_ids

    torch.manual_seed(args.seed)
    llava = tiny_llava(seed=args.seed)
    dense = visor_from_llava(llava)
    visor = visor_from_llava(llava, **TINY_LAYOUT)
    samples = [
        {"text": ["<image>", *word_ids("what is the colour of background ?"), ROUTE_ID], "images": [(24, 40)]},
        {"text": [*word_ids("how many red circle ?"), ROUTE_ID]},
    ]
    batch = build_batch(llava, samples, seed=args.seed)
    print(f"tiny LLaVA-OV: {sum(p.numel() for p in llava.parameters()):,} parameters, "
          f"{llava.config.text_config.num_hidden_layers} LLM layers; batch of {len(samples)} "
          f"({int((batch['input_ids'] == llava.config.image_token_id).sum())} image tokens)")
    with torch.no_grad():
        reference = llava(**batch).logits
        same = dense(**batch).logits
        valid = batch["attention_mask"].bool()
        print(f"dense VISOR vs LLaVA-OV: max |logit difference| = {(reference - same)[valid].abs().max():.2e}")
        print(f"VISOR layout: CA {TINY_LAYOUT['cross_attention_layers']}, SA {TINY_LAYOUT['self_attention_layers']}, "
              f"router after layer {TINY_LAYOUT['router_layer']}")
        for request in (0, 1, "max", "auto"):
            out = visor(**batch, visor_configuration=request)
            print(f"  visor_configuration={request!r:7}: SA layers per sample {out.visor_configurations}")
        generated = visor.generate(**batch, max_new_tokens=5, do_sample=False, visor_configuration="auto")
        print(f"greedy continuation (token ids): {generated[:, batch['input_ids'].shape[1]:].tolist()}")
    return 0

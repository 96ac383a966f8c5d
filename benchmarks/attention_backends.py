"""Attention backends on CPU: eager, sdpa and flex attention on the same random small VISOR model (a mixed batch:
CA blocks, text-only layers, SA layers with hidden visual keys, a decoding loop).

Reports per backend the first call (flex attention compiles its kernel and its block masks there), then the best of
interleaved rounds of a prefill and of greedy decoding, as CPU time of the process (one thread: what a shared machine
disturbs least) next to wall time, and the largest logit difference against eager.

    python benchmarks/attention_backends.py [--threads 1] [--layers 12] [--batch 4] [--images 4] [--new 16] [--repeats 3]

Flex attention is compiled with static shapes (`--dynamic` lets dynamo make them dynamic, which torch 2.13's CPU flex
kernel fails to compile): every new shape compiles again, and past dynamo's recompile limit (8) flex attention runs
its unfused reference implementation, as it does on CPU without compilation.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch._dynamo

from visor_hf.modeling import uniform_layer_layout
from visor_hf.testing import build_batch, tiny_llava, visor_from_llava, word_ids

BACKENDS = ("eager", "sdpa", "flex_attention")


def build_models(layers: int) -> dict:
    llava = tiny_llava(
        seed=0,
        attn_implementation="eager",
        num_layers=layers,
        hidden_size=256,
        intermediate_size=1024,
        num_attention_heads=8,
        num_key_value_heads=2,
    )
    cross, selfs = uniform_layer_layout(layers)
    layout = {
        "cross_attention_layers": cross,
        "self_attention_layers": selfs,
        "configurations": [selfs[:1], selfs[: len(selfs) // 2], selfs],
    }
    models = {name: visor_from_llava(llava, attn_implementation=name, **layout).eval() for name in BACKENDS}
    for model in models.values():  # the same weights, the new modules' included
        model.load_state_dict(models["eager"].state_dict())
    return models


def samples(batch: int, images: int) -> list[dict]:
    return [
        {
            "text": [*word_ids("user"), *["<image>"] * images, *word_ids("what is the colour of background ?" + " yes" * i)],
            "images": [(32, 32)] * images,
            "seed": i,
        }
        for i in range(batch)
    ]


def timed(fn) -> tuple[float, float, object]:
    wall, cpu = time.perf_counter(), time.process_time()
    with torch.no_grad():
        out = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--new", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dynamic", action="store_true", help="let dynamo compile dynamic shapes (fails on torch 2.13 CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    # torch 2.13's CPU flex kernel fails to compile (C++ codegen error) once dynamo makes its shapes dynamic
    torch._dynamo.config.automatic_dynamic_shapes = args.dynamic
    models = build_models(args.layers)
    batch = build_batch(models["eager"], samples(args.batch, args.images))
    request = torch.tensor([i % 3 for i in range(args.batch)])  # mixed configurations: hidden visual keys in SA layers
    n_visual = int((batch["input_ids"][0] == models["eager"].config.image_token_id).sum())
    print(
        f"model: {args.layers} layers, d=256, 8 heads / 2 kv heads, CA {models['eager'].config.cross_attention_layers}; "
        f"batch {args.batch} x {batch['input_ids'].shape[1]} tokens ({n_visual} visual per sample), configurations {request.tolist()}, "
        f"{args.new} new tokens, {args.threads} thread(s), torch {torch.__version__}"
    )
    generate = {"max_new_tokens": args.new, "min_new_tokens": args.new, "do_sample": False}
    valid = batch["attention_mask"].bool()

    def prefill(name):
        return lambda: models[name](**batch, visor_configuration=request, use_cache=True)

    def decode(name):
        return lambda: models[name].generate(**batch, visor_configuration=request, **generate)

    reference = None
    for name in BACKENDS:
        wall, cpu, out = timed(prefill(name))
        reference = out.logits if reference is None else reference
        diff = (out.logits[valid] - reference[valid]).abs().max().item()
        first = timed(decode(name))
        print(
            f"{name:15s} first prefill {wall:7.2f} s wall / {cpu:7.2f} s CPU; first generate {first[0]:7.2f} s wall; "
            f"max |logit - eager| {diff:.1e}"
        )
    best = {(name, kind): (float("inf"), float("inf")) for name in BACKENDS for kind in ("prefill", "generate")}
    for _ in range(args.repeats):  # interleaved: background load hits every backend alike
        for name in BACKENDS:
            for kind, fn in (("prefill", prefill(name)), ("generate", decode(name))):
                wall, cpu, _ = timed(fn)
                best[name, kind] = (min(best[name, kind][0], wall), min(best[name, kind][1], cpu))
    print(f"best of {args.repeats} interleaved rounds (CPU time; wall in brackets), and the ratio to sdpa's CPU time:")
    for name in BACKENDS:
        cells = []
        for kind in ("prefill", "generate"):
            wall, cpu = best[name, kind]
            cells.append(f"{kind} {cpu * 1e3:8.1f} ms ({wall * 1e3:8.1f}) x{cpu / best['sdpa', kind][1]:.2f}")
        print(f"{name:15s} " + "   ".join(cells))


if __name__ == "__main__":
    main()

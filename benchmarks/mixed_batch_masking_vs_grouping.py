"""Mixed batches: masking (one batch, visual keys blocked for samples whose SA layer is off) vs grouping (one
sub-batch per configuration), on a random small VISOR model on CPU. Reports wall time of prefill and of greedy
decoding, and the cache memory, for both, plus a batch where every sample has the same configuration.

    python benchmarks/mixed_batch_masking_vs_grouping.py [--threads 1] [--batch 6] [--images 6] [--new 16]
"""

from __future__ import annotations

import argparse
import time

import torch

from visor_hf.modeling import uniform_layer_layout
from visor_hf.testing import ROUTE_ID, build_batch, tiny_llava, visor_from_llava, word_ids


def build_model(layers: int):
    llava = tiny_llava(seed=0, attn_implementation="sdpa", num_layers=layers, hidden_size=256, intermediate_size=1024,
                       num_attention_heads=8, num_key_value_heads=2)
    cross, selfs = uniform_layer_layout(layers)
    configurations = [selfs[:1], selfs[: len(selfs) // 2], selfs]
    model = visor_from_llava(llava, attn_implementation="sdpa", cross_attention_layers=cross, self_attention_layers=selfs,
                             configurations=configurations, router_layer=0, routing_token_id=ROUTE_ID)
    return model.eval()


def samples(batch: int, images: int):
    out = []
    for i in range(batch):
        text = [*word_ids("user")] + ["<image>"] * images + word_ids("what is the colour of background in row one ?" + " yes" * (i % 4))
        out.append({"text": [*text, ROUTE_ID], "images": [(32, 32)] * images, "seed": i})
    return out


def timed(fn, repeats: int):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--batch", type=int, default=6)
    parser.add_argument("--images", type=int, default=6)
    parser.add_argument("--new", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model(args.layers)
    data = samples(args.batch, args.images)
    batch = build_batch(model, data)
    n_visual = int((batch["input_ids"][0] == model.config.image_token_id).sum())
    print(f"model: {args.layers} layers, d=256, CA {model.config.cross_attention_layers}, configurations {model.config.configurations}")
    print(f"batch {args.batch} x ~{batch['input_ids'].shape[1]} tokens ({n_visual} visual per sample), {args.new} new tokens, {args.threads} thread(s)")
    mixed = [i % 3 for i in range(args.batch)]
    generate = dict(max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False)

    def prefill(b, conf):
        with torch.no_grad():
            return model(**b, visor_configuration=conf, use_cache=True, logits_to_keep=1)

    def grouped(fn):
        results = []
        for conf in sorted(set(mixed)):
            rows = [i for i, c in enumerate(mixed) if c == conf]
            results.append(fn(build_batch(model, [data[i] for i in rows]), conf))
        return results

    rows = []
    t, out = timed(lambda: prefill(batch, torch.tensor(mixed)), args.repeats)
    g, _ = timed(lambda: model.generate(**batch, visor_configuration=torch.tensor(mixed), **generate), args.repeats)
    rows.append(("mixed, masking (one batch)", t, g, out.past_key_values.memory_bytes()))
    t, outs = timed(lambda: grouped(prefill), args.repeats)
    g, _ = timed(lambda: grouped(lambda b, c: model.generate(**b, visor_configuration=c, **generate)), args.repeats)
    rows.append(("mixed, grouping (3 sub-batches)", t, g, sum(o.past_key_values.memory_bytes() for o in outs)))
    for conf in range(3):
        t, out = timed(lambda conf=conf: prefill(batch, conf), args.repeats)
        g, _ = timed(lambda conf=conf: model.generate(**batch, visor_configuration=conf, **generate), args.repeats)
        rows.append((f"uniform configuration {conf}", t, g, out.past_key_values.memory_bytes()))
    print(f"{'batch':34s} {'prefill s':>10s} {'generate s':>11s} {'cache MB':>9s}")
    for name, t, g, mem in rows:
        print(f"{name:34s} {t:10.3f} {g:11.3f} {mem / 2**20:9.2f}")


if __name__ == "__main__":
    main()

"""Mixed batches: masking (one batch, visual keys blocked for samples whose SA layer is off) vs grouping (one
sub-batch per configuration), on a random small VISOR model on CPU. Reports the time of prefill and of greedy
decoding (best of the interleaved rounds; CPU time of the process next to wall time, since with one thread the CPU
time is what a shared, loaded machine disturbs least), and the cache memory, for both, plus a batch where every
sample has the same configuration.

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

    # the sub-batches are built once, outside the timed region: only the model's work is timed
    groups = {
        conf: build_batch(model, [data[i] for i, c in enumerate(mixed) if c == conf]) for conf in sorted(set(mixed))
    }

    def grouped(fn):
        return [fn(sub_batch, conf) for conf, sub_batch in groups.items()]

    variants = [("mixed, masking (one batch)", lambda: [prefill(batch, torch.tensor(mixed))],
                 lambda: model.generate(**batch, visor_configuration=torch.tensor(mixed), **generate)),
                ("mixed, grouping (3 sub-batches)", lambda: grouped(prefill),
                 lambda: grouped(lambda b, c: model.generate(**b, visor_configuration=c, **generate)))]
    for conf in range(3):
        variants.append((f"uniform configuration {conf}", lambda conf=conf: [prefill(batch, conf)],
                         lambda conf=conf: model.generate(**batch, visor_configuration=conf, **generate)))
    # rounds interleave the variants, and each keeps its best time: on a shared machine a burst of load then
    # slows one round of every variant rather than all the runs of one variant
    best = {name: [float("inf")] * 4 for name, _, _ in variants}  # wall prefill, wall generate, cpu prefill, cpu generate
    memory = {}
    for round_index in range(args.repeats + 1):  # round 0 warms up
        for name, run_prefill, run_generate in variants:
            for slot, fn in enumerate((run_prefill, run_generate)):
                start, start_cpu = time.perf_counter(), time.process_time()
                result = fn()
                if round_index:
                    best[name][slot] = min(best[name][slot], time.perf_counter() - start)
                    best[name][slot + 2] = min(best[name][slot + 2], time.process_time() - start_cpu)
                if slot == 0:
                    memory[name] = sum(out.past_key_values.memory_bytes() for out in result)
    rows = [(name, *best[name], memory[name]) for name, _, _ in variants]
    print(f"{'batch':34s} {'prefill s':>10s} {'generate s':>11s} {'prefill cpu s':>14s} {'generate cpu s':>15s} {'cache MB':>9s}")
    for name, t, g, tc, gc, mem in rows:
        print(f"{name:34s} {t:10.3f} {g:11.3f} {tc:14.3f} {gc:15.3f} {mem / 2**20:9.2f}")


if __name__ == "__main__":
    main()

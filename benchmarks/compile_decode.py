"""Decoding with `torch.compile` vs eager: dense LLaVA-OneVision (transformers) and VISOR side by side, one process.

Random weights with LLaVA-OV 0.5B's LLM shapes (Qwen2-0.5B: hidden 896, 14 heads, 2 kv heads, FFN 4864, vocab
151936), `--layers` LLM layers (default 8 instead of 24: compile time grows with the layer count; CA/SA layers spread
as in the paper's layout); the vision tower is not run (the LLM gets random image features, as in `run.py`). One
prompt: 64 text tokens around `--visual-tokens` image tokens, batch 1, SDPA, float32, CPU.

Rows: the decoding step (one new token, `logits_to_keep=1`) of
- ``dense``: `LlavaOnevisionForConditionalGeneration` with its `DynamicCache`;
- ``dense_static``: the same with transformers' `StaticCache` (the mask padded to `max_cache_len`, as `generate` does);
- ``visor``: VISOR (CA layers + `--sa` SA layers active) with `VisorCache`;
- ``visor_static``: the same with `VisorStaticCache`.

For each row: the graph breaks of one step (`torch._dynamo.explain`), then the step compiled with `--backend`
(default inductor; `dynamic=False` for the static caches, default automatic dynamic shapes otherwise): the wall time
of the first and second compiled steps (compilation), how many graphs are compiled during warm-up and after it
(a recompilation per step would show), and the steady decoding time per token, eager and compiled, as medians of
`--rounds` rounds of `--steps` steps each, rounds interleaving the rows and eager/compiled (each round starts from
a fresh prefill, not timed). Process CPU time is the main figure (the machine is shared); wall time is printed too.

    python benchmarks/compile_decode.py                         # 8 layers, 729 visual tokens, inductor
    python benchmarks/compile_decode.py --layers 2 --visual-tokens 64 --steps 4 --rounds 2   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import LlavaOnevisionForConditionalGeneration, StaticCache
from visor_bench.shapes import QWEN2_0_5B, llava_config, make_features, make_inputs, patch_image_features

from visor_hf.modeling import VisorCache, VisorStaticCache, uniform_layer_layout
from visor_hf.testing import visor_from_llava

RESULTS = Path(__file__).resolve().parent / "results" / "compile_decode"


class Row:
    """One model and cache kind: `prefill()` -> (token, mask, cache, pad_to); `step(token, mask, cache)` -> logits."""

    def __init__(self, name, model, make_cache, static, request=None):
        self.name, self.model, self.make_cache, self.static, self.request = name, model, make_cache, static, request
        self.result: dict = {"eager_cpu_ms": [], "eager_wall_ms": [], "compiled_cpu_ms": [], "compiled_wall_ms": []}

    def prefill(self, input_ids, features, extra_room):
        patch_image_features(self.model, [features])
        cache = self.make_cache(input_ids.shape[1] + extra_room)
        kwargs = {"visor_configuration": self.request} if self.request is not None else {}
        with torch.inference_mode():
            out = self.model(
                input_ids=input_ids,
                pixel_values=torch.zeros(1, 1),
                past_key_values=cache,
                use_cache=True,
                logits_to_keep=1,
                **kwargs,
            )
            # inference tensors, as every later step's: a normal tensor would make the second step recompile
            token, mask = out.logits[:, -1:].argmax(-1), torch.ones_like(input_ids)
        pad_to = input_ids.shape[1] + extra_room if self.static else None
        return token, mask, out.past_key_values, pad_to

    def step(self, token, mask, cache):
        return self.model(input_ids=token, attention_mask=mask, past_key_values=cache, use_cache=True, logits_to_keep=1).logits


def decode(step, token, mask, cache, pad_to, steps, times=None):
    """`steps` greedy steps; with `times` = (cpu list, wall list), their mean ms per token is appended."""
    cpu, wall = time.process_time(), time.perf_counter()
    with torch.inference_mode():
        for _ in range(steps):
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            given = mask if pad_to is None else torch.nn.functional.pad(mask, (0, pad_to - mask.shape[1]))
            token = step(token, given, cache)[:, -1:].argmax(-1)
    if times is not None:
        times[0].append(1000 * (time.process_time() - cpu) / steps)
        times[1].append(1000 * (time.perf_counter() - wall) / steps)
    return token


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--visual-tokens", type=int, default=729)
    parser.add_argument("--sa", type=int, default=2, help="SA layers active in the VISOR rows (spread evenly)")
    parser.add_argument("--steps", type=int, default=16, help="decoding steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", default="dense,dense_static,visor,visor_static")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch._dynamo.config.recompile_limit = 64  # several models in one process share code objects (decoder layers)
    load_at_start = os.getloadavg()
    started = time.time()

    def log(message):
        print(f"[{time.time() - started:7.1f}s] {message}", flush=True)

    torch.manual_seed(0)
    config = llava_config({**QWEN2_0_5B, "num_hidden_layers": args.layers})
    config.vision_config.num_hidden_layers = 1  # the tower is not run: image features are given
    llava = LlavaOnevisionForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()
    ca, sa = uniform_layer_layout(args.layers)
    active = sa[:: max(1, len(sa) // args.sa)][: args.sa]
    visor = visor_from_llava(
        llava,
        attn_implementation="sdpa",
        cross_attention_layers=ca,
        self_attention_layers=sa,
        configurations=[sa],
        router_layer=None,
    ).eval()
    log(f"{args.layers} layers; VISOR CA {ca}, SA {sa}, active {active}")
    text = config.text_config
    rows = {
        "dense": Row("dense", llava, lambda length: None, False),
        "dense_static": Row("dense_static", llava, lambda length: StaticCache(config=text, max_cache_len=length), True),
        "visor": Row("visor", visor, lambda length: VisorCache(config=text), False, active),
        "visor_static": Row(
            "visor_static", visor, lambda length: VisorStaticCache(config=text, max_cache_len=length), True, active
        ),
    }
    rows = [rows[name] for name in args.rows.split(",")]
    input_ids = make_inputs(args.visual_tokens, 1, torch.device("cpu"))
    features = make_features(args.visual_tokens, text.hidden_size, torch.float32, torch.device("cpu"))
    room = (args.rounds + 2) * args.steps + 2  # every round starts from a fresh prefill; room for warm-up too

    for row in rows:
        token, mask, cache, pad_to = row.prefill(input_ids, features, room)
        given = torch.cat([mask, torch.ones_like(token)], 1)
        given = given if pad_to is None else torch.nn.functional.pad(given, (0, pad_to - given.shape[1]))
        with torch.inference_mode():
            explained = torch._dynamo.explain(row.step)(token, given, cache)
        row.result["graphs"] = explained.graph_count
        row.result["graph_breaks"] = explained.graph_break_count
        row.result["break_reasons"] = sorted({b.reason.splitlines()[0][:160] for b in explained.break_reasons})
        log(f"{row.name}: {explained.graph_count} graphs, {explained.graph_break_count} breaks {row.result['break_reasons']}")
    for row in rows:  # after every `explain`, which resets dynamo's caches
        counter = CompileCounterWithBackend(args.backend)
        row.compiled = torch.compile(row.step, backend=counter, dynamic=False if row.static else None)
        row.counter = counter
        token, mask, cache, pad_to = row.prefill(input_ids, features, room)
        firsts = []
        for _ in range(2):
            wall = time.perf_counter()
            token = decode(row.compiled, token, mask, cache, pad_to, 1)
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            firsts.append(time.perf_counter() - wall)
        decode(row.compiled, token, mask, cache, pad_to, args.steps)  # warm-up of the steady state
        row.result["first_step_s"], row.result["second_step_s"] = firsts
        row.result["graphs_compiled_in_warmup"] = counter.frame_count
        log(f"{row.name}: compiled steps 1, 2: {firsts[0]:.1f}s, {firsts[1]:.1f}s; {counter.frame_count} graphs compiled")

    for round_index in range(args.rounds):
        for row in rows:
            for kind, step in (("eager", row.step), ("compiled", row.compiled)):
                token, mask, cache, pad_to = row.prefill(input_ids, features, room)
                times = (row.result[f"{kind}_cpu_ms"], row.result[f"{kind}_wall_ms"])
                decode(step, token, mask, cache, pad_to, args.steps, times)
        log(f"round {round_index + 1}/{args.rounds} done")

    table = [
        "| row | graphs / breaks per step | compiled step 1 / step 2 (s) | graphs compiled: warm-up / after | "
        "eager ms/token (CPU) | compiled ms/token (CPU) | speed-up | eager / compiled wall ms |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        r = row.result
        r["graphs_compiled_after_warmup"] = row.counter.frame_count - r["graphs_compiled_in_warmup"]
        for key in ("eager_cpu_ms", "eager_wall_ms", "compiled_cpu_ms", "compiled_wall_ms"):
            r[f"{key}_median"] = statistics.median(r[key])
        speedup = r["eager_cpu_ms_median"] / r["compiled_cpu_ms_median"]
        table.append(
            f"| {row.name} | {r['graphs']} / {r['graph_breaks']} | {r['first_step_s']:.1f} / {r['second_step_s']:.1f} | "
            f"{r['graphs_compiled_in_warmup']} / {r['graphs_compiled_after_warmup']} | {r['eager_cpu_ms_median']:.1f} | "
            f"{r['compiled_cpu_ms_median']:.1f} | {speedup:.2f}x | {r['eager_wall_ms_median']:.1f} / "
            f"{r['compiled_wall_ms_median']:.1f} |"
        )
    print("\n".join(table))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "command": " ".join(["python", "benchmarks/compile_decode.py", *(argv if argv is not None else sys.argv[1:])]),
        "args": vars(args),
        "torch": torch.__version__,
        "load_average_at_start": load_at_start,
        "load_average_at_end": os.getloadavg(),
        "cross_attention_layers": ca,
        "self_attention_layers": sa,
        "active_sa_layers": active,
        "rows": {row.name: row.result for row in rows},
        "table": table,
    }
    (out / "results.json").write_text(json.dumps(report, indent=1))
    (out / "results.md").write_text("\n".join(table) + "\n")
    log(f"written to {out}")


if __name__ == "__main__":
    main()

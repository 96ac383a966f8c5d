"""VISOR vs dense LLaVA-OneVision: prefill latency, decode speed, KV-cache bytes and peak memory, next to the
analytical FLOPs of every row (issue 5; what is counted: docs/benchmarks.md, "What the FLOPs count").

Random weights with the real shapes of LLaVA-OV 0.5B (Qwen2-0.5B LLM: 24 layers, hidden 896, 14 heads, 2 kv
heads, FFN 4864, vocab 151936; SigLIP-so400m tower). Nothing is downloaded. The vision tower and projector are the
same for every method, so the LLM is fed the same random image features (`get_image_features` is replaced on
every model) and the tower is timed once per crop and counted separately (`vision_flops`).

Rows, per visual-token count (batch 1, one image, 64 text tokens around it):
- ``dense``: LLaVA-OV (transformers' `LlavaOnevisionForConditionalGeneration`, SDPA);
- ``visor_dense``: VISOR in the dense layout (every layer an active SA layer, no CA layer; the same logits as
  LLaVA-OV): what the VISOR engine itself costs;
- ``visor_ca``: VISOR, paper layout (CA/SA 8 + 8), no SA layer active (cross-attention only);
- ``visor_sa1/2/4``: 1, 2, 4 SA layers active (evenly spread over the 8 SA layers);
- ``visor_max``: all 8 SA layers (= "max");
- ``pool2x``/``pool4x``: dense LLaVA-OV on visual tokens average-pooled 2x / 4x (consecutive tokens) before the LLM;
- ``fastv``: dense LLaVA-OV with FastV pruning (K=2, R=50 %): layers 0-1 run over every token; before layer 2
  the 50 % of visual tokens that received the most attention in layer 1 (mean over heads of the attention from
  the text tokens after the image) are kept, with their original positions, for layers 2-23 and their cache;
- ``visionzip``, ``visor_ca_visionzip``, ``visor_sa2_visionzip``: dense LLaVA-OV, VISOR CA only and VISOR 2 SA on
  the tokens VisionZip keeps (``--reduction``, default ``visionzip:0.25``; `visor_hf.modeling.reduction_visor`),
  the reduction itself (its scoring pass and merge) inside the timed prefill and in the FLOPs;
- ``visor_tr2_ca/sa2/max``, ``visor_tr4_ca/sa2/max``: VISOR-TR, the VISOR model packing the visual tokens 2x / 4x
  (``visor_packing=``, the packing module inside the timed prefill and in the FLOPs) of a real image whose LLaVA-OV
  layout holds the column's tokens (`visor_bench/packing.py`; a column without one gets no VISOR-TR row).
Plus a batch of 4 with mixed VISOR configurations, against the dense batch and the four samples run alone, and
(unless ``--no-7b``) FLOPs-only rows for LLaVA-OV 7B shapes.

Every prefill passes ``logits_to_keep=1``; timings are medians of ``--repeats`` runs after one warm-up run, run
round-robin over the rows (so background load hits every row alike). Device-agnostic: every timing and memory
reading synchronises CUDA first; peak memory is `max_memory_allocated` on CUDA, the heap in use on CPU.

    python benchmarks/run.py --profile            # the full run (about 13 min on 2 idle CPU cores)
    python benchmarks/run.py --quick              # smoke test (small sizes, 1 repeat) into results/quick/
    python benchmarks/run.py --device cuda --dtype bfloat16
    python benchmarks/run.py --from-json benchmarks/results/results.json --recompute-flops   # re-render

The parts live in `visor_bench/` (shapes and inputs, FastV, memory, timing, report, plots); this file builds the
models and rows and drives a run. The JSON and markdown are written before the plots; without matplotlib (the
`bench` extra) the plots are skipped with a warning.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from transformers import LlavaOnevisionForConditionalGeneration
from visor_bench.fastv import fastv_decode_step, fastv_flops, fastv_prefill
from visor_bench.packing import PACKING_ROWS, packing_layout, packing_row_flops
from visor_bench.reduction import ranking_layer_input, reduce_features, reduction_row_flops
from visor_bench.report import flops_only_7b, recompute_flops, write_outputs
from visor_bench.shapes import (
    QWEN2_0_5B,
    SIGLIP_SO400M,
    TEXT_AFTER,
    TEXT_BEFORE,
    TOKENS_PER_CROP,
    llava_config,
    make_features,
    make_inputs,
    patch_image_features,
    pool_features,
)
from visor_bench.timing import machine, measure_mixed_batch, measure_size, profile_rows, timed

from visor_hf.modeling import uniform_layer_layout
from visor_hf.modeling.flops_visor import FlopsShape, decode_flops, prefill_flops, projector_flops, vision_flops
from visor_hf.modeling.reduction_visor import TokenReduction
from visor_hf.testing import visor_from_llava

RESULTS = Path(__file__).resolve().parent / "results"


class Row:
    """One method at one size: `prefill()` returns (logits, cache, logical length); `decode(token, cache, pos)`."""

    def __init__(self, name, label, prefill, decode, flops_prefill, flops_decode, llm_visual_tokens):
        self.name, self.label = name, label
        self.prefill, self.decode = prefill, decode
        self.flops_prefill, self.flops_decode = flops_prefill, flops_decode
        self.llm_visual_tokens = llm_visual_tokens
        self.times: list[float] = []
        self.cpu_times: list[float] = []
        self.result: dict = {}


def build_rows(llava, visor, n_visual, args, device, dtype, shape, ca, sa_sets, feature_seed=0, visor_dense=None,
               visor_tr=None, log=print):
    hidden = llava.config.text_config.hidden_size
    n_text = TEXT_BEFORE + TEXT_AFTER
    input_ids = make_inputs(n_visual, 1, device)
    features = make_features(n_visual, hidden, dtype, device, seed=feature_seed)
    dense_prefill, dense_decode = prefill_flops(shape, n_text, n_visual), decode_flops(shape, n_text, n_visual)

    @torch.inference_mode()
    def run_llava(ids, feats):
        patch_image_features(llava, [feats])
        out = llava(input_ids=ids, pixel_values=torch.zeros(1, 1, device=device), use_cache=True, logits_to_keep=1)
        return out.logits, out.past_key_values, ids.shape[1]

    @torch.inference_mode()
    def llava_step(token, cache, position):
        return llava(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1).logits

    def run_visor(layers, model=visor):
        @torch.inference_mode()
        def run():
            patch_image_features(model, [features])
            out = model(input_ids=input_ids, pixel_values=torch.zeros(1, 1, device=device), use_cache=True,
                        logits_to_keep=1, visor_configuration=list(layers))
            return out.logits, out.past_key_values, input_ids.shape[1]
        return run

    def visor_step(model=visor):
        @torch.inference_mode()
        def step(token, cache, position):
            return model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        return step

    rows = [Row("dense", "LLaVA-OV (dense)", lambda: run_llava(input_ids, features), llava_step,
                dense_prefill, dense_decode, n_visual)]
    if visor_dense is not None:
        every = list(range(shape.num_layers))
        rows.append(Row("visor_dense", f"VISOR dense layout ({shape.num_layers} SA, no CA)",
                        run_visor(every, visor_dense), visor_step(visor_dense),
                        prefill_flops(shape, n_text, n_visual, every, []), decode_flops(shape, n_text, n_visual, every, []),
                        n_visual))
        rows[-1].result.update(sa_layers=every, ca_layers=[])
    for name, label, layers in sa_sets:
        rows.append(Row(name, label, run_visor(layers), visor_step(),
                        prefill_flops(shape, n_text, n_visual, layers, ca),
                        decode_flops(shape, n_text, n_visual, layers, ca), n_visual))
        rows[-1].result["sa_layers"] = list(layers)
    for factor in (2, 4):
        pooled = pool_features(features, factor)
        ids = make_inputs(pooled.shape[0], 1, device)
        rows.append(Row(f"pool{factor}x", f"dense + visual pooling {factor}x",
                        (lambda ids=ids, pooled=pooled: run_llava(ids, pooled)), llava_step,
                        prefill_flops(shape, n_text, pooled.shape[0]), decode_flops(shape, n_text, pooled.shape[0]),
                        pooled.shape[0]))
    rows += reduction_rows(llava, features, n_visual, args, device, dtype, shape, ca, sa_sets, run_llava, llava_step,
                           visor, visor_step)
    if visor_tr is not None:
        rows += packing_rows(visor_tr, features, n_visual, device, shape, ca, sa_sets, visor_step, log)
    fv_prefill, fv_decode = fastv_flops(shape, n_text, n_visual)
    rows.append(Row("fastv", "dense + FastV (K=2, 50 %)",
                    lambda: fastv_prefill(llava, input_ids, features, n_visual),
                    lambda token, cache, position: fastv_decode_step(llava, token, cache, position),
                    fv_prefill, fv_decode, f"{n_visual}->{int(round(n_visual * 0.5))}"))
    for row in rows:
        row.flops_ratio_prefill = dense_prefill / row.flops_prefill
        row.flops_ratio_decode = dense_decode / row.flops_decode
    return rows


def reduction_rows(llava, features, n_visual, args, device, dtype, shape, ca, sa_sets, run_llava, llava_step, visor,
                   visor_step):
    """Dense LLaVA-OV, VISOR CA only and VISOR 2 SA with VisionZip before the LLM (reduction timed in the row)."""
    reduction = TokenReduction.parse(args.reduction)
    n_text = TEXT_BEFORE + TEXT_AFTER
    layer_input = ranking_layer_input(llava.config, n_visual, dtype, device)
    kept = reduction.count(n_visual)
    ids = make_inputs(kept, 1, device)

    def llava_reduced():
        return run_llava(ids, reduce_features(llava, features, layer_input, reduction))

    def visor_reduced(layers):
        @torch.inference_mode()
        def run():
            patch_image_features(visor, [reduce_features(visor, features, layer_input, reduction)])
            out = visor(input_ids=ids, pixel_values=torch.zeros(1, 1, device=device), use_cache=True,
                        logits_to_keep=1, visor_configuration=list(layers))
            return out.logits, out.past_key_values, ids.shape[1]
        return run

    rows = [Row("visionzip", f"dense + VisionZip ({reduction})", llava_reduced, llava_step,
                *reduction_row_flops(shape, llava.config, n_text, n_visual, reduction), f"{n_visual}->{kept}")]
    for name, label, layers in sa_sets:
        if name in ("visor_ca", "visor_sa2"):
            rows.append(Row(f"{name}_visionzip", f"{label} + VisionZip ({reduction})", visor_reduced(layers),
                            visor_step, *reduction_row_flops(shape, llava.config, n_text, n_visual, reduction, layers, ca),
                            f"{n_visual}->{kept}"))
            rows[-1].result["sa_layers"] = list(layers)
    for row in rows:
        row.result["reduction"] = str(reduction)
    return rows


def packing_rows(visor_tr, features, n_visual, device, shape, ca, sa_sets, visor_step, log):
    """VISOR-TR 2x / 4x: the model packs the column's features (a real image of `n_visual` tokens) inside the timed
    forward (`visor_packing=`), then runs CA only / 2 SA / max on the packed tokens (visor_bench/packing.py)."""
    found = packing_layout(visor_tr.config, n_visual)
    if found is None:
        log(f"  no VISOR-TR rows at {n_visual} visual tokens: no LLaVA-OV image of exactly that many tokens is listed")
        return []
    size, layout = found
    n_text = TEXT_BEFORE + TEXT_AFTER
    image_sizes = torch.tensor([list(size)], device=device)
    sets = {name.removeprefix("visor_"): (label, layers) for name, label, layers in sa_sets}

    def run_packed(ids, factor, layers):
        @torch.inference_mode()
        def run():
            patch_image_features(visor_tr, [features])
            out = visor_tr(input_ids=ids, pixel_values=torch.zeros(1, 1, device=device), image_sizes=image_sizes,
                           use_cache=True, logits_to_keep=1, visor_configuration=list(layers), visor_packing=factor)
            return out.logits, out.past_key_values, ids.shape[1]
        return run

    rows = []
    for factor, configurations in PACKING_ROWS.items():
        packed = layout.num_tokens(factor)
        ids = make_inputs(packed, 1, device)
        for configuration in configurations:
            label, layers = sets[configuration]
            rows.append(Row(f"visor_tr{factor}_{configuration}", label.replace("VISOR", f"VISOR-TR {factor}x", 1),
                            run_packed(ids, factor, layers), visor_step(visor_tr),
                            *packing_row_flops(shape, n_text, layout, factor, layers, ca), f"{n_visual}->{packed}"))
            rows[-1].result.update(sa_layers=list(layers), packing=factor, image_size=list(size))
    return rows


def share_weights(visor, llava):
    """One copy of the shared weights: VISOR reuses the dense model's LLM, LM head and vision tower."""
    visor.model.language_model = llava.model.language_model
    visor.lm_head = llava.lm_head
    visor.model.vision_tower = llava.model.vision_tower
    visor.model.multi_modal_projector = llava.model.multi_modal_projector
    visor.model.image_newline = llava.model.image_newline
    return visor.to(llava.device).eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (CPU)")
    parser.add_argument("--visual-tokens", default="729,2916,7290", help="comma-separated visual-token counts")
    parser.add_argument("--repeats", default="3,2,2", help="timed prefills per size (one value or one per size)")
    parser.add_argument("--new-tokens", type=int, default=16, help="decoding steps per row")
    parser.add_argument("--batch-visual-tokens", type=int, default=729, help="visual tokens per sample, batch of 4")
    parser.add_argument("--batch-repeats", type=int, default=2)
    parser.add_argument("--no-batch", action="store_true")
    parser.add_argument("--no-tower", action="store_true", help="do not time the vision tower")
    parser.add_argument("--profile", action="store_true", help="torch.profiler of VISOR CA-only and 2 SA, largest size")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 small sizes, 1 repeat, 4 new tokens")
    parser.add_argument("--rows", help="comma-separated subset of rows (default: all), e.g. dense,visor_ca,visor_sa2")
    parser.add_argument("--reduction", default="visionzip:0.25",
                        help="token reduction of the *_visionzip rows (visor_hf.modeling.reduction_visor)")
    parser.add_argument("--no-7b", action="store_true", help="leave out the FLOPs-only rows for LLaVA-OV 7B shapes")
    parser.add_argument("--out", help=f"output folder (default {RESULTS}; with --quick, {RESULTS / 'quick'})")
    parser.add_argument("--from-json", help="only re-render the table and plots of a results.json (into --out, "
                        "default: its folder)")
    parser.add_argument("--recompute-flops", action="store_true",
                        help="with --from-json: recompute every analytical FLOPs column with the current flops_visor")
    args = parser.parse_args(argv)
    if args.from_json:
        report = json.loads(Path(args.from_json).read_text())
        if args.recompute_flops:
            recompute_flops(report)
        out = Path(args.out) if args.out else Path(args.from_json).parent
        write_outputs(report, out, report["machine"]["torch_threads"], report["dtype"])
        return
    if args.recompute_flops:
        parser.error("--recompute-flops goes with --from-json")
    if args.quick:
        args.visual_tokens, args.repeats, args.new_tokens, args.batch_repeats = "64,256", "1", 4, 1
        args.batch_visual_tokens = 64
    # a smoke test never overwrites the results of a full run
    args.out = args.out or str(RESULTS / "quick" if args.quick else RESULTS)
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    sizes = [int(x) for x in args.visual_tokens.split(",")]
    repeats = [int(x) for x in args.repeats.split(",")]
    repeats = repeats * len(sizes) if len(repeats) == 1 else repeats
    if len(repeats) != len(sizes):
        parser.error("--repeats needs one value or one per size")
    directory = Path(args.out)
    directory.mkdir(parents=True, exist_ok=True)
    started = time.time()
    load_at_start = os.getloadavg()  # before this process builds anything

    def log(message):
        print(f"[{time.time() - started:7.1f}s] {message}", flush=True)

    torch.manual_seed(0)
    config = llava_config(QWEN2_0_5B)
    log("building LLaVA-OV 0.5B shapes (random weights)")
    llava = LlavaOnevisionForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=dtype)
    llava = llava.to(device).eval()
    num_layers = config.text_config.num_hidden_layers
    ca, sa = uniform_layer_layout(num_layers)
    log(f"converting to VISOR: CA layers {ca}, SA layers {sa}")
    visor = share_weights(visor_from_llava(llava, attn_implementation="sdpa", cross_attention_layers=ca,
                                           self_attention_layers=sa, configurations=[sa], router_layer=None), llava)
    wanted_rows = args.rows.split(",") if args.rows else None
    visor_dense = None
    if wanted_rows is None or "visor_dense" in wanted_rows:
        log("converting to VISOR, dense layout (every layer SA, no CA)")
        visor_dense = share_weights(visor_from_llava(llava, attn_implementation="sdpa"), llava)
    visor_tr = None
    if wanted_rows is None or any(name.startswith("visor_tr") for name in wanted_rows):
        log(f"converting to VISOR-TR: the paper layout with token packing {list(PACKING_ROWS)}")
        visor_tr = share_weights(visor_from_llava(llava, attn_implementation="sdpa", cross_attention_layers=ca,
                                                  self_attention_layers=sa, configurations=[sa], router_layer=None,
                                                  packing_factors=list(PACKING_ROWS)), llava)
    shape = FlopsShape.from_config(config)
    spread = lambda k: [sa[i] for i in range(0, len(sa), len(sa) // k)][:k]  # noqa: E731
    sa_sets = [("visor_ca", "VISOR CA only (0 SA)", [])]
    sa_sets += [(f"visor_sa{k}", f"VISOR {k} SA {spread(k)}", spread(k)) for k in (1, 2, 4)]
    sa_sets += [("visor_max", f"VISOR max (8 SA {sa})", list(sa))]

    vision_one_crop_s = None
    if not args.no_tower and not args.quick:
        tower = llava.model.vision_tower
        pixels = torch.randn(1, 3, 384, 384, device=device, dtype=dtype)
        with torch.inference_mode():
            timed(lambda: tower(pixels), device)
            vision_one_crop_s = min(timed(lambda: tower(pixels), device)[0] for _ in range(2))
        log(f"vision tower, one 384 px crop: {vision_one_crop_s:.2f}s")

    report = {
        "command": " ".join([os.path.basename(sys.executable), "benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])]),
        "machine": {**machine(device, args.threads), "load_average_at_start": load_at_start}, "dtype": args.dtype,
        "model": {"text": QWEN2_0_5B, "vision": SIGLIP_SO400M, "cross_attention_layers": ca,
                  "self_attention_layers": sa},
        "text_tokens": {"before_image": TEXT_BEFORE, "after_image": TEXT_AFTER},
        "vision_one_crop_s": vision_one_crop_s, "new_tokens": args.new_tokens, "sizes": [],
    }
    profile_candidates = None
    for n_visual, repeat in zip(sizes, repeats):
        log(f"size {n_visual} visual tokens, {repeat} repeats")
        rows = build_rows(llava, visor, n_visual, args, device, dtype, shape, ca, sa_sets, visor_dense=visor_dense,
                          visor_tr=visor_tr, log=log)
        if wanted_rows:
            rows = [row for row in rows if row.name in wanted_rows]
            if not rows or rows[0].name != "dense":
                parser.error("--rows must include dense (the reference of every ratio)")
        crops = max(1, math.ceil(n_visual / TOKENS_PER_CROP))
        results = measure_size(rows, repeat, args.new_tokens, device, log)
        report["sizes"].append({
            "n_visual": n_visual, "n_text": TEXT_BEFORE + TEXT_AFTER, "repeats": repeat, "crops": crops,
            "vision_gflops": vision_flops(config, crops, projector_out=0) / 1e9,
            "projector_gflops": projector_flops(config, crops) / 1e9,
            "vision_s_estimate": crops * vision_one_crop_s if vision_one_crop_s else None, "rows": results,
        })
        profile_candidates = rows
        (directory / "results.json").write_text(json.dumps(report, indent=1))
    if not args.no_batch:
        log(f"mixed batch of 4, {args.batch_visual_tokens} visual tokens each")
        configurations = [[], spread(2), spread(4), list(sa)]
        report["mixed_batch"] = measure_mixed_batch(llava, visor, args.batch_visual_tokens, configurations,
                                                    args.batch_repeats, device, dtype, shape, ca, log)
        (directory / "results.json").write_text(json.dumps(report, indent=1))
    if not args.no_7b:
        report["flops_only_7b"] = flops_only_7b(sizes)
    if args.profile and profile_candidates:
        chosen = [r for r in profile_candidates if r.name in ("visor_ca", "visor_sa2")]
        report["profiles"] = profile_rows(chosen, directory, device, log)
    report["total_seconds"] = time.time() - started
    report["machine"]["load_average_at_end"] = os.getloadavg()
    (directory / "results.json").write_text(json.dumps(report, indent=1))
    write_outputs(report, directory, args.threads, args.dtype)
    log(f"written to {directory}")



if __name__ == "__main__":
    main()

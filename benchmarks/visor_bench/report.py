"""The outputs of a run: `results.json` and `results.md` (written before any plot, so that a missing plotting
library never loses a run), the FLOPs-only 7B rows, and the re-computation of every FLOPs column of a results.json."""

from __future__ import annotations

import json
import math
from pathlib import Path

from visor_hf.modeling import uniform_layer_layout
from visor_hf.modeling.flops_visor import FlopsShape, decode_flops, prefill_flops, projector_flops, vision_flops
from visor_hf.modeling.packing_visor import image_token_layouts
from visor_hf.modeling.reduction_visor import TokenReduction

from .fastv import fastv_flops
from .packing import packing_row_flops
from .plots import plots
from .reduction import reduction_row_flops
from .shapes import QWEN2_0_5B, QWEN2_7B, TEXT_AFTER, TEXT_BEFORE, TOKENS_PER_CROP, llava_config


def fmt_bytes(n):
    return f"{n / 2**20:.0f}"


def markdown(report) -> str:
    lines = []
    for size in report["sizes"]:
        n_visual = size["n_visual"]
        crops = size.get("crops", max(1, math.ceil(n_visual / TOKENS_PER_CROP)))
        vision = f"{size['vision_gflops']:.0f} GFLOPs"
        if "projector_gflops" in size:
            vision = f"tower {size['vision_gflops']:.0f} GFLOPs + projector {size['projector_gflops']:.1f} GFLOPs"
        seconds = size.get("vision_s_estimate")
        if seconds is not None and math.isfinite(seconds):
            vision += f", ~{seconds:.1f} s"
        lines.append(f"#### {n_visual} visual tokens ({crops} crops of {TOKENS_PER_CROP}) + {size['n_text']} text "
                     f"tokens, batch 1 — vision (not in the rows): {vision}")
        lines.append("")
        lines.append("| method | visual tokens in LLM | prefill ms median (min) | speedup measured median (min) | "
                     "speedup FLOPs | measured / FLOPs, median (min) | speedup in CPU time | decode ms/token | decode speedup (time / FLOPs) | KV cache MiB | "
                     "peak prefill MiB |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        dense_min = min(size["rows"][0]["prefill_times_s"])
        for r in size["rows"]:
            fastest = min(r["prefill_times_s"])
            speedup_min = dense_min / fastest
            lines.append(
                f"| {r['label']} | {r['llm_visual_tokens']} | {r['prefill_ms']:.0f} ({1000 * fastest:.0f}) | "
                f"{r['speedup_time']:.2f}x ({speedup_min:.2f}x) | {r['speedup_flops']:.2f}x | "
                f"{100 * r['efficiency']:.0f} % ({100 * speedup_min / r['speedup_flops']:.0f} %) | "
                f"{r['speedup_cpu_time']:.2f}x | "
                f"{r['decode_ms_per_token']:.1f} | "
                f"{r['decode_speedup_time']:.2f}x / {r['decode_speedup_flops']:.2f}x | "
                f"{fmt_bytes(r['kv_cache_bytes'])} | {fmt_bytes(r['peak_prefill_bytes'])} |"
            )
        lines.append("")
    mixed = report.get("mixed_batch")
    if mixed:
        m = mixed["median_s"]
        lines.append(f"#### Batch of {mixed['batch']}, {mixed['n_visual']} visual tokens each, mixed configurations "
                     f"{mixed['configurations']} (SA layers per sample)")
        lines.append("")
        lines.append("| run | prefill ms (median) |")
        lines.append("|---|---|")
        lines.append(f"| dense LLaVA-OV, batch {mixed['batch']} | {1000 * m['dense_batch']:.0f} |")
        lines.append(f"| VISOR, mixed batch {mixed['batch']} | {1000 * m['visor_mixed_batch']:.0f} |")
        if "visor_grouped_batch" in m:  # results recorded before the grouped prefill existed have none
            lines.append(f"| VISOR, mixed batch {mixed['batch']}, grouped | {1000 * m['visor_grouped_batch']:.0f} |")
        lines.append(f"| VISOR, the {mixed['batch']} samples one by one (sum) | {1000 * mixed['sum_alone_s']:.0f} |")
        lines.append("")
        lines.append(f"Speedup of the mixed batch over the dense batch: {mixed['speedup_time_vs_dense_batch']:.2f}x "
                     f"measured; FLOPs {mixed['speedup_flops_as_alone']:.2f}x if every sample ran only its own "
                     f"layers, {mixed['speedup_flops_executed_masking']:.2f}x for what a masked batch executes (a layer "
                     "on for any sample runs over every sample's visual tokens).")
        lines.append("")
    seven = report.get("flops_only_7b")
    if seven:
        lines.append("#### FLOPs only, LLaVA-OV 7B shapes (Qwen2-7B, 28 layers, CA/SA 9 + 9): dense / VISOR prefill")
        lines.append("")
        lines.append("| visual tokens | " + " | ".join(seven["labels"]) + " |")
        lines.append("|---|" + "---|" * len(seven["labels"]))
        for n_visual, ratios in seven["rows"].items():
            lines.append(f"| {n_visual} | " + " | ".join(f"{x:.2f}x" for x in ratios) + " |")
        lines.append("")
    return "\n".join(lines)



def flops_only_7b(sizes) -> dict:
    """Dense / VISOR prefill FLOPs ratios for LLaVA-OV 7B shapes (Qwen2-7B, paper layout), no model built."""
    shape7 = FlopsShape.from_config(llava_config(QWEN2_7B))
    ca7, sa7 = uniform_layer_layout(QWEN2_7B["num_hidden_layers"])
    spread7 = lambda k: [sa7[i] for i in range(0, len(sa7), max(1, len(sa7) // k))][:k]  # noqa: E731
    sets7 = [("CA only", []), ("1 SA", spread7(1)), ("2 SA", spread7(2)), ("4 SA", spread7(4)), (f"max ({len(sa7)} SA)", sa7)]
    n_text = TEXT_BEFORE + TEXT_AFTER
    return {
        "cross_attention_layers": ca7, "self_attention_layers": sa7, "labels": [name for name, _ in sets7],
        "configurations": [layers for _, layers in sets7],
        "rows": {n: [prefill_flops(shape7, n_text, n) / prefill_flops(shape7, n_text, n, s, ca7) for _, s in sets7]
                 for n in sizes},
    }


def recompute_flops(report) -> None:
    """Recompute every analytical column of a results.json with the current `flops_visor` (timings untouched)."""
    config = llava_config(QWEN2_0_5B)
    shape = FlopsShape.from_config(config)
    ca = report["model"]["cross_attention_layers"]
    for size in report["sizes"]:
        n_visual, n_text = size["n_visual"], size["n_text"]
        size["vision_gflops"] = vision_flops(config, size["crops"], projector_out=0) / 1e9
        size["projector_gflops"] = projector_flops(config, size["crops"]) / 1e9
        dense = prefill_flops(shape, n_text, n_visual), decode_flops(shape, n_text, n_visual)
        for row in size["rows"]:
            name = row["name"]
            if name == "dense":
                flops = dense
            elif name == "fastv":
                flops = fastv_flops(shape, n_text, n_visual)
            elif "reduction" in row:  # the LLM on the kept tokens plus the reduction's own cost
                reduction = TokenReduction.parse(row["reduction"])
                flops = reduction_row_flops(shape, config, n_text, n_visual, reduction, row.get("sa_layers"), ca)
            elif "packing" in row:  # VISOR-TR: the LLM on the packed tokens plus the packing module's cost
                (layout,) = image_token_layouts(config, [row["image_size"]])
                flops = packing_row_flops(shape, n_text, layout, row["packing"], row["sa_layers"], ca)
            elif name.startswith("pool"):
                pooled = row["llm_visual_tokens"]
                flops = prefill_flops(shape, n_text, pooled), decode_flops(shape, n_text, pooled)
            else:
                layers = row.get("sa_layers", parse_layers(row["label"]))
                row_ca = row.get("ca_layers", ca)  # the dense-layout VISOR row has no CA layer
                flops = (prefill_flops(shape, n_text, n_visual, layers, row_ca),
                         decode_flops(shape, n_text, n_visual, layers, row_ca))
            row["flops_prefill"], row["flops_decode"] = flops
            row["speedup_flops"] = dense[0] / flops[0]
            row["decode_speedup_flops"] = dense[1] / flops[1]
            row["efficiency"] = row["speedup_time"] / row["speedup_flops"]
    mixed = report.get("mixed_batch")
    if mixed:
        n_visual, n_text, configurations = mixed["n_visual"], mixed["n_text"], mixed["configurations"]
        dense = mixed["batch"] * prefill_flops(shape, n_text, n_visual)
        mixed["speedup_flops_as_alone"] = dense / sum(prefill_flops(shape, n_text, n_visual, c, ca) for c in configurations)
        union = sorted(set().union(*map(set, configurations)))
        mixed["speedup_flops_executed_masking"] = dense / (mixed["batch"] * prefill_flops(shape, n_text, n_visual, union, ca))
    if "flops_only_7b" in report:
        report["flops_only_7b"] = flops_only_7b([int(n) for n in report["flops_only_7b"]["rows"]])
    report["flops_recomputed_with"] = "benchmarks/run.py --from-json --recompute-flops"


def parse_layers(label: str) -> list[int]:
    """The SA layers of a VISOR row from its label ("VISOR 2 SA [2, 14]", "VISOR CA only", "VISOR max (8 SA [...])")."""
    if "[" not in label:
        return []
    return json.loads(label[label.index("[") : label.index("]") + 1])



def write_outputs(report, directory: Path, threads, dtype) -> None:
    """`results.json` and `results.md` first, then the plots (their file names are added to the JSON once made)."""
    directory.mkdir(parents=True, exist_ok=True)
    report["plots"] = []  # filled once the plots are made (a re-rendered report lists only its own)
    table = markdown(report)
    report["markdown"] = table
    (directory / "results.json").write_text(json.dumps(report, indent=1))
    header = (f"Command: `{report['command']}`  \nMachine: {report['machine']['device_name']}, "
              f"{report['machine']['cpu_count']} CPUs, torch {report['machine']['torch']} "
              f"({threads} threads), transformers {report['machine']['transformers']}, dtype {dtype}; "
              f"total run {report['total_seconds'] / 60:.1f} min\n\n")
    (directory / "results.md").write_text(header + table)
    print(table)
    report["plots"] = plots(report, directory)
    if report["plots"]:
        (directory / "results.json").write_text(json.dumps(report, indent=1))

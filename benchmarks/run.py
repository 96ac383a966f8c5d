"""VISOR vs dense LLaVA-OneVision: prefill latency, decode speed, KV-cache bytes and peak memory, next to the
analytical FLOPs of every row (issue 5; DESIGN.md sections 4 and 6).

Random weights with the real shapes of LLaVA-OV 0.5B (Qwen2-0.5B LLM: 24 layers, hidden 896, 14 heads, 2 kv
heads, FFN 4864, vocab 151936; SigLIP-so400m tower). Nothing is downloaded. The vision tower and projector are the
same for every method, so the LLM is fed the same random image features (`get_image_features` is replaced on
every model) and the tower is timed once per crop and counted separately (`vision_flops`).

Rows, per visual-token count (batch 1, one image, 64 text tokens around it):
- ``dense``: LLaVA-OV (transformers' `LlavaOnevisionForConditionalGeneration`, SDPA);
- ``visor_ca``: VISOR, paper layout (CA/SA 8 + 8), no SA layer active (cross-attention only);
- ``visor_sa1/2/4``: 1, 2, 4 SA layers active (evenly spread over the 8 SA layers);
- ``visor_max``: all 8 SA layers (= "max");
- ``pool2x``/``pool4x``: dense LLaVA-OV on visual tokens average-pooled 2x / 4x (consecutive tokens) before the LLM;
- ``fastv``: dense LLaVA-OV with FastV pruning (K=2, R=50 %): layers 0-1 run over every token; before layer 2
  the 50 % of visual tokens that received the most attention in layer 1 (mean over heads of the attention from
  the text tokens after the image) are kept, with their original positions, for layers 2-23 and their cache.
Plus a batch of 4 with mixed VISOR configurations, against the dense batch and the four samples run alone, and
(unless ``--no-7b``) FLOPs-only rows for LLaVA-OV 7B shapes.

Every prefill passes ``logits_to_keep=1``; timings are medians of ``--repeats`` runs after one warm-up run, run
round-robin over the rows (so background load hits every row alike). Device-agnostic: every timing and memory
reading synchronises CUDA first; peak memory is `max_memory_allocated` on CUDA, the heap in use on CPU.

    python benchmarks/run.py --profile            # the full run (about 13 min on 2 idle CPU cores)
    python benchmarks/run.py --quick              # smoke test (small sizes, 1 repeat) into results/quick/
    python benchmarks/run.py --device cuda --dtype bfloat16
    python benchmarks/run.py --from-json benchmarks/results/results.json --recompute-flops   # re-render
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import DynamicCache, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

from visor_hf.modeling import uniform_layer_layout
from visor_hf.modeling.flops_visor import FlopsShape, decode_flops, prefill_flops, projector_flops, vision_flops
from visor_hf.testing import visor_from_llava

RESULTS = Path(__file__).resolve().parent / "results"
TOKENS_PER_CROP = 729  # SigLIP-so400m at 384 px, patch 14: 27 x 27
IMAGE_TOKEN_ID = 151646
TEXT_BEFORE, TEXT_AFTER = 14, 50  # system prompt before the image, question after it

QWEN2_0_5B = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
QWEN2_7B = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4,
)
SIGLIP_SO400M = dict(
    model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
    num_attention_heads=16, image_size=384, patch_size=14, vision_use_head=False,
)


def llava_config(text: dict) -> LlavaOnevisionConfig:
    return LlavaOnevisionConfig(
        text_config={"model_type": "qwen2", **text}, vision_config=dict(SIGLIP_SO400M),
        image_token_id=IMAGE_TOKEN_ID, video_token_id=IMAGE_TOKEN_ID + 1, vision_feature_layer=-1,
        vision_feature_select_strategy="full", tie_word_embeddings=text.get("tie_word_embeddings", False),
    )


# ----------------------------------------------------------------------------------------------------------------
# Measurement helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


def _heap_in_use_reader():
    """glibc's `mallinfo2`: bytes of heap in use (arenas + mmapped chunks), which falls when memory is freed (unlike
    the resident set, which keeps freed heap pages). None where glibc >= 2.33 is not there."""
    try:
        mallinfo2 = ctypes.CDLL(None).mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = _MallInfo2

    def read() -> int:
        info = mallinfo2()
        return info.uordblks + info.hblkhd

    return read


class PeakMemory:
    """Peak memory allocated during the block, above the level at entry. CUDA: `max_memory_allocated`. CPU: the
    heap bytes in use (glibc `mallinfo2`: what PyTorch's CPU allocator holds, freed memory excluded) polled every
    1 ms, so a peak shorter than the poll interval can be missed; without glibc's `mallinfo2`, the resident set
    (which never shrinks after a free, so an earlier, larger run hides a later peak)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0
        self.method = "cuda.max_memory_allocated" if device.type == "cuda" else "mallinfo2"
        self._read = _heap_in_use_reader() if device.type != "cuda" else None
        if device.type != "cuda" and self._read is None:
            self.method, self._read = "rss", self._rss

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        self.base = self._read()
        self.high = self.base
        self.stop = threading.Event()

        def poll():
            while not self.stop.is_set():
                self.high = max(self.high, self._read())
                time.sleep(0.001)

        self.thread = threading.Thread(target=poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
            return
        self.high = max(self.high, self._read())
        self.stop.set()
        self.thread.join()
        self.peak = self.high - self.base


def cache_bytes(cache) -> int:
    if hasattr(cache, "memory_bytes"):  # VisorCache
        return int(cache.memory_bytes())
    total = 0
    for layer in cache.layers:
        for tensor in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def patch_image_features(model, features: list[torch.Tensor]) -> None:
    """Make `model.model.get_image_features` return these features (one [n, d] tensor per image)."""
    model.model.get_image_features = lambda *args, **kwargs: SimpleNamespace(pooler_output=features)


# ----------------------------------------------------------------------------------------------------------------
# Inputs


def make_inputs(n_visual: int, batch: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    before = torch.randint(1000, 150000, (batch, TEXT_BEFORE), generator=generator)
    after = torch.randint(1000, 150000, (batch, TEXT_AFTER), generator=generator)
    image = torch.full((batch, n_visual), IMAGE_TOKEN_ID)
    return torch.cat([before, image, after], dim=1).to(device)


def make_features(n_visual: int, hidden: int, dtype, device, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + 1)
    return torch.randn(n_visual, hidden, generator=generator).to(device=device, dtype=dtype)


def pool_features(features: torch.Tensor, factor: int) -> torch.Tensor:
    """Average pooling of consecutive visual tokens (kernel = stride = factor)."""
    return torch.nn.functional.avg_pool1d(features.T[None].float(), factor, factor)[0].T.to(features.dtype)


# ----------------------------------------------------------------------------------------------------------------
# FastV (K=2, R=50 %) on the dense model: a small custom forward over the Qwen2 layers


@torch.inference_mode()
def fastv_prefill(llava, input_ids, features, n_visual: int, k: int = 2, keep_ratio: float = 0.5):
    lm = llava.model.language_model
    embeds = lm.embed_tokens(input_ids)
    image = (input_ids == IMAGE_TOKEN_ID)[..., None]
    hidden = embeds.masked_scatter(image, features.to(embeds.dtype))
    length = input_ids.shape[1]
    positions = torch.arange(length, device=input_ids.device)[None]
    cache = DynamicCache(config=lm.config)
    rotary = lm.rotary_emb(hidden, positions)
    previous = hidden
    for index, layer in enumerate(lm.layers):
        if index == k:
            scores = fastv_scores(lm.layers[k - 1], previous, rotary, cache.layers[k - 1].keys, n_visual)
            keep = max(1, int(round(n_visual * keep_ratio)))
            chosen = scores.topk(keep).indices.sort().values + TEXT_BEFORE
            device = input_ids.device
            index_kept = torch.cat([
                torch.arange(TEXT_BEFORE, device=device), chosen,
                torch.arange(TEXT_BEFORE + n_visual, length, device=device),
            ])
            hidden = hidden[:, index_kept]
            positions = positions[:, index_kept]
            rotary = lm.rotary_emb(hidden, positions)
        if index == k - 1:
            previous = hidden
        hidden = layer(hidden, attention_mask=None, position_embeddings=rotary, position_ids=positions,
                       past_key_values=cache, use_cache=True)
    logits = llava.lm_head(lm.norm(hidden[:, -1:]))
    return logits, cache, length


def fastv_scores(layer, hidden, rotary, key, n_visual: int) -> torch.Tensor:
    """Attention each visual token receives in `layer` from the text tokens after the image (mean over heads and
    queries). Only those query rows are computed (the full N x N map would not fit at 7k tokens); the keys are the
    layer's own cached keys (after RoPE), so the only extra work is the query projection of those rows and their
    scores, which a FastV kernel returning its attention map would have computed anyway."""
    attn = layer.self_attn
    start = TEXT_BEFORE + n_visual
    length = hidden.shape[1]
    normed = layer.input_layernorm(hidden[:, start:])
    query = attn.q_proj(normed).view(*normed.shape[:2], -1, attn.head_dim).transpose(1, 2)
    cos, sin = rotary
    query, _ = apply_rotary_pos_emb(query, query, cos[:, start:], sin[:, start:])
    key = key.repeat_interleave(attn.num_key_value_groups, dim=1)
    logits = (query @ key.transpose(-1, -2)) * attn.scaling  # [B, H, n_after, N]
    rows = torch.arange(start, length, device=hidden.device)[:, None]
    logits = logits.masked_fill(torch.arange(length, device=hidden.device)[None] > rows, float("-inf"))
    weights = logits.float().softmax(-1).mean(dim=(1, 2))  # [B, N]
    return weights[0, TEXT_BEFORE:start]


@torch.inference_mode()
def fastv_decode_step(llava, token, cache, position: int):
    lm = llava.model.language_model
    hidden = lm.embed_tokens(token)
    positions = torch.tensor([[position]], device=token.device)
    rotary = lm.rotary_emb(hidden, positions)
    for layer in lm.layers:
        hidden = layer(hidden, attention_mask=None, position_embeddings=rotary, position_ids=positions,
                       past_key_values=cache, use_cache=True)
    return llava.lm_head(lm.norm(hidden))


def fastv_flops(shape: FlopsShape, n_text: int, n_visual: int, k: int = 2, keep_ratio: float = 0.5):
    """Prefill and first-decode-step FLOPs of FastV (layers < k over everything, the rest over the kept tokens).
    The scoring pass (query projection of the text after the image, its scores against all keys of layer k-1) is
    added; it is < 0.1 % here."""
    full = n_text + n_visual
    kept = n_text + max(1, int(round(n_visual * keep_ratio)))
    pairs = lambda n: n * (n + 1) // 2  # noqa: E731
    prefill = k * (shape.projections(full) + shape.attention(pairs(full)))
    prefill += (shape.num_layers - k) * (shape.projections(kept) + shape.attention(pairs(kept)))
    scoring = 2 * TEXT_AFTER * shape.hidden_size * shape.num_heads * shape.head_dim + shape.attention(TEXT_AFTER * full) // 2
    prefill += scoring + shape.lm_head(1)
    decode = k * (shape.projections(1) + shape.attention(full + 1))
    decode += (shape.num_layers - k) * (shape.projections(1) + shape.attention(kept + 1)) + shape.lm_head(1)
    return prefill, decode


# ----------------------------------------------------------------------------------------------------------------
# Rows


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


def build_rows(llava, visor, n_visual, args, device, dtype, shape, ca, sa_sets, feature_seed=0):
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

    def run_visor(layers):
        @torch.inference_mode()
        def run():
            patch_image_features(visor, [features])
            out = visor(input_ids=input_ids, pixel_values=torch.zeros(1, 1, device=device), use_cache=True,
                        logits_to_keep=1, visor_configuration=list(layers))
            return out.logits, out.past_key_values, input_ids.shape[1]
        return run

    @torch.inference_mode()
    def visor_step(token, cache, position):
        return visor(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1).logits

    rows = [Row("dense", "LLaVA-OV (dense)", lambda: run_llava(input_ids, features), llava_step,
                dense_prefill, dense_decode, n_visual)]
    for name, label, layers in sa_sets:
        rows.append(Row(name, label, run_visor(layers), visor_step,
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
    fv_prefill, fv_decode = fastv_flops(shape, n_text, n_visual)
    rows.append(Row("fastv", "dense + FastV (K=2, 50 %)",
                    lambda: fastv_prefill(llava, input_ids, features, n_visual),
                    lambda token, cache, position: fastv_decode_step(llava, token, cache, position),
                    fv_prefill, fv_decode, f"{n_visual}->{int(round(n_visual * 0.5))}"))
    for row in rows:
        row.flops_ratio_prefill = dense_prefill / row.flops_prefill
        row.flops_ratio_decode = dense_decode / row.flops_decode
    return rows


def timed(fn, device, cpu_times=None):
    """Wall-clock seconds of `fn()` (and, into `cpu_times`, the process CPU seconds it used)."""
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    if cpu_times is not None:
        cpu_times.append(time.process_time() - cpu)
    return time.perf_counter() - start, out


def measure_size(rows, repeats, new_tokens, device, log):
    """Warm-up (with peak memory, KV bytes and decoding) then `repeats` timed prefills, round-robin over the rows."""
    for row in rows:
        with PeakMemory(device) as memory:
            seconds, (logits, cache, length) = timed(row.prefill, device)
        row.result["warmup_prefill_s"] = seconds
        row.result["peak_prefill_bytes"] = memory.peak
        row.result["peak_memory_method"] = memory.method
        row.result["kv_cache_bytes"] = cache_bytes(cache)
        steps = []
        token = torch.full((1, 1), 1234, dtype=torch.long, device=device)
        with PeakMemory(device) as memory:
            for step in range(new_tokens):
                start = time.perf_counter()
                row.decode(token, cache, length + step)
                sync(device)
                seconds = time.perf_counter() - start
                steps.append(seconds)
        row.result["decode_step_s"] = steps
        # the first step allocates the cache growth buffers: excluded like a warm-up
        row.result["decode_ms_per_token"] = 1000 * statistics.median(steps[1:] if len(steps) > 1 else steps)
        row.result["peak_decode_bytes"] = memory.peak
        del logits, cache
        log(f"  warm-up {row.name:10s} prefill {row.result['warmup_prefill_s']:.2f}s  "
            f"decode {row.result['decode_ms_per_token']:.1f} ms/tok  kv {row.result['kv_cache_bytes'] / 2**20:.1f} MiB")
    for repeat in range(repeats):
        for row in rows:
            seconds, out = timed(row.prefill, device, row.cpu_times)
            del out
            row.times.append(seconds)
        log(f"  repeat {repeat + 1}/{repeats}: " + ", ".join(f"{r.name} {r.times[-1]:.2f}s" for r in rows))
    dense = statistics.median(rows[0].times)
    dense_cpu = statistics.median(rows[0].cpu_times)
    dense_decode = rows[0].result["decode_ms_per_token"]
    for row in rows:
        median = statistics.median(row.times)
        row.result.update(
            name=row.name, label=row.label, llm_visual_tokens=row.llm_visual_tokens, prefill_times_s=row.times,
            prefill_ms=1000 * median, speedup_time=dense / median, prefill_cpu_times_s=row.cpu_times,
            speedup_cpu_time=dense_cpu / statistics.median(row.cpu_times), speedup_flops=row.flops_ratio_prefill,
            flops_prefill=row.flops_prefill, flops_decode=row.flops_decode,
            efficiency=(dense / median) / row.flops_ratio_prefill,
            decode_speedup_time=dense_decode / row.result["decode_ms_per_token"],
            decode_speedup_flops=row.flops_ratio_decode,
        )
    return [row.result for row in rows]


# ----------------------------------------------------------------------------------------------------------------
# Mixed batch


def measure_mixed_batch(llava, visor, n_visual, configurations, repeats, device, dtype, shape, ca, log):
    batch = len(configurations)
    hidden = llava.config.text_config.hidden_size
    n_text = TEXT_BEFORE + TEXT_AFTER
    input_ids = make_inputs(n_visual, batch, device)
    features = [make_features(n_visual, hidden, dtype, device, seed=10 + i) for i in range(batch)]
    pixels = torch.zeros(batch, 1, device=device)

    @torch.inference_mode()
    def dense():
        patch_image_features(llava, features)
        return llava(input_ids=input_ids, pixel_values=pixels, use_cache=True, logits_to_keep=1).logits

    def visor_run(request, ids=input_ids, feats=features, pix=pixels):
        @torch.inference_mode()
        def run():
            patch_image_features(visor, feats)
            return visor(input_ids=ids, pixel_values=pix, use_cache=True, logits_to_keep=1,
                         visor_configuration=request).logits
        return run

    runs = {"dense_batch": dense, "visor_mixed_batch": visor_run([list(c) for c in configurations])}
    for i, layers in enumerate(configurations):
        runs[f"visor_alone_{i}"] = visor_run(list(layers), input_ids[i : i + 1], [features[i]], pixels[:1])
    times = {name: [] for name in runs}
    for fn in runs.values():
        timed(fn, device)  # warm-up
    for _ in range(repeats):
        for name, fn in runs.items():
            times[name].append(timed(fn, device)[0])
    median = {name: statistics.median(t) for name, t in times.items()}
    alone = sum(median[f"visor_alone_{i}"] for i in range(batch))
    dense_flops = batch * prefill_flops(shape, n_text, n_visual)
    alone_flops = sum(prefill_flops(shape, n_text, n_visual, layers, ca) for layers in configurations)
    # masking: a layer that is on for any sample runs over the whole batch's visual tokens
    union = sorted(set().union(*map(set, configurations)))
    executed_flops = batch * prefill_flops(shape, n_text, n_visual, union, ca)
    result = {
        "n_visual": n_visual, "n_text": n_text, "batch": batch, "configurations": [list(c) for c in configurations],
        "times_s": times, "median_s": median, "sum_alone_s": alone,
        "speedup_time_vs_dense_batch": median["dense_batch"] / median["visor_mixed_batch"],
        "speedup_flops_as_alone": dense_flops / alone_flops,
        "speedup_flops_executed_masking": dense_flops / executed_flops,
        "speedup_time_alone_sum_vs_dense_batch": median["dense_batch"] / alone,
    }
    log(f"  mixed batch: dense {median['dense_batch']:.2f}s, visor mixed {median['visor_mixed_batch']:.2f}s, "
        f"alone sum {alone:.2f}s")
    return result


# ----------------------------------------------------------------------------------------------------------------
# Output


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


def plots(report, directory: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in report["sizes"][0]["rows"]]
    labels = {r["name"]: r["label"] for r in report["sizes"][0]["rows"]}
    xs = [s["n_visual"] for s in report["sizes"]]
    fig, ax = plt.subplots(figsize=(7, 5))
    for name in names:
        ys = [next(r for r in s["rows"] if r["name"] == name)["prefill_ms"] / 1000 for s in report["sizes"]]
        ax.plot(xs, ys, marker="o", label=labels[name], linestyle="--" if name in ("pool2x", "pool4x", "fastv") else "-")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("visual tokens (before any reduction)")
    ax.set_ylabel("prefill latency, s (median)")
    ax.set_title(f"Prefill latency, LLaVA-OV 0.5B shapes, {report['machine']['device_name']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    latency = directory / "latency_vs_visual_tokens.png"
    fig.savefig(latency, dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 6))
    top = 1.0
    for s in report["sizes"]:
        xs_, ys_ = [r["speedup_flops"] for r in s["rows"]], [r["speedup_time"] for r in s["rows"]]
        top = max(top, *xs_, *ys_)
        ax.scatter(xs_, ys_, label=f"{s['n_visual']} visual tokens")
        if s is report["sizes"][-1]:
            for r in s["rows"]:
                ax.annotate(r["name"], (r["speedup_flops"], r["speedup_time"]), fontsize=7)
    line = [1, top * 1.2]
    ax.plot(line, line, "k-", lw=0.8, label="measured = FLOPs")
    ax.plot(line, [0.7 * x for x in line], "k:", lw=0.8, label="70 % of FLOPs")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("analytical prefill speedup over dense (FLOPs ratio)")
    ax.set_ylabel("measured prefill speedup over dense (time ratio)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    scatter = directory / "flops_vs_time.png"
    fig.savefig(scatter, dpi=120)
    plt.close(fig)
    return [latency.name, scatter.name]


def machine(device: torch.device, threads: int) -> dict:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            name = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    return {
        "device": str(device), "device_name": name, "cpu_count": os.cpu_count(), "torch_threads": threads,
        "torch": torch.__version__, "python": platform.python_version(),
        "transformers": __import__("transformers").__version__, "platform": platform.platform(),
        "load_average_at_start": os.getloadavg(),
    }


# ----------------------------------------------------------------------------------------------------------------


def profile_rows(rows, directory: Path, device, log) -> dict:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out = {}
    for row in rows:
        with profile(activities=activities) as prof:
            row.prefill()
            sync(device)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
        path = directory / f"profile_{row.name}.txt"
        path.write_text(table)
        out[row.name] = path.name
        log(f"  profile of {row.name} written to {path}")
    return out


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
    visor = visor_from_llava(llava, attn_implementation="sdpa", cross_attention_layers=ca, self_attention_layers=sa,
                             configurations=[sa], router_layer=None).to(device).eval()
    # one copy of the shared weights: VISOR reuses the dense model's LLM, LM head and vision tower
    visor.model.language_model = llava.model.language_model
    visor.lm_head = llava.lm_head
    visor.model.vision_tower = llava.model.vision_tower
    visor.model.multi_modal_projector = llava.model.multi_modal_projector
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
        rows = build_rows(llava, visor, n_visual, args, device, dtype, shape, ca, sa_sets)
        if args.rows:
            wanted = args.rows.split(",")
            rows = [row for row in rows if row.name in wanted]
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
            elif name.startswith("pool"):
                pooled = row["llm_visual_tokens"]
                flops = prefill_flops(shape, n_text, pooled), decode_flops(shape, n_text, pooled)
            else:
                layers = row.get("sa_layers", parse_layers(row["label"]))
                flops = prefill_flops(shape, n_text, n_visual, layers, ca), decode_flops(shape, n_text, n_visual, layers, ca)
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
    directory.mkdir(parents=True, exist_ok=True)
    report["plots"] = plots(report, directory)
    table = markdown(report)
    report["markdown"] = table
    (directory / "results.json").write_text(json.dumps(report, indent=1))
    header = (f"Command: `{report['command']}`  \nMachine: {report['machine']['device_name']}, "
              f"{report['machine']['cpu_count']} CPUs, torch {report['machine']['torch']} "
              f"({threads} threads), transformers {report['machine']['transformers']}, dtype {dtype}; "
              f"total run {report['total_seconds'] / 60:.1f} min\n\n")
    (directory / "results.md").write_text(header + table)
    print(table)


if __name__ == "__main__":
    main()

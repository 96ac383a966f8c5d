"""Timing: wall-clock and CPU time of a call, the round-robin measurement of the rows at one size, the mixed
batch, the profiler tables and a description of the machine."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import torch

from visor_hf.modeling.flops_visor import prefill_flops

from .memory import PeakMemory, cache_bytes, sync
from .shapes import TEXT_AFTER, TEXT_BEFORE, make_features, make_inputs, patch_image_features


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

    def visor_run(request, ids=input_ids, feats=features, pix=pixels, batching="masked"):
        @torch.inference_mode()
        def run():
            patch_image_features(visor, feats)
            return visor(input_ids=ids, pixel_values=pix, use_cache=True, logits_to_keep=1,
                         visor_configuration=request, visor_batching=batching).logits
        return run

    request = [list(c) for c in configurations]
    runs = {"dense_batch": dense, "visor_mixed_batch": visor_run(request),
            "visor_grouped_batch": visor_run(request, batching="grouped")}
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
        "speedup_time_grouped_vs_dense_batch": median["dense_batch"] / median["visor_grouped_batch"],
        "speedup_flops_as_alone": dense_flops / alone_flops,
        "speedup_flops_executed_masking": dense_flops / executed_flops,
        "speedup_time_alone_sum_vs_dense_batch": median["dense_batch"] / alone,
    }
    log(f"  mixed batch: dense {median['dense_batch']:.2f}s, visor masked {median['visor_mixed_batch']:.2f}s, "
        f"grouped {median['visor_grouped_batch']:.2f}s, "
        f"alone sum {alone:.2f}s")
    return result


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

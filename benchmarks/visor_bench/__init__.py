"""Parts of `benchmarks/run.py`, one concern per module.

- `shapes`: the LLaVA-OV 0.5B / 7B shapes and the benchmark's inputs (random features, pooling);
- `fastv`: the FastV baseline (a small custom forward over the dense model's Qwen2 layers) and its FLOPs;
- `memory`: peak memory (CUDA allocator, glibc heap counter, resident set) and KV-cache bytes;
- `timing`: timed calls, the round-robin measurement of the rows, the mixed batch, the profiler, the machine;
- `report`: the JSON/markdown outputs, FLOPs-only 7B rows and the re-computation of FLOPs columns;
- `plots`: the two figures (optional: skipped with a warning when matplotlib is missing).
"""

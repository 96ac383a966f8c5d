"""Universal fine-tuning: one viable configuration per optimisation step, the same on every process.

The configuration of step `k` is a pure function of `(seed, k)`: no per-rank random state is involved, so every
rank of a DDP / FSDP / DeepSpeed job runs the same SA layers at the same step (no collective waits on a layer that
another rank skipped), every micro-batch of a gradient-accumulation step uses the configuration of that step (the
trainer's `global_step` only moves after the optimiser step), and a run resumed from a checkpoint continues the
same sequence (the step counter is restored with the checkpoint).
"""

from __future__ import annotations

import json
import os

import numpy as np
from transformers import TrainerCallback

STRATEGIES = ("cycle", "uniform")


class UniversalConfigurationSampler:
    """Configuration index (into a list of `num_configurations`) for each optimisation step.

    strategy:
        `"cycle"` (default): steps are cut into blocks of `num_configurations`; each block visits every
        configuration once, in an order shuffled by `(seed, block)`. Every configuration is trained equally often
        and any `num_configurations` consecutive steps starting at a block boundary cover them all.
        `"uniform"`: an independent uniform draw per step, seeded by `(seed, step)`.
    weights: optional sampling weights (`"uniform"` only), e.g. to favour cheap configurations.
    """

    def __init__(self, num_configurations: int, seed: int = 0, strategy: str = "cycle", weights=None):
        if num_configurations < 1:
            raise ValueError("the universal sampler needs at least one configuration")
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown sampling strategy {strategy!r}: use one of {STRATEGIES}")
        if weights is not None:
            if strategy != "uniform":
                raise ValueError("weights are only used by the 'uniform' strategy")
            weights = np.asarray(weights, dtype=float)
            if weights.shape != (num_configurations,) or (weights < 0).any() or weights.sum() <= 0:
                raise ValueError(f"weights must be {num_configurations} non-negative numbers with a positive sum")
            weights = weights / weights.sum()
        self.num_configurations = num_configurations
        self.seed = int(seed)
        self.strategy = strategy
        self.weights = weights

    def __call__(self, step: int) -> int:
        step = int(step)
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        n = self.num_configurations
        if self.strategy == "cycle":
            block, offset = divmod(step, n)
            order = np.random.default_rng([self.seed, block]).permutation(n)
            return int(order[offset])
        rng = np.random.default_rng([self.seed, step])
        return int(rng.choice(n, p=self.weights)) if self.weights is not None else int(rng.integers(n))

    def sequence(self, start: int, stop: int) -> list[int]:
        return [self(k) for k in range(start, stop)]


class ConfigurationLogCallback(TrainerCallback):
    """Appends `{"step", "configuration", "layers"}` for every optimisation step to `<output_dir>/<filename>`
    (main process only), so that a run and its resumption can be checked and the schedule inspected.

    At the start of training the file keeps only the steps before the starting step: a fresh run in an existing
    folder starts a new log, and a run resumed from `checkpoint-N` in the same folder drops the steps `>= N` that the
    interrupted run logged after that checkpoint, so the file always reads step 0, 1, 2, ... once each."""

    def __init__(self, sampler: UniversalConfigurationSampler, configurations: list[list[int]], filename: str = "universal_configurations.jsonl"):
        self.sampler = sampler
        self.configurations = configurations
        self.filename = filename

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        path = os.path.join(args.output_dir, self.filename)
        if not os.path.isfile(path):
            return
        with open(path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] < state.global_step]
        with open(path, "w") as f:
            f.writelines(kept)

    def on_step_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        step = state.global_step - 1  # the step that just ended
        drawn = self.sampler(step)
        index, packing = drawn if isinstance(drawn, tuple) else (drawn, None)
        entry = {"step": step, "configuration": index, "layers": self.configurations[index] if isinstance(index, int) else index}
        if packing is not None:  # a (configuration, packing) pair
            entry["packing"] = packing
        os.makedirs(args.output_dir, exist_ok=True)
        with open(os.path.join(args.output_dir, self.filename), "a") as f:
            f.write(json.dumps(entry) + "\n")


__all__ = ["UniversalConfigurationSampler", "ConfigurationLogCallback", "STRATEGIES"]

"""Resuming refuses an incomplete checkpoint: `Trainer` would silently continue with a fresh optimizer, scheduler or
random state when `optimizer.pt`, `scheduler.pt` or `rng_state.pth` is missing."""

from __future__ import annotations

import os

from transformers.trainer import OPTIMIZER_NAME, OPTIMIZER_NAME_BIN, SCHEDULER_NAME


def missing_training_state(checkpoint: str | os.PathLike, process_index: int = 0, world_size: int = 1, deepspeed: bool = False) -> list[str]:
    """The training-state files that `checkpoint` lacks (the optimizer's is inside DeepSpeed's own folder there)."""
    folder = os.fspath(checkpoint)
    missing = []
    if not deepspeed:
        has_optimizer = os.path.isfile(os.path.join(folder, OPTIMIZER_NAME)) or os.path.isfile(os.path.join(folder, OPTIMIZER_NAME_BIN))
        # accelerate's FSDP writes the optimizer as a folder `optimizer_0`
        has_optimizer = has_optimizer or any(
            name.startswith("optimizer") and os.path.isdir(os.path.join(folder, name)) for name in os.listdir(folder)
        )
        if not has_optimizer:
            missing.append(OPTIMIZER_NAME)
    if not os.path.isfile(os.path.join(folder, SCHEDULER_NAME)):
        missing.append(SCHEDULER_NAME)
    rng_files = ["rng_state.pth"] + ([f"rng_state_{process_index}.pth"] if world_size > 1 else [])
    if not any(os.path.isfile(os.path.join(folder, name)) for name in rng_files):
        missing.append(rng_files[-1])
    return missing


class CompleteCheckpointMixin:
    """Mixed into VISOR's `Trainer` subclasses: resuming from a checkpoint without its training state is an error."""

    def _load_optimizer_and_scheduler(self, checkpoint):
        if checkpoint is not None:
            missing = missing_training_state(
                checkpoint, self.args.process_index, self.args.world_size, getattr(self, "is_deepspeed_enabled", False)
            )
            if missing:
                raise ValueError(
                    f"cannot resume from {checkpoint}: it lacks {', '.join(missing)}, so training would continue with a "
                    "fresh optimizer, learning-rate schedule or random state. Resume from a complete checkpoint-N "
                    "folder, or start a new run from its weights (pass the folder as the model instead)"
                )
        return super()._load_optimizer_and_scheduler(checkpoint)

"""Stage training (stage 1, stage 2, universal fine-tuning) on the HF `Trainer`.

- stage `"1"`: every converted LLaVA-OV weight frozen; the new modules (cross-attention blocks with their norms and
  conv position embedding) train; maximal configuration.
- stage `"2"`: the LLM, the projector and the CA blocks train (full fine-tuning) or LoRA adapters on the LLM's
  attention/MLP projections and the CA blocks' projections (PEFT); maximal configuration. The vision tower is
  frozen unless `train_vision_tower`.
- stage `"universal"`: as stage 2, but each optimisation step runs one configuration of `config.configurations`
  drawn by a [`UniversalConfigurationSampler`] from `(seed, global_step)`.

The router never trains here (it gets no gradient from the language-modelling loss; see `router.py`). Multi-GPU,
mixed precision, gradient accumulation, checkpoints and resumption, logging and progress bars are the `Trainer`'s.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from ..logging_utils import get_logger
from ..modeling import VisorForConditionalGeneration
from ..modeling.hub_visor import LORA_MODULES_TO_SAVE as _LORA_MODULES_TO_SAVE
from ..modeling.hub_visor import LORA_TARGET_MODULES, LORA_VISION_TARGET_MODULES, ROUTER_NOT_TRAINED
from .data import VisorDataCollator, load_processor, load_records, model_inputs, repack_placeholders
from .resume import CompleteCheckpointMixin
from .sharding import ShardedStep, fsdp_config
from .universal import ConfigurationLogCallback, UniversalConfigurationSampler

logger = get_logger(__name__)

STAGES = ("1", "2", "universal")

LORA_MODULES_TO_SAVE = list(_LORA_MODULES_TO_SAVE)

NEW_MODULE_PREFIXES = ("model.cross_attention_blocks.",)
PACKING_PREFIX = "model.token_packing."
ROUTER_PREFIX = "model.router."
VISION_PREFIX = ("model.vision_tower.", "model.visual.")  # LLaVA-OneVision's SigLIP, the Qwen2-VL family's ViT


@dataclass
class LoraOptions:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str = LORA_TARGET_MODULES
    modules_to_save: tuple[str, ...] = tuple(LORA_MODULES_TO_SAVE)
    merge: bool = True  # write the merged model (and the adapter in `adapter/`)


# -- freezing ------------------------------------------------------------------------------------------------------


def _base_name(name: str) -> str:
    """A parameter name without a PEFT wrapper prefix."""
    return re.sub(r"^base_model\.model\.", "", name)


def set_trainable(model, stage: str, train_vision_tower: bool = False, packing: bool = False) -> list[str]:
    """Set `requires_grad` for a stage on a plain (non-PEFT) model; returns the names of the trainable parameters.

    stage `"1"`: the new modules only (the CA blocks, and the token packing module when `packing` factors are
    sampled); `"2"` / `"universal"`: everything but the router (and the vision tower unless `train_vision_tower`);
    `"router"`: the router only.
    """
    if stage not in (*STAGES, "router"):
        raise ValueError(f"unknown stage {stage!r}: use one of {(*STAGES, 'router')}")
    trainable = []
    for name, parameter in model.named_parameters():
        base = _base_name(name)
        if stage == "1":
            on = base.startswith(NEW_MODULE_PREFIXES) or (packing and base.startswith(PACKING_PREFIX))
        elif stage == "router":
            on = base.startswith(ROUTER_PREFIX)
        else:
            on = not base.startswith(ROUTER_PREFIX) and (train_vision_tower or not base.startswith(VISION_PREFIX))
        parameter.requires_grad_(on)
        if on:
            trainable.append(name)
    if not trainable:
        raise ValueError(f"stage {stage}: the model has no parameter to train (no CA block or router?)")
    return trainable


def apply_lora(model, options: LoraOptions, train_vision_tower: bool = False):
    """Wrap the model with PEFT LoRA adapters (LLM attention/MLP, CA blocks; vision tower too if asked); the router
    is a `modules_to_save` copy. Everything else is frozen."""
    from peft import LoraConfig, get_peft_model

    targets = options.target_modules + (LORA_VISION_TARGET_MODULES if train_vision_tower else "")
    config = LoraConfig(
        r=options.r,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=targets,
        modules_to_save=list(options.modules_to_save),
    )
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if getattr(model.config, "router_layer", None) is not None:
        logger.warning_once(ROUTER_NOT_TRAINED)
    peft_model = get_peft_model(model, config)
    # the router copy gets no LM gradient anyway; keep it frozen until router training
    for name, parameter in peft_model.named_parameters():
        if "router" in name:
            parameter.requires_grad_(False)
    return peft_model


# -- the trainer ---------------------------------------------------------------------------------------------------


# Parameters that a batch without images leaves out of the graph (the vision tower, projector, `image_newline` and
# the cross-attention blocks, also their LoRA adapters).
VISUAL_PATH_KEYS = (
    "cross_attention_blocks.", "vision_tower.", "multi_modal_projector.", "image_newline", "model.visual.", "token_packing.",
)


class VisorTrainer(CompleteCheckpointMixin, Trainer):
    """`Trainer` that runs a fixed VISOR configuration (default `"max"`) or, with a `sampler`, the configuration that
    the sampler gives for the current optimisation step (`state.global_step`, equal for every micro-batch of a
    gradient-accumulation step and restored on resume). `configuration_trace` records `(step, configuration)` for
    every micro-batch of this process.

    A training micro-batch without images does not use the visual path (vision tower, projector, cross-attention
    blocks): in stage 1 its loss would depend on no trainable parameter at all (`backward` fails), and under DDP a
    rank would skip the gradient all-reduce of those parameters while the others wait. The trainer therefore adds
    `0 x sum(p)` over the trainable visual-path parameters to the loss of such micro-batches, inside the model's
    forward (a forward hook), so every trainable parameter gets a (zero) gradient on every rank. A sharded model
    (FSDP, DeepSpeed ZeRO-3), whose parameters cannot be touched outside their modules, gets an image nothing
    attends to instead, so that every rank runs the whole visual path (`sharding.ShardedStep`, docs/training.md).
    """

    def __init__(self, *args, visor_configuration="max", sampler: UniversalConfigurationSampler | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.visor_configuration = visor_configuration
        self.sampler = sampler
        self.configuration_trace: list[tuple[int, object]] = []
        self.sharded_step = ShardedStep(self)
        self._visual_parameters = [
            p for name, p in self.model.named_parameters() if p.requires_grad and any(k in name for k in VISUAL_PATH_KEYS)
        ]
        if self._visual_parameters and not self.sharded_step.enabled:
            self.model.register_forward_hook(self._touch_visual_path, with_kwargs=True)

    def _touch_visual_path(self, module, args, kwargs, output):
        loss = getattr(output, "loss", None)
        if not module.training or loss is None:
            return None
        if kwargs.get("pixel_values") is not None or kwargs.get("pixel_values_videos") is not None:
            return None
        output.loss = loss + sum(p.sum() for p in self._visual_parameters) * 0.0
        return output

    def current_configuration(self):
        """The step's draw: a configuration index, or a `(configuration, packing)` pair when packing is sampled too."""
        if self.sampler is not None:
            return self.sampler(self.state.global_step)
        return self.visor_configuration

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # evaluation runs the fixed configuration ("max") unpacked; training the step's configuration (and packing)
        drawn = self.current_configuration() if model.training else self.visor_configuration
        configuration, packing = drawn if isinstance(drawn, tuple) else (drawn, 1)
        if model.training:
            self.configuration_trace.append((self.state.global_step, drawn))
        if packing != 1 and inputs.get("visor_packing") is not None:
            raise ValueError("training samples the packing factor itself: give it an unpacked collator (packing=1)")
        inputs = self.sharded_step(model, model_inputs(inputs))
        if packing != 1:  # the step's packing factor: the batch (and a sharded step's unseen image) packed
            inputs = repack_placeholders(inputs, self.accelerator.unwrap_model(model).config, packing)
            inputs["visor_packing"] = packing
        inputs["visor_configuration"] = configuration
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def _remove_unused_columns(self, dataset, description=None):  # records are raw dicts; the collator picks fields
        return dataset


def make_training_arguments(output_dir, training_args=None, **overrides) -> TrainingArguments:
    """`TrainingArguments` from a dict (or a `TrainingArguments`, returned as is) with VISOR's defaults:
    `remove_unused_columns=False` (the collator reads raw records), `prediction_loss_only=True` (evaluation
    reports the loss; use `visor-hf evaluate` for accuracy and FLOPs), no reporting integration, and
    `ddp_find_unused_parameters=True` also under activation checkpointing (the `Trainer` turns it off there): some
    trainable parameters never enter the graph, e.g. SigLIP's `post_layernorm` with `--train-vision-tower` (LLaVA-OV
    reads the tower's hidden states before it). Activation checkpointing is non-reentrant in transformers 5, which
    DDP's unused-parameter search supports. Values in `training_args` win over these defaults."""
    if isinstance(training_args, TrainingArguments):
        return training_args
    fields = {
        "output_dir": str(output_dir),
        "remove_unused_columns": False,
        "report_to": "none",
        "prediction_loss_only": True,
        "ddp_find_unused_parameters": True,
    }
    fields.update({k: v for k, v in overrides.items() if v is not None})
    fields.update(training_args or {})
    return TrainingArguments(**fields)


# -- checkpoints ---------------------------------------------------------------------------------------------------


def load_model(path, dtype=None, attn_implementation: str | None = None, fsdp_size: int | None = None) -> VisorForConditionalGeneration:
    """Load a VISOR checkpoint; with `fsdp_size`, sharded with FSDP2 over that many ranks as it loads (transformers'
    `DistributedConfig` with VISOR's wrapping plan `sharding.FSDP_PLAN`; run under `torchrun`)."""
    import visor_hf  # noqa: F401

    kwargs = {}
    if fsdp_size is not None:
        kwargs["distributed_config"] = fsdp_config(fsdp_size)
    if dtype is not None:
        kwargs["dtype"] = getattr(torch, dtype) if isinstance(dtype, str) and dtype != "auto" else dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    from transformers import AutoConfig

    from ..conversion.families import family_of_visor

    # the checkpoint's own family (LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL): its VISOR class
    model_class = family_of_visor(AutoConfig.from_pretrained(str(path)).model_type).visor_class("generation")
    return model_class.from_pretrained(str(path), **kwargs)


def save_checkpoint(model, processor, output_dir, extra: dict | None = None) -> Path:
    """Write a complete VISOR checkpoint folder: weights (safetensors), config, processor and the remote code
    (`model=None`: the weights and config are already there)."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if model is not None:
        model.save_pretrained(str(output_dir))  # with the code files and `auto_map` (`VisorHubMixin`)
    if processor is not None:
        processor.save_pretrained(str(output_dir))
    if extra:
        with open(output_dir / "visor_training.json", "w") as f:
            json.dump(extra, f, indent=2)
    return output_dir


def save_trained(trainer, processor, output_dir, summary: dict, lora: LoraOptions | None = None) -> None:
    """Write the trained model as a complete checkpoint folder, from every process (collective).

    `Trainer.save_model` gathers the weights that DeepSpeed ZeRO-3 / FSDP shard over the ranks; the main process
    then adds the processor, the remote code and `visor_training.json`, and removes the `Trainer`'s pickled
    `training_args.bin` (the arguments are in `visor_training.json`; checkpoint-N folders keep theirs for resuming).
    With LoRA, the adapter goes to `output_dir/adapter` and, if `lora.merge`, the merged model to `output_dir`
    (merging needs the full weights on the main process: with ZeRO-3 / FSDP use `merge=False` and merge afterwards).
    """
    output_dir = Path(output_dir)
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    summary = {**summary, "training_args": trainer.args.to_dict()}
    if lora is None:
        trainer.save_model(str(output_dir))
        if trainer.is_world_process_zero():
            save_checkpoint(None, processor, output_dir, summary)
    else:
        trainer.save_model(str(output_dir / "adapter"))
        if trainer.is_world_process_zero():
            (output_dir / "adapter" / "training_args.bin").unlink(missing_ok=True)
            if lora.merge:
                save_checkpoint(unwrapped.merge_and_unload(), processor, output_dir, summary)
            else:
                (output_dir / "visor_training.json").write_text(json.dumps(summary, indent=2))
    if trainer.is_world_process_zero():
        (output_dir / "training_args.bin").unlink(missing_ok=True)
    trainer.accelerator.wait_for_everyone()


# -- the stages ----------------------------------------------------------------------------------------------------


def train_stage(
    model_path,
    data,
    output_dir,
    stage: str,
    *,
    eval_data=None,
    training_args: dict | TrainingArguments | None = None,
    lora: LoraOptions | None = None,
    train_vision_tower: bool = False,
    seed: int = 0,
    sampling: str = "cycle",
    configurations: list[int] | None = None,
    resume_from_checkpoint: str | bool | None = None,
    image_root=None,
    max_length: int | None = None,
    limit: int | None = None,
    dtype=None,
    attn_implementation: str | None = None,
    callbacks: list | None = None,
    data_collator=None,
    fsdp_size: int | None = None,
    packing: list[int] | None = None,
):
    """Train one stage and write the result to `output_dir` (a complete VISOR checkpoint; with LoRA the merged
    model, and the adapter in `output_dir/adapter`). Returns the `VisorTrainer` (its `state`, `configuration_trace`).

    `configurations` (universal only): indices into `config.configurations` to sample from (default: all).
    `training_args`: `TrainingArguments` or a dict of its fields (`output_dir` defaults to `output_dir`).
    `seed`: the `TrainingArguments` seed (a `seed` in `training_args` wins); the universal configuration schedule
    is drawn from the final `args.seed`, so the `Trainer` and the schedule always share one seed.
    `data_collator`: batches the records (default: `VisorDataCollator(processor, max_length)`), e.g. a subclass
    that adds targets of its own.
    `fsdp_size`: shard the model with FSDP2 over that many ranks (each decoder layer, CA block and the router a unit;
    see `sharding`), on CPU (gloo) or GPU; launch with `torchrun --nproc_per_node N`.
    `packing`: token packing factors to sample, e.g. `[1, 2, 4]` (each a factor of `config.packing_factors`, or 1).
    Universal fine-tuning runs one `(configuration, packing)` pair of the product per step, drawn from `(seed, step)`
    like the configurations, so one set of weights serves every pair. Stages 1 and 2 run the maximal configuration
    with one factor per step, drawn the same way; stage 1 then also trains the packing module (a new module, as the
    CA blocks are), which is how a packing module added to a trained VISOR gets its own warm-up.
    """
    stage = str(stage)
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}: use one of {STAGES}")
    if stage == "1" and lora is not None:
        raise ValueError("stage 1 trains the new modules fully; LoRA is for stage 2 and universal fine-tuning")
    if fsdp_size is not None and lora is not None and lora.merge:
        raise ValueError("with fsdp_size (--fsdp-size), LoRA writes the adapter only: pass merge=False (--no-merge) and "
                         "merge it afterwards (merging needs the full weights on one process)")
    args = make_training_arguments(output_dir, training_args, seed=seed)
    seed = args.seed
    model = load_model(model_path, dtype, attn_implementation, fsdp_size)
    processor = load_processor(model_path)
    config = model.config

    pool = None  # what the sampler draws from: configuration indices, or (configuration, packing) pairs
    if stage == "universal":
        pool = list(range(len(config.configurations))) if configurations is None else [int(i) for i in configurations]
        bad = [i for i in pool if not 0 <= i < len(config.configurations)]
        if bad or not pool:
            raise ValueError(f"configurations {configurations} must be indices into the model's {len(config.configurations)} configurations")
    elif packing:  # stages 1 and 2: the maximal configuration, one packing factor per step
        pool = ["max"]
    if pool is not None and packing:
        pool = [(c, k) for c in pool for k in check_training_packing(packing, config)]
    if stage == "universal" and len(pool) == 1:
        logger.warning("universal fine-tuning with a single configuration: run `visor-hf search` first")
    sampler = None if pool is None else _IndexedSampler(UniversalConfigurationSampler(len(pool), seed=seed, strategy=sampling), pool)

    if lora is not None and fsdp_size is not None and lora.modules_to_save:
        # PEFT copies a `modules_to_save` module, which FSDP2 forbids; the router does not train in these stages
        logger.warning("FSDP: LoRA trains without modules_to_save %s (a sharded module cannot be copied)", list(lora.modules_to_save))
        lora = replace(lora, modules_to_save=())
    if lora is not None:
        model = apply_lora(model, lora, train_vision_tower)
    else:
        set_trainable(model, stage, train_vision_tower, packing=bool(packing))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    logger.info("stage %s: %d of %d parameters train (%.2f %%)", stage, trainable, total, 100 * trainable / max(total, 1))

    train_dataset = load_records(data, image_root, limit)
    eval_dataset = load_records(eval_data, image_root) if eval_data is not None else None
    collator = data_collator if data_collator is not None else VisorDataCollator(processor, max_length=max_length)
    callbacks = list(callbacks or [])
    if sampler is not None:
        callbacks.append(ConfigurationLogCallback(sampler, config.configurations))
    trainer = VisorTrainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        callbacks=callbacks,
        visor_configuration="max",
        sampler=sampler,
    )
    result = trainer.train(resume_from_checkpoint=resume_from_checkpoint)
    trainer.log_metrics("train", result.metrics)

    summary = {
        "stage": stage,
        "source": str(model_path),
        "global_step": trainer.state.global_step,
        "trainable_parameters": trainable,
        "lora": None if lora is None else {"r": lora.r, "alpha": lora.alpha, "target_modules": lora.target_modules, "merged": lora.merge},
        "train_vision_tower": train_vision_tower,
        "train_metrics": result.metrics,
    }
    if sampler is not None:
        pairs = [p for p in sampler.pool if isinstance(p, tuple)]
        key = "universal" if stage == "universal" else "sampled"  # stages 1 / 2: the packing factors only
        summary[key] = {
            "seed": seed, "strategy": sampling, "configurations": sorted({p[0] for p in pairs}) if pairs else sampler.pool,
        }
        if pairs:
            summary[key]["packing"] = sorted({p[1] for p in pairs})
    save_trained(trainer, processor, output_dir, summary, lora=lora)
    trainer.accelerator.wait_for_everyone()
    return trainer


def check_training_packing(packing, config) -> list[int]:
    """The packing factors a stage samples: 1 or factors the checkpoint has a module for."""
    factors = sorted({int(k) for k in packing})
    supported = [1, *(getattr(config, "packing_factors", None) or [])]
    bad = [k for k in factors if k not in supported]
    if bad:
        raise ValueError(
            f"packing factor {bad[0]}: this checkpoint supports {supported} (convert with the packing module, the default)"
        )
    return factors


class _IndexedSampler:
    """A sampler over a `pool` of configuration indices (or `(configuration, packing)` pairs)."""

    def __init__(self, sampler: UniversalConfigurationSampler, pool: list[int]):
        self.sampler, self.pool = sampler, pool

    def __call__(self, step: int) -> int:
        return self.pool[self.sampler(step)]

    def sequence(self, start: int, stop: int) -> list[int]:
        return [self(k) for k in range(start, stop)]


__all__ = [
    "LORA_MODULES_TO_SAVE",
    "LORA_TARGET_MODULES",
    "LoraOptions",
    "STAGES",
    "VisorTrainer",
    "apply_lora",
    "load_model",
    "make_training_arguments",
    "save_checkpoint",
    "save_trained",
    "set_trainable",
    "train_stage",
]

"""Training of VISOR models on the HF `Trainer` (see `docs/training.md`).

Stage 1 and stage 2 (`train_stage`), configuration search (`search`), universal fine-tuning (`train_stage(...,
stage="universal")`), pseudo-labels (`pseudo_label`), router training (`train_router`) and evaluation (`evaluate`).
"""

from .data import IGNORE_INDEX, RecordDataset, VisorDataCollator, load_processor, load_records, record_messages
from .evaluation import evaluate, evaluate_curve, parse_configuration, router_curve, score_dataset, summarize
from .labels import assign_labels, build_table, keep_targets, pseudo_label, read_labels, read_targets
from .router import RouterTrainer, router_report, train_router
from .search import (
    exhaustive_candidates,
    fixed_and_free_layers,
    is_viable,
    record_groups,
    search,
    search_configurations,
    set_configurations,
)
from .stages import (
    LORA_MODULES_TO_SAVE,
    LORA_TARGET_MODULES,
    LoraOptions,
    VisorTrainer,
    apply_lora,
    load_model,
    save_checkpoint,
    set_trainable,
    train_stage,
)
from .synthetic import make_synthetic_dataset
from .universal import ConfigurationLogCallback, UniversalConfigurationSampler

__all__ = [
    "IGNORE_INDEX",
    "LORA_MODULES_TO_SAVE",
    "LORA_TARGET_MODULES",
    "ConfigurationLogCallback",
    "LoraOptions",
    "RecordDataset",
    "RouterTrainer",
    "UniversalConfigurationSampler",
    "VisorDataCollator",
    "VisorTrainer",
    "apply_lora",
    "assign_labels",
    "build_table",
    "evaluate",
    "evaluate_curve",
    "exhaustive_candidates",
    "fixed_and_free_layers",
    "is_viable",
    "keep_targets",
    "load_model",
    "load_processor",
    "load_records",
    "make_synthetic_dataset",
    "parse_configuration",
    "pseudo_label",
    "read_labels",
    "read_targets",
    "record_groups",
    "record_messages",
    "router_curve",
    "router_report",
    "save_checkpoint",
    "score_dataset",
    "search",
    "search_configurations",
    "set_configurations",
    "set_trainable",
    "summarize",
    "train_router",
    "train_stage",
]

"""VISOR in lmms-eval: the `visor` model plugin and the `visor_toy` task.

lmms-eval finds the model through the entry-point group `lmms_eval.models` (`model_manifest` below); the task lives
in `tasks/` (pass `--include_path "$(visor-hf lmms-tasks)"`). Nothing here imports lmms-eval until lmms-eval loads
the model class (`visor_hf.lmms.model`).
"""

from __future__ import annotations

from pathlib import Path

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
MODEL_ID = "visor"


def model_manifest():
    """The entry-point payload: lmms-eval's `ModelManifest` for `--model visor`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path="visor_hf.lmms.model.Visor")


__all__ = ["MODEL_ID", "TASKS_DIR", "model_manifest"]

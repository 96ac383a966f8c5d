"""The training stages on a converted Qwen2-VL (same commands as for LLaVA-OneVision): stage 1 trains the new modules
only; stage 2 everything but the vision tower and the router; the output is a Qwen2-VL VISOR checkpoint."""

from __future__ import annotations

import json

import torch

from training_helpers import weights
from visor_hf.cli import main
from visor_hf.conversion import convert
from visor_hf.testing import save_tiny_qwen_vl
from visor_hf.training import make_synthetic_dataset

COMMON = ["--use-cpu", "--per-device-train-batch-size", "4", "--learning-rate", "1e-3", "--logging-steps", "1", "--report-to", "none"]


def test_stage1_then_stage2_on_qwen2_vl(tmp_path):
    save_tiny_qwen_vl(tmp_path / "src")
    convert(tmp_path / "src", tmp_path / "visor")
    data = str(make_synthetic_dataset(tmp_path / "data", num_samples=8, seed=0))
    stage1, stage2 = tmp_path / "stage1", tmp_path / "stage2"
    assert main(["train", "--stage", "1", "--model", str(tmp_path / "visor"), "--data", data, "--output-dir", str(stage1), "--max-steps", "2", *COMMON]) == 0
    assert main(["train", "--stage", "2", "--model", str(stage1), "--data", data, "--output-dir", str(stage2), "--max-steps", "2", *COMMON]) == 0

    before, after1, after2 = weights(tmp_path / "visor"), weights(stage1), weights(stage2)
    diff1 = {k for k in before if not torch.equal(before[k], after1[k])}
    assert diff1 == {k for k in before if k.startswith("model.cross_attention_blocks.")}
    diff2 = {k for k in after1 if not torch.equal(after1[k], after2[k])}
    assert any(k.startswith("model.language_model.layers.") for k in diff2)
    assert not any(k.startswith(("model.visual.", "model.router.")) for k in diff2)
    config = json.loads((stage2 / "config.json").read_text())
    assert config["model_type"] == "visor_qwen2_vl"
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_qwen2_vl_visor.VisorQwen2VLForConditionalGeneration"
    assert (stage2 / "modeling_qwen2_vl_visor.py").is_file()

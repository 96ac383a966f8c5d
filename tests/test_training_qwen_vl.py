"""The training pipeline on a converted Qwen2-VL, through the same `visor-hf` commands as for LLaVA-OneVision: stage 1
trains the new modules only; stage 2 everything but the vision tower and the router; search, universal fine-tuning,
pseudo-labels, router training and evaluation run and write Qwen2-VL VISOR checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from training_helpers import weights
from visor_hf.cli import main
from visor_hf.conversion import convert
from visor_hf.testing import save_tiny_qwen_vl
from visor_hf.training import make_synthetic_dataset

COMMON = ["--use-cpu", "--per-device-train-batch-size", "4", "--learning-rate", "1e-3", "--logging-steps", "1", "--report-to", "none"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("qwen-training")
    save_tiny_qwen_vl(root / "src")
    convert(root / "src", root / "visor")  # CA 0, 3; SA 2, 4; configurations [], [2], [2, 4]
    make_synthetic_dataset(root / "data", num_samples=8, seed=0)
    make_synthetic_dataset(root / "eval", num_samples=4, seed=1)
    data = str(root / "data/data.jsonl")
    assert main(["train", "--stage", "1", "--model", str(root / "visor"), "--data", data, "--output-dir", str(root / "stage1"), "--max-steps", "2", *COMMON]) == 0
    assert main(["train", "--stage", "2", "--model", str(root / "stage1"), "--data", data, "--output-dir", str(root / "stage2"), "--max-steps", "2", *COMMON]) == 0
    return root


def test_stage1_then_stage2_on_qwen2_vl(workdir):
    before, after1, after2 = weights(workdir / "visor"), weights(workdir / "stage1"), weights(workdir / "stage2")
    diff1 = {k for k in before if not torch.equal(before[k], after1[k])}
    assert diff1 == {k for k in before if k.startswith("model.cross_attention_blocks.")}
    diff2 = {k for k in after1 if not torch.equal(after1[k], after2[k])}
    assert any(k.startswith("model.language_model.layers.") for k in diff2)
    assert not any(k.startswith(("model.visual.", "model.router.")) for k in diff2)
    config = json.loads((workdir / "stage2" / "config.json").read_text())
    assert config["model_type"] == "visor_qwen2_vl"
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_qwen2_vl_visor.VisorQwen2VLForConditionalGeneration"
    assert (workdir / "stage2" / "modeling_qwen2_vl_visor.py").is_file()


@pytest.mark.slow
def test_search_universal_label_router_evaluate_on_qwen2_vl(workdir):
    data, eval_data = str(workdir / "data/data.jsonl"), str(workdir / "eval/data.jsonl")
    searched, universal, labelled, routed = (workdir / n for n in ("search", "universal", "labels", "router"))
    assert main(["search", "--model", str(workdir / "stage2"), "--data", eval_data, "--output-dir", str(searched), "--threshold", "1.0",
                 "--rule", "pooled"]) == 0  # every subset written (the per-group rule thins by cost)
    assert json.loads((searched / "config.json").read_text())["configurations"] == [[], [2], [4], [2, 4]]
    assert main(["train", "--stage", "universal", "--model", str(searched), "--data", data, "--output-dir", str(universal), "--max-steps", "2", *COMMON]) == 0
    assert main(["label", "--model", str(universal), "--data", data, "--output-dir", str(labelled), "--limit", "4"]) == 0
    assert main(["train-router", "--model", str(universal), "--data", data, "--labels", str(labelled),
                 "--output-dir", str(routed), "--max-steps", "2", *COMMON]) == 0
    diff = {k for k, v in weights(universal).items() if not torch.equal(v, weights(routed)[k])}
    assert diff and all(k.startswith("model.router.") for k in diff)
    assert main(["evaluate", "--model", str(routed), "--data", eval_data, "--configuration", "auto", "--output-dir", str(workdir / "eval_router")]) == 0
    summary = json.loads((workdir / "eval_router/summary.json").read_text())
    assert sum(summary["configuration_histogram"].values()) == 4

"""Sharded training (FSDP2) through the training entry points, against a single-process run of the same global
batch: stage 1 with a text-only rank, universal fine-tuning with per-step configurations (full and LoRA), router
training with everything else frozen; activation checkpointing on. Two real processes (`torchrun`, gloo on the
CPU); a timeout turns a hang into a failure. Also: the unseen image that keeps a text-only rank in step changes
neither the loss nor any gradient (checked against the same batch without it)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from visor_hf.conversion import convert
from visor_hf.testing import save_tiny_llava
from visor_hf.training import VisorDataCollator, load_model, load_processor, make_synthetic_dataset
from visor_hf.training.data import model_inputs
from visor_hf.training.sharding import UnseenImage, append_unseen_image

# Every scenario in one launch (the process start dominates). `world` 1 is the single-process reference: the same
# global batch of 2 (one sample with an image, one text-only) in one micro-batch instead of one per rank.
SCENARIOS = """
import json, os, sys, torch
torch.set_num_threads(1)
from visor_hf.cli import main
from visor_hf.training import LoraOptions, train_stage
work, out, world = sys.argv[1], sys.argv[2], int(sys.argv[3])
rank = os.environ.get("RANK", "ref")
common = dict(use_cpu=True, save_strategy="no", report_to="none", disable_tqdm=True, learning_rate=1e-3, logging_steps=1,
              per_device_train_batch_size=2 // world)
fsdp = world if world > 1 else None
model, data = os.path.join(work, "visor"), os.path.join(work, "mixed.json")
losses = {}
def run(name, stage, steps, **kwargs):
    trainer = train_stage(model, data, os.path.join(out, name), stage, fsdp_size=fsdp,
                          training_args={**common, "max_steps": steps, "activation_checkpointing": True}, **kwargs)
    losses[name] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
run("stage1", "1", 2)
run("universal", "universal", 3)
run("lora", "universal", 3, lora=LoraOptions(r=4, dropout=0.0, merge=False))
# router training through the command line (`--fsdp-size`)
command = ["train-router", "--model", model, "--data", data, "--labels", os.path.join(work, "labels.jsonl"),
           "--output-dir", os.path.join(out, "router"), "--use-cpu", "--max-steps", "2", "--learning-rate", "1e-2",
           "--per-device-train-batch-size", str(2 // world), "--logging-steps", "1", "--save-steps", "100",
           "--activation-checkpointing", "--training-args", '{"disable_tqdm": true, "save_strategy": "no"}']
assert main(command + (["--fsdp-size", str(fsdp)] if fsdp else [])) == 0
with open(os.path.join(out, "router", "router_report.json")) as f:
    report = json.load(f)
losses["router"] = report["train_metrics"]["train_loss"]
with open(os.path.join(out, "losses_%s.json" % rank), "w") as f:
    json.dump({"losses": losses, "router_report": {k: v for k, v in report.items() if k != "train_metrics"}}, f)
"""


def weights(folder) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("fsdp")
    save_tiny_llava(root / "llava")
    convert(root / "llava", root / "visor")  # CA 0, 3; SA 2, 4; configurations [], [2], [2, 4]; router layer 1
    data = make_synthetic_dataset(root / "data", num_samples=8, seed=0)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    for r in records:
        if "image" in r:
            r["image"] = str(root / "data" / r["image"])
    mixed = [next(r for r in records if "image" in r), next(r for r in records if "image" not in r)]
    (root / "mixed.json").write_text(json.dumps(mixed))
    (root / "text_only.json").write_text(json.dumps([r for r in records if "image" not in r][:2]))
    (root / "labels.jsonl").write_text('{"index": 0, "label": 1}\n{"index": 1, "label": 2}\n')
    return root


def test_unseen_image_changes_neither_loss_nor_gradients(workdir):
    """A text-only batch with the unseen image: same loss, same gradients for the text path, exactly zero (not
    missing) gradients for the vision tower, projector and CA blocks, which all ran."""
    model = load_model(workdir / "visor")
    processor = load_processor(workdir / "visor")
    records = json.loads((workdir / "text_only.json").read_text())
    batch = model_inputs(VisorDataCollator(processor)(records))
    assert "pixel_values" not in batch
    padded = append_unseen_image(batch, UnseenImage(processor, model.config.image_token_id), processor.tokenizer.pad_token_id)
    assert padded["input_ids"].shape[1] > batch["input_ids"].shape[1]

    def gradients(inputs):
        model.zero_grad()
        loss = model(**inputs, visor_configuration="max").loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() if p.grad is not None else None for n, p in model.named_parameters()}

    loss, grads = gradients(batch)
    loss_padded, grads_padded = gradients(padded)
    torch.testing.assert_close(loss_padded, loss, rtol=1e-6, atol=1e-6)
    visual = ("vision_tower.", "multi_modal_projector.", "cross_attention_blocks.", "image_newline")
    for name, grad in grads_padded.items():
        if any(key in name for key in visual):
            assert grad is None or torch.count_nonzero(grad) == 0, name
        elif grads[name] is not None:
            torch.testing.assert_close(grad, grads[name], rtol=1e-5, atol=1e-6, msg=name)
    # the whole visual path ran (SigLIP's post_layernorm never does in LLaVA-OV: the features are read before it)
    ran = {n for n, g in grads_padded.items() if g is not None and any(key in n for key in visual)}
    assert ran == {n for n in grads_padded if any(key in n for key in visual) and "post_layernorm" not in n}
    assert not {n for n, g in grads.items() if g is not None and any(key in n for key in visual)}  # and did not without it
    assert append_unseen_image(padded, None) is padded  # a batch with images is left as it is


@pytest.mark.slow
def test_fsdp2_on_two_ranks_matches_one_process(workdir, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    script = tmp_path / "fsdp_scenarios.py"
    script.write_text(SCENARIOS)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    sharded, single = tmp_path / "fsdp", tmp_path / "single"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
               str(script), str(workdir), str(sharded), "2"]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = subprocess.run([sys.executable, str(script), str(workdir), str(single), "1"], env=env,
                               capture_output=True, text=True, timeout=600)
    assert reference.returncode == 0, reference.stderr[-3000:]

    ranks = [json.loads((sharded / f"losses_{r}.json").read_text()) for r in range(2)]
    expected = json.loads((single / "losses_ref.json").read_text())
    assert ranks[0] == ranks[1]
    for name, losses in expected["losses"].items():
        assert ranks[0]["losses"][name] == pytest.approx(losses, rel=1e-5), name
    report, expected_report = ranks[0]["router_report"], expected["router_report"]
    assert report.pop("configuration_histogram") == expected_report.pop("configuration_histogram")
    assert report == pytest.approx(expected_report)

    # per-step configurations: the same schedule in both runs, every configuration visited
    schedule = [(sharded / "universal/universal_configurations.jsonl"), (single / "universal/universal_configurations.jsonl")]
    steps = [[json.loads(line)["configuration"] for line in path.read_text().splitlines()] for path in schedule]
    assert steps[0] == steps[1] and sorted(steps[0]) == [0, 1, 2]

    before = weights(workdir / "visor")
    frozen_in_universal = ("model.router.", "model.vision_tower.")
    for name, trains in (("stage1", lambda k: k.startswith("model.cross_attention_blocks.")),
                         ("universal", lambda k: not k.startswith(frozen_in_universal)),
                         ("router", lambda k: k.startswith("model.router.")), ("lora/adapter", None)):
        a, b = weights(sharded / name), weights(single / name)
        # under FSDP, LoRA has no `modules_to_save` copy of the router (a sharded module cannot be copied)
        assert set(a) == {k for k in b if ".router." not in k or name != "lora/adapter"}, name
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=f"{name}: {key}")
        if name != "lora/adapter":
            changed = {k for k in a if not torch.equal(a[k], before[k])}
            assert changed and all(trains(k) for k in changed), name

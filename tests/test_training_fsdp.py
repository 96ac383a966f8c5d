"""Sharded training (FSDP2) through the training entry points, against a single-process run of the same global
batch: stage 1 with a text-only rank, universal fine-tuning with per-step configurations (full and LoRA), router
training with everything else frozen, gradient accumulation; activation checkpointing on. Two real processes (`torchrun`, gloo on the
CPU); a timeout turns a hang into a failure. Also: the unseen image that keeps a text-only rank in step changes
neither the loss nor any gradient (checked against the same batch without it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from training_helpers import make_training_workdir, run_script, weights
from visor_hf.training import VisorDataCollator, load_model, load_processor
from visor_hf.training.data import model_inputs
from visor_hf.training.sharding import FSDP_WRAP_CLASSES, UnseenImage, append_unseen_image

# Every scenario in one launch (the process start dominates). `world` 1 is the single-process reference: the same
# global batch (one sample with an image and one text-only; two of each with accumulation) in one micro-batch.
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
def run(name, stage, steps, records=data, args=None, **kwargs):
    arguments = {**common, "max_steps": steps, "activation_checkpointing": True, **(args or {})}
    trainer = train_stage(model, records, os.path.join(out, name), stage, fsdp_size=fsdp, training_args=arguments, **kwargs)
    losses[name] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
run("stage1", "1", 2)
run("universal", "universal", 3)
run("lora", "universal", 3, lora=LoraOptions(r=4, dropout=0.0, merge=False))
# gradient accumulation: 2 ranks x 2 micro-batches of 1 (two of the four samples text-only) against one batch of 4
run("accumulation", "1", 2, os.path.join(work, "mixed4.json"),
    {"per_device_train_batch_size": 1 if fsdp else 4, "gradient_accumulation_steps": 2 if fsdp else 1})
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


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = make_training_workdir(tmp_path_factory.mktemp("fsdp"))
    (root / "labels.jsonl").write_text('{"index": 0, "label": 1}\n{"index": 1, "label": 2}\n')
    records = [json.loads(line) for line in (root / "data/data.jsonl").read_text().splitlines()]
    with_image = [{**r, "image": str(root / "data" / r["image"])} for r in records if "image" in r]
    (root / "mixed4.json").write_text(json.dumps(with_image[:2] + [r for r in records if "image" not in r][:2]))
    return root


def test_unseen_image_changes_neither_loss_nor_gradients(workdir):
    """A text-only batch with the unseen image: same loss, same gradients for the text path, exactly zero (not
    missing) gradients for the vision tower, projector and CA blocks, which all ran."""
    model = load_model(workdir / "visor")
    processor = load_processor(workdir / "visor")
    records = json.loads((workdir / "text_only.json").read_text())[:2]
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
    sharded, single = tmp_path / "fsdp", tmp_path / "single"
    run_script(SCENARIOS, tmp_path, workdir, sharded, 2, processes=2, timeout=600)
    run_script(SCENARIOS, tmp_path, workdir, single, 1, timeout=600)

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
                         ("accumulation", lambda k: k.startswith("model.cross_attention_blocks.")),
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


def test_fsdp_with_lora_refuses_to_merge_on_one_process(tmp_path):
    from visor_hf.training import LoraOptions, train_stage

    with pytest.raises(ValueError, match="--no-merge"):
        train_stage(tmp_path / "model", tmp_path / "data.jsonl", tmp_path / "out", "2", lora=LoraOptions(), fsdp_size=2)


def test_accelerate_configs_wrap_visor_units(workdir, monkeypatch):
    """The GPU configs in examples/accelerate go through `accelerate launch`'s parsing: FSDP2 with one unit per
    decoder layer, CA block and router; ZeRO-3 with a gathered final model."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.launch import prepare_multi_gpu_env

    examples = Path(__file__).resolve().parents[1] / "examples" / "accelerate"

    def parsed(name):
        args = launch_command_parser().parse_args(["--config_file", str(examples / name), "-m", "visor_hf.cli", "train"])
        return _validate_launch_command(args)[0]

    args = parsed("fsdp2.yaml")
    assert args.use_fsdp and not args.use_deepspeed
    for key, value in prepare_multi_gpu_env(args).items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    model = load_model(workdir / "visor")
    plugin.set_auto_wrap_policy(model)
    wrapped = {type(m).__name__ for m in model.modules() if plugin.auto_wrap_policy(module=m, recurse=False, nonwrapped_numel=0)}
    assert plugin.fsdp_version == 2 and plugin.state_dict_type.name == "FULL_STATE_DICT"
    assert wrapped == set(FSDP_WRAP_CLASSES) == {"Qwen2DecoderLayer", "VisorCrossAttentionBlock", "VisorRouter"}

    args = parsed("deepspeed_zero3.yaml")
    assert args.use_deepspeed and int(args.zero_stage) == 3 and str(args.zero3_save_16bit_model).lower() == "true"

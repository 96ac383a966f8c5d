"""The HF `Trainer` machinery under VISOR training, against independent references: gradient accumulation gives the
weights of the equivalent large batch (one configuration per optimisation step), micro-batches without images train
in stage 1 (alone and on two DDP ranks), and the precision / checkpointing / accumulation options reach the
`Trainer`."""

from __future__ import annotations

import json

import pytest
import torch

from training_helpers import make_training_workdir, run_script, weights
from visor_hf.cli import main
from visor_hf.training import UniversalConfigurationSampler, train_stage

ARGS = {"use_cpu": True, "report_to": "none", "save_strategy": "no", "disable_tqdm": True, "learning_rate": 1e-3}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_training_workdir(tmp_path_factory.mktemp("engine"))


def test_gradient_accumulation_matches_the_large_batch_with_one_configuration_per_step(workdir):
    """2 micro-batches of 2 per step give the weights of batches of 4 (token-weighted loss), under universal
    fine-tuning: every micro-batch of a step runs the step's configuration."""
    data = workdir / "data/data.jsonl"
    large = train_stage(workdir / "visor", data, workdir / "ga_large", "universal", seed=1,
                        training_args={**ARGS, "max_steps": 2, "per_device_train_batch_size": 4})
    accumulated = train_stage(workdir / "visor", data, workdir / "ga_accumulated", "universal", seed=1,
                              training_args={**ARGS, "max_steps": 2, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2})
    sampler = UniversalConfigurationSampler(3, seed=1)
    assert [c for _, c in large.configuration_trace] == sampler.sequence(0, 2)
    assert accumulated.configuration_trace == [(0, sampler(0)), (0, sampler(0)), (1, sampler(1)), (1, sampler(1))]
    a, b, before = weights(workdir / "ga_large"), weights(workdir / "ga_accumulated"), weights(workdir / "visor")
    assert any(not torch.equal(a[k], before[k]) for k in a)
    for key in a:
        if key.endswith("cross_attn.k_proj.bias"):
            # a key bias without RoPE shifts every logit of a query equally: its true gradient is 0, and AdamW turns
            # the rounding noise left in its place (which depends on the batch split) into lr-sized steps
            continue
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-6, msg=key)


def test_stage1_trains_on_micro_batches_without_images(workdir):
    """Stage 1 with one sample per micro-batch: the text-only one has no trainable parameter in its graph (the CA
    blocks need images); it must train (zero gradient), not fail."""
    before = weights(workdir / "visor")
    train_stage(workdir / "visor", workdir / "text_only.json", workdir / "text_only", "1",
                training_args={**ARGS, "max_steps": 2, "per_device_train_batch_size": 1})
    after = weights(workdir / "text_only")
    assert all(torch.equal(before[k], after[k]) for k in before)  # zero gradients, no weight decay: nothing moves
    train_stage(workdir / "visor", workdir / "mixed.json", workdir / "mixed", "1",
                training_args={**ARGS, "max_steps": 2, "per_device_train_batch_size": 1})
    after = weights(workdir / "mixed")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("model.cross_attention_blocks.") for k in changed)


def test_trainer_options_reach_the_trainer(workdir):
    """--bf16, --activation-checkpointing (and its alias), accumulation and the seed end up in the `Trainer`'s
    arguments, recorded in visor_training.json; the model trained with them."""
    out = workdir / "options"
    assert main(["train", "--stage", "2", "--model", str(workdir / "visor"), "--data", str(workdir / "data/data.jsonl"),
                 "--output-dir", str(out), "--max-steps", "1", "--use-cpu", "--per-device-train-batch-size", "2",
                 "--gradient-accumulation-steps", "2", "--bf16", "--gradient-checkpointing", "--seed", "7",
                 "--report-to", "none", "--training-args", '{"disable_tqdm": true}']) == 0
    recorded = json.loads((out / "visor_training.json").read_text())["training_args"]
    assert recorded["bf16"] is True and recorded["activation_checkpointing"] is True
    assert recorded["gradient_accumulation_steps"] == 2 and recorded["seed"] == 7 and recorded["max_steps"] == 1
    before, after = weights(workdir / "visor"), weights(out)
    assert any(not torch.equal(before[k], after[k]) for k in before)


DDP_SCRIPT = """
import os, sys, torch
torch.set_num_threads(1)
from visor_hf.training import train_stage
model, data, out = sys.argv[1:4]
args = dict(max_steps=2, per_device_train_batch_size=1, use_cpu=True, save_strategy="no", activation_checkpointing=True,
            report_to="none", disable_tqdm=True, ddp_backend="gloo")
trainer = train_stage(model, data, out, "1", seed=0, training_args=args)
# stage 2 with the vision tower: SigLIP's post_layernorm never enters the graph (LLaVA-OV reads the hidden states)
vision = train_stage(model, data, out + "_vision", "2", train_vision_tower=True, seed=0, training_args=args)
with open(os.path.join(out, "rank%s.txt" % os.environ.get("RANK", "0")), "w") as f:
    f.write("steps %d %d world %d" % (trainer.state.global_step, vision.state.global_step, trainer.args.world_size))
"""


@pytest.mark.slow
def test_stage1_on_two_ddp_ranks_with_a_text_only_rank(workdir, tmp_path):
    """Two ranks, one sample each (one with an image, one without), activation checkpointing: no hang, no error, in
    stage 1 and in stage 2 with the vision tower (which has parameters outside the graph)."""
    run_script(DDP_SCRIPT, tmp_path, workdir / "visor", workdir / "mixed.json", tmp_path / "out", processes=2)
    assert [(tmp_path / "out" / f"rank{r}.txt").read_text() for r in range(2)] == ["steps 2 2 world 2"] * 2
    changed = {k for k, v in weights(tmp_path / "out").items() if not torch.equal(v, weights(workdir / "visor")[k])}
    assert changed and all(k.startswith("model.cross_attention_blocks.") for k in changed)


def test_stage_training_from_a_datasets_dataset_with_an_image_column(workdir):
    """The Python API takes a `datasets.Dataset` whose `image` column holds pictures (decoded to PIL by `datasets`)."""
    datasets = pytest.importorskip("datasets")
    records = [json.loads(line) for line in (workdir / "data/data.jsonl").read_text().splitlines()]
    records = [r for r in records if "image" in r and len(r["conversations"]) == 2][:2]
    table = datasets.Dataset.from_dict({
        "image": [str(workdir / "data" / r["image"]) for r in records],
        "conversations": [r["conversations"] for r in records],
    }).cast_column("image", datasets.Image())
    assert type(table[0]["image"]).__module__.startswith("PIL")
    train_stage(workdir / "visor", table, workdir / "from_datasets", "1", training_args={**ARGS, "max_steps": 1, "per_device_train_batch_size": 2})
    before, after = weights(workdir / "visor"), weights(workdir / "from_datasets")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {k for k in before if k.startswith("model.cross_attention_blocks.")}


@pytest.mark.parametrize("lora", [False, True])
def test_stage2_trains_the_vision_tower_on_request(workdir, lora):
    from visor_hf.training import LoraOptions

    out = workdir / f"vision_{lora}"
    train_stage(workdir / "visor", workdir / "data/data.jsonl", out, "2", train_vision_tower=True,
                lora=LoraOptions(r=4, alpha=8) if lora else None,
                training_args={**ARGS, "max_steps": 2, "per_device_train_batch_size": 4})
    before, after = weights(workdir / "visor"), weights(out)
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    vision = {k for k in changed if k.startswith("model.vision_tower.")}
    assert vision and not any(k.startswith("model.router.") for k in changed)
    if lora:  # adapters on SigLIP's attention and MLP projections only
        assert {k.rsplit(".", 2)[-2] for k in vision} <= {"q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"}
    else:
        assert any("layer_norm" in k or "embeddings" in k for k in vision)


def test_stage_training_batches_with_the_given_data_collator(workdir):
    """`data_collator=` replaces the default `VisorDataCollator`: a subclass that only counts its calls makes every
    batch (accelerate's loader may fetch one ahead) and trains to the weights of the default collator."""
    from visor_hf.training.data import VisorDataCollator, load_processor

    class Counting(VisorDataCollator):
        calls = 0

        def __call__(self, records):
            Counting.calls += 1
            return super().__call__(records)

    data, args = workdir / "data/data.jsonl", {**ARGS, "max_steps": 2, "per_device_train_batch_size": 2}
    train_stage(workdir / "visor", data, workdir / "collator_default", "2", seed=4, training_args=args)
    trainer = train_stage(workdir / "visor", data, workdir / "collator_given", "2", seed=4, training_args=args,
                          data_collator=Counting(load_processor(workdir / "visor")))
    assert isinstance(trainer.data_collator, Counting) and Counting.calls >= 2
    default, given, before = weights(workdir / "collator_default"), weights(workdir / "collator_given"), weights(workdir / "visor")
    assert any(not torch.equal(given[k], before[k]) for k in given)
    for key in default:
        torch.testing.assert_close(given[key], default[key], rtol=0, atol=0, msg=key)

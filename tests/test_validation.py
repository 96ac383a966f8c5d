"""Values that used to be let through silently: config fields, misspelled or ill-typed forward arguments, and a
resume from a checkpoint without its training state."""

from __future__ import annotations

import shutil

import pytest
import torch

from samples import ANYRES
from visor_hf.testing import TINY_LAYOUT, build_batch, save_tiny_llava, tiny_llava_config, visor_config_from_llava


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("default_configuration", True, "default_configuration must be an index"),
        ("default_configuration", 1.5, "default_configuration must be an index"),
        ("router_hidden_size", 8.0, "router_hidden_size must be an int"),
        ("routing_token_id", 10_000, "outside the vocabulary"),
        ("routing_token_id", -1, "outside the vocabulary"),
        ("routing_token_id", 3, "also the image token id"),  # testing.IMAGE_ID
        ("routing_token_id", 0, "also the pad token id"),  # testing.PAD_ID
        ("routing_token_id", 5.0, "must be a token id"),
    ],
)
def test_config_refuses_values_that_were_let_through(field, value, message):
    with pytest.raises(ValueError, match=message):
        visor_config_from_llava(tiny_llava_config(), **{**TINY_LAYOUT, field: value})


def test_config_accepts_the_valid_values():
    config = visor_config_from_llava(tiny_llava_config(), **{**TINY_LAYOUT, "default_configuration": 1, "router_hidden_size": 8})
    assert config.default_configuration == 1 and config.router_hidden_size == 8


def test_misspelled_forward_argument_is_an_error(visor):
    batch = build_batch(visor, [ANYRES])
    with pytest.raises(TypeError, match="'visor_configuraton'; did you mean 'visor_configuration'"):
        visor(**batch, visor_configuraton=0)
    with pytest.raises(TypeError, match="'visor_mode'"):
        visor(**batch, visor_mode="fast")
    with pytest.raises(TypeError, match="did you mean 'output_router_logits'"):
        visor(**batch, output_router_logit=True)
    # what transformers passes through **kwargs still works
    with torch.no_grad():
        out = visor(**batch, visor_configuration=0, output_hidden_states=True, return_dict=True)
    assert out.hidden_states is not None


@pytest.mark.parametrize("budget", [True, [True], torch.tensor([True])])
def test_bool_budget_is_an_error(visor, budget):
    batch = build_batch(visor, [ANYRES])
    with pytest.raises(ValueError, match="visor_budget must be a fraction"):
        visor(**batch, visor_budget=budget)
    with pytest.raises(ValueError, match="visor_budget must be a fraction"):
        visor.generate(**batch, visor_budget=budget, max_new_tokens=1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A stage-1 run of two steps that saved `checkpoint-1`."""
    from visor_hf.conversion import convert
    from visor_hf.training import make_synthetic_dataset, train_stage

    root = tmp_path_factory.mktemp("resume")
    save_tiny_llava(root / "llava", num_layers=3)
    convert(root / "llava", root / "visor")
    data = make_synthetic_dataset(root / "data", num_samples=4, seed=0)
    args = {"use_cpu": True, "report_to": "none", "disable_tqdm": True, "max_steps": 2, "save_steps": 1, "per_device_train_batch_size": 2}
    train_stage(root / "visor", data, root / "run", "1", training_args=args)
    assert (root / "run" / "checkpoint-1" / "optimizer.pt").is_file()
    return root, data, args


@pytest.mark.parametrize("missing", ["optimizer.pt", "scheduler.pt", "rng_state.pth"])
def test_resume_from_a_checkpoint_without_its_training_state_is_an_error(checkpoint, tmp_path, missing):
    from visor_hf.training import train_stage

    root, data, args = checkpoint
    incomplete = tmp_path / "checkpoint-1"
    shutil.copytree(root / "run" / "checkpoint-1", incomplete)
    (incomplete / missing).unlink()
    with pytest.raises(ValueError, match=f"cannot resume from .*lacks {missing}"):
        train_stage(root / "visor", data, tmp_path / "resumed", "1", training_args=args, resume_from_checkpoint=str(incomplete))
    # the complete checkpoint resumes
    trainer = train_stage(root / "visor", data, tmp_path / "complete", "1", training_args=args,
                          resume_from_checkpoint=str(root / "run" / "checkpoint-1"))
    assert trainer.state.global_step == 2

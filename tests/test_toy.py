"""The embedded default: the synthetic task generator and the shipped toy VISOR checkpoint.

The checkpoint test reloads `visor_hf/assets/toy-visor` offline and checks it against the numbers that
`examples/toy/train_toy.py` recorded (in the same folder, `results.json`, and in `docs/toy.md`).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from visor_hf.toy.data import (
    EASY_KINDS,
    HARD_KINDS,
    KINDS,
    all_questions,
    eval_set,
    make_scene,
    render,
    sample_questions,
    vocabulary,
)
from visor_hf.toy.inference import DEFAULT_CHECKPOINT

ACCURACY_TOLERANCE = 0.02  # on 200 questions: one or two answers that flip on float summation order


# -- the generator -------------------------------------------------------------------------------------------------


def test_generator_is_deterministic():
    for seed in (0, 1, 12345):
        a, b = make_scene(seed), make_scene(seed)
        assert a == b
        assert np.array_equal(np.asarray(render(a)), np.asarray(render(b)))
        assert sample_questions(a) == sample_questions(b)
    assert eval_set(3, 5) == eval_set(3, 5)
    # different seeds give different pictures
    assert len({make_scene(s).cells for s in range(20)}) == 20
    # the stream is numpy's PCG64 seeded by the picture index: pinned values
    assert [make_scene(s).background for s in range(6)] == ["purple", "purple", "orange", "orange", "cyan", "black"]
    assert [q.answer for q in sample_questions(make_scene(0))] == ["purple", "yes", "four", "four", "empty"]
    assert render(make_scene(0)).size == (128, 128)


def test_questions_answers_and_vocabulary():
    words = set(vocabulary())
    counts = {k: 0 for k in KINDS}
    for seed in range(50):
        scene = make_scene(seed)
        questions = all_questions(scene)
        assert len(questions) == 2 + 3 + 4 + 16
        for q in questions:
            assert set(q.text.split()) <= words and q.answer in words
            counts[q.kind] += 1
        objects = scene.objects()
        red = next(q for q in questions if q.kind == "red")
        assert red.answer == ("yes" if any(c == "red" for c, _ in objects) else "no")
        picked = sample_questions(scene)
        assert [q.kind for q in picked] == list(KINDS)  # one question of each kind
    assert set(EASY_KINDS) == {"background", "red"} and set(HARD_KINDS) == {"count_shape", "count_colour", "cell"}


def test_rendering_matches_the_scene():
    scene = make_scene(7)
    pixels = np.asarray(render(scene)).astype(int)
    from visor_hf.toy.data import BACKGROUNDS, CELL, COLOURS

    for r in range(4):
        for c in range(4):
            centre = pixels[r * CELL + CELL // 2 + 4, c * CELL + CELL // 2]
            cell = scene.cells[r][c]
            expected = BACKGROUNDS[scene.background] if cell is None else COLOURS[cell[0]]
            assert np.abs(centre - np.array(expected)).max() <= 2


# -- the shipped checkpoint -----------------------------------------------------------------------------------------

needs_checkpoint = pytest.mark.skipif(not (DEFAULT_CHECKPOINT / "model.safetensors").is_file(),
                                      reason="the toy checkpoint is not shipped in this tree")


@pytest.fixture(scope="module")
def toy():
    from visor_hf.toy.inference import load_toy

    model, processor = load_toy()
    recorded = json.loads((DEFAULT_CHECKPOINT / "results.json").read_text())
    return model, processor, recorded


@needs_checkpoint
def test_shipped_checkpoint_loads_offline_and_matches_the_recorded_accuracy(toy):
    from visor_hf.modeling import VisorForConditionalGeneration
    from visor_hf.toy.evaluation import evaluate_visor, report

    model, processor, recorded = toy
    assert isinstance(model, VisorForConditionalGeneration)
    assert model.config.configurations == recorded["layout"]["configurations"]
    ci = recorded["ci"]
    examples = eval_set(ci["seed"], ci["images"])
    result = report(evaluate_visor(model, examples, "auto"), examples)
    for diff in ("easy", "hard"):
        assert abs(result["accuracy"][diff] - ci["accuracy"][diff]) <= ACCURACY_TOLERANCE, (diff, result, ci)
    assert abs(result["flops_ratio"] - ci["flops_ratio"]) <= 0.02
    # the router spends more SA layers on hard questions than on easy ones, as recorded
    if ci["mean_sa_layers_hard"] > ci["mean_sa_layers_easy"]:
        assert result["mean_sa_layers_hard"] > result["mean_sa_layers_easy"]


@needs_checkpoint
@pytest.mark.parametrize("trust_remote_code", [False, True])
def test_shipped_checkpoint_loads_through_the_auto_classes(trust_remote_code):
    """The shipped folder holds no modeling files (the package is the code), so it carries no `auto_map` either:
    the Auto classes resolve the registered VISOR classes with or without `trust_remote_code`."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from visor_hf.modeling import VisorForConditionalGeneration
    from visor_hf.modeling.processing_visor import VisorProcessor

    assert "auto_map" not in json.loads((DEFAULT_CHECKPOINT / "config.json").read_text())
    model = AutoModelForImageTextToText.from_pretrained(DEFAULT_CHECKPOINT, trust_remote_code=trust_remote_code)
    processor = AutoProcessor.from_pretrained(DEFAULT_CHECKPOINT, trust_remote_code=trust_remote_code)
    assert type(model) is VisorForConditionalGeneration and type(processor) is VisorProcessor


@needs_checkpoint
def test_processor_inputs_match_the_training_encoding(toy):
    from visor_hf.toy.inference import prompt
    from visor_hf.toy.model import encode_batch

    model, processor, _ = toy
    examples = eval_set(9, 2)[:4]
    inputs = processor(images=[e.image for e in examples], text=[prompt(processor, e.question.text) for e in examples],
                       return_tensors="pt", padding=True)
    mine = encode_batch(examples, model.config.routing_token_id)
    assert torch.equal(inputs["input_ids"], mine["input_ids"])
    assert torch.equal(inputs["pixel_values"], mine["pixel_values"])


@needs_checkpoint
def test_toy_command(capsys):
    from visor_hf.cli import main

    assert main(["toy", "--images", "1", "--seed", "0"]) == 0
    out = capsys.readouterr().out
    assert "answer" in out and "truth" in out and "SA layers" in out
    assert "easy: accuracy" in out and "hard: accuracy" in out and "average saving" in out


def test_fast_feature_path_matches_llava_onevision():
    """`toy.model.image_features` (used for token pooling) packs the visual tokens exactly as LLaVA-OV does."""
    from transformers import LlavaOnevisionForConditionalGeneration

    from visor_hf.toy.model import NUM_IMAGE_TOKENS, encode_batch, image_features, toy_llava_config

    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration._from_config(toy_llava_config(num_layers=1)).eval()
    batch = encode_batch(eval_set(5, 1)[:2])
    with torch.no_grad():
        reference = model.model.get_image_features(batch["pixel_values"], batch["image_sizes"], return_dict=True).pooler_output
        mine = image_features(model, batch["pixel_values"])
        assert [r.shape[0] for r in reference] == [NUM_IMAGE_TOKENS] * 2
        torch.testing.assert_close(torch.stack(list(reference)), mine)
        assert image_features(model, batch["pixel_values"], pool=2).shape[1] == 48
        assert image_features(model, batch["pixel_values"], pool=4).shape[1] == 24
    assert (batch["input_ids"] == model.config.image_token_id).sum(1).tolist() == [NUM_IMAGE_TOKENS] * 2

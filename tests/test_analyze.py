"""`visor-hf analyze`: the layer-drop analysis, on a scorer with a known answer and on the shipped toy."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from visor_hf.analysis.layer_drop import layer_subsets, run_layer_drop
from visor_hf.cli import main


def test_every_subset_or_random_ones_per_size():
    assert sorted(layer_subsets([3, 1])) == [(), (1,), (1, 3), (3,)]
    assert len(layer_subsets([1, 3, 6, 7])) == 16
    drawn = layer_subsets(list(range(8)), per_size=3, seed=1)
    sizes = [len(s) for s in drawn]
    assert sizes.count(0) == 1 and sizes.count(8) == 1 and sizes.count(7) == 3 and sizes.count(4) == 3
    assert len(set(drawn)) == len(drawn)
    assert drawn == layer_subsets(list(range(8)), per_size=3, seed=1)


def test_known_pattern_is_recovered():
    """Group 'cell' is right exactly when layer 6 keeps vision, 'count' always; 'mixed' needs 6 on half its samples
    and 1 on the other half."""
    groups = ["cell"] * 4 + ["count"] * 4 + ["mixed"] * 4

    def score(subset):
        return [6 in subset] * 4 + [True] * 4 + [6 in subset] * 2 + [1 in subset] * 2

    result = run_layer_drop(score, [1, 3, 6, 7], layer_subsets([1, 3, 6, 7]), groups, [0, 2], 8)
    sens = dict(zip(result.groups, result.sensitivity()))
    np.testing.assert_allclose(sens["cell"], [0, 0, 1, 0])
    np.testing.assert_allclose(sens["count"], [0, 0, 0, 0])
    np.testing.assert_allclose(sens["mixed"], [0.5, 0, 0.5, 0])
    np.testing.assert_allclose(result.curve()[0], [0, 0.25, 0.5, 0.75, 1])  # cell: k of 4 layers hold layer 6 with p = k/4
    assert result.clusters() == {"cell": "hard", "count": "easy", "mixed": "hard"}
    layout = result.suggest_layout()
    assert layout["self_attention_layers"] == [1, 6]  # 1 is exactly half as sensitive as 6
    assert layout["cross_attention_layers"] == [0, 2]
    assert result.suggest_layout(sa_count=1) == {"cross_attention_layers": [0, 1, 2], "self_attention_layers": [6],
                                                 "command": "--ca-layers 0,1,2 --sa-layers 6"}


def test_suggested_layout_is_accepted_by_convert():
    from visor_hf.conversion.convert import resolve_layout
    from visor_hf.modeling.requests_visor import parse_layers

    result = run_layer_drop(lambda s: [7 in s, 3 in s], [0, 3, 5, 7], layer_subsets([0, 3, 5, 7]), ["a", "b"], [], 8)
    command = result.suggest_layout()["command"].split()
    ca, sa = parse_layers(command[1]), parse_layers(command[3])
    layout = resolve_layout(8, ca, sa)
    assert layout["self_attention_layers"] == [3, 7] and layout["cross_attention_layers"] == [0]


@pytest.mark.slow
def test_analyze_the_shipped_toy(tmp_path, capsys):
    """Accuracy with every SA layer / with none matches greedy `generate` on the same pictures; the figure and the
    JSON are written."""
    from visor_hf.toy.inference import answer_examples, fresh_examples, load_toy

    code = main(["analyze", "toy", "--data", "toy:4", "--layers", "1,3,6,7;;6,7", "--seed", "2", "--out", str(tmp_path)])
    assert code == 0
    out = capsys.readouterr().out
    assert "suggested layout" in out and "visor-hf convert SRC DST --ca-layers" in out
    summary = json.loads((tmp_path / "analysis.json").read_text())
    assert (tmp_path / "layer_drop.png").stat().st_size > 0
    rows = {tuple(r["vision_layers"]): r for r in summary["accuracy"]}
    assert set(rows) == {(1, 3, 6, 7), (), (6, 7)}
    model, processor = load_toy()
    examples = fresh_examples(2, 4)
    for layers in [(1, 3, 6, 7), ()]:
        answers = answer_examples(model, processor, examples, visor_configuration=list(layers))
        for kind in summary["groups"]:
            part = [a.correct for a in answers if a.example.question.kind == kind]
            assert math.isclose(rows[layers][kind], sum(part) / len(part))


def test_analyze_rejects_layers_that_are_not_sa_layers(capsys):
    assert main(["analyze", "toy", "--layers", "2,6"]) == 2
    assert "--layers: [2] are not SA layers of the model (SA layers: [1, 3, 6, 7])" in capsys.readouterr().err


def test_analyze_rejects_a_missing_checkpoint(tmp_path, capsys):
    assert main(["analyze", str(tmp_path / "nothing")]) == 2
    assert "cannot load the VISOR checkpoint" in capsys.readouterr().err


def test_dense_layout_drops_vision_where_asked():
    """The analysis's premise on a dense-layout model (every layer SA, no CA): with every layer keeping vision it is
    LLaVA-OV; with none the answer logits do not depend on the picture; with one layer they do."""
    import torch
    from transformers import LlavaOnevisionForConditionalGeneration

    from visor_hf.testing import visor_from_llava
    from visor_hf.toy.data import Example, make_scene, sample_questions
    from visor_hf.toy.model import encode_batch, toy_llava_config

    torch.manual_seed(0)
    llava = LlavaOnevisionForConditionalGeneration(toy_llava_config(num_layers=2)).eval()
    dense = visor_from_llava(llava)
    assert dense.config.self_attention_layers == [0, 1] and dense.config.cross_attention_layers == []
    question = sample_questions(make_scene(1))[0]
    pictures = [Example(make_scene(seed), question) for seed in (1, 2)]
    batch = encode_batch(pictures)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")}
    with torch.no_grad():
        reference = llava(**inputs).logits[:, -1]
        logits = {layers: dense(**inputs, visor_configuration=list(layers)).logits[:, -1] for layers in [(0, 1), (), (1,)]}
    torch.testing.assert_close(logits[(0, 1)], reference, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits[()][0], logits[()][1], rtol=1e-5, atol=1e-6)  # two pictures, one answer
    assert not torch.allclose(logits[(1,)][0], logits[(1,)][1], atol=1e-4)


def test_analyze_records_grouped_by_a_field(tmp_path, capsys):
    """A record file (training format) grouped by `--group-key`: with every SA layer and with none, each group's
    accuracy is that of greedy `generate` with those layers (the toy answers one word, then ends its turn)."""
    from visor_hf.toy.inference import answer_examples, fresh_examples, load_toy

    examples = fresh_examples(4, 2)
    with open(tmp_path / "records.jsonl", "w") as f:
        for i, e in enumerate(examples):
            e.image.save(tmp_path / f"{i}.png")
            record = {"image": f"{i}.png", "kind": e.question.difficulty,
                      "conversations": [{"from": "human", "value": "<image>\n" + e.question.text},
                                        {"from": "gpt", "value": e.question.answer}]}
            f.write(json.dumps(record) + "\n")
    code = main(["analyze", "toy", "--data", str(tmp_path / "records.jsonl"), "--group-key", "kind",
                 "--layers", "1,3,6,7;", "--out", str(tmp_path / "out"), "--batch-size", "4"])
    assert code == 0, capsys.readouterr().err
    summary = json.loads((tmp_path / "out" / "analysis.json").read_text())
    assert summary["groups"] == ["easy", "hard"] and summary["samples"] == {"easy": 4, "hard": 6}
    rows = {tuple(r["vision_layers"]): r for r in summary["accuracy"]}
    model, processor = load_toy()
    for layers in [(1, 3, 6, 7), ()]:
        answers = answer_examples(model, processor, examples, visor_configuration=list(layers))
        for group in ("easy", "hard"):
            part = [a.correct for a in answers if a.example.question.difficulty == group]
            assert math.isclose(rows[layers][group], sum(part) / len(part)), (layers, group)

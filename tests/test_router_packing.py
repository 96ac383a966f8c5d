"""`examples/toy/router_packing.py`: a router that chooses the packing factor with the configuration, at a tiny size on
the shipped toy with an average-initialised packing module (the shipped toy has none)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from visor_hf.toy.data import eval_set
from visor_hf.toy.inference import DEFAULT_CHECKPOINT

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "toy"


@pytest.fixture(scope="module")
def rp():
    if not (EXAMPLES / "router_packing.py").is_file():
        pytest.skip("no examples/ in this tree")
    saved = list(sys.path)
    try:
        spec = importlib.util.spec_from_file_location("router_packing", EXAMPLES / "router_packing.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)  # puts examples/toy on sys.path for its own imports
    finally:
        sys.path[:] = saved
    return module


@pytest.fixture(scope="module")
def model():
    from visor_hf.modeling import VisorForConditionalGeneration

    model = VisorForConditionalGeneration.from_pretrained(DEFAULT_CHECKPOINT, packing_factors=[2, 4], attn_implementation="sdpa")
    model.model.token_packing.reset_to_average(guarded=False)
    return model.float().eval()


def hand_routing_pass_flops(config, n_text: int, n_visual: int) -> int:
    """Layer 0 of the toy (its router layer, a CA layer): the text stream's projections and causal attention, and the
    CA block (q/o over the text, every text x visual pair, the position convolution and k/v over the visual tokens),
    written out from the config's sizes."""
    text = config.text_config
    d, heads, kv_heads, ffn = text.hidden_size, text.num_attention_heads, text.num_key_value_heads, text.intermediate_size
    hd = d // heads
    assert config.router_layer == 0 and 0 in config.cross_attention_layers
    per_token = 2 * (d * heads * hd + 2 * d * kv_heads * hd + heads * hd * d + 3 * d * ffn)
    attention = 4 * heads * hd * n_text * (n_text + 1) // 2
    cross = 2 * n_text * 2 * d * heads * hd + 4 * heads * hd * n_text * n_visual
    cross += 2 * n_visual * config.position_embedding_kernel_size * d + 2 * n_visual * 2 * d * kv_heads * hd
    return n_text * per_token + attention + cross


def test_selection_rule_against_a_hand_computation(rp):
    costs = [5.0, 2.0, 2.0, 1.0]  # pair 0 is the maximal pair; pairs 1 and 2 cost the same
    probability = torch.tensor(
        [
            [0.99, 0.95, 0.97, 0.10],  # 1 and 2 above 0.9 at the same cost: the more probable one, 2
            [0.99, 0.95, 0.95, 0.90],  # 3 is exactly at the threshold: it counts, and it is the cheapest
            [0.50, 0.80, 0.80, 0.30],  # nothing above: the maximal pair
            [0.99, 0.92, 0.92, 0.10],  # a tie in cost and probability: the lower index
        ]
    )
    assert rp.select_pairs(probability, costs, 0.9, maximal=0) == [2, 3, 0, 1]
    assert rp.select_pairs(probability, costs, 0.96, maximal=0) == [2, 0, 0, 0]
    assert rp.select_pairs(probability, costs, 0.0, maximal=0) == [3, 3, 3, 3]


def test_group_targets_are_the_share_of_the_maximal_pairs_accuracy_per_kind(rp):
    from visor_hf.toy.data import Example, Question, make_scene

    scene = make_scene(0)
    kinds = ["cell", "cell", "cell", "red"]
    examples = [Example(scene, Question(k, "q", "a")) for k in kinds]
    pairs = [(1, 1), (0, 1), (0, 4)]  # (1, 1) is the maximal pair
    correct = {(1, 1): [True, True, False, False], (0, 1): [True, False, False, True], (0, 4): [True, True, True, False]}
    results = {
        p: {"correct": c, "loss": [0.0] * 4, "flops": [1] * 4, "configurations": [(1,) * (p[0] + 1)] * 4}
        for p, c in correct.items()
    }
    targets = rp.group_targets(results, pairs, examples, (1, 1))
    # cell: max answers 2 of 3; (0, 1) 1 of 3 -> 0.5; (0, 4) 3 of 3 -> capped at 1. red: max answers none -> 1
    assert targets[0] == targets[1] == targets[2] == [1.0, 0.5, 1.0]
    assert targets[3] == [1.0, 1.0, 1.0]


def test_router_inputs_are_the_routers_input_at_the_routing_factor(rp, model):
    from visor_hf.toy.model import encode_batch

    examples = eval_set(7, 1)
    features = {k: rp.routing_inputs(model, examples, k) for k in (1, 4)}
    assert features[1].shape == (len(examples), model.config.text_config.hidden_size)
    assert not torch.allclose(features[1], features[4])  # layer 0 is a CA layer: it reads the packed picture
    batch = encode_batch(examples, model.config.routing_token_id, packing=4)
    with torch.no_grad():
        out = model(
            **{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")},
            visor_packing=4,
            visor_configuration="max",
            output_router_logits=True,
            logits_to_keep=1,
        )
        torch.testing.assert_close(model.model.router(features[4]), out.router_logits, rtol=1e-5, atol=1e-5)


def test_study_counts_the_routing_pass_and_its_lookup_matches_real_runs(rp, model):
    from visor_hf.toy.evaluation import evaluate_visor
    from visor_hf.toy.model import IMAGE_ID, PAD_ID, encode_batch

    label, test = eval_set(30, 2), eval_set(2, 2)
    results = rp.study(model, label, test, routing_factors=(4,), thresholds=(0.5, 0.99), router_steps=3, verify=4)
    config = model.config
    pairs = [(c, k) for k in (1, 2, 4) for c in range(len(config.configurations))]
    assert [(p["configuration"], p["packing"]) for p in results["pairs"]] == pairs
    assert results["maximal_pair"] == [3, 1]
    batch = encode_batch(test, config.routing_token_id)
    n_text = [int(((row != PAD_ID) & (row != IMAGE_ID)).sum()) for row in batch["input_ids"]]
    routing = [hand_routing_pass_flops(config, n, 24) for n in n_text]  # 24 visual tokens at 4x
    assert rp.routing_pass_flops(config, n_text[0], 24) == routing[0]
    for t in (0.5, 0.99):
        row = results["rows"][f"pair router (routing at 4x), t={t:g}"]
        # each chosen pair run alone for real: its correctness and its prefill FLOPs plus the routing pass
        real = [evaluate_visor(model, [e], pairs[p][0], packing=pairs[p][1]) for e, p in zip(test, row["choice"])]
        assert row["accuracy"]["all"] == pytest.approx(sum(r["correct"][0] for r in real) / len(test))
        assert row["routing_pass_flops"] == pytest.approx(sum(routing) / len(test))
        assert row["flops"] == pytest.approx(sum(r["flops"][0] + f for r, f in zip(real, routing)) / len(test))
        assert row["flops_ratio"] == pytest.approx(row["flops"] / (sum(r["dense_flops"][0] for r in real) / len(test)))
        check = results["verification"]["routing at 4x"]["thresholds"][str(t)]
        assert check == {"same_pair": 4, "same_correctness": 4}
    for k in (1, 2, 4):  # the checkpoint's own router: the lookup of its choices equals its run
        row = results["rows"][f"{k}x checkpoint router, t={config.router_threshold:g}"]
        assert row["lookup_agrees_with_run"] == len(test) and row["routing_pass_flops"] == 0
        assert row["packing_share"][str(k)] == 1.0
    assert rp.table(results).count("\n") == 2 + len(results["rows"])

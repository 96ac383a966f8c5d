"""Unit tests of the training pieces: collator masking, universal sampler, pseudo-label rule, search helpers."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from visor_hf.testing import ROUTE_ID, tiny_visor
from visor_hf.training import (
    IGNORE_INDEX,
    UniversalConfigurationSampler,
    VisorDataCollator,
    assign_labels,
    exhaustive_candidates,
    fixed_and_free_layers,
    is_viable,
    load_records,
    make_synthetic_dataset,
    parse_configuration,
    record_messages,
    set_configurations,
)
from visor_hf.training.search import sampled_candidates

# -- universal sampler ---------------------------------------------------------------------------------------------


def _rank_sequence(seed: int, rank: int, steps: int, num_configurations: int) -> list[int]:
    """What one process draws: its own sampler, and per-rank global random state that must not matter."""
    random.seed(1000 + rank)
    np.random.seed(1000 + rank)
    torch.manual_seed(1000 + rank)
    sampler = UniversalConfigurationSampler(num_configurations, seed=seed)
    return [sampler(step) for step in range(steps)]


@pytest.mark.parametrize("strategy", ["cycle", "uniform"])
def test_universal_sampler_is_identical_across_ranks_and_covers_every_configuration(strategy):
    n = 5
    ranks = []
    for rank in range(2):
        random.seed(rank)
        np.random.seed(rank)
        torch.manual_seed(rank)
        sampler = UniversalConfigurationSampler(n, seed=7, strategy=strategy)
        ranks.append(sampler.sequence(0, 200))
    assert ranks[0] == ranks[1]
    assert set(ranks[0]) == set(range(n))
    assert _rank_sequence(7, 0, 50, n) == _rank_sequence(7, 1, 50, n)
    # a different seed gives a different schedule; the same (seed, step) always the same configuration
    assert UniversalConfigurationSampler(n, seed=8, strategy=strategy).sequence(0, 200) != ranks[0]
    assert UniversalConfigurationSampler(n, seed=7, strategy=strategy)(123) == ranks[0][123]


def test_cycle_strategy_visits_every_configuration_once_per_block():
    n = 4
    sequence = UniversalConfigurationSampler(n, seed=3).sequence(0, 10 * n)
    for block in range(10):
        assert sorted(sequence[block * n : (block + 1) * n]) == list(range(n))
    assert len({tuple(sequence[b * n : (b + 1) * n]) for b in range(10)}) > 1  # shuffled, not a fixed order


def test_sampler_validates_its_arguments():
    with pytest.raises(ValueError):
        UniversalConfigurationSampler(0)
    with pytest.raises(ValueError):
        UniversalConfigurationSampler(3, strategy="roulette")
    with pytest.raises(ValueError):
        UniversalConfigurationSampler(3, strategy="cycle", weights=[1, 1, 1])
    weighted = UniversalConfigurationSampler(3, strategy="uniform", weights=[0, 0, 1])
    assert set(weighted.sequence(0, 50)) == {2}


# -- pseudo-label rule ---------------------------------------------------------------------------------------------


def _table(rows, layers=(0, 1, 1, 2), flops=(10, 20, 20, 30)):
    """rows: {sample: [(correct or score, loss) for configurations 0..3]}; configurations [], [a], [b], [a, b] (3 = max)."""
    table = []
    for index, results in rows.items():
        for c, (correct, loss) in enumerate(results):
            table.append({"index": index, "configuration": c, "num_layers": layers[c], "correct": correct, "loss": loss, "flops": flops[c]})
    return table


def _reference_labels(table, keep):
    """The issue's rule written out independently: per sample, among the configurations whose accuracy is at least
    `keep` x the maximal configuration's (the one with the most layers), the cheapest (FLOPs), then fewer layers,
    then lower loss."""
    samples = sorted({r["index"] for r in table})
    labels = {}
    for s in samples:
        rows = [r for r in table if r["index"] == s]
        top = max(rows, key=lambda r: (r["num_layers"], r["configuration"]))
        ok = [r for r in rows if float(r["correct"]) >= keep * float(top["correct"]) - 1e-12]
        labels[s] = min(ok, key=lambda r: (r["flops"], r["num_layers"], r["loss"], r["configuration"]))["configuration"]
    return labels


def test_pseudo_label_rule_on_a_hand_made_table():
    table = _table({
        0: [(True, 0.5), (True, 0.4), (True, 0.3), (True, 0.2)],  # cheapest configuration already right -> 0
        1: [(False, 2.0), (True, 0.9), (True, 0.7), (True, 0.1)],  # tie at one layer (same FLOPs): lower loss -> 2
        2: [(False, 2.0), (False, 1.5), (False, 1.4), (True, 0.3)],  # only the max is right -> 3
        3: [(False, 2.0), (False, 2.0), (False, 2.0), (False, 2.0)],  # nobody right: every one keeps 0 -> cheapest, 0
        4: [(False, 2.0), (True, 0.6), (False, 1.0), (False, 1.2)],  # max wrong: every one keeps its 0 -> cheapest, 0
        5: [(False, 3.0), (False, 1.0), (False, 1.0), (False, 1.0)],  # nobody right -> cheapest by cost, not loss -> 0
        6: [(False, 2.0), (True, 0.5), (True, 0.5), (True, 0.1)],  # full tie at one layer (FLOPs, loss) -> lower index, 1
    })
    for keep in (0.99, 1.0):
        labels, report = assign_labels(table, keep=keep)
        assert labels == {0: 0, 1: 2, 2: 3, 3: 0, 4: 0, 5: 0, 6: 1}
        assert labels == _reference_labels(table, keep)
        assert report["max_configuration"] == 3
        assert report["max_accuracy"] == pytest.approx(4 / 7)
        assert report["label_accuracy"] == pytest.approx(4 / 7) and report["moved_to_cheapest"] == []
        assert report["average_flops_labels"] == pytest.approx((10 + 20 + 30 + 10 + 10 + 10 + 20) / 7)
        assert report["average_flops_max"] == 30
        assert report["label_histogram"] == {"0": 4, "1": 1, "2": 1, "3": 1}
    # keep 0: every configuration keeps 0 % of anything -> the cheapest everywhere
    labels, _ = assign_labels(table, keep=0.0)
    assert set(labels.values()) == {0}


def test_keep_targets_and_group_labels_on_a_hand_made_table():
    from visor_hf.training import keep_targets

    table = _table({
        0: [(True, 0.5), (True, 0.4), (True, 0.3), (True, 0.2)],
        1: [(False, 2.0), (True, 0.9), (False, 0.7), (True, 0.1)],
        2: [(False, 2.0), (False, 1.5), (False, 1.4), (True, 0.3)],
        3: [(True, 2.0), (False, 2.0), (False, 2.0), (False, 2.0)],  # max wrong: every configuration keeps it
        4: [(True, 0.2), (True, 0.6), (True, 1.0), (True, 1.2)],
        5: [(True, 0.3), (True, 1.0), (True, 1.0), (True, 1.0)],
    })
    # per configuration: does it keep the maximal configuration's accuracy on the sample?
    assert keep_targets(table) == {0: [1, 1, 1, 1], 1: [0, 1, 0, 1], 2: [0, 0, 0, 1], 3: [1, 1, 1, 1], 4: [1, 1, 1, 1], 5: [1, 1, 1, 1]}
    # group-level labels: group "x" = samples 0-2 (max right on all 3; [] on 1, [a] on 2 of 3, [b] on 1, [a, b] on 3)
    # -> only the max keeps 99 % of the group's accuracy; group "y" = samples 3-5 (max right on 2 of 3, [] on 3) -> []
    groups = {0: "x", 1: "x", 2: "x", 3: "y", 4: "y", 5: "y"}
    labels, report = assign_labels(table, groups=groups)
    assert labels == {0: 3, 1: 3, 2: 3, 3: 0, 4: 0, 5: 0} and report["rule"] == "per-group"
    # the per-sample rule on the same table differs (sample 0 -> [], sample 1 -> [a])
    assert assign_labels(table)[0] == {0: 0, 1: 1, 2: 3, 3: 0, 4: 0, 5: 0}
    # keeping 60 % of the group's accuracy: [a] (2/3 >= 0.6) is the cheapest for "x" once [] (1/3) is not
    assert assign_labels(table, keep=0.6, groups=groups)[0] == {0: 1, 1: 1, 2: 1, 3: 0, 4: 0, 5: 0}
    with pytest.raises(ValueError, match="no group"):
        assign_labels(table, groups={0: "x"})
    # soft group targets: the share of the maximal configuration's accuracy kept on the group, at most 1
    soft = keep_targets(table, groups=groups)
    assert soft[0] == soft[1] == soft[2] == pytest.approx([1 / 3, 2 / 3, 1 / 3, 1.0])
    assert soft[3] == soft[4] == soft[5] == pytest.approx([1.0, 1.0, 1.0, 1.0])  # [] answers 3, the max 2: capped at 1
    with pytest.raises(ValueError, match="no group"):
        keep_targets(table, groups={0: "x"})


def test_pseudo_label_ties_fewer_layers_then_loss_when_the_flops_are_equal():
    # a text-only sample costs the same under every configuration: fewer layers first, then lower loss
    # (max right, 0 wrong; 1 and 2 tie on one layer, 2 has the lower loss; the max has more layers)
    table = _table({0: [(False, 0.1), (True, 0.9), (True, 0.2), (True, 0.05)]}, flops=(40, 40, 40, 40))
    labels, _ = assign_labels(table)
    assert labels == {0: 2} == _reference_labels(table, 0.99)
    # and when the cheapest configuration is right, it wins over lower losses with more layers
    table0 = _table({0: [(True, 0.9), (True, 0.2), (True, 0.1), (True, 0.05)]}, flops=(40, 40, 40, 40))
    assert assign_labels(table0)[0] == {0: 0}
    # without a FLOPs column the SA-layer count is the cost
    for row in table:
        del row["flops"]
    labels, report = assign_labels(table)
    assert labels == {0: 2} and report["average_flops_labels"] is None


def test_pseudo_label_threshold_boundary_with_graded_scores():
    # per-sample scores in [0, 1] (`score`, e.g. a graded VQA metric): a configuration keeps the sample when its score
    # is >= 0.99 x the maximal configuration's
    def table(cheap, mid, top=1.0):
        rows = []
        for c, (score, layers, flops) in enumerate([(cheap, 0, 10), (mid, 1, 20), (top, 2, 30)]):
            rows.append({"index": 0, "configuration": c, "layers": list(range(layers)), "correct": False, "score": score, "loss": 1.0, "flops": flops})
        return rows

    assert assign_labels(table(0.99, 1.0))[0] == {0: 0}  # exactly 99 %: kept
    assert assign_labels(table(0.9899, 0.99))[0] == {0: 1}  # just below for the cheapest, exactly 99 % for the next
    assert assign_labels(table(0.9899, 0.9899))[0] == {0: 2}
    assert assign_labels(table(0.495, 0.2, top=0.5))[0] == {0: 0}  # relative to the max's own score
    assert assign_labels(table(0.4949, 0.2, top=0.5))[0] == {0: 2}
    assert assign_labels(table(0.9899, 0.9899), keep=0.98)[0] == {0: 0}


def test_pseudo_label_rule_matches_an_independent_reference_on_random_tables():
    rng = random.Random(0)
    for _ in range(50):
        rows = {s: [(rng.random() < 0.5, round(rng.random(), 1)) for _ in range(4)] for s in range(12)}
        table = _table(rows)
        for keep in (0.99, 1.0, 0.5):
            labels, report = assign_labels(table, keep=keep)
            assert labels == _reference_labels(table, keep)
            # the labelled set keeps >= 99 % (with exact match: all) of the maximal configuration's accuracy
            assert report["label_accuracy"] >= keep * report["max_accuracy"] - 1e-12


def test_pseudo_label_spend_slack_is_a_set_level_option():
    table = _table({
        0: [(True, 0.5), (True, 0.4), (True, 0.3), (True, 0.2)],
        1: [(False, 2.0), (True, 0.9), (True, 0.7), (True, 0.1)],
        2: [(False, 2.0), (False, 1.5), (False, 1.4), (True, 0.3)],
        3: [(False, 2.0), (False, 2.0), (False, 2.0), (False, 2.0)],
    })
    # 3 correct answers under the max; 0.5 of them needs 2 -> one sample moves: the largest saving (sample 2: 30 -> 10)
    labels, report = assign_labels(table, keep=0.5, spend_slack=True)
    assert labels == {0: 0, 1: 2, 2: 0, 3: 0} and report["moved_to_cheapest"] == [2]
    assert report["label_accuracy"] == pytest.approx(2 / 4) and report["label_accuracy"] >= 0.5 * report["max_accuracy"]
    assert report["per_sample_label_accuracy"] == pytest.approx(3 / 4)
    # keep 0.99: 0.99 x 3 = 2.97 needs all three -> nothing moves
    labels, report = assign_labels(table, keep=0.99, spend_slack=True)
    assert labels == assign_labels(table, keep=0.99)[0] and report["moved_to_cheapest"] == []
    # 100 samples, max right on all, configuration 1 right on 99 of them: moving sample 0 keeps exactly 99 %
    rows = {i: [(False, 1.0), (i != 0, 0.5), (False, 1.0), (True, 0.1)] for i in range(100)}
    labels, report = assign_labels(_table(rows), keep=0.99, spend_slack=True)
    assert labels[0] == 0 and report["label_accuracy"] == pytest.approx(0.99)
    labels, report = assign_labels(_table(rows), keep=0.995, spend_slack=True)
    assert labels[0] == 3 and report["label_accuracy"] == pytest.approx(1.0)
    assert all(labels[i] == 1 for i in range(1, 100))


def test_pseudo_label_rule_rejects_incomplete_tables():
    table = _table({0: [(True, 0.1)] * 4})
    with pytest.raises(ValueError, match="lacks a row"):
        assign_labels(table + [{"index": 1, "configuration": 0, "num_layers": 0, "correct": True, "loss": 0.1, "flops": 10}])
    with pytest.raises(ValueError, match="two rows"):
        assign_labels(table + [dict(table[0])])
    with pytest.raises(ValueError):
        assign_labels(table, keep=1.5)
    with pytest.raises(ValueError, match="max_configuration"):
        assign_labels(table, max_configuration=7)


# -- search helpers ------------------------------------------------------------------------------------------------


def test_search_candidates_keep_the_layers_before_the_router():
    model = tiny_visor()  # SA 0, 2, 3, 5; router layer 1
    fixed, free = fixed_and_free_layers(model.config)
    assert fixed == [0] and free == [2, 3, 5]
    candidates = exhaustive_candidates(fixed, free)
    assert len(candidates) == 8 and candidates[0] == [0, 2, 3, 5] and candidates[-1] == [0]
    assert all(c[0] == 0 for c in candidates)
    sampled = sampled_candidates(fixed, free, num_samples=3, seed=0)
    assert [0, 2, 3, 5] in sampled and [0] in sampled and len(sampled) == 5
    reference = {"accuracy": 0.8, "loss": 1.0}
    assert is_viable({"accuracy": 0.793, "loss": 9.0}, reference) and not is_viable({"accuracy": 0.79, "loss": 0}, reference)
    assert is_viable({"accuracy": 0, "loss": 1.04}, reference, "loss", 0.05)


def _fake_scores(accuracy_of, samples=10):
    """A stand-in for `score_dataset`: `accuracy_of(layers)` of `samples` samples answered, FLOPs = 10 + SA layers."""
    calls = []

    def fake(model, dataset, collator, layers, batch_size, accelerator, progress=True):
        calls.append(tuple(layers))
        right = round(accuracy_of(tuple(layers)) * samples)
        return [{"index": i, "correct": i < right, "loss": 1.0 + 0.1 * (i >= right) - 0.01 * len(layers), "answer_tokens": 1,
                 "flops": 10 + len(layers), "flops_max": 14, "flops_dense": 20, "layers": list(layers)} for i in range(samples)]

    return fake, calls


def test_greedy_search_is_backward_elimination_and_reports_every_candidate(monkeypatch):
    import importlib

    search_module = importlib.import_module("visor_hf.training.search")  # the package's `search` is the function
    model = tiny_visor()  # SA 0, 2, 3, 5; router layer 1 -> 0 fixed, 2, 3, 5 free
    # layer 2 is useless, 3 matters most, 5 a little
    fake, calls = _fake_scores(lambda layers: 0.5 + 0.4 * (3 in layers) + 0.1 * (5 in layers))
    monkeypatch.setattr(search_module, "score_dataset", fake)
    result = search_module.search_configurations(model, None, None, strategy="auto", max_exhaustive=2, threshold=0.05, accelerator=object())
    assert result["strategy"] == "greedy" and result["fixed_layers"] == [0] and result["free_layers"] == [2, 3, 5]
    # max; drop one of 2, 3, 5 (best: drop 2); drop one of 3, 5 from [0, 3, 5] (best: drop 5); then [0]
    assert sorted(set(calls)) == sorted([(0, 2, 3, 5), (0, 3, 5), (0, 2, 5), (0, 2, 3), (0, 5), (0, 3), (0,)])
    assert len(calls) == 7  # each candidate once: F (F + 1) / 2 + 1 evaluations
    by_layers = {tuple(c["layers"]): c for c in result["candidates"]}
    assert by_layers[(0, 3)]["accuracy"] == pytest.approx(0.9) and by_layers[(0,)]["accuracy"] == pytest.approx(0.5)
    assert by_layers[(0, 3)]["average_flops"] == 12 and by_layers[(0, 3)]["flops_ratio_to_max"] == pytest.approx(12 / 14)
    # viable: accuracy >= 0.95 x 1.0
    assert result["viable"] == [[0, 3, 5], [0, 2, 3, 5]]
    assert [c["layers"] for c in result["candidates"] if c["viable"]] == result["viable"]
    # exhaustive on the same scores: all 8 subsets of the free layers, same viable set
    fake, calls = _fake_scores(lambda layers: 0.5 + 0.4 * (3 in layers) + 0.1 * (5 in layers))
    monkeypatch.setattr(search_module, "score_dataset", fake)
    result = search_module.search_configurations(model, None, None, threshold=0.05, accelerator=object())
    assert result["strategy"] == "exhaustive" and len(set(calls)) == len(calls) == 8
    assert result["viable"] == [[0, 3, 5], [0, 2, 3, 5]]
    # with the loss as the metric: loss within 1 % of the max's
    result = search_module.search_configurations(model, None, None, metric="loss", threshold=0.0, accelerator=object())
    assert result["viable"] == [[0, 2, 3, 5]]
    with pytest.raises(ValueError, match="strategy"):
        search_module.search_configurations(model, None, None, strategy="beam", accelerator=object())


def test_pooled_and_per_group_rules_keep_different_subsets(monkeypatch):
    """Two groups of 10 samples: group "a" needs SA layer 3 (without it half of them fail), group "b" is answered by
    every configuration. Pooled over the 20 samples, CA-only ([0]) keeps 75 %: not viable, so the pooled rule keeps
    only subsets with layer 3. Per group, [0] keeps all of group "b": viable, and the cheapest for "b"."""
    import importlib

    search_module = importlib.import_module("visor_hf.training.search")
    model = tiny_visor()  # SA 0, 2, 3, 5; router layer 1 -> 0 fixed, 2, 3, 5 free
    groups = ["a"] * 10 + ["b"] * 10

    def fake(model, dataset, collator, layers, batch_size, accelerator, progress=True):
        return [{"index": i, "correct": i >= 10 or 3 in layers or i < 5, "loss": 1.0, "answer_tokens": 1,
                 "flops": 10 + len(layers), "flops_max": 14, "flops_dense": 20, "layers": list(layers)} for i in range(20)]

    monkeypatch.setattr(search_module, "score_dataset", fake)
    with_three = [[0, 3], [0, 2, 3], [0, 3, 5], [0, 2, 3, 5]]
    pooled = search_module.search_configurations(model, None, None, rule="pooled", groups=groups, accelerator=object())
    assert pooled["viable"] == pooled["kept"] == with_three
    grouped = search_module.search_configurations(model, None, None, groups=groups, accelerator=object())
    assert grouped["rule"] == "group"
    assert len(grouped["viable"]) == 8  # every subset keeps group "b"
    assert grouped["cheapest_per_group"] == {"a": [0, 3], "b": [0]}
    assert grouped["kept"] == [[0], [0, 3], [0, 2, 3, 5]]  # thinned by cost: each group's cheapest, and the maximal
    by_layers = {tuple(c["layers"]): c for c in grouped["candidates"]}
    assert by_layers[(0,)]["groups"]["a"]["accuracy"] == 0.5 and by_layers[(0,)]["groups"]["b"]["accuracy"] == 1.0
    assert by_layers[(0,)]["viable_groups"] == ["b"] and by_layers[(0, 3)]["viable_groups"] == ["a", "b"]
    assert by_layers[(0,)]["accuracy"] == 0.75
    with pytest.raises(ValueError, match="rule"):
        search_module.search_configurations(model, None, None, rule="median", accelerator=object())


def test_record_groups_reads_a_field_of_the_records():
    from visor_hf.training.search import record_groups

    records = [{"source": "vqa"}, {"source": "ocr"}, {"conversations": []}]
    assert record_groups(records, "source") == ["vqa", "ocr", "(none)"]
    datasets = pytest.importorskip("datasets")
    assert record_groups(datasets.Dataset.from_list([{"source": "a", "x": 1}, {"source": "b", "x": 2}]), "source") == ["a", "b"]
    assert record_groups(datasets.Dataset.from_list([{"x": 1}]), "source") == ["(none)"]


def test_thin_configurations_keeps_the_maximal_and_the_best_per_layer_count():
    from visor_hf.training.search import thin_configurations

    def candidate(layers, accuracy, loss=1.0, viable=True):
        return {"layers": layers, "num_layers": len(layers), "accuracy": accuracy, "loss": loss, "viable": viable}

    candidates = [candidate([0], 0.7, viable=False), candidate([0, 2], 0.95), candidate([0, 3], 0.97), candidate([0, 5], 0.97, 0.9),
                  candidate([0, 2, 3], 0.99), candidate([0, 2, 3, 5], 1.0)]
    assert thin_configurations(candidates, 3) == [[0, 5], [0, 2, 3], [0, 2, 3, 5]]
    assert thin_configurations(candidates, 2) == [[0, 5], [0, 2, 3, 5]]
    assert thin_configurations(candidates, 1) == [[0, 2, 3, 5]]


def test_set_configurations_resizes_the_router_and_keeps_surviving_rows():
    model = tiny_visor()  # configurations [[0], [0, 3], [0, 2, 3, 5]]
    old = model.model.router.fc2.weight.detach().clone()
    set_configurations(model, [[0], [0, 2], [0, 2, 3, 5], [0, 5]])
    assert model.config.configurations == [[0], [0, 2], [0, 2, 3, 5], [0, 5]]
    assert model.model.router.fc2.out_features == 4
    torch.testing.assert_close(model.model.router.fc2.weight[0], old[0])
    torch.testing.assert_close(model.model.router.fc2.weight[2], old[2])
    assert model.model.router.fc2.weight[1].abs().sum() == 0
    with pytest.raises(ValueError):
        set_configurations(model, [[1]])  # not an SA layer


def test_set_configurations_recomputes_the_router_layer():
    model = tiny_visor()  # SA 0, 2, 3, 5; router after layer 1
    set_configurations(model, [[0, 2], [0, 2, 3, 5]])
    assert model.config.router_layer == 1  # kept unless asked
    set_configurations(model, [[0, 2], [0, 2, 3, 5]], recompute_router_layer=True)
    assert model.config.router_layer == 2  # layer 3 is the first one a configuration switches off
    set_configurations(model, [[2], [0, 2, 3, 5]], recompute_router_layer=True)
    assert model.config.router_layer is None and model.model.router is None  # layer 0 is switched off: no router


def test_parse_configuration():
    assert parse_configuration("auto") == "auto" and parse_configuration("max") == "max"
    assert parse_configuration("2") == 2
    assert parse_configuration("0,3") == [0, 3] and parse_configuration("[0, 3]") == [0, 3] and parse_configuration("[]") == []


# -- data ----------------------------------------------------------------------------------------------------------


def test_record_messages_places_images_first_in_their_turn():
    record = {"image": "a.png", "conversations": [{"from": "human", "value": "what is this ?\n<image>"}, {"from": "gpt", "value": "red"}]}
    messages = record_messages(record)
    assert messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "what is this ?"}]
    assert messages[1] == {"role": "assistant", "content": [{"type": "text", "text": "red"}]}
    no_marker = {"images": ["a.png", "b.png"], "conversations": [{"from": "human", "value": "q ?"}, {"from": "gpt", "value": "a"}]}
    assert [c["type"] for c in record_messages(no_marker)[0]["content"]] == ["image", "image", "text"]
    with pytest.raises(ValueError):
        record_messages({"image": "a.png", "conversations": [{"from": "human", "value": "<image><image> q"}]})


def test_collator_masks_everything_but_the_answers(tmp_path):
    from visor_hf.modeling.processing_visor import VisorProcessor
    from visor_hf.testing import llava_processor, tiny_tokenizer

    tokenizer = tiny_tokenizer(with_routing_token=True)
    base = llava_processor(tokenizer)
    processor = VisorProcessor(image_processor=base.image_processor, tokenizer=tokenizer, chat_template=base.chat_template,
                               num_image_tokens=base.num_image_tokens, vision_feature_select_strategy="full")
    records = load_records(make_synthetic_dataset(tmp_path, 4))
    batch = VisorDataCollator(processor)([records[i] for i in range(4)])
    assert set(batch) >= {"input_ids", "attention_mask", "labels", "pixel_values", "image_sizes", "sample_index"}
    assert batch["sample_index"].tolist() == [0, 1, 2, 3]
    vocab = tokenizer.convert_ids_to_tokens
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    for row in range(4):
        ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        kept = [vocab(i) for i, label in zip(ids, labels) if label != IGNORE_INDEX]
        answers = [t["value"] for t in records[row]["conversations"] if t["from"] == "gpt"]
        expected = [w for a in answers for w in (a, "<|im_end|>")]
        assert kept == expected
        assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels))
        # one routing token after each question, never in the labels
        questions = sum(t["from"] == "human" for t in records[row]["conversations"])
        assert ids.count(ROUTE_ID) == questions
        assert all(label != ROUTE_ID for label in labels)
        assert im_end in ids


def test_datasets_dataset_with_an_image_column(tmp_path):
    datasets = pytest.importorskip("datasets")
    from visor_hf.modeling.processing_visor import VisorProcessor
    from visor_hf.testing import llava_processor, tiny_tokenizer

    tokenizer = tiny_tokenizer(with_routing_token=True)
    base = llava_processor(tokenizer)
    processor = VisorProcessor(image_processor=base.image_processor, tokenizer=tokenizer, chat_template=base.chat_template,
                               num_image_tokens=base.num_image_tokens, vision_feature_select_strategy="full")
    records = [r for r in load_records(make_synthetic_dataset(tmp_path, 4)).records if "image" in r][:2]
    table = datasets.Dataset.from_dict({
        "image": [str(tmp_path / r["image"]) for r in records],
        "conversations": [r["conversations"] for r in records],
    }).cast_column("image", datasets.Image())
    table.save_to_disk(str(tmp_path / "saved"))
    for source in (table, tmp_path / "saved"):
        dataset = load_records(source)
        batch = VisorDataCollator(processor)([dataset[0], dataset[1]])
        assert batch["pixel_values"].shape[0] == 2
        assert (batch["labels"] != IGNORE_INDEX).sum() == 4  # two one-word answers and their end-of-turn tokens

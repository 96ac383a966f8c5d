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


def _table(rows):
    """rows: {sample: [(correct, loss) for configurations 0..3]}; configurations [], [a], [b], [a, b] (3 = max)."""
    layers = [0, 1, 1, 2]
    flops = [10, 20, 20, 30]
    table = []
    for index, results in rows.items():
        for c, (correct, loss) in enumerate(results):
            table.append({"index": index, "configuration": c, "num_layers": layers[c], "correct": correct, "loss": loss, "flops": flops[c]})
    return table


def test_pseudo_label_rule_on_a_hand_made_table():
    table = _table({
        0: [(True, 0.5), (True, 0.4), (True, 0.3), (True, 0.2)],  # cheapest config already right -> 0
        1: [(False, 2.0), (True, 0.9), (True, 0.7), (True, 0.1)],  # tie at 1 layer: lower loss -> 2
        2: [(False, 2.0), (False, 1.5), (False, 1.4), (True, 0.3)],  # only max right -> 3
        3: [(False, 2.0), (False, 2.0), (False, 2.0), (False, 2.0)],  # nobody right: cheapest (0)
        4: [(False, 2.0), (True, 0.6), (False, 1.0), (False, 1.2)],  # max wrong, a 1-layer config right -> 1
        5: [(False, 3.0), (False, 1.0), (False, 1.0), (False, 1.0)],  # nobody right -> cheapest by cost, not loss -> 0
    })
    labels, report = assign_labels(table, keep=1.0, spend_slack=False)  # step 1 only: per-sample labels
    assert labels == {0: 0, 1: 2, 2: 3, 3: 0, 4: 1, 5: 0}
    assert report["max_configuration"] == 3
    assert report["max_accuracy"] == pytest.approx(3 / 6)
    assert report["label_accuracy"] == pytest.approx(4 / 6)  # sample 4: a cheaper configuration beats the max
    assert report["moved_to_cheapest"] == []
    # keep 1.0 (or 0.99) of 3 correct answers needs 3; the labels hold 4: one sample may move to its cheapest
    # configuration, the one that saves the most FLOPs (sample 2: 30 -> 10)
    for keep in (1.0, 0.99):
        labels, report = assign_labels(table, keep=keep)
        assert labels == {0: 0, 1: 2, 2: 0, 3: 0, 4: 1, 5: 0}
        assert report["moved_to_cheapest"] == [2]
        assert report["label_accuracy"] == pytest.approx(3 / 6) and report["label_accuracy"] >= keep * report["max_accuracy"]
        assert report["per_sample_label_accuracy"] == pytest.approx(4 / 6)
    # 0.5 of 3 needs 2 -> two moves; the saving tie (20 -> 10 for samples 1 and 4) goes to the higher loss (0.7 > 0.6)
    labels, report = assign_labels(table, keep=0.5)
    assert report["moved_to_cheapest"] == [1, 2]
    assert labels[1] == 0 and labels[4] == 1
    labels, report = assign_labels(table, keep=0.0)
    assert set(labels.values()) == {0} and report["label_accuracy"] == pytest.approx(1 / 6)


def test_pseudo_label_threshold_boundary_with_many_samples():
    # 100 samples, max right on all, configuration 1 right on 99 of them (sample 0 needs the max)
    rows = {i: [(False, 1.0), (i != 0, 0.5), (False, 1.0), (True, 0.1)] for i in range(100)}
    labels, report = assign_labels(_table(rows), keep=0.99)
    # required = 99 correct of 100: moving sample 0 to config 0 keeps exactly 99 % -> allowed
    assert labels[0] == 0 and report["label_accuracy"] == pytest.approx(0.99)
    labels, report = assign_labels(_table(rows), keep=0.995)
    assert labels[0] == 3 and report["label_accuracy"] == pytest.approx(1.0)
    assert all(labels[i] == 1 for i in range(1, 100))


def test_pseudo_label_rule_rejects_incomplete_tables():
    table = _table({0: [(True, 0.1)] * 4})
    with pytest.raises(ValueError, match="lacks a row"):
        assign_labels(table + [{"index": 1, "configuration": 0, "num_layers": 0, "correct": True, "loss": 0.1, "flops": 10}])
    with pytest.raises(ValueError):
        assign_labels(table, keep=1.5)


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

"""Training data against independent references: the collator's batch is what LLaVA-OneVision's own processor makes
of the same conversation (plus the routing token after each question), for multi-image, single-image and text-only
samples in one batch; bad data files give clear errors."""

from __future__ import annotations

import json
import re

import pytest
import torch
from PIL import Image

from visor_hf.testing import IMAGE_ID, ROUTE_ID, llava_processor, random_image, tiny_tokenizer
from visor_hf.training import IGNORE_INDEX, VisorDataCollator, load_records


def _processors(padding_side: str):
    from visor_hf.modeling.processing_visor import VisorProcessor

    tokenizer = tiny_tokenizer(with_routing_token=True)
    tokenizer.padding_side = padding_side
    reference = llava_processor(tokenizer)  # stock LlavaOnevisionProcessor
    visor = VisorProcessor(image_processor=reference.image_processor, tokenizer=tokenizer, chat_template=reference.chat_template,
                           num_image_tokens=reference.num_image_tokens, vision_feature_select_strategy="full")
    return visor, reference


RECORDS = [
    {"images": ["a.png", "b.png"], "conversations": [
        {"from": "human", "value": "<image>\n<image>\nwhat is the colour of the background ?"}, {"from": "gpt", "value": "red"}]},
    {"conversations": [{"from": "human", "value": "how many are there ?"}, {"from": "gpt", "value": "two"}]},
    {"image": "c.png", "conversations": [
        {"from": "human", "value": "<image>\nis the background red ?"}, {"from": "gpt", "value": "no"},
        {"from": "human", "value": "what is the colour ?"}, {"from": "gpt", "value": "blue"}]},
]


def _reference_text(record: dict) -> str:
    """The conversation written out by hand in the tiny chat template's format, images first in their turn, and the
    routing token at the end of every user turn."""
    parts = []
    for turn in record["conversations"]:
        if turn["from"] == "human":
            markers = turn["value"].count("<image>")
            text = turn["value"].replace("<image>", "").strip()
            parts.append("<|im_start|>user\n" + "<image>" * markers + text + "<route><|im_end|>\n")
        else:
            parts.append("<|im_start|>assistant\n" + turn["value"] + "<|im_end|>\n")
    return "".join(parts)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_collator_batch_is_llava_onevision_processor_output(tmp_path, padding_side):
    for k, name in enumerate(["a.png", "b.png", "c.png"]):
        random_image(16 + 16 * k, 16, seed=k).save(tmp_path / name)
    visor, reference = _processors(padding_side)
    dataset = load_records(RECORDS, image_root=tmp_path)
    batch = VisorDataCollator(visor)([dataset[i] for i in range(3)])

    rendered = [VisorDataCollator(visor).render(dataset[i]) for i in range(3)]
    texts = [_reference_text(r) for r in RECORDS]
    assert [re.sub(r"\s", "", t) for t in rendered] == [re.sub(r"\s", "", t) for t in texts]
    images = [[Image.open(tmp_path / n).convert("RGB") for n in names] for names in (["a.png", "b.png"], [], ["c.png"])]
    expected = reference(text=rendered, images=images, return_tensors="pt", padding=True)
    for key in ("input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images"):
        torch.testing.assert_close(batch[key], expected[key], msg=key)
    # LLaVA-OV's multi-image rule: the two-image sample has no anyres crops, the single image has
    assert batch["batch_num_images"].tolist() == [2, 1]
    num_tokens = (batch["input_ids"] == IMAGE_ID).sum(1).tolist()
    assert num_tokens[0] == 2 * (reference.num_image_tokens + 1) and num_tokens[1] == 0 and num_tokens[2] > reference.num_image_tokens + 1

    tokenizer = visor.tokenizer
    for row, record in enumerate(RECORDS):
        ids, labels = batch["input_ids"][row].tolist(), batch["labels"][row].tolist()
        supervised = [tokenizer.convert_ids_to_tokens(i) for i, label in zip(ids, labels) if label != IGNORE_INDEX]
        answers = [t["value"] for t in record["conversations"] if t["from"] == "gpt"]
        assert supervised == [w for a in answers for w in (a, "<|im_end|>")]
        assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels))
        # the routing token right after each question (before the user turn's end), never supervised
        positions = [i for i, t in enumerate(ids) if t == ROUTE_ID]
        assert len(positions) == sum(t["from"] == "human" for t in record["conversations"])
        assert all(ids[p + 1] == tokenizer.convert_tokens_to_ids("<|im_end|>") and labels[p] == IGNORE_INDEX for p in positions)
        assert all(label == IGNORE_INDEX for label, valid in zip(labels, batch["attention_mask"][row].tolist()) if not valid)


def test_collated_samples_score_as_they_do_alone(tmp_path):
    """Each sample of a mixed batch (two images, text only, one image) gets the loss it gets alone."""
    from visor_hf.testing import tiny_visor
    from visor_hf.training.data import model_inputs

    for k, name in enumerate(["a.png", "b.png", "c.png"]):
        random_image(16, 16 + 16 * k, seed=k).save(tmp_path / name)
    visor, _ = _processors("left")
    model = tiny_visor(routing_token_id=ROUTE_ID).eval()
    dataset = load_records(RECORDS, image_root=tmp_path)
    collator = VisorDataCollator(visor)
    batch = collator([dataset[i] for i in range(3)])
    with torch.no_grad():
        logits = model(**model_inputs(batch, keep_labels=False), visor_configuration="max").logits
        for row in range(3):
            alone = collator([dataset[row]])
            single = model(**model_inputs(alone), visor_configuration="max")
            labels = batch["labels"][row, 1:]
            keep = labels != IGNORE_INDEX
            loss = torch.nn.functional.cross_entropy(logits[row, :-1][keep], labels[keep])
            torch.testing.assert_close(loss, single.loss, rtol=1e-4, atol=1e-5)


def test_bad_data_files_give_clear_errors(tmp_path):
    (tmp_path / "dict.json").write_text(json.dumps({"image": "a.png", "conversations": []}))
    with pytest.raises(ValueError, match="list of records"):
        load_records(tmp_path / "dict.json")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(ValueError, match="unsupported data file"):
        load_records(tmp_path / "data.csv")
    with pytest.raises(FileNotFoundError):
        load_records(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"conversations": []}\n[1, 2]\n')
    with pytest.raises(ValueError, match="line 2"):
        load_records(tmp_path / "bad.jsonl")


def test_a_saved_dataset_dict_gives_its_train_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    conversations = [[{"from": "human", "value": f"q {i} ?"}, {"from": "gpt", "value": "yes"}] for i in range(5)]
    splits = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"conversations": conversations[:3]}),
        "test": datasets.Dataset.from_dict({"conversations": conversations[3:]}),
    })
    splits.save_to_disk(str(tmp_path / "splits"))
    for source in (splits, tmp_path / "splits"):
        dataset = load_records(source)
        assert len(dataset) == 3 and dataset[2]["conversations"] == conversations[2] and dataset[2]["__index__"] == 2
    del splits["train"]
    splits["validation"] = splits["test"]
    with pytest.raises(ValueError, match="several splits"):
        load_records(splits)

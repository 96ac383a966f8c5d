"""VisorProcessor: LLaVA-OV inputs plus the routing token after each user question."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from transformers import AutoProcessor

import visor_hf  # noqa: F401  (registers AutoProcessor)
from visor_hf import VisorProcessor
from visor_hf.conversion import convert
from visor_hf.testing import (
    CHAT_TEMPLATE,
    IM_END_ID,
    IMAGE_ID,
    LLAVA_PROCESSOR_FIELDS,
    count_image_tokens,
    llava_processor,
    random_image,
    save_tiny_llava,
    tiny_image_processor,
    tiny_llava,
    tiny_tokenizer,
    word_ids,
)

ROUTE = "<route>"


@pytest.fixture(scope="module")
def processor():
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [ROUTE]}, replace_extra_special_tokens=False)
    fields = {k: v for k, v in LLAVA_PROCESSOR_FIELDS.items() if k != "processor_class"}
    return VisorProcessor(image_processor=tiny_image_processor(), tokenizer=tokenizer, chat_template=CHAT_TEMPLATE, **fields)


@pytest.fixture(scope="module")
def reference(processor):
    return llava_processor(processor.tokenizer)


def ids_of(processor, text):
    return processor(text=text).input_ids[0]


def test_single_turn_plain_prompt(processor):
    ids = processor(text="<image>\nwhat is the colour ?", images=[random_image(16, 16)]).input_ids[0]
    route = processor.routing_token_id
    assert ids.count(route) == 1
    assert ids[-2:] == [word_ids("?")[0], route]  # right after the question


def test_single_turn_chat_prompt(processor):
    text = "<|im_start|>user <image>\nwhat is the colour ?<|im_end|>\n<|im_start|>assistant\n"
    assert processor.insert_routing_tokens(text) == (
        "<|im_start|>user <image>\nwhat is the colour ?<route><|im_end|>\n<|im_start|>assistant\n"
    )
    ids = processor(text=text, images=[random_image(16, 16)]).input_ids[0]
    route = ids.index(processor.routing_token_id)
    assert ids[route - 1] == word_ids("?")[0] and ids[route + 1] == IM_END_ID
    # idempotent: a prompt that already carries the token is left alone
    assert processor.insert_routing_tokens(processor.insert_routing_tokens(text)) == processor.insert_routing_tokens(text)


def test_multi_turn_prompt_gets_one_token_per_user_turn(processor):
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is the colour ?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": [{"type": "text", "text": "how many ?"}]},
    ]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert prompt.count(ROUTE) == 2
    turns = prompt.split("<|im_end|>")
    assert turns[0].endswith("colour ?" + ROUTE) and turns[1].endswith("red") and turns[2].endswith("how many ?" + ROUTE)
    # tokenize=True gives the same ids as rendering then calling (no doubled routing token)
    rendered = processor(text=prompt, images=[random_image(16, 16)], return_tensors="pt")
    direct = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
        processor_kwargs={"images": [random_image(16, 16)]},
    )
    assert torch.equal(direct["input_ids"], rendered["input_ids"])
    assert int((rendered["input_ids"] == processor.routing_token_id).sum()) == 2
    # an open user turn (no end marker yet) gets the token at its end
    assert processor.insert_routing_tokens("<|im_start|>user\nhow many ? ") == "<|im_start|>user\nhow many ?<route> "


def test_batch_of_prompts(processor):
    out = processor(text=["what is the colour ?", "<|im_start|>user\nhow many ?<|im_end|>"], padding=True, return_tensors="pt")
    assert (out["input_ids"] == processor.routing_token_id).sum(1).tolist() == [1, 1]


@pytest.mark.parametrize("sizes", [[(16, 16)], [(16, 32)], [(32, 16)], [(16, 32), (32, 32)]])
def test_image_token_expansion_matches_llava_onevision(processor, reference, sizes):
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    text = "<|im_start|>user " + "<image>" * len(images) + "\nwhat is the colour ?<|im_end|>\n<|im_start|>assistant\n"
    ours = processor(text=text, images=images, return_tensors="pt")
    theirs = reference(text=text, images=images, return_tensors="pt")
    assert set(ours.keys()) == set(theirs.keys())
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"]) and torch.equal(ours["image_sizes"], theirs["image_sizes"])
    ids = ours["input_ids"][0]
    without_route = ids[ids != processor.routing_token_id]
    assert torch.equal(without_route, theirs["input_ids"][0])
    # and the count matches what the model's own feature extractor produces (single image: anyres)
    if len(images) == 1:
        counts = count_image_tokens(tiny_llava(), ours["pixel_values"], ours["image_sizes"])
        assert int((ids == IMAGE_ID).sum()) == counts[0]
    # without the routing token the inputs are exactly LLaVA-OV's
    plain = processor(text=text, images=images, return_tensors="pt", add_routing_token=False)
    assert torch.equal(plain["input_ids"], theirs["input_ids"])


def test_chat_template_without_routing_token(processor, reference):
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is the colour ?"}]}]
    plain = processor.apply_chat_template(conversation, add_generation_prompt=True, add_routing_token=False)
    assert plain == reference.apply_chat_template(conversation, add_generation_prompt=True)


def test_tokenizer_without_routing_token_is_refused():
    fields = {k: v for k, v in LLAVA_PROCESSOR_FIELDS.items() if k != "processor_class"}
    with pytest.raises(ValueError, match="does not know the routing token"):
        VisorProcessor(image_processor=tiny_image_processor(), tokenizer=tiny_tokenizer(), **fields)


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is not None, reason="torchvision installed: videos work")
def test_video_without_torchvision_raises_a_clear_error(processor):
    video = [torch.zeros(2, 3, 16, 16)]
    with pytest.raises(ValueError, match="torchvision"):
        processor(text="<video>\nwhat happens ?", videos=video)


def test_converted_folder_loads_with_auto_processor(tmp_path):
    save_tiny_llava(tmp_path / "src")
    dst = convert(tmp_path / "src", tmp_path / "dst", dense=True)
    processor = AutoProcessor.from_pretrained(dst)
    assert isinstance(processor, VisorProcessor)
    import json

    config = json.loads((dst / "config.json").read_text())
    assert processor.routing_token_id == config["routing_token_id"]
    assert processor.num_image_tokens == LLAVA_PROCESSOR_FIELDS["num_image_tokens"]
    assert processor.chat_template == CHAT_TEMPLATE
    saved = tmp_path / "again"
    processor.save_pretrained(saved)
    again = AutoProcessor.from_pretrained(saved)
    assert again.routing_token == ROUTE and again.routing_token_id == processor.routing_token_id


def _reference_inputs(reference, text, images):
    return reference(text=text, images=images, return_tensors="pt")


@pytest.mark.parametrize("layout", ["nested", "none"])
def test_source_processor_saved_by_transformers_or_missing(tmp_path, reference, layout):
    """transformers 5 saves a processor as one `processor_config.json` holding the image processor (no
    `preprocessor_config.json`); a source may also hold a tokenizer and no processor at all. Either way the
    converted folder's processor expands images exactly like LLaVA-OV's and places the routing token."""
    import json

    src = tmp_path / "src"
    save_tiny_llava(src)
    (src / "preprocessor_config.json").unlink()
    if layout == "nested":
        fields = dict(LLAVA_PROCESSOR_FIELDS, image_processor=tiny_image_processor().to_dict())
        (src / "processor_config.json").write_text(json.dumps(fields))
    else:
        (src / "processor_config.json").unlink()  # the image processor comes from the model config
    dst = convert(src, tmp_path / "dst")
    processor = AutoProcessor.from_pretrained(dst)
    assert isinstance(processor, VisorProcessor) and processor.chat_template == CHAT_TEMPLATE
    images = [random_image(16, 32, seed=3)]
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is the colour ?"}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert prompt.count(ROUTE) == 1 and prompt.index(ROUTE) == prompt.index("?") + 1
    ours = processor(text=prompt, images=images, return_tensors="pt")
    theirs = _reference_inputs(reference, prompt.replace(ROUTE, ""), images)
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"]) and torch.equal(ours["image_sizes"], theirs["image_sizes"])
    ids = ours["input_ids"][0]
    assert torch.equal(ids[ids != processor.routing_token_id], theirs["input_ids"][0])


def test_system_turn_and_batched_chat_template_with_images(processor, reference):
    """A system turn gets no routing token; a batch of conversations rendered and tokenized by apply_chat_template
    (images in the content, left padding) gives, per sample, LLaVA-OV's ids plus one routing token after the
    question."""
    conversations = [
        [
            {"role": "system", "content": [{"type": "text", "text": "describe this"}]},
            {"role": "user", "content": [{"type": "image", "image": random_image(16, 32)}, {"type": "text", "text": "what is the colour ?"}]},
        ],
        [{"role": "user", "content": [{"type": "image", "image": random_image(16, 16, seed=1)}, {"type": "text", "text": "how many ?"}]}],
    ]
    rendered = processor.apply_chat_template(conversations[0], add_generation_prompt=True)
    assert rendered.count(ROUTE) == 1 and "describe this<|im_end|>" in rendered and "colour ?<route><|im_end|>" in rendered
    kwargs = {"add_generation_prompt": True, "tokenize": True, "return_dict": True, "return_tensors": "pt", "padding": True}
    ours = processor.apply_chat_template(conversations, **kwargs)
    theirs = reference.apply_chat_template(conversations, **kwargs)
    assert torch.equal(ours["pixel_values"], theirs["pixel_values"])
    assert (ours["input_ids"] == processor.routing_token_id).sum(1).tolist() == [1, 1]
    assert ours["attention_mask"][:, -1].all()  # left padding: the prompts end together
    for row in range(2):
        ids = ours["input_ids"][row][ours["attention_mask"][row].bool()]
        expected = theirs["input_ids"][row][theirs["attention_mask"][row].bool()]
        assert torch.equal(ids[ids != processor.routing_token_id], expected)
        route = int((ids == processor.routing_token_id).nonzero())
        assert ids[route - 1] == word_ids("?")[0] and ids[route + 1] == IM_END_ID


def test_folder_written_without_torchvision_loads_where_torchvision_is_installed(tmp_path, monkeypatch):
    """With torchvision installed the processor also has a video processor, but a folder converted without
    torchvision holds no video processor config: transformers' loader raises there; VisorProcessor falls back to
    LLaVA-OV's default video processor (or none when it cannot be built) and the folder still loads."""
    from transformers import LlavaOnevisionProcessor

    from visor_hf.modeling import processing_visor

    save_tiny_llava(tmp_path / "src")
    dst = convert(tmp_path / "src", tmp_path / "dst")
    monkeypatch.setattr(processing_visor, "_has_torchvision", lambda: True)  # as where torchvision is installed
    assert "video_processor" in VisorProcessor.get_attributes()
    with pytest.raises(OSError, match="video processor"):  # the stock loader
        LlavaOnevisionProcessor._get_arguments_from_pretrained.__func__(VisorProcessor, str(dst))
    processor = AutoProcessor.from_pretrained(dst)
    assert isinstance(processor, VisorProcessor)
    if importlib.util.find_spec("torchvision") is None:
        assert processor.video_processor is None
    else:
        assert type(processor.video_processor).__name__ == "LlavaOnevisionVideoProcessor"
    ids = processor(text="<image>\nwhat is the colour ?", images=[random_image(16, 16)]).input_ids[0]
    assert ids[-2:] == [word_ids("?")[0], processor.routing_token_id] and ids.count(IMAGE_ID) > 0


@pytest.mark.parametrize("strategy,aspect", [("default", "anyres_max_9"), ("full", "anyres_max_1")])
def test_expansion_matches_llava_onevision_for_other_settings(strategy, aspect):
    """`vision_feature_select_strategy="default"` (one token fewer per tile) and another `vision_aspect_ratio`: the
    same expansion as LlavaOnevisionProcessor with the same settings."""
    tokenizer = tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [ROUTE]}, replace_extra_special_tokens=False)
    fields = {k: v for k, v in LLAVA_PROCESSOR_FIELDS.items() if k != "processor_class"}
    fields.update(vision_feature_select_strategy=strategy, vision_aspect_ratio=aspect)
    ours = VisorProcessor(image_processor=tiny_image_processor(), tokenizer=tokenizer, chat_template=CHAT_TEMPLATE, **fields)
    theirs = llava_processor(tokenizer)
    theirs.vision_feature_select_strategy, theirs.vision_aspect_ratio = strategy, aspect
    images = [random_image(16, 32), random_image(32, 32, seed=1)]
    text = ["<image>\nwhat is the colour ?", "<image>\nhow many ?"]
    a = ours(text=text, images=images, return_tensors="pt", padding=True, add_routing_token=False)
    b = theirs(text=text, images=images, return_tensors="pt", padding=True)
    assert torch.equal(a["input_ids"], b["input_ids"])
    default_full = llava_processor(tokenizer)(text=text, images=images, return_tensors="pt", padding=True)
    if (strategy, aspect) != ("full", "anyres_max_9"):
        assert not torch.equal(default_full["input_ids"], b["input_ids"])  # the settings do change the expansion

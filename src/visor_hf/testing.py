"""Tiny random LLaVA-OneVision and VISOR models for tests, examples and downstream code (no download).

Everything here is built in memory: a SigLIP tower of a few thousand parameters, a Qwen2 LLM with a handful of
layers, the PIL image processor and a word-level tokenizer whose vocabulary is given in full.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from .modeling import VisorConfig, VisorForConditionalGeneration

IMAGE_SIZE = 16
PATCH_SIZE = 4
GRID_PINPOINTS = [[16, 16], [16, 32], [32, 16], [32, 32]]

# Word-level vocabulary of the tiny tokenizer; ids follow the list order.
SPECIAL_TOKENS = ["<pad>", "<|im_start|>", "<|im_end|>", "<image>", "<video>", "<route>"]
WORDS = (
    "user assistant system what is the colour of background shape in row column how many are there any red green "
    "blue yellow white black circle square triangle empty yes no zero one two three four five six seven eight nine "
    "a an picture image describe this ? . , : \n"
).split(" ")
VOCAB = SPECIAL_TOKENS + [w for w in WORDS if w]
PAD_ID, IM_START_ID, IM_END_ID, IMAGE_ID, VIDEO_ID, ROUTE_ID = range(6)


def tiny_llava_config(num_layers: int = 6, vocab_size: int | None = None, **text_overrides) -> LlavaOnevisionConfig:
    """A LLaVA-OneVision config with a 16-px SigLIP tower (patch 4) and a small Qwen2 (hidden 32)."""
    text_config = {
        "model_type": "qwen2",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": vocab_size or len(VOCAB) + 8,  # spare rows, as real checkpoints have
        "max_position_embeddings": 2048,
        "tie_word_embeddings": False,
        "pad_token_id": PAD_ID,
    }
    text_config.update(text_overrides)
    vision = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2}
    return siglip_llava_config(text_config, vision, IMAGE_SIZE, PATCH_SIZE, GRID_PINPOINTS)


def siglip_llava_config(text_config: dict, vision: dict, image_size: int, patch_size: int, grid_pinpoints: list,
                        **overrides) -> LlavaOnevisionConfig:
    """A LLaVA-OneVision config with a Qwen2 LLM (`text_config`) and a SigLIP tower of the given sizes, without the
    tower's pooling head, reading its last layer's full features (the shapes of the tiny test and toy models)."""
    vision_config = {
        "model_type": "siglip_vision_model", **vision, "image_size": image_size, "patch_size": patch_size,
        "vision_use_head": False,
    }
    settings = {
        "image_token_index": IMAGE_ID, "video_token_index": VIDEO_ID, "image_grid_pinpoints": grid_pinpoints,
        "vision_feature_layer": -1, "vision_feature_select_strategy": "full", **overrides,
    }
    return LlavaOnevisionConfig(text_config=text_config, vision_config=vision_config, **settings)


def tiny_llava(seed: int = 0, attn_implementation: str = "eager", **config_kwargs) -> LlavaOnevisionForConditionalGeneration:
    """A random tiny `LlavaOnevisionForConditionalGeneration` in float32 and eval mode."""
    torch.manual_seed(seed)
    config = tiny_llava_config(**config_kwargs)
    model = LlavaOnevisionForConditionalGeneration._from_config(config, attn_implementation=attn_implementation)
    return model.eval()


def visor_config_from_llava(llava_config: LlavaOnevisionConfig, **layout) -> VisorConfig:
    """A `VisorConfig` holding the LLaVA-OV config's fields plus the given layout (default: dense)."""
    fields = llava_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map"):
        fields.pop(key, None)
    fields.update(layout)
    return VisorConfig(**fields)


def visor_from_llava(llava: LlavaOnevisionForConditionalGeneration, attn_implementation: str | None = None, **layout) -> VisorForConditionalGeneration:
    """Copy a LLaVA-OV model's weights into a VISOR model with the given layout (default: dense).

    New modules start from the library's documented warm start (see `visor_hf.conversion`): each cross-attention
    block from its host layer's attention and input norm, the conv position embedding at zero (identity).
    """
    from .conversion import warm_start_new_modules

    config = visor_config_from_llava(llava.config, **layout)
    implementation = attn_implementation or llava.config.text_config._attn_implementation
    visor = VisorForConditionalGeneration._from_config(config, attn_implementation=implementation)
    missing, unexpected = visor.load_state_dict(llava.state_dict(), strict=False)
    if unexpected:
        raise ValueError(f"LLaVA-OV weights with no place in VISOR: {unexpected}")
    not_new = [k for k in missing if not k.startswith(("model.cross_attention_blocks.", "model.router.", "model.token_packing."))]
    if not_new:
        raise ValueError(f"VISOR weights that the LLaVA-OV model does not provide: {not_new}")
    warm_start_new_modules(visor)
    return visor.to(llava.dtype).eval()


# The sparse layout of the tiny 6-layer models: CA 1, 4; SA 0, 2, 3, 5; three nested configurations; router after
# layer 1 (before SA layer 2, the first one a configuration switches off).
TINY_LAYOUT = {
    "cross_attention_layers": [1, 4],
    "self_attention_layers": [0, 2, 3, 5],
    "configurations": [[0], [0, 3], [0, 2, 3, 5]],
    "router_layer": 1,
    "routing_token_id": ROUTE_ID,
}


def tiny_visor(seed: int = 0, attn_implementation: str = "eager", num_layers: int = 6, **layout) -> VisorForConditionalGeneration:
    """A tiny VISOR model converted from a random tiny LLaVA-OV (default layout: CA 1, 4; SA 0, 2, 3, 5)."""
    return visor_from_llava(tiny_llava(seed, attn_implementation, num_layers=num_layers), **{**TINY_LAYOUT, **layout})


def tiny_image_processor() -> LlavaOnevisionImageProcessorPil:
    return LlavaOnevisionImageProcessorPil(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        image_grid_pinpoints=GRID_PINPOINTS,
        do_convert_rgb=True,
    )


def random_image(height: int, width: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def count_image_tokens(model, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> list[int]:
    """Number of placeholder tokens each image expands to, measured on the model's own feature extractor."""
    with torch.no_grad():
        features = model.model.get_image_features(pixel_values, image_sizes, return_dict=True).pooler_output
    return [f.shape[0] for f in features]


def expand_image_markers(text: list, counts: list[int], index: int = 0) -> list[int]:
    """Token ids of a sample's text, each `"<image>"` marker expanded to its image's `counts[k]` image tokens."""
    ids, next_image = [], 0
    for item in text:
        if item == "<image>":
            ids += [IMAGE_ID] * counts[next_image]
            next_image += 1
        else:
            ids.append(item)
    if next_image != len(counts):
        raise ValueError(f"sample {index} has {len(counts)} images but {next_image} <image> markers")
    return ids


def pad_rows(rows: list[list[int]], padding_side: str = "left") -> dict:
    """`input_ids` and `attention_mask` of rows of ids, padded with `PAD_ID` on `padding_side`."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        span = slice(width - len(ids), width) if padding_side == "left" else slice(0, len(ids))
        input_ids[i, span] = torch.tensor(ids, dtype=torch.long)
        attention_mask[i, span] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask}


def build_batch(model, samples: list[dict], padding_side: str = "left", seed: int = 0, packing: int | list[int] = 1) -> dict:
    """Model inputs for a batch of samples, each `{"text": [ids or "<image>"...], "images": [(h, w), ...]}`.

    `"<image>"` items in the text are expanded to the right number of image tokens; images are random pictures of
    the given sizes, seeded by `sample["seed"]` (default: its index in the batch). Shorter samples are padded on `padding_side`.
    `packing` (one factor, or one per sample): the image tokens of a packed image (run with the same `visor_packing=`).
    """
    from .modeling.packing_visor import image_token_layouts

    factors = list(packing) if isinstance(packing, (list, tuple)) else [packing] * len(samples)
    processor = tiny_image_processor()
    rows, pixel_list, size_list = [], [], []
    for index, sample in enumerate(samples):
        image_seed = seed * 1000 + sample.get("seed", index) * 10
        images = [random_image(h, w, seed=image_seed + k) for k, (h, w) in enumerate(sample.get("images", []))]
        counts = []
        if images:
            processed = processor(images, return_tensors="pt")
            counts = count_image_tokens(model, processed["pixel_values"], processed["image_sizes"])
            if factors[index] != 1:
                counts = [layout.num_tokens(factors[index]) for layout in image_token_layouts(model.config, processed["image_sizes"])]
            pixel_list.extend(processed["pixel_values"])
            size_list.extend(processed["image_sizes"])
        rows.append(expand_image_markers(sample["text"], counts, index))
    batch = pad_rows(rows, padding_side)
    if pixel_list:
        patches = max(p.shape[0] for p in pixel_list)
        pixel_values = torch.zeros((len(pixel_list), patches, *pixel_list[0].shape[1:]))
        for i, p in enumerate(pixel_list):
            pixel_values[i, : p.shape[0]] = p
        batch["pixel_values"] = pixel_values
        batch["image_sizes"] = torch.stack([torch.as_tensor(s) for s in size_list])
    return batch


def word_ids(text: str) -> list[int]:
    """Ids of space-separated words of the tiny vocabulary."""
    return [VOCAB.index(w) for w in text.split()]


__all__ = [
    "TINY_LAYOUT",
    "PAD_ID",
    "IMAGE_ID",
    "VIDEO_ID",
    "ROUTE_ID",
    "count_image_tokens",
    "tiny_llava_config",
    "tiny_llava",
    "tiny_visor",
    "visor_config_from_llava",
    "visor_from_llava",
    "tiny_image_processor",
    "random_image",
    "build_batch",
    "word_ids",
    "VOCAB",
]


# -- tiny tokenizer, processor and on-disk LLaVA-OV checkpoints (conversion tests) ---------------------------------

# LLaVA-OneVision's chat template (Qwen2 turns; images first, then the text of each message).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + ' '}}"
    "{% if message['content'] is string %}{{ '\\n' + message['content'] }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ '\\n' + content['text'] }}{% endfor %}"
    "{% endif %}{{'<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# Stands in for the routing token in a source (LLaVA-OV) tokenizer, which must not know the routing token.
RESERVED_TOKEN = "<|reserved_5|>"


def word_level_tokenizer(vocab: list[str], special_tokens: list[str], model_max_length: int = 2048):
    """A word-level `PreTrainedTokenizerFast` over `vocab` (ids = positions), built in memory with LLaVA-OV's chat
    template. Words are split on white space and punctuation; decoding joins them with spaces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<|im_end|>",
        unk_token="<pad>",
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
        chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length,
        padding_side="left",
    )
    tokenizer.add_special_tokens({"additional_special_tokens": list(special_tokens)}, replace_extra_special_tokens=False)
    return tokenizer


def tiny_tokenizer(with_routing_token: bool = False):
    """A word-level `PreTrainedTokenizerFast` over `VOCAB`, built in memory (ids = positions in `VOCAB`).

    Without the routing token (the default, as a LLaVA-OV source tokenizer) id 5 holds `RESERVED_TOKEN`; the
    converter then adds `<route>` on a spare row.
    """
    vocab = list(VOCAB)
    if not with_routing_token:
        vocab[ROUTE_ID] = RESERVED_TOKEN
    return word_level_tokenizer(vocab, vocab[: len(SPECIAL_TOKENS)])


LLAVA_PROCESSOR_FIELDS = {
    "processor_class": "LlavaOnevisionProcessor",
    "num_image_tokens": (IMAGE_SIZE // PATCH_SIZE) ** 2,
    "vision_feature_select_strategy": "full",
    "vision_aspect_ratio": "anyres_max_9",
    "image_token": "<image>",
    "video_token": "<video>",
}


def write_llava_folder(path, model, tokenizer, image_processor, processor_fields: dict, max_shard_size=None) -> None:
    """Write a complete LLaVA-OV checkpoint folder (llava-hf layout): safetensors weights, config, tokenizer, image
    processor, `processor_config.json` (`processor_fields`) and `chat_template.jinja`."""
    import json
    import os

    os.makedirs(path, exist_ok=True)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(path, **kwargs)
    tokenizer.save_pretrained(path)
    image_processor.save_pretrained(path)
    with open(os.path.join(path, "processor_config.json"), "w") as f:
        json.dump(processor_fields, f, indent=2)
    with open(os.path.join(path, "chat_template.jinja"), "w") as f:
        f.write(CHAT_TEMPLATE)


def save_tiny_llava(path, seed: int = 0, num_layers: int = 6, max_shard_size: str | int = "20KB", **config_kwargs):
    """Write a complete tiny LLaVA-OV checkpoint folder (llava-hf layout) and return the model.

    The folder holds sharded safetensors weights, `config.json`, the tokenizer (without the routing token), the PIL
    image processor (`preprocessor_config.json`), `processor_config.json` of a `LlavaOnevisionProcessor` and
    `chat_template.jinja`. No video processor (it needs torchvision).
    """

    model = tiny_llava(seed, num_layers=num_layers, **config_kwargs)
    write_llava_folder(path, model, tiny_tokenizer(), tiny_image_processor(), LLAVA_PROCESSOR_FIELDS, max_shard_size)
    return model


def llava_processor(tokenizer=None):
    """A stock `LlavaOnevisionProcessor` over the tiny tokenizer and PIL image processor, without a video processor
    (it needs torchvision): the reference for image-token expansion."""
    from transformers import LlavaOnevisionProcessor

    class _LlavaOnevisionProcessorNoVideo(LlavaOnevisionProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument is None and argument_name == "video_processor":
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    fields = {k: v for k, v in LLAVA_PROCESSOR_FIELDS.items() if k != "processor_class"}
    return _LlavaOnevisionProcessorNoVideo(
        image_processor=tiny_image_processor(),
        tokenizer=tokenizer or tiny_tokenizer(),
        video_processor=None,
        chat_template=CHAT_TEMPLATE,
        **fields,
    )


__all__ += ["word_level_tokenizer", "write_llava_folder", "tiny_tokenizer", "save_tiny_llava", "llava_processor", "CHAT_TEMPLATE", "RESERVED_TOKEN"]


# -- the Qwen2-VL family: tiny random Qwen2-VL / Qwen2.5-VL models, their VISOR conversions and processors ---------

QWEN_PATCH_SIZE = 4  # 2x2 merge: one LLM token per 8x8 pixels
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")


def tiny_qwen_vl_config(family: str = "qwen2_vl", num_layers: int = 6, vocab_size: int | None = None):
    """A Qwen2-VL (`family="qwen2_vl"`) or Qwen2.5-VL (`"qwen2_5_vl"`) config: a 2-block ViT with 4-px patches and
    2x2 merge, and a small M-RoPE LLM (hidden 32, head dim 8, `mrope_section` [2, 1, 1])."""
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    if family not in QWEN_FAMILIES:
        raise ValueError(f"unknown family {family!r}; supported: {', '.join(QWEN_FAMILIES)}")
    text_config = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": vocab_size or len(VOCAB) + 8,
        "max_position_embeddings": 2048,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
        "pad_token_id": PAD_ID,
        "bos_token_id": None,
        "eos_token_id": IM_END_ID,
    }
    common = {"depth": 2, "num_heads": 2, "patch_size": QWEN_PATCH_SIZE, "spatial_merge_size": 2, "temporal_patch_size": 2}
    if family == "qwen2_vl":
        vision_config = {**common, "embed_dim": 16, "hidden_size": 32, "mlp_ratio": 2}
        config_class = Qwen2VLConfig
    else:
        vision_config = {
            **common, "hidden_size": 16, "intermediate_size": 32, "out_hidden_size": 32,
            "window_size": 16, "fullatt_block_indexes": [1],
        }
        config_class = Qwen2_5_VLConfig
    return config_class(
        text_config=text_config, vision_config=vision_config, image_token_id=IMAGE_ID, video_token_id=VIDEO_ID,
        vision_start_token_id=IM_START_ID, vision_end_token_id=IM_END_ID, tie_word_embeddings=False,
    )


def tiny_qwen_vl(family: str = "qwen2_vl", seed: int = 0, attn_implementation: str = "eager", num_layers: int = 6):
    """A random tiny `Qwen2VLForConditionalGeneration` / `Qwen2_5_VLForConditionalGeneration` (float32, eval)."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(seed)
    config = tiny_qwen_vl_config(family, num_layers)
    return AutoModelForImageTextToText.from_config(config, attn_implementation=attn_implementation).eval()


def visor_from_qwen_vl(source, attn_implementation: str | None = None, **layout):
    """Copy a Qwen2-VL / Qwen2.5-VL model's weights into its VISOR model with the given layout (default: dense), new
    modules warm-started as `visor_from_llava` does."""
    from .conversion import warm_start_new_modules
    from .modeling.modeling_qwen2_vl_visor import VisorQwen2_5_VLForConditionalGeneration, VisorQwen2VLForConditionalGeneration

    visor_class = {"qwen2_vl": VisorQwen2VLForConditionalGeneration, "qwen2_5_vl": VisorQwen2_5_VLForConditionalGeneration}[
        source.config.model_type
    ]
    fields = source.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map"):
        fields.pop(key, None)
    config = visor_class.config_class(**{**fields, **layout})
    implementation = attn_implementation or source.config.text_config._attn_implementation
    visor = visor_class._from_config(config, attn_implementation=implementation)
    missing, unexpected = visor.load_state_dict(source.state_dict(), strict=False)
    not_new = [k for k in missing if not k.startswith(("model.cross_attention_blocks.", "model.router.", "model.token_packing."))]
    if unexpected or not_new:
        raise ValueError(f"weights that do not match: unexpected {unexpected}, missing {not_new}")
    warm_start_new_modules(visor)
    return visor.to(source.dtype).eval()


def tiny_qwen_vl_visor(family: str = "qwen2_vl", seed: int = 0, attn_implementation: str = "eager", **layout):
    """A tiny VISOR model converted from a random tiny Qwen2-VL / Qwen2.5-VL (default layout: `TINY_LAYOUT`)."""
    return visor_from_qwen_vl(tiny_qwen_vl(family, seed, attn_implementation), **{**TINY_LAYOUT, **layout})


def tiny_qwen_vl_image_processor():
    """The family's PIL image processor (no torchvision) for the tiny tower: sides rounded to 8 px, 8x8 to 32x32."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(
        patch_size=QWEN_PATCH_SIZE, merge_size=2, temporal_patch_size=2,
        size={"shortest_edge": 8 * 8, "longest_edge": 32 * 32},
    )


def build_qwen_vl_batch(samples: list[dict], padding_side: str = "left", seed: int = 0) -> dict:
    """`build_batch` for the Qwen2-VL family: `input_ids`, `attention_mask`, `mm_token_type_ids`, `pixel_values`
    (the flattened patches of every image) and `image_grid_thw`, as the family's processor returns them."""
    processor = tiny_qwen_vl_image_processor()
    rows, pixels, grids = [], [], []
    for index, sample in enumerate(samples):
        image_seed = seed * 1000 + sample.get("seed", index) * 10
        images = [random_image(h, w, seed=image_seed + k) for k, (h, w) in enumerate(sample.get("images", []))]
        counts = []
        for image in images:
            processed = processor(image, return_tensors="pt")
            pixels.append(processed["pixel_values"])
            grids.append(processed["image_grid_thw"])
            counts.append(int(processed["image_grid_thw"].prod()) // 4)
        rows.append(expand_image_markers(sample["text"], counts, index))
    batch = pad_rows(rows, padding_side)
    batch["mm_token_type_ids"] = (batch["input_ids"] == IMAGE_ID).int()
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
        batch["image_grid_thw"] = torch.cat(grids)
    return batch


__all__ += [
    "QWEN_FAMILIES", "tiny_qwen_vl_config", "tiny_qwen_vl", "visor_from_qwen_vl", "tiny_qwen_vl_visor",
    "tiny_qwen_vl_image_processor", "build_qwen_vl_batch",
]


# The Qwen2-VL family's chat template (Qwen2 turns; each image as <|vision_start|><image><|vision_end|>, the
# tiny vocabulary standing in for the vision markers with <|im_start|> / <|im_end|>-free words).
QWEN_VL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<image>' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>' }}{% elif content['type'] == 'text' %}{{ content['text'] }}"
    "{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def save_tiny_qwen_vl(path, family: str = "qwen2_vl", seed: int = 0, num_layers: int = 6, max_shard_size: str | int = "20KB"):
    """Write a complete tiny Qwen2-VL / Qwen2.5-VL checkpoint folder (transformers layout) and return the model:
    sharded safetensors, config, the tokenizer (without the routing token), the PIL image processor and the family's
    chat template. No video processor (it needs torchvision)."""
    import os

    model = tiny_qwen_vl(family, seed, num_layers=num_layers)
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = QWEN_VL_CHAT_TEMPLATE
    tokenizer.save_pretrained(path)
    tiny_qwen_vl_image_processor().save_pretrained(path)
    with open(os.path.join(path, "chat_template.jinja"), "w") as f:
        f.write(QWEN_VL_CHAT_TEMPLATE)
    return model


__all__ += ["QWEN_VL_CHAT_TEMPLATE", "save_tiny_qwen_vl"]

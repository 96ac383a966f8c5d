"""The toy LLaVA-OneVision: word-level tokenizer, configuration, processor, input encoding and a fast feature path.

The model is transformers' own `LlavaOnevisionForConditionalGeneration`: a SigLIP-style tower at 64 px (patch 16, so
that one base-view patch is exactly one 32-px grid cell of the 128-px picture), anyres with a base view plus 2x2
crops (88 image tokens: 16 base + 64 grid + 8 newlines), and an 8-layer Qwen2.
"""

from __future__ import annotations

import os

import torch
from transformers import LlavaOnevisionConfig
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from ..testing import siglip_llava_config, word_level_tokenizer, write_llava_folder
from .data import vocabulary

TOWER_SIZE = 64
TOWER_PATCH = 16
GRID_PINPOINTS = [[64, 128], [128, 64], [128, 128]]
NUM_IMAGE_TOKENS = 88  # for the generator's 128x128 pictures

SPECIAL_TOKENS = ["<pad>", "<|im_start|>", "<|im_end|>", "<image>", "<video>", "<|reserved_0|>"]
VOCAB = SPECIAL_TOKENS + ["user", "assistant", "system"] + vocabulary()
PAD_ID, IM_START_ID, IM_END_ID, IMAGE_ID, VIDEO_ID, RESERVED_ID = range(6)
USER_ID, ASSISTANT_ID = 6, 7
ROUTING_TOKEN = "<route>"

PROCESSOR_FIELDS = {
    "processor_class": "LlavaOnevisionProcessor",
    "num_image_tokens": (TOWER_SIZE // TOWER_PATCH) ** 2,
    "vision_feature_select_strategy": "full",
    "vision_aspect_ratio": "anyres_max_9",
    "image_token": "<image>",
    "video_token": "<video>",
}


def toy_tokenizer():
    """A word-level `PreTrainedTokenizerFast` over `VOCAB` (ids = positions), without the routing token (the VISOR
    conversion adds it on a spare embedding row)."""
    return word_level_tokenizer(VOCAB, SPECIAL_TOKENS, model_max_length=4096)


def toy_image_processor() -> LlavaOnevisionImageProcessorPil:
    return LlavaOnevisionImageProcessorPil(
        size={"height": TOWER_SIZE, "width": TOWER_SIZE},
        image_grid_pinpoints=GRID_PINPOINTS,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_convert_rgb=True,
    )


def toy_llava_config(num_layers: int = 8) -> LlavaOnevisionConfig:
    text_config = {
        "model_type": "qwen2",
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": len(VOCAB) + 8,  # spare rows, as real checkpoints have
        "max_position_embeddings": 1024,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
        "pad_token_id": PAD_ID,
        "bos_token_id": IM_START_ID,
        "eos_token_id": IM_END_ID,
    }
    vision = {"hidden_size": 96, "intermediate_size": 384, "num_hidden_layers": 3, "num_attention_heads": 4}
    return siglip_llava_config(
        text_config, vision, TOWER_SIZE, TOWER_PATCH, GRID_PINPOINTS,
        image_token_index=IMAGE_ID, video_token_index=VIDEO_ID, tie_word_embeddings=False,
    )


def save_llava_checkpoint(model, path: str | os.PathLike) -> None:
    """A complete LLaVA-OV checkpoint folder (llava-hf layout): weights, config, tokenizer, image processor,
    processor settings and chat template."""
    write_llava_folder(path, model, toy_tokenizer(), toy_image_processor(), PROCESSOR_FIELDS)


# -- inputs ---------------------------------------------------------------------------------------------------------

WORD_ID = {w: i for i, w in enumerate(VOCAB)}


def word_ids(text: str) -> list[int]:
    return [WORD_ID[w] for w in text.split()]


def prompt_ids(question: str, routing_token_id: int | None = None, num_image_tokens: int = NUM_IMAGE_TOKENS) -> list[int]:
    """Token ids of the chat prompt `<|im_start|>user <image>\\n{question}[<route>]<|im_end|>\\n<|im_start|>assistant\\n`
    with the image placeholder expanded: what `VisorProcessor.apply_chat_template` + the processor give."""
    ids = [IM_START_ID, USER_ID] + [IMAGE_ID] * num_image_tokens + word_ids(question)
    if routing_token_id is not None:
        ids.append(routing_token_id)
    return ids + [IM_END_ID, IM_START_ID, ASSISTANT_ID]


def pixel_batch(images, processor=None) -> dict:
    processor = processor or toy_image_processor()
    out = processor(images, return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_sizes": out["image_sizes"]}


def encode_batch(examples, routing_token_id: int | None = None, processor=None, packing: int = 1) -> dict:
    """Model inputs for a list of `data.Example` (prompts left-padded to the longest question, one picture each) and
    `answers`, the token id of each reference answer. Same ids and pixels as the checkpoint's processor gives (with
    `packing`: its `packing=`, the packed image-token count; run with `visor_packing=packing`)."""
    rows = [prompt_ids(e.question.text, routing_token_id, num_pooled_tokens(packing)) for e in examples]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = torch.tensor(r)
        attention_mask[i, width - len(r):] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    batch.update(pixel_batch([e.image for e in examples], processor))
    batch["answers"] = torch.tensor([WORD_ID[e.question.answer] for e in examples])
    return batch


# -- fast feature path (and training-free token pooling for the dense model) -----------------------------------------


def image_features(llava, pixel_values: torch.Tensor, pool: int = 1) -> torch.Tensor:
    """Image features of 128x128 toy pictures in LLaVA-OV's packed order (base view 4x4, then the 8x8 anyres grid
    with an `image_newline` after each row): `[batch, 88, hidden]`, identical to `get_image_features` for `pool=1`.

    `pool=2` averages horizontal pairs of tokens (base 4x2, grid 8x4 + 8 newlines = 48 tokens); `pool=4` averages 2x2
    blocks (base 2x2, grid 4x4 + 4 newlines = 24 tokens): training-free visual token pooling.
    """
    inner = llava.model
    batch, views = pixel_values.shape[:2]
    flat = pixel_values.reshape(batch * views, *pixel_values.shape[2:])
    hidden = inner.vision_tower(flat, output_hidden_states=True).hidden_states[llava.config.vision_feature_layer]
    feats = inner.multi_modal_projector(hidden)  # [B*5, 16, d]
    d = feats.shape[-1]
    side = TOWER_SIZE // TOWER_PATCH
    feats = feats.reshape(batch, views, side, side, d)
    base = feats[:, 0]
    crops = feats[:, 1:].reshape(batch, 2, 2, side, side, d).permute(0, 1, 3, 2, 4, 5).reshape(batch, 2 * side, 2 * side, d)

    def shrink(x):
        if pool == 1:
            return x
        x = x.permute(0, 3, 1, 2)
        kernel = (1, 2) if pool == 2 else (2, 2)
        return torch.nn.functional.avg_pool2d(x, kernel).permute(0, 2, 3, 1)

    base, grid = shrink(base), shrink(crops)
    newline = inner.image_newline.to(grid.dtype).view(1, 1, 1, d).expand(batch, grid.shape[1], 1, d)
    grid = torch.cat([grid, newline], dim=2)
    return torch.cat([base.reshape(batch, -1, d), grid.reshape(batch, -1, d)], dim=1)


def num_pooled_tokens(pool: int) -> int:
    return {1: 88, 2: 48, 4: 24}[pool]

"""The shapes of LLaVA-OV 0.5B / 7B (random weights, nothing downloaded) and the benchmark's inputs."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers import LlavaOnevisionConfig

TOKENS_PER_CROP = 729  # SigLIP-so400m at 384 px, patch 14: 27 x 27
IMAGE_TOKEN_ID = 151646
TEXT_BEFORE, TEXT_AFTER = 14, 50  # system prompt before the image, question after it

QWEN2_0_5B = dict(
    vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
    num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
    tie_word_embeddings=True,
)
QWEN2_7B = dict(
    vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
    num_key_value_heads=4,
)
SIGLIP_SO400M = dict(
    model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=26,
    num_attention_heads=16, image_size=384, patch_size=14, vision_use_head=False,
)


def llava_config(text: dict) -> LlavaOnevisionConfig:
    return LlavaOnevisionConfig(
        text_config={"model_type": "qwen2", **text}, vision_config=dict(SIGLIP_SO400M),
        image_token_id=IMAGE_TOKEN_ID, video_token_id=IMAGE_TOKEN_ID + 1, vision_feature_layer=-1,
        vision_feature_select_strategy="full", tie_word_embeddings=text.get("tie_word_embeddings", False),
    )


def make_inputs(n_visual: int, batch: int, device: torch.device, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    before = torch.randint(1000, 150000, (batch, TEXT_BEFORE), generator=generator)
    after = torch.randint(1000, 150000, (batch, TEXT_AFTER), generator=generator)
    image = torch.full((batch, n_visual), IMAGE_TOKEN_ID)
    return torch.cat([before, image, after], dim=1).to(device)


def make_features(n_visual: int, hidden: int, dtype, device, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + 1)
    return torch.randn(n_visual, hidden, generator=generator).to(device=device, dtype=dtype)


def pool_features(features: torch.Tensor, factor: int) -> torch.Tensor:
    """Average pooling of consecutive visual tokens (kernel = stride = factor)."""
    return torch.nn.functional.avg_pool1d(features.T[None].float(), factor, factor)[0].T.to(features.dtype)


def patch_image_features(model, features: list[torch.Tensor]) -> None:
    """Make `model.model.get_image_features` return these features (one [n, d] tensor per image): the tower is the
    same for every method, so it is timed apart, not per row."""
    model.model.get_image_features = lambda *args, **kwargs: SimpleNamespace(pooler_output=features)

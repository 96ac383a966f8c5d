"""Processor of VISOR on the Qwen2-VL family: the family's processor (image-token expansion, `image_grid_thw`,
`mm_token_type_ids`, chat template) plus the routing token after each user question."""

from __future__ import annotations

from transformers import Qwen2VLProcessor

from .processing_visor import DEFAULT_ROUTING_TOKEN, RoutingTokenMixin


class VisorQwen2VLProcessor(RoutingTokenMixin, Qwen2VLProcessor):
    r"""
    [`Qwen2VLProcessor`] (also Qwen2.5-VL's: the family shares it) whose prompts carry VISOR's routing token, placed
    as [`VisorProcessor`] places it (before the `<|im_end|>` of every user turn). The video processor is optional
    (the family's needs torchvision).
    """

    # `save_pretrained` always writes this file and `auto_map` (as `VisorProcessor` does)
    _auto_class = "AutoProcessor"

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        video_processor=None,
        chat_template=None,
        routing_token=DEFAULT_ROUTING_TOKEN,
        user_turn_start="<|im_start|>user",
        turn_end="<|im_end|>",
        add_routing_token=True,
        **kwargs,
    ):
        self.set_routing_token(tokenizer, routing_token, user_turn_start, turn_end, add_routing_token)
        super().__init__(
            image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
            chat_template=chat_template, **kwargs,
        )


__all__ = ["VisorQwen2VLProcessor"]

"""Processor of VISOR models: LLaVA-OneVision's processor plus the routing token after each user question."""

from __future__ import annotations

import importlib.util
import math
from contextvars import ContextVar

from transformers import LlavaOnevisionProcessor
from transformers.image_processing_utils import select_best_resolution

from .packing_visor import PACKING_BLOCKS, ImageTokenLayout
from .reduction_visor import TokenReductionProcessorMixin

DEFAULT_ROUTING_TOKEN = "<route>"


# `packing=` of the processor call running in this thread / task (None: the processor's own factor)
CALL_PACKING: ContextVar[int | None] = ContextVar("visor_call_packing", default=None)


def check_processor_packing(packing) -> int:
    if isinstance(packing, bool) or not isinstance(packing, int) or packing not in PACKING_BLOCKS:
        raise ValueError(f"packing must be a packing factor {tuple(PACKING_BLOCKS)}, got {packing!r}")
    return packing


def _has_torchvision() -> bool:
    return importlib.util.find_spec("torchvision") is not None


def _default_video_processor():
    """LLaVA-OneVision's video processor with its defaults, or `None` when it cannot be built."""
    try:
        from transformers import LlavaOnevisionVideoProcessor

        return LlavaOnevisionVideoProcessor()
    except Exception:  # torchvision missing or unusable: videos then raise a clear error in __call__
        return None


class RoutingTokenMixin:
    """What a VISOR processor adds to its family's processor: the routing token right after each user question (see
    `VisorProcessor`), and no video processor without torchvision (the families' video processors need it)."""

    def set_routing_token(self, tokenizer, routing_token, user_turn_start, turn_end, add_routing_token) -> None:
        self.routing_token = routing_token
        self.user_turn_start = user_turn_start
        self.turn_end = turn_end
        self.add_routing_token = add_routing_token
        if tokenizer is not None and routing_token is not None:
            ids = tokenizer.convert_tokens_to_ids(routing_token)
            if ids is None or ids == tokenizer.unk_token_id:
                raise ValueError(
                    f"the tokenizer does not know the routing token {routing_token!r}; add it first "
                    f"(tokenizer.add_special_tokens({{'additional_special_tokens': [{routing_token!r}]}}, "
                    "replace_extra_special_tokens=False)), or convert the checkpoint with `visor-hf convert`"
                )
            self.routing_token_id = ids
        else:
            self.routing_token_id = None

    @classmethod
    def get_attributes(cls):
        attributes = ["image_processor", "tokenizer"]
        if _has_torchvision():
            attributes.append("video_processor")
        return attributes

    def check_argument_for_proper_class(self, argument_name, argument):
        if argument_name == "video_processor" and argument is None:
            return None
        return super().check_argument_for_proper_class(argument_name, argument)

    # -- the routing token ------------------------------------------------------------------------------------------

    def _ends_with_routing_token(self, text: str) -> bool:
        return text.rstrip().endswith(self.routing_token)

    def _append_routing_token(self, text: str) -> str:
        """`text` with the routing token after its last non-space character (unless it is already there)."""
        if self._ends_with_routing_token(text):
            return text
        stripped = text.rstrip()
        return stripped + self.routing_token + text[len(stripped) :]

    def insert_routing_tokens(self, text: str) -> str:
        """Put the routing token right after each user question of one prompt (see the class documentation)."""
        if not self.user_turn_start or self.user_turn_start not in text:
            return self._append_routing_token(text)
        pieces, position = [], 0
        while True:
            start = text.find(self.user_turn_start, position)
            if start < 0:
                pieces.append(text[position:])
                break
            content_start = start + len(self.user_turn_start)
            end = text.find(self.turn_end, content_start) if self.turn_end else -1
            if end < 0:  # an open user turn at the end of the prompt
                pieces.append(text[position:content_start])
                pieces.append(self._append_routing_token(text[content_start:]))
                break
            pieces.append(text[position:content_start])
            pieces.append(self._append_routing_token(text[content_start:end]))
            pieces.append(self.turn_end)
            position = end + len(self.turn_end)
        return "".join(pieces)

    def __call__(self, images=None, text=None, videos=None, audio=None, add_routing_token: bool | None = None, **kwargs):
        if videos is not None and getattr(self, "video_processor", None) is None:
            raise ValueError(
                f"this {type(self).__name__} has no video processor: the family's video processor needs torchvision "
                "(pip install torchvision), then reload the processor"
            )
        add = self.add_routing_token if add_routing_token is None else add_routing_token
        if text is not None and add and self.routing_token is not None:
            if isinstance(text, str):
                text = self.insert_routing_tokens(text)
            else:
                text = [self.insert_routing_tokens(t) for t in text]
        return super().__call__(images=images, text=text, videos=videos, audio=audio, **kwargs)

    def apply_chat_template(self, conversation, chat_template=None, add_routing_token: bool | None = None, **kwargs):
        """The family's `apply_chat_template`; the rendered prompt carries the routing token after each user
        question (also when `tokenize=True`, through `__call__`)."""
        add = self.add_routing_token if add_routing_token is None else add_routing_token
        if not kwargs.get("tokenize", False):
            rendered = super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)
            if not add or self.routing_token is None:
                return rendered
            if isinstance(rendered, str):
                return self.insert_routing_tokens(rendered)
            return [self.insert_routing_tokens(r) for r in rendered]
        if add:
            return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)
        previous, self.add_routing_token = self.add_routing_token, False
        try:
            return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)
        finally:
            self.add_routing_token = previous



class VisorProcessor(TokenReductionProcessorMixin, RoutingTokenMixin, LlavaOnevisionProcessor):
    r"""
    [`LlavaOnevisionProcessor`] whose prompts also carry VISOR's routing token.

    The inputs are exactly LLaVA-OneVision's (same image-token expansion, `pixel_values`, `image_sizes`), plus the
    routing token placed right after each user question:

    - in a chat-formatted prompt, every user turn (from `user_turn_start` to the next `turn_end`) gets the routing
      token just before its `turn_end` (so after the question, before the end-of-turn marker); an open user turn at
      the end of the text gets it at the end;
    - a prompt without chat markers gets it at its end (after the last non-space character);
    - a turn that already ends with the routing token is left as it is, so calling the processor on text rendered
      by [`~VisorProcessor.apply_chat_template`] never doubles it.

    Pass `add_routing_token=False` to a call (or to the constructor) to get LLaVA-OneVision's inputs unchanged.

    Pass `token_reduction=` to a call (e.g. `"visionzip:0.25"`, see `reduction_visor`) to lay out the reduced
    number of image placeholders that a model with the same reduction expects.

    The video processor is optional: LLaVA-OneVision's needs torchvision. Without torchvision the processor has
    no video processor and asking it to process videos raises an error saying so.

    routing_token (`str`, *optional*, defaults to `"<route>"`):
        The routing token (a special token of the tokenizer).
    user_turn_start (`str`, *optional*, defaults to `"<|im_start|>user"`):
        Text that opens a user turn in a chat-formatted prompt.
    turn_end (`str`, *optional*, defaults to `"<|im_end|>"`):
        Text that closes a turn.
    add_routing_token (`bool`, *optional*, defaults to `True`):
        Whether calls insert the routing token (a call's own `add_routing_token=` wins).
    packing (`int`, *optional*, defaults to 1):
        Token packing factor (1, 2 or 4): each image expands to the packed number of image tokens, to be run with
        the same `visor_packing=` (a call's own `packing=` wins).
    """

    # `save_pretrained` always writes this file and `auto_map`: the folder then loads with `trust_remote_code=True`
    # where `visor_hf` is not installed
    _auto_class = "AutoProcessor"

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        video_processor=None,
        num_image_tokens=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        video_token="<video>",
        vision_aspect_ratio="anyres_max_9",
        routing_token=DEFAULT_ROUTING_TOKEN,
        user_turn_start="<|im_start|>user",
        turn_end="<|im_end|>",
        add_routing_token=True,
        packing=1,
        **kwargs,
    ):
        self.packing = check_processor_packing(packing)
        self.set_routing_token(tokenizer, routing_token, user_turn_start, turn_end, add_routing_token)
        super().__init__(
            image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
            num_image_tokens=num_image_tokens, vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template, image_token=image_token, video_token=video_token,
            vision_aspect_ratio=vision_aspect_ratio, **kwargs,
        )

    # -- token packing: the placeholder count of a packed image (see `packing_visor.py`) --------------------------

    def __call__(self, images=None, text=None, videos=None, audio=None, packing: int | None = None, **kwargs):
        # the call's factor lives in a context variable, not on the processor: calls from several threads (or tasks)
        # on one processor each see their own
        token = CALL_PACKING.set(None if packing is None else check_processor_packing(packing))
        try:
            return super().__call__(images=images, text=text, videos=videos, audio=audio, **kwargs)
        finally:
            CALL_PACKING.reset(token)

    @property
    def active_packing(self) -> int:
        """The packing factor of the running call (its `packing=`, else the processor's)."""
        return CALL_PACKING.get() or self.packing

    def _packed_layout(self, grid: tuple[int, int] | None) -> ImageTokenLayout:
        if self.active_packing != 1 and self.vision_feature_select_strategy == "default":
            raise ValueError("token packing needs the whole patch grid: vision_feature_select_strategy='full'")
        side = int(math.isqrt(self.num_image_tokens))
        return ImageTokenLayout((side, side), grid)

    def _get_number_of_features(self, orig_height: int, orig_width: int, height: int, width: int) -> int:
        if self.active_packing == 1:
            return super()._get_number_of_features(orig_height, orig_width, height, width)
        height_best, width_best = select_best_resolution([orig_height, orig_width], self.image_processor.image_grid_pinpoints)
        side = int(math.isqrt(self.num_image_tokens))
        unpadded, rows = self._get_unpadded_features(orig_height, orig_width, side, side, height_best // height, width_best // width)
        return self._packed_layout((rows, unpadded // rows)).num_tokens(self.active_packing)

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        factor = self.active_packing
        counts = list(image_inputs["batch_num_images"])
        images_of_sample = next(n for i, n in enumerate(counts) if image_idx < sum(counts[: i + 1]))
        if factor == 1 or images_of_sample == 1:  # a single image: `_get_number_of_features` gives its packed count
            return super().replace_image_token(image_inputs, image_idx, **kwargs)
        # an image of a multi-image prompt: its base view and one newline
        return self.image_token * self._packed_layout(None).num_tokens(factor)

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        # A folder written where torchvision is absent holds no video processor config; loading it where torchvision
        # is installed must still work: LLaVA-OneVision's default video processor then (or none if it cannot be built).
        try:
            return super()._get_arguments_from_pretrained(pretrained_model_name_or_path, processor_dict, **kwargs)
        except OSError as error:
            if "video_processor" not in cls.get_attributes() or "video processor" not in str(error):
                raise
        without_video = type(cls.__name__, (cls,), {"get_attributes": classmethod(lambda c: ["image_processor", "tokenizer"])})
        args = super(cls, without_video)._get_arguments_from_pretrained(pretrained_model_name_or_path, processor_dict, **kwargs)
        return [*args, _default_video_processor()]


__all__ = ["VisorProcessor", "RoutingTokenMixin", "DEFAULT_ROUTING_TOKEN"]

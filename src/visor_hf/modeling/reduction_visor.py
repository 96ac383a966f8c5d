"""Training-free visual token reduction before the LLM (VisionZip), for LLaVA-OneVision and VISOR models.

Each image's packed feature sequence (what `get_image_features` returns after `pack_image_features`: the base view,
the anyres grid and its newline tokens) is reduced to a number of tokens fixed by a rule on its length alone, so
that the processor lays out exactly that many image placeholders and the LLM sees the reduced sequence as a dense
LLaVA-OneVision given fewer tokens would (see docs/token_reduction.md):

- **count**: `TokenReduction.count(n)`: `keep` (a float in (0, 1]) times the `n` tokens of the packed image,
  rounded to the nearest integer (at least 1), or `keep` tokens (an int, at most `n`);
- **dominant tokens** (VisionZip): the tokens that receive the most attention in a vision-tower layer (by default
  the layer whose output is the selected feature), averaged over heads and over the crop's queries (SigLIP has no
  CLS token), carried through the same unpadding / interpolation as the features; kept in their original order;
- **contextual tokens**: the remaining image tokens grouped around evenly spaced centres by the cosine similarity
  of their keys (the layer's keys, mean over heads) and averaged, appended after the dominant tokens;
- **newline tokens** rank below every image token (they are kept only when `keep` covers all the image tokens,
  so that keeping everything is the identity; `newlines="keep"` ranks them above instead) and are never merged.

`apply_token_reduction(model_or_processor, reduction)` switches it on (`None`: off) for a LLaVA-OneVision or VISOR
model (their inner `LlavaOnevisionModel`'s `get_image_features`) and for their processors (the placeholder count);
`token_reduction(reduction, *objects)` does the same for a `with` block. A `VisorProcessor` also takes
`token_reduction=` per call.
"""

from __future__ import annotations

import contextlib
import math
import types
from dataclasses import dataclass

import torch
from transformers import LlavaOnevisionModel, LlavaOnevisionProcessor
from transformers.models.llava_onevision.modeling_llava_onevision import image_size_to_num_patches

METHODS = ("visionzip",)
NEWLINE_POLICIES = ("drop", "keep")
# VisionZip's default split of its budget: 54 dominant + 10 contextual tokens out of 64
DEFAULT_CONTEXTUAL_FRACTION = 10 / 64


@dataclass(frozen=True)
class TokenReduction:
    """What to keep of each image's visual tokens.

    method (`str`): the reduction method; `"visionzip"`.
    keep (`float` or `int`): a fraction in (0, 1] of each image's tokens (rounded to the nearest integer, at least 1)
        or a number of tokens per image (`int`; an image with fewer tokens is an error).
    contextual_fraction (`float`): the share of the kept count that are merged contextual tokens (VisionZip's
        10 of 64 by default); no contextual token when everything is kept.
    layer (`int`, *optional*): index of the vision-tower layer whose attention ranks the tokens; by default the
        layer that outputs the selected feature (`vision_feature_layer`; the last one for a list).
    newlines (`str`): `"drop"` (default): newline tokens rank below every image token (kept only when `keep`
        covers all the image tokens); `"keep"`: they rank above every image token (kept in place, in the budget,
        so the kept tokens still carry the row ends). Never merged either way.
    """

    method: str = "visionzip"
    keep: float | int = 0.25
    contextual_fraction: float = DEFAULT_CONTEXTUAL_FRACTION
    layer: int | None = None
    newlines: str = "drop"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown token reduction method {self.method!r}; known: {', '.join(METHODS)}")
        if isinstance(self.keep, bool) or not isinstance(self.keep, (int, float)):
            raise ValueError(f"token reduction keep must be a fraction in (0, 1] or a number of tokens, got {self.keep!r}")
        if isinstance(self.keep, float) and not 0.0 < self.keep <= 1.0:
            raise ValueError(f"token reduction keep as a fraction must be in (0, 1], got {self.keep}")
        if isinstance(self.keep, int) and self.keep < 1:
            raise ValueError(f"token reduction keep as a number of tokens must be >= 1, got {self.keep}")
        if not 0.0 <= self.contextual_fraction < 1.0:
            raise ValueError(f"contextual_fraction must be in [0, 1), got {self.contextual_fraction}")
        if self.newlines not in NEWLINE_POLICIES:
            raise ValueError(f"token reduction newlines must be one of {', '.join(NEWLINE_POLICIES)}, got {self.newlines!r}")

    @classmethod
    def parse(cls, spec: str | TokenReduction) -> TokenReduction:
        """`"visionzip:0.25"` (a fraction: has a dot) or `"visionzip:64"` (tokens per image), optionally
        followed by `":keep-newlines"`; a `TokenReduction` is returned as it is."""
        if isinstance(spec, TokenReduction):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"token reduction must be a TokenReduction or a string like 'visionzip:0.25', got {spec!r}")
        method, _, keep = spec.partition(":")
        keep, _, option = keep.partition(":")
        if option not in ("", "keep-newlines"):
            raise ValueError(f"token reduction {spec!r}: unknown option {option!r} (known: keep-newlines)")
        if not keep:
            raise ValueError(f"token reduction {spec!r}: expected 'method:keep', e.g. 'visionzip:0.25' or 'visionzip:64'")
        try:
            value = float(keep) if any(c in keep for c in ".eE") else int(keep)
        except ValueError:
            raise ValueError(f"token reduction {spec!r}: keep {keep!r} is neither a fraction nor a count") from None
        return cls(method=method.strip(), keep=value, newlines="keep" if option else "drop")

    def __str__(self) -> str:
        return f"{self.method}:{self.keep}" + (":keep-newlines" if self.newlines == "keep" else "")

    def count(self, n_tokens: int) -> int:
        """Number of tokens an image of `n_tokens` packed visual tokens is reduced to (what the processor lays
        out as placeholders)."""
        if isinstance(self.keep, float):
            return max(1, min(n_tokens, round(self.keep * n_tokens)))
        if self.keep > n_tokens:
            raise ValueError(
                f"token reduction {self} keeps {self.keep} tokens per image but an image has only {n_tokens} visual "
                "tokens; keep a fraction (e.g. 'visionzip:0.25') or fewer tokens"
            )
        return self.keep

    def contextual_count(self, n_kept: int, n_tokens: int, n_image_tokens: int) -> int:
        """How many of the `n_kept` tokens are merged contextual tokens, for an image of `n_tokens` packed tokens
        of which `n_image_tokens` are not newline tokens: none when everything is kept, nor (newlines dropped) when
        the kept tokens reach the newline tokens."""
        if self.newlines == "drop" and n_kept > n_image_tokens:
            return 0
        return min(math.floor(n_kept * self.contextual_fraction), n_tokens - n_kept)


def resolve_token_reduction(reduction: str | TokenReduction | None) -> TokenReduction | None:
    return None if reduction is None else TokenReduction.parse(reduction)


# -- the method ---------------------------------------------------------------------------------------------------


def attention_received(
    attention: torch.nn.Module, queries: torch.Tensor, keys: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`[crops, P]` attention each token receives in a SigLIP attention layer (softmax over keys, mean over heads
    and queries) and `[crops, P, head_dim]` the layer's keys averaged over heads, from the outputs of the layer's
    `q_proj` / `k_proj` (`[crops, P, hidden]`, as the tower computed them). The map is computed here because SDPA
    returns no weights."""
    crops, length, _ = queries.shape
    shape = (crops, length, -1, attention.head_dim)
    queries = queries.view(shape).transpose(1, 2).float()
    keys = keys.view(shape).transpose(1, 2).float()
    received = []
    for crop in range(crops):  # one [heads, P, P] map at a time
        weights = torch.softmax(torch.matmul(queries[crop], keys[crop].transpose(-1, -2)) * attention.scale, dim=-1)
        received.append(weights.mean(dim=(0, 1)))
    return torch.stack(received), keys.mean(dim=1)


def reduce_image_tokens(
    features: torch.Tensor, scores: torch.Tensor, keys: torch.Tensor, reduction: TokenReduction
) -> torch.Tensor:
    """VisionZip on one image's packed tokens: `features` `[N, d]`, `scores` `[N]` (NaN on newline tokens),
    `keys` `[N, k]`. Returns `[reduction.count(N), d]`: the dominant tokens in their original order, then the
    contextual tokens (in the order of their centres)."""
    n_tokens = features.shape[0]
    newline = torch.isnan(scores)
    n_image_tokens = n_tokens - int(newline.sum())
    n_kept = reduction.count(n_tokens)
    n_contextual = reduction.contextual_count(n_kept, n_tokens, n_image_tokens)
    # newline tokens last (or first); a stable sort breaks ties by position, so the choice is deterministic
    ranking = scores.masked_fill(newline, float("-inf") if reduction.newlines == "drop" else float("inf"))
    order = torch.sort(ranking, descending=True, stable=True).indices
    dominant = order[: n_kept - n_contextual].sort().values
    kept = features[dominant]
    if n_contextual == 0:
        return kept
    remaining = torch.ones(n_tokens, dtype=torch.bool, device=features.device)
    remaining[dominant] = False
    remaining &= ~newline
    pool = remaining.nonzero().squeeze(1)  # the image tokens not kept, in order
    if pool.numel() < n_contextual:
        raise ValueError(f"token reduction {reduction}: {n_contextual} contextual tokens but only {pool.numel()} tokens to merge")
    step = max(1, pool.numel() // n_contextual)
    centre_slots = torch.arange(0, pool.numel(), step, device=features.device)[:n_contextual]
    is_centre = torch.zeros(pool.numel(), dtype=torch.bool, device=features.device)
    is_centre[centre_slots] = True
    centres, others = pool[is_centre], pool[~is_centre]
    metric = torch.nn.functional.normalize(keys.float(), dim=-1)
    assignment = (metric[others] @ metric[centres].T).argmax(dim=-1)
    sums = features[centres].float().index_add(0, assignment, features[others].float())
    counts = torch.ones(n_contextual, device=features.device).index_add(
        0, assignment, torch.ones_like(assignment, dtype=torch.float)
    )
    contextual = (sums / counts[:, None]).to(features.dtype)
    return torch.cat([kept, contextual])


# -- the model hook -----------------------------------------------------------------------------------------------


def _feature_layer_index(reduction: TokenReduction, vision_feature_layer, num_layers: int) -> int:
    """Index of the encoder layer whose attention ranks the tokens."""
    if reduction.layer is not None:
        index = reduction.layer + num_layers if reduction.layer < 0 else reduction.layer
        if not 0 <= index < num_layers:
            raise ValueError(f"token reduction layer {reduction.layer} is out of range for {num_layers} vision layers")
        return index
    selected = [vision_feature_layer] if isinstance(vision_feature_layer, int) else list(vision_feature_layer)
    # hidden_states[h] is the output of layer h - 1 (hidden_states[0]: the embeddings)
    hidden = max(h % (num_layers + 1) for h in selected)
    if hidden == 0:
        raise ValueError("token reduction needs a vision layer: vision_feature_layer selects the embeddings; pass layer=")
    return hidden - 1


def _vision_layers(tower) -> torch.nn.ModuleList:
    """The encoder layers of a SigLIP tower (`SiglipVisionModel` holds them directly in transformers 5, under
    `vision_model` before)."""
    tower = getattr(tower, "vision_model", tower)
    return tower.encoder.layers


def _reduced_get_image_features(
    self,
    pixel_values,
    image_sizes,
    vision_feature_layer=None,
    vision_feature_select_strategy=None,
    vision_aspect_ratio=None,
    batch_num_images=None,
    **kwargs,
):
    """`LlavaOnevisionModel.get_image_features` (the class's own) whose per-image features are then reduced."""
    reduction = self.token_reduction
    config = self.config
    vision_feature_layer = config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
    strategy = config.vision_feature_select_strategy if vision_feature_select_strategy is None else vision_feature_select_strategy
    aspect = config.vision_aspect_ratio if vision_aspect_ratio is None else vision_aspect_ratio
    return_dict = kwargs.pop("return_dict", True)
    layers = _vision_layers(self.vision_tower)
    attention = layers[_feature_layer_index(reduction, vision_feature_layer, len(layers))].self_attn
    captured = {}

    def capturing(name):
        def hook(module, args, output):
            captured[name] = output

        return hook

    # the tower's own query/key projections of the ranking layer (not recomputed)
    handles = [attention.q_proj.register_forward_hook(capturing("q")), attention.k_proj.register_forward_hook(capturing("k"))]
    try:
        outputs = type(self).get_image_features(
            self,
            pixel_values,
            image_sizes,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=strategy,
            vision_aspect_ratio=aspect,
            batch_num_images=batch_num_images,
            return_dict=True,
            **kwargs,
        )
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():  # the selection is not differentiated (the kept and merged features are)
        scores, keys = attention_received(attention, captured["q"], captured["k"])
        if strategy == "default":  # as the features: without the first (CLS) token
            scores, keys = scores[:, 1:], keys[:, 1:]
        aux = _pack_like_features(self, torch.cat([scores[..., None], keys], dim=-1), image_sizes, batch_num_images, aspect)
    features = outputs.pooler_output
    reduced = []
    for index, (image, packed) in enumerate(zip(features, aux)):
        if packed.shape[0] != image.shape[0]:
            raise ValueError(
                f"token reduction: image {index} has {image.shape[0]} packed features but its attention scores pack "
                f"to {packed.shape[0]} tokens (a feature packing the reduction does not know)"
            )
        packed = packed.to(image.device)
        reduced.append(reduce_image_tokens(image, packed[:, 0], packed[:, 1:], reduction))
    outputs.pooler_output = reduced
    return outputs if return_dict else outputs.to_tuple()


def _pack_like_features(model, per_crop: torch.Tensor, image_sizes, batch_num_images, aspect) -> list[torch.Tensor]:
    """Per-crop `[crops, P, c]` values laid out per image exactly as the features are (LLaVA-OV's anyres packing:
    unpadding, interpolation, newline tokens), newline tokens NaN."""
    if batch_num_images is None:
        need_patching = [True] * len(image_sizes)
    else:
        need_patching = [n == 1 for n in batch_num_images for _ in range(n)]
    num_patches = [
        image_size_to_num_patches(size, model.config.image_grid_pinpoints, model.config.vision_config.image_size) if patch else 1
        for size, patch in zip(image_sizes, need_patching)
    ]
    per_image = torch.split(per_crop, num_patches, dim=0)
    newline = torch.full((per_crop.shape[-1],), float("nan"), device=per_crop.device)
    packed, _ = LlavaOnevisionModel.pack_image_features(
        model, per_image, image_sizes, image_newline=newline, vision_aspect_ratio=aspect
    )
    return packed


def _checked_get_placeholder_mask(self, input_ids, inputs_embeds, image_features=None, video_features=None):
    """LLaVA-OV's placeholder check, with an error that names the reduction when the counts differ."""
    if image_features is not None and input_ids is not None:
        n_placeholders = int((input_ids == self.config.image_token_id).sum())
        if n_placeholders != image_features.shape[0]:
            raise ValueError(
                f"the prompt holds {n_placeholders} image placeholder tokens but token reduction {self.token_reduction} "
                f"leaves {image_features.shape[0]} image features: build the prompt with the same reduction "
                "(processor(..., token_reduction=...) or apply_token_reduction(processor, ...))"
            )
    return type(self).get_placeholder_mask(
        self, input_ids, inputs_embeds=inputs_embeds, image_features=image_features, video_features=video_features
    )


def _inner_model(model) -> LlavaOnevisionModel:
    if isinstance(model, LlavaOnevisionModel):
        return model
    inner = getattr(model, "model", None)
    if isinstance(inner, LlavaOnevisionModel):
        return inner
    raise TypeError(
        f"token reduction works on LLaVA-OneVision and VISOR (LLaVA-OneVision backbone) models and their processors, "
        f"got {type(model).__name__}"
    )


# -- the processor count ------------------------------------------------------------------------------------------


def _reduced_placeholders(processor, text: str, reduction: TokenReduction | None) -> str:
    """One image's placeholder text with the reduced count."""
    if reduction is None:
        return text
    token = processor.image_token
    return token * reduction.count(len(text) // len(token))


def _reduced_multimodal_counts(data, reduction: TokenReduction | None):
    """`_get_num_multimodal_tokens`'s `MultiModalData` with the reduced image counts."""
    if reduction is not None and "num_image_tokens" in data:
        data.num_image_tokens = [reduction.count(n) for n in data.num_image_tokens]
    return data


class TokenReductionProcessorMixin:
    """Makes a LLaVA-OneVision processor lay out the reduced number of image placeholders: `token_reduction=` per
    call, or the `token_reduction` attribute (set by `apply_token_reduction`). Applied to the count the processor
    computes otherwise (after any feature packing)."""

    token_reduction: TokenReduction | None = None
    _call_token_reduction: TokenReduction | None = None

    def active_token_reduction(self) -> TokenReduction | None:
        return self._call_token_reduction or self.token_reduction

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
        text = super().replace_image_token(image_inputs, image_idx, **kwargs)
        return _reduced_placeholders(self, text, self.active_token_reduction())

    def _get_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs):
        data = super()._get_num_multimodal_tokens(image_sizes=image_sizes, video_sizes=video_sizes, **kwargs)
        return _reduced_multimodal_counts(data, self.active_token_reduction())

    def __call__(self, *args, token_reduction: str | TokenReduction | None = None, **kwargs):
        previous, self._call_token_reduction = self._call_token_reduction, resolve_token_reduction(token_reduction)
        try:
            return super().__call__(*args, **kwargs)
        finally:
            self._call_token_reduction = previous


def _instance_replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs) -> str:
    return _reduced_placeholders(
        self, type(self).replace_image_token(self, image_inputs, image_idx, **kwargs), self.token_reduction
    )


def _instance_num_multimodal_tokens(self, image_sizes=None, video_sizes=None, **kwargs):
    data = type(self)._get_num_multimodal_tokens(self, image_sizes=image_sizes, video_sizes=video_sizes, **kwargs)
    return _reduced_multimodal_counts(data, self.token_reduction)


# -- public switches ----------------------------------------------------------------------------------------------

_PATCHED_MODEL = ("get_image_features", "get_placeholder_mask")
_PATCHED_PROCESSOR = ("replace_image_token", "_get_num_multimodal_tokens")


def apply_token_reduction(target, reduction: str | TokenReduction | None):
    """Switch visual token reduction on (or off with `None`) for a model or a processor; returns `target`.

    - a `LlavaOnevisionForConditionalGeneration` / `LlavaOnevisionModel` / `VisorForConditionalGeneration` /
      `VisorModel`: its inner model's `get_image_features` returns the reduced per-image features (and a prompt
      with the wrong number of placeholders raises an error naming both counts);
    - a `LlavaOnevisionProcessor` (or `VisorProcessor`): it lays out the reduced number of placeholders.

    The model and its processor must get the same reduction. Nothing is saved with `save_pretrained`.
    """
    reduction = resolve_token_reduction(reduction)
    if isinstance(target, LlavaOnevisionProcessor):
        _switch_processor(target, reduction)
        return target
    inner = _inner_model(target)
    for name in _PATCHED_MODEL:
        inner.__dict__.pop(name, None)
    inner.token_reduction = reduction
    if reduction is not None:
        # bound to the instance: a deep copy rebinds to the copy
        inner.get_image_features = types.MethodType(_reduced_get_image_features, inner)
        inner.get_placeholder_mask = types.MethodType(_checked_get_placeholder_mask, inner)
    return target


def _switch_processor(processor, reduction: TokenReduction | None) -> None:
    processor.token_reduction = reduction
    if isinstance(processor, TokenReductionProcessorMixin):
        return
    for name in _PATCHED_PROCESSOR:
        processor.__dict__.pop(name, None)
    if reduction is not None:
        processor.replace_image_token = types.MethodType(_instance_replace_image_token, processor)
        processor._get_num_multimodal_tokens = types.MethodType(_instance_num_multimodal_tokens, processor)


def current_token_reduction(target) -> TokenReduction | None:
    """The reduction switched on for a model or processor (`None`: none)."""
    if isinstance(target, LlavaOnevisionProcessor):
        return getattr(target, "token_reduction", None)
    return getattr(_inner_model(target), "token_reduction", None)


@contextlib.contextmanager
def token_reduction(reduction: str | TokenReduction | None, *targets):
    """`with token_reduction("visionzip:0.25", model, processor): ...`: the reduction on each target inside the
    block, each target's previous setting restored after it."""
    previous = [current_token_reduction(t) for t in targets]
    try:
        for target in targets:
            apply_token_reduction(target, reduction)
        yield
    finally:
        for target, before in zip(targets, previous):
            apply_token_reduction(target, before)


def reduction_flops(config, crops: int, n_tokens: int, reduction: str | TokenReduction) -> int:
    """FLOPs the reduction itself adds for one image of `crops` crops and `n_tokens` packed tokens: the ranking
    layer's attention map per crop (recomputed from the tower's own queries and keys: SDPA returns no weights) and
    the merge (similarities and averages). Multiply-adds count 2."""
    reduction = TokenReduction.parse(reduction)
    vision = config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    width, heads = vision.hidden_size, vision.num_attention_heads
    per_crop = 2 * patches * patches * width + 5 * heads * patches * patches
    n_kept = reduction.count(n_tokens)
    n_contextual = reduction.contextual_count(n_kept, n_tokens, n_tokens)
    merged = max(0, n_tokens - n_kept)
    hidden = config.text_config.hidden_size
    merge = 2 * merged * n_contextual * (width // heads) + merged * hidden
    return crops * per_crop + merge


__all__ = [
    "METHODS",
    "TokenReduction",
    "TokenReductionProcessorMixin",
    "apply_token_reduction",
    "attention_received",
    "current_token_reduction",
    "reduce_image_tokens",
    "reduction_flops",
    "resolve_token_reduction",
    "token_reduction",
]

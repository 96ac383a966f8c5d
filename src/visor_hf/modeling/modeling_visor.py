"""VISOR: LLaVA-OneVision whose LLM meets the visual tokens only at a few layers.

Three kinds of LLM layer (see the configuration):
- an *active SA layer* runs the stock Qwen2 decoder layer over the whole sequence (text and image, original order);
- a *CA layer* adds cross-attention from the text to the visual tokens, then runs the decoder layer on the text;
- every other layer runs the decoder layer on the text tokens only, at their original positions.

The text and the visual tokens live in two compact streams (`[B, N_text, d]` and `[B, N_vis, d]`) so that a
text-only or CA layer never touches the visual tokens; they are merged back into the original order only for
active SA layers and for the output.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, PreTrainedConfig
from transformers.cache_utils import Cache
from transformers.generation import GenerationMixin
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionModel,
    LlavaOnevisionMultiModalProjector,
    LlavaOnevisionPreTrainedModel,
)
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, eager_attention_forward
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults

from .cache_visor import FULL, TEXT, VisorCache, VisorState
from .configuration_visor import VisorConfig
from .flops_visor import FlopsShape, VisorFlopsReport, decode_flops, prefill_flops, select_by_budget
from .routing_visor import resolve_router_threshold, select_configurations

AUTO = "auto"
# what `visor_configuration=` takes: an index, a list of SA layers, "max"/"auto", or one entry per sample
ConfigurationRequest = int | str | Sequence[int | str | Sequence[int] | torch.Tensor] | torch.Tensor | None


@dataclass
class VisorModelOutputWithPast(ModelOutput):
    """Output of [`VisorModel`].

    last_hidden_state: final-normed hidden states in the original sequence order. Visual positions hold the visual
        tokens' states after the last SA layer that updated them (equal to LLaVA-OV's only in the dense layout).
    hidden_states (`output_hidden_states=True`): the embeddings and the output of every layer, `[B, T, d]` in the
        original order (the last entry is `last_hidden_state`, as in transformers' language models).
    attentions (`output_attentions=True`, eager attention; None entries otherwise): per layer `[B, heads, T, T]` in
        the original order; a text-only layer has zeros in every visual row and column. Prefill only.
    router_logits: `[num_routing_tokens, num_configurations]`, one row per routing token (when the router ran).
    routing_token_batch_index: the sample each row of `router_logits` belongs to.
    visor_configurations: the SA layers that ran for each sample.
    configuration_index: index into `config.configurations` per sample (-1 for a layer set outside the list).
    """

    last_hidden_state: torch.Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    image_hidden_states: torch.Tensor | None = None
    video_hidden_states: torch.Tensor | None = None
    router_logits: torch.Tensor | None = None
    routing_token_batch_index: torch.Tensor | None = None
    visor_configurations: list[tuple[int, ...]] | None = None
    configuration_index: torch.Tensor | None = None


@dataclass
class VisorCausalLMOutputWithPast(ModelOutput):
    """Output of [`VisorForConditionalGeneration`]; fields as [`VisorModelOutputWithPast`] plus `loss` and `logits`.

    logits: `[B, T, vocab]` like LLaVA-OV's. Text positions are VISOR's predictions; visual positions come from the
        visual tokens' last states (meaningful only when the last layer is an active SA layer, as in the dense layout).
    flops: `[B]` int64 (CPU): analytical LLM FLOPs of this forward for each sample as if it ran alone (prefill: the
        prompt with its configuration and the LM head on the logits kept; decoding: this step). See `flops_visor`.
        None in training mode.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    image_hidden_states: torch.Tensor | None = None
    video_hidden_states: torch.Tensor | None = None
    router_logits: torch.Tensor | None = None
    routing_token_batch_index: torch.Tensor | None = None
    visor_configurations: list[tuple[int, ...]] | None = None
    configuration_index: torch.Tensor | None = None
    flops: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------------------------
# Token bookkeeping


def compact_indices(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-aligned positions of the True entries of each row of `mask` ([B, T]).

    Returns `(index, filled)`, both `[B, N]` with `N` the largest row count; empty slots (on the left) hold `T`,
    one past the end, so that scattering them lands in a dummy column.
    """
    batch, length = mask.shape
    counts = mask.sum(1)
    width = int(counts.max()) if batch and length else 0  # one host sync, at prefill only
    slot = mask.long().cumsum(1) - 1 + (width - counts)[:, None]
    slot = torch.where(mask, slot, width)
    positions = torch.arange(length, device=mask.device).expand(batch, length)
    index = torch.full((batch, width + 1), length, dtype=torch.long, device=mask.device)
    index = index.scatter(1, slot, positions)[:, :width]
    return index, index < length


def gather_tokens(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """`states[b, index[b, i]]` for `[B, T, ...]` states; out-of-range (empty) slots read position T-1."""
    index = index.clamp(max=max(states.shape[1] - 1, 0))
    if states.dim() == 2:
        return states.gather(1, index)
    return states.gather(1, index[..., None].expand(-1, -1, *states.shape[2:]))


def merge_streams(text: torch.Tensor, text_index: torch.Tensor, visual: torch.Tensor, visual_index: torch.Tensor, length: int) -> torch.Tensor:
    """Put the text and visual streams back into the original order ([B, length, d])."""
    batch, _, hidden = text.shape
    merged = text.new_zeros(batch, length + 1, hidden)
    merged = merged.scatter(1, text_index[..., None].expand(-1, -1, hidden), text)
    merged = merged.scatter(1, visual_index[..., None].expand(-1, -1, hidden), visual)
    return merged[:, :length]


def to_attention_mask(allowed: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """Boolean `[B, Q, K]` (True = attend) to the 4D mask the attention implementation takes."""
    allowed = allowed[:, None]
    if implementation == "eager":
        return torch.zeros((), dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


def block_keys(mask: torch.Tensor, blocked: torch.Tensor) -> torch.Tensor:
    """Forbid the keys `blocked` ([B, K]) in a 4D mask from `create_causal_mask` (bool or additive float)."""
    blocked = blocked[:, None, None, :]
    if mask.dtype == torch.bool:
        mask = mask & ~blocked
        # a row that sees nothing would give NaN in some SDPA kernels; its output is discarded anyway
        return mask | ~mask.any(-1, keepdim=True)
    return mask.masked_fill(blocked, torch.finfo(mask.dtype).min)


def embedded_token_mask(embeddings: nn.Module, inputs_embeds: torch.Tensor, token_ids: list[int]) -> torch.Tensor:
    """`[B, T]` positions of `inputs_embeds` that hold the embedding of one of `token_ids`: how LLaVA-OV finds image
    placeholders when it is given embeddings instead of ids."""
    ids = torch.tensor(token_ids, device=inputs_embeds.device)
    embedded = embeddings(ids).to(inputs_embeds.dtype)
    return (inputs_embeds[:, :, None, :] == embedded).all(-1).any(-1)


def _segment_ids(lengths: list[int], first: int, device) -> torch.Tensor:
    """`first + k` repeated `lengths[k]` times: the image id of every visual token of consecutive images."""
    ids = torch.arange(first, first + len(lengths), device=device)
    return ids.repeat_interleave(torch.tensor(lengths, dtype=torch.long, device=device))


def scatter_attention(weights: torch.Tensor, index: torch.Tensor, length: int) -> torch.Tensor:
    """Attention weights `[B, H, N, N]` among the compact tokens at `index` (`[B, N]`, empty slots = `length`) laid out
    in the original order: `[B, H, length, length]`, zero for every row or column outside `index`."""
    batch, heads, count, _ = weights.shape
    out = weights.new_zeros(batch, length + 1, length + 1, heads)
    rows = index[:, :, None].expand(batch, count, count)
    cols = index[:, None, :].expand(batch, count, count)
    samples = torch.arange(batch, device=weights.device)[:, None, None].expand(batch, count, count)
    out[samples, rows, cols] = weights.permute(0, 2, 3, 1)
    return out[:, :length, :length].permute(0, 3, 1, 2)


@contextmanager
def capture_attentions(layers, enabled: bool):
    """Collect the attention weights each decoder layer's `self_attn` returns while the block runs (eager only:
    other implementations return None). The hooks are gone afterwards (not run again by a checkpointed backward)."""
    captured: list = []
    hooks = [layer.self_attn.register_forward_hook(lambda _m, _a, out: captured.append(out[1])) for layer in layers] if enabled else []
    try:
        yield captured
    finally:
        for hook in hooks:
            hook.remove()


# ----------------------------------------------------------------------------------------------------------------
# Modules


class VisorConvPositionEmbedding(nn.Module):
    """Conditional position embedding of the visual tokens: `v + DepthwiseConv1d(v)` (kernel 7, padding 3).

    The convolution runs per image: neighbours from another image or from padding count as zero padding.
    """

    def __init__(self, hidden_size: int, kernel_size: int = 7):
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"position_embedding_kernel_size must be odd, got {kernel_size}")
        # the parameters of `nn.Conv1d(d, d, kernel_size, padding=kernel_size // 2, groups=d)`
        self.weight = nn.Parameter(torch.zeros(hidden_size, 1, kernel_size))
        self.bias = nn.Parameter(torch.zeros(hidden_size))

    def forward(self, visual: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        """`visual` [B, N, d]; `segments` [B, N] image id of each slot (-1 for an empty slot).

        One depth-wise `conv1d` over the whole stream, then the few taps that crossed an image boundary or touched
        an empty slot are taken back (a Python loop over the 7 taps cost 2.5-4x more at 7k visual tokens).
        """
        half = self.weight.shape[-1] // 2
        hidden = visual.shape[-1]
        weight = self.weight.to(visual.dtype)
        conv = nn.functional.conv1d(visual.transpose(1, 2), weight, self.bias.to(visual.dtype), padding=half, groups=hidden)
        out = visual + conv.transpose(1, 2)
        # tap k of slot i reads slot i + k - half; it counts only if that slot holds the same image (tap `half`,
        # the slot itself, only if it holds an image at all). Out-of-range taps read the conv's zero padding.
        windows = nn.functional.pad(segments, (half, half), value=-2).unfold(1, 2 * half + 1, 1)  # [B, N, K]
        crossed = windows != segments[..., None]
        crossed[..., half] = segments < 0
        rows, cols = crossed.any(-1).nonzero(as_tuple=True)  # a few slots per image boundary (one host sync)
        if rows.numel():
            source = cols[:, None] + torch.arange(-half, half + 1, device=cols.device)  # [M, K]
            inside = (source >= 0) & (source < visual.shape[1])
            taps = visual[rows[:, None], source.clamp(0, visual.shape[1] - 1)]  # [M, K, d]
            keep = (crossed[rows, cols] & inside).to(visual.dtype)
            taken = torch.einsum("mkd,dk,mk->md", taps, weight[:, 0, :], keep)
            out.index_put_((rows, cols), out[rows, cols] - taken)  # `out` is a fresh tensor: no copy
        return out


class VisorCrossAttention(nn.Module):
    """Text queries, visual keys/values; grouped-query attention with the LLM's head layout, no RoPE."""

    def __init__(self, config: PreTrainedConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = False
        self.q_proj = nn.Linear(config.hidden_size, config.num_attention_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, config.num_key_value_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, config.hidden_size, bias=False)

    def project_visual(self, visual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (*visual.shape[:-1], -1, self.head_dim)
        return self.k_proj(visual).view(shape).transpose(1, 2), self.v_proj(visual).view(shape).transpose(1, 2)

    def forward(
        self, hidden_states: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor, attention_mask: torch.Tensor | None
    ) -> torch.Tensor:
        input_shape = hidden_states.shape[:-1]
        query = self.q_proj(hidden_states).view(*input_shape, -1, self.head_dim).transpose(1, 2)
        implementation = self.config._attn_implementation
        # a cross-attention mask is arbitrary: implementations without explicit masks fall back to SDPA
        if implementation not in ("eager", "sdpa"):
            implementation = "sdpa"
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
        output, _ = interface(
            self,
            query,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            is_causal=False,
        )
        return self.o_proj(output.reshape(*input_shape, -1).contiguous())


class VisorCrossAttentionBlock(GradientCheckpointingLayer):
    """`t = t + CrossAttn(norm(t), pos(v))`, run before the host layer's text-only pass."""

    def __init__(self, config: VisorConfig, layer_idx: int):
        super().__init__()
        text_config = config.text_config
        self.input_layernorm = Qwen2RMSNorm(text_config.hidden_size, eps=text_config.rms_norm_eps)
        self.visual_layernorm = Qwen2RMSNorm(text_config.hidden_size, eps=text_config.rms_norm_eps)
        self.position_embedding = VisorConvPositionEmbedding(text_config.hidden_size, config.position_embedding_kernel_size)
        self.cross_attn = VisorCrossAttention(text_config, layer_idx)

    def visual_key_values(self, visual: torch.Tensor, segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cross_attn.project_visual(self.visual_layernorm(self.position_embedding(visual, segments)))

    def forward(
        self, text: torch.Tensor, key_states: torch.Tensor, value_states: torch.Tensor, attention_mask: torch.Tensor | None, has_key: torch.Tensor
    ) -> torch.Tensor:
        attended = self.cross_attn(self.input_layernorm(text), key_states, value_states, attention_mask)
        # a text token that sees no visual token gets nothing added (not an average over masked keys)
        return text + attended * has_key


class VisorRouter(nn.Module):
    """MLP that reads the routing token's hidden state and scores each configuration."""

    def __init__(self, config: VisorConfig):
        super().__init__()
        hidden = config.text_config.hidden_size
        width = config.router_hidden_size or max(hidden // 4, 8)
        self.norm = Qwen2RMSNorm(hidden, eps=config.text_config.rms_norm_eps)
        self.fc1 = nn.Linear(hidden, width)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(width, len(config.configurations))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(self.norm(hidden_states))))


# ----------------------------------------------------------------------------------------------------------------
# Configuration requests


def resolve_configuration_request(config: VisorConfig, value: ConfigurationRequest, batch_size: int, has_router: bool) -> list[tuple[int, ...] | str]:
    """Turn `visor_configuration=` into one entry per sample: a tuple of SA layers, or "auto" (ask the router).

    - `None`: "auto" when the model has a router, else the default configuration;
    - `int`: index into `config.configurations`; a list of ints: an explicit set of SA layers; `"max"`: all of them;
    - per sample: a 1-D integer tensor of configuration indices, or a list (one entry per sample) whose entries
      are lists, ints or strings. A plain list of ints is never per-sample.
    """
    if value is None:
        value = AUTO
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        value = value.item()  # a 0-d tensor is one index for every sample
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.dtype in (torch.bool,) or value.is_floating_point():
            raise ValueError(f"a visor_configuration tensor must be a 1-D integer tensor of configuration indices, got {tuple(value.shape)} {value.dtype}")
        per_sample = value.tolist()
    elif isinstance(value, (list, tuple)) and any(isinstance(v, (list, tuple, str, torch.Tensor)) for v in value):
        per_sample = list(value)
    else:
        return [_resolve_one(config, value, has_router)] * batch_size
    if len(per_sample) != batch_size:
        raise ValueError(f"visor_configuration has {len(per_sample)} per-sample entries for a batch of {batch_size}")
    return [_resolve_one(config, v, has_router) for v in per_sample]


def _resolve_one(config: VisorConfig, value, has_router: bool):
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, str):
        if value == AUTO:
            return AUTO if has_router else tuple(config.default_layers())
        if value == "max":
            return tuple(config.self_attention_layers)
        raise ValueError(f"unknown visor_configuration {value!r}: use 'auto', 'max', an index or a list of SA layers")
    if isinstance(value, bool):
        raise TypeError("visor_configuration must not be a bool")
    if isinstance(value, numbers.Integral):
        value = int(value)  # numpy integers too
    if isinstance(value, int):
        if not 0 <= value < len(config.configurations):
            raise ValueError(f"unknown configuration index {value}: the model has {len(config.configurations)} configurations (0..{len(config.configurations) - 1})")
        return tuple(config.configurations[value])
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value):
            raise TypeError(f"a configuration given as a list must hold SA-layer indices (ints), got {value!r}")
        value = [int(v) for v in value]
        extra = sorted(set(value) - set(config.self_attention_layers))
        if extra:
            raise ValueError(f"layers {extra} are not SA layers of this model (self_attention_layers = {config.self_attention_layers})")
        return tuple(sorted(set(value)))
    raise TypeError(f"unsupported visor_configuration {value!r}")


# ----------------------------------------------------------------------------------------------------------------
# Models


class VisorPreTrainedModel(LlavaOnevisionPreTrainedModel):
    config_class = VisorConfig
    config: VisorConfig
    base_model_prefix = "model"
    _no_split_modules = ["Qwen2DecoderLayer", "SiglipEncoderLayer", "VisorCrossAttentionBlock"]
    _supports_flash_attn = False
    _supports_flex_attn = False
    _can_compile_fullgraph = False
    _can_record_outputs = {}

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, VisorConvPositionEmbedding):
            # starts as the identity, so a freshly added CA block sees exactly the visual states
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)


class VisorModel(VisorPreTrainedModel, LlavaOnevisionModel):
    """LLaVA-OneVision's vision tower, projector and LLM, plus VISOR's cross-attention blocks and router."""

    def __init__(self, config: VisorConfig):
        VisorPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaOnevisionMultiModalProjector(config)
        embed_std = 1 / config.text_config.hidden_size**0.5
        self.image_newline = nn.Parameter(torch.randn(config.text_config.hidden_size, dtype=self.dtype) * embed_std)
        self.vocab_size = config.text_config.vocab_size
        self.language_model = AutoModel.from_config(config.text_config)
        self.cross_attention_blocks = nn.ModuleDict(
            {str(layer): VisorCrossAttentionBlock(config, layer) for layer in config.cross_attention_layers}
        )
        self.router = VisorRouter(config) if config.router_layer is not None else None
        self.post_init()

    # -- visual features -----------------------------------------------------------------------------------------

    def _embed_visual(self, input_ids, inputs_embeds, pixel_values, image_sizes, pixel_values_videos, vision_kwargs):
        """Scatter image/video features into the embeddings; return the visual mask, an image id per token and the
        image and video features. Features come from the pixels or, as in LLaVA-OV, from `mm_encoder_outputs`
        (`{"image": ..., "video": ...}` outputs of `get_image_features` / `get_video_features`)."""
        visual_mask = torch.zeros(inputs_embeds.shape[:2], dtype=torch.bool, device=inputs_embeds.device)
        encoded = dict(vision_kwargs.get("encoded") or {})
        segment_lengths = []
        image_features = video_features = None
        segments = torch.full(visual_mask.shape, -1, dtype=torch.long, device=visual_mask.device)
        if encoded.get("image") is None and pixel_values is not None:
            encoded["image"] = self.get_image_features(pixel_values, image_sizes, return_dict=True, **vision_kwargs["image"])
        if encoded.get("image") is not None:
            features = encoded["image"].pooler_output
            segment_lengths += [f.shape[0] for f in features]
            image_features = torch.cat(features, dim=0).to(inputs_embeds.device, inputs_embeds.dtype)
            image_mask, _ = self.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, image_features=image_features)
            inputs_embeds = inputs_embeds.masked_scatter(image_mask, image_features)
            visual_mask |= image_mask[..., 0]
            # image k's features fill the image tokens in row-major order (masked_scatter): tag them with k
            segments[image_mask[..., 0]] = _segment_ids(segment_lengths, 0, segments.device)
        if encoded.get("video") is None and pixel_values_videos is not None:
            encoded["video"] = self.get_video_features(pixel_values_videos, return_dict=True, **vision_kwargs["video"])
        if encoded.get("video") is not None:
            video = encoded["video"].pooler_output
            video_features = video.flatten(0, 1).to(inputs_embeds.device, inputs_embeds.dtype)
            _, video_mask = self.get_placeholder_mask(input_ids, inputs_embeds=inputs_embeds, video_features=video_features)
            inputs_embeds = inputs_embeds.masked_scatter(video_mask, video_features)
            visual_mask |= video_mask[..., 0]
            # one segment per video (all its frames), numbered after the images
            segments[video_mask[..., 0]] = _segment_ids([video.shape[1]] * video.shape[0], len(segment_lengths), segments.device)
        if image_features is None and video_features is None and input_ids is not None:
            placeholders = (input_ids == self.config.image_token_id) | (input_ids == self.config.video_token_id)
            if placeholders.any():
                raise ValueError(
                    f"input_ids hold {int(placeholders.sum())} image/video placeholder tokens but no pixel_values were given"
                )
        return inputs_embeds, visual_mask, segments, image_features, video_features

    # -- routing ---------------------------------------------------------------------------------------------------

    def _routing_mask(self, input_ids, inputs_embeds) -> torch.Tensor | None:
        """`[B, T]` positions of the routing token: from `input_ids`, or (embeddings given) where the embedding is the
        routing token's own, as LLaVA-OV finds image placeholders in `inputs_embeds`. None without a router."""
        token_id = self.config.routing_token_id
        if self.router is None or token_id is None:
            return None
        if input_ids is not None:
            return input_ids == token_id
        return embedded_token_mask(self.get_input_embeddings(), inputs_embeds, [token_id])

    def _router_logits(self, text_states, text_routing, text_filled):
        """Router scores for every routing token in the text stream: (logits [N, C], sample index [N])."""
        if self.router is None or text_routing is None:
            return None, None
        is_routing = text_routing & text_filled
        batch_index = is_routing.nonzero()[:, 0]
        return self.router(text_states[is_routing]), batch_index

    def _route(self, router_logits, batch_index, batch_size, thresholds=None) -> list[int]:
        """Configuration index per sample (arg-max, or calibrated with per-sample `thresholds`): see
        `routing_visor.select_configurations`. -1 where a sample has no routing token."""
        return select_configurations(router_logits, batch_index, batch_size, self.config.configurations, thresholds)

    # -- forward ---------------------------------------------------------------------------------------------------

    @merge_with_config_defaults
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_sizes_videos: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        vision_aspect_ratio: str | None = None,
        batch_num_images: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        visor_configuration: ConfigurationRequest = None,
        output_hidden_states: bool | None = None,
        output_router_logits: bool | None = None,
        visor_router_threshold: float | list[float] | torch.Tensor | None = None,
        **kwargs,
    ) -> VisorModelOutputWithPast:
        r"""
        visor_configuration (`int`, `list[int]`, `str`, per-sample list or 1-D tensor, *optional*):
            Which SA layers run: see [`resolve_configuration_request`]. Read at prefill only; with a cache the
            decision taken at prefill holds for the whole generation.
        output_router_logits (`bool`, *optional*):
            Return the router's scores for every routing token even when no sample asks the router.
        visor_router_threshold (`float`, or one per sample, *optional*):
            Threshold of a calibrated router (default `config.router_threshold`); see `routing_visor.py`.
        """
        if (input_ids is None) ^ (inputs_embeds is not None):
            raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
        # LLaVA-OV's pre-encoded images/videos; taken from kwargs, not the signature, so that `generate` keeps
        # passing the pixels (it pre-encodes them only for models whose forward names `mm_encoder_outputs`)
        mm_encoder_outputs = kwargs.pop("mm_encoder_outputs", None)
        if (pixel_values is not None or pixel_values_videos is not None) and mm_encoder_outputs:
            raise ValueError("You cannot specify both pixel_values/pixel_values_videos and mm_encoder_outputs at the same time")
        if isinstance(attention_mask, dict) or (attention_mask is not None and attention_mask.dim() != 2):
            raise ValueError("VISOR builds its own masks: pass a 2D attention_mask (batch, sequence) or None")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        output_hidden_states = output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states

        if use_cache is None and past_key_values is not None:
            use_cache = True  # a cache passed in is used (and a filled one continues the generation)
        if use_cache is None:
            # as LLaVA-OV (its Qwen2 reads `text_config.use_cache`): return a cache unless activation checkpointing
            # is on in training, where the layers could not fill it
            use_cache = bool(getattr(self.config.text_config, "use_cache", True)) and not (
                self.training and self.is_activation_checkpointing
            )
        if past_key_values is not None and not isinstance(past_key_values, VisorCache):
            if past_key_values.get_seq_length() > 0:
                raise ValueError(f"VISOR needs a VisorCache; got a filled {type(past_key_values).__name__}")
            past_key_values = None
            use_cache = True
        if use_cache and past_key_values is None:
            past_key_values = VisorCache(config=self.config.text_config)
        cache = past_key_values if use_cache else None
        state = cache.visor_state if cache is not None else None

        if state is None:
            vision_kwargs = {
                "image": {
                    "vision_feature_layer": vision_feature_layer,
                    "vision_feature_select_strategy": vision_feature_select_strategy,
                    "batch_num_images": batch_num_images,
                },
                "video": {
                    "vision_feature_layer": vision_feature_layer,
                    "vision_feature_select_strategy": vision_feature_select_strategy,
                },
            }
            if vision_aspect_ratio is not None:
                vision_kwargs["image"]["vision_aspect_ratio"] = vision_aspect_ratio
            vision_kwargs["encoded"] = mm_encoder_outputs
            return self._prefill(
                input_ids, inputs_embeds, pixel_values, image_sizes, pixel_values_videos, vision_kwargs,
                attention_mask, position_ids, cache, visor_configuration, output_hidden_states, output_router_logits,
                kwargs, visor_router_threshold,
            )
        if pixel_values is not None or pixel_values_videos is not None or mm_encoder_outputs:
            raise ValueError("images must be given in the first forward (prefill); this cache already holds a prompt")
        return self._decode(inputs_embeds, attention_mask, position_ids, cache, output_hidden_states, kwargs)

    def _prefill(
        self, input_ids, inputs_embeds, pixel_values, image_sizes, pixel_values_videos, vision_kwargs,
        attention_mask, position_ids, cache, visor_configuration, output_hidden_states, output_router_logits, kwargs,
        visor_router_threshold=None,
    ) -> VisorModelOutputWithPast:
        config = self.config
        batch, length = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        inputs_embeds, visual_mask, segments, image_features, video_features = self._embed_visual(
            input_ids, inputs_embeds, pixel_values, image_sizes, pixel_values_videos, vision_kwargs
        )
        if position_ids is None:
            position_ids = torch.arange(length, device=device)[None]
        position_ids = position_ids.expand(batch, -1)
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(visual_mask)

        text_index, text_filled = compact_indices(~visual_mask)
        visual_index, visual_filled = compact_indices(visual_mask)
        has_visual = visual_index.shape[1] > 0
        text = gather_tokens(inputs_embeds, text_index)
        visual = gather_tokens(inputs_embeds, visual_index)
        text_valid = text_filled & gather_tokens(valid, text_index)
        text_positions = gather_tokens(position_ids, text_index)
        routing_mask = self._routing_mask(input_ids, inputs_embeds)
        text_routing = gather_tokens(routing_mask, text_index) if routing_mask is not None else None
        visual_segments = torch.where(visual_filled, gather_tokens(segments, visual_index), -1)

        requests = resolve_configuration_request(config, visor_configuration, batch, self.router is not None)
        thresholds = resolve_router_threshold(config, visor_router_threshold, requests, batch)
        num_layers = config.text_config.num_hidden_layers
        router_layer = config.router_layer if self.router is not None else None
        pending = [i for i, r in enumerate(requests) if r == AUTO]
        if pending:
            # until the router decides, an "auto" sample runs the SA layers that every configuration holds
            provisional = tuple(sorted(set.intersection(*(set(c) for c in config.configurations))))
            layer_sets = [provisional if r == AUTO else r for r in requests]
        else:
            layer_sets = list(requests)

        text_rotary = self.language_model.rotary_emb(text, text_positions)
        full_rotary = self.language_model.rotary_emb(inputs_embeds, position_ids) if has_visual else None
        text_mask = create_causal_mask(
            config=config.text_config, inputs_embeds=text, attention_mask=text_valid,
            past_key_values=cache, position_ids=text_positions, layer_idx=0,
        )
        full_masks = {}  # causal masks of the full sequence, built on first use (materialized or not)

        def full_mask(materialize: bool):
            if materialize not in full_masks:
                # built lazily, when earlier layers may already have filled the cache: size it on the prompt alone
                # (the cache is empty at prefill), not on what the cache holds by then
                full_masks[materialize] = create_causal_mask(
                    config=config.text_config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                    past_key_values=None, position_ids=position_ids, layer_idx=0, allow_is_causal_skip=not materialize,
                )
            return full_masks[materialize]

        cross_mask = has_key = None
        if has_visual and config.cross_attention_layers:
            # text token i sees visual token j only if j comes before i in the original sequence
            allowed = visual_filled[:, None, :] & (visual_index[:, None, :] < text_index[:, :, None])
            has_key = allowed.any(-1, keepdim=True)
            cross_mask = to_attention_mask(allowed | ~has_key, config.text_config._attn_implementation, text.dtype)
            has_key = has_key.to(text.dtype)

        state = VisorState(
            active=torch.zeros(batch, num_layers, dtype=torch.bool, device=device),
            layouts=[TEXT] * num_layers,
            text_valid=text_valid,
            full_valid=valid,
            full_visual=visual_mask,
            visual_valid=visual_filled,
            configurations=[],
            configuration_index=torch.full((batch,), -1, dtype=torch.long, device=device),
            seq_length=length,
        )
        router_logits = routing_batch_index = None
        hidden_states_out = () if output_hidden_states else None
        if output_hidden_states:
            hidden_states_out += (inputs_embeds,)
        output_attentions = kwargs.pop("output_attentions", None)
        if output_attentions is None:
            output_attentions = getattr(config, "output_attentions", False)

        attentions_out = () if output_attentions else None
        with capture_attentions(self.language_model.layers[:num_layers], output_attentions) as captured:
            for layer_idx, decoder_layer in enumerate(self.language_model.layers[:num_layers]):
                block = self.cross_attention_blocks[str(layer_idx)] if str(layer_idx) in self.cross_attention_blocks else None
                if block is not None and cross_mask is not None:
                    key_states, value_states = block.visual_key_values(visual, visual_segments)
                    state.cross_kv[layer_idx] = (key_states, value_states)
                    text = block(text, key_states, value_states, cross_mask, has_key)

                runs = [layer_idx in layers for layers in layer_sets]
                if has_visual and any(runs):
                    state.layouts[layer_idx] = FULL
                    merged = merge_streams(text, text_index, visual, visual_index, length)
                    if all(runs):
                        mask = full_mask(materialize=False)
                    else:
                        inactive = torch.tensor([not r for r in runs], device=device)
                        mask = block_keys(full_mask(materialize=True), visual_mask & inactive[:, None])
                    merged = decoder_layer(
                        merged, attention_mask=mask, position_embeddings=full_rotary, position_ids=position_ids,
                        past_key_values=cache, use_cache=cache is not None, **kwargs,
                    )
                    text = gather_tokens(merged, text_index)
                    updated = gather_tokens(merged, visual_index)
                    if all(runs):
                        visual = updated
                    else:
                        visual = torch.where(~inactive[:, None, None], updated, visual)
                else:
                    text = decoder_layer(
                        text, attention_mask=text_mask, position_embeddings=text_rotary, position_ids=text_positions,
                        past_key_values=cache, use_cache=cache is not None, **kwargs,
                    )
                if output_hidden_states:
                    hidden_states_out += (merge_streams(text, text_index, visual, visual_index, length),)
                if output_attentions:
                    weights = captured.pop() if captured else None
                    if weights is not None and state.layouts[layer_idx] == TEXT:
                        weights = scatter_attention(weights, text_index, length)
                    attentions_out += (weights,)

                if layer_idx == router_layer and (pending or output_router_logits):
                    router_logits, routing_batch_index = self._router_logits(text, text_routing, text_filled)
                    if pending:
                        chosen = self._route(router_logits, routing_batch_index, batch, thresholds)
                        fallback = tuple(config.default_layers())
                        for i in pending:
                            layer_sets[i] = tuple(config.configurations[chosen[i]]) if chosen[i] >= 0 else fallback
                        pending = []

        if pending:  # the router never ran (no router layer reached): fall back to the default configuration
            for i in pending:
                layer_sets[i] = tuple(config.default_layers())
        self._record_configurations(state, layer_sets)
        hidden = merge_streams(text, text_index, visual, visual_index, length) if has_visual else text
        if not has_visual and text.shape[1] != length:
            hidden = merge_streams(text, text_index, visual, visual_index, length)
        hidden = self.language_model.norm(hidden)
        if output_hidden_states:
            # as transformers' language models: the last entry is the final-normed output (`last_hidden_state`)
            hidden_states_out = hidden_states_out[:-1] + (hidden,)
        if cache is not None:
            cache.visor_state = state
        return VisorModelOutputWithPast(
            last_hidden_state=hidden,
            past_key_values=cache,
            hidden_states=hidden_states_out,
            attentions=attentions_out,
            image_hidden_states=image_features,
            video_hidden_states=video_features,
            router_logits=router_logits,
            routing_token_batch_index=routing_batch_index,
            visor_configurations=state.configurations,
            configuration_index=state.configuration_index,
        )

    def _record_configurations(self, state: VisorState, layer_sets) -> None:
        known = {tuple(c): i for i, c in enumerate(self.config.configurations)}
        state.configurations = [tuple(s) for s in layer_sets]
        rows = [[layer in s for layer in range(state.active.shape[1])] for s in layer_sets]
        device = state.active.device
        state.active = torch.tensor(rows, dtype=torch.bool, device=device).reshape(state.active.shape)
        state.configuration_index = torch.tensor([known.get(tuple(s), -1) for s in layer_sets], device=device)

    def _decode(self, inputs_embeds, attention_mask, position_ids, cache, output_hidden_states, kwargs):
        """A step after prefill: every new token is text, whatever its id."""
        state = cache.visor_state
        batch, new = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        if position_ids is None:
            position_ids = torch.arange(state.seq_length, state.seq_length + new, device=device)[None]
        position_ids = position_ids.expand(batch, -1)
        if attention_mask is not None:
            if attention_mask.shape[1] != state.seq_length + new:
                raise ValueError(
                    f"attention_mask covers {attention_mask.shape[1]} tokens; the cache holds {state.seq_length} and "
                    f"{new} are new: pass the mask of the whole sequence"
                )
            new_valid = attention_mask[:, -new:].bool()
        else:
            new_valid = torch.ones(batch, new, dtype=torch.bool, device=device)
        state.text_valid = torch.cat([state.text_valid, new_valid], dim=1)
        state.full_valid = torch.cat([state.full_valid, new_valid], dim=1)
        state.full_visual = torch.cat([state.full_visual, torch.zeros_like(new_valid)], dim=1)
        state.seq_length += new

        text = inputs_embeds
        rotary = self.language_model.rotary_emb(text, position_ids)
        layouts = state.layouts
        masks = {}
        for layout in set(layouts):
            layer = layouts.index(layout)
            masks[layout] = create_causal_mask(
                config=self.config.text_config, inputs_embeds=text,
                attention_mask=state.full_valid if layout == FULL else state.text_valid,
                past_key_values=cache, position_ids=position_ids, layer_idx=layer,
                # no SDPA "is causal" shortcut: checking whether it applies costs a host sync at every step
                allow_is_causal_skip=False,
            )
        cross_mask = has_key = None
        if state.cross_kv:
            allowed = state.visual_valid[:, None, :].expand(-1, new, -1)
            has_key = allowed.any(-1, keepdim=True)
            cross_mask = to_attention_mask(allowed | ~has_key, self.config.text_config._attn_implementation, text.dtype)
            has_key = has_key.to(text.dtype)
        hidden_states_out = (text,) if output_hidden_states else None

        for layer_idx, decoder_layer in enumerate(self.language_model.layers[: len(layouts)]):
            if layer_idx in state.cross_kv:
                key_states, value_states = state.cross_kv[layer_idx]
                text = self.cross_attention_blocks[str(layer_idx)](text, key_states, value_states, cross_mask, has_key)
            mask = masks[layouts[layer_idx]]
            if layouts[layer_idx] == FULL:
                # samples for which this layer is off must not see the visual keys it cached
                mask = block_keys(mask, state.full_visual & ~state.active[:, layer_idx : layer_idx + 1])
            text = decoder_layer(
                text, attention_mask=mask, position_embeddings=rotary, position_ids=position_ids,
                past_key_values=cache, use_cache=True, **kwargs,
            )
            if output_hidden_states:
                hidden_states_out += (text,)
        hidden = self.language_model.norm(text)
        if output_hidden_states:
            # as at prefill and in transformers' language models: the last entry is `last_hidden_state`
            hidden_states_out = hidden_states_out[:-1] + (hidden,)
        return VisorModelOutputWithPast(
            last_hidden_state=hidden,
            past_key_values=cache,
            hidden_states=hidden_states_out,
            visor_configurations=state.configurations,
            configuration_index=state.configuration_index,
        )


# inputs of `generate` that a draft model (assisted decoding) receives only if its forward takes them
_TARGET_ONLY_GENERATE_KWARGS = (
    "visor_configuration", "visor_budget", "visor_router_threshold", "pixel_values", "image_sizes", "pixel_values_videos", "image_sizes_videos",
    "batch_num_images", "vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio",
)


class VisorForConditionalGeneration(VisorPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: VisorConfig):
        super().__init__(config)
        self.model = VisorModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head

    def get_image_features(self, pixel_values, image_sizes, **kwargs):
        return self.model.get_image_features(pixel_values=pixel_values, image_sizes=image_sizes, **kwargs)

    def get_video_features(self, pixel_values_videos, **kwargs):
        return self.model.get_video_features(pixel_values_videos, **kwargs)

    def pack_image_features(self, image_features, image_sizes, vision_feature_select_strategy, image_newline=None):
        return self.model.pack_image_features(image_features, image_sizes, vision_feature_select_strategy, image_newline)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        image_sizes_videos: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        vision_aspect_ratio: str | None = None,
        batch_num_images: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        visor_configuration: ConfigurationRequest = None,
        output_router_logits: bool | None = None,
        visor_budget: float | list[float] | torch.Tensor | None = None,
        visor_router_threshold: float | list[float] | torch.Tensor | None = None,
        **kwargs,
    ) -> VisorCausalLMOutputWithPast:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*):
            Next-token labels as LLaVA-OneVision takes them (`-100` is ignored).
        visor_configuration:
            Which SA layers run (index, list of layers, `"max"`, `"auto"`, or one entry per sample).
        visor_budget (`float`, or one per sample, *optional*):
            Compute budget as a fraction of the dense LLaVA-OV prefill FLOPs of each sample: each sample runs the
            most expensive configuration of `config.configurations` within it (see `flops_visor.select_by_budget`).
            Replaces the router; read at prefill only.
        visor_router_threshold (`float`, or one per sample, *optional*):
            Threshold of a calibrated router (`config.router_type="calibrated"`; default `config.router_threshold`):
            each sample runs the cheapest configuration whose predicted probability of keeping the maximal
            configuration's answer is at least this, else the maximal one. Read at prefill only.
        """
        prefill = not (isinstance(past_key_values, VisorCache) and past_key_values.visor_state is not None)
        # token counts for the FLOPs report (skipped in training: it costs a host sync per step) and the budget
        wants_counts = prefill and (visor_budget is not None or not self.training)
        counts = self._prompt_token_counts(input_ids, attention_mask, inputs_embeds) if wants_counts else None
        if prefill and visor_budget is not None:
            visor_configuration = self._budget_request(visor_budget, visor_configuration, counts)
        outputs = self.model(
            input_ids=input_ids,
            pixel_values=pixel_values,
            image_sizes=image_sizes,
            pixel_values_videos=pixel_values_videos,
            image_sizes_videos=image_sizes_videos,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            vision_aspect_ratio=vision_aspect_ratio,
            batch_num_images=batch_num_images,
            use_cache=use_cache,
            visor_configuration=visor_configuration,
            output_router_logits=output_router_logits,
            visor_router_threshold=visor_router_threshold,
            **kwargs,
        )
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs)
        flops = self._forward_flops(outputs, prefill, counts, hidden_states.shape[1], logits_to_keep)
        return VisorCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_hidden_states=outputs.image_hidden_states,
            video_hidden_states=outputs.video_hidden_states,
            router_logits=outputs.router_logits,
            routing_token_batch_index=outputs.routing_token_batch_index,
            visor_configurations=outputs.visor_configurations,
            configuration_index=outputs.configuration_index,
            flops=flops,
        )

    # -- FLOPs accounting and compute budget (see flops_visor.py) ---------------------------------------------------

    last_visor_report: VisorFlopsReport | None = None
    _visor_generation_cache = None

    def _prompt_token_counts(
        self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None, inputs_embeds: torch.Tensor | None = None
    ) -> tuple[list[int], list[int]] | None:
        """Real text and visual tokens of each prompt (one host sync, at prefill only). Placeholders are found in
        `input_ids`, or in `inputs_embeds` as LLaVA-OV finds them (the image/video token's own embedding); None
        without either."""
        if input_ids is not None:
            visual = (input_ids == self.config.image_token_id) | (input_ids == self.config.video_token_id)
        elif inputs_embeds is not None:
            placeholders = [self.config.image_token_id, self.config.video_token_id]
            visual = embedded_token_mask(self.get_input_embeddings(), inputs_embeds, placeholders)
        else:
            return None
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(visual)
        counts = torch.stack([(valid & ~visual).sum(1), (valid & visual).sum(1)]).tolist()
        return counts[0], counts[1]

    def _budget_request(self, budget, request, counts) -> list[tuple[int, ...]]:
        """The SA layers a compute budget picks for each sample: one tuple per sample, so that the result always reads
        as a per-sample request (a plain list of indices would read as one layer set for the whole batch)."""
        if request is not None and not (isinstance(request, str) and request == AUTO):
            raise ValueError("pass either visor_configuration or visor_budget, not both")
        if counts is None:
            raise ValueError("visor_budget needs input_ids or inputs_embeds (to count the text and visual tokens of each sample)")
        batch = len(counts[0])
        if isinstance(budget, torch.Tensor):
            budget = budget.tolist()
        budgets = list(budget) if isinstance(budget, (list, tuple)) else [budget] * batch
        if len(budgets) != batch:
            raise ValueError(f"visor_budget has {len(budgets)} entries for a batch of {batch}")
        return [
            _resolve_one(self.config, select_by_budget(self.config, b, t, v), has_router=False)
            for b, t, v in zip(budgets, *counts)
        ]

    def _forward_flops(self, outputs, prefill, counts, kept_positions, logits_to_keep):
        cache = outputs.past_key_values
        state = cache.visor_state if isinstance(cache, VisorCache) else None
        configurations = outputs.visor_configurations
        if configurations is None or self.training:
            return None
        shape = FlopsShape.from_config(self.config)
        cross = self.config.cross_attention_layers
        if prefill:
            if counts is None and state is not None:
                visual = state.full_valid & state.full_visual
                counts = tuple(torch.stack([state.text_valid.sum(1), visual.sum(1)]).tolist())
            if counts is None:
                return None
            if state is not None:
                state.prompt_text, state.prompt_visual = list(counts[0]), list(counts[1])
                state.prompt_length = state.seq_length
            flops = []
            for layers, n_text, n_visual in zip(configurations, *counts):
                # the LM head runs on the positions whose logits are kept (padding excluded)
                head = n_text + n_visual
                if not isinstance(logits_to_keep, int) or logits_to_keep > 0:
                    head = min(head, kept_positions)
                flops.append(prefill_flops(shape, n_text, n_visual, layers, cross, lm_head_tokens=head))
            return torch.tensor(flops, dtype=torch.long)
        if state is None or not state.prompt_text:
            return None
        if not state.decode_base:
            for layers, n_text, n_visual in zip(state.configurations, state.prompt_text, state.prompt_visual):
                base = decode_flops(shape, n_text, n_visual, layers, cross)
                state.decode_base.append(base)
                state.decode_increment.append(decode_flops(shape, n_text + 1, n_visual, layers, cross) - base)
        new = outputs.last_hidden_state.shape[1]
        before = state.decode_steps - new
        steps = sum(before + j for j in range(new))
        return torch.tensor([new * b + steps * i for b, i in zip(state.decode_base, state.decode_increment)], dtype=torch.long)

    def visor_flops(self, n_text: int, n_visual: int, visor_configuration="max", decode_context: int = 0) -> dict:
        """Analytical LLM FLOPs of one sample with `n_text` text and `n_visual` visual tokens.

        Returns `prefill`, `decode_step` (one new token after the prompt and `decode_context` generated tokens) and
        the same for dense LLaVA-OV (`dense_prefill`, `dense_decode_step`). `visor_configuration`: index, layer list
        or `"max"`. The vision tower is apart: `flops_visor.vision_flops(model.config, num_crops)`.
        """
        layers = _resolve_one(self.config, visor_configuration, has_router=False)
        shape = FlopsShape.from_config(self.config)
        cross = self.config.cross_attention_layers
        context = n_text + decode_context
        return {
            "configuration": layers,
            "prefill": prefill_flops(shape, n_text, n_visual, layers, cross),
            "decode_step": decode_flops(shape, context, n_visual, layers, cross),
            "dense_prefill": prefill_flops(shape, n_text, n_visual),
            "dense_decode_step": decode_flops(shape, context, n_visual),
        }

    def generate(self, *args, **kwargs) -> torch.LongTensor | ModelOutput:
        """`GenerationMixin.generate`, plus the per-sample VISOR report.

        After the call, `model.last_visor_report` (and `output.visor_report` when `return_dict_in_generate=True`)
        is a `VisorFlopsReport`: configuration and analytical FLOPs (prefill, every decoding step, dense reference)
        of each returned sequence. None when generating without a cache.
        """
        self.last_visor_report = None
        self._visor_generation_cache = None
        prompt = next(
            (p for p in (kwargs.get("input_ids"), kwargs.get("inputs"), args[0] if args else None, kwargs.get("inputs_embeds")) if p is not None),
            None,
        )
        cache_in = kwargs.get("past_key_values")
        continuing = isinstance(cache_in, VisorCache) and cache_in.visor_state is not None
        if kwargs.get("visor_budget") is not None and not continuing and isinstance(prompt, torch.Tensor):
            # decide once, on the prompt: without a cache every step re-runs the prefill on a longer text, whose
            # budget could pick another configuration (or none) halfway through the answer
            embeds = prompt.is_floating_point()
            counts = self._prompt_token_counts(None if embeds else prompt, kwargs.get("attention_mask"), prompt if embeds else None)
            kwargs["visor_configuration"] = self._budget_request(kwargs.pop("visor_budget"), kwargs.get("visor_configuration"), counts)
        try:
            output = super().generate(*args, **kwargs)
            cache = self._visor_generation_cache
        finally:
            self._visor_generation_cache = None
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        report = self._generation_report(cache, prompt.shape[0] if prompt is not None else None, sequences.shape[0])
        self.last_visor_report = report
        if isinstance(output, ModelOutput):
            output["visor_report"] = report
            if report is not None:  # the names the forward output uses, for the returned sequences
                output["visor_configurations"] = list(report.configurations)
                output["configuration_index"] = torch.tensor(report.configuration_index, dtype=torch.long)
        return output

    def _expand_images_per_sample(self, expand_size, input_ids, model_kwargs) -> dict:
        """Expand `pixel_values`/`image_sizes` sample by sample (all images of a sample, then again for each copy).

        `generate` repeats every tensor row by row, which is right only with one image per sample: with several, the
        copies of a sample would get the images in the wrong order. Images per sample come from `batch_num_images`
        (when it has one entry per sample), else from the runs of image tokens in `input_ids`, else (adjacent images,
        as LLaVA-OV's chat template puts them, form one run) by matching each sample's image tokens with the images'
        feature lengths. Pops and returns the expanded tensors (empty: nothing to do).
        """
        pixel_values = model_kwargs.get("pixel_values")
        if expand_size <= 1 or not isinstance(pixel_values, torch.Tensor):
            return {}
        embeds = model_kwargs.get("inputs_embeds")
        if input_ids is not None and input_ids.shape[1] > 0:
            image = input_ids == self.config.image_token_id
        elif isinstance(embeds, torch.Tensor):  # placeholders found as LLaVA-OV finds them in embeddings
            image = embedded_token_mask(self.get_input_embeddings(), embeds, [self.config.image_token_id])
        else:
            return {}
        images, batch = pixel_values.shape[0], image.shape[0]
        counts = model_kwargs.get("batch_num_images")
        if counts is not None:
            counts = torch.as_tensor(counts).flatten().tolist()
        if counts is None or len(counts) != batch or sum(counts) != images:
            starts = image & ~nn.functional.pad(image[:, :-1], (1, 0), value=False)
            counts = starts.sum(1).tolist()  # once per generate call
            if sum(counts) != images:
                counts = self._images_per_sample(pixel_values, image.sum(1).tolist(), model_kwargs)
        if all(c == 1 for c in counts):
            return {}
        first = [sum(counts[:i]) for i in range(len(counts))]
        order = [first[i] + k for i, c in enumerate(counts) for _ in range(expand_size) for k in range(c)]
        order = torch.tensor(order, device=pixel_values.device)
        expanded = {"pixel_values": model_kwargs.pop("pixel_values").index_select(0, order)}
        if isinstance(model_kwargs.get("image_sizes"), torch.Tensor):
            sizes = model_kwargs.pop("image_sizes")
            expanded["image_sizes"] = sizes.index_select(0, order.to(sizes.device))
        return expanded

    def _images_per_sample(self, pixel_values, image_tokens: list[int], model_kwargs) -> list[int]:
        """Images of each sample, from the feature length of every image (one extra vision pass, only for
        adjacent images without `batch_num_images`): images fill the samples' image tokens in order."""
        options = ("vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio", "batch_num_images")
        with torch.no_grad():
            features = self.model.get_image_features(
                pixel_values, model_kwargs.get("image_sizes"), return_dict=True,
                **{key: model_kwargs[key] for key in options if model_kwargs.get(key) is not None},
            ).pooler_output
        lengths = [f.shape[0] for f in features]
        counts, next_image = [], 0
        for tokens in image_tokens:
            taken, first = 0, next_image
            while taken < tokens and next_image < len(lengths):
                taken += lengths[next_image]
                next_image += 1
            if taken != tokens:
                raise ValueError(
                    f"the images' features ({lengths} tokens each) do not fill the samples' image tokens "
                    f"({image_tokens} per sample)"
                )
            counts.append(next_image - first)
        if next_image != len(lengths):
            raise ValueError(f"{len(lengths)} images were given for {next_image} images' worth of image tokens ({image_tokens} per sample)")
        return counts

    def _generation_report(self, cache, prompts: int | None, rows: int) -> VisorFlopsReport | None:
        state = cache.visor_state if isinstance(cache, VisorCache) else None
        if state is None or not state.prompt_text:
            return None
        held = len(state.configurations)
        if held == rows or not prompts or held % prompts or rows % prompts:
            index = list(range(min(held, rows)))
        else:  # beam search: `held` beams per prompt, `rows` returned sequences per prompt
            index = [(r // (rows // prompts)) * (held // prompts) for r in range(rows)]
        shape = FlopsShape.from_config(self.config)
        cross = self.config.cross_attention_layers
        known = {tuple(c): i for i, c in enumerate(self.config.configurations)}
        steps = state.decode_steps
        report = VisorFlopsReport([], [], [], [], [], [], [], [])
        for i in index:
            layers, n_text, n_visual = state.configurations[i], state.prompt_text[i], state.prompt_visual[i]
            report.configurations.append(tuple(layers))
            report.configuration_index.append(known.get(tuple(layers), -1))
            report.num_text_tokens.append(n_text)
            report.num_visual_tokens.append(n_visual)
            report.prefill_flops.append(prefill_flops(shape, n_text, n_visual, layers, cross))
            report.dense_prefill_flops.append(prefill_flops(shape, n_text, n_visual))
            report.decode_flops.append([decode_flops(shape, n_text + k, n_visual, layers, cross) for k in range(steps)])
            report.dense_decode_flops.append([decode_flops(shape, n_text + k, n_visual) for k in range(steps)])
        return report

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("past_key_values")
        if cache is not None and not isinstance(cache, VisorCache) and cache.get_seq_length() == 0:
            model_kwargs["past_key_values"] = VisorCache(config=self.config.text_config)
        # kept for the report that `generate` builds when it returns (dropped right after)
        self._visor_generation_cache = model_kwargs.get("past_key_values")

    def _get_candidate_generator(self, *args, **kwargs):
        generator = super()._get_candidate_generator(*args, **kwargs)
        assistant = kwargs.get("assistant_model")
        assistant_kwargs = getattr(generator, "assistant_kwargs", None)
        if assistant is not None and isinstance(assistant_kwargs, dict):
            # the draft gets copies of the target's inputs: drop those it does not take (VISOR's configuration
            # request; the images for a text-only draft, as LLaVA-OV's generate, which pre-encodes them, does)
            accepted = set(inspect.signature(assistant.forward).parameters)
            for key in _TARGET_ONLY_GENERATE_KWARGS:
                if key not in accepted:
                    assistant_kwargs.pop(key, None)
        return generator

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        images = self._expand_images_per_sample(expand_size, input_ids, model_kwargs)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        model_kwargs.update(images)
        request = model_kwargs.get("visor_configuration")
        if expand_size > 1 and isinstance(request, (list, tuple)) and any(
            isinstance(v, (list, tuple, str, torch.Tensor)) for v in request
        ):
            # a per-sample request follows its sample into the beams / returned sequences
            model_kwargs["visor_configuration"] = [v for v in request for _ in range(expand_size)]
        for name in ("visor_budget", "visor_router_threshold"):  # per-sample lists follow their sample (tensors are
            value = model_kwargs.get(name)  # expanded row by row by `generate` itself)
            if expand_size > 1 and isinstance(value, (list, tuple)):
                model_kwargs[name] = [v for v in value for _ in range(expand_size)]
        return input_ids, model_kwargs


__all__ = [
    "VisorPreTrainedModel",
    "VisorModel",
    "VisorForConditionalGeneration",
    "VisorModelOutputWithPast",
    "VisorCausalLMOutputWithPast",
]

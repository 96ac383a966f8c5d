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

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, PreTrainedConfig
from transformers.cache_utils import Cache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, slice_logits_to_keep
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionModel,
    LlavaOnevisionMultiModalProjector,
    LlavaOnevisionPreTrainedModel,
)
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm, eager_attention_forward
from transformers.utils.generic import can_return_tuple, merge_with_config_defaults

from .arguments_visor import check_forward_kwargs
from .backbone_visor import LlavaOnevisionBackbone
from .cache_visor import TEXT, VisorCache, VisorStaticCache
from .configuration_visor import VisorConfig
from .generation_visor import VisorGenerationMixin
from .grouping_visor import PrefillInputs, check_visor_batching, choose_groups, grouped_prefill
from .hub_visor import VisorHubMixin
from .masks_visor import (
    check_attention_implementation,
    cross_attention_mask_function,
    decoding_cross_attention_mask_function,
    padding_without_sync,
)
from .outputs_visor import OutputCapture, VisorCausalLMOutputWithPast, VisorModelOutputWithPast, capture_attentions
from .packing_visor import VisorTokenPacking, max_packing_sides
from .plan_visor import CrossAttentionInputs, VisorLayerPlan, VisorStreams, run_layer
from .report_visor import budget_request, decode_flops_per_sample, prefill_flops_per_sample, single_sample_flops
from .requests_visor import AUTO, ConfigurationRequest, resolve_configuration_request
from .routing_visor import resolve_router_threshold, select_configurations
from .streams_visor import compact_indices, embedded_token_mask, gather_tokens

# ----------------------------------------------------------------------------------------------------------------
# Modules


CONV_CHUNK = 512  # tokens per chunk of the tap-by-tap convolution on CPU (a chunk and its taps stay in cache)


def conv_position_sum(visual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """`v + Conv1d(v)` over the tokens of `visual` ([B, N, d]), the depth-wise convolution being
    `nn.Conv1d(d, d, k, padding=k // 2, groups=d)` with `weight` [d, 1, k] and `bias` [d].

    Without autograd, tap by tap in the `[B, N, d]` layout (bias, then one multiply-add per tap in tap order, as the
    library's kernel sums them, then `v`: the same values), in chunks of tokens on CPU: `conv1d` wants `[B, d, N]`,
    and the transposed copy and the channels-first kernel cost several times the work itself at thousands of
    tokens. With autograd (training), `conv1d` itself.
    """
    hidden, _, kernel = weight.shape
    half = kernel // 2
    if torch.is_grad_enabled() and (visual.requires_grad or weight.requires_grad or bias.requires_grad):
        conv = nn.functional.conv1d(visual.transpose(1, 2), weight, bias, padding=half, groups=hidden)
        return visual + conv.transpose(1, 2)
    batch, length, _ = visual.shape
    accumulate = torch.promote_types(visual.dtype, torch.float32)  # half-precision inputs sum in float32, as conv1d
    taps = weight[:, 0, :].t().to(accumulate).contiguous()  # [k, d]; contiguous rows: vectorised multiply-adds
    out = torch.empty_like(visual)
    chunk = CONV_CHUNK if visual.device.type == "cpu" else max(length, 1)
    # one chunk-sized accumulator reused by every chunk: a full-size one costs a pass of fresh pages (page faults)
    conv = torch.empty(batch, min(chunk, length), hidden, dtype=accumulate, device=visual.device)
    for start in range(0, length, chunk):
        end = min(start + chunk, length)
        acc = conv[:, : end - start]
        acc.copy_(bias.expand(batch, end - start, hidden))
        for k in range(kernel):
            # token i reads token i + k - half; a tap that reads the zero padding adds nothing and is skipped
            low, high = max(start, half - k), min(end, length + half - k)
            if low < high:
                acc[:, low - start : high - start].addcmul_(visual[:, low + k - half : high + k - half], taps[k])
        torch.add(visual[:, start:end], acc.to(visual.dtype), out=out[:, start:end])
    return out


def by_token_chunks(module: Callable[[torch.Tensor], torch.Tensor], states: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """`module(states)` for a module that acts on each token alone (a norm), in chunks of tokens on CPU without
    autograd: a chunk stays in cache through the module's several element-wise passes (the same values).

    `in_place=True` (for a `states` the caller owns and no longer needs) writes each chunk's result over its input
    when shape and dtype allow: no fresh full-size output, whose first writes cost a page fault per page.
    """
    length = states.shape[1]
    if states.device.type != "cpu" or torch.is_grad_enabled() or length <= CONV_CHUNK:
        return module(states)
    first = module(states[:, :CONV_CHUNK])
    if in_place and first.dtype == states.dtype and first.shape[-1] == states.shape[-1] and states.is_contiguous():
        out = states
    else:
        out = first.new_empty(*states.shape[:-1], first.shape[-1])
    out[:, :CONV_CHUNK] = first
    for start in range(CONV_CHUNK, length, CONV_CHUNK):
        out[:, start : start + CONV_CHUNK] = module(states[:, start : start + CONV_CHUNK])
    return out


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

        One depth-wise convolution over the whole stream (`conv_position_sum`), then the few taps that crossed an image
        boundary or touched an empty slot are taken back (masking every tap per image cost 2.5-4x more at 7k visual
        tokens).
        """
        half = self.weight.shape[-1] // 2
        weight = self.weight.to(visual.dtype)
        out = conv_position_sum(visual, weight, self.bias.to(visual.dtype))
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
        # eager, sdpa or flex attention (the model refuses any other): the mask is the implementation's own
        interface = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, eager_attention_forward)
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
        # the position embedding's output is a fresh tensor used only here: the norm may overwrite it
        positioned = self.position_embedding(visual, segments)
        return self.cross_attn.project_visual(by_token_chunks(self.visual_layernorm, positioned, in_place=True))

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


@dataclass
class RouterInputs:
    """What the router step of a prefill reads (the routing tokens of the text stream) and what it returns."""

    text_routing: torch.Tensor | None  # [B, N_text] slots holding the routing token (None: no router / no token id)
    text_valid: torch.Tensor  # [B, N_text] slots holding a real token (not fill, not hidden by the attention mask)
    always: bool  # score the routing tokens even when no sample asks the router (`output_router_logits`)
    thresholds: list[float] | None = None  # per sample, for a calibrated router (None: the paper's arg-max)
    logits: torch.Tensor | None = None
    batch_index: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------------------------
# Models

# the FLOPs of a decoding step, computed from host-side counts, run eagerly even inside a compiled forward
decode_flops_outside_graph = torch.compiler.disable(decode_flops_per_sample)


@torch.no_grad()
def init_visor_module(module: nn.Module) -> None:
    """VISOR's own initialisation, after the backbone's: a conv position embedding starts as the identity, so a
    freshly added CA block sees exactly the visual states."""
    if isinstance(module, VisorConvPositionEmbedding):
        nn.init.zeros_(module.weight)
        nn.init.zeros_(module.bias)
    if isinstance(module, VisorTokenPacking):  # an untrained packing module is average pooling
        module.reset_to_average()


def check_visor_inputs(input_ids, inputs_embeds, has_pixels: bool, mm_encoder_outputs, attention_mask) -> None:
    """The input checks every VISOR forward makes before it runs (any backbone)."""
    if (input_ids is None) ^ (inputs_embeds is not None):
        raise ValueError("You must specify exactly one of input_ids or inputs_embeds")
    if has_pixels and mm_encoder_outputs:
        raise ValueError("You cannot specify both pixel_values/pixel_values_videos and mm_encoder_outputs at the same time")
    if isinstance(attention_mask, dict) or (attention_mask is not None and attention_mask.dim() != 2):
        raise ValueError("VISOR builds its own masks: pass a 2D attention_mask (batch, sequence) or None")


class VisorPreTrainedMixin:
    """What every VISOR `*PreTrainedModel` adds to its backbone's (placed before it): eager, sdpa and flex attention
    only, no flash attention or kernels and no full-graph compilation (the masks of the text-only and cross-attention
    passes are arbitrary), VISOR's init."""

    base_model_prefix = "model"
    _supports_flash_attn = False
    _supports_flex_attn = True
    _can_compile_fullgraph = False
    _can_record_outputs = {}

    def _check_and_adjust_attn_implementation(self, attn_implementation, is_init_check=False, allow_all_kernels=False):
        # before transformers' checks: they would fail on a missing flash-attn package or load a hub kernel instead
        check_attention_implementation(attn_implementation, type(self).__name__, flex=self._supports_flex_attn)
        return super()._check_and_adjust_attn_implementation(attn_implementation, is_init_check, allow_all_kernels)

    @classmethod
    def is_custom_code(cls) -> bool:
        # `_init_weights` below only uses init functions that transformers guards (they skip loaded parameters), as
        # the library's own models do; transformers' shortcut for other custom code would initialise missing weights
        # of the sub-models (the SigLIP tower) differently from `__init__`
        return False

    def add_visor_modules(self, config) -> None:
        """What VISOR adds to any backbone: a cross-attention block per CA layer and the router (when it has a layer)."""
        self.cross_attention_blocks = nn.ModuleDict(
            {str(layer): VisorCrossAttentionBlock(config, layer) for layer in config.cross_attention_layers}
        )
        self.router = VisorRouter(config) if config.router_layer is not None else None

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        init_visor_module(module)


class VisorPreTrainedModel(VisorHubMixin, VisorPreTrainedMixin, LlavaOnevisionPreTrainedModel):
    config_class = VisorConfig
    config: VisorConfig
    _no_split_modules = ["Qwen2DecoderLayer", "SiglipEncoderLayer", "VisorCrossAttentionBlock"]


class VisorModel(VisorPreTrainedModel, LlavaOnevisionBackbone, LlavaOnevisionModel):
    """LLaVA-OneVision's vision tower, projector and LLM, plus VISOR's cross-attention blocks and router."""

    def __init__(self, config: VisorConfig):
        VisorPreTrainedModel.__init__(self, config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.multi_modal_projector = LlavaOnevisionMultiModalProjector(config)
        embed_std = 1 / config.text_config.hidden_size**0.5
        self.image_newline = nn.Parameter(torch.randn(config.text_config.hidden_size, dtype=self.dtype) * embed_std)
        self.vocab_size = config.text_config.vocab_size
        self.language_model = AutoModel.from_config(config.text_config)
        self.add_visor_modules(config)
        self.token_packing = None
        if config.packing_factors:
            sides = max_packing_sides(config) if config.packing_positions else (None, None)
            self.token_packing = VisorTokenPacking(config.text_config.hidden_size, config.packing_factors, *sides)
        self.post_init()

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

    def _router_logits(self, text_states, text_routing, text_valid):
        """Router scores for every routing token in the text stream: (logits [N, C], sample index [N])."""
        if self.router is None or text_routing is None:
            return None, None
        is_routing = text_routing & text_valid
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
        visor_batching: str | None = None,
        visor_packing: int | list[int] | torch.Tensor | None = None,
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
        visor_batching (`str`, *optional*):
            How a prefill whose samples run different SA layers runs: `"grouped"` (one pass per configuration, caches
            merged), `"masked"` (one pass, visual keys hidden where a sample skips a layer) or `"auto"` (default:
            grouped when it saves enough FLOPs); see `grouping_visor.py`. Same results either way.
        visor_packing (`int`, or one per sample as a list or 1-D tensor, *optional*):
            Token packing factor of each sample's images (1, or a factor of `config.packing_factors`); the prompt's
            image tokens must hold the packed count (`VisorProcessor(packing=...)`). Read at prefill only.
        """
        # LLaVA-OV's pre-encoded images/videos; taken from kwargs, not the signature, so that `generate` keeps
        # passing the pixels (it pre-encodes them only for models whose forward names `mm_encoder_outputs`)
        mm_encoder_outputs = kwargs.pop("mm_encoder_outputs", None)
        has_pixels = pixel_values is not None or pixel_values_videos is not None
        check_visor_inputs(input_ids, inputs_embeds, has_pixels, mm_encoder_outputs, attention_mask)
        visor_batching = check_visor_batching(visor_batching)
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        capture = OutputCapture.start(self.config, output_hidden_states, kwargs.pop("output_attentions", None))
        cache = self._cache_for(past_key_values, use_cache)
        if cache is not None and cache.visor_state is not None:  # the cache holds a prompt: a decoding step
            if pixel_values is not None or pixel_values_videos is not None or mm_encoder_outputs:
                raise ValueError("images must be given in the first forward (prefill); this cache already holds a prompt")
            return self._decode(inputs_embeds, attention_mask, position_ids, cache, capture, kwargs)
        vision_kwargs = {
            "image": {
                "vision_feature_layer": vision_feature_layer,
                "vision_feature_select_strategy": vision_feature_select_strategy,
                "batch_num_images": batch_num_images,
            },
            "video": {"vision_feature_layer": vision_feature_layer, "vision_feature_select_strategy": vision_feature_select_strategy},
            "encoded": mm_encoder_outputs,
            "packing": visor_packing,
        }
        if vision_aspect_ratio is not None:
            vision_kwargs["image"]["vision_aspect_ratio"] = vision_aspect_ratio
        visual_inputs = (pixel_values, image_sizes, pixel_values_videos, vision_kwargs)
        return self._prefill(
            input_ids, inputs_embeds, visual_inputs, attention_mask, position_ids, cache, visor_configuration, capture,
            output_router_logits, kwargs, visor_router_threshold, visor_batching,
        )

    def _cache_for(self, past_key_values: Cache | None, use_cache: bool | None) -> VisorCache | None:
        """The cache this forward fills (None without one): a filled `VisorCache` continues its generation."""
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
        return past_key_values if use_cache else None

    def _decoder_loop(self, plan, streams, cache, capture, router: RouterInputs | None, kwargs) -> None:
        """Every LLM layer, as qwen2's loop: the plan says what runs; the CA block sits inside `run_layer`, the
        router is the visible step after its layer."""
        layers = self.backbone_layers()[: len(plan.layouts)]
        # a layer that ran over the text stream lays its attention map out in the original order
        laid_out = capture_attentions(layers, capture.attentions is not None, lambda i: streams.compact_text(plan.layouts[i]))
        with laid_out as captured:
            for layer_idx, decoder_layer in enumerate(layers):
                run_layer(plan, layer_idx, streams, cache, decoder_layer, self._cross_attention_block(layer_idx), **kwargs)
                capture.record(streams, captured)
                if router is not None and plan.wants_router(layer_idx, router.always):
                    self._router_step(plan, streams, router)

    def _cross_attention_block(self, layer_idx: int) -> VisorCrossAttentionBlock | None:
        key = str(layer_idx)
        return self.cross_attention_blocks[key] if key in self.cross_attention_blocks else None

    def _router_step(self, plan: VisorLayerPlan, streams: VisorStreams, router: RouterInputs) -> None:
        """Score the routing tokens; the samples that asked for "auto" get the configuration the router picks."""
        router.logits, router.batch_index = self._router_logits(streams.text, router.text_routing, router.text_valid)
        if plan.pending:
            chosen = self._route(router.logits, router.batch_index, streams.text.shape[0], router.thresholds)
            plan.complete(chosen, self.config.configurations, tuple(self.config.default_layers()))

    def _prefill(
        self, input_ids, inputs_embeds, visual_inputs, attention_mask, position_ids, cache, visor_configuration,
        capture, output_router_logits, kwargs, visor_router_threshold=None, visor_batching=None,
    ) -> VisorModelOutputWithPast:
        inputs_embeds, visual_mask, segments, image_features, video_features = self.embed_visual(
            input_ids, inputs_embeds, *visual_inputs
        )
        batch, length = inputs_embeds.shape[:2]
        position_ids = self.backbone_position_ids(position_ids, batch, 0, length, inputs_embeds.device)
        valid = attention_mask.bool() if attention_mask is not None else torch.ones_like(visual_mask)
        prompt = PrefillInputs(
            inputs_embeds, visual_mask, segments, position_ids, valid, attention_mask, self._routing_mask(input_ids, inputs_embeds)
        )
        mode = check_visor_batching(visor_batching)
        groups = choose_groups(self.config, mode, visor_configuration, prompt, self.router is not None, cache, self.training)
        if groups is None:  # one pass; samples that skip a layer another one runs have the visual keys masked
            output = self._prefill_rows(prompt, cache, visor_configuration, capture, output_router_logits, kwargs, visor_router_threshold)
        else:
            output = grouped_prefill(self, prompt, groups, cache, visor_configuration, capture, output_router_logits, kwargs, visor_router_threshold)
        output.image_hidden_states, output.video_hidden_states = image_features, video_features
        return output

    def _prefill_rows(
        self, prompt: PrefillInputs, cache, visor_configuration, capture, output_router_logits, kwargs, visor_router_threshold=None,
    ) -> VisorModelOutputWithPast:
        """The layers of a prefill over the samples of `prompt` as one batch (the whole batch, or one group)."""
        inputs_embeds, visual_mask, valid = prompt.inputs_embeds, prompt.visual_mask, prompt.valid
        batch = inputs_embeds.shape[0]
        streams = self._prefill_streams(inputs_embeds, visual_mask, prompt.segments, prompt.position_ids, valid)
        plan = self._prefill_plan(
            streams, visual_mask, prompt.attention_mask, prompt.position_ids, inputs_embeds, cache, visor_configuration
        )
        routing_mask = prompt.routing_mask
        router = RouterInputs(
            gather_tokens(routing_mask, streams.text_index) if routing_mask is not None else None,
            streams.text_valid, bool(output_router_logits),  # a routing token the attention mask hides is not read
            resolve_router_threshold(self.config, visor_router_threshold, bool(plan.pending), batch),
        )
        capture.record_input(inputs_embeds)
        self._decoder_loop(plan, streams, cache, capture, router, kwargs)
        if plan.pending:  # the router never ran (no router layer reached): fall back to the default configuration
            plan.complete([-1] * batch, self.config.configurations, tuple(self.config.default_layers()))
        configurations, configuration_index, active = self._configuration_outputs(plan.layer_sets, valid.device)
        # what this pass computed for every sample: its full layers (the union of the samples' SA layers)
        computed = [tuple(i for i, layout in enumerate(plan.layouts) if layout != TEXT)] * batch
        hidden = by_token_chunks(self.backbone_norm, streams.merged())  # per token: chunks on CPU, same values
        if cache is not None:
            cache.start_prompt(
                layouts=plan.layouts, cross_kv=plan.cross_kv, active=active, configurations=configurations,
                configuration_index=configuration_index, text_valid=streams.text_valid, full_valid=valid,
                full_visual=visual_mask, visual_valid=streams.visual_valid, computed_layers=computed,
            )
        return VisorModelOutputWithPast(
            last_hidden_state=hidden,
            past_key_values=cache,
            hidden_states=capture.hidden_states_with(hidden),
            attentions=capture.attentions,
            router_logits=router.logits,
            routing_token_batch_index=router.batch_index,
            visor_configurations=configurations,
            configuration_index=configuration_index,
            visor_computed_layers=computed,
        )

    def _prefill_streams(self, inputs_embeds, visual_mask, segments, position_ids, valid) -> VisorStreams:
        """Split the prompt into the text and the visual stream."""
        length = inputs_embeds.shape[1]
        text_index, text_filled = compact_indices(~visual_mask)
        visual_index, visual_filled = compact_indices(visual_mask)
        text = gather_tokens(inputs_embeds, text_index)
        text_positions = gather_tokens(position_ids, text_index)
        has_visual = visual_index.shape[1] > 0
        # a visual token the attention mask hides is, for the CA blocks, absent (their mask and convolution skip it)
        visual_valid = visual_filled & gather_tokens(valid, visual_index)
        return VisorStreams(
            text=text,
            text_positions=text_positions,
            text_rotary=self.backbone_rotary(text, text_positions),
            full_positions=position_ids,
            full_rotary=self.backbone_rotary(inputs_embeds, position_ids) if has_visual else None,
            length=length,
            full=inputs_embeds,  # the visual stream is gathered from it when a CA layer first reads it
            text_index=text_index,
            visual_index=visual_index,
            visual_segments=torch.where(visual_valid, gather_tokens(segments, visual_index), -1),
            text_valid=text_filled & gather_tokens(valid, text_index),
            visual_valid=visual_valid,
        )

    def _prefill_plan(self, streams, visual_mask, attention_mask, position_ids, inputs_embeds, cache, request) -> VisorLayerPlan:
        """The layer plan of a prompt: the requested configurations (router-completed later) and the masks."""
        config = self.config
        requests = resolve_configuration_request(config, request, streams.text.shape[0], self.router is not None)
        pending = [i for i, r in enumerate(requests) if r == AUTO]
        # until the router decides, an "auto" sample runs the SA layers that every configuration holds
        provisional = tuple(sorted(set.intersection(*(set(c) for c in config.configurations)))) if pending else ()
        text_mask = create_causal_mask(
            config=config.text_config, inputs_embeds=streams.text, attention_mask=streams.text_valid,
            past_key_values=cache, position_ids=streams.text_positions, layer_idx=0,
        )

        def mask_factory(layout: str, _layer_idx: int, and_mask_function):
            if layout == TEXT:
                return text_mask
            # built lazily, when earlier layers may already have filled the cache: size it on the prompt alone
            # (the cache is empty at prefill), not on what the cache holds by then
            return create_causal_mask(
                config=config.text_config, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                past_key_values=None, position_ids=position_ids, layer_idx=0, and_mask_function=and_mask_function,
            )

        has_visual = streams.visual_index.shape[1] > 0
        cross = None
        if has_visual and config.cross_attention_layers:
            # text token i sees visual token j only if j comes before i in the original sequence
            sees = cross_attention_mask_function(streams.text_index, streams.visual_index, streams.visual_valid)
            shape = (streams.text.shape[0], streams.text.shape[1], streams.visual.shape[1])
            cross = CrossAttentionInputs.from_mask_function(
                sees, shape, config.text_config._attn_implementation, streams.text.dtype, streams.text.device,
                drop_if_unmasked=True,
            )
        return VisorLayerPlan(
            layer_sets=[provisional if r == AUTO else r for r in requests],
            layouts=[TEXT] * config.text_config.num_hidden_layers,
            mask_factory=mask_factory, visual_keys=visual_mask, has_visual=has_visual, prefill=True, pending=pending,
            router_layer=config.router_layer if self.router is not None else None, cross=cross,
        )

    def _configuration_outputs(self, layer_sets, device) -> tuple[list[tuple[int, ...]], torch.Tensor, torch.Tensor]:
        """The SA layers of each sample, their index in `config.configurations` (-1: outside the list) and `[B, L]`
        which layers run for each sample (the device copy the cache keeps for decoding)."""
        known = {tuple(c): i for i, c in enumerate(self.config.configurations)}
        configurations = [tuple(s) for s in layer_sets]
        num_layers = self.config.text_config.num_hidden_layers
        rows = [[layer in s for layer in range(num_layers)] for s in layer_sets]
        active = torch.tensor(rows, dtype=torch.bool, device=device).reshape(len(layer_sets), num_layers)
        index = torch.tensor([known.get(s, -1) for s in configurations], device=device)
        return configurations, index, active

    def _decode(self, inputs_embeds, attention_mask, position_ids, cache: VisorCache, capture, kwargs):
        """A step after prefill: every new token is text, whatever its id; the plan is the cache's."""
        batch, new = inputs_embeds.shape[:2]
        cache.check_continues(self.config.text_config.num_hidden_layers, self.config.cross_attention_layers, batch)
        position_ids = self.backbone_position_ids(position_ids, batch, cache.decode_start(), new, inputs_embeds.device)
        cache.append_text(attention_mask, new)
        rotary = self.backbone_rotary(inputs_embeds, position_ids)
        streams = VisorStreams(inputs_embeds, position_ids, rotary, position_ids, rotary, new)

        def mask_factory(layout: str, layer_idx: int, and_mask_function):
            valid, and_mask_function = padding_without_sync(self.config.text_config, cache.valid_keys(layout), and_mask_function)
            return create_causal_mask(
                config=self.config.text_config, inputs_embeds=inputs_embeds, attention_mask=valid,
                past_key_values=cache, position_ids=position_ids, layer_idx=layer_idx, and_mask_function=and_mask_function,
                # no SDPA "is causal" shortcut: checking whether it applies costs a host sync at every step
                allow_is_causal_skip=False,
            )

        cross_kv = cache.cross_attention_kv()
        cross = None
        if cross_kv:
            visual_valid = cache.visual_valid
            cross = CrossAttentionInputs.from_mask_function(
                decoding_cross_attention_mask_function(visual_valid), (batch, new, visual_valid.shape[1]),
                self.config.text_config._attn_implementation, inputs_embeds.dtype, inputs_embeds.device,
            )
        plan = VisorLayerPlan(
            layer_sets=cache.configurations, layouts=cache.layouts, mask_factory=mask_factory, visual_keys=None,
            has_visual=bool(cross_kv), prefill=False, hidden_keys_for=cache.visual_keys_for, cross=cross, cross_kv=cross_kv,
        )
        capture.record_input(inputs_embeds)
        self._decoder_loop(plan, streams, cache, capture, None, kwargs)
        hidden = self.backbone_norm(streams.text)
        return VisorModelOutputWithPast(
            last_hidden_state=hidden,
            past_key_values=cache,
            hidden_states=capture.hidden_states_with(hidden),
            attentions=capture.attentions,
            visor_configurations=cache.configurations,
            configuration_index=cache.configuration_index,
        )


class VisorForConditionalGeneration(VisorPreTrainedModel, VisorGenerationMixin):
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
        visor_batching: str | None = None,
        visor_packing: int | list[int] | torch.Tensor | None = None,
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
        visor_batching (`str`, *optional*):
            `"auto"` (default), `"grouped"` or `"masked"`: how a prefill of samples with different configurations
            runs (see [`VisorModel.forward`]).
        visor_packing (`int`, or one per sample as a list or 1-D tensor, *optional*):
            Token packing factor of each sample's images (1, or a factor of `config.packing_factors`); the prompt's
            image tokens must hold the packed count (`VisorProcessor(packing=...)`). Read at prefill only.
        """
        check_forward_kwargs(self.forward, kwargs)
        visual_inputs = pixel_values is not None or pixel_values_videos is not None or bool(kwargs.get("mm_encoder_outputs"))
        prefill, counts, visor_configuration = self._visor_request(
            past_key_values, input_ids, attention_mask, inputs_embeds, visor_configuration, visor_budget, visual_inputs
        )
        outputs = self.model(
            input_ids=input_ids, pixel_values=pixel_values, image_sizes=image_sizes, pixel_values_videos=pixel_values_videos,
            image_sizes_videos=image_sizes_videos, attention_mask=attention_mask, position_ids=position_ids,
            past_key_values=past_key_values, inputs_embeds=inputs_embeds, vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy, vision_aspect_ratio=vision_aspect_ratio,
            batch_num_images=batch_num_images, use_cache=use_cache, visor_configuration=visor_configuration,
            output_router_logits=output_router_logits, visor_router_threshold=visor_router_threshold,
            visor_batching=visor_batching, visor_packing=visor_packing, **kwargs,
        )
        return self._visor_output(outputs, prefill, counts, labels, logits_to_keep, kwargs)

    def _visor_request(
        self, past_key_values, input_ids, attention_mask, inputs_embeds, visor_configuration, visor_budget, visual_inputs: bool
    ):
        """Before the model runs: is this a prefill, the prompt's token counts, and the configuration request (a budget
        turned into one). `visual_inputs`: the forward was given images or videos (else placeholders count as text)."""
        prefill = not (isinstance(past_key_values, VisorCache) and past_key_values.visor_state is not None)
        # token counts for the FLOPs report (skipped in training: it costs a host sync per step) and the budget
        wants_counts = prefill and (visor_budget is not None or not self.training)
        counts = self._prompt_token_counts(input_ids, attention_mask, inputs_embeds, visual_inputs) if wants_counts else None
        if prefill and visor_budget is not None:
            visor_configuration = budget_request(self.config, visor_budget, visor_configuration, counts)
        return prefill, counts, visor_configuration

    def _visor_output(self, outputs, prefill, counts, labels, logits_to_keep, kwargs) -> VisorCausalLMOutputWithPast:
        """Logits, loss and FLOPs from the model's output."""
        hidden_states = slice_logits_to_keep(outputs.last_hidden_state, logits_to_keep)
        logits = self.lm_head(hidden_states)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **kwargs)
        flops, alone = self._forward_flops(outputs, prefill, counts, hidden_states.shape[1], logits_to_keep)
        # every field of the model's output but `last_hidden_state` (the logits replace it)
        passed = {key: value for key, value in outputs.items() if key != "last_hidden_state"}
        return VisorCausalLMOutputWithPast(loss=loss, logits=logits, flops=flops, flops_alone=alone, **passed)

    def _forward_flops(self, outputs, prefill, counts, kept_positions, logits_to_keep):
        """`[B]` FLOPs this forward computed for each sample, and `[B]` as if each ran alone (see `report_visor`);
        (None, None) in training or without counts."""
        cache = outputs.past_key_values
        state = cache.visor_state if isinstance(cache, VisorCache) else None
        if outputs.visor_configurations is None or self.training:
            return None, None
        if not prefill:
            if state is None or not state.prompt_text:
                return None, None
            # host-side counts: outside the compiled graph with a static cache (no guard on the growing length)
            flops_of = decode_flops_outside_graph if isinstance(cache, VisorStaticCache) else decode_flops_per_sample
            new = outputs.last_hidden_state.shape[1]
            return flops_of(self.config, state, new)
        if counts is None and state is not None:
            visual = state.full_valid & state.full_visual
            counts = tuple(torch.stack([state.text_valid.sum(1), visual.sum(1)]).tolist())
        if counts is None:
            return None, None
        if state is not None:
            cache.record_prompt_counts(*counts)
        computed = outputs.visor_computed_layers or outputs.visor_configurations
        return (
            prefill_flops_per_sample(self.config, computed, counts, kept_positions, logits_to_keep),
            prefill_flops_per_sample(self.config, outputs.visor_configurations, counts, kept_positions, logits_to_keep),
        )

    def visor_flops(self, n_text: int, n_visual: int, visor_configuration="max", decode_context: int = 0) -> dict:
        """Analytical LLM FLOPs of one sample with `n_text` text and `n_visual` visual tokens.

        Returns `prefill`, `decode_step` (one new token after the prompt and `decode_context` generated tokens) and
        the same for dense LLaVA-OV (`dense_prefill`, `dense_decode_step`). `visor_configuration`: index, layer list
        or `"max"`. The vision tower is apart: `flops_visor.vision_flops(model.config, num_crops)`.
        """
        return single_sample_flops(self.config, n_text, n_visual, visor_configuration, decode_context)


__all__ = [
    "VisorPreTrainedModel",
    "VisorModel",
    "VisorForConditionalGeneration",
    "VisorModelOutputWithPast",
    "VisorCausalLMOutputWithPast",
]

"""The layer plan of VISOR and the one step function that runs a layer, at prefill and while decoding.

For every LLM layer and sample the plan says what runs (see docs/model.md, "The engine: a layer plan and one step function"):

- a *cross-attention* (CA) block before the layer, when the layer is a CA layer and there are visual tokens;
- the decoder layer over the whole sequence (layout ``"full"``), when it is an SA layer of at least one sample's
  configuration; samples for which the layer is off do not see the visual keys (a mask), and keep their visual
  states;
- else the decoder layer over the text tokens only (layout ``"text"``).

The plan is built once per forward from the configuration and the per-sample requests; at prefill the router
completes it at `router_layer` (samples that asked for "auto" run, until then, the SA layers that every
configuration holds). It owns the attention masks, keyed by layout as qwen2 keys its masks by layer type, and the
cross-attention keys/values of the visual stream. Prefill and decoding differ only in their inputs: at prefill the
visual tokens are a stream of their own; while decoding they live in the cache and every new token is text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from .cache_visor import FULL, TEXT
from .masks_visor import FLEX, block_mask, materialise
from .streams_visor import gather_tokens, merge_streams


def to_attention_mask(allowed: torch.Tensor, implementation: str, dtype: torch.dtype) -> torch.Tensor:
    """Boolean `[B, Q, K]` (True = attend) to the 4D mask the attention implementation takes."""
    allowed = allowed[:, None]
    if implementation == "eager":
        return torch.zeros((), dtype=dtype, device=allowed.device).masked_fill(~allowed, torch.finfo(dtype).min)
    return allowed


def hide_keys(hidden: torch.Tensor) -> Callable:
    """A mask function for `create_causal_mask(and_mask_function=...)`: no query sees the keys `hidden` ([B, K],
    True = hidden), so the mask is built with the constraint instead of edited afterwards."""

    def inner(batch_idx, head_idx, q_idx, kv_idx):
        return ~hidden[batch_idx, kv_idx]

    return inner


@dataclass
class CrossAttentionInputs:
    """What the CA blocks of one forward share: the mask over the visual stream (None: nothing hidden) and which
    text tokens see any visual token (`has_key`, `[B, Q, 1]` in the hidden dtype; a text token that sees none gets
    nothing added)."""

    mask: torch.Tensor | None  # or flex attention's BlockMask
    has_key: torch.Tensor

    @classmethod
    def from_allowed(
        cls, allowed: torch.Tensor, implementation: str, dtype: torch.dtype, drop_if_unmasked: bool = False
    ) -> CrossAttentionInputs:
        """From a boolean `[B, Q, N_vis]` (text token q may see visual token j).

        `drop_if_unmasked` (prefill, where one host sync is cheap): a mask that hides nothing (every text token sees
        every visual token or none, e.g. one image before the question) becomes None, so that attention takes its
        unmasked path (SDPA: grouped-query heads without a copy of the keys/values per head); the values are the
        same, as adding a zero mask changes none.
        """
        has_key = allowed.any(-1, keepdim=True)
        visible = allowed | ~has_key
        mask = None if drop_if_unmasked and bool(visible.all()) else to_attention_mask(visible, implementation, dtype)
        return cls(mask, has_key.to(dtype))

    @classmethod
    def from_mask_function(
        cls, mask_function: Callable, shape: tuple[int, int, int], implementation: str, dtype: torch.dtype, device,
        drop_if_unmasked: bool = False,
    ) -> CrossAttentionInputs:
        """From a mask function over `shape` = (B, Q, N_vis): materialised for eager/sdpa (see `from_allowed`), a
        `BlockMask` for flex."""
        allowed = materialise(mask_function, *shape, device)
        if implementation != FLEX:
            return cls.from_allowed(allowed, implementation, dtype, drop_if_unmasked)
        # a row that sees no key stays empty: flex attention returns zeros there (no NaN), and `has_key` drops it
        has_key = allowed.any(-1, keepdim=True)
        return cls(block_mask(mask_function, *shape, device), has_key.to(dtype))


class VisorStreams:
    """The token streams a layer reads and writes, with their positions and rotary embeddings.

    At prefill: the text stream and the visual stream (compact, right-aligned; `*_index` are their positions in the
    original sequence of `length` tokens). While decoding: the new (text) tokens only, `visual` is None.

    At prefill the streams may also hold the states in the original order (`full`: the embeddings, or the output of
    the last full-layout layer): consecutive full-layout layers then read and write that one tensor, and the text
    and visual streams are gathered from it only when a text-only or CA layer (or the router) reads them. The
    visual positions of `full` always hold the visual stream (only full-layout layers change it); its text
    positions are written back from the text stream when the next full-layout layer (or the output) needs them.
    """

    def __init__(
        self,
        text: torch.Tensor | None,
        text_positions: torch.Tensor,
        text_rotary: tuple[torch.Tensor, torch.Tensor],
        full_positions: torch.Tensor,
        full_rotary: tuple[torch.Tensor, torch.Tensor] | None,
        length: int,
        visual: torch.Tensor | None = None,
        text_index: torch.Tensor | None = None,
        visual_index: torch.Tensor | None = None,
        visual_segments: torch.Tensor | None = None,
        text_valid: torch.Tensor | None = None,  # [B, N_text] slots holding a real token (not padding either)
        visual_valid: torch.Tensor | None = None,  # [B, N_vis] slots holding a visual token the attention mask shows
        full: torch.Tensor | None = None,  # [B, length, d] the same states in the original order (prefill)
    ):
        if text is None and full is None:
            raise ValueError("VisorStreams needs the text stream or the states in the original order (`full`)")
        self.text_positions, self.text_rotary = text_positions, text_rotary
        self.full_positions, self.full_rotary, self.length = full_positions, full_rotary, length
        self.text_index, self.visual_index, self.visual_segments = text_index, visual_index, visual_segments
        self.text_valid, self.visual_valid = text_valid, visual_valid
        self._text, self._visual = text, visual
        self._full = full if text_index is not None else None
        self._text_in_full = self._full is not None  # the text positions of `full` hold the text stream

    @property
    def text(self) -> torch.Tensor:
        if self._text is None:
            self._text = gather_tokens(self._full, self.text_index)
        return self._text

    @text.setter
    def text(self, value: torch.Tensor) -> None:
        self._text = value
        self._text_in_full = False  # `full` keeps the visual states; its text positions are now stale

    @property
    def visual(self) -> torch.Tensor | None:
        if self._visual is None and self._full is not None:
            self._visual = gather_tokens(self._full, self.visual_index)
        return self._visual

    @visual.setter
    def visual(self, value: torch.Tensor | None) -> None:
        self._text = self.text  # back to the two streams alone
        self._full, self._text_in_full, self._visual = None, False, value

    def merged(self) -> torch.Tensor:
        """The hidden states in the original order (the new tokens alone while decoding)."""
        if self._full is not None:
            if not self._text_in_full:  # write the text stream back; the visual positions are current
                batch, _, hidden = self._full.shape
                padded = torch.cat([self._full, self._full.new_zeros(batch, 1, hidden)], dim=1)  # empty slots: column T
                padded.scatter_(1, self.text_index[..., None].expand(-1, -1, hidden), self._text)  # a fresh tensor
                self._full, self._text_in_full = padded[:, : self.length], True
            return self._full
        if self._visual is None or (self._visual.shape[1] == 0 and self._text.shape[1] == self.length):
            return self._text
        self._full = merge_streams(self._text, self.text_index, self._visual, self.visual_index, self.length)
        self._text_in_full = True
        return self._full

    def compact_text(self, layout: str) -> tuple[torch.Tensor, int] | None:
        """For a layer of `layout` at prefill that ran over the text stream: the stream's positions and the sequence
        length (how its attention map is laid out in the original order); None otherwise."""
        if self.text_index is None or layout != TEXT:
            return None
        return self.text_index, self.length

    def update_full(self, output: torch.Tensor, keep: torch.Tensor | None = None, inputs: torch.Tensor | None = None) -> None:
        """Take a full-sequence layer's output; `keep` ([B, length] bool, with the layer's `inputs`): the positions
        that keep their input states (the visual tokens of the samples for which the layer was off). At prefill the
        output stays in the original order until a stream is read."""
        if self.text_index is None:  # decoding: the new tokens are the text stream
            self._text = output
            return
        if keep is not None:
            output = torch.where(keep[..., None], inputs, output)
        self._full, self._text, self._visual, self._text_in_full = output, None, None, True

    def split(self, merged: torch.Tensor, keeps_visual: torch.Tensor | None) -> None:
        """Take a full-sequence layer's output back into the streams; samples in `keeps_visual` ([B] bool, for
        which the layer was off) keep their visual states."""
        if self.text_index is None:
            self._text = merged
            return
        text = gather_tokens(merged, self.text_index)
        updated = gather_tokens(merged, self.visual_index)
        self._visual = updated if keeps_visual is None else torch.where(keeps_visual[:, None, None], self.visual, updated)
        self._text, self._full, self._text_in_full = text, None, False


@dataclass
class VisorLayerPlan:
    """What runs at every layer for every sample, and the masks and cross-attention inputs that this needs.

    layer_sets: the SA layers of each sample (provisional for `pending` samples until the router has run).
    layouts: per layer, `"full"` or `"text"` (the cache slot's layout). At prefill it is decided layer by layer as
        the loop reaches it (the router may still change later layers); while decoding it is the cache's.
    masks: self-attention masks keyed by layout (`"full"` / `"text"`), and for full layers that some samples skip by
        which samples run them (prefill) or by layer (decoding); built on first use by `mask_factory(layout,
        layer_idx, and_mask_function)`.
    visual_keys: `[B, K]` the keys of the full sequence that are visual tokens (prefill; hidden from the samples
        whose configuration does not hold the layer).
    hidden_keys_for: while decoding, `[B, K]` the keys a full layer hides (the cache's `visual_keys_for`: a device
        copy of the configurations, so no host sync per step).
    cross: the inputs of the CA blocks (None without visual tokens or without CA layers).
    cross_kv: cross-attention keys/values per CA layer (computed at prefill, the cache's while decoding).
    """

    layer_sets: list[tuple[int, ...]]
    layouts: list[str]
    mask_factory: Callable[[str, int, Callable | None], torch.Tensor | None]
    visual_keys: torch.Tensor | None
    has_visual: bool
    prefill: bool
    pending: list[int] = field(default_factory=list)
    router_layer: int | None = None
    hidden_keys_for: Callable[[int], torch.Tensor] | None = None
    cross: CrossAttentionInputs | None = None
    cross_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    masks: dict = field(default_factory=dict)
    skipping: dict = field(default_factory=dict)  # [B] samples that skip a full layer, per set of running samples

    def runs(self, layer_idx: int) -> list[bool]:
        """Per sample: does the layer run over the whole sequence (host side, from the configurations)."""
        return [layer_idx in layers for layers in self.layer_sets]

    def layout(self, layer_idx: int) -> str:
        if self.prefill:
            self.layouts[layer_idx] = FULL if self.has_visual and any(self.runs(layer_idx)) else TEXT
        return self.layouts[layer_idx]

    def mask(self, key, layer_idx: int, layout: str, and_mask_function: Callable | None = None) -> torch.Tensor | None:
        """The mask stored under `key`, built on first use, when `layer_idx` (a layer of that layout) is about to run
        (so that a mask sized on the cache sees the slot before this step's tokens)."""
        if key not in self.masks:
            self.masks[key] = self.mask_factory(layout, layer_idx, and_mask_function)
        return self.masks[key]

    def keeps_visual(self, layer_idx: int) -> torch.Tensor | None:
        """`[B]` samples for which a full layer is off (they keep their visual states), None when it runs for all.
        While decoding there is no visual stream to keep: None."""
        if not self.prefill:
            return None
        runs = tuple(self.runs(layer_idx))
        if all(runs):
            return None
        if runs not in self.skipping:  # one host-to-device copy per set of running samples, not per layer
            self.skipping[runs] = torch.tensor([not r for r in runs], device=self.visual_keys.device)
        return self.skipping[runs]

    def kept_positions(self, layer_idx: int) -> torch.Tensor | None:
        """`[B, T]` the positions whose states a full layer leaves unchanged: the visual tokens of the samples for
        which it is off. None when it runs for every sample, and while decoding."""
        off = self.keeps_visual(layer_idx)
        if off is None:
            return None
        runs = (tuple(self.runs(layer_idx)), "positions")
        if runs not in self.skipping:
            self.skipping[runs] = self.visual_keys & off[:, None]
        return self.skipping[runs]

    def attention_mask(self, layer_idx: int, layout: str) -> torch.Tensor | None:
        """The self-attention mask of a layer: its layout's, with the visual keys hidden from the samples whose
        configuration does not hold the layer."""
        if layout == TEXT:
            return self.mask(TEXT, layer_idx, TEXT)
        if self.prefill:
            off = self.keeps_visual(layer_idx)
            if off is None:
                return self.mask(FULL, layer_idx, FULL)
            return self.mask((FULL, tuple(self.runs(layer_idx))), layer_idx, FULL, hide_keys(self.kept_positions(layer_idx)))
        # decoding: the cache's device copy of the configurations (reordered with the beams), no host sync
        return self.mask((FULL, layer_idx), layer_idx, FULL, hide_keys(self.hidden_keys_for(layer_idx)))

    def complete(self, chosen: list[int], configurations, fallback: tuple[int, ...]) -> None:
        """The router's choice (configuration index per sample, -1: none) for the samples still pending."""
        for i in self.pending:
            self.layer_sets[i] = tuple(configurations[chosen[i]]) if chosen[i] >= 0 else fallback
        self.pending = []

    def cross_attends(self, layer_idx: int, streams: VisorStreams) -> bool:
        """A CA layer's block runs when the forward has visual tokens: in the visual stream, or in the cache."""
        return self.cross is not None and (layer_idx in self.cross_kv or streams.visual is not None)

    def wants_router(self, layer_idx: int, output_router_logits: bool) -> bool:
        return layer_idx == self.router_layer and bool(self.pending or output_router_logits)


def cross_attention_step(plan: VisorLayerPlan, layer_idx: int, streams: VisorStreams, block: nn.Module) -> None:
    """`t = t + CA(norm(t), pos(v))` before the layer; the visual keys/values are computed once (at prefill)."""
    if layer_idx not in plan.cross_kv:
        plan.cross_kv[layer_idx] = block.visual_key_values(streams.visual, streams.visual_segments)
    key_states, value_states = plan.cross_kv[layer_idx]
    streams.text = block(streams.text, key_states, value_states, plan.cross.mask, plan.cross.has_key)


def run_layer(
    plan: VisorLayerPlan, layer_idx: int, streams: VisorStreams, cache, decoder_layer: nn.Module,
    cross_block: nn.Module | None = None, **kwargs,
) -> str:
    """One LLM layer for the whole batch, at prefill and while decoding: the CA block (if any), then the decoder
    layer over the full sequence or over the text tokens. Returns the layer's layout."""
    if cross_block is not None and plan.cross_attends(layer_idx, streams):
        cross_attention_step(plan, layer_idx, streams, cross_block)
    layout = plan.layout(layer_idx)
    mask = plan.attention_mask(layer_idx, layout)
    common = {"past_key_values": cache, "use_cache": cache is not None, **kwargs}
    if layout == FULL:
        inputs = streams.merged()
        output = decoder_layer(
            inputs, attention_mask=mask, position_embeddings=streams.full_rotary,
            position_ids=streams.full_positions, **common,
        )
        # consecutive full-layout layers stay in the original order: no split until a stream is read
        streams.update_full(output, plan.kept_positions(layer_idx), inputs)
    else:
        streams.text = decoder_layer(
            streams.text, attention_mask=mask, position_embeddings=streams.text_rotary,
            position_ids=streams.text_positions, **common,
        )
    return layout


__all__ = ["CrossAttentionInputs", "VisorLayerPlan", "VisorStreams", "hide_keys", "run_layer", "to_attention_mask"]

"""The layer-sparse KV cache of VISOR.

Every LLM layer keeps its keys/values in the ordinary `DynamicCache` slot of its index, but what a slot
holds depends on the layer's *layout*, fixed at prefill:

- ``"full"``: an SA layer active for at least one sample of the batch: keys/values of the whole
  logical sequence (text and visual tokens, in their original order), exactly as LLaVA-OneVision caches them;
- ``"text"``: every other layer: keys/values of the text tokens only (the compact text stream).

Cross-attention layers also keep the keys/values of the visual tokens, computed once at prefill.
`VisorState` holds the token bookkeeping that the masks need at every decoding step. The cache owns it: the model
starts it with `start_prompt`, books new tokens with `append_text` and reads it through the cache's methods
(`valid_keys`, `visual_keys_for`, `cross_attention_kv`, `decode_start`, ...); `visor_state` is a read-only view.

`VisorStaticCache` is the static-shape variant (what `cache_implementation="static"` asks for): the prefill runs as
with `VisorCache`, then every slot is moved into a pre-allocated buffer sized for `max_cache_len` logical tokens,
and a decoding step writes at device-side positions, so its shapes and its Python-side state do not change from
step to step (`torch.compile` without recompiling, CUDA graphs).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, StaticLayer

from .streams_visor import compact_indices

FULL = "full"
TEXT = "text"


@dataclass
class VisorState:
    """Per-batch bookkeeping of a VISOR forward, carried from prefill to the decoding steps.

    Tensors have the batch as first dimension so that beam search can reorder them with the cache.
    """

    # [B, L] which SA layers run for each sample (all False for CA/text layers)
    active: torch.Tensor
    # layout ("full" or "text") of every LLM layer, decided at prefill for the whole batch
    layouts: list[str]
    # [B, K_text] which cached text-stream slots are real tokens (not padding)
    text_valid: torch.Tensor
    # [B, K_full] which cached slots of the full sequence are real tokens (the 2D attention mask)
    full_valid: torch.Tensor
    # [B, K_full] which slots of the full sequence are visual tokens
    full_visual: torch.Tensor
    # [B, N_vis] which visual-stream slots hold a visual token that the attention mask shows
    visual_valid: torch.Tensor
    # the SA layers of each sample, as indices (host side, for reporting)
    configurations: list[tuple[int, ...]]
    # index into config.configurations for each sample (-1: an explicit layer set outside the list)
    configuration_index: torch.Tensor
    # logical length of the sequence seen so far (text and visual tokens, padding included)
    seq_length: int = 0
    # cross-attention keys/values per CA layer: (key, value, has_key) with key/value [B, kv_heads, N_vis, head_dim]
    cross_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # host-side per-sample bookkeeping for the FLOPs report, filled once at prefill (no sync while decoding):
    # real (non-padding) text and visual tokens of each prompt, and the logical prompt length
    prompt_text: list[int] = field(default_factory=list)
    prompt_visual: list[int] = field(default_factory=list)
    prompt_length: int = -1  # -1: the whole sequence at construction (the prefill) is the prompt
    # the SA layers each sample's (sub-)batch ran as full layers at prefill (the union of a masked batch's, its
    # group's when grouped): what the prefill computed for it, for the FLOPs report
    computed_layers: list[tuple[int, ...]] = field(default_factory=list)

    HOST_LISTS = ("configurations", "prompt_text", "prompt_visual", "computed_layers")

    def __post_init__(self) -> None:
        if self.prompt_length < 0:
            self.prompt_length = self.seq_length

    def _batch_tensors(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                yield f.name, value

    def map_batch(self, fn) -> None:
        """Apply `fn` to every per-sample tensor (and to the cross-attention keys/values)."""
        for name, value in self._batch_tensors():
            setattr(self, name, fn(value))
        self.cross_kv = {layer: (fn(k), fn(v)) for layer, (k, v) in self.cross_kv.items()}

    def _map_host(self, fn) -> None:
        for name in self.HOST_LISTS:
            values = getattr(self, name)
            if values:
                setattr(self, name, fn(values))

    def select(self, indices: torch.Tensor) -> None:
        self.map_batch(lambda t: t.index_select(0, indices.to(t.device)))
        host = indices.tolist()
        self._map_host(lambda values: [values[i] for i in host])

    def repeat_interleave(self, repeats: int) -> None:
        self.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))
        self._map_host(lambda values: [v for v in values for _ in range(repeats)])

    def append_text(self, new_valid: torch.Tensor) -> None:
        """`new_valid` ([B, new]): which new (text) tokens are real; they extend both layouts."""
        self.text_valid = torch.cat([self.text_valid, new_valid], dim=1)
        self.full_valid = torch.cat([self.full_valid, new_valid], dim=1)
        self.full_visual = torch.cat([self.full_visual, torch.zeros_like(new_valid)], dim=1)
        self.seq_length += new_valid.shape[1]

    @property
    def decode_steps(self) -> int:
        """Tokens fed after the prompt (the logical length beyond the prefill)."""
        return self.seq_length - self.prompt_length

    def check_crop(self, tokens_to_remove: int) -> None:
        """Raise unless the last `tokens_to_remove` positions are text in every sample (then they are the last
        entries of every slot, text-only or full, and cropping them keeps the layers in step)."""
        into_prompt = tokens_to_remove - max(self.decode_steps, 0)
        if into_prompt <= 0:
            return  # tokens fed after the prompt are always text
        # one host sync, only when a crop reaches into the prefill (assisted decoding's first candidates)
        if tokens_to_remove > self.text_valid.shape[1] or bool(self.full_visual[:, -tokens_to_remove:].any()):
            raise ValueError(
                f"cannot crop {tokens_to_remove} tokens from this VisorCache: its last {tokens_to_remove} positions "
                "hold visual tokens; only text tokens at the end of the sequence can be removed"
            )

    def crop(self, tokens_to_remove: int) -> None:
        """Forget the last `tokens_to_remove` (text) tokens; they were appended to both layouts.

        Removing tokens of the prompt itself (possible when a multi-token prefill carried assisted decoding's
        candidates) shortens the prompt of the FLOPs bookkeeping accordingly. `VisorCache.crop` runs `check_crop`
        first, before any slot is touched.
        """
        if tokens_to_remove <= 0:
            return
        into_prompt = tokens_to_remove - max(self.decode_steps, 0)
        if into_prompt > 0:
            if self.prompt_text:
                start = self.text_valid.shape[1] - tokens_to_remove
                removed = self.text_valid[:, start : start + into_prompt].sum(1).tolist()
                self.prompt_text = [n - r for n, r in zip(self.prompt_text, removed)]
            self.prompt_length -= into_prompt
        self.text_valid = self.text_valid[:, :-tokens_to_remove]
        self.full_valid = self.full_valid[:, :-tokens_to_remove]
        self.full_visual = self.full_visual[:, :-tokens_to_remove]
        self.seq_length -= tokens_to_remove


class VisorCache(DynamicCache):
    """`DynamicCache` whose layers hold visual keys/values only where VISOR uses them.

    `get_seq_length()` reports the *logical* length (what `generate` counts), not the length of a text-only slot.
    """

    _visor_state: VisorState | None = None

    @property
    def visor_state(self) -> VisorState | None:
        """The VISOR bookkeeping of the prompt this cache holds (None before the prefill). Read-only: the cache's
        methods change it."""
        return self._visor_state

    def start_prompt(self, **fields) -> None:
        """Record a prefill: the fields of `VisorState` (layouts, masks of the streams, cross-attention keys/values,
        configurations); the sequence length is the prompt's."""
        if self._visor_state is not None:
            raise ValueError("this VisorCache already holds a prompt; pass a fresh cache for a new prompt")
        fields.setdefault("seq_length", fields["full_valid"].shape[1])
        self._visor_state = VisorState(**fields)

    def start_merged_prompt(self, parts: list[VisorCache], groups: list[list[int]]) -> None:
        """Record the prefill of a batch that ran as groups (`parts[k]` holds the prompt of the samples `groups[k]`)
        as one prompt, in the batch order, laid out as a masked prefill of the whole batch lays it out.

        A layer is full when any group ran it full; there a group that ran it text-only has its text keys/values
        scattered to their positions in the full sequence and zeros at its visual positions, which its `active` row
        hides (`visual_keys_for`). Text-only slots, the visual stream and the cross-attention keys/values are
        right-aligned: narrower groups are padded on the left with slots that `text_valid` / `visual_valid` hide.
        The parts' slots are emptied as they are merged.
        """
        states = [part.visor_state for part in parts]
        order = [row for rows in groups for row in rows]
        inverse = torch.empty(len(order), dtype=torch.long, device=states[0].full_valid.device)
        inverse[torch.tensor(order, device=inverse.device)] = torch.arange(len(order), device=inverse.device)

        def in_order(tensors: list[torch.Tensor], width: int | None = None) -> torch.Tensor:
            if width is not None:  # right-aligned slots: pad on the left (dim -2 of K/V, dim 1 of a [B, N] mask)
                tensors = [_pad_left(t, width) for t in tensors]
            return torch.cat(tensors).index_select(0, inverse)

        layouts = [FULL if any(s.layouts[i] == FULL for s in states) else TEXT for i in range(len(states[0].layouts))]
        text_width = max(s.text_valid.shape[1] for s in states)
        visual_width = max(s.visual_valid.shape[1] for s in states)
        text_index = [compact_indices(~s.full_visual)[0] for s in states]  # where a group's text slots sit
        for layer_idx, layout in enumerate(layouts):
            slots = [part.layers[layer_idx] for part in parts]
            if layout == TEXT:
                keys, values = in_order([s.keys for s in slots], text_width), in_order([s.values for s in slots], text_width)
            else:
                full = [
                    (s.keys, s.values) if state.layouts[layer_idx] == FULL
                    else (_text_to_full(s.keys, index, state.seq_length), _text_to_full(s.values, index, state.seq_length))
                    for s, state, index in zip(slots, states, text_index)
                ]
                keys, values = in_order([k for k, _ in full]), in_order([v for _, v in full])
            self.update(keys, values, layer_idx)
            for slot in slots:  # the parts are consumed: peak memory stays one layer above the merged cache
                slot.keys = slot.values = None
        cross_kv = {}
        for layer_idx in sorted(set().union(*(s.cross_kv for s in states))):
            reference = next(s.cross_kv[layer_idx][0] for s in states if layer_idx in s.cross_kv)
            empty = [reference.new_zeros(len(rows), reference.shape[1], 0, reference.shape[3]) for rows in groups]
            pairs = [s.cross_kv.get(layer_idx, (e, e)) for s, e in zip(states, empty)]  # a group without visual tokens
            cross_kv[layer_idx] = (in_order([k for k, _ in pairs], visual_width), in_order([v for _, v in pairs], visual_width))
        self.start_prompt(
            layouts=layouts, cross_kv=cross_kv,
            active=in_order([s.active for s in states]),
            configurations=[c for _, c in sorted(zip(order, (c for s in states for c in s.configurations)))],
            configuration_index=in_order([s.configuration_index for s in states]),
            text_valid=in_order([s.text_valid for s in states], text_width),
            full_valid=in_order([s.full_valid for s in states]),
            full_visual=in_order([s.full_visual for s in states]),
            visual_valid=in_order([s.visual_valid for s in states], visual_width),
            computed_layers=[c for _, c in sorted(zip(order, (c for s in states for c in s.computed_layers)))],
        )

    def record_prompt_counts(self, text: list[int], visual: list[int]) -> None:
        """Real text and visual tokens of each prompt (host side, for the FLOPs report; no sync while decoding)."""
        state = self._visor_state
        state.prompt_text, state.prompt_visual = list(text), list(visual)
        state.prompt_length = state.seq_length

    @property
    def layouts(self) -> list[str]:
        return self._visor_state.layouts

    @property
    def configurations(self) -> list[tuple[int, ...]]:
        return self._visor_state.configurations

    @property
    def configuration_index(self) -> torch.Tensor:
        return self._visor_state.configuration_index

    @property
    def visual_valid(self) -> torch.Tensor:
        """`[B, N_vis]` cross-attention key slots that hold a real visual token."""
        return self._visor_state.visual_valid

    def valid_keys(self, layout: str) -> torch.Tensor:
        """`[B, K]` which slots of a `layout` layer hold real tokens (the 2D attention mask of that slot)."""
        return self._visor_state.full_valid if layout == FULL else self._visor_state.text_valid

    def visual_keys_for(self, layer_idx: int) -> torch.Tensor:
        """`[B, K_full]` the visual keys of a full slot that the samples whose configuration does not hold
        `layer_idx` must not see (a device tensor: beams reorder it, no host sync)."""
        state = self._visor_state
        return state.full_visual & ~state.active[:, layer_idx : layer_idx + 1]

    def cross_attention_kv(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Cross-attention keys/values per CA layer (computed once at prefill), apart from the self-attention slots."""
        return self._visor_state.cross_kv

    def check_continues(self, num_layers: int, cross_attention_layers: list[int], batch: int) -> None:
        """Raise a clear error unless this cache can continue a generation of a model with `num_layers` LLM layers and
        these CA layers on a batch of `batch` rows (a cache filled by another model or batch would fail deep inside a
        layer, or silently pair the wrong rows)."""
        state = self._visor_state
        if len(state.layouts) != num_layers or not set(state.cross_kv) <= set(cross_attention_layers):
            raise ValueError(
                f"this VisorCache was filled by a model with another layout ({len(state.layouts)} layers, CA layers "
                f"{sorted(state.cross_kv)}); this model has {num_layers} layers, CA layers {sorted(cross_attention_layers)}"
            )
        if state.text_valid.shape[0] != batch:
            raise ValueError(
                f"this VisorCache holds {state.text_valid.shape[0]} sequences but the input has {batch} rows: continue a "
                "generation with the batch it was started with (beam search and num_return_sequences expand the cache too)"
            )

    def append_text(self, attention_mask: torch.Tensor | None, new: int) -> None:
        """Book `new` text tokens fed after the prefill (their slots are filled by the layers as they run).
        `attention_mask` covers the whole sequence, as in transformers' generation; None: every new token is real."""
        state = self._visor_state
        if attention_mask is not None:
            if attention_mask.shape[1] != state.seq_length + new:
                raise ValueError(
                    f"attention_mask covers {attention_mask.shape[1]} tokens; the cache holds {state.seq_length} and "
                    f"{new} are new: pass the mask of the whole sequence"
                )
            new_valid = attention_mask[:, -new:].bool()
        else:
            new_valid = torch.ones(state.text_valid.shape[0], new, dtype=torch.bool, device=state.text_valid.device)
        state.append_text(new_valid)

    def decode_start(self) -> int | torch.Tensor:
        """Logical position of the first token of the next decoding step (the sequence length so far)."""
        return self._visor_state.seq_length

    def get_seq_length(self, layer_idx: int = 0) -> int:
        if self._visor_state is not None:
            return self._visor_state.seq_length
        return super().get_seq_length(layer_idx)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        # masks are sized on what the layer's own slot holds (text only, or the full sequence)
        if layer_idx < len(self.layers):
            return self.layers[layer_idx].get_seq_length()
        return 0

    def reorder_cache(self, beam_idx: torch.LongTensor):
        super().reorder_cache(beam_idx)
        if self._visor_state is not None:
            # Beams of one sample share its configuration and prompt and beam_idx never crosses samples, so the
            # host-side lists (`HOST_LISTS`) stay valid; reordering them would need a host sync at every step.
            self._visor_state.map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int):
        super().batch_repeat_interleave(repeats)
        if self._visor_state is not None:
            self._visor_state.repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor):
        super().batch_select_indices(indices)
        if self._visor_state is not None:
            self._visor_state.select(indices)

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last `-tokens_to_remove` tokens (a negative count, as `DynamicCache.crop` takes it).

        They must be text tokens in every sample: a text-only slot and a full slot end with the same text tokens,
        but the visual tokens of the prompt sit in full slots only, so cropping into them would leave the layers out
        of step (`ValueError`).
        """
        state = self._visor_state
        if state is not None and tokens_to_remove < 0:
            state.check_crop(-tokens_to_remove)
        super().crop(tokens_to_remove)
        if state is not None:
            state.crop(-tokens_to_remove)

    def layer_layout_bytes(self) -> dict[int, int]:
        """Bytes of keys/values held per LLM layer (self-attention slots only)."""
        sizes = {}
        for index, layer in enumerate(self.layers):
            keys, values = getattr(layer, "keys", None), getattr(layer, "values", None)
            sizes[index] = sum(t.numel() * t.element_size() for t in (keys, values) if isinstance(t, torch.Tensor))
        return sizes

    def cross_attention_bytes(self) -> int:
        if self._visor_state is None:
            return 0
        return sum(t.numel() * t.element_size() for kv in self._visor_state.cross_kv.values() for t in kv)

    def layer_report(self) -> list[dict]:
        """Per LLM layer: its layout, how many positions its slot caches, and its bytes (cross-attention K/V apart)."""
        layouts = self._visor_state.layouts if self._visor_state is not None else []
        sizes = self.layer_layout_bytes()
        report = []
        for index, layer in enumerate(self.layers):
            keys = getattr(layer, "keys", None)
            entry = {
                "layer": index,
                "layout": layouts[index] if index < len(layouts) else None,
                "cached_positions": keys.shape[-2] if isinstance(keys, torch.Tensor) and keys.dim() == 4 else 0,
                "bytes": sizes[index],
            }
            if self._visor_state is not None and index in self._visor_state.cross_kv:
                cross = self._visor_state.cross_kv[index]
                entry["cross_attention_positions"] = cross[0].shape[-2]
                entry["cross_attention_bytes"] = sum(t.numel() * t.element_size() for t in cross)
            report.append(entry)
        return report

    def memory_bytes(self) -> int:
        """Total bytes of cached keys/values (self-attention and cross-attention)."""
        return sum(self.layer_layout_bytes().values()) + self.cross_attention_bytes()


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """Right-aligned slots padded on the left to `width`: dim -2 of a `[B, H, N, D]` K/V, dim 1 of a `[B, N]` mask."""
    if tensor.dim() == 4:
        return nn.functional.pad(tensor, (0, 0, width - tensor.shape[-2], 0))
    return nn.functional.pad(tensor, (width - tensor.shape[1], 0), value=False)


def _text_to_full(states: torch.Tensor, text_index: torch.Tensor, length: int) -> torch.Tensor:
    """A text-only slot's `[B, H, N_text, D]` keys or values at their positions in the full sequence (`length`
    positions; zeros at the visual ones). Empty text slots (`text_index == length`) land in a dropped column."""
    batch, heads, _, dim = states.shape
    full = states.new_zeros(batch, heads, length + 1, dim)
    index = text_index[:, None, :, None].expand(batch, heads, -1, dim)
    return full.scatter(2, index, states)[:, :, :length]


class VisorStaticLayer(StaticLayer):
    """A `StaticLayer` that beam search reorders in place (its buffers keep their address, as CUDA graphs need) and
    that batch expansion / selection can resize."""

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.keys.copy_(self.keys.index_select(0, beam_idx.to(self.keys.device)))
        self.values.copy_(self.values.index_select(0, beam_idx.to(self.values.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.keys = self.keys.repeat_interleave(repeats, dim=0)
        self.values = self.values.repeat_interleave(repeats, dim=0)
        self.batch_size = self.keys.shape[0]

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.keys = self.keys[indices, ...]
        self.values = self.values[indices, ...]
        self.batch_size = self.keys.shape[0]


class VisorStaticCache(VisorCache):
    """A `VisorCache` with static shapes while decoding: `max_cache_len` logical tokens (prompt, visual tokens
    included, plus the new tokens), as transformers' `StaticCache` takes it.

    The prefill fills ordinary slots (their layout, and so their length, is only known once the plan has run);
    `start_prompt` then moves every slot into a pre-allocated buffer with room for the same `max_cache_len - prompt`
    new tokens (a `"full"` slot: `max_cache_len` positions; a `"text"` slot: the prompt's text stream plus that
    room), and the masks of the state into buffers of the same widths. A decoding step writes its keys/values and
    masks at device-side positions (`decode_start` is a device tensor) and keeps the host-side bookkeeping (the
    logical length, the FLOPs of the step) outside any compiled graph, so the step's shapes and guards do not change
    from step to step. `generate(cache_implementation="static")` uses it; it cannot be cropped (assisted decoding).
    """

    def __init__(self, config, max_cache_len: int, **kwargs):
        super().__init__(config=config, **kwargs)
        if max_cache_len <= 0:
            raise ValueError(f"max_cache_len must be positive, got {max_cache_len}")
        self.max_cache_len = max_cache_len
        self._text_end: torch.Tensor | None = None  # next free slot of a "text" layer (device, 0-d)
        self._full_end: torch.Tensor | None = None  # next free slot of a "full" layer = the logical length

    @property
    def is_compileable(self) -> bool:
        # before the prefill its slots are ordinary ones, but `generate` decides whether to compile up front
        return True

    @property
    def is_croppable(self) -> bool:
        return False

    def start_prompt(self, **fields) -> None:
        super().start_prompt(**fields)
        state = self._visor_state
        room = self.max_cache_len - state.seq_length
        if room < 1:
            self._visor_state = None
            raise ValueError(
                f"max_cache_len={self.max_cache_len} leaves no room for a new token after the prompt's "
                f"{state.seq_length} tokens (visual tokens included)"
            )
        for index, layer in enumerate(self.layers):
            static = VisorStaticLayer(max_cache_len=layer.keys.shape[-2] + room)
            static.lazy_initialization(layer.keys, layer.values)
            static.update(layer.keys, layer.values)
            self.layers[index] = static

        def widened(mask: torch.Tensor) -> torch.Tensor:
            return torch.cat([mask, mask.new_zeros(mask.shape[0], room)], dim=1)

        state.text_valid = widened(state.text_valid)
        state.full_valid = widened(state.full_valid)
        state.full_visual = widened(state.full_visual)
        device = state.full_valid.device
        self._text_end = torch.tensor(state.text_valid.shape[1] - room, device=device)
        self._full_end = torch.tensor(state.seq_length, device=device)
        for tensor in (state.text_valid, state.full_valid, self._text_end, self._full_end):
            torch._dynamo.mark_static_address(tensor)

    def decode_start(self) -> torch.Tensor:
        return self._full_end

    @torch.compiler.disable
    def _book_host(self, width: int | None, new: int) -> None:
        """The host-side part of booking `new` tokens (checks, logical length): run eagerly, outside a compiled graph,
        so that no graph reads the growing length."""
        state = self._visor_state
        if state.seq_length + new > self.max_cache_len:
            raise ValueError(
                f"this VisorStaticCache is full: it holds {state.seq_length} of max_cache_len={self.max_cache_len} "
                f"tokens and {new} are new"
            )
        if width is not None and width not in (state.seq_length + new, self.max_cache_len):
            raise ValueError(
                f"attention_mask covers {width} tokens; the cache holds {state.seq_length} and {new} are new: pass the "
                f"mask of the whole sequence (or padded to max_cache_len={self.max_cache_len})"
            )
        state.seq_length += new

    def append_text(self, attention_mask: torch.Tensor | None, new: int) -> None:
        """As `VisorCache.append_text`; `attention_mask` may also be padded to `max_cache_len` (what `generate` passes
        with this cache, so that every step's inputs keep one shape)."""
        state = self._visor_state
        width = None if attention_mask is None else attention_mask.shape[1]
        self._book_host(width, new)
        batch = state.full_valid.shape[0]
        steps = torch.arange(new, device=self._full_end.device)
        full_slots, text_slots = self._full_end + steps, self._text_end + steps
        if attention_mask is None:
            new_valid = torch.ones(batch, new, dtype=torch.bool, device=state.full_valid.device)
        elif width == self.max_cache_len:
            new_valid = attention_mask.gather(1, full_slots[None].expand(batch, -1).to(attention_mask.device)).bool()
        else:
            new_valid = attention_mask[:, -new:].bool()
        new_valid = new_valid.to(state.full_valid.device)
        state.text_valid.index_copy_(1, text_slots, new_valid)
        state.full_valid.index_copy_(1, full_slots, new_valid)
        self._text_end.add_(new)
        self._full_end.add_(new)

    def reorder_cache(self, beam_idx: torch.LongTensor):
        for layer in self.layers:
            layer.reorder_cache(beam_idx)
        if self._visor_state is not None:  # in place: the buffers keep their address
            self._visor_state.map_batch(lambda t: t.copy_(t.index_select(0, beam_idx.to(t.device))))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove < 0 and self._visor_state is not None:
            raise ValueError("a VisorStaticCache cannot be cropped (assisted decoding): use a VisorCache")
        super().crop(tokens_to_remove)


__all__ = ["VisorCache", "VisorStaticCache", "VisorState", "FULL", "TEXT"]

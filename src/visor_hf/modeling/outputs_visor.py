"""Outputs of the VISOR models, and how a forward collects the hidden states and attention weights it returns."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from transformers.models.llava_onevision.modeling_llava_onevision import (
    LlavaOnevisionCausalLMOutputWithPast,
    LlavaOnevisionModelOutputWithPast,
)
from transformers.models.qwen2.modeling_qwen2 import repeat_kv

from .streams_visor import scatter_attention


@dataclass
class VisorModelOutputWithPast(LlavaOnevisionModelOutputWithPast):
    """Output of [`VisorModel`]: LLaVA-OV's fields, then VISOR's.

    last_hidden_state: final-normed hidden states in the original sequence order. Visual positions hold the visual
        tokens' states after the last SA layer that updated them (equal to LLaVA-OV's only in the dense layout).
    hidden_states (`output_hidden_states=True` or indices): the embeddings and the output of every layer (or the
        ones selected), `[B, T, d]` in the original order (the last layer's is `last_hidden_state`).
    attentions (`output_attentions=True`, eager attention; None entries otherwise): per layer `[B, heads, T, T]` in
        the original order at prefill; a text-only layer has zeros in every visual row and column.
    router_logits: `[num_routing_tokens, num_configurations]`, one row per routing token (when the router ran).
    routing_token_batch_index: the sample each row of `router_logits` belongs to.
    visor_configurations: the SA layers that ran for each sample.
    configuration_index: index into `config.configurations` per sample (-1 for a layer set outside the list).
    visor_computed_layers: the layers that ran over each sample's whole sequence at prefill: the union of the SA
        layers of the batch when it ran masked, of its group's when grouped (`visor_batching=`); what its FLOPs count.
    """

    router_logits: torch.Tensor | None = None
    routing_token_batch_index: torch.Tensor | None = None
    visor_configurations: list[tuple[int, ...]] | None = None
    configuration_index: torch.Tensor | None = None
    visor_computed_layers: list[tuple[int, ...]] | None = None


@dataclass
class VisorCausalLMOutputWithPast(LlavaOnevisionCausalLMOutputWithPast):
    """Output of [`VisorForConditionalGeneration`]: LLaVA-OV's `loss`, `logits`, ..., then the VISOR fields of
    [`VisorModelOutputWithPast`] and `flops`.

    logits: `[B, T, vocab]` like LLaVA-OV's. Text positions are VISOR's predictions; visual positions come from the
        visual tokens' last states (meaningful only when the last layer is an active SA layer, as in the dense layout).
    flops: `[B]` int64 (CPU): analytical LLM FLOPs this forward computed for each sample (prefill: the prompt over
        `visor_computed_layers` — a masked mixed batch runs the union of its SA layers for every sample — and the LM
        head on the logits kept; decoding: this step over the cache's full layers). `flops.sum()` is the batch's.
        See `flops_visor`. None in training mode.
    flops_alone: `[B]` the same for each sample as if it ran alone (its own configuration only).
    """

    router_logits: torch.Tensor | None = None
    routing_token_batch_index: torch.Tensor | None = None
    visor_configurations: list[tuple[int, ...]] | None = None
    configuration_index: torch.Tensor | None = None
    visor_computed_layers: list[tuple[int, ...]] | None = None
    flops: torch.Tensor | None = None
    flops_alone: torch.Tensor | None = None


def relaid_attention(module: nn.Module, hidden_states: torch.Tensor, weights: torch.Tensor, index: torch.Tensor, length: int):
    """A text-stream layer's attention, recomputed from its weights laid out in the original order.

    `weights` `[B, H, N, N]` (over the compact text stream at `index`) are laid out as `[B, H, length, length]`,
    read back and multiplied with the values, exactly as eager attention does: the output is bit-identical, and the
    laid-out map is a tensor the layer computed with (`retain_grad()` on it gets the gradient). Empty slots of the
    stream (left fill) read zeros; they are masked for every real token anyway.
    """
    laid = scatter_attention(weights, index, length)
    batch, heads, count, _ = weights.shape
    slots = index.clamp(max=length - 1)
    rows = laid.gather(2, slots[:, None, :, None].expand(batch, heads, count, length))
    again = rows.gather(3, slots[:, None, None, :].expand(batch, heads, count, count))
    filled = index < length
    again = again * (filled[:, None, :, None] & filled[:, None, None, :]).to(again.dtype)
    input_shape = hidden_states.shape[:-1]
    values = module.v_proj(hidden_states).view(*input_shape, -1, module.head_dim).transpose(1, 2)
    output = torch.matmul(again, repeat_kv(values, module.num_key_value_groups)).transpose(1, 2).contiguous()
    return module.o_proj(output.reshape(*input_shape, -1).contiguous()), laid


@contextmanager
def capture_attentions(layers, enabled: bool, text_stream: Callable[[int], tuple[torch.Tensor, int] | None]):
    """Collect the attention weights each decoder layer's `self_attn` returns while the block runs (eager only:
    other implementations return None). A layer that ran over the text stream at prefill (`text_stream(i)` gives
    the stream's positions and the sequence length) returns its map laid out in the original order, recomputed
    from it (`relaid_attention`). The hooks are gone afterwards (not run again by a checkpointed backward)."""
    captured: list = []

    def hook(layer_idx, module, _args, kwargs, output):
        attn_output, weights = output
        stream = text_stream(layer_idx) if weights is not None else None
        if stream is not None:
            attn_output, weights = relaid_attention(module, kwargs["hidden_states"], weights, *stream)
        captured.append(weights)
        return attn_output, weights

    hooks = [
        layer.self_attn.register_forward_hook(partial(hook, i), with_kwargs=True) for i, layer in enumerate(layers)
    ] if enabled else []
    try:
        yield captured
    finally:
        for handle in hooks:
            handle.remove()


def selected_layers(output_hidden_states, num_hidden_states: int) -> set[int] | None:
    """The hidden states `output_hidden_states` selects (transformers' convention: a flag, or an index / a list of
    indices into the tuple of all hidden states, negative ones counted from the end, out-of-range ones dropped);
    None: all of them."""
    if output_hidden_states is None or isinstance(output_hidden_states, bool):
        return None
    indices = [output_hidden_states] if isinstance(output_hidden_states, int) else list(output_hidden_states)
    return {i % num_hidden_states for i in indices if -num_hidden_states <= i < num_hidden_states}


@dataclass
class OutputCapture:
    """The hidden states and attention weights a forward returns, collected layer by layer (None: not asked).

    `output_hidden_states` given as indices keeps only those hidden states (the embeddings are index 0, the output
    of layer i is index i + 1, the last one is `last_hidden_state`): as in transformers, the tuple keeps its full
    length and holds None where a hidden state was not asked for.
    """

    hidden_states: tuple[torch.Tensor, ...] | None
    attentions: tuple[torch.Tensor | None, ...] | None
    selected: set[int] | None = None
    recorded: int = 0  # hidden states seen so far (kept or not)

    @classmethod
    def start(cls, config, output_hidden_states, output_attentions: bool | None) -> OutputCapture:
        if output_hidden_states is None:
            output_hidden_states = config.output_hidden_states
        if output_attentions is None:
            output_attentions = getattr(config, "output_attentions", False)
        selected = selected_layers(output_hidden_states, config.text_config.num_hidden_layers + 1)
        wanted = selected is None and bool(output_hidden_states) or bool(selected)
        return cls(() if wanted else None, () if output_attentions else None, selected)

    def _keep(self, states: Callable[[], torch.Tensor]) -> None:
        if self.hidden_states is not None:
            kept = self.selected is None or self.recorded in self.selected
            self.hidden_states += (states() if kept else None,)
        self.recorded += 1

    def record_input(self, inputs_embeds: torch.Tensor) -> None:
        """The embeddings the streams were taken from (the very tensor, so that `retain_grad()` on it works)."""
        self._keep(lambda: inputs_embeds)

    def record(self, streams, captured: list) -> None:
        """After a layer: its output in the original order, and the attention weights its `self_attn` returned."""
        self._keep(streams.merged)
        if self.attentions is not None:
            self.attentions += (captured.pop() if captured else None,)

    def hidden_states_with(self, last_hidden_state: torch.Tensor) -> tuple[torch.Tensor, ...] | None:
        """As transformers' language models: the last hidden state is the final-normed output (`last_hidden_state`)."""
        if self.hidden_states is None or self.hidden_states[-1] is None:
            return self.hidden_states
        return self.hidden_states[:-1] + (last_hidden_state,)


__all__ = ["OutputCapture", "selected_layers", "VisorCausalLMOutputWithPast", "VisorModelOutputWithPast", "capture_attentions"]

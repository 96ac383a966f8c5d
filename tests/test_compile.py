"""`torch.compile` of VISOR's decoding step and the static cache (docs/generation.md, "Compilation").

A compiled decoding step has no graph break beyond an explicit list, compiles no new graph after the second step
(with `VisorStaticCache`: after the first), and gives the same tokens, logits and FLOPs as eager; the static cache
gives the tokens of the dynamic one.
"""

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import CompileConfig

from samples import ROUTED_ANYRES as ANYRES
from samples import ROUTED_ONE_IMAGE as ONE_IMAGE
from samples import ROUTED_TEXT_ONLY as TEXT_ONLY
from visor_hf.modeling import VisorCache, VisorStaticCache
from visor_hf.testing import (
    IMAGE_ID,
    QWEN_FAMILIES,
    VIDEO_ID,
    build_batch,
    build_qwen_vl_batch,
    tiny_qwen_vl,
    visor_from_llava,
    visor_from_qwen_vl,
    word_ids,
)
from visor_hf.testing import TINY_LAYOUT as LAYOUT

# a mixed batch: a full layer that some samples skip (hidden visual keys), CA layers, text-only layers
REQUEST = [0, [0, 3], "max"]
STEPS = 5
ROOM = 8  # new tokens a static cache has room for
# the graph breaks a compiled decoding step may have: with the static cache, its host-side bookkeeping (the logical
# length and the step's FLOPs, Python ints) runs eagerly, so that no graph reads a number that grows every step
ALLOWED_BREAKS = {"dynamic": (), "static": ("_book_host", "decode_flops_per_sample")}


def _model(llava, implementation="eager"):
    return visor_from_llava(llava, attn_implementation=implementation, **LAYOUT)


def _prefill(model, batch, kind):
    length = batch["input_ids"].shape[1] + ROOM
    cache = (
        VisorStaticCache(config=model.config.text_config, max_cache_len=length)
        if kind == "static"
        else VisorCache(config=model.config.text_config)
    )
    with torch.no_grad():
        out = model(**batch, visor_configuration=REQUEST, past_key_values=cache, logits_to_keep=1)
    return out.logits[:, -1:].argmax(-1), batch["attention_mask"], cache


def _step_function(model):
    def step(token, mask, cache):
        out = model(input_ids=token, attention_mask=mask, past_key_values=cache, logits_to_keep=1)
        return out.logits, out.flops

    return step


def _decode(step, token, mask, cache, pad_to=None, after_step=None):
    """`STEPS` greedy steps; the mask covers the whole sequence (padded to `pad_to` columns, as `generate` passes it
    with a static cache). Returns every step's logits and FLOPs."""
    logits, flops = [], []
    with torch.no_grad():
        for _ in range(STEPS):
            mask = torch.cat([mask, torch.ones_like(token)], 1)
            given = mask if pad_to is None else torch.nn.functional.pad(mask, (0, pad_to - mask.shape[1]))
            step_logits, step_flops = step(token, given, cache)
            logits.append(step_logits)
            flops.append(step_flops)
            token = step_logits[:, -1:].argmax(-1)
            if after_step is not None:
                after_step()
    return logits, flops


@pytest.mark.slow  # 40-60 s: dynamo traces the step two to three times
@pytest.mark.parametrize("kind", ["dynamic", "static"])
def test_a_compiled_decoding_step_equals_eager_without_recompiling(llava, kind):
    torch._dynamo.reset()
    model = _model(llava)
    batch = build_batch(model, [ONE_IMAGE, TEXT_ONLY, ANYRES])
    pad_to = batch["input_ids"].shape[1] + ROOM if kind == "static" else None
    step = _step_function(model)
    expected_logits, expected_flops = _decode(step, *_prefill(model, batch, kind), pad_to=pad_to)

    token, mask, cache = _prefill(model, batch, kind)
    explained = torch._dynamo.explain(step)(token, torch.cat([mask, torch.ones_like(token)], 1), copy.deepcopy(cache))
    for graph_break in explained.break_reasons:
        assert any(name in graph_break.reason for name in ALLOWED_BREAKS[kind]), graph_break.reason
    if kind == "dynamic":
        assert explained.graph_break_count == 0

    counter = CompileCounterWithBackend("aot_eager")
    # the static cache's shapes do not change: no dynamic shapes needed (nor recompilation to find them)
    compiled = torch.compile(step, backend=counter, dynamic=False if kind == "static" else None)
    graphs = []
    logits, flops = _decode(compiled, token, mask, cache, pad_to=pad_to, after_step=lambda: graphs.append(counter.frame_count))
    # dynamic cache: the second step finds the growing lengths dynamic (one recompilation), then nothing new;
    # static cache: nothing new after the first step
    first_stable = 1 if kind == "dynamic" else 0
    assert graphs[first_stable:] == [graphs[first_stable]] * (STEPS - first_stable), graphs
    for step_index, (a, b) in enumerate(zip(logits, expected_logits)):
        assert torch.equal(a, b), f"step {step_index}: {(a - b).abs().max()}"
    assert [f.tolist() for f in flops] == [f.tolist() for f in expected_flops]


@pytest.mark.parametrize("beams", [1, 3])
def test_the_static_cache_generates_what_the_dynamic_one_does(visor, beams):
    batch = build_batch(visor, [ONE_IMAGE, TEXT_ONLY, ANYRES])
    settings = {
        "max_new_tokens": 6,
        "min_new_tokens": 6,
        "do_sample": False,
        "num_beams": beams,
        "visor_configuration": REQUEST,
        "output_scores": True,
        "return_dict_in_generate": True,
    }
    dynamic = visor.generate(**batch, **settings)
    dynamic_report = visor.last_visor_report
    static = visor.generate(**batch, cache_implementation="static", **settings)
    assert type(static.past_key_values) is VisorStaticCache and type(dynamic.past_key_values) is VisorCache
    assert torch.equal(static.sequences, dynamic.sequences)
    # the same keys, plus masked empty slots: equal up to the order of float sums
    torch.testing.assert_close(torch.stack(static.scores), torch.stack(dynamic.scores), atol=1e-5, rtol=1e-5)
    assert visor.last_visor_report == dynamic_report


def test_generate_compiles_the_decoding_step_with_the_static_cache(visor):
    """`generate` compiles the decoding steps itself with a compileable cache (on CPU only when asked to by a
    `CompileConfig`); a second call with the same lengths reuses the graphs."""
    compiled_graphs = []

    def backend(graph, example_inputs, **options):
        compiled_graphs.append(graph)
        return graph.forward

    config = CompileConfig(backend=backend, dynamic=False)
    config._compile_all_devices = True  # generate compiles on accelerators only by default
    batch = build_batch(visor, [ONE_IMAGE, TEXT_ONLY])
    settings = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "visor_configuration": [0, "max"]}
    expected = visor.generate(**batch, cache_implementation="static", **settings)
    torch._dynamo.reset()
    out = visor.generate(**batch, cache_implementation="static", compile_config=config, **settings)
    assert torch.equal(out, expected)
    assert compiled_graphs
    graphs = len(compiled_graphs)
    again = visor.generate(**batch, cache_implementation="static", compile_config=config, **settings)
    assert torch.equal(again, expected)
    assert len(compiled_graphs) == graphs


def test_the_static_cache_refuses_what_it_cannot_hold(visor):
    batch = build_batch(visor, [ONE_IMAGE])
    length = batch["input_ids"].shape[1]
    with torch.no_grad(), pytest.raises(ValueError, match="leaves no room"):
        visor(**batch, past_key_values=VisorStaticCache(config=visor.config.text_config, max_cache_len=length))
    cache = VisorStaticCache(config=visor.config.text_config, max_cache_len=length + 1)
    with torch.no_grad():
        out = visor(**batch, past_key_values=cache)
        token = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(token)], 1)
        with pytest.raises(ValueError, match="covers 3 tokens"):
            visor(input_ids=token, attention_mask=mask[:, :3], past_key_values=cache)
        visor(input_ids=token, attention_mask=mask, past_key_values=cache)
        with pytest.raises(ValueError, match="is full"):
            visor(input_ids=token, attention_mask=torch.cat([mask, mask[:, :1]], 1), past_key_values=cache)
    with pytest.raises(ValueError, match="cannot be cropped"):
        cache.crop(-1)
    assert cache.get_seq_length() == length + 1
    assert [layer.keys.shape[-2] for layer in cache.layers] == [
        length + 1 if layout == "full" else cache.visor_state.text_valid.shape[1] for layout in cache.layouts
    ]


@pytest.mark.slow
def test_an_inductor_compiled_static_decoding_step(llava):
    """The default backend (inductor, CPU): the same tokens as eager, logits within float rounding, one compilation."""
    torch._dynamo.reset()
    model = _model(llava, "sdpa")
    batch = build_batch(model, [ONE_IMAGE, TEXT_ONLY, ANYRES])
    pad_to = batch["input_ids"].shape[1] + ROOM
    step = _step_function(model)
    expected, _ = _decode(step, *_prefill(model, batch, "static"), pad_to=pad_to)
    counter = CompileCounterWithBackend("inductor")
    graphs = []
    compiled = torch.compile(step, backend=counter, dynamic=False)
    logits, _ = _decode(
        compiled, *_prefill(model, batch, "static"), pad_to=pad_to, after_step=lambda: graphs.append(counter.frame_count)
    )
    assert graphs == [graphs[0]] * STEPS
    for a, b in zip(logits, expected):
        assert torch.equal(a.argmax(-1), b.argmax(-1))
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", QWEN_FAMILIES)
def test_the_static_cache_on_the_qwen_vl_backbone(family):
    """The M-RoPE backbone: `generate` with the static cache equals the dynamic one, and a hand-written step without
    position ids continues from the static cache's device-side length as from the dynamic cache's."""
    model = visor_from_qwen_vl(tiny_qwen_vl(family), **LAYOUT)
    image = {"text": [*word_ids("user"), "<image>", *word_ids("what is this ?")], "images": [(16, 40)], "seed": 0}
    batch = build_qwen_vl_batch([image, {"text": word_ids("user how many circle are there ?"), "seed": 1}])
    settings = {
        "max_new_tokens": 4,
        "min_new_tokens": 4,
        "do_sample": False,
        "visor_configuration": [1, "max"],
        "suppress_tokens": [IMAGE_ID, VIDEO_ID],
        "output_scores": True,
        "return_dict_in_generate": True,
    }
    dynamic = model.generate(**batch, **settings)
    static = model.generate(**batch, cache_implementation="static", **settings)
    assert type(static.past_key_values) is VisorStaticCache
    assert torch.equal(static.sequences, dynamic.sequences)
    torch.testing.assert_close(torch.stack(static.scores), torch.stack(dynamic.scores), atol=1e-5, rtol=1e-5)
    length = batch["input_ids"].shape[1] + 2
    steps = []
    for cache in (None, VisorStaticCache(config=model.config.text_config, max_cache_len=length)):
        with torch.no_grad():
            out = model(**batch, visor_configuration=1, past_key_values=cache)
            token = out.logits[:, -1:].argmax(-1)
            mask = torch.cat([batch["attention_mask"], torch.ones_like(token)], 1)
            steps.append(model(input_ids=token, attention_mask=mask, past_key_values=out.past_key_values).logits)
    torch.testing.assert_close(steps[1], steps[0], atol=1e-5, rtol=1e-5)

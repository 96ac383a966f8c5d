"""The layer-sparse VisorCache (contents, memory, beam/batch/crop operations) and the FLOPs functions."""

import pytest
import torch
from transformers import DynamicCache, LlavaOnevisionConfig, Qwen2Config

from samples import ROUTED_ANYRES as ANYRES
from samples import ROUTED_ONE_IMAGE as ONE_IMAGE
from samples import ROUTED_TEXT_ONLY as TEXT_ONLY
from samples import recorded_host_syncs
from visor_hf.modeling import FlopsShape, VisorCache, VisorStaticCache, decode_flops, prefill_flops, vision_flops
from visor_hf.testing import TINY_LAYOUT as LAYOUT
from visor_hf.testing import build_batch, tiny_llava_config, visor_from_llava


def _prefill(model, batch, configuration, batching="auto"):
    with torch.no_grad():
        return model(**batch, visor_configuration=configuration, use_cache=True, logits_to_keep=1, visor_batching=batching)


def _step(model, out, attention_mask):
    token = out.logits[:, -1:].argmax(-1)
    mask = torch.cat([attention_mask, torch.ones_like(token)], 1)
    with torch.no_grad():
        return model(input_ids=token, attention_mask=mask, past_key_values=out.past_key_values, logits_to_keep=1), mask


def _positions(cache):
    return [layer.keys.shape[-2] for layer in cache.layers]


@pytest.mark.parametrize(
    "request_, full_layers, batching",
    [
        ([0, 0, 0], {0}, "auto"),
        ([[], [], []], set(), "auto"),
        # masked: a layer that any sample runs is full, also one that only the text-only sample asks for (3);
        # grouped: full where a group with visual tokens ran it
        ([0, [], 1], {0, 3}, "masked"),
        ([0, [], 1], {0}, "grouped"),
        (["max", 0, []], {0, 2, 3, 5}, "auto"),
    ],
    ids=["all-[0]", "ca-only", "mixed-masked", "mixed-grouped", "max"],
)
def test_visual_keys_are_cached_only_where_used(visor, request_, full_layers, batching):
    batch = build_batch(visor, [ONE_IMAGE, ANYRES, TEXT_ONLY])
    length = batch["input_ids"].shape[1]
    visual = (batch["input_ids"] == visor.config.image_token_id).sum(1)
    width_text = int((~(batch["input_ids"] == visor.config.image_token_id)).sum(1).max())
    width_visual = int(visual.max())
    out = _prefill(visor, batch, request_, batching)
    cache = out.past_key_values
    assert isinstance(cache, VisorCache)
    state = cache.visor_state
    expected = [length if i in full_layers else width_text for i in range(6)]
    assert _positions(cache) == expected
    assert state.layouts == ["full" if i in full_layers else "text" for i in range(6)]
    assert sorted(state.cross_kv) == [1, 4]
    for key, value in state.cross_kv.values():
        assert key.shape[-2] == value.shape[-2] == width_visual
    # decoding appends one position to every slot, visual keys are never added
    step, mask = _step(visor, out, batch["attention_mask"])
    assert _positions(cache) == [n + 1 for n in expected]
    assert cache.get_seq_length() == length + 1
    step, mask = _step(visor, step, mask)
    assert _positions(cache) == [n + 2 for n in expected]
    # memory: every self-attention slot and the cross-attention K/V, reported per layer
    report = cache.layer_report()
    assert sum(r["bytes"] for r in report) + cache.cross_attention_bytes() == cache.memory_bytes()
    assert [r["cached_positions"] for r in report] == [n + 2 for n in expected]
    per_position = 2 * 2 * 8 * 4  # (k, v) x kv_heads x head_dim x float32 bytes, batch of 3
    assert report[2]["bytes"] == 3 * per_position * (expected[2] + 2)


def test_sparse_cache_is_smaller_than_the_dense_one(llava, visor):
    dense = visor_from_llava(llava)
    batch = build_batch(visor, [ONE_IMAGE, ANYRES])
    sparse_bytes = _prefill(visor, batch, 0).past_key_values.memory_bytes()
    dense_cache = _prefill(dense, batch, None).past_key_values
    dense_bytes = dense_cache.memory_bytes()
    assert _positions(dense_cache) == [batch["input_ids"].shape[1]] * 6
    assert sparse_bytes < dense_bytes


def test_a_filled_foreign_cache_is_refused_and_an_empty_one_replaced(visor):
    batch = build_batch(visor, [ONE_IMAGE])
    out = _prefill(visor, {**batch, "past_key_values": DynamicCache()}, 0)
    assert isinstance(out.past_key_values, VisorCache)
    filled = DynamicCache()
    filled.update(torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8), 0)
    with pytest.raises(ValueError, match="needs a VisorCache"):
        _prefill(visor, {**batch, "past_key_values": filled}, 0)


def test_repeat_select_reorder_keep_each_row_consistent(visor):
    batch = build_batch(visor, [ONE_IMAGE, ANYRES])
    out = _prefill(visor, batch, torch.tensor([0, 1]))
    cache = out.past_key_values
    cache.batch_repeat_interleave(2)
    state = cache.visor_state
    assert state.configurations == [(0,), (0,), (0, 3), (0, 3)]
    assert state.active.shape[0] == state.text_valid.shape[0] == 4
    assert all(k.shape[0] == 4 for k, _ in state.cross_kv.values())
    assert state.prompt_text == [visor._prompt_token_counts(batch["input_ids"], batch["attention_mask"])[0][i] for i in (0, 0, 1, 1)]
    # a beam reorder within each sample: the rows swap, the per-sample host lists stay valid
    cache.reorder_cache(torch.tensor([1, 0, 3, 2]))
    assert state.configurations == [(0,), (0,), (0, 3), (0, 3)]
    cache.batch_select_indices(torch.tensor([2]))
    assert state.configurations == [(0, 3)]
    assert cache.layers[0].keys.shape[0] == 1 and state.full_valid.shape[0] == 1

    # the selected row decodes exactly like the second sample prefilled alone
    alone = _prefill(visor, build_batch(visor, [ANYRES]), 1)
    mask = batch["attention_mask"][1:]
    token = alone.logits[:, -1:].argmax(-1)
    with torch.no_grad():
        a = visor(input_ids=token, attention_mask=torch.cat([mask, torch.ones_like(token)], 1), past_key_values=cache)
        b = visor(input_ids=token, past_key_values=alone.past_key_values,
                  attention_mask=torch.ones(1, alone.past_key_values.get_seq_length() + 1, dtype=torch.long))
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)


def test_crop_rolls_back_decoding_steps(visor):
    batch = build_batch(visor, [ONE_IMAGE, TEXT_ONLY])
    out = _prefill(visor, batch, torch.tensor([1, 0]))
    cache = out.past_key_values
    start = _positions(cache)
    tokens = torch.tensor([[10, 11, 12], [13, 14, 15]])
    mask = torch.cat([batch["attention_mask"], torch.ones_like(tokens)], 1)
    with torch.no_grad():
        first = visor(input_ids=tokens, attention_mask=mask, past_key_values=cache).logits
    cache.crop(-2)
    assert _positions(cache) == [n + 1 for n in start]
    assert cache.get_seq_length() == batch["input_ids"].shape[1] + 1
    with torch.no_grad():
        again = visor(input_ids=tokens[:, 1:], attention_mask=mask, past_key_values=cache).logits
    torch.testing.assert_close(again, first[:, 1:], atol=1e-5, rtol=1e-5)


def test_prompt_lookup_decoding_equals_greedy(visor):
    batch = build_batch(visor, [ONE_IMAGE])
    greedy = visor.generate(**batch, max_new_tokens=8, min_new_tokens=8, do_sample=False, visor_configuration=1)
    assisted = visor.generate(**batch, max_new_tokens=8, min_new_tokens=8, do_sample=False, visor_configuration=1,
                              prompt_lookup_num_tokens=3)
    assert torch.equal(greedy, assisted)


# --------------------------------------------------------------------------------------------------------------
# FLOPs functions


def test_flops_shape_from_every_config_kind(visor):
    llava_config = tiny_llava_config()
    shapes = [FlopsShape.from_config(visor.config), FlopsShape.from_config(llava_config)]
    shapes.append(FlopsShape.from_config(Qwen2Config(**llava_config.text_config.to_dict())))
    assert shapes[0] == shapes[1] == shapes[2]
    shape = FlopsShape.from_config(visor.config)
    assert (shape.num_layers, shape.hidden_size, shape.num_heads, shape.num_kv_heads, shape.head_dim) == (6, 32, 4, 2, 8)
    assert isinstance(llava_config, LlavaOnevisionConfig)


def test_prefill_and_decode_flops_by_hand():
    shape = FlopsShape(num_layers=2, hidden_size=4, intermediate_size=8, num_heads=2, num_kv_heads=1, head_dim=2, vocab_size=10)
    # per token and layer: q 4x4, k 4x2, v 4x2, o 4x4, mlp 3x4x8 multiply-adds
    per_token = 2 * (16 + 8 + 8 + 16 + 96)
    attention = lambda pairs: 4 * pairs * 2 * 2  # noqa: E731
    n_text, n_visual = 3, 5
    dense = 2 * (8 * per_token + attention(8 * 9 // 2)) + 2 * 4 * 10
    assert prefill_flops(shape, n_text, n_visual) == dense
    assert prefill_flops(shape, n_text, n_visual, sa_layers=[0, 1]) == dense  # all SA, no CA = dense
    text_layer = 3 * per_token + attention(6)
    assert prefill_flops(shape, n_text, n_visual, sa_layers=[0]) == (8 * per_token + attention(36)) + text_layer + 80
    # q, o over text; position conv (kernel 7, depth-wise) and k, v over visual; 3 x 5 pairs
    cross = 2 * 3 * (16 + 16) + 2 * 7 * 4 * 5 + 2 * 5 * 2 * 8 + attention(15)
    assert prefill_flops(shape, n_text, n_visual, sa_layers=[], ca_layers=[1]) == 2 * text_layer + cross + 80
    assert prefill_flops(shape, n_text, 0, sa_layers=[0], ca_layers=[1]) == 2 * text_layer + 80  # text only
    assert prefill_flops(shape, n_text, n_visual, lm_head_tokens=8) == dense + 7 * 80
    # decode: the new token sees the context and itself; CA reuses the cached visual K/V
    assert decode_flops(shape, 3, 5) == 2 * (per_token + attention(9)) + 80
    assert decode_flops(shape, 3, 5, sa_layers=[], ca_layers=[0]) == 2 * (per_token + attention(4)) + 2 * 32 + attention(5) + 80
    steps = [decode_flops(shape, 3 + k, 5, sa_layers=[0], ca_layers=[1]) for k in range(4)]
    assert len({b - a for a, b in zip(steps, steps[1:])}) == 1  # linear in the context


def test_vision_flops(visor):
    config = visor.config
    vision = config.vision_config  # 16 px, patch 4 -> 16 patches, width 16, ffn 32, 2 layers
    patches, d = 16, 16
    per_crop = 2 * patches * 3 * 16 * d + 2 * (2 * patches * (4 * d * d + 2 * d * 32) + 4 * patches * patches * d)
    assert vision_flops(vision, 1) == per_crop
    assert vision_flops(vision, 5) == 5 * per_crop
    projector = 2 * patches * (d * 32 + 32 * 32)
    assert vision_flops(config, 2) == 2 * (per_crop + projector)
    assert vision_flops(vision, 2, projector_out=32) == 2 * (per_crop + projector)


def test_generation_continues_from_a_returned_cache(visor):
    batch = build_batch(visor, [ONE_IMAGE, ANYRES])
    request = torch.tensor([0, 1])
    first = visor.generate(**batch, max_new_tokens=3, min_new_tokens=3, visor_configuration=request,
                           return_dict_in_generate=True)
    sequence = torch.cat([first.sequences, torch.tensor([[10, 11], [12, 13]])], 1)
    mask = torch.ones_like(sequence)
    mask[:, : batch["attention_mask"].shape[1]] = batch["attention_mask"]
    # the cached decision holds: no images and no configuration are needed for the second turn
    cont = visor.generate(input_ids=sequence, attention_mask=mask, past_key_values=first.past_key_values,
                          max_new_tokens=4, min_new_tokens=4)
    assert visor.last_visor_report.configurations == [(0,), (0, 3)]
    ref = visor.generate(input_ids=sequence, attention_mask=mask, pixel_values=batch["pixel_values"],
                         image_sizes=batch["image_sizes"], visor_configuration=request, max_new_tokens=4,
                         min_new_tokens=4, use_cache=False)
    assert torch.equal(cont, ref)


@pytest.mark.parametrize("static", [False, True], ids=["VisorCache", "VisorStaticCache"])
@pytest.mark.parametrize("implementation", ["eager", "sdpa"])
def test_a_decoding_step_makes_no_host_sync(llava, implementation, static):
    model = visor_from_llava(llava, attn_implementation=implementation, **LAYOUT)
    batch = build_batch(model, [ONE_IMAGE, ANYRES, TEXT_ONLY])
    length = batch["input_ids"].shape[1] + 4
    cache = VisorStaticCache(config=model.config.text_config, max_cache_len=length) if static else None
    with torch.no_grad():
        out = model(**batch, visor_configuration=torch.tensor([0, 1, 2]), past_key_values=cache, logits_to_keep=1)
    token = out.logits[:, -1:].argmax(-1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(token)], 1)
    with recorded_host_syncs() as calls, torch.no_grad():
        step = model(input_ids=token, attention_mask=mask, past_key_values=out.past_key_values, logits_to_keep=1)
    assert calls == []
    assert step.flops.shape == (3,)


def test_a_cache_from_another_model_or_batch_is_refused_clearly(llava, visor, dense):
    """A filled cache continued by a model of another layout, or with another number of rows, stops with an error that
    names the mismatch (not a KeyError / shape error deep inside a layer)."""
    batch = build_batch(visor, [ONE_IMAGE, TEXT_ONLY])
    with torch.no_grad():
        prompt = visor(**batch, visor_configuration="max", use_cache=True)
        token = prompt.logits[:, -1:].argmax(-1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(token)], dim=1)
        with pytest.raises(ValueError, match="filled by a model with another layout"):
            dense(input_ids=token, attention_mask=mask, past_key_values=prompt.past_key_values)
        other = visor_from_llava(
            llava, cross_attention_layers=[4], self_attention_layers=[0, 1, 2, 3, 5], configurations=[[0, 1, 2, 3, 5]]
        )
        with pytest.raises(ValueError, match="CA layers"):
            other(input_ids=token, attention_mask=mask, past_key_values=prompt.past_key_values)
        with pytest.raises(ValueError, match="holds 2 sequences but the input has 1 rows"):
            visor(input_ids=token[:1], attention_mask=mask[:1], past_key_values=prompt.past_key_values)
        # the cache is left as it was: the right batch still continues
        visor(input_ids=token, attention_mask=mask, past_key_values=prompt.past_key_values)


@pytest.mark.parametrize("how", ["static", "offloaded", "offloaded_static", "static_cache_object", "dynamic_cache_object"])
def test_a_replaced_user_cache_is_named_in_a_warning(visor, how):
    """A cache laid out before the prefill cannot hold VISOR's per-sample layout: generate replaces it with a VISOR
    cache (a `VisorStaticCache` of the same length for a static one), answers as with the default cache, and names
    in a warning what it replaced and why unless the replacement is what was asked (`"static"`)."""
    from transformers import DynamicCache, StaticCache
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging

    from visor_hf.modeling import VisorStaticCache

    batch = build_batch(visor, [ONE_IMAGE])
    length = batch["input_ids"].shape[1] + 4
    asked = {
        "static": {"cache_implementation": "static"},
        "offloaded": {"cache_implementation": "offloaded"},
        "offloaded_static": {"cache_implementation": "offloaded_static"},
        "static_cache_object": {"past_key_values": StaticCache(config=visor.config.text_config, max_cache_len=length)},
        "dynamic_cache_object": {"past_key_values": DynamicCache(config=visor.config.text_config, offloading=True)},
    }[how]
    expected = visor.generate(**batch, max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
    logger = logging.get_logger("visor_hf.modeling.generation_visor")
    with CaptureLogger(logger) as captured:
        out = visor.generate(
            **batch, max_new_tokens=3, do_sample=False, output_scores=True, return_dict_in_generate=True, **asked
        )
    assert torch.equal(out.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(out.scores), torch.stack(expected.scores), atol=1e-5, rtol=1e-5)
    static = how in ("static", "offloaded_static", "static_cache_object")
    assert type(out.past_key_values) is (VisorStaticCache if static else VisorCache)
    warning = {
        "static": None,
        "offloaded": "VISOR replaces cache_implementation='offloaded' with a VisorCache: it does not offload",
        "offloaded_static": "VISOR replaces cache_implementation='offloaded_static' with a VisorStaticCache(max_cache_len=",
        "static_cache_object": f"VISOR replaces the given StaticCache with a VisorStaticCache(max_cache_len={length})",
        "dynamic_cache_object": "VISOR replaces the given DynamicCache with a VisorCache: it does not offload",
    }[how]
    if warning is None:
        assert "replaces" not in captured.out
    else:
        assert warning in captured.out
    with CaptureLogger(logger) as quiet:
        visor.generate(**batch, max_new_tokens=3, do_sample=False)
    assert "replaces" not in quiet.out  # the default cache is replaced silently

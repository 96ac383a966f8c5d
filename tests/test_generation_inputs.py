"""Generation with inputs and modes beyond `test_generation.py` (issue 3; docs/generation.md): bf16, tied
embeddings, transformers' own tiny LLaVA-OV test configuration, `inputs_embeds`, videos, adjacent images with beams,
hidden states, the compute budget without a cache, assisted decoding with a draft LM and cropping into the prompt.

Each test compares with an independent reference: LLaVA-OV's own `generate`, recomputation without a cache, the
same sample alone or a fresh prefill. Logits/scores are compared, not only tokens: a tiny random model often picks
the same tokens from the wrong images.
"""

import pytest
import torch
from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2ForCausalLM

from samples import ROUTED_ANYRES as ANYRES
from samples import ROUTED_ONE_IMAGE as ONE_IMAGE
from samples import ROUTED_TEXT_ONLY as TEXT_ONLY
from samples import ROUTED_TWO_IMAGES as TWO_IMAGES
from visor_hf.modeling import FlopsShape, VisorCache, VisorStaticCache, prefill_flops
from visor_hf.modeling.flops_visor import configuration_costs
from visor_hf.testing import ROUTE_ID, VIDEO_ID, build_batch, tiny_llava, visor_from_llava, word_ids
from visor_hf.testing import TINY_LAYOUT as LAYOUT

# two images with no text between them, as LLaVA-OV's chat template puts a message's images
ADJACENT = {"text": [*word_ids("user"), "<image>", "<image>", *word_ids("what is this ?"), ROUTE_ID], "images": [(16, 16), (40, 24)], "seed": 5}
MIXED = [ONE_IMAGE, ANYRES, TWO_IMAGES, TEXT_ONLY]
REQUEST = [0, [], 2, 1]  # one forced configuration per sample of MIXED (CA-only for the anyres one)
NEW = 5


def _run(model, batch, **kwargs):
    options = {"max_new_tokens": NEW, "min_new_tokens": NEW, "output_logits": True, "return_dict_in_generate": True}
    return model.generate(**batch, **{**options, **kwargs})


def _assert_same(actual, expected, atol=1e-5):
    assert torch.equal(actual.sequences, expected.sequences)
    assert len(actual.logits) == len(expected.logits)
    for step, (a, b) in enumerate(zip(actual.logits, expected.logits)):
        torch.testing.assert_close(a, b, atol=atol, rtol=atol, msg=lambda m, step=step: f"step {step}: {m}")


def _cached_equals_recomputed(model, batch, atol=1e-5, **kwargs):
    cached = _run(model, batch, **kwargs)
    assert isinstance(cached.past_key_values, VisorCache)
    _assert_same(cached, _run(model, batch, use_cache=False, **kwargs), atol)
    return cached


# --------------------------------------------------------------------------------------------------------------
# Dtypes, tied embeddings, transformers' own tiny configuration


def test_bf16_generation():
    half = tiny_llava(seed=0).to(torch.bfloat16)
    visor = visor_from_llava(half, **LAYOUT)
    batch = build_batch(visor, MIXED)
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    out = _cached_equals_recomputed(visor, batch, atol=1e-2, visor_configuration=REQUEST)
    cache = out.past_key_values
    assert {layer.keys.dtype for layer in cache.layers} == {torch.bfloat16}
    assert {k.dtype for kv in cache.visor_state.cross_kv.values() for k in kv} == {torch.bfloat16}
    # dense equivalence in bf16, against LLaVA-OV's own generate
    _assert_same(_run(visor_from_llava(half), batch), _run(half, batch), atol=1e-2)


def test_tied_embeddings_dense_generate_equals_llava_onevision():
    llava = tiny_llava(seed=0, tie_word_embeddings=True)
    dense = visor_from_llava(llava)
    assert dense.lm_head.weight is dense.model.language_model.embed_tokens.weight
    batch = build_batch(llava, [ONE_IMAGE, TWO_IMAGES, TEXT_ONLY])
    _assert_same(_run(dense, batch), _run(llava, batch))
    beams = {"num_beams": 2, "num_return_sequences": 2, "output_scores": True}
    expected, actual = _run(llava, batch, **beams), _run(dense, batch, **beams)
    assert torch.equal(actual.sequences, expected.sequences)
    torch.testing.assert_close(actual.sequences_scores, expected.sequences_scores, atol=1e-5, rtol=1e-5)


def _transformers_tester_llava():
    """`LlavaOnevisionVisionText2TextModelTester`'s configuration (transformers' tests): CLIP tower, patch 8, image
    token id 1, 2 Qwen2 layers with 4 KV heads, vocabulary of 99."""
    text_config = {
        "model_type": "qwen2", "vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "intermediate_size": 37, "hidden_act": "gelu", "max_position_embeddings": 580,
        "initializer_range": 0.02, "pad_token_id": 0,
    }
    vision_config = {
        "image_size": 16, "patch_size": 8, "num_channels": 3, "hidden_size": 32, "projection_dim": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37, "initializer_range": 0.02,
    }
    config = LlavaOnevisionConfig(
        text_config=text_config, vision_config=vision_config, image_token_index=1, projector_hidden_act="gelu",
        vision_feature_select_strategy="full", vision_feature_layer=-1, image_grid_pinpoints=[[16, 16]],
    )
    torch.manual_seed(0)
    return LlavaOnevisionForConditionalGeneration._from_config(config, attn_implementation="eager").eval()


def test_transformers_tiny_llava_onevision_configuration():
    llava = _transformers_tester_llava()
    torch.manual_seed(1)
    pixel_values = torch.rand(3, 3, 3, 16, 16)
    image_sizes = torch.tensor([[45, 45]] * 3)
    with torch.no_grad():
        features = llava.model.get_image_features(pixel_values, image_sizes, return_dict=True).pooler_output
    image_tokens = features[0].shape[0]
    input_ids = torch.randint(2, 97, (3, image_tokens + 7))
    input_ids[:, :image_tokens] = 1  # the image first, as the tester puts it
    input_ids[2] = torch.cat([torch.zeros(3, dtype=torch.long), input_ids[2, :-3]])  # a left-padded row
    batch = {"input_ids": input_ids, "attention_mask": (input_ids != 0).long(), "pixel_values": pixel_values,
             "image_sizes": image_sizes}
    dense = visor_from_llava(llava)
    _assert_same(_run(dense, batch), _run(llava, batch))
    beams = {"num_beams": 2, "num_return_sequences": 2, "output_scores": True}
    expected, actual = _run(llava, batch, **beams), _run(dense, batch, **beams)
    assert torch.equal(actual.sequences, expected.sequences)
    torch.testing.assert_close(actual.sequences_scores, expected.sequences_scores, atol=1e-5, rtol=1e-5)
    visor = visor_from_llava(llava, cross_attention_layers=[1], self_attention_layers=[0], configurations=[[], [0]])
    out = _cached_equals_recomputed(visor, batch, visor_configuration=torch.tensor([0, 1, 0]))
    assert out.visor_report.configurations == [(), (0,), ()]


# --------------------------------------------------------------------------------------------------------------
# Inputs: inputs_embeds, videos, several adjacent images with beams


def test_generate_from_inputs_embeds(llava, dense, visor):
    batch = build_batch(llava, MIXED)
    embeds = {
        "inputs_embeds": llava.get_input_embeddings()(batch["input_ids"]),
        **{k: v for k, v in batch.items() if k != "input_ids"},
    }
    # dense: the same new tokens and logits as LLaVA-OV from the same embeddings, also with beams (the images of
    # the two-image sample must follow it into its beams)
    _assert_same(_run(dense, embeds), _run(llava, embeds))
    _assert_same(_run(dense, embeds, num_beams=2), _run(llava, embeds, num_beams=2))
    # VISOR: the same as from input_ids (generate returns only the new tokens for inputs_embeds)
    from_embeds = _run(visor, embeds, visor_configuration=REQUEST)
    from_ids = _run(visor, batch, visor_configuration=REQUEST)
    assert torch.equal(from_embeds.sequences, from_ids.sequences[:, -NEW:])
    for a, b in zip(from_embeds.logits, from_ids.logits):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert from_embeds.visor_report.configurations == from_ids.visor_report.configurations
    assert from_embeds.visor_report.prefill_flops == from_ids.visor_report.prefill_flops
    # the router finds the routing tokens and the budget counts the tokens in the embeddings too
    routed = visor_from_llava(llava, **LAYOUT)
    with torch.no_grad():
        routed.model.router.fc2.weight.zero_()
        routed.model.router.fc2.bias.copy_(torch.tensor([0.0, 0.0, 5.0]))
    ratios = _ratios(routed, batch)
    for options in ({}, {"visor_budget": [ratios[0][0] + 1e-9, ratios[1][1] + 1e-9, 1.0, 0.5]}):
        from_embeds, from_ids = _run(routed, embeds, **options), _run(routed, batch, **options)
        assert from_embeds.visor_report.configurations == from_ids.visor_report.configurations
        assert torch.equal(from_embeds.sequences, from_ids.sequences[:, -NEW:])
    assert from_ids.visor_report.configuration_index[:3] == [0, 1, 2]


def test_generate_with_a_video(llava, dense, visor):
    torch.manual_seed(0)
    frames = torch.rand(1, 2, 3, 16, 16)
    with torch.no_grad():
        tokens = llava.model.get_video_features(frames, return_dict=True).pooler_output.flatten(0, 1).shape[0]
    ids = torch.tensor([[*word_ids("user"), *[VIDEO_ID] * tokens, *word_ids("describe this ?"), ROUTE_ID]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": frames}
    _assert_same(_run(dense, batch), _run(llava, batch))
    out = _cached_equals_recomputed(visor, batch, visor_configuration=1)
    assert out.visor_report.num_visual_tokens == [tokens]


@pytest.mark.parametrize("options", [{"num_beams": 2}, {"do_sample": True, "num_return_sequences": 2}], ids=["beams", "sampling"])
def test_adjacent_images_follow_their_sample_into_beams_and_copies(llava, dense, visor, options):
    batch = build_batch(llava, [ADJACENT, ONE_IMAGE, TEXT_ONLY])
    torch.manual_seed(0)
    expected = _run(llava, batch, **options)
    torch.manual_seed(0)
    _assert_same(_run(dense, batch, **options), expected)
    # sparse VISOR: every copy of a sample equals the sample alone (greedy beams only: sampling draws differ)
    if "num_beams" in options:
        request = torch.tensor([1, 0, 2])
        together = _run(visor, batch, visor_configuration=request, **options)
        for i, sample in enumerate([ADJACENT, ONE_IMAGE, TEXT_ONLY]):
            alone = _run(visor, build_batch(visor, [sample]), visor_configuration=request[i : i + 1], **options)
            assert torch.equal(together.sequences[i, -NEW:], alone.sequences[0, -NEW:])
            for a, b in zip(together.logits, alone.logits):
                torch.testing.assert_close(a[2 * i : 2 * i + 2], b, atol=1e-4, rtol=1e-4)


def test_per_sample_requests_follow_their_sample_into_beams(visor):
    samples = [ONE_IMAGE, ANYRES, TEXT_ONLY]
    batch = build_batch(visor, samples)
    for request in (torch.tensor([0, 2, 1]), ["max", [], 0]):
        together = visor.generate(**batch, max_new_tokens=4, num_beams=3, num_return_sequences=2,
                                  visor_configuration=request, output_scores=True, return_dict_in_generate=True)
        for i, sample in enumerate(samples):
            alone = visor.generate(**build_batch(visor, [sample]), max_new_tokens=4, num_beams=3, num_return_sequences=2,
                                   visor_configuration=request[i : i + 1] if isinstance(request, torch.Tensor) else request[i],
                                   output_scores=True, return_dict_in_generate=True)
            assert together.visor_report.configurations[2 * i : 2 * i + 2] == alone.visor_report.configurations
            assert torch.equal(together.sequences[2 * i : 2 * i + 2, -4:], alone.sequences[:, -4:])
            torch.testing.assert_close(together.sequences_scores[2 * i : 2 * i + 2], alone.sequences_scores, atol=1e-5, rtol=1e-5)


def test_decoding_hidden_states_equal_llava_onevision(llava, dense):
    batch = build_batch(llava, [ONE_IMAGE, TWO_IMAGES, TEXT_ONLY])
    expected = _run(llava, batch, output_hidden_states=True)
    actual = _run(dense, batch, output_hidden_states=True)
    assert len(actual.hidden_states) == len(expected.hidden_states) == NEW
    for step, (a, b) in enumerate(zip(actual.hidden_states, expected.hidden_states)):
        assert len(a) == len(b) == 7  # embeddings + 6 layers, the last one final-normed
        for layer, (x, y) in enumerate(zip(a, b)):
            # prefill: compare the real (unpadded) positions only
            keep = batch["attention_mask"].bool() if step == 0 else torch.ones(x.shape[:2], dtype=torch.bool)
            torch.testing.assert_close(x[keep], y[keep], atol=1e-5, rtol=1e-5, msg=lambda m, s=step, k=layer: f"step {s} layer {k}: {m}")


# --------------------------------------------------------------------------------------------------------------
# Compute budget: one decision per sample, whatever the batch and with or without a cache


def _ratios(model, batch):
    shape = FlopsShape.from_config(model.config)
    counts = model._prompt_token_counts(batch["input_ids"], batch["attention_mask"])
    return [[c / prefill_flops(shape, t, v) for c in configuration_costs(model.config, t, v)] for t, v in zip(*counts)]


def test_budget_choices_are_per_sample_in_a_batch_without_text_only_samples(visor):
    batch = build_batch(visor, [ONE_IMAGE, ANYRES])
    ratios = _ratios(visor, batch)
    # budgets that pick configuration 1 for the first sample and 2 for the second: as indices, [1, 2] would also
    # read as the layer set {1, 2} (not SA layers), [0] as the layer set {0}
    budgets = [ratios[0][1] + 1e-9, 1.0]
    out = _run(visor, batch, visor_budget=budgets)
    assert out.visor_report.configuration_index == [1, 2]
    _assert_same(out, _run(visor, batch, visor_configuration=torch.tensor([1, 2])))
    single = build_batch(visor, [ANYRES])
    out = _run(visor, single, visor_budget=_ratios(visor, single)[0][1] + 1e-9)
    assert out.visor_report.configuration_index == [1]
    _assert_same(out, _run(visor, single, visor_configuration=1))


def test_budget_without_cache_keeps_the_prefill_decision(visor):
    # just above configuration 1's ratio: as the answer grows (more text), configuration 1 costs a larger fraction
    # of the dense FLOPs; the decision must still be the one taken on the prompt
    batch = build_batch(visor, [ONE_IMAGE])
    budget = _ratios(visor, batch)[0][1] + 1e-9
    cached = _run(visor, batch, visor_budget=budget)
    assert cached.visor_report.configuration_index == [1]
    _assert_same(_run(visor, batch, visor_budget=budget, use_cache=False), cached)
    with pytest.raises(ValueError, match="either visor_configuration or visor_budget"):
        visor.generate(**batch, max_new_tokens=2, visor_budget=0.5, visor_configuration=0, use_cache=False)



def test_budget_in_a_forward_from_inputs_embeds(visor):
    # the budget counts the visual tokens of a prompt given as embeddings as it counts them in input_ids
    batch = build_batch(visor, [ONE_IMAGE, ANYRES])
    budgets = [_ratios(visor, batch)[0][1] + 1e-9, 1.0]
    embeds = visor.get_input_embeddings()(batch.pop("input_ids"))
    with torch.no_grad():
        out = visor(inputs_embeds=embeds, **batch, visor_budget=budgets)
        expected = visor(inputs_embeds=embeds, **batch, visor_configuration=torch.tensor([1, 2]))
    assert out.configuration_index.tolist() == [1, 2]
    torch.testing.assert_close(out.logits, expected.logits)

# --------------------------------------------------------------------------------------------------------------
# Assisted decoding and cropping


def test_assisted_decoding_with_a_draft_lm(llava, visor):
    torch.manual_seed(7)
    draft = Qwen2ForCausalLM._from_config(llava.config.text_config, attn_implementation="eager").eval()
    batch = build_batch(visor, [TWO_IMAGES])
    for request in (1, [], "auto"):
        greedy = _run(visor, batch, max_new_tokens=8, min_new_tokens=8, visor_configuration=request)
        # the draft (a text LM) gets neither the images nor VISOR's configuration request
        assisted = _run(visor, batch, max_new_tokens=8, min_new_tokens=8, visor_configuration=request, assistant_model=draft)
        assert torch.equal(assisted.sequences, greedy.sequences)
        assert assisted.visor_report.configurations == greedy.visor_report.configurations
        assert assisted.visor_report.decode_flops == greedy.visor_report.decode_flops


def test_crop_reaches_into_the_prompts_trailing_text_only(visor):
    # a multi-token prefill ending in text (assisted decoding's first forward carries its candidates this way)
    prompt = build_batch(visor, [ONE_IMAGE, TWO_IMAGES])
    extra = torch.tensor([[10, 11, 12], [13, 14, 15]])
    longer = {**prompt, "input_ids": torch.cat([prompt["input_ids"], extra], 1),
              "attention_mask": torch.cat([prompt["attention_mask"], torch.ones_like(extra)], 1)}
    shorter = {**prompt, "input_ids": longer["input_ids"][:, :-2], "attention_mask": longer["attention_mask"][:, :-2]}
    request = torch.tensor([1, 0])
    with torch.no_grad():
        cache = visor(**longer, visor_configuration=request, use_cache=True).past_key_values
        reference = visor(**shorter, visor_configuration=request, use_cache=True).past_key_values
    cache.crop(-2)
    assert [layer.keys.shape for layer in cache.layers] == [layer.keys.shape for layer in reference.layers]
    assert cache.get_seq_length() == reference.get_seq_length()
    assert cache.visor_state.prompt_text == reference.visor_state.prompt_text
    token = torch.tensor([[16], [17]])
    mask = torch.cat([shorter["attention_mask"], torch.ones_like(token)], 1)
    with torch.no_grad():
        a = visor(input_ids=token, attention_mask=mask, past_key_values=cache)
        b = visor(input_ids=token, attention_mask=mask, past_key_values=reference)
    torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    assert a.flops.tolist() == b.flops.tolist()
    # the last text token of the second prompt is preceded by "? yes": cropping 4 more positions reaches its image
    shapes = [layer.keys.shape for layer in cache.layers]
    with pytest.raises(ValueError, match="visual tokens"):
        cache.crop(-6)
    assert [layer.keys.shape for layer in cache.layers] == shapes  # a refused crop leaves the cache as it was


def test_a_requested_static_cache_is_the_visor_static_cache(visor):
    # the layer-sparse layout is decided at prefill: "static" gets VISOR's own static cache, sized after the prefill
    batch = build_batch(visor, [ONE_IMAGE, TEXT_ONLY])
    default = _run(visor, batch, visor_configuration=1)
    static = _run(visor, batch, visor_configuration=1, cache_implementation="static")
    assert isinstance(static.past_key_values, VisorStaticCache)
    _assert_same(static, default)

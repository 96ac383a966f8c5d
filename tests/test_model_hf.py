"""The model as a transformers user meets it: transformers' own tiny LLaVA-OV test configurations, every input form
LLaVA-OV takes, its outputs (loss, hidden states, attentions, cache), the Auto classes, config validation and the
accepted forms of `visor_configuration`.

References: transformers' `LlavaOnevisionForConditionalGeneration` (dense layout) and the same sample run alone.
"""

import dataclasses

import numpy as np
import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
)
from transformers.modeling_layers import GradientCheckpointingLayer

import visor_hf  # noqa: F401  (registers the Auto classes)
from samples import ANYRES, ONE_IMAGE, TEXT_ONLY
from visor_hf import VisorCache, VisorConfig, VisorForConditionalGeneration, VisorModel
from visor_hf.testing import (
    IMAGE_ID,
    ROUTE_ID,
    VIDEO_ID,
    build_batch,
    tiny_llava,
    tiny_visor,
    visor_config_from_llava,
    visor_from_llava,
    word_ids,
)

TWO_IMAGES = {"text": [*word_ids("what is"), "<image>", "<image>", *word_ids("? yes")], "images": [(16, 16), (40, 24)], "seed": 2}


# --------------------------------------------------------------------------------------------------------------
# transformers' own tiny LLaVA-OV test configuration (tests/models/llava_onevision), and variants of it


def _hf_test_config(**overrides) -> LlavaOnevisionConfig:
    text_config = {
        "model_type": "qwen2", "vocab_size": 99, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "intermediate_size": 37, "hidden_act": "gelu", "max_position_embeddings": 580,
        "initializer_range": 0.02, "pad_token_id": 0,
    }
    text_config.update(overrides.pop("text", {}))
    vision_config = {
        "image_size": 16, "patch_size": 8, "num_channels": 3, "hidden_size": 32, "projection_dim": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 37, "initializer_range": 0.02,
    }
    vision_config.update(overrides.pop("vision", {}))
    fields = {
        "text_config": text_config, "vision_config": vision_config, "image_token_index": 1, "projector_hidden_act": "gelu",
        "vision_feature_select_strategy": "full", "vision_feature_layer": -1, "image_grid_pinpoints": [[16, 16]],
    }
    fields.update(overrides)
    return LlavaOnevisionConfig(**fields)


HF_VARIANTS = {
    "hf-test-config": {},
    "default-strategy-clip": {"vision_feature_select_strategy": "default", "vision": {"model_type": "clip_vision_model"}},
    "feature-layer-list": {"vision_feature_layer": [-1, -2]},
    "tied-embeddings": {"text": {"tie_word_embeddings": True}},
    "gqa": {"text": {"num_key_value_heads": 2, "num_hidden_layers": 3}},
}


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("variant", list(HF_VARIANTS), ids=list(HF_VARIANTS))
def test_dense_equivalence_on_transformers_test_configs(variant, attn):
    torch.manual_seed(0)
    llava = LlavaOnevisionForConditionalGeneration._from_config(_hf_test_config(**HF_VARIANTS[variant]), attn_implementation=attn).eval()
    dense = visor_from_llava(llava)
    if llava.config.text_config.tie_word_embeddings:
        assert dense.lm_head.weight.data_ptr() == dense.model.language_model.embed_tokens.weight.data_ptr()
    batch_size = 3
    pixel_values = torch.randn(batch_size, 3, 3, 16, 16)
    image_sizes = torch.tensor([[45, 45]] * batch_size)
    with torch.no_grad():
        tokens = llava.model.get_image_features(pixel_values, image_sizes, return_dict=True).pooler_output[0].shape[0]
    input_ids = torch.randint(2, 99, (batch_size, 7 + tokens))
    input_ids[:, :tokens] = 1
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :2] = 0  # left padding in one row
    inputs = {"input_ids": input_ids, "pixel_values": pixel_values, "image_sizes": image_sizes, "attention_mask": attention_mask}
    inputs["input_ids"][0, :2] = 0
    inputs["input_ids"][0, 2 : 2 + tokens] = 1
    inputs["input_ids"][0, 2 + tokens] = 5
    with torch.no_grad():
        expected, actual = llava(**inputs).logits, dense(**inputs).logits
        valid = attention_mask.bool()
        torch.testing.assert_close(actual[valid], expected[valid], atol=1e-5, rtol=1e-5)
        want = llava.generate(**inputs, max_new_tokens=4, do_sample=False)
        got = dense.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want)


def test_dense_equivalence_with_anyres_max_aspect_ratio():
    llava = tiny_llava(seed=7)
    batch = build_batch(llava, [ANYRES, ONE_IMAGE])
    llava.config.vision_aspect_ratio = "anyres_max_1"  # pools the anyres features down
    dense = visor_from_llava(llava)
    assert dense.config.vision_aspect_ratio == "anyres_max_1"
    pooled = build_batch(llava, [ANYRES, ONE_IMAGE])
    assert (pooled["input_ids"] == IMAGE_ID).sum() < (batch["input_ids"] == IMAGE_ID).sum()
    with torch.no_grad():
        expected, actual = llava(**pooled).logits, dense(**pooled).logits
    valid = pooled["attention_mask"].bool()
    torch.testing.assert_close(actual[valid], expected[valid], atol=1e-5, rtol=1e-5)


def _videos(count: int, frames: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, frames, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_dense_equivalence_with_videos_and_images(llava, dense):
    videos = _videos(2)
    with torch.no_grad():
        per_video = llava.model.get_video_features(videos, return_dict=True).pooler_output.shape[1]
        torch.testing.assert_close(dense.get_video_features(videos).pooler_output, llava.get_video_features(videos).pooler_output)
    images = build_batch(llava, [ONE_IMAGE])
    # row 0: an image and a video; row 1: a video only, left-padded
    row0 = [*images["input_ids"][0].tolist(), *[VIDEO_ID] * per_video, *word_ids("what ?")]
    row1 = [*word_ids("user"), *[VIDEO_ID] * per_video, *word_ids("how many ?")]
    width = max(len(row0), len(row1))
    input_ids = torch.tensor([[0] * (width - len(r)) + r for r in (row0, row1)])
    attention_mask = (torch.arange(width)[None] >= torch.tensor([[width - len(row0)], [width - len(row1)]])).long()
    inputs = dict(input_ids=input_ids, attention_mask=attention_mask, pixel_values=images["pixel_values"],
                  image_sizes=images["image_sizes"], pixel_values_videos=videos)
    with torch.no_grad():
        expected, actual = llava(**inputs), dense(**inputs)
        valid = attention_mask.bool()
        torch.testing.assert_close(actual.logits[valid], expected.logits[valid], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(actual.image_hidden_states, expected.image_hidden_states)
        torch.testing.assert_close(actual.video_hidden_states, expected.video_hidden_states)
        want = llava.generate(**inputs, max_new_tokens=4, do_sample=False)
        got = dense.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("configuration", [[], [0], "max"], ids=["ca-only", "one-sa", "max"])
def test_image_tokens_hidden_by_the_attention_mask_reach_no_text(visor, configuration):
    """Image tokens under `attention_mask == 0` are not seen by the text, through SA layers (as in LLaVA-OV) nor
    through cross-attention and its position convolution: changing their features changes no text logit, at
    prefill and in a cached decoding step."""
    batch = build_batch(visor, [ONE_IMAGE, ANYRES])
    image = batch["input_ids"] == IMAGE_ID
    hidden_tokens = 5  # the first image tokens of every sample (each sample holds one image)
    mask = batch["attention_mask"].masked_fill(image & (image.cumsum(1) <= hidden_tokens), 0)
    torch.manual_seed(0)
    with torch.no_grad():
        encoded = visor.model.get_image_features(batch["pixel_values"], batch["image_sizes"], return_dict=True)
        changed = [torch.cat([torch.randn_like(f[:hidden_tokens]) * 3, f[hidden_tokens:]]) for f in encoded.pooler_output]
        logits, steps = [], []
        for features in (encoded, dataclasses.replace(encoded, pooler_output=changed)):
            out = visor(input_ids=batch["input_ids"], attention_mask=mask, mm_encoder_outputs={"image": features},
                        visor_configuration=configuration, use_cache=True)
            token = torch.full((2, 1), ROUTE_ID + 10)
            step = visor(input_ids=token, attention_mask=torch.cat([mask, torch.ones_like(token)], 1),
                         past_key_values=out.past_key_values)
            logits.append(out.logits)
            steps.append(step.logits)
    text = ~image & mask.bool()
    torch.testing.assert_close(logits[1][text], logits[0][text])
    torch.testing.assert_close(steps[1], steps[0])


def test_pre_encoded_images_and_videos_as_llava(llava, dense):
    """LLaVA-OV's `mm_encoder_outputs=` (features computed beforehand) gives what the pixels give."""
    videos = _videos(1, seed=3)
    batch = build_batch(llava, [TWO_IMAGES])
    with torch.no_grad():
        per_video = llava.model.get_video_features(videos, return_dict=True).pooler_output.shape[1]
        ids = torch.cat([batch["input_ids"], torch.tensor([[VIDEO_ID] * per_video + word_ids("what ?")])], dim=1)
        pixels = dict(input_ids=ids, pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"], pixel_values_videos=videos)
        encoded = {
            "image": dense.model.get_image_features(batch["pixel_values"], batch["image_sizes"], return_dict=True),
            "video": dense.model.get_video_features(videos, return_dict=True),
        }
        from_pixels = dense(**pixels).logits
        from_features = dense(input_ids=ids, mm_encoder_outputs=encoded).logits
        expected = llava(input_ids=ids, mm_encoder_outputs=encoded).logits
        sparse = visor_from_llava(llava, cross_attention_layers=[1], self_attention_layers=[0, 3], configurations=[[0]])
        torch.testing.assert_close(sparse(input_ids=ids, mm_encoder_outputs=encoded).logits, sparse(**pixels).logits)
    torch.testing.assert_close(from_features, from_pixels)
    torch.testing.assert_close(from_features, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="both pixel_values"):
        dense(**pixels, mm_encoder_outputs=encoded)


def test_inputs_embeds_and_explicit_position_ids_as_llava(llava, dense):
    batch = build_batch(llava, [ONE_IMAGE, ANYRES, TEXT_ONLY])
    valid = batch["attention_mask"].bool()
    embeds = llava.get_input_embeddings()(batch["input_ids"])
    no_ids = {k: v for k, v in batch.items() if k != "input_ids"}
    positions = (batch["attention_mask"].cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        from_ids = dense(**batch).logits
        from_embeds = dense(inputs_embeds=embeds, **no_ids).logits
        expected = llava(inputs_embeds=embeds, **no_ids).logits
        positioned = dense(**batch, position_ids=positions).logits
        expected_positioned = llava(**batch, position_ids=positions).logits
    torch.testing.assert_close(from_embeds[valid], from_ids[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_embeds[valid], expected[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(positioned[valid], expected_positioned[valid], atol=1e-5, rtol=1e-5)


def test_loss_hidden_states_and_attentions_as_llava(llava, dense):
    batch = build_batch(llava, [ANYRES, TWO_IMAGES, TEXT_ONLY])
    labels = batch["input_ids"].masked_fill(~batch["attention_mask"].bool() | (batch["input_ids"] == IMAGE_ID), -100)
    with torch.no_grad():
        expected = llava(**batch, labels=labels, output_hidden_states=True, output_attentions=True)
        actual = dense(**batch, labels=labels, output_hidden_states=True, output_attentions=True)
    torch.testing.assert_close(actual.loss, expected.loss, atol=1e-6, rtol=1e-6)
    valid = batch["attention_mask"].bool()
    assert len(actual.hidden_states) == len(expected.hidden_states) == llava.config.text_config.num_hidden_layers + 1
    for got, want in zip(actual.hidden_states, expected.hidden_states):
        torch.testing.assert_close(got[valid], want[valid], atol=1e-5, rtol=1e-5)
    assert len(actual.attentions) == len(expected.attentions)
    for got, want in zip(actual.attentions, expected.attentions):
        rows = valid[:, None, :, None] & valid[:, None, None, :]
        torch.testing.assert_close(got.masked_fill(~rows, 0), want.masked_fill(~rows, 0), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("selection", [[0, 2, -1], [-2], 1, [7, -9, 3]])
def test_output_hidden_states_as_indices_returns_only_those(visor, selection):
    """transformers' convention: `output_hidden_states` given as indices into the tuple of all hidden states returns
    only those (negative ones from the end, out-of-range ones dropped), equal to the same entries of the full tuple,
    in a tuple of full length with None elsewhere; prefill and a cached decoding step alike."""
    batch = build_batch(visor, [ONE_IMAGE, TEXT_ONLY])
    count = visor.config.text_config.num_hidden_layers + 1
    indices = [selection] if isinstance(selection, int) else selection
    wanted = sorted({i % count for i in indices if -count <= i < count})
    with torch.no_grad():
        full = visor(**batch, visor_configuration=[[0], "max"], output_hidden_states=True)
        some = visor(**batch, visor_configuration=[[0], "max"], output_hidden_states=selection)
        token = full.logits[:, -1:].argmax(-1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(token)], dim=1)
        steps = [
            visor(input_ids=token, attention_mask=mask, past_key_values=out.past_key_values, output_hidden_states=flag)
            for out, flag in ((full, True), (some, selection))
        ]
    for got_all, want_all in ((some.hidden_states, full.hidden_states), (steps[1].hidden_states, steps[0].hidden_states)):
        assert len(got_all) == count
        for index, got in enumerate(got_all):
            if index in wanted:
                torch.testing.assert_close(got, want_all[index], atol=0, rtol=0)
            else:
                assert got is None


def test_returned_embeddings_and_attentions_take_gradients(visor):
    """`hidden_states[0]` is the very embedding tensor the layers read and `attentions[0]` the weights the first layer
    computed with: `retain_grad()` on them gets a gradient from the output (as transformers' models allow)."""
    batch = build_batch(visor, [ONE_IMAGE])
    out = visor(**batch, visor_configuration="max", output_hidden_states=True, output_attentions=True)
    embeddings, weights = out.hidden_states[0], out.attentions[0]
    embeddings.retain_grad()
    weights.retain_grad()
    out.logits[0, -1].sum().backward()
    assert embeddings.grad is not None and embeddings.grad.abs().sum() > 0
    assert weights.grad is not None and weights.grad.abs().sum() > 0
    visor.zero_grad(set_to_none=True)


def test_sparse_attentions_are_laid_out_in_the_original_order(llava):
    visor = visor_from_llava(llava, cross_attention_layers=[1], self_attention_layers=[0, 2], configurations=[[0]])
    batch = build_batch(llava, [ONE_IMAGE])
    visual = batch["input_ids"][0] == IMAGE_ID
    with torch.no_grad():
        out = visor(**batch, visor_configuration=[0], output_attentions=True)
    length = batch["input_ids"].shape[1]
    assert all(a.shape == (1, 4, length, length) for a in out.attentions)
    full, text_only = out.attentions[0][0], out.attentions[2][0]
    assert full[:, :, visual].sum() > 0  # an active SA layer attends to the image
    assert text_only[:, :, visual].abs().sum() == 0 and text_only[:, visual].abs().sum() == 0
    torch.testing.assert_close(text_only[:, ~visual].sum(-1), torch.ones(4, int((~visual).sum())))


def test_returned_attentions_get_gradients_and_change_nothing(llava):
    """Every returned attention map (full-sequence, text-only and CA layers) is a tensor the layer computed with, so
    `retain_grad()` on it gets a gradient (transformers' common tests check this), and asking for the maps changes
    no output."""
    visor = visor_from_llava(llava, attn_implementation="eager", cross_attention_layers=[1], self_attention_layers=[0, 2], configurations=[[0]])
    batch = build_batch(llava, [ONE_IMAGE, TEXT_ONLY])
    plain = visor(**batch, visor_configuration=[0])
    out = visor(**batch, visor_configuration=[0], output_attentions=True)
    torch.testing.assert_close(out.logits, plain.logits, atol=0, rtol=0)
    for weights in out.attentions:
        weights.retain_grad()
    valid = batch["attention_mask"].bool()
    out.logits[valid].sum().backward()
    for layer, weights in enumerate(out.attentions):
        assert weights.grad is not None and weights.grad.abs().sum() > 0, f"layer {layer}"


def test_forward_returns_a_cache_like_llava(llava, dense):
    """As LLaVA-OV (whose Qwen2 reads `text_config.use_cache`), a plain forward returns a cache that a hand-written
    decoding loop can continue."""
    batch = build_batch(llava, [ANYRES, TEXT_ONLY])
    with torch.no_grad():
        ours, theirs = dense(**batch), llava(**batch)
        assert isinstance(ours.past_key_values, VisorCache)
        token = theirs.logits[:, -1:].argmax(-1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(token)], dim=1)
        step = dense(input_ids=token, attention_mask=mask, past_key_values=ours.past_key_values).logits
        want = llava(input_ids=token, attention_mask=mask, past_key_values=theirs.past_key_values).logits
        assert dense(**batch, use_cache=False).past_key_values is None
    torch.testing.assert_close(step, want, atol=1e-5, rtol=1e-5)


def test_bfloat16_dense_equivalence_and_dtypes(llava):
    llava16 = tiny_llava(seed=0).to(torch.bfloat16)
    dense16 = visor_from_llava(llava16)
    sparse16 = tiny_visor(seed=0).to(torch.bfloat16)
    batch = build_batch(llava, [ANYRES, TEXT_ONLY])
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    valid = batch["attention_mask"].bool()
    with torch.no_grad():
        expected, actual = llava16(**batch).logits, dense16(**batch).logits
        sparse = sparse16(**batch, visor_configuration=[[0, 3], "max"], output_hidden_states=True)
    torch.testing.assert_close(actual[valid], expected[valid], atol=0, rtol=0)
    assert sparse.logits.dtype == torch.bfloat16 and torch.isfinite(sparse.logits[valid]).all()
    assert all(h.dtype == torch.bfloat16 for h in sparse.hidden_states)
    assert all(t.dtype == torch.bfloat16 for t in sparse.past_key_values.visor_state.cross_kv[1])


# --------------------------------------------------------------------------------------------------------------
# Auto classes and the checkpoint round trip


def test_save_and_load_through_every_auto_class(tmp_path):
    visor = tiny_visor(seed=1)
    visor.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(config, VisorConfig) and config.model_type == "visor"
    def fields(c):
        return {k: v for k, v in c.to_dict().items() if k != "_name_or_path"}

    assert fields(config) == fields(visor.config)
    batch = build_batch(visor, [dict(ONE_IMAGE, text=[*ONE_IMAGE["text"], ROUTE_ID]), TEXT_ONLY])
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path)
    base = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, VisorForConditionalGeneration) and isinstance(base, VisorModel)
    with torch.no_grad():
        want = visor(**batch, output_router_logits=True)
        got = loaded(**batch, output_router_logits=True)
        hidden = base(**batch).last_hidden_state
    valid = batch["attention_mask"].bool()  # the loaded model runs sdpa: padding rows may differ
    torch.testing.assert_close(got.logits[valid], want.logits[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.router_logits, want.router_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(visor.lm_head(hidden)[valid], want.logits[valid], atol=1e-5, rtol=1e-5)
    assert got.visor_configurations == want.visor_configurations


# --------------------------------------------------------------------------------------------------------------
# Training: activation checkpointing through the non-deprecated API


def test_activation_checkpointing_runs_and_gives_the_same_gradients():
    def run(checkpointing: bool):
        model = tiny_visor(seed=5).train()
        calls = []
        if checkpointing:
            model.activation_checkpointing_enable()
            for module in model.modules():
                if isinstance(module, GradientCheckpointingLayer) and module.gradient_checkpointing:
                    inner = module._gradient_checkpointing_func
                    module._gradient_checkpointing_func = lambda *a, _f=inner, _m=module, **k: calls.append(type(_m).__name__) or _f(*a, **k)
        batch = build_batch(model, [ANYRES, TEXT_ONLY])
        labels = batch["input_ids"].masked_fill(~batch["attention_mask"].bool() | (batch["input_ids"] == IMAGE_ID), -100)
        out = model(**batch, labels=labels, visor_configuration=[[0, 3], "max"])
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, grads, calls

    plain, plain_grads, _ = run(False)
    checked, checked_grads, calls = run(True)
    assert calls.count("VisorCrossAttentionBlock") == 2 and calls.count("Qwen2DecoderLayer") == 6
    assert checked.past_key_values is None  # no cache under activation checkpointing
    torch.testing.assert_close(checked.loss, plain.loss)
    assert plain_grads.keys() == checked_grads.keys()
    for name in plain_grads:
        torch.testing.assert_close(checked_grads[name], plain_grads[name], atol=1e-6, rtol=1e-5, msg=name)


# --------------------------------------------------------------------------------------------------------------
# visor_configuration: every accepted form (docs/model.md, "Configuration per sample")


@pytest.fixture(scope="module")
def visor():
    return tiny_visor(seed=2)


@pytest.mark.parametrize(
    "request_,expected",
    [
        (None, [(0, 3), (0, 2, 3, 5)]),  # "auto": the router (biased to 1) for the routed sample, default for the other
        ("auto", [(0, 3), (0, 2, 3, 5)]),
        ("max", [(0, 2, 3, 5)] * 2),
        (0, [(0,)] * 2),
        (torch.tensor(2), [(0, 2, 3, 5)] * 2),
        (np.int64(1), [(0, 3)] * 2),
        ([0, 5], [(0, 5)] * 2),  # a plain list of ints: the same SA layers for every sample
        ((5, 0), [(0, 5)] * 2),
        ([], [()] * 2),
        ([[0, 3], []], [(0, 3), ()]),
        ([0, "max"], [(0,), (0, 2, 3, 5)]),
        (["auto", [2]], [(0, 3), (2,)]),
        ([torch.tensor([2, 3]), 1], [(2, 3), (0, 3)]),
        (torch.tensor([2, 0]), [(0, 2, 3, 5), (0,)]),
    ],
)
def test_every_configuration_form(visor, request_, expected):
    batch = build_batch(visor, [dict(ONE_IMAGE, text=[*ONE_IMAGE["text"], ROUTE_ID]), TEXT_ONLY])
    with torch.no_grad():
        visor.model.router.fc2.bias.copy_(torch.tensor([0.0, 50.0, 0.0]))
        try:
            out = visor(**batch, visor_configuration=request_)
        finally:
            visor.model.router.fc2.bias.zero_()
    assert out.visor_configurations == expected
    known = {tuple(c): i for i, c in enumerate(visor.config.configurations)}
    assert out.configuration_index.tolist() == [known.get(c, -1) for c in expected]


# --------------------------------------------------------------------------------------------------------------
# Config validation: plain ValueError / TypeError with a message naming the problem


@pytest.mark.parametrize(
    "layout,error,message",
    [
        ({"configurations": []}, ValueError, "at least one configuration"),
        ({"router_layer": 0}, ValueError, "routing_token_id is None"),
        ({"self_attention_layers": [0, 2, 4], "configurations": [[0], [0, 2, 4]], "router_layer": 3, "routing_token_id": ROUTE_ID}, ValueError, r"must come before the first SA layer .* \(2\)"),
        ({"cross_attention_layers": [-1]}, ValueError, "layer index -1 out of range"),
        ({"self_attention_layers": [0, 6]}, ValueError, "layer index 6 out of range"),
        ({"self_attention_layers": [0, 0]}, ValueError, "lists a layer twice"),
        ({"configurations": [[0, 0]]}, ValueError, "lists a layer twice"),
        ({"router_layer": 6, "routing_token_id": ROUTE_ID}, ValueError, "router_layer 6 is out of range"),
        ({"default_configuration": "auto"}, ValueError, "default_configuration must be"),
        ({"position_embedding_kernel_size": 4}, ValueError, "positive odd integer"),
        ({"router_hidden_size": 0}, ValueError, "router_hidden_size must be a positive width"),
        ({"cross_attention_layers": "1, 4"}, TypeError, "must be a list of LLM layer indices"),
        ({"configurations": [[0], "max"]}, TypeError, "configuration 1 must be a list"),
    ],
)
def test_config_refuses_bad_layouts(llava, layout, error, message):
    with pytest.raises(error, match=message):
        visor_config_from_llava(llava.config, **layout)


def test_config_accepts_what_the_contract_allows(llava):
    # a router with a single configuration (nothing to switch off) is legal: it can only pick that configuration
    config = visor_config_from_llava(llava.config, router_layer=5, routing_token_id=ROUTE_ID)
    assert config.switchable_layers == [] and config.self_attention_layers == list(range(6))
    # the router may sit after an SA layer that every configuration keeps
    config = visor_config_from_llava(
        llava.config, cross_attention_layers=[1], self_attention_layers=[0, 2, 4], configurations=[[0, 2], [0, 2, 4]],
        router_layer=3, routing_token_id=ROUTE_ID, default_configuration=0,
    )
    assert config.switchable_layers == [4] and config.default_layers() == [0, 2]
    again = VisorConfig.from_dict(config.to_dict())
    assert again.to_dict() == config.to_dict()
    # numpy integers (e.g. from a layer search) become plain ints: the config still serialises
    config = visor_config_from_llava(llava.config, self_attention_layers=list(np.arange(6)), router_layer=np.int64(5),
                                     routing_token_id=np.int64(ROUTE_ID), configurations=[np.arange(6).tolist()])
    assert type(config.router_layer) is int and '"router_layer": 5' in config.to_json_string()
    assert VisorConfig().self_attention_layers == list(range(VisorConfig().text_config.num_hidden_layers))


def test_router_finds_the_routing_token_in_inputs_embeds(visor):
    batch = build_batch(visor, [dict(ONE_IMAGE, text=[*ONE_IMAGE["text"], ROUTE_ID]), TEXT_ONLY])
    embeds = visor.get_input_embeddings()(batch["input_ids"])
    no_ids = {k: v for k, v in batch.items() if k != "input_ids"}
    with torch.no_grad():
        visor.model.router.fc2.bias.copy_(torch.tensor([0.0, 50.0, 0.0]))
        try:
            from_ids = visor(**batch, output_router_logits=True)
            from_embeds = visor(inputs_embeds=embeds, **no_ids, output_router_logits=True)
        finally:
            visor.model.router.fc2.bias.zero_()
    assert from_embeds.visor_configurations == from_ids.visor_configurations == [(0, 3), (0, 2, 3, 5)]
    assert from_embeds.routing_token_batch_index.tolist() == [0]
    torch.testing.assert_close(from_embeds.router_logits, from_ids.router_logits)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(from_embeds.logits[valid], from_ids.logits[valid], atol=1e-5, rtol=1e-5)


def test_trainer_predict_returns_the_logits(tmp_path, visor):
    """`Trainer.predict` gathers every output field not in `config.keys_to_ignore_at_inference`: VISOR's
    bookkeeping fields (configurations as Python tuples, FLOPs, the cache) must not reach it."""
    from transformers import Trainer, TrainingArguments

    batch = build_batch(visor, [TEXT_ONLY, {"text": word_ids("what is the colour ?")}])
    batch["labels"] = batch["input_ids"].masked_fill(~batch["attention_mask"].bool(), -100)
    rows = [{k: v[i] for k, v in batch.items()} for i in range(2)]
    args = TrainingArguments(output_dir=str(tmp_path), per_device_eval_batch_size=2, report_to="none", use_cpu=True)
    prediction = Trainer(model=visor, args=args).predict(rows)
    with torch.no_grad():
        expected = visor(**batch)
    assert prediction.predictions.shape == tuple(expected.logits.shape)
    torch.testing.assert_close(torch.as_tensor(prediction.predictions), expected.logits, atol=1e-5, rtol=1e-5)
    assert abs(prediction.metrics["test_loss"] - visor(**batch).loss.item()) < 1e-5

"""VISOR on the Qwen2-VL family (Qwen2-VL, Qwen2.5-VL) against independent references: transformers' own
`Qwen2VLForConditionalGeneration` / `Qwen2_5_VLForConditionalGeneration` (dense equivalence), their text model on the
text alone at its original 3-D positions, a recomputation without cache, and each sample run alone."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

import visor_hf  # noqa: F401  (registers the Auto classes)
from samples import assert_no_text_sees_a_later_image, assert_row_matches_alone, text_positions
from visor_hf.testing import (
    IMAGE_ID,
    QWEN_FAMILIES,
    ROUTE_ID,
    TINY_LAYOUT,
    VIDEO_ID,
    build_qwen_vl_batch,
    tiny_qwen_vl,
    visor_from_qwen_vl,
    word_ids,
)

QUESTION = word_ids("what is the colour of the image ?")
ONE_IMAGE = {"text": [*word_ids("user"), "<image>", *QUESTION], "images": [(16, 16)], "seed": 0}
WIDE_IMAGE = {"text": [*word_ids("user"), "<image>", *QUESTION], "images": [(16, 40)], "seed": 1}
TALL_IMAGE = {"text": [*word_ids("user describe"), "<image>", *word_ids("this ?")], "images": [(32, 24)], "seed": 2}
TWO_IMAGES = {"text": [*word_ids("user"), "<image>", *word_ids("a"), "<image>", *QUESTION], "images": [(16, 24), (24, 16)], "seed": 3}
TEXT_ONLY = {"text": word_ids("user how many circle are there ?"), "seed": 4}
SAMPLES = {
    "one-image": [ONE_IMAGE],
    "wide-image": [WIDE_IMAGE],
    "tall-image": [TALL_IMAGE],
    "two-images": [TWO_IMAGES],
    "text-only": [TEXT_ONLY],
    "left-padded-batch": [ONE_IMAGE, WIDE_IMAGE, TWO_IMAGES, TEXT_ONLY],
}


@pytest.fixture(scope="module", params=QWEN_FAMILIES)
def source(request):
    return tiny_qwen_vl(request.param)


@pytest.fixture(scope="module")
def sparse(source):
    return visor_from_qwen_vl(source, **TINY_LAYOUT)


@pytest.mark.parametrize("samples", SAMPLES.values(), ids=SAMPLES.keys())
def test_dense_conversion_reproduces_the_source(source, samples):
    dense = visor_from_qwen_vl(source)
    batch = build_qwen_vl_batch(samples)
    with torch.no_grad():
        expected, actual = source(**batch).logits, dense(**batch).logits
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(actual[valid], expected[valid], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        want = source.generate(**batch, max_new_tokens=5, do_sample=False)
        got = dense.generate(**batch, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, want)


def test_no_sa_no_ca_equals_the_text_model_at_the_original_3d_positions(source):
    blind = visor_from_qwen_vl(source, cross_attention_layers=[], self_attention_layers=[0], configurations=[[]])
    batch = build_qwen_vl_batch([TWO_IMAGES])
    text = text_positions(batch)
    with torch.no_grad():
        out = blind(**batch, visor_configuration=[]).logits[0][text]
        positions, _ = source.model.get_rope_index(
            batch["input_ids"], batch["mm_token_type_ids"], batch["image_grid_thw"], attention_mask=batch["attention_mask"]
        )
        hidden = source.model.language_model(
            input_ids=batch["input_ids"][:, text], position_ids=positions[:, :, text],
            attention_mask=torch.ones(1, int(text.sum()), dtype=torch.long),
        ).last_hidden_state
        expected = source.lm_head(hidden)[0]
        changed = blind(**dict(batch, pixel_values=torch.randn_like(batch["pixel_values"])), visor_configuration=[]).logits[0][text]
    # after the images, text positions jump past the image's 3-D extent: the original positions, not re-numbered ones
    assert positions[0, 0, text].diff().max() > 1
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(changed, out, atol=0, rtol=0)


def test_cross_attention_never_sees_a_later_image(source):
    model = visor_from_qwen_vl(source, cross_attention_layers=[1, 2, 4], self_attention_layers=[0], configurations=[[]])
    sample = {"text": [*word_ids("what is the colour of"), "<image>", *word_ids("background ?")], "images": [(16, 24)]}
    batch = build_qwen_vl_batch([sample])
    assert_no_text_sees_a_later_image(model, batch)


def test_each_sample_of_a_mixed_batch_gets_what_it_gets_alone(sparse):
    samples = [WIDE_IMAGE, TEXT_ONLY, TWO_IMAGES, ONE_IMAGE]
    request = [[0], "max", [], [0, 2]]
    batch = build_qwen_vl_batch(samples)
    with torch.no_grad():
        together = sparse(**batch, visor_configuration=request)
    assert together.visor_configurations == [(0,), (0, 2, 3, 5), (), (0, 2)]
    for row, (sample, wanted) in enumerate(zip(samples, request)):
        alone = build_qwen_vl_batch([sample])
        with torch.no_grad():
            logits = sparse(**alone, visor_configuration=wanted).logits[0]
        assert_row_matches_alone(together.logits, row, alone, logits)


def _recomputed_greedy(model, batch, sequences, request):
    """Greedy tokens of a forward without cache over the prompt and the generated tokens."""
    prompt = batch["input_ids"].shape[1]
    new = sequences.shape[1] - prompt
    mask = torch.cat([batch["attention_mask"], torch.ones(sequences.shape[0], new, dtype=torch.long)], dim=1)
    types = torch.cat([batch["mm_token_type_ids"], torch.zeros(sequences.shape[0], new, dtype=torch.int)], dim=1)
    full = dict(batch, input_ids=sequences, attention_mask=mask, mm_token_type_ids=types)
    with torch.no_grad():
        logits = model(**full, visor_configuration=request, use_cache=False).logits
    logits[..., [IMAGE_ID, VIDEO_ID]] = float("-inf")  # as `suppress_tokens` in `generate`
    return logits[:, prompt - 1 : -1].argmax(-1)


@pytest.mark.parametrize("request_", [0, 1, 2, [], [[0], "max", [3], []]], ids=["c0", "c1", "c2", "ca-only", "per-sample"])
def test_cache_equals_recompute(sparse, request_):
    batch = build_qwen_vl_batch([WIDE_IMAGE, TWO_IMAGES, TEXT_ONLY, TALL_IMAGE])
    with torch.no_grad():
        # a generated placeholder id would read as an image in the recomputation
        sequences = sparse.generate(
            **batch, max_new_tokens=4, do_sample=False, visor_configuration=request_, suppress_tokens=[IMAGE_ID, VIDEO_ID]
        )
    prompt = batch["input_ids"].shape[1]
    assert torch.equal(_recomputed_greedy(sparse, batch, sequences, request_), sequences[:, prompt:])


def test_hand_written_decoding_follows_rope_deltas(sparse):
    """Without `generate` (no position ids given): each step continues at the prompt's last position + 1."""
    batch = build_qwen_vl_batch([WIDE_IMAGE, TEXT_ONLY])
    with torch.no_grad():
        out = sparse(**batch, visor_configuration=1)
        step = out.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(step)], dim=1)
        cached = sparse(input_ids=step, attention_mask=mask, past_key_values=out.past_key_values).logits[:, -1]
        full = dict(batch, input_ids=torch.cat([batch["input_ids"], step], 1), attention_mask=mask,
                    mm_token_type_ids=torch.cat([batch["mm_token_type_ids"], torch.zeros_like(step, dtype=torch.int)], 1))
        recomputed = sparse(**full, visor_configuration=1, use_cache=False).logits[:, -1]
    torch.testing.assert_close(cached, recomputed, atol=1e-5, rtol=1e-5)


def test_beams_budget_and_per_sample_configurations_generate(sparse):
    batch = build_qwen_vl_batch([TWO_IMAGES, ONE_IMAGE])
    with torch.no_grad():
        beams = sparse.generate(**batch, max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2,
                                visor_configuration=[[0], [0, 3]])
        alone = sparse.generate(**build_qwen_vl_batch([ONE_IMAGE]), max_new_tokens=3, do_sample=False, num_beams=2,
                                num_return_sequences=2, visor_configuration=[0, 3])
        sparse.generate(**batch, max_new_tokens=2, do_sample=False, visor_budget=[0.7, 1.0])
    assert beams.shape[0] == 4
    assert torch.equal(beams[2:, -alone.shape[1]:], alone)
    # the cheapest configuration costs about 0.6 of the dense prefill here; a budget of 1 affords every SA layer
    chosen = list(sparse.last_visor_report.configurations)
    assert chosen[0] in [(0,), (0, 3)] and chosen[1] == (0, 2, 3, 5)


def test_auto_classes_and_round_trip(tmp_path, sparse):
    sparse.save_pretrained(tmp_path)
    config = AutoConfig.from_pretrained(tmp_path)
    assert config.model_type == sparse.config.model_type
    # a Hub-portable save: the family's code files and `auto_map`
    assert config.auto_map["AutoModelForImageTextToText"] == f"modeling_qwen2_vl_visor.{type(sparse).__name__}"
    assert (tmp_path / "modeling_qwen2_vl_visor.py").is_file() and (tmp_path / "backbone_qwen2_vl_visor.py").is_file()
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert type(loaded) is type(sparse)
    batch = build_qwen_vl_batch([ONE_IMAGE])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, sparse(**batch).logits, atol=0, rtol=0)


def test_placeholders_without_pixels_run_as_text_as_in_the_source(source):
    dense = visor_from_qwen_vl(source)
    batch = build_qwen_vl_batch([ONE_IMAGE])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        torch.testing.assert_close(dense(**inputs).logits, source(**inputs).logits, atol=1e-5, rtol=1e-5)


def test_eager_and_sdpa_agree_on_a_sparse_mixed_batch(source):
    eager = visor_from_qwen_vl(source, attn_implementation="eager", **TINY_LAYOUT)
    sdpa = visor_from_qwen_vl(source, attn_implementation="sdpa", **TINY_LAYOUT)
    batch = build_qwen_vl_batch([WIDE_IMAGE, TEXT_ONLY, TWO_IMAGES])
    request = [[0], "max", []]
    with torch.no_grad():
        a, b = eager(**batch, visor_configuration=request), sdpa(**batch, visor_configuration=request)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(a.logits[valid], b.logits[valid], atol=1e-5, rtol=1e-5)


def test_video_dense_equivalence_and_cache(source):
    """A video (2 temporal patches of a 4x4 grid: 8 merged tokens) next to an image: dense == source; sparse cache ==
    recompute. The patches are given directly, as the family's video processor (which needs torchvision) makes them."""
    batch = build_qwen_vl_batch([dict(ONE_IMAGE, text=[*ONE_IMAGE["text"], VIDEO_ID, *word_ids("describe this ?")])])
    grid = torch.tensor([[2, 4, 4]])
    position = int((batch["input_ids"][0] == VIDEO_ID).nonzero()[0])
    ids = batch["input_ids"][0].tolist()
    ids[position : position + 1] = [VIDEO_ID] * 8
    input_ids = torch.tensor([ids])
    patch_dim = source.config.vision_config.in_channels * 2 * source.config.vision_config.patch_size**2
    torch.manual_seed(1)
    batch.update(
        input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
        mm_token_type_ids=(input_ids == IMAGE_ID).int() + 2 * (input_ids == VIDEO_ID).int(),
        pixel_values_videos=torch.randn(int(grid.prod()), patch_dim), video_grid_thw=grid,
    )
    dense = visor_from_qwen_vl(source)
    with torch.no_grad():
        torch.testing.assert_close(dense(**batch).logits, source(**batch).logits, atol=1e-5, rtol=1e-5)
    sparse = visor_from_qwen_vl(source, **TINY_LAYOUT)
    with torch.no_grad():
        sequences = sparse.generate(**batch, max_new_tokens=3, do_sample=False, visor_configuration=1, suppress_tokens=[IMAGE_ID, VIDEO_ID])
        prompt = input_ids.shape[1]
        full = dict(batch, input_ids=sequences, attention_mask=torch.ones_like(sequences),
                    mm_token_type_ids=torch.cat([batch["mm_token_type_ids"], torch.zeros(1, 3, dtype=torch.int)], 1))
        logits = sparse(**full, visor_configuration=1, use_cache=False).logits
    logits[..., [IMAGE_ID, VIDEO_ID]] = float("-inf")
    assert torch.equal(logits[:, prompt - 1 : -1].argmax(-1), sequences[:, prompt:])


def test_calibrated_router_threshold_per_sample_through_beams(source):
    """`visor_router_threshold=` on the Qwen-VL forward and `generate`: each sample runs the cheapest configuration at
    or above its threshold, in a batch and in its beams as when forced to that configuration."""
    model = visor_from_qwen_vl(source, **TINY_LAYOUT)
    model.config.router_type = "calibrated"
    with torch.no_grad():  # constant probabilities: [0] 0.6, [0, 3] 0.8, max 0.95
        model.model.router.fc2.weight.zero_()
        model.model.router.fc2.bias.copy_(torch.logit(torch.tensor([0.6, 0.8, 0.95])))
        routed = [{**sample, "text": [*sample["text"], ROUTE_ID]} for sample in (TWO_IMAGES, ONE_IMAGE)]  # token after the question
        batch = build_qwen_vl_batch(routed)
        assert model(**batch, visor_router_threshold=[0.5, 0.7]).configuration_index.tolist() == [0, 1]
        beams = model.generate(**batch, max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2,
                               visor_router_threshold=[0.5, 0.7])
        forced = model.generate(**batch, max_new_tokens=3, do_sample=False, num_beams=2, num_return_sequences=2,
                                visor_configuration=torch.tensor([0, 1]))
        assert model.last_visor_report.configuration_index == [0, 0, 1, 1]
        assert torch.equal(beams, forced)
        with pytest.raises(ValueError, match="visor_router_threshold"):
            model(**batch, visor_configuration="max", visor_router_threshold=0.5)

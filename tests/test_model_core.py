"""Core semantics of VisorForConditionalGeneration against independent references.

References: transformers' own LlavaOnevisionForConditionalGeneration (dense equivalence), its Qwen2 LLM run on
the text alone, and `reference_text_logits` below, a direct per-sample transcription of the forward semantics in docs/model.md that
keeps the whole sequence in its original order and uses plain tensor maths for the cross-attention.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText

import visor_hf  # noqa: F401  (registers the Auto classes)
from samples import (
    ANYRES,
    ONE_IMAGE,
    TEXT_ONLY,
    TWO_IMAGES,
    assert_no_text_sees_a_later_image,
    assert_row_matches_alone,
    text_positions,
)
from visor_hf import VisorConfig, VisorForConditionalGeneration, VisorModel
from visor_hf.modeling import FlopsShape, prefill_flops
from visor_hf.testing import (
    IMAGE_ID,
    ROUTE_ID,
    VIDEO_ID,
    build_batch,
    tiny_llava,
    tiny_visor,
    visor_from_llava,
    word_ids,
)

# two images with no text between them (LLaVA-OV's chat template puts a message's images side by side)
ADJACENT_IMAGES = {"text": [*word_ids("user"), "<image>", "<image>", *word_ids("what is this ?")], "images": [(16, 16), (24, 40)], "seed": 4}


# --------------------------------------------------------------------------------------------------------------
# Dense equivalence


@pytest.mark.parametrize(
    "samples",
    [[ONE_IMAGE], [ANYRES], [TWO_IMAGES], [TEXT_ONLY], [ONE_IMAGE, ANYRES, TWO_IMAGES, TEXT_ONLY]],
    ids=["one-image", "anyres", "two-images", "text-only", "left-padded-batch"],
)
def test_dense_layout_reproduces_llava_onevision(llava, dense, samples):
    batch = build_batch(llava, samples)
    with torch.no_grad():
        expected = llava(**batch).logits
        actual = dense(**batch).logits
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(actual[valid], expected[valid], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        want = llava.generate(**batch, max_new_tokens=6, do_sample=False)
        got = dense.generate(**batch, max_new_tokens=6, do_sample=False)
    assert torch.equal(got, want)


def test_dense_equivalence_with_sdpa():
    llava = tiny_llava(seed=1, attn_implementation="sdpa")
    dense = visor_from_llava(llava)
    assert dense.config.text_config._attn_implementation == "sdpa"
    batch = build_batch(llava, [ANYRES, TEXT_ONLY, TWO_IMAGES])
    with torch.no_grad():
        expected, actual = llava(**batch).logits, dense(**batch).logits
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(actual[valid], expected[valid], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Semantics of the sparse layout against a direct transcription of the contract


def _causal(keys_before: torch.Tensor) -> torch.Tensor:
    """Additive [1, 1, Q, K] mask from a boolean 'may attend' matrix."""
    return torch.zeros(keys_before.shape).masked_fill(~keys_before, torch.finfo(torch.float32).min)[None, None]


@torch.no_grad()
def reference_text_logits(model: VisorForConditionalGeneration, batch: dict, sa_layers) -> torch.Tensor:
    """Logits at the text positions of a single unpadded sample, computed the slow, obvious way.

    `batch` may hold `pixel_values` (images) and `pixel_values_videos` (videos, one segment per video); the features
    fill the placeholder tokens in order, each image/video a segment of its own for the position convolution.
    """
    core, config = model.model, model.config
    ids = batch["input_ids"][0]
    assert bool(batch.get("attention_mask", torch.ones_like(batch["input_ids"])).all()), "one unpadded sample"
    embeds = core.get_input_embeddings()(ids).clone()
    segment = torch.full(ids.shape, -1)
    count = 0
    sources = []
    if "pixel_values" in batch:
        sources.append((config.image_token_id, core.get_image_features(batch["pixel_values"], batch["image_sizes"], return_dict=True).pooler_output))
    if "pixel_values_videos" in batch:
        sources.append((config.video_token_id, list(core.get_video_features(batch["pixel_values_videos"], return_dict=True).pooler_output)))
    for token_id, features in sources:
        slots = (ids == token_id).nonzero()[:, 0].tolist()
        assert len(slots) == sum(f.shape[0] for f in features)
        for f in features:
            taken, slots = slots[: f.shape[0]], slots[f.shape[0] :]
            embeds[taken] = f
            segment[taken] = count
            count += 1
    visual = segment >= 0
    h = embeds.clone()
    length = ids.shape[0]
    positions = torch.arange(length)
    text_at, visual_at = (~visual).nonzero()[:, 0], visual.nonzero()[:, 0]
    rotary = core.language_model.rotary_emb
    for index, layer in enumerate(core.language_model.layers):
        if index in config.cross_attention_layers and len(visual_at):
            block = core.cross_attention_blocks[str(index)]
            attn = block.cross_attn
            # conditional position embedding: depth-wise conv run on each image (video) alone
            v = h.clone()
            for s in range(count):
                at = (segment == s).nonzero()[:, 0]
                piece = h[at].T[None]
                conv = F.conv1d(piece, block.position_embedding.weight, block.position_embedding.bias, padding=3, groups=h.shape[1])
                v[at] = h[at] + conv[0].T
            v = block.visual_layernorm(v[visual_at])
            t = block.input_layernorm(h[text_at])
            heads, kv_heads, dim = config.text_config.num_attention_heads, config.text_config.num_key_value_heads, attn.head_dim
            q = attn.q_proj(t).view(-1, heads, dim).transpose(0, 1)
            k = attn.k_proj(v).view(-1, kv_heads, dim).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
            val = attn.v_proj(v).view(-1, kv_heads, dim).transpose(0, 1).repeat_interleave(heads // kv_heads, 0)
            sees = visual_at[None, :] < text_at[:, None]  # only images that come earlier
            scores = (q @ k.transpose(1, 2)) / math.sqrt(dim)
            scores = scores.masked_fill(~sees[None], float("-inf"))
            weights = torch.nan_to_num(scores.softmax(-1))  # a token with no earlier image gets nothing
            out = (weights @ val).transpose(0, 1).reshape(len(text_at), -1)
            h[text_at] = h[text_at] + attn.o_proj(out)
        if index in sa_layers:
            mask = _causal(positions[None, :] <= positions[:, None])
            h = layer(h[None], attention_mask=mask, position_embeddings=rotary(h[None], positions[None]))[0]
        else:
            tp = positions[text_at]
            mask = _causal(torch.ones(len(tp), len(tp)).tril().bool())
            ht = h[text_at][None]
            h[text_at] = layer(ht, attention_mask=mask, position_embeddings=rotary(ht, tp[None]))[0]
    h = core.language_model.norm(h)
    return model.lm_head(h)[text_at]


@pytest.fixture
def random_position_embedding(visor):
    """A non-trivial conv position embedding, so that the per-image convolution is exercised (reset afterwards)."""
    with torch.no_grad():
        for block in visor.model.cross_attention_blocks.values():
            torch.nn.init.normal_(block.position_embedding.weight, std=0.2)
            torch.nn.init.normal_(block.position_embedding.bias, std=0.02)
    yield visor
    with torch.no_grad():
        for block in visor.model.cross_attention_blocks.values():
            block.position_embedding.weight.zero_()
            block.position_embedding.bias.zero_()


@pytest.mark.parametrize("request_,layers", [(0, (0,)), (1, (0, 3)), ("max", (0, 2, 3, 5)), ([], ()), ([2, 5], (2, 5))])
@pytest.mark.parametrize("sample", [TWO_IMAGES, ANYRES, ADJACENT_IMAGES], ids=["two-images", "anyres", "adjacent-images"])
def test_sparse_layout_matches_reference(random_position_embedding, sample, request_, layers):
    visor = random_position_embedding
    batch = build_batch(visor, [sample])
    with torch.no_grad():
        out = visor(**batch, visor_configuration=request_)
    assert out.visor_configurations == [layers]
    expected = reference_text_logits(visor, batch, set(layers))
    torch.testing.assert_close(out.logits[0][text_positions(batch)], expected, atol=2e-5, rtol=1e-4)


def test_left_padded_mixed_batch_matches_reference(random_position_embedding):
    """Every row of a left-padded batch (CA and SA layers, a different configuration per row) equals the reference
    computed on that sample alone, unpadded."""
    visor = random_position_embedding
    samples = [ANYRES, TEXT_ONLY, TWO_IMAGES, ADJACENT_IMAGES, ONE_IMAGE]
    request = [[0], "max", [], [0, 2], 1]
    layers = [(0,), (0, 2, 3, 5), (), (0, 2), (0, 3)]
    batch = build_batch(visor, samples)
    with torch.no_grad():
        out = visor(**batch, visor_configuration=request)
    assert out.visor_configurations == layers
    for row, (sample, wanted) in enumerate(zip(samples, layers)):
        alone = build_batch(visor, [sample])
        expected = reference_text_logits(visor, alone, set(wanted))
        length = alone["input_ids"].shape[1]
        assert batch["attention_mask"][row, :-length].sum() == 0  # left padding
        got = out.logits[row, -length:][text_positions(alone)]
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)



def test_consecutive_full_layers_some_samples_skip_match_reference(llava):
    """Runs of consecutive SA layers that only some samples of the batch run (the states stay in the original order
    across them, the skipping samples keeping their visual states), around a CA layer: every row equals the
    reference on that sample alone."""
    model = visor_from_llava(
        llava, cross_attention_layers=[3], self_attention_layers=[0, 1, 2, 4, 5],
        configurations=[[0, 1, 2, 4, 5], [0, 1], [1, 2, 4], [2, 5]],
    )
    with torch.no_grad():
        torch.nn.init.normal_(model.model.cross_attention_blocks["3"].position_embedding.weight, std=0.2)
    samples = [ANYRES, TWO_IMAGES, ONE_IMAGE, ADJACENT_IMAGES, TEXT_ONLY]
    layers = [(0, 1, 2, 4, 5), (0, 1), (1, 2, 4), (2, 5), (0, 1)]
    batch = build_batch(model, samples)
    with torch.no_grad():
        out = model(**batch, visor_configuration=[list(c) for c in layers])
    assert out.visor_configurations == layers
    for row, (sample, wanted) in enumerate(zip(samples, layers)):
        alone = build_batch(model, [sample])
        expected = reference_text_logits(model, alone, set(wanted))
        length = alone["input_ids"].shape[1]
        torch.testing.assert_close(out.logits[row, -length:][text_positions(alone)], expected, atol=2e-5, rtol=1e-4)


def test_dense_layout_is_bit_identical_to_llava_onevision_with_sdpa():
    """The dense layout moves no state between streams: the same operations on the same tensors as LLaVA-OV."""
    llava = tiny_llava(seed=1, attn_implementation="sdpa")
    dense = visor_from_llava(llava)
    batch = build_batch(llava, [ANYRES, TEXT_ONLY, TWO_IMAGES])
    with torch.no_grad():
        expected, actual = llava(**batch), dense(**batch, output_hidden_states=True)
    valid = batch["attention_mask"].bool()
    assert torch.equal(actual.logits[valid], expected.logits[valid])


def test_long_prompt_is_bit_identical_to_llava_onevision():
    """Past one chunk of tokens the final norm runs in chunks on CPU: still LLaVA-OV's logits bit for bit."""
    from visor_hf.modeling.modeling_visor import CONV_CHUNK

    llava = tiny_llava(seed=1, attn_implementation="sdpa")
    dense = visor_from_llava(llava)
    sample = {"text": [*word_ids("user"), "<image>", *word_ids(" ".join(["what is this ?"] * 150))], "images": [(16, 16)]}
    batch = build_batch(llava, [sample])
    assert batch["input_ids"].shape[1] > CONV_CHUNK + 1
    with torch.no_grad():
        expected, actual = llava(**batch).logits, dense(**batch).logits
    assert torch.equal(actual, expected)


def test_position_convolution_without_autograd_equals_conv1d():
    """Inference convolves tap by tap in the tokens' layout; training (autograd) runs `conv1d`: the same values, with
    image boundaries, empty slots, a batch and more tokens than one chunk."""
    from visor_hf.modeling.modeling_visor import CONV_CHUNK, VisorConvPositionEmbedding

    torch.manual_seed(0)
    embedding = VisorConvPositionEmbedding(16)
    torch.nn.init.normal_(embedding.weight)
    torch.nn.init.normal_(embedding.bias)
    length = CONV_CHUNK + 37
    visual = torch.randn(2, length, 16)
    segments = torch.zeros(2, length, dtype=torch.long)
    segments[0, :5] = -1  # empty slots (right-aligned stream)
    segments[0, 300:] = 1
    segments[1, CONV_CHUNK - 2 :] = 2  # a boundary next to a chunk boundary
    with torch.no_grad():
        inference = embedding(visual, segments)
    training = embedding(visual, segments)
    assert training.requires_grad
    torch.testing.assert_close(inference, training.detach(), atol=1e-6, rtol=1e-6)
    # against a direct reading of the definition: each image convolved alone, zero padding at its ends
    expected = visual.clone()
    for row in range(2):
        for image in segments[row].unique().tolist():
            if image < 0:
                continue
            at = (segments[row] == image).nonzero()[:, 0]
            conv = F.conv1d(visual[row, at].T[None], embedding.weight, embedding.bias, padding=3, groups=16)
            expected[row, at] = visual[row, at] + conv[0].T
    filled = segments >= 0
    torch.testing.assert_close(inference[filled], expected[filled].detach(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_position_convolution_chunk_buffer_and_in_place_norm_are_bit_exact(dtype):
    """The inference convolution reuses one chunk-sized accumulator and the visual norm writes over its input: the
    same bits as a full-size accumulator (the earlier code) and as the norm run on the whole stream."""
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    from visor_hf.modeling.modeling_visor import CONV_CHUNK, by_token_chunks, conv_position_sum

    torch.manual_seed(0)
    batch, length, hidden, kernel = 2, 2 * CONV_CHUNK + 37, 64, 7
    visual = torch.randn(batch, length, hidden).to(dtype)
    weight, bias = torch.randn(hidden, 1, kernel).to(dtype), torch.randn(hidden).to(dtype)
    accumulate = torch.promote_types(dtype, torch.float32)
    taps = weight[:, 0, :].t().to(accumulate).contiguous()
    conv = bias.to(accumulate).expand(batch, length, hidden).clone()  # full-size accumulator, same chunks and taps
    for start in range(0, length, CONV_CHUNK):
        end = min(start + CONV_CHUNK, length)
        for k in range(kernel):
            low, high = max(start, 3 - k), min(end, length + 3 - k)
            conv[:, low:high].addcmul_(visual[:, low + k - 3 : high + k - 3], taps[k])
    expected = visual + conv.to(dtype)
    with torch.no_grad():
        out = conv_position_sum(visual, weight, bias)
        assert torch.equal(out, expected)
        norm = Qwen2RMSNorm(hidden).to(dtype)
        torch.nn.init.normal_(norm.weight)
        whole = norm(out)
        normed = by_token_chunks(norm, out, in_place=True)
    assert normed.data_ptr() == out.data_ptr()  # written over its input
    assert torch.equal(normed, whole)


def _video_sample(model, text_before, text_after, frames=2, seed=0, images=None):
    """One unpadded sample `text_before <video> text_after` (optionally `<image>`s first), with random frames."""
    generator = torch.Generator().manual_seed(seed)
    videos = torch.randn(1, frames, 3, 16, 16, generator=generator)
    with torch.no_grad():
        tokens = model.model.get_video_features(videos, return_dict=True).pooler_output.shape[1]
    batch = build_batch(model, [{"text": [*(["<image>"] * len(images or [])), *word_ids(text_before)], "images": images or []}])
    ids = torch.tensor([[*batch["input_ids"][0].tolist(), *[VIDEO_ID] * tokens, *word_ids(text_after)]])
    batch.update(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=videos)
    return batch


@pytest.mark.parametrize("images", [None, [(16, 16), (24, 40)]], ids=["video", "two-adjacent-images-and-video"])
@pytest.mark.parametrize("request_", ["max", 0, []], ids=["max", "partial", "ca-only"])
def test_video_sample_matches_reference(random_position_embedding, images, request_):
    visor = random_position_embedding
    batch = _video_sample(visor, "what is this", "? yes", images=images)
    with torch.no_grad():
        out = visor(**batch, visor_configuration=request_)
    expected = reference_text_logits(visor, batch, set(out.visor_configurations[0]))
    text = (batch["input_ids"][0] != IMAGE_ID) & (batch["input_ids"][0] != VIDEO_ID)
    torch.testing.assert_close(out.logits[0][text], expected, atol=2e-5, rtol=1e-4)


def test_no_sa_no_ca_equals_qwen2_on_the_text(llava):
    blind = visor_from_llava(llava, cross_attention_layers=[], self_attention_layers=[0, 1], configurations=[[]])
    batch = build_batch(llava, [TWO_IMAGES])
    text = text_positions(batch)
    with torch.no_grad():
        out = blind(**batch, visor_configuration=[]).logits[0][text]
        qwen = llava.model.language_model(
            input_ids=batch["input_ids"][:, text],
            position_ids=text.nonzero()[:, 0][None],
            # an explicit mask: without one, position gaps would be read as packed sequences
            attention_mask=torch.ones(1, int(text.sum()), dtype=torch.long),
        ).last_hidden_state
        expected = llava.lm_head(qwen)[0]
        other = dict(batch, pixel_values=torch.randn_like(batch["pixel_values"]))
        changed = blind(**other, visor_configuration=[]).logits[0][text]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(changed, out, atol=0, rtol=0)


@pytest.mark.parametrize(
    "layout",
    [
        {"cross_attention_layers": [], "self_attention_layers": [3], "configurations": [[3]]},
        {"cross_attention_layers": [3], "self_attention_layers": [], "configurations": [[]]},
    ],
    ids=["one-sa-layer", "one-ca-layer"],
)
def test_changing_the_image_changes_the_answer(llava, layout):
    model = visor_from_llava(llava, **layout)
    batch = build_batch(llava, [ONE_IMAGE])
    other = dict(batch, pixel_values=torch.randn_like(batch["pixel_values"]))
    with torch.no_grad():
        a, b = model(**batch).logits[0, -1], model(**other).logits[0, -1]
    assert (a - b).abs().max() > 1e-4


def test_cross_attention_never_sees_a_later_image(llava):
    model = visor_from_llava(llava, cross_attention_layers=[1, 2, 4], self_attention_layers=[0], configurations=[[]])
    sample = {"text": [*word_ids("what is the colour of"), "<image>", *word_ids("background ?")], "images": [(16, 16)]}
    batch = build_batch(llava, [sample])
    assert_no_text_sees_a_later_image(model, batch)


def test_text_only_sample_in_a_mixed_batch_is_plain_qwen2(llava, visor):
    batch = build_batch(llava, [ANYRES, TEXT_ONLY])
    row = 1
    valid = batch["attention_mask"][row].bool()
    with torch.no_grad():
        out = visor(**batch, visor_configuration="max").logits[row][valid]
        ids = batch["input_ids"][row][valid][None]
        expected = llava.lm_head(llava.model.language_model(input_ids=ids).last_hidden_state)[0]
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_eager_and_sdpa_agree_on_a_sparse_mixed_batch():
    eager = tiny_visor(seed=2, attn_implementation="eager")
    sdpa = tiny_visor(seed=2, attn_implementation="sdpa")
    batch = build_batch(eager, [ANYRES, TEXT_ONLY, TWO_IMAGES])
    request = [[0], "max", []]
    with torch.no_grad():
        a, b = eager(**batch, visor_configuration=request), sdpa(**batch, visor_configuration=request)
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(a.logits[valid], b.logits[valid], atol=1e-5, rtol=1e-5)


def test_each_sample_of_a_mixed_batch_gets_what_it_gets_alone(visor):
    samples = [ANYRES, TEXT_ONLY, TWO_IMAGES, ONE_IMAGE]
    request = [[0], "max", [], [0, 2]]
    batch = build_batch(visor, samples)
    with torch.no_grad():
        together = visor(**batch, visor_configuration=request)
    assert together.visor_configurations == [(0,), (0, 2, 3, 5), (), (0, 2)]
    for row, (sample, wanted) in enumerate(zip(samples, request)):
        alone = build_batch(visor, [sample])
        with torch.no_grad():
            logits = visor(**alone, visor_configuration=wanted).logits[0]
        assert_row_matches_alone(together.logits, row, alone, logits)


def test_router_output_and_auto_configuration(visor):
    sample = dict(ONE_IMAGE, text=[*ONE_IMAGE["text"], ROUTE_ID])
    batch = build_batch(visor, [sample, TEXT_ONLY])
    with torch.no_grad():
        visor.model.router.fc2.bias.copy_(torch.tensor([0.0, 50.0, 0.0]))
        out = visor(**batch, visor_configuration="auto", output_router_logits=True)
        visor.model.router.fc2.bias.zero_()
    assert out.router_logits.shape == (1, 3)
    assert out.routing_token_batch_index.tolist() == [0]
    # routed sample: configuration 1; the sample without a routing token falls back to the default ("max")
    assert out.visor_configurations == [(0, 3), (0, 2, 3, 5)]
    assert out.configuration_index.tolist() == [1, 2]


# --------------------------------------------------------------------------------------------------------------
# Training


@pytest.mark.parametrize("request_", ["max", 1, []], ids=["max", "partial", "ca-only"])
def test_a_few_steps_reduce_the_loss(request_):
    model = tiny_visor(seed=3).train()
    batch = build_batch(model, [ONE_IMAGE, ANYRES])
    labels = batch["input_ids"].masked_fill(~batch["attention_mask"].bool() | (batch["input_ids"] == IMAGE_ID), -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(**batch, labels=labels, visor_configuration=request_).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_gradients_reach_the_new_modules():
    model = tiny_visor(seed=4).train()
    sample = dict(TWO_IMAGES, text=[*TWO_IMAGES["text"], ROUTE_ID])
    batch = build_batch(model, [sample])
    labels = batch["input_ids"].masked_fill(batch["input_ids"] == IMAGE_ID, -100)
    out = model(**batch, labels=labels, visor_configuration="max", output_router_logits=True)
    router_loss = F.cross_entropy(out.router_logits, torch.tensor([1]))
    (out.loss + router_loss).backward()
    for name, block in model.model.cross_attention_blocks.items():
        for part in (block.cross_attn.q_proj, block.cross_attn.k_proj, block.position_embedding):
            assert part.weight.grad is not None and part.weight.grad.abs().sum() > 0, name
    assert model.model.router.fc1.weight.grad.abs().sum() > 0


# activation checkpointing: see test_model_hf.py::test_activation_checkpointing_runs_and_gives_the_same_gradients


def test_bfloat16_forward_runs_and_stays_bfloat16():
    model = tiny_visor(seed=6).to(torch.bfloat16)
    batch = build_batch(model, [ANYRES, TEXT_ONLY])
    batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        out = model(**batch, visor_configuration=[[0], "max"])
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits).all()


# --------------------------------------------------------------------------------------------------------------
# Auto classes, loading, device maps


def test_auto_classes_and_device_map(tmp_path, visor):
    config = AutoConfig.for_model("visor", **{k: v for k, v in visor.config.to_dict().items() if k not in ("model_type",)})
    assert isinstance(config, VisorConfig)
    assert isinstance(AutoModel.from_config(config), VisorModel)
    visor.save_pretrained(tmp_path)
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path, device_map="auto")
    assert isinstance(loaded, VisorForConditionalGeneration)
    batch = build_batch(visor, [ONE_IMAGE])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, visor(**batch).logits)


def test_fresh_model_position_embedding_starts_as_identity():
    model = VisorForConditionalGeneration(tiny_visor().config)
    for block in model.model.cross_attention_blocks.values():
        assert block.position_embedding.weight.abs().sum() == 0


# --------------------------------------------------------------------------------------------------------------
# Bad input


def test_image_token_count_must_match_the_features(visor):
    batch = build_batch(visor, [ONE_IMAGE])
    ids = batch["input_ids"].clone()
    ids[0, int((ids[0] == IMAGE_ID).nonzero()[0])] = word_ids("red")[0]
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        visor(**dict(batch, input_ids=ids))


def test_image_tokens_without_pixel_values_run_as_text_with_a_warning(llava, dense, visor):
    """As LLaVA-OV and every transformers VLM: placeholders without pixels are embedded as ordinary tokens, with a
    one-time warning. Dense equals LLaVA-OV; a sparse layout (no visual token) equals the plain Qwen2 LM."""
    from transformers.testing_utils import CaptureLogger

    from visor_hf.modeling import backbone_visor

    ids = build_batch(visor, [ONE_IMAGE])["input_ids"]
    type(backbone_visor.logger).warning_once.cache_clear()  # "once" per process: start afresh
    with torch.no_grad(), CaptureLogger(backbone_visor.logger) as captured:
        got_dense, got_sparse = dense(input_ids=ids), visor(input_ids=ids)
        visor(input_ids=ids)
        want_dense = llava(input_ids=ids).logits
        want_sparse = llava.lm_head(llava.model.language_model(input_ids=ids).last_hidden_state)
    assert captured.out.count("no pixel_values") == 1
    torch.testing.assert_close(got_dense.logits, want_dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_sparse.logits, want_sparse, atol=1e-5, rtol=1e-5)
    # the FLOPs count them as text too (no visual token ran)
    length = ids.shape[1]
    assert got_sparse.flops.tolist() == [prefill_flops(FlopsShape.from_config(visor.config), length, 0, lm_head_tokens=length)]


@pytest.mark.parametrize(
    "request_,error",
    [
        (7, "unknown configuration index 7"),
        ([1, 2], r"layers \[1\] are not SA layers"),
        ("fastest", "unknown visor_configuration 'fastest'"),
        ([[0], "max", []], "3 per-sample entries for a batch of 2"),
        (torch.tensor([[0, 1]]), "1-D integer tensor"),
    ],
)
def test_bad_configuration_requests(visor, request_, error):
    batch = build_batch(visor, [ONE_IMAGE, TEXT_ONLY])
    with pytest.raises(ValueError, match=error):
        visor(**batch, visor_configuration=request_)


@pytest.mark.parametrize(
    "layout,error",
    [
        ({"cross_attention_layers": [1, 9]}, "layer index 9 out of range"),
        ({"cross_attention_layers": [1], "self_attention_layers": [1, 2]}, "must be disjoint"),
        ({"self_attention_layers": [0, 2], "configurations": [[0, 3]]}, r"uses layers \[3\]"),
        ({"self_attention_layers": [0, 2, 4], "configurations": [[0], [0, 2, 4]], "router_layer": 2, "routing_token_id": ROUTE_ID}, "must come before"),
        ({"default_configuration": 5}, "default_configuration 5 is out of range"),
    ],
)
def test_invalid_layouts_are_refused(llava, layout, error):
    from visor_hf.testing import visor_config_from_llava

    with pytest.raises(Exception, match=error):
        visor_config_from_llava(llava.config, **layout)

"""Mixed batches: the grouped prefill (one pass per configuration, caches merged into one for decoding) against the
masked one (one pass, visual keys hidden), each sample alone and a recomputation; the `visor_batching` rule and
option; the FLOPs each path reports against a hand computation (docs/generation.md, "Mixed batches")."""

import pytest
import torch

from samples import ROUTED_ANYRES as ANYRES
from samples import ROUTED_ONE_IMAGE as ONE_IMAGE
from samples import ROUTED_TEXT_ONLY as TEXT_ONLY
from samples import ROUTED_TWO_IMAGES as TWO_IMAGES
from visor_hf.modeling import FlopsShape, decode_flops, prefill_flops
from visor_hf.modeling.grouping_visor import GROUPING_MIN_SAVING, PrefillInputs, choose_groups
from visor_hf.testing import IMAGE_ID, build_batch, build_qwen_vl_batch, tiny_qwen_vl_visor, tiny_visor

MIXED = [ONE_IMAGE, ANYRES, TWO_IMAGES, TEXT_ONLY]
REQUEST = [0, [], 2, 1]  # four configurations, one per sample; the text-only one asks for layers it cannot use
TIGHT = {"atol": 1e-6, "rtol": 1e-5}  # measured: grouped and masked differ by at most ~1.2e-7 (float32 ULPs)
NEW = 5


@pytest.fixture(scope="module", params=["eager", "sdpa"])
def model(request):
    return tiny_visor(seed=0, attn_implementation=request.param)


def _real(batch):
    return batch["attention_mask"].bool()


def _forward(model, batch, batching, **kwargs):
    with torch.no_grad():
        return model(**batch, visor_batching=batching, use_cache=True, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Grouped == masked: prefill outputs, the merged cache, decoding


def test_grouped_prefill_equals_masked(model):
    batch = build_batch(model, MIXED)
    eager = model.config.text_config._attn_implementation == "eager"
    options = {
        "visor_configuration": REQUEST,
        "output_hidden_states": True,
        "output_router_logits": True,
        "output_attentions": eager,
    }
    masked, grouped = _forward(model, batch, "masked", **options), _forward(model, batch, "grouped", **options)
    real = _real(batch)
    # padding positions read no key at all: their outputs are never used and differ between the paths
    torch.testing.assert_close(grouped.logits[real], masked.logits[real], **TIGHT)
    for a, b in zip(grouped.hidden_states, masked.hidden_states, strict=True):
        torch.testing.assert_close(a[real], b[real], **TIGHT)
    assert grouped.hidden_states[0] is not None
    if eager:  # a sample's visual queries at a layer it skips: masked computed them (never used), grouped did not
        text = real & (batch["input_ids"] != IMAGE_ID)
        rows = text[:, None, :, None] & real[:, None, None, :]
        for a, b in zip(grouped.attentions, masked.attentions, strict=True):
            torch.testing.assert_close(a * rows, b * rows, **TIGHT)
    torch.testing.assert_close(grouped.router_logits, masked.router_logits, **TIGHT)
    assert torch.equal(grouped.routing_token_batch_index, masked.routing_token_batch_index)
    assert grouped.visor_configurations == masked.visor_configurations == [(0,), (), (0, 2, 3, 5), (0, 3)]
    assert torch.equal(grouped.configuration_index, masked.configuration_index)
    torch.testing.assert_close(grouped.image_hidden_states, masked.image_hidden_states, atol=0, rtol=0)

    # the merged cache has the masked cache's layout and bookkeeping; its keys agree wherever a query can read them
    a, b = grouped.past_key_values, masked.past_key_values
    assert a.layouts == b.layouts
    for name in ("text_valid", "full_valid", "full_visual", "visual_valid", "active", "configuration_index"):
        assert torch.equal(getattr(a.visor_state, name), getattr(b.visor_state, name)), name
    assert a.get_seq_length() == b.get_seq_length()
    for layer_idx, layout in enumerate(a.layouts):
        seen = a.valid_keys(layout)
        if layout == "full":
            seen = seen & ~a.visual_keys_for(layer_idx)
        for x, y in (
            (a.layers[layer_idx].keys, b.layers[layer_idx].keys),
            (a.layers[layer_idx].values, b.layers[layer_idx].values),
        ):
            assert x.shape == y.shape
            torch.testing.assert_close(x.transpose(1, 2)[seen], y.transpose(1, 2)[seen], **TIGHT)
    for layer_idx, (k, v) in b.cross_attention_kv().items():
        k2, v2 = a.cross_attention_kv()[layer_idx]
        shown = a.visual_valid
        torch.testing.assert_close(k2.transpose(1, 2)[shown], k.transpose(1, 2)[shown], **TIGHT)
        torch.testing.assert_close(v2.transpose(1, 2)[shown], v.transpose(1, 2)[shown], **TIGHT)

    # two decoding steps from either cache
    mask = batch["attention_mask"]
    for _ in range(2):
        ids = masked.logits[:, -1:].argmax(-1)
        mask = torch.cat([mask, torch.ones_like(ids)], 1)
        with torch.no_grad():
            masked = model(input_ids=ids, attention_mask=mask, past_key_values=masked.past_key_values)
            grouped = model(input_ids=ids, attention_mask=mask, past_key_values=grouped.past_key_values)
        torch.testing.assert_close(grouped.logits, masked.logits, **TIGHT)


GENERATE_OPTIONS = {
    "greedy": {"do_sample": False},
    "beams": {"do_sample": False, "num_beams": 3, "num_return_sequences": 2},
    "sampling": {"do_sample": True, "top_k": 5, "temperature": 1.3},
    "sampling-nrs": {"do_sample": True, "num_return_sequences": 2},
}


@pytest.mark.parametrize("options", GENERATE_OPTIONS.values(), ids=GENERATE_OPTIONS.keys())
def test_grouped_generate_equals_masked(model, options):
    batch = build_batch(model, MIXED)
    out = {}
    for batching in ("masked", "grouped"):
        torch.manual_seed(7)
        out[batching] = model.generate(
            **batch,
            visor_configuration=REQUEST,
            visor_batching=batching,
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            output_scores=True,
            return_dict_in_generate=True,
            **options,
        )
    assert torch.equal(out["grouped"].sequences, out["masked"].sequences)
    for a, b in zip(out["grouped"].scores, out["masked"].scores, strict=True):
        finite = torch.isfinite(b)
        assert torch.equal(finite, torch.isfinite(a))
        torch.testing.assert_close(a[finite], b[finite], atol=1e-5, rtol=1e-5)
    assert out["grouped"].visor_configurations == out["masked"].visor_configurations


def test_grouped_prefill_into_a_static_cache_equals_the_dynamic_cache(model):
    """The merged prompt of a grouped prefill moves into the static cache's buffers as a masked one does."""
    batch = build_batch(model, MIXED)
    out = {}
    for cache in ("dynamic", "static"):
        out[cache] = model.generate(
            **batch, visor_configuration=REQUEST, visor_batching="grouped", max_new_tokens=NEW, min_new_tokens=NEW,
            do_sample=False, num_beams=2, output_scores=True, return_dict_in_generate=True,
            cache_implementation=cache,
        )
    assert torch.equal(out["static"].sequences, out["dynamic"].sequences)
    for a, b in zip(out["static"].scores, out["dynamic"].scores, strict=True):
        finite = torch.isfinite(b)
        torch.testing.assert_close(a[finite], b[finite], atol=1e-5, rtol=1e-5)


def test_each_sample_of_a_grouped_batch_equals_itself_alone(model):
    batch = build_batch(model, MIXED)
    greedy = {
        "max_new_tokens": NEW,
        "min_new_tokens": NEW,
        "do_sample": False,
        "output_scores": True,
        "return_dict_in_generate": True,
    }
    together = model.generate(**batch, visor_configuration=REQUEST, visor_batching="grouped", **greedy)
    width = batch["input_ids"].shape[1]
    for row, sample in enumerate(MIXED):
        alone = model.generate(**build_batch(model, [sample]), visor_configuration=REQUEST[row], **greedy)
        assert torch.equal(together.sequences[row, width:], alone.sequences[0, -NEW:]), f"sample {row}"
        for a, b in zip(together.scores, alone.scores):
            torch.testing.assert_close(a[row], b[0], atol=1e-4, rtol=1e-4)


def test_grouped_cache_equals_recomputation(model):
    batch = build_batch(model, MIXED)
    greedy = {
        "max_new_tokens": NEW,
        "min_new_tokens": NEW,
        "do_sample": False,
        "output_scores": True,
        "return_dict_in_generate": True,
    }
    cached = model.generate(**batch, visor_configuration=REQUEST, visor_batching="grouped", **greedy)
    recomputed = model.generate(**batch, visor_configuration=REQUEST, visor_batching="grouped", use_cache=False, **greedy)
    assert torch.equal(cached.sequences, recomputed.sequences)
    for a, b in zip(cached.scores, recomputed.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_grouped_with_router_samples_and_a_mask_hiding_tokens(model):
    # "auto" samples form one group (masked inside it: their configuration is known after the router layer); a
    # hidden text token and a hidden image token inside the rows (not only left padding)
    batch = build_batch(model, MIXED)
    batch["attention_mask"][0, -3] = 0
    image = (batch["input_ids"][2] == IMAGE_ID).nonzero()[5, 0]
    batch["attention_mask"][2, image] = 0
    request = ["auto", 0, "max", "auto"]
    masked, grouped = (
        _forward(model, batch, "masked", visor_configuration=request),
        _forward(model, batch, "grouped", visor_configuration=request),
    )
    real = _real(batch)
    torch.testing.assert_close(grouped.logits[real], masked.logits[real], **TIGHT)
    assert grouped.visor_configurations == masked.visor_configurations
    torch.testing.assert_close(grouped.router_logits, masked.router_logits, **TIGHT)
    assert torch.equal(grouped.routing_token_batch_index, masked.routing_token_batch_index)
    ids = masked.logits[:, -1:].argmax(-1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(ids)], 1)
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=mask, past_key_values=grouped.past_key_values)
        b = model(input_ids=ids, attention_mask=mask, past_key_values=masked.past_key_values)
    torch.testing.assert_close(a.logits, b.logits, **TIGHT)


def test_grouped_on_the_qwen2_vl_backbone():
    model = tiny_qwen_vl_visor("qwen2_vl", attn_implementation="sdpa")
    samples = [
        {"text": [5, 6, "<image>", 7, 8], "images": [(16, 40)], "seed": 1},
        {"text": [5, 9, 10], "seed": 4},
        {"text": [5, "<image>", 6, "<image>", 7], "images": [(16, 24), (24, 16)], "seed": 3},
    ]
    batch = build_qwen_vl_batch(samples)
    request = [[0], "max", [0, 2]]
    out = {}
    for batching in ("masked", "grouped"):
        out[batching] = model.generate(
            **batch,
            visor_configuration=request,
            visor_batching=batching,
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    assert torch.equal(out["grouped"].sequences, out["masked"].sequences)
    for a, b in zip(out["grouped"].scores, out["masked"].scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# The rule of visor_batching="auto", the forced options, bad values


def _prompt(model, batch) -> PrefillInputs:
    visual = batch["input_ids"] == IMAGE_ID
    return PrefillInputs(
        torch.zeros(*visual.shape, 1), visual, visual.long(), visual.long(), _real(batch), batch["attention_mask"], None
    )


def _per_sample(request):
    """A list of configuration indices as a per-sample request (a plain list of ints is one layer set)."""
    return torch.tensor(request) if all(isinstance(r, int) for r in request) else request


def _costs(model, batch, request):
    """Analytical prefill FLOPs masked (every sample over the union of the layers) and grouped (own layers)."""
    shape = FlopsShape.from_config(model.config)
    ca = model.config.cross_attention_layers
    counts = model._prompt_token_counts(batch["input_ids"], batch["attention_mask"])
    request = request.tolist() if isinstance(request, torch.Tensor) else request
    layers = [tuple(model.config.configurations[r]) if isinstance(r, int) else tuple(r) for r in request]
    union = sorted(set().union(*map(set, layers)))
    masked = sum(prefill_flops(shape, t, v, union, ca) for t, v in zip(*counts))
    grouped = sum(prefill_flops(shape, t, v, c if v else (), ca) for c, t, v in zip(layers, *counts))
    return masked, grouped


@pytest.mark.parametrize(
    "request_, expected",
    [
        ([0, [], 2, 1], "grouped"),  # the union (0, 2, 3, 5) over every image, against one or no SA layer for two
        ([2, 2, 2, 0], "masked"),  # the text-only sample's own group saves nothing: one configuration over images
        ([1, 2, 2, 1], "masked"),  # one small image without two of the layers: below the margin
        ([0, 0, 0, 0], "masked"),  # one configuration
    ],
)
def test_auto_rule_groups_when_it_saves_enough_flops(model, request_, expected):
    batch = build_batch(model, MIXED)
    request_ = _per_sample(request_)
    masked, grouped = _costs(model, batch, request_)
    saving = 1 - grouped / masked
    assert (saving >= GROUPING_MIN_SAVING) == (expected == "grouped"), saving
    groups = choose_groups(model.config, "auto", request_, _prompt(model, batch), True, None)
    assert (groups is not None) == (expected == "grouped")
    out = _forward(model, batch, "auto", visor_configuration=request_)
    union = tuple(sorted(set().union(*map(set, out.visor_configurations))))
    computed_union = all(c == union for c in out.visor_computed_layers)
    assert computed_union == (expected == "masked")


def test_forced_options_and_bad_values(model):
    batch = build_batch(model, MIXED)
    request = torch.tensor([1, 2, 2, 1])  # "auto" masks it
    assert choose_groups(model.config, "auto", request, _prompt(model, batch), True, None) is None
    assert choose_groups(model.config, "grouped", request, _prompt(model, batch), True, None) == [[0], [1, 2], [3]]
    assert choose_groups(model.config, "masked", REQUEST, _prompt(model, batch), True, None) is None
    grouped = _forward(model, batch, "grouped", visor_configuration=request)
    assert grouped.visor_computed_layers == [(0, 3), (0, 2, 3, 5), (0, 2, 3, 5), ()]  # text-only: a group of its own
    masked = _forward(model, batch, "masked", visor_configuration=REQUEST)
    assert masked.visor_computed_layers == [(0, 2, 3, 5)] * 4
    with pytest.raises(ValueError, match="visor_batching must be one of 'auto', 'grouped', 'masked'"):
        _forward(model, batch, "grouping", visor_configuration=REQUEST)
    with pytest.raises(ValueError, match="visor_batching must be one of"):
        model.generate(**batch, max_new_tokens=2, visor_batching="fast")
    with pytest.raises(TypeError, match="did you mean 'visor_batching'"):
        with torch.no_grad():
            model(**batch, visor_batchng="grouped")


# --------------------------------------------------------------------------------------------------------------
# FLOPs: what each path computed, against a hand computation


def test_flops_report_what_the_batch_computed(model):
    batch = build_batch(model, MIXED)
    shape = FlopsShape.from_config(model.config)
    ca = model.config.cross_attention_layers
    counts = model._prompt_token_counts(batch["input_ids"], batch["attention_mask"])
    own = [(0,), (), (0, 2, 3, 5), (0, 3)]
    union = (0, 2, 3, 5)
    alone = [prefill_flops(shape, t, v, c, ca) for c, t, v in zip(own, *counts)]
    expected = {
        "masked": [prefill_flops(shape, t, v, union, ca) for t, v in zip(*counts)],
        # grouped: each group its own layers (the text-only sample has no visual token: every set costs the same)
        "grouped": alone,
    }
    # decoding continues from one cache laid out for the union of the groups with visual tokens in both paths
    decoding = {"masked": union, "grouped": (0, 2, 3, 5)}
    for batching in ("masked", "grouped"):
        out = _forward(model, batch, batching, visor_configuration=REQUEST, logits_to_keep=1)
        assert out.flops.tolist() == expected[batching], batching
        assert out.flops_alone.tolist() == alone
        ids = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(ids)], 1)
        with torch.no_grad():
            step = model(input_ids=ids, attention_mask=mask, past_key_values=out.past_key_values)
        assert step.flops.tolist() == [decode_flops(shape, t, v, decoding[batching], ca) for t, v in zip(*counts)]
        assert step.flops_alone.tolist() == [decode_flops(shape, t, v, c, ca) for c, t, v in zip(own, *counts)]

        gen = model.generate(
            **batch,
            visor_configuration=REQUEST,
            visor_batching=batching,
            max_new_tokens=4,
            min_new_tokens=4,
            return_dict_in_generate=True,
        )
        report = gen.visor_report
        assert report.prefill_flops == expected[batching] and report.prefill_flops_alone == alone
        for i, (c, t, v) in enumerate(zip(own, *counts)):
            assert report.decode_flops[i] == [decode_flops(shape, t + k, v, decoding[batching], ca) for k in range(3)]
            assert report.decode_flops_alone[i] == [decode_flops(shape, t + k, v, c, ca) for k in range(3)]
        assert sum(report.total_flops) >= sum(report.total_flops_alone)
    # masking overstates nothing any more: its batch costs more than the grouped one, as computed
    assert sum(expected["masked"]) > sum(expected["grouped"])


def test_training_auto_keeps_one_pass_and_grouped_gives_the_same_gradients():
    batch = build_batch(tiny_visor(seed=5), MIXED)
    # the first real token of a left-padded row is predicted from a padding position (never read): not a label
    after_padding = ~torch.nn.functional.pad(_real(batch)[:, :-1], (1, 0), value=False)
    labels = batch["input_ids"].masked_fill(~_real(batch) | after_padding | (batch["input_ids"] == IMAGE_ID), -100)
    results = {}
    for batching in ("auto", "masked", "grouped"):
        model = tiny_visor(seed=5).train()
        out = model(**batch, labels=labels, visor_configuration=REQUEST, visor_batching=batching)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results[batching] = out, grads
    assert results["auto"][0].visor_computed_layers == [(0, 2, 3, 5)] * 4  # one masked pass
    assert results["grouped"][0].visor_computed_layers == [(0,), (), (0, 2, 3, 5), ()]
    torch.testing.assert_close(results["auto"][0].loss, results["masked"][0].loss, atol=0, rtol=0)
    torch.testing.assert_close(results["grouped"][0].loss, results["masked"][0].loss, **TIGHT)
    grouped, masked = results["grouped"][1], results["masked"][1]
    assert grouped.keys() == masked.keys()
    for name in masked:
        torch.testing.assert_close(grouped[name], masked[name], atol=1e-6, rtol=1e-5, msg=name)

"""Generation with VISOR: cached decoding vs recomputation, mixed batches, dense equivalence through `generate`,
the router's decision, the compute budget and the per-sample FLOPs report (issue 3; docs/generation.md)."""

import threading

import pytest
import torch
from transformers import LogitsProcessorList, TextStreamer

from samples import ROUTED_ANYRES as ANYRES
from samples import ROUTED_ONE_IMAGE as ONE_IMAGE
from samples import ROUTED_TEXT_ONLY as TEXT_ONLY
from samples import ROUTED_TWO_IMAGES as TWO_IMAGES
from visor_hf.modeling import FlopsShape, VisorCache, decode_flops, prefill_flops
from visor_hf.modeling.flops_visor import configuration_costs
from visor_hf.testing import PAD_ID, ROUTE_ID, build_batch, visor_from_llava, word_ids
from visor_hf.testing import TINY_LAYOUT as LAYOUT

MIXED = [ONE_IMAGE, ANYRES, TWO_IMAGES, TEXT_ONLY]
NEW = 6  # new tokens per generation
GREEDY = {"max_new_tokens": NEW, "do_sample": False, "min_new_tokens": NEW}


def _generate(model, batch, **kwargs):
    return model.generate(**batch, **GREEDY, output_scores=True, return_dict_in_generate=True, **kwargs)


# --------------------------------------------------------------------------------------------------------------
# Cached decoding == recomputing the whole sequence at every step


@pytest.mark.parametrize("configuration", [0, 1, 2, [], [2, 5], "max", "auto"], ids=lambda c: f"conf={c}")
def test_cached_generation_equals_recomputation(visor, configuration):
    batch = build_batch(visor, [ONE_IMAGE, ANYRES, TEXT_ONLY])
    cached = _generate(visor, batch, visor_configuration=configuration)
    recomputed = _generate(visor, batch, visor_configuration=configuration, use_cache=False)
    assert isinstance(cached.past_key_values, VisorCache)
    assert torch.equal(cached.sequences, recomputed.sequences)
    for step, (a, b) in enumerate(zip(cached.scores, recomputed.scores)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"step {step}")


def test_sdpa_cached_generation_equals_recomputation(llava):
    model = visor_from_llava(llava, attn_implementation="sdpa", **LAYOUT)
    batch = build_batch(model, [ONE_IMAGE, TWO_IMAGES, TEXT_ONLY])
    request = [0, [], "max"]
    cached = _generate(model, batch, visor_configuration=request)
    recomputed = _generate(model, batch, visor_configuration=request, use_cache=False)
    assert torch.equal(cached.sequences, recomputed.sequences)
    for a, b in zip(cached.scores, recomputed.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Mixed batches: each sample gets what it gets alone


def test_mixed_batch_equals_each_sample_alone(visor):
    request = [0, [], 2, 1]  # a different forced configuration per sample (CA-only for the anyres one)
    batch = build_batch(visor, MIXED)
    together = _generate(visor, batch, visor_configuration=request)
    assert [tuple(c) for c in visor.last_visor_report.configurations] == [(0,), (), (0, 2, 3, 5), (0, 3)]
    width = batch["input_ids"].shape[1]
    for i, sample in enumerate(MIXED):
        alone = _generate(visor, build_batch(visor, [sample]), visor_configuration=request[i])
        assert torch.equal(together.sequences[i, width:], alone.sequences[0, -NEW:]), f"sample {i}"
        for a, b in zip(together.scores, alone.scores):
            torch.testing.assert_close(a[i], b[0], atol=1e-4, rtol=1e-4)


def test_auto_routing_in_a_left_padded_batch_equals_each_sample_alone(visor):
    # "auto" in a left-padded batch: the router's choices per sample equal those taken alone
    batch = build_batch(visor, MIXED)
    together = _generate(visor, batch)
    chosen = visor.last_visor_report.configurations
    width = batch["input_ids"].shape[1]
    for i, sample in enumerate(MIXED):
        alone = _generate(visor, build_batch(visor, [sample]))
        assert visor.last_visor_report.configurations[0] == chosen[i]
        assert torch.equal(together.sequences[i, width:], alone.sequences[0, -NEW:])


# --------------------------------------------------------------------------------------------------------------
# Dense equivalence through generate


@pytest.mark.parametrize(
    "options",
    [
        {"do_sample": False},
        {"do_sample": False, "num_beams": 3, "num_return_sequences": 2},
        {"do_sample": True, "top_k": 5, "temperature": 1.3},
        {"do_sample": True, "num_return_sequences": 2},
    ],
    ids=["greedy", "beam", "sampling", "sampling-nrs"],
)
def test_dense_generate_equals_llava_onevision(llava, dense, options):
    batch = build_batch(llava, [ONE_IMAGE, ANYRES, TEXT_ONLY])
    torch.manual_seed(123)
    expected = llava.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, **options)
    torch.manual_seed(123)
    actual = dense.generate(**batch, max_new_tokens=NEW, min_new_tokens=NEW, **options)
    assert torch.equal(actual, expected)


def test_beam_search_and_num_return_sequences_keep_the_configuration(visor):
    batch = build_batch(visor, [ONE_IMAGE, ANYRES, TEXT_ONLY])
    request = [0, [], 1]
    out = visor.generate(**batch, max_new_tokens=4, num_beams=3, num_return_sequences=2,
                         visor_configuration=request, return_dict_in_generate=True)
    assert out.sequences.shape[0] == 6
    assert out.visor_report.configurations == [(0,), (0,), (), (), (0, 3), (0, 3)]
    # every beam of a sample cached with its configuration; beams of the same sample equal what it gets alone
    for i, sample in enumerate([ONE_IMAGE, ANYRES, TEXT_ONLY]):
        alone = visor.generate(**build_batch(visor, [sample]), max_new_tokens=4, num_beams=3,
                               num_return_sequences=2, visor_configuration=request[i])
        width = batch["input_ids"].shape[1]
        assert torch.equal(out.sequences[2 * i : 2 * i + 2, width:], alone[:, -4:])


# --------------------------------------------------------------------------------------------------------------
# Router


def _force_router(model, bias):
    router = model.model.router
    with torch.no_grad():
        router.fc2.weight.zero_()
        router.fc2.bias.copy_(torch.tensor(bias, dtype=router.fc2.bias.dtype))


def test_forced_router_bias_picks_the_configuration(llava):
    model = visor_from_llava(llava, **LAYOUT)
    batch = build_batch(model, [ONE_IMAGE, ANYRES])
    for target in range(3):
        bias = [0.0, 0.0, 0.0]
        bias[target] = 5.0
        _force_router(model, bias)
        out = _generate(model, batch)
        assert out.visor_report.configuration_index == [target, target]
        forced = _generate(model, batch, visor_configuration=target)
        assert torch.equal(out.sequences, forced.sequences)


def test_router_follows_its_logits_per_sample(llava):
    model = visor_from_llava(llava, **LAYOUT)
    torch.manual_seed(5)
    with torch.no_grad():
        model.model.router.fc2.weight.normal_(0, 3.0)
    samples = [ONE_IMAGE, ANYRES, TWO_IMAGES]
    batch = build_batch(model, samples)
    with torch.no_grad():
        out = model(**batch, output_router_logits=True)
    rows = out.routing_token_batch_index.tolist()
    assert rows == [0, 1, 2]  # one routing token per sample
    expected = out.router_logits.argmax(-1).tolist()
    assert out.configuration_index.tolist() == expected
    assert len(set(expected)) > 1, "choose another seed: the test needs different choices per sample"
    generated = _generate(model, batch)
    assert generated.visor_report.configuration_index == expected


def _decisive_router(llava):
    """The tiny layout with large random router weights, so that routing tokens disagree."""
    model = visor_from_llava(llava, **LAYOUT)
    torch.manual_seed(7)
    with torch.no_grad():
        model.model.router.fc2.weight.normal_(0, 3.0)
    return model


def _questions(*questions: str) -> dict:
    """One image, then each question followed by a routing token."""
    text = [*word_ids("user"), "<image>"]
    for question in questions:
        text += [*word_ids(question), ROUTE_ID]
    return {"text": text, "images": [(16, 16)], "seed": 4}


def test_the_most_expensive_prediction_of_several_routing_tokens_wins(llava):
    model = _decisive_router(llava)
    three_questions = _questions("what is the colour ?", "how many circle are there ?", "any red ?")
    batch = build_batch(model, [three_questions, ONE_IMAGE, TEXT_ONLY])
    with torch.no_grad():
        out = model(**batch, output_router_logits=True)
    cost = [len(c) for c in LAYOUT["configurations"]]
    predicted = out.router_logits.argmax(-1).tolist()
    rows = out.routing_token_batch_index.tolist()
    for sample in range(3):
        mine = [p for p, r in zip(predicted, rows) if r == sample]
        assert out.configuration_index[sample].item() == max(mine, key=lambda p: (cost[p], p))
    assert rows.count(0) == 3

    # the rule itself, on crafted logits: max cost wins, ties go to the higher index, no token -> -1
    tie = visor_from_llava(llava, **{**LAYOUT, "configurations": [[0], [0, 2], [0, 3]]})
    logits = torch.tensor([[9.0, 0, 0], [0, 9.0, 0], [0, 0, 9.0], [0, 9.0, 0], [9.0, 0, 0]])
    index = torch.tensor([0, 0, 0, 1, 1])
    assert tie.model._route(logits, index, 3) == [2, 1, -1]


def test_the_router_ignores_routing_tokens_the_attention_mask_hides(llava):
    """A routing token under `attention_mask == 0` is not read: the router's rows and the configurations are those of
    the same batch with that token replaced by padding."""
    model = _decisive_router(llava)
    two_questions = _questions("what is the colour ?", "how many circle are there ?")
    batch = build_batch(model, [two_questions, ONE_IMAGE])
    routing = (batch["input_ids"][0] == ROUTE_ID).nonzero()[:, 0]
    hidden = routing[0].item()  # the first question's routing token is hidden
    batch["attention_mask"][0, hidden] = 0
    padded = {**batch, "input_ids": batch["input_ids"].clone()}
    padded["input_ids"][0, hidden] = PAD_ID
    with torch.no_grad():
        out = model(**batch, output_router_logits=True, visor_configuration="auto")
        want = model(**padded, output_router_logits=True, visor_configuration="auto")
    assert out.routing_token_batch_index.tolist() == want.routing_token_batch_index.tolist() == [0, 1]
    torch.testing.assert_close(out.router_logits, want.router_logits)
    assert out.visor_configurations == want.visor_configurations


def test_no_routing_token_falls_back_to_the_default_configuration(llava):
    model = visor_from_llava(llava, **{**LAYOUT, "default_configuration": 1})
    sample = {"text": [*word_ids("user"), "<image>", *word_ids("what is the colour ?")], "images": [(16, 16)]}
    out = _generate(model, build_batch(model, [sample, ONE_IMAGE]))
    assert out.visor_report.configurations[0] == (0, 3)


def test_two_threads_generating_with_one_model_get_their_own_reports(visor):
    """The report (`output.visor_report`, `model.last_visor_report`) and the cache a generation keeps for it belong to
    the thread that generates: a second thread generating meanwhile with the same model does not swap them."""
    batch = build_batch(visor, [ONE_IMAGE])
    paused, other_done, first_done = threading.Event(), threading.Event(), threading.Event()
    results = {}

    class PauseOnce:  # a logits processor: the first thread waits, mid-generation, for the second one
        def __call__(self, input_ids, scores):
            if not paused.is_set():
                paused.set()
                other_done.wait(timeout=120)
            return scores

    def first():
        out = _generate(visor, batch, visor_configuration=0, logits_processor=LogitsProcessorList([PauseOnce()]))
        results["first"] = (out.visor_report, visor.last_visor_report)
        first_done.set()

    def second():
        paused.wait(timeout=120)
        out = _generate(visor, batch, visor_configuration="max")
        other_done.set()
        first_done.wait(timeout=120)  # read the model's last report after the first thread finished
        results["second"] = (out.visor_report, visor.last_visor_report)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert results["first"][0] is not None and results["first"][0].configurations == [(0,)]
    assert results["first"][1] is results["first"][0]
    assert results["second"][0].configurations == [tuple(visor.config.self_attention_layers)]
    assert results["second"][1] is results["second"][0]


def test_without_a_cache_a_generated_routing_token_does_not_re_route(llava):
    """With `use_cache=False` every step re-runs the whole sequence; the configuration decided on the prompt still
    holds for the whole answer (as with a cache), even when the answer itself holds a routing token. Here the prompt
    has none (so the default configuration runs) and the router would pick another one from the answer's."""
    model = visor_from_llava(llava, **{**LAYOUT, "default_configuration": 0})
    _force_router(model, [0.0, 0.0, 5.0])
    sample = {"text": [*word_ids("user"), "<image>", *word_ids("what is the colour ?")], "images": [(16, 16)]}
    batch = build_batch(model, [sample, ONE_IMAGE])
    prompt_length = batch["input_ids"].shape[1]

    class RouteAtStep:  # the answer's second token is the routing token
        def __call__(self, input_ids, scores):
            if input_ids.shape[1] == prompt_length + 1:
                scores = torch.full_like(scores, -1e9)
                scores[:, ROUTE_ID] = 0
            return scores

    kwargs = dict(logits_processor=LogitsProcessorList([RouteAtStep()]), output_logits=True)
    cached = _generate(model, batch, use_cache=True, **kwargs)
    uncached = _generate(model, batch, use_cache=False, **kwargs)
    assert cached.visor_configurations == [(0,), (0, 2, 3, 5)]
    assert (cached.sequences[:, prompt_length + 1] == ROUTE_ID).all()
    assert torch.equal(uncached.sequences, cached.sequences)
    for got, want in zip(uncached.logits, cached.logits):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_later_steps_ignore_visor_configuration(visor):
    batch = build_batch(visor, [ONE_IMAGE])
    with torch.no_grad():
        prefill = visor(**batch, visor_configuration=0, use_cache=True)
        cache = prefill.past_key_values
        token = prefill.logits[:, -1:].argmax(-1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(token)], 1)
        step = visor(input_ids=token, attention_mask=mask, past_key_values=cache, visor_configuration="max")
    assert step.visor_configurations == [(0,)]


# --------------------------------------------------------------------------------------------------------------
# Budget and FLOPs report


def test_budget_picks_the_most_expensive_configuration_within_it(visor):
    batch = build_batch(visor, [ONE_IMAGE, ANYRES, TEXT_ONLY])
    shape = FlopsShape.from_config(visor.config)
    counts = visor._prompt_token_counts(batch["input_ids"], batch["attention_mask"])
    for budget in (0.38, 0.45, 0.55, 0.8, 1.0):
        out = visor.generate(**batch, max_new_tokens=3, visor_budget=budget, return_dict_in_generate=True)
        report = out.visor_report
        for i, (n_text, n_visual) in enumerate(zip(*counts)):
            if n_visual == 0:
                assert report.configurations[i] == tuple(visor.config.default_layers())
                continue
            dense = prefill_flops(shape, n_text, n_visual)
            costs = configuration_costs(visor.config, n_text, n_visual)
            fitting = [c for c, cost in enumerate(costs) if cost <= budget * dense]
            assert report.configuration_index[i] == max(fitting, key=lambda c: (costs[c], c))
            assert report.prefill_flops_alone[i] <= budget * report.dense_prefill_flops[i]
        forced = visor.generate(**batch, max_new_tokens=3, visor_configuration=[list(c) for c in report.configurations])
        assert torch.equal(forced, out.sequences)
    with pytest.raises(ValueError, match="below every configuration"):
        visor.generate(**batch, max_new_tokens=2, visor_budget=0.05)
    with pytest.raises(ValueError, match="either visor_configuration or visor_budget"):
        visor.generate(**batch, max_new_tokens=2, visor_budget=0.5, visor_configuration=0)
    # one budget per sample (a list follows its sample into beams)
    out = visor.generate(**batch, max_new_tokens=2, num_beams=2, visor_budget=[0.4, 1.0, 0.5], return_dict_in_generate=True)
    assert out.visor_report.configuration_index[:2] == [0, 2]


def test_flops_are_reported_in_forward_and_generate(visor):
    batch = build_batch(visor, [ONE_IMAGE, ANYRES, TEXT_ONLY])
    request = [0, [], "max"]
    shape = FlopsShape.from_config(visor.config)
    ca = visor.config.cross_attention_layers
    counts = visor._prompt_token_counts(batch["input_ids"], batch["attention_mask"])
    with torch.no_grad():
        out = visor(**batch, visor_configuration=request, use_cache=True, logits_to_keep=1)
        step = visor(input_ids=out.logits.argmax(-1), past_key_values=out.past_key_values,
                     attention_mask=torch.cat([batch["attention_mask"], torch.ones(3, 1, dtype=torch.long)], 1))
    layers = [(0,), (), (0, 2, 3, 5)]
    expected = [prefill_flops(shape, t, v, c, ca) for c, t, v in zip(layers, *counts)]
    # grouped (the rule's choice here): each sample computed its own layers; decoding runs the cache's full layers
    # (layer 0, the only SA layer a sample with visual tokens ran) for every sample
    assert out.visor_computed_layers == [(0,), (), ()]
    assert out.flops.tolist() == expected == out.flops_alone.tolist()
    assert step.flops_alone.tolist() == [decode_flops(shape, t, v, c, ca) for c, t, v in zip(layers, *counts)]
    assert step.flops.tolist() == [decode_flops(shape, t, v, (0,), ca) for t, v in zip(*counts)]

    gen = visor.generate(**batch, max_new_tokens=5, min_new_tokens=5, visor_configuration=request, return_dict_in_generate=True)
    report = gen.visor_report
    assert report is visor.last_visor_report
    assert gen.visor_configurations == layers and gen.configuration_index.tolist() == report.configuration_index
    assert report.prefill_flops == expected
    assert [len(d) for d in report.decode_flops] == [4, 4, 4]  # the first new token comes from the prefill
    for i, (c, t, v) in enumerate(zip(layers, *counts)):
        assert report.decode_flops_alone[i] == [decode_flops(shape, t + k, v, c, ca) for k in range(4)]
        assert report.decode_flops[i] == [decode_flops(shape, t + k, v, (0,), ca) for k in range(4)]
        assert report.dense_prefill_flops[i] == prefill_flops(shape, t, v)
    assert report.prefill_ratio[2] == 1.0  # text only: VISOR costs what LLaVA-OV costs
    assert report.prefill_ratio[0] < 1.0 and report.prefill_ratio[1] < 1.0
    # greedy without return_dict still leaves the report on the model
    visor.generate(**batch, max_new_tokens=2, visor_configuration=request)
    assert visor.last_visor_report.configurations == layers
    flops = visor.visor_flops(counts[0][0], counts[1][0], 0)
    assert flops["prefill"] == expected[0] and flops["dense_prefill"] == report.dense_prefill_flops[0]


# --------------------------------------------------------------------------------------------------------------
# Streamer and stop strings


def test_streamer_and_stop_strings(visor, capsys):
    from visor_hf.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer(with_routing_token=True)
    # `StopStringCriteria` decodes every token behind a fixed prefix, which a word-level vocabulary must know
    tokenizer.add_tokens(["abcdef"])
    batch = build_batch(visor, [ONE_IMAGE])
    full = visor.generate(**batch, max_new_tokens=8, min_new_tokens=8, do_sample=False)
    new_tokens = full[0, batch["input_ids"].shape[1] :]
    streamed = visor.generate(**batch, max_new_tokens=8, min_new_tokens=8, do_sample=False,
                              streamer=TextStreamer(tokenizer, skip_prompt=True))
    assert torch.equal(streamed, full)
    printed = capsys.readouterr().out
    assert printed.split() == tokenizer.decode(new_tokens).split()
    # stop at the third generated word
    stop = tokenizer.convert_ids_to_tokens(int(new_tokens[2]))
    first = next(k for k in range(len(new_tokens)) if tokenizer.convert_ids_to_tokens(int(new_tokens[k])) == stop)
    stopped = visor.generate(**batch, max_new_tokens=8, do_sample=False, stop_strings=[stop], tokenizer=tokenizer)
    assert stopped.shape[1] == batch["input_ids"].shape[1] + first + 1
    assert torch.equal(stopped[0], full[0, : stopped.shape[1]])


def test_several_images_per_sample_follow_their_sample_into_beams_and_copies(visor):
    samples = [TWO_IMAGES, ANYRES]
    batch = build_batch(visor, samples)
    for options in ({"num_beams": 2}, {"do_sample": True, "top_k": 1, "num_return_sequences": 2}):
        # logits, not only tokens: the tiny model often picks the same tokens from the wrong images
        options = {**options, "output_logits": True, "return_dict_in_generate": True}
        together = visor.generate(**batch, max_new_tokens=4, min_new_tokens=4, visor_configuration=1, **options)
        copies = together.sequences.shape[0] // 2
        for i, sample in enumerate(samples):
            alone = visor.generate(**build_batch(visor, [sample]), max_new_tokens=4, min_new_tokens=4,
                                   visor_configuration=1, **options)
            rows = slice(i * copies, (i + 1) * copies)
            assert torch.equal(together.sequences[rows, -4:], alone.sequences[:, -4:])
            for a, b in zip(together.logits, alone.logits):  # one row per beam / copy
                k = a.shape[0] // 2
                torch.testing.assert_close(a[i * k : (i + 1) * k], b, atol=1e-4, rtol=1e-4)

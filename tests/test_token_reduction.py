"""Visual token reduction before the LLM (VisionZip): placeholder counts, the selection against an eager-attention
reference, identity when everything is kept, dense LLaVA-OV == dense VISOR, batch == alone, cached generation."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from samples import (
    ANYRES,
    ONE_IMAGE,
    ROUTED_ANYRES,
    ROUTED_ONE_IMAGE,
    ROUTED_TEXT_ONLY,
    ROUTED_TWO_IMAGES,
    TEXT_ONLY,
    TWO_IMAGES,
    assert_row_matches_alone,
)
from visor_hf import VisorProcessor
from visor_hf.modeling.reduction_visor import (
    TokenReduction,
    apply_token_reduction,
    current_token_reduction,
    reduction_flops,
    token_reduction,
)
from visor_hf.testing import (
    CHAT_TEMPLATE,
    IMAGE_ID,
    LLAVA_PROCESSOR_FIELDS,
    TINY_LAYOUT,
    build_batch,
    count_image_tokens,
    llava_processor,
    random_image,
    tiny_image_processor,
    tiny_llava,
    tiny_tokenizer,
    visor_from_llava,
)

REDUCTIONS = [
    "visionzip:0.25",
    "visionzip:0.5",
    "visionzip:7",
    TokenReduction(keep=0.4, contextual_fraction=0.3),
    "visionzip:0.3:keep-newlines",
]
SIZES = [[(16, 16)], [(20, 40)], [(32, 32)], [(40, 24)], [(16, 32), (32, 32)]]
GREEDY = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}


@pytest.fixture(scope="module")
def processor():
    tokenizer = tiny_tokenizer(with_routing_token=True)
    fields = {k: v for k, v in LLAVA_PROCESSOR_FIELDS.items() if k != "processor_class"}
    return VisorProcessor(image_processor=tiny_image_processor(), tokenizer=tokenizer, chat_template=CHAT_TEMPLATE, **fields)


def _prompt(n_images: int) -> str:
    return "<|im_start|>user " + "<image>" * n_images + "\nwhat is the colour ?<|im_end|>\n<|im_start|>assistant\n"


# --------------------------------------------------------------------------------------------------------------
# Counts: the processor lays out exactly what the model returns


@pytest.mark.parametrize("reduction", REDUCTIONS, ids=str)
@pytest.mark.parametrize("sizes", SIZES, ids=lambda s: "+".join(f"{h}x{w}" for h, w in s))
def test_processor_count_equals_model_count(processor, reduction, sizes):
    images = [random_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    model = tiny_llava()
    # several images: as separate images of one prompt (anyres each) and as one multi-image sample (base view only)
    for given in [images] if len(images) == 1 else [images, [images]]:
        full = processor(text=_prompt(len(images)), images=given, return_tensors="pt")
        ours = processor(text=_prompt(len(images)), images=given, return_tensors="pt", token_reduction=reduction)

        def model_counts(inputs):
            with torch.no_grad():
                features = model.model.get_image_features(
                    inputs["pixel_values"],
                    inputs["image_sizes"],
                    batch_num_images=inputs["batch_num_images"],
                    return_dict=True,
                )
            return [f.shape[0] for f in features.pooler_output]

        plain_counts = model_counts(full)
        assert int((full["input_ids"] == IMAGE_ID).sum()) == sum(plain_counts)
        with token_reduction(reduction, model):
            counts = model_counts(ours)
        assert counts == [TokenReduction.parse(reduction).count(n) for n in plain_counts]
        assert int((ours["input_ids"] == IMAGE_ID).sum()) == sum(counts)
        # the dense LLaVA-OV processor gets the same count through apply_token_reduction
        reference = apply_token_reduction(llava_processor(processor.tokenizer), reduction)
        theirs = reference(text=_prompt(len(images)), images=given, return_tensors="pt")
        mine = processor(
            text=_prompt(len(images)), images=given, return_tensors="pt", token_reduction=reduction, add_routing_token=False
        )
        assert torch.equal(theirs["input_ids"], mine["input_ids"])
    sizes_hw = [list(s) for s in sizes]
    assert reference._get_num_multimodal_tokens(image_sizes=sizes_hw)["num_image_tokens"] == [
        TokenReduction.parse(reduction).count(n)
        for n in llava_processor(processor.tokenizer)._get_num_multimodal_tokens(image_sizes=sizes_hw)["num_image_tokens"]
    ]


def test_processor_attribute_and_chat_template(processor):
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is the colour ?"}]}]
    image = random_image(20, 40)
    plain = processor.apply_chat_template(conversation, add_generation_prompt=True)
    with token_reduction("visionzip:0.25", processor):
        assert str(current_token_reduction(processor)) == "visionzip:0.25"
        reduced = processor(text=plain, images=[image], return_tensors="pt")
    assert current_token_reduction(processor) is None
    by_call = processor(text=plain, images=[image], return_tensors="pt", token_reduction="visionzip:0.25")
    assert torch.equal(reduced["input_ids"], by_call["input_ids"])
    full = processor(text=plain, images=[image], return_tensors="pt")
    with token_reduction("visionzip:0.25", processor):
        templated = processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "what is the colour ?"}]}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        )
    assert torch.equal(templated["input_ids"], reduced["input_ids"])
    assert int((reduced["input_ids"] == IMAGE_ID).sum()) == round(0.25 * int((full["input_ids"] == IMAGE_ID).sum()))


# --------------------------------------------------------------------------------------------------------------
# The selection equals an independent computation (eager attention weights of the tower, explicit packed layout)


def _reference_packed(per_crop: torch.Tensor, grid: tuple[int, int], side: int = 4) -> torch.Tensor:
    """LLaVA-OV's packed order for an image that needs no unpadding: the base crop, then the grid row by row with
    a newline (NaN) after each row; `per_crop` is `[1 + gh * gw, side * side, c]`."""
    gh, gw = grid
    rows = [per_crop[0]]
    for r in range(gh * side):
        for c in range(gw * side):
            rows.append(per_crop[1 + (r // side) * gw + c // side, (r % side) * side + c % side][None])
        rows.append(torch.full((1, per_crop.shape[-1]), float("nan")))
    return torch.cat(rows)


def _reference_visionzip(features, scores, keys, n_kept, n_contextual, keep_newlines=False):
    newline = torch.isnan(scores)
    candidates = [i for i in range(len(scores)) if not newline[i]]
    candidates.sort(key=lambda i: -float(scores[i]))
    if keep_newlines:
        candidates = [i for i in range(len(scores)) if newline[i]] + candidates
    dominant = sorted(candidates[: n_kept - n_contextual])
    out = [features[i] for i in dominant]
    if n_contextual:
        pool = [i for i in range(len(scores)) if i not in dominant and not newline[i]]
        step = max(1, len(pool) // n_contextual)
        centres = pool[::step][:n_contextual]
        others = [i for i in pool if i not in centres]
        unit = keys / keys.norm(dim=-1, keepdim=True)
        groups = {c: [features[c]] for c in centres}
        for i in others:
            best = max(centres, key=lambda c: float(unit[i] @ unit[c]))
            groups[best].append(features[i])
        out += [torch.stack(groups[c]).mean(0) for c in centres]
    return torch.stack(out)


@pytest.mark.parametrize("size, grid", [((16, 16), (1, 1)), ((32, 32), (2, 2)), ((16, 32), (1, 2))])
@pytest.mark.parametrize(
    "reduction",
    [
        "visionzip:0.3",
        "visionzip:12",
        "visionzip:0.8",
        TokenReduction(keep=0.5, contextual_fraction=0.4),
        "visionzip:0.4:keep-newlines",
    ],
    ids=str,
)
def test_selection_equals_eager_attention_reference(size, grid, reduction):
    reduction = TokenReduction.parse(reduction)
    eager = tiny_llava(seed=3, attn_implementation="eager")
    sdpa = tiny_llava(seed=3, attn_implementation="sdpa")  # the hooked model: no attention weights returned
    pixels = tiny_image_processor()([random_image(*size, seed=5)], return_tensors="pt")
    crops = pixels["pixel_values"][0]
    with torch.no_grad():
        unreduced = eager.model.get_image_features(pixels["pixel_values"], pixels["image_sizes"], return_dict=True)
        tower = eager.model.vision_tower(crops, output_attentions=True, output_hidden_states=True)
        attention = tower.attentions[-1].mean(dim=(1, 2))  # [crops, P]: mean over heads and queries
        layer = eager.model.vision_tower.encoder.layers[-1]
        keys = layer.self_attn.k_proj(layer.layer_norm1(tower.hidden_states[-2]))
        keys = keys.view(*keys.shape[:2], 2, -1).mean(dim=2)  # mean over the 2 heads
        apply_token_reduction(sdpa, reduction)
        reduced = sdpa.model.get_image_features(pixels["pixel_values"], pixels["image_sizes"], return_dict=True)
    features = unreduced.pooler_output[0]
    scores = _reference_packed(attention[..., None], grid)[:, 0]
    packed_keys = _reference_packed(keys, grid)
    assert features.shape[0] == scores.shape[0]
    n_kept = reduction.count(features.shape[0])
    n_contextual = reduction.contextual_count(n_kept, features.shape[0], int((~torch.isnan(scores)).sum()))
    expected = _reference_visionzip(features, scores, packed_keys, n_kept, n_contextual, reduction.newlines == "keep")
    assert reduced.pooler_output[0].shape[0] == n_kept
    torch.testing.assert_close(reduced.pooler_output[0], expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# Models: keep everything == no reduction; dense LLaVA-OV == dense VISOR; batch == alone; generate


@pytest.mark.parametrize("spec", ["visionzip:1.0", "visionzip:1.0:keep-newlines"])
@pytest.mark.parametrize("layout", [{}, TINY_LAYOUT], ids=["dense-visor", "sparse-visor"])
def test_keeping_every_token_is_exactly_the_unreduced_model(layout, spec):
    llava = tiny_llava()
    visor = visor_from_llava(llava, **layout)
    batch = build_batch(llava, [ONE_IMAGE, ANYRES, TWO_IMAGES, TEXT_ONLY])
    with torch.no_grad():
        expected = [llava(**batch).logits, visor(**batch).logits]
        with token_reduction(spec, llava, visor):
            got = [llava(**batch).logits, visor(**batch).logits]
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize("reduction", ["visionzip:0.25", "visionzip:0.6"])
def test_dense_llava_onevision_with_reduction_equals_dense_visor_with_reduction(reduction):
    llava = tiny_llava()
    dense = visor_from_llava(llava)
    apply_token_reduction(llava, reduction)
    apply_token_reduction(dense, reduction)
    batch = build_batch(llava, [ONE_IMAGE, ANYRES, TWO_IMAGES, TEXT_ONLY])
    unreduced = build_batch(tiny_llava(), [ONE_IMAGE, ANYRES, TWO_IMAGES, TEXT_ONLY])
    assert batch["input_ids"].shape[1] < unreduced["input_ids"].shape[1]
    with torch.no_grad():
        expected, actual = llava(**batch).logits, dense(**batch).logits
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(actual[valid], expected[valid], atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def reduced_visor():
    visor = visor_from_llava(tiny_llava(), **TINY_LAYOUT)
    return apply_token_reduction(visor, "visionzip:0.4")


def test_batch_with_reduction_equals_each_sample_alone(reduced_visor):
    samples = [ANYRES, TEXT_ONLY, TWO_IMAGES, ONE_IMAGE]
    request = [[0], "max", [], [0, 2]]
    batch = build_batch(reduced_visor, samples)
    with torch.no_grad():
        together = reduced_visor(**batch, visor_configuration=request)
    for row, (sample, wanted) in enumerate(zip(samples, request)):
        alone = build_batch(reduced_visor, [sample])
        with torch.no_grad():
            logits = reduced_visor(**alone, visor_configuration=wanted).logits[0]
        assert_row_matches_alone(together.logits, row, alone, logits)


@pytest.mark.parametrize("configuration", [0, [], "max", "auto"], ids=lambda c: f"conf={c}")
def test_generate_with_reduction_cache_equals_recompute(reduced_visor, configuration):
    batch = build_batch(reduced_visor, [ROUTED_ONE_IMAGE, ROUTED_ANYRES, ROUTED_TWO_IMAGES, ROUTED_TEXT_ONLY])
    cached = reduced_visor.generate(**batch, **GREEDY, visor_configuration=configuration)
    recomputed = reduced_visor.generate(**batch, **GREEDY, visor_configuration=configuration, use_cache=False)
    assert torch.equal(cached.sequences, recomputed.sequences)
    for a, b in zip(cached.scores, recomputed.scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_dense_generate_with_reduction_equals_llava_onevision():
    llava = apply_token_reduction(tiny_llava(), "visionzip:0.3")
    dense = apply_token_reduction(visor_from_llava(tiny_llava()), "visionzip:0.3")
    batch = build_batch(llava, [ONE_IMAGE, ANYRES])
    theirs = llava.generate(**batch, **GREEDY)
    ours = dense.generate(**batch, **GREEDY)
    assert torch.equal(theirs.sequences, ours.sequences)


def test_reduction_changes_the_features_and_switches_off():
    model = tiny_llava()
    pixels = tiny_image_processor()([random_image(20, 40)], return_tensors="pt")
    before = count_image_tokens(model, pixels["pixel_values"], pixels["image_sizes"])
    with token_reduction("visionzip:0.5", model):
        during = count_image_tokens(model, pixels["pixel_values"], pixels["image_sizes"])
        copied = copy.deepcopy(model)  # the copy keeps the reduction, bound to itself
    assert during == [round(0.5 * before[0])]
    assert count_image_tokens(model, pixels["pixel_values"], pixels["image_sizes"]) == before
    assert count_image_tokens(copied, pixels["pixel_values"], pixels["image_sizes"]) == during
    assert copied.model.get_image_features.__self__ is copied.model
    assert "get_image_features" not in vars(model.model)


def test_gradients_flow_through_kept_and_merged_features():
    model = apply_token_reduction(tiny_llava(), "visionzip:0.3")
    batch = build_batch(model, [ANYRES])
    model(**batch, labels=batch["input_ids"]).loss.backward()
    assert model.model.multi_modal_projector.linear_1.weight.grad.abs().sum() > 0


def test_reduction_flops_counts_scoring_and_merge():
    config = tiny_llava().config
    small = reduction_flops(config, crops=1, n_tokens=17, reduction="visionzip:0.5")
    assert reduction_flops(config, crops=2, n_tokens=17, reduction="visionzip:0.5") > small > 0


# --------------------------------------------------------------------------------------------------------------
# Errors


@pytest.mark.parametrize(
    "spec, error",
    [
        ("pruneall:0.5", "unknown token reduction method 'pruneall'; known: visionzip"),
        ("visionzip", "expected 'method:keep'"),
        ("visionzip:half", "neither a fraction nor a count"),
        ("visionzip:1.5", r"must be in \(0, 1\]"),
        ("visionzip:0", "must be >= 1"),
        ("visionzip:0.5:keep-everything", "unknown option 'keep-everything'"),
    ],
)
def test_bad_reduction_specs(spec, error):
    with pytest.raises(ValueError, match=error):
        TokenReduction.parse(spec)


def test_keep_more_tokens_than_the_image_has(processor):
    image = random_image(16, 16)  # 16 base + 16 grid + 4 newline = 36 tokens
    with pytest.raises(ValueError, match="keeps 40 tokens per image but an image has only 36 visual tokens"):
        processor(text=_prompt(1), images=[image], token_reduction="visionzip:40")
    model = apply_token_reduction(tiny_llava(), "visionzip:40")
    pixels = tiny_image_processor()([image], return_tensors="pt")
    with pytest.raises(ValueError, match="keeps 40 tokens per image but an image has only 36 visual tokens"):
        count_image_tokens(model, pixels["pixel_values"], pixels["image_sizes"])


def test_placeholder_count_mismatch_names_both_counts():
    model = tiny_llava()
    batch = build_batch(model, [ANYRES])  # laid out for the unreduced model
    n = int((batch["input_ids"] == IMAGE_ID).sum())
    apply_token_reduction(model, "visionzip:0.25")
    with pytest.raises(
        ValueError,
        match=f"holds {n} image placeholder tokens but token reduction visionzip:0.25 leaves {round(0.25 * n)} image features",
    ):
        model(**batch)


def test_unsupported_model_is_refused():
    with pytest.raises(TypeError, match="LLaVA-OneVision and VISOR"):
        apply_token_reduction(torch.nn.Linear(2, 2), "visionzip:0.5")


# --------------------------------------------------------------------------------------------------------------
# visor-hf toy --reduction


def test_toy_command_with_reduction(capsys):
    import re

    from visor_hf.cli import main
    from visor_hf.modeling.flops_visor import FlopsShape, prefill_flops
    from visor_hf.toy.inference import fresh_examples, load_toy

    assert main(["toy", "--images", "1", "--seed", "3", "--reduction", "visionzip:0.25"]) == 0
    out = capsys.readouterr().out
    assert "visual token reduction: visionzip:0.25" in out
    pattern = re.compile(
        r"^  \[(easy|hard)\] (.+?) +answer (\S*) +truth (\S+) +(ok |BAD) SA layers (\[[\d, ]*\]) +FLOPs ([\d.]+)x dense$"
    )
    lines = [m for m in map(pattern.match, out.splitlines()) if m]
    examples = fresh_examples(3, 1)
    assert len(lines) == len(examples) == 5
    model, processor = load_toy()
    shape = FlopsShape.from_config(model.config)
    for m, e in zip(lines, examples):
        text, answer, layers, ratio = m.group(2), m.group(3), json.loads(m.group(6)), float(m.group(7))
        n_text = 2 + len(text.split()) + 1 + 3  # chat tokens, question, routing token
        # the LLM ran on round(0.25 * 88) = 22 visual tokens; dense LLaVA-OV on all 88
        expected = prefill_flops(shape, n_text, 22, layers, model.config.cross_attention_layers) / prefill_flops(
            shape, n_text - 1, 88
        )
        assert abs(ratio - expected) <= 0.005
        # the same question alone, with the reduction on the model and the processor
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": e.question.text}]}]
        with token_reduction("visionzip:0.25", model, processor):
            inputs = processor(
                images=[e.image],
                text=processor.apply_chat_template(conversation, add_generation_prompt=True),
                return_tensors="pt",
            )
            assert int((inputs["input_ids"] == model.config.image_token_id).sum()) == 22
            ids = model.generate(**inputs, max_new_tokens=2, do_sample=False, visor_configuration=layers)
        word = processor.tokenizer.decode(ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True).split()
        assert answer == (word[0] if word else "")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--reduction", "zip:0.5"], "unknown token reduction method 'zip'"),
        (["--reduction", "visionzip:100"], "keeps 100 tokens per image but an image has only 88 visual tokens"),
    ],
)
def test_toy_command_refuses_bad_reductions(argv, message, capsys):
    from visor_hf.cli import main

    try:
        code = main(["toy", "--images", "1", "--seed", "0", *argv])
    except SystemExit as raised:
        code = raised.code
    assert code == 2
    assert message in capsys.readouterr().err


def test_benchmark_rows_recompute_to_the_recorded_flops(monkeypatch):
    """The recorded `*_visionzip` rows of benchmarks/results/token_reduction hold the FLOPs of the LLM on the kept
    tokens plus the reduction's own cost, and `--recompute-flops` reproduces them."""
    from pathlib import Path

    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(benchmarks))
    from visor_bench.report import recompute_flops
    from visor_bench.shapes import QWEN2_0_5B, TEXT_AFTER, TEXT_BEFORE, llava_config

    from visor_hf.modeling.flops_visor import FlopsShape, prefill_flops

    report = json.loads((benchmarks / "results" / "token_reduction" / "results.json").read_text())
    recorded = {(s["n_visual"], r["name"]): r["flops_prefill"] for s in report["sizes"] for r in s["rows"]}
    recompute_flops(report)
    config = llava_config(QWEN2_0_5B)
    shape, ca = FlopsShape.from_config(config), report["model"]["cross_attention_layers"]
    n_text = TEXT_BEFORE + TEXT_AFTER
    for size in report["sizes"]:
        n = size["n_visual"]
        kept = round(0.25 * n)
        own = reduction_flops(config, -(-n // 729), n, "visionzip:0.25")
        expected = {
            "visionzip": prefill_flops(shape, n_text, kept) + own,
            "visor_ca_visionzip": prefill_flops(shape, n_text, kept, [], ca) + own,
            "visor_sa2_visionzip": prefill_flops(shape, n_text, kept, [2, 14], ca) + own,
        }
        for row in size["rows"]:
            if row["name"] in expected:
                assert row["flops_prefill"] == expected[row["name"]] == recorded[(n, row["name"])]
                assert row["llm_visual_tokens"] == f"{n}->{kept}"


def test_ranking_layer_choice_and_range():
    """`layer=` picks the ranking layer (the tiny tower has 2): layer 0 ranks differently from the default (the
    last, which outputs the selected feature); an index outside the tower is refused."""
    pixels = tiny_image_processor()([random_image(32, 32, seed=2)], return_tensors="pt")

    def reduced(reduction):
        model = apply_token_reduction(tiny_llava(), reduction)
        with torch.no_grad():
            return model.model.get_image_features(pixels["pixel_values"], pixels["image_sizes"], return_dict=True).pooler_output[
                0
            ]

    default, last, first = (reduced(TokenReduction(keep=0.3, layer=layer)) for layer in (None, -1, 0))
    assert torch.equal(default, last) and not torch.equal(default, first)
    with pytest.raises(ValueError, match="token reduction layer -3 is out of range for 2 vision layers"):
        reduced(TokenReduction(keep=0.3, layer=-3))

"""Attention backends: flex attention against eager (the reference implementation) on every mask VISOR builds, the
dense layout under flex against LLaVA-OV under flex, and the refusal of flash attention / kernels (docs/model.md,
"Attention backends").

Tolerance: 1e-5 (absolute and relative), as eager vs sdpa in tests/test_model_core.py. Flex attention on CPU compiles
its kernel and its block masks (torch.compile) on first use: the first test of this file pays a few seconds to a
minute, depending on the inductor cache.
"""

import copy
import functools

import pytest
import torch
import torch._dynamo
from transformers.integrations.flex_attention import BlockMask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from samples import ANYRES, ONE_IMAGE, TEXT_ONLY, TWO_IMAGES, assert_no_text_sees_a_later_image, recorded_host_syncs, routed
from visor_hf import VisorConfig, VisorForConditionalGeneration
from visor_hf.testing import TINY_LAYOUT, build_batch, tiny_llava, tiny_qwen_vl, visor_from_llava, visor_from_qwen_vl

FLEX = "flex_attention"
TOL = {"atol": 1e-5, "rtol": 1e-5}
GREEDY = {"max_new_tokens": 5, "min_new_tokens": 5, "do_sample": False, "output_scores": True, "return_dict_in_generate": True}

# (samples, visor_configuration): every kind of mask VISOR builds
CASES = {
    # every sample runs every SA layer: plain causal masks (with padding), CA causal by original position
    "uniform": ([ONE_IMAGE, ANYRES], "max"),
    # the samples skip different SA layers: the visual keys are hidden from the samples that skip a layer
    "mixed-configurations": ([ANYRES, TEXT_ONLY, TWO_IMAGES], [[0], "max", []]),
    # no SA layer at all: the visual tokens are met only by the CA blocks
    "ca-only": ([ONE_IMAGE, TWO_IMAGES], []),
    # no visual token: text-only layers and no CA block
    "text-only": ([TEXT_ONLY], "max"),
    # left padding of different lengths; a text-only sample among images (its CA rows see no key)
    "left-padded": ([ONE_IMAGE, ANYRES, TWO_IMAGES, TEXT_ONLY], [0, [], "max", 1]),
    # two images: text between them sees only the first
    "two-images": ([TWO_IMAGES], [0, 3]),
    # the router decides after layer 1 (the plan and the masks change in the middle of the forward)
    "router": ([routed(ONE_IMAGE), routed(TEXT_ONLY)], "auto"),
}


@pytest.fixture(scope="module", autouse=True)
def _static_shapes():
    """torch 2.13's CPU flex kernel fails to compile (C++ codegen error) once dynamo makes its shapes dynamic, for
    transformers' own LLaVA-OV too: compile each shape statically (docs/model.md, "Attention backends")."""
    with torch._dynamo.config.patch(automatic_dynamic_shapes=False):
        yield


@pytest.fixture(scope="module")
def flex(llava, visor):
    """`visor` (eager) under flex attention: the same weights, the router's included."""
    model = visor_from_llava(llava, attn_implementation=FLEX, **TINY_LAYOUT)
    model.load_state_dict(visor.state_dict())
    return model


def _valid(batch):
    return batch["attention_mask"].bool()


@pytest.mark.slow  # torch.compile of the flex kernel and block masks on CPU
@pytest.mark.parametrize("case", list(CASES))
def test_flex_equals_eager(visor, flex, case):
    samples, request = CASES[case]
    batch = build_batch(visor, samples)
    assert flex.config.text_config._attn_implementation == FLEX
    with torch.no_grad():
        expected = visor(**batch, visor_configuration=request)
        actual = flex(**batch, visor_configuration=request)
    assert actual.visor_configurations == expected.visor_configurations
    valid = _valid(batch)
    torch.testing.assert_close(actual.logits[valid], expected.logits[valid], **TOL)


@pytest.mark.slow  # torch.compile of the flex kernel and block masks on CPU
def test_every_attention_call_under_flex_gets_a_block_mask(flex, monkeypatch):
    """The decoder layers and the CA blocks all run flex attention with a BlockMask (no silent fallback to SDPA)."""
    masks = []
    flex_forward = ALL_ATTENTION_FUNCTIONS[FLEX]

    def spy(module, query, key, value, attention_mask, **kwargs):
        masks.append((type(module).__name__, attention_mask))
        return flex_forward(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, FLEX, spy)
    batch = build_batch(flex, [ANYRES, TEXT_ONLY])
    with torch.no_grad():
        # one masked pass (a grouped prefill would run each group's layers: more calls, the same masks)
        out = flex(**batch, visor_configuration=[[0], "max"], visor_batching="masked")
        token = out.logits[:, -1:].argmax(-1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(token)], 1)
        flex(input_ids=token, attention_mask=mask, past_key_values=out.past_key_values)
    layers, cross = flex.config.text_config.num_hidden_layers, len(flex.config.cross_attention_layers)
    # the LLM's layers and CA blocks at prefill and at the decoding step (the SigLIP tower runs flex too)
    llm = [name for name, _ in masks if name in ("Qwen2Attention", "VisorCrossAttention")]
    assert len(llm) == 2 * (layers + cross)
    assert all(isinstance(m, BlockMask) for name, m in masks if name in ("Qwen2Attention", "VisorCrossAttention"))


@pytest.mark.slow  # torch.compile of the flex kernel and block masks on CPU
def test_no_text_sees_a_later_image_under_flex(flex):
    batch = build_batch(flex, [TWO_IMAGES])
    for request in ([], "max"):
        assert_no_text_sees_a_later_image(functools.partial(flex, visor_configuration=request), batch)


@pytest.mark.slow  # torch.compile of the flex kernel and block masks on CPU
def test_flex_cached_decoding_equals_recomputation_and_eager(visor, flex):
    """Prefill and cached decoding steps under flex (text and full slots, hidden visual keys, the CA mask of a step)
    equal a recomputation without cache under flex, and eager's cached decoding."""
    batch = build_batch(flex, [ONE_IMAGE, TWO_IMAGES, TEXT_ONLY])
    request = [0, [], "max"]
    cached = flex.generate(**batch, **GREEDY, visor_configuration=request)
    recomputed = flex.generate(**batch, **GREEDY, visor_configuration=request, use_cache=False)
    eager = visor.generate(**batch, **GREEDY, visor_configuration=request)
    assert torch.equal(cached.sequences, recomputed.sequences)
    assert torch.equal(cached.sequences, eager.sequences)
    for step, (a, b, c) in enumerate(zip(cached.scores, recomputed.scores, eager.scores)):
        torch.testing.assert_close(a, b, **TOL, msg=f"step {step}: cache vs recompute")
        torch.testing.assert_close(a, c, **TOL, msg=f"step {step}: flex vs eager")


@pytest.mark.slow  # torch.compile of the flex kernel and block masks on CPU
def test_a_flex_decoding_step_makes_no_host_sync(flex):
    batch = build_batch(flex, [ONE_IMAGE, ANYRES, TEXT_ONLY])
    with torch.no_grad():
        out = flex(**batch, visor_configuration=torch.tensor([0, 1, 2]), use_cache=True)
    token = out.logits[:, -1:].argmax(-1)
    mask = torch.cat([batch["attention_mask"], torch.ones_like(token)], 1)
    with torch.no_grad():  # a first step on a copy compiles what the step needs
        flex(input_ids=token, attention_mask=mask, past_key_values=copy.deepcopy(out.past_key_values))
    with recorded_host_syncs() as calls, torch.no_grad():
        flex(input_ids=token, attention_mask=mask, past_key_values=out.past_key_values, logits_to_keep=1)
    assert calls == []


@pytest.mark.slow  # torch.compile of the flex kernel and block masks on CPU
def test_flex_beam_search_equals_eager(visor, flex):
    batch = build_batch(flex, [ANYRES, ONE_IMAGE])
    kwargs = {
        "max_new_tokens": 4,
        "num_beams": 3,
        "num_return_sequences": 2,
        "do_sample": False,
        "visor_configuration": [[0], []],
    }
    assert torch.equal(flex.generate(**batch, **kwargs), visor.generate(**batch, **kwargs))


@pytest.mark.slow  # torch.compile of the flex kernel and block masks on CPU
def test_dense_layout_under_flex_reproduces_llava_onevision_under_flex():
    llava = tiny_llava(seed=1, attn_implementation=FLEX)
    dense = visor_from_llava(llava)
    assert dense.config.text_config._attn_implementation == FLEX
    batch = build_batch(llava, [ANYRES, TEXT_ONLY, TWO_IMAGES])
    with torch.no_grad():
        expected, actual = llava(**batch).logits, dense(**batch).logits
    valid = _valid(batch)
    torch.testing.assert_close(actual[valid], expected[valid], **TOL)
    greedy = {"max_new_tokens": 5, "do_sample": False}
    assert torch.equal(dense.generate(**batch, **greedy), llava.generate(**batch, **greedy))


# --------------------------------------------------------------------------------------------------------------
# Refused implementations name what to use instead


@pytest.mark.parametrize(
    "implementation", ["flash_attention_2", "flash_attention_3", "kernels-community/flash-attn2", "paged|eager"]
)
def test_flash_attention_and_kernels_are_refused_naming_the_alternatives(llava, implementation):
    config = VisorConfig(**{**llava.config.to_dict(), **TINY_LAYOUT})
    for load in (
        lambda: VisorForConditionalGeneration._from_config(config, attn_implementation=implementation),
        lambda: visor_from_llava(llava).set_attn_implementation(implementation),
    ):
        with pytest.raises(ValueError, match=r'"eager", "sdpa", "flex_attention"') as error:
            load()
        assert implementation in str(error.value)


def test_qwen2_vl_refuses_flex_naming_the_alternatives():
    source = tiny_qwen_vl("qwen2_vl", seed=0)
    with pytest.raises(ValueError, match=r'flex_attention.*Use one of "eager", "sdpa" instead'):
        visor_from_qwen_vl(source, attn_implementation=FLEX)


def test_an_unknown_implementation_gets_transformers_own_error(llava):
    with pytest.raises(ValueError, match='Specified `attn_implementation="foo"` is not supported'):
        visor_from_llava(llava).set_attn_implementation("foo")

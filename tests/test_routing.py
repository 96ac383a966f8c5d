"""The router's selection rule (paper arg-max and calibrated threshold) and the `visor_router_threshold=` knob
through forward and generate (per sample, beams), with its errors."""

import math

import pytest
import torch

from samples import ROUTED_ANYRES as ANYRES
from samples import ROUTED_ONE_IMAGE as ONE_IMAGE
from visor_hf.modeling import VisorConfig
from visor_hf.modeling.routing_visor import select_configurations
from visor_hf.testing import TINY_LAYOUT as LAYOUT
from visor_hf.testing import build_batch, tiny_llava_config, visor_from_llava

CONFIGURATIONS = [[], [3], [6], [1, 6, 7], [1, 3, 6, 7]]  # costs 0, 1, 1, 3, 4


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def rows(*probabilities):
    return torch.tensor([[logit(p) for p in row] for row in probabilities])


def test_argmax_router_picks_the_arg_max_and_a_sample_runs_its_most_expensive_token():
    logits = torch.tensor([[0.0, 3.0, 0.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 2.0, 0.0]])
    assert select_configurations(logits, torch.tensor([0, 1, 1]), 3, CONFIGURATIONS) == [1, 3, -1]
    assert select_configurations(None, None, 2, CONFIGURATIONS) == [-1, -1]


def test_calibrated_router_picks_the_cheapest_configuration_at_or_above_the_threshold():
    batch = torch.tensor([0, 1, 2, 3])
    logits = rows(
        [0.95, 0.5, 0.5, 0.99, 0.999],  # CA-only is above 0.9
        [0.2, 0.3, 0.3, 0.92, 0.99],  # only [1, 6, 7] (and max) above 0.9
        [0.2, 0.3, 0.3, 0.5, 0.6],  # nothing above: the maximal configuration, even below the threshold itself
        [0.1, 0.91, 0.95, 0.97, 0.99],  # two of cost 1 above: the more probable ([6])
    )
    assert select_configurations(logits, batch, 4, CONFIGURATIONS, [0.9] * 4) == [0, 3, 4, 2]
    # per-sample thresholds in one batch
    assert select_configurations(logits, batch, 4, CONFIGURATIONS, [0.96, 0.25, 0.55, 0.99]) == [3, 1, 4, 4]
    # threshold 0: the cheapest; threshold 1: nothing reaches it, the maximal one
    assert select_configurations(logits, batch, 4, CONFIGURATIONS, [0.0] * 4) == [0, 0, 0, 0]
    assert select_configurations(logits, batch, 4, CONFIGURATIONS, [1.0] * 4) == [4, 4, 4, 4]
    # a tie in cost and probability: the lower index
    tie = rows([0.1, 0.95, 0.95, 0.97, 0.99])
    assert select_configurations(tie, torch.tensor([0]), 1, CONFIGURATIONS, [0.9]) == [1]
    # a probability exactly at the threshold counts as reaching it
    exact = torch.tensor([[0.0, -9.0, -9.0, -9.0, 9.0]])  # sigmoid(0) = 0.5
    assert select_configurations(exact, torch.tensor([0]), 1, CONFIGURATIONS, [0.5]) == [0]
    # two routing tokens in one sample: the more expensive choice
    two = rows([0.95, 0.1, 0.1, 0.1, 0.99], [0.1, 0.1, 0.1, 0.95, 0.99])
    assert select_configurations(two, torch.tensor([0, 0]), 2, CONFIGURATIONS, [0.9, 0.9]) == [3, -1]


def test_higher_threshold_is_never_cheaper():
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 5, generator=generator) * 3
    batch = torch.arange(200)
    previous = None
    for t in [0.0, 0.1, 0.3, 0.5, 0.7, 0.9, 0.99, 1.0]:
        chosen = select_configurations(logits, batch, 200, CONFIGURATIONS, [t] * 200)
        cost = [len(CONFIGURATIONS[c]) for c in chosen]
        if previous is not None:
            assert all(a >= b for a, b in zip(cost, previous))
        previous = cost
    assert previous == [4] * 200


# -- through the model ---------------------------------------------------------------------------------------------


@pytest.fixture
def calibrated(llava):
    model = visor_from_llava(llava, **LAYOUT)  # configurations [[0], [0, 3], [0, 2, 3, 5]], router after layer 1
    model.config.router_type = "calibrated"
    model.config.router_threshold = 0.9
    with torch.no_grad():  # constant probabilities: [0] 0.6, [0, 3] 0.8, max 0.95
        model.model.router.fc2.weight.zero_()
        model.model.router.fc2.bias.copy_(torch.tensor([logit(0.6), logit(0.8), logit(0.95)]))
    return model


def test_threshold_through_forward_and_generate(calibrated):
    model = calibrated
    batch = build_batch(model, [ONE_IMAGE, ANYRES])
    with torch.no_grad():
        assert model(**batch).configuration_index.tolist() == [2, 2]  # the config's 0.9
        assert model(**batch, visor_router_threshold=0.7).configuration_index.tolist() == [1, 1]
        assert model(**batch, visor_router_threshold=torch.tensor([0.5, 0.99])).configuration_index.tolist() == [0, 2]
    # per sample in a batch: the same sequences as each sample forced to its configuration, and as each alone
    out = model.generate(**batch, max_new_tokens=3, do_sample=False, visor_router_threshold=[0.5, 0.75], return_dict_in_generate=True)
    assert out.visor_report.configuration_index == [0, 1]
    forced = model.generate(**batch, max_new_tokens=3, do_sample=False, visor_configuration=torch.tensor([0, 1]))
    assert torch.equal(out.sequences, forced)
    width = batch["input_ids"].shape[1]
    for i, (sample, t) in enumerate(zip([ONE_IMAGE, ANYRES], [0.5, 0.75])):
        alone = model.generate(**build_batch(model, [sample]), max_new_tokens=3, do_sample=False, visor_router_threshold=t)
        assert torch.equal(out.sequences[i, width:], alone[0, -3:])
    # beams: a per-sample threshold follows its sample into every beam and returned sequence
    beams = model.generate(**batch, max_new_tokens=3, num_beams=2, num_return_sequences=2, visor_router_threshold=[0.95, 0.5],
                           return_dict_in_generate=True)
    assert beams.visor_report.configuration_index == [2, 2, 0, 0]
    reference = model.generate(**batch, max_new_tokens=3, num_beams=2, num_return_sequences=2, visor_configuration=torch.tensor([2, 0]))
    assert torch.equal(beams.sequences, reference)


def test_threshold_without_a_cache_holds_the_prompts_configuration(calibrated):
    """Without a cache every step re-runs the whole sequence: the threshold picks the configuration once, on the
    prompt, and the answer equals the cached generation with the same threshold."""
    batch = build_batch(calibrated, [ONE_IMAGE, ANYRES])
    kwargs = {"max_new_tokens": 3, "do_sample": False, "visor_router_threshold": [0.5, 0.75]}
    cached = calibrated.generate(**batch, **kwargs)
    uncached = calibrated.generate(**batch, use_cache=False, **kwargs)
    assert torch.equal(uncached, cached)


def test_bad_thresholds_are_refused(calibrated, llava):
    model = calibrated
    batch = build_batch(model, [ONE_IMAGE, ANYRES])
    for bad in (1.5, -0.1, float("nan"), [0.5, 2.0]):
        with pytest.raises(ValueError, match="visor_router_threshold"):
            model(**batch, visor_router_threshold=bad)
    with pytest.raises(ValueError, match="entries for a batch of 2"):
        model(**batch, visor_router_threshold=[0.5])
    for request in (0, [0, 3], "max", [0, [0, 3]]):
        with pytest.raises(ValueError, match="explicit visor_configuration"):
            model(**batch, visor_configuration=request, visor_router_threshold=0.5)
    with pytest.raises(ValueError, match="explicit visor_configuration"):
        model.generate(**batch, max_new_tokens=2, visor_configuration=1, visor_router_threshold=0.5)
    with pytest.raises(ValueError, match="visor_budget"):
        model.generate(**batch, max_new_tokens=2, visor_budget=0.9, visor_router_threshold=0.5)
    # a mixed request is fine: the threshold applies to the samples the router decides
    with torch.no_grad():
        assert model(**batch, visor_configuration=[0, "auto"], visor_router_threshold=0.7).configuration_index.tolist() == [0, 1]
    argmax = visor_from_llava(llava, **LAYOUT)
    with pytest.raises(ValueError, match="calibrated router"):
        argmax(**batch, visor_router_threshold=0.5)
    config = tiny_llava_config()
    with pytest.raises(ValueError, match="router_threshold"):
        VisorConfig(text_config=config.text_config.to_dict(), vision_config=config.vision_config.to_dict(), router_threshold=1.2)
    with pytest.raises(ValueError, match="router_type"):
        VisorConfig(text_config=config.text_config.to_dict(), vision_config=config.vision_config.to_dict(), router_type="softmax")

"""The lmms-eval plugin (`--model visor`) and the `visor_toy` task, checked against direct `generate` calls.

Needs lmms-eval and the packages its evaluator imports (`bash scripts/setup.sh --eval`, which the CI's set-up
runs); skipped without them.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch

from visor_hf.toy.inference import DEFAULT_CHECKPOINT, answer_examples, fresh_examples, load_toy

pytest.importorskip("lmms_eval.evaluator")

TOY = str(DEFAULT_CHECKPOINT)
LIMIT = 6  # documents per subtask


@pytest.fixture(scope="module")
def toy():
    return load_toy()


def _plugin(**model_args):
    from visor_hf.lmms.model import Visor

    return Visor(pretrained=model_args.pop("pretrained", TOY), **model_args)


def _toy_docs(difficulty: str, limit: int):
    """The task's documents in order: what `visor_toy_<difficulty>` holds (seed 0)."""
    return [e for e in fresh_examples(0, 200) if e.question.difficulty == difficulty][:limit]


def test_entry_point_registers_the_model():
    from lmms_eval.models import get_model

    from visor_hf.lmms.model import Visor

    assert get_model("visor") is Visor


@pytest.mark.slow
@pytest.mark.parametrize("configuration", ["auto", "max"])
def test_evaluator_matches_direct_generate(toy, configuration):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from visor_hf.lmms import TASKS_DIR

    args = f"pretrained={TOY}" + ("" if configuration == "auto" else f",visor_configuration={configuration}")
    out = simple_evaluate(
        model="visor",
        model_args=args,
        tasks=["visor_toy"],
        limit=LIMIT,
        batch_size=4,
        task_manager=TaskManager(include_path=str(TASKS_DIR)),
        log_samples=True,
    )
    model, processor = toy
    for difficulty in ("easy", "hard"):
        task = f"visor_toy_{difficulty}"
        examples = _toy_docs(difficulty, LIMIT)
        direct = answer_examples(model, processor, examples, visor_configuration=configuration, batch_size=1)
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        assert [s["target"] for s in samples] == [e.question.answer for e in examples]
        assert [s["filtered_resps"][0].split()[0] for s in samples] == [a.answer for a in direct]
        logged = [s["token_counts"][0] for s in samples]
        assert [tuple(t["visor_configuration"]) for t in logged] == [a.sa_layers for a in direct]
        assert [t["visor_sa_layers"] for t in logged] == [len(a.sa_layers) for a in direct]
        for t, a in zip(logged, direct):
            assert math.isclose(t["visor_flops_ratio"], a.flops_ratio, rel_tol=1e-9)
        accuracy = sum(a.correct for a in direct) / len(direct)
        assert out["results"][task]["exact_match,none"] == pytest.approx(accuracy)
        ratio = sum(a.prefill_flops for a in direct) / sum(a.dense_prefill_flops for a in direct)
        assert out["throughput"][f"avg_visor_flops_ratio ({task})"] == pytest.approx(ratio)
        if configuration == "max":
            assert all(a.sa_layers == tuple(model.config.self_attention_layers) for a in direct)


class _Request:
    """What the plugin reads of lmms-eval's `Instance`: `args` and `task_name`."""

    def __init__(self, args, task_name="toy"):
        self.args, self.task_name = args, task_name


def _toy_task_dict(examples):
    return {"toy": {"test": [{"question": e.question.text, "answer": e.question.answer, "seed": e.scene.seed} for e in examples]}}


def _doc_to_visual(doc):
    from visor_hf.toy.data import make_scene, render

    return [render(make_scene(doc["seed"]))]


def test_loglikelihood_matches_the_toy_scoring(toy):
    """The plugin's loss of a one-word answer is the cross-entropy of that word at the answer position, computed by
    the toy's own input encoding (no processor, no chat template); `is_greedy` agrees with `generate`."""
    from visor_hf.toy.evaluation import evaluate_visor

    model, processor = toy
    examples = fresh_examples(3, 2)
    plugin = _plugin(visor_configuration="max")
    plugin.task_dict = _toy_task_dict(examples)
    wrong = {e.question.answer: next(w for w in ("yes", "no", "empty") if w != e.question.answer) for e in examples}
    requests = [_Request((e.question.text, e.question.answer, _doc_to_visual, i, "toy", "test")) for i, e in enumerate(examples)]
    requests += [
        _Request((e.question.text, wrong[e.question.answer], _doc_to_visual, i, "toy", "test")) for i, e in enumerate(examples)
    ]
    results = plugin.loglikelihood(requests)
    reference = evaluate_visor(model, examples, "max")
    direct = answer_examples(model, processor, examples, visor_configuration="max")
    for i, answer in enumerate(direct):
        loss, greedy = results[i].text
        assert loss == pytest.approx(reference["loss"][i], rel=1e-4, abs=1e-5)
        assert greedy == answer.correct
        assert results[i].token_counts.visor_configuration == list(model.config.self_attention_layers)
        wrong_loss, wrong_greedy = results[len(examples) + i].text
        if answer.correct:
            assert wrong_loss > loss and not wrong_greedy


def test_generate_until_batches_like_single_samples(toy):
    """A left-padded batch of 4 gives the answers and configurations of the same samples run alone, and `until`
    cuts the answer."""
    examples = fresh_examples(5, 1)
    plugin = _plugin(batch_size=4)
    plugin.task_dict = _toy_task_dict(examples)
    kwargs = {"max_new_tokens": 2, "temperature": 0, "until": ["\n"]}
    requests = [_Request((e.question.text, dict(kwargs), _doc_to_visual, i, "toy", "test")) for i, e in enumerate(examples)]
    batched = plugin.generate_until(requests)
    plugin.batch_size = 1
    alone = plugin.generate_until(requests)
    assert [r.text for r in batched] == [r.text for r in alone]
    assert [r.token_counts.visor_configuration for r in batched] == [r.token_counts.visor_configuration for r in alone]
    assert all("\n" not in r.text for r in batched)


def test_multi_image_sample(toy):
    """Two pictures in one sample: both go through the processor (two image-token blocks) and the prompt counts
    twice the visual tokens of one picture."""
    examples = fresh_examples(7, 1)
    plugin = _plugin()
    plugin.task_dict = _toy_task_dict(examples)

    def two_pictures(doc):
        return _doc_to_visual(doc) * 2

    one = plugin.generate_until([_Request((examples[0].question.text, {"max_new_tokens": 2}, _doc_to_visual, 0, "toy", "test"))])
    two = plugin.generate_until([_Request((examples[0].question.text, {"max_new_tokens": 2}, two_pictures, 0, "toy", "test"))])
    model = toy[0]
    config = model.config
    n_visual = 88  # one 128x128 toy picture
    assert two[0].token_counts.input_tokens == one[0].token_counts.input_tokens + n_visual
    from visor_hf.modeling.flops_visor import FlopsShape, prefill_flops

    shape = FlopsShape.from_config(config)
    n_text = one[0].token_counts.input_tokens - n_visual
    layers = two[0].token_counts.visor_configuration
    assert two[0].token_counts.visor_prefill_flops == prefill_flops(
        shape, n_text, 2 * n_visual, layers, config.cross_attention_layers
    )


@pytest.mark.parametrize(
    "model_args, message",
    [
        ({"visor_configration": "max"}, "unknown model_args key(s) for --model visor: visor_configration"),
        ({"visor_configuration": "most"}, "visor_configuration must be 'auto', 'max'"),
        ({"visor_configuration": 9}, "configuration index 9 is out of range"),
        ({"visor_configuration": "[2,6]"}, "layers [2] are not SA layers"),
        ({"visor_budget": "lots"}, "visor_budget must be a number"),
        ({"visor_budget": 0.5, "visor_configuration": "max"}, "either visor_configuration or visor_budget"),
        ({"visor_router_threshold": 1.5}, "visor_router_threshold must be a number in [0, 1]"),
        ({"pretrained": "/nonexistent/visor"}, "pretrained=/nonexistent/visor: cannot load a checkpoint config"),
    ],
)
def test_bad_model_args(model_args, message):
    with pytest.raises(ValueError) as error:
        _plugin(**model_args)
    assert message in str(error.value)


def test_router_threshold_needs_a_model_that_takes_it():
    import inspect

    from visor_hf.modeling import VisorForConditionalGeneration

    if "visor_router_threshold" in inspect.signature(VisorForConditionalGeneration.forward).parameters:
        plugin = _plugin(visor_router_threshold=0.5)
        assert plugin.options.generate_kwargs()["visor_router_threshold"] == 0.5
    else:
        with pytest.raises(ValueError, match="visor_router_threshold is not supported by the installed visor_hf model"):
            _plugin(visor_router_threshold=0.5)


@pytest.fixture(scope="module")
def llava_folder(tmp_path_factory):
    from transformers import LlavaOnevisionForConditionalGeneration

    from visor_hf.toy.model import save_llava_checkpoint, toy_llava_config

    path = tmp_path_factory.mktemp("llava")
    save_llava_checkpoint(LlavaOnevisionForConditionalGeneration(toy_llava_config(num_layers=2)), path)
    return path


def test_not_a_visor_checkpoint(llava_folder):
    with pytest.raises(ValueError, match="is not a VISOR checkpoint .model_type 'llava_onevision'.; convert it first"):
        _plugin(pretrained=str(llava_folder))


@pytest.mark.slow
def test_cli_error_is_one_line(llava_folder, tmp_path):
    """Through `python -m lmms_eval`, the error line names the problem."""
    from visor_hf.lmms import TASKS_DIR

    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmms_eval",
            "--model",
            "visor",
            "--model_args",
            f"pretrained={llava_folder}",
            "--tasks",
            "visor_toy",
            "--include_path",
            str(TASKS_DIR),
            "--limit",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    lines = [line for line in (run.stdout + run.stderr).splitlines() if "Error during evaluation" in line]
    assert len(lines) == 1 and "is not a VISOR checkpoint" in lines[0], run.stderr[-2000:]


def test_task_documents_are_the_toy_questions():
    import importlib.util

    from visor_hf.lmms import TASKS_DIR

    spec = importlib.util.spec_from_file_location("visor_toy_task_utils", TASKS_DIR / "visor_toy" / "utils.py")
    task_utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(task_utils)
    docs = task_utils.toy_documents(0, 10, "hard")
    examples = [e for e in fresh_examples(0, 10) if e.question.difficulty == "hard"]
    assert [(d["picture_seed"], d["question"], d["answer"]) for d in docs] == [
        (e.scene.seed, e.question.text, e.question.answer) for e in examples
    ]
    picture = task_utils.doc_to_visual(docs[0])[0]
    assert torch.equal(torch.tensor(list(picture.getdata())), torch.tensor(list(examples[0].image.getdata())))
    assert task_utils.process_results(docs[0], [docs[0]["answer"] + " extra"]) == {"exact_match": 1.0}
    assert task_utils.process_results(docs[0], [""]) == {"exact_match": 0.0}


def test_video_without_a_video_processor_is_refused(toy):
    """Where torchvision is absent the processor has no video processor: a video document gets a clear error."""
    plugin = _plugin()
    if getattr(plugin.processor, "video_processor", None) is not None:
        pytest.skip("this environment has a video processor (torchvision)")
    plugin.task_dict = {"toy": {"test": [{"video": "clip.mp4"}]}}
    request = _Request(("what is there ?", {"max_new_tokens": 2}, lambda doc: [doc["video"]], 0, "toy", "test"))
    with pytest.raises(ValueError, match="gives a video .clip.mp4., but the processor has no video processor"):
        plugin.generate_until([request])

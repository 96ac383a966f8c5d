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
        ({"visor_pakcing": 2}, "visor_router_threshold, visor_packing, dtype"),
        ({"visor_packing": 3}, "visor_packing must be a token packing factor (1, 2, 4; 1: no packing), got 3"),
        ({"visor_packing": 2.0}, "visor_packing must be a token packing factor (1, 2, 4; 1: no packing), got 2.0"),
        ({"visor_packing": "two"}, "visor_packing must be a token packing factor (1, 2, 4; 1: no packing), got 'two'"),
        ({"visor_packing": True}, "visor_packing must be a token packing factor (1, 2, 4; 1: no packing), got True"),
        # the shipped toy has no packing module
        (
            {"visor_packing": 4},
            "visor_packing=4: this checkpoint has no token packing module for it (config.packing_factors = [])",
        ),
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


# -- VISOR-TR token packing (`visor_packing`) -----------------------------------------------------------------------

PACKING_DOCS = [  # pictures of different sizes: different anyres grids, odd sides
    {"question": "what is the colour ?", "answer": "red", "size": (20, 40), "seed": 1},
    {"question": "how many circle are there ?", "answer": "two", "size": (30, 17), "seed": 2},
    {"question": "what is the shape ?", "answer": "square", "size": (16, 16), "seed": 3},
]


@pytest.fixture(scope="module")
def packing_folders(tmp_path_factory):
    """A tiny LLaVA-OV converted to VISOR with the packing module [2, 4] (`packed`: its merges and positions moved
    off their average / zero start, so packing is not plain pooling) and without it (`plain`, `--no-packing`)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from visor_hf.conversion import convert
    from visor_hf.testing import save_tiny_llava

    root = tmp_path_factory.mktemp("lmms_packing")
    save_tiny_llava(root / "src")
    convert(root / "src", root / "converted")
    convert(root / "src", root / "plain", packing=False)
    model = AutoModelForImageTextToText.from_pretrained(root / "converted")
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.model.token_packing.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(root / "packed")
    AutoProcessor.from_pretrained(root / "converted").save_pretrained(root / "packed")
    return root


def _picture(doc):
    from visor_hf.testing import random_image

    return [random_image(*doc["size"], seed=doc["seed"])]


def _packing_plugin(folder, packing, batch_size=1):
    plugin = _plugin(pretrained=str(folder), visor_packing=packing, batch_size=batch_size)
    plugin.task_dict = {"tiny": {"test": PACKING_DOCS}}
    return plugin


def _packing_requests(kind: str):
    if kind == "generate_until":
        return [_Request((d["question"], {"max_new_tokens": 4}, _picture, i, "tiny", "test")) for i, d in enumerate(PACKING_DOCS)]
    return [_Request((d["question"], " " + d["answer"], _picture, i, "tiny", "test")) for i, d in enumerate(PACKING_DOCS)]


def test_packing_answers_equal_direct_calls_at_that_packing(packing_folders):
    """`visor_packing=2`: every `generate_until` answer (a left-padded batch of 2) is that of `generate` on the
    sample alone, processed with `packing=2` and run with `visor_packing=2`; every loss is the cross-entropy of the
    continuation computed from a direct forward at packing 2; the logged compute counts the packed image tokens (the
    model's own report) against dense LLaVA-OV on every unpacked image token."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from visor_hf.modeling.flops_visor import FlopsShape, prefill_flops

    folder = packing_folders / "packed"
    plugin = _packing_plugin(folder, 2, batch_size=2)
    answers = plugin.generate_until(_packing_requests("generate_until"))
    losses = plugin.loglikelihood(_packing_requests("loglikelihood"))
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    config = model.config
    shape = FlopsShape.from_config(config)
    for doc, answer, loss in zip(PACKING_DOCS, answers, losses):
        content = [{"type": "image"}, {"type": "text", "text": doc["question"]}]
        prompt = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
        inputs = processor(images=_picture(doc), text=[prompt], packing=2, return_tensors="pt")
        unpacked = processor(images=_picture(doc), text=[prompt], packing=1, return_tensors="pt")["input_ids"][0]
        n_packed = int((inputs["input_ids"] == config.image_token_id).sum())
        n_unpacked = int((unpacked == config.image_token_id).sum())
        assert n_packed < n_unpacked
        with torch.no_grad():
            out = model.generate(
                **inputs,
                visor_packing=2,
                visor_configuration="auto",
                max_new_tokens=4,
                do_sample=False,
                pad_token_id=processor.tokenizer.pad_token_id,
            )
        report = model.last_visor_report
        assert answer.text == processor.tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
        usage = answer.token_counts
        assert usage.visor_packing == 2
        assert usage.input_tokens == inputs["input_ids"].shape[1]
        assert usage.visor_configuration == list(report.configurations[0])
        assert report.num_visual_tokens == [n_packed]
        assert usage.visor_prefill_flops == report.prefill_flops_alone[0]
        assert usage.visor_dense_prefill_flops == prefill_flops(shape, len(unpacked) - n_unpacked - 1, n_unpacked)

        full = processor(images=_picture(doc), text=[prompt + " " + doc["answer"]], packing=2, return_tensors="pt")
        n = inputs["input_ids"].shape[1]
        with torch.no_grad():
            forward = model(**full, visor_packing=2, visor_configuration="auto", use_cache=False)
        targets = full["input_ids"][0, n:]
        expected = torch.nn.functional.cross_entropy(forward.logits[0, n - 1 : -1], targets).item()
        assert loss.text[0] == pytest.approx(expected, rel=1e-5, abs=1e-6)
        assert loss.token_counts.visor_configuration == list(forward.visor_configurations[0])
        assert loss.token_counts.visor_dense_prefill_flops == usage.visor_dense_prefill_flops


def test_packing_changes_what_the_model_reads(packing_folders):
    """The same requests at packing 1 and 2: fewer image tokens reach the model and every loss changes; the dense
    LLaVA-OV reference (every unpacked token) stays, so the FLOPs ratio falls."""
    requests = _packing_requests("loglikelihood")
    one, two = (_packing_plugin(packing_folders / "packed", k).loglikelihood(requests) for k in (1, 2))
    for a, b in zip(one, two):
        assert b.token_counts.input_tokens < a.token_counts.input_tokens
        assert b.text[0] != a.text[0]
        assert b.token_counts.visor_dense_prefill_flops == a.token_counts.visor_dense_prefill_flops
        if b.token_counts.visor_configuration == a.token_counts.visor_configuration:
            assert b.token_counts.flops_ratio < a.token_counts.flops_ratio


def test_packing_needs_the_checkpoint_module(packing_folders):
    with pytest.raises(ValueError) as error:
        _packing_plugin(packing_folders / "plain", 2)
    message = str(error.value)
    assert "visor_packing=2: this checkpoint has no token packing module" in message
    assert "config.packing_factors = []" in message
    assert _packing_plugin(packing_folders / "plain", 1).options.generate_kwargs().get("visor_packing") is None


def test_packing_needs_the_whole_patch_grid(packing_folders, tmp_path):
    import json
    import shutil

    folder = shutil.copytree(packing_folders / "packed", tmp_path / "default_strategy")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, vision_feature_select_strategy="default")))
    with pytest.raises(ValueError, match="visor_packing=4 needs the whole patch grid .vision_feature_select_strategy='full'."):
        _packing_plugin(folder, 4)


def test_videos_are_not_packed(packing_folders):
    """What the plugin documents for a task with videos at `visor_packing` != 1: the model packs the images only; a
    video runs unpacked (bit-identical to packing 1) and is counted unpacked in both FLOPs."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from visor_hf.modeling.flops_visor import prefill_flops
    from visor_hf.testing import VIDEO_ID, word_ids

    folder = packing_folders / "packed"
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    torch.manual_seed(0)
    frames = torch.rand(1, 2, 3, 16, 16)
    with torch.no_grad():
        n_video = model.model.get_video_features(frames, return_dict=True).pooler_output.flatten(0, 1).shape[0]
    ids = torch.tensor([[*word_ids("user"), *[VIDEO_ID] * n_video, *word_ids("describe this ?")]])
    video = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values_videos": frames}
    with torch.no_grad():
        assert torch.equal(model(**video, visor_packing=2).logits, model(**video).logits)

    # an image and a video in one prompt: the image's tokens packed, the video's as they are
    processor = AutoProcessor.from_pretrained(folder)
    text, picture = ["user <image> what is this ?"], _picture(PACKING_DOCS[0])
    image = processor(images=picture, text=text, packing=2, return_tensors="pt")
    unpacked = processor(images=picture, text=text, packing=1, return_tensors="pt")["input_ids"]
    ids = torch.cat([image["input_ids"], torch.full((1, n_video), VIDEO_ID)], dim=1)
    mixed = dict(image, input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=frames)
    with torch.no_grad():
        model.generate(**mixed, visor_packing=2, max_new_tokens=1, do_sample=False)
    report = model.last_visor_report
    n_image = int((image["input_ids"] == model.config.image_token_id).sum())
    assert report.num_visual_tokens == [n_image + n_video]

    # the plugin's accounting of that prompt: VISOR as the model's report, dense on the unpacked image and the video
    plugin = _packing_plugin(folder, 2)
    n_unpacked = int((unpacked == model.config.image_token_id).sum())
    usage = plugin._usage(report.configurations[0], ids[0], None, unpacked_images=n_unpacked)
    assert usage.visor_prefill_flops == report.prefill_flops_alone[0]
    n_routing = int((ids == model.config.routing_token_id).sum())
    assert n_routing == 1
    n_text = ids.shape[1] - n_image - n_video - n_routing  # dense LLaVA-OV has no routing token
    assert usage.visor_dense_prefill_flops == prefill_flops(plugin._shape, n_text, n_unpacked + n_video)

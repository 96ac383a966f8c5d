"""End-to-end training pipeline on a tiny converted LLaVA-OV and a synthetic dataset (CPU, offline):
convert -> stage 1 -> stage 2 (LoRA and full) -> search -> universal -> label -> router -> evaluate, each through the
`visor-hf` command line, plus stage-1 freezing, gradient accumulation and resumption of the universal schedule."""

from __future__ import annotations

import json

import pytest
import torch

from training_helpers import run_script, weights
from visor_hf.cli import main
from visor_hf.conversion import convert
from visor_hf.testing import save_tiny_llava
from visor_hf.training import UniversalConfigurationSampler, make_synthetic_dataset, train_stage

COMMON = ["--use-cpu", "--per-device-train-batch-size", "4", "--learning-rate", "1e-3", "--logging-steps", "1", "--report-to", "none"]


def changed(before: dict, after: dict) -> set[str]:
    assert set(before) == set(after)
    return {k for k in before if not torch.equal(before[k], after[k])}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    save_tiny_llava(root / "llava")
    convert(root / "llava", root / "visor")  # CA 0, 3; SA 2, 4; configurations [], [2], [2, 4]; router layer 1
    make_synthetic_dataset(root / "data", num_samples=12, seed=0)
    make_synthetic_dataset(root / "eval", num_samples=8, seed=1)
    return root


@pytest.fixture(scope="module")
def stage1(workdir):
    out = workdir / "stage1"
    assert main(["train", "--stage", "1", "--model", str(workdir / "visor"), "--data", str(workdir / "data/data.jsonl"),
                 "--output-dir", str(out), "--max-steps", "3", *COMMON]) == 0
    return out


def test_stage1_changes_only_the_new_modules(workdir, stage1):
    before, after = weights(workdir / "visor"), weights(stage1)
    diff = changed(before, after)
    assert diff, "stage 1 did not train anything"
    assert all(k.startswith("model.cross_attention_blocks.") for k in diff), sorted(diff)
    # every tensor of every CA block trained (norms, conv position embedding, projections); all others are bit-identical
    assert diff == {k for k in before if k.startswith("model.cross_attention_blocks.")}
    assert {k.split(".")[2] for k in diff} == {"0", "3"}
    assert (stage1 / "visor_training.json").is_file() and (stage1 / "modeling_visor.py").is_file()
    assert not list(stage1.glob("*.bin")) and not list(stage1.glob("*.pt"))  # the final folder holds no pickle
    assert (stage1 / "processor_config.json").is_file() or (stage1 / "preprocessor_config.json").is_file()


def test_stage2_full_freezes_the_vision_tower_and_router(workdir, stage1):
    out = workdir / "stage2_full"
    assert main(["train", "--stage", "2", "--model", str(stage1), "--data", str(workdir / "data/data.jsonl"),
                 "--output-dir", str(out), "--max-steps", "2", *COMMON]) == 0
    diff = changed(weights(stage1), weights(out))
    assert any(k.startswith("model.language_model.layers.") for k in diff)
    assert any(k.startswith("model.cross_attention_blocks.") for k in diff)
    assert not any(k.startswith(("model.vision_tower.", "model.router.")) for k in diff)


def test_pipeline_end_to_end(workdir, stage1, capsys):
    data = str(workdir / "data/data.jsonl")
    eval_data = str(workdir / "eval/data.jsonl")

    # stage 2 with LoRA: the merged model and the adapter
    stage2 = workdir / "stage2"
    assert main(["train", "--stage", "2", "--model", str(stage1), "--data", data, "--output-dir", str(stage2),
                 "--max-steps", "2", "--lora", "--lora-r", "4", "--lora-alpha", "8", *COMMON]) == 0
    assert (stage2 / "adapter" / "adapter_config.json").is_file()
    adapter = json.loads((stage2 / "adapter" / "adapter_config.json").read_text())
    assert "router" in adapter["modules_to_save"]
    diff = changed(weights(stage1), weights(stage2))
    assert diff and not any("vision_tower" in k for k in diff)
    # adapters on the LLM attention/MLP and on the CA blocks' projections, merged; norms, router, embeddings untouched
    assert {k.rsplit(".", 2)[-2] for k in diff} <= {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert any(k.startswith("model.language_model.layers.") and ".mlp." in k for k in diff)
    assert any(k.startswith("model.cross_attention_blocks.") for k in diff)
    assert not any("lora" in k for k in weights(stage2))  # merged
    assert not list(stage2.glob("*.bin")) and not list((stage2 / "adapter").glob("*.bin"))

    # search: exhaustive over the switchable layers (2 and 4), every candidate viable with threshold 1; the pooled rule
    # writes every viable one (the default per-group rule would thin them to the cheapest and the maximal)
    searched = workdir / "search"
    assert main(["search", "--model", str(stage2), "--data", eval_data, "--output-dir", str(searched), "--threshold", "1.0",
                 "--rule", "pooled"]) == 0
    results = [json.loads(line) for line in (searched / "search_results.jsonl").read_text().splitlines()]
    assert sorted(r["layers"] for r in results) == [[], [2], [2, 4], [4]]
    for r in results:
        assert {"accuracy", "loss", "average_flops", "flops_ratio_to_max", "viable"} <= set(r)
    flops = {tuple(r["layers"]): r["average_flops"] for r in results}
    assert flops[()] < flops[(2,)] == flops[(4,)] < flops[(2, 4)]
    config = json.loads((searched / "config.json").read_text())
    assert config["configurations"] == [[], [2], [4], [2, 4]]
    assert weights(searched)["model.router.fc2.weight"].shape[0] == 4

    # universal fine-tuning with gradient accumulation: one configuration per optimisation step
    universal = workdir / "universal"
    trainer = train_stage(searched, data, universal, "universal", seed=3, training_args={
        "max_steps": 4, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "learning_rate": 1e-3,
        "use_cpu": True, "report_to": "none", "save_strategy": "no", "logging_steps": 1,
    })
    sampler = UniversalConfigurationSampler(4, seed=3)
    steps = {}
    for step, configuration in trainer.configuration_trace:
        steps.setdefault(step, set()).add(configuration)
    assert sorted(steps) == [0, 1, 2, 3]
    assert all(len(v) == 1 for v in steps.values())  # every micro-batch of a step: the same configuration
    assert [steps[k].pop() for k in range(4)] == sampler.sequence(0, 4)
    assert sorted(sampler.sequence(0, 4)) == [0, 1, 2, 3]  # the first cycle covers every viable configuration
    log = [json.loads(line) for line in (universal / "universal_configurations.jsonl").read_text().splitlines()]
    assert [e["configuration"] for e in log] == sampler.sequence(0, 4)
    assert changed(weights(searched), weights(universal))

    # pseudo-labels: a table of every configuration on every sample, one label per sample
    labelled = workdir / "labels"
    assert main(["label", "--model", str(universal), "--data", data, "--output-dir", str(labelled), "--limit", "8"]) == 0
    table = [json.loads(line) for line in (labelled / "pseudo_label_table.jsonl").read_text().splitlines()]
    assert len(table) == 8 * 4 and {"index", "configuration", "correct", "loss", "flops"} <= set(table[0])
    labels = [json.loads(line) for line in (labelled / "pseudo_labels.jsonl").read_text().splitlines()]
    assert [entry["index"] for entry in labels] == list(range(8))
    # the labels follow the rule on the written table: per sample, among the configurations keeping >= 99 % of the
    # maximal one's accuracy, the cheapest (FLOPs, then fewer layers, then lower loss)
    for entry in labels:
        rows = [r for r in table if r["index"] == entry["index"]]
        top = max(rows, key=lambda r: r["num_layers"])
        keeping = [r for r in rows if float(r["correct"]) >= 0.99 * float(top["correct"])]
        assert entry["label"] == min(keeping, key=lambda r: (r["flops"], r["num_layers"], r["loss"]))["configuration"]
        assert entry["layers"] == config["configurations"][entry["label"]]
        # the calibrated router's targets: does each configuration keep the maximal one's accuracy on the sample?
        assert entry["targets"] == [float(float(r["correct"]) >= 0.99 * float(top["correct"])) for r in sorted(rows, key=lambda r: r["configuration"])]
    assert json.loads((labelled / "pseudo_label_summary.json").read_text())["samples"] == 8

    # router training: only the router changes; the report compares with always-max
    routed = workdir / "router"
    assert main(["train-router", "--model", str(universal), "--data", data, "--labels", str(labelled),
                 "--output-dir", str(routed), "--max-steps", "3", *COMMON]) == 0
    diff = changed(weights(universal), weights(routed))
    assert diff and all(k.startswith("model.router.") for k in diff)
    report = json.loads((routed / "router_report.json").read_text())
    assert 0.0 <= report["router_accuracy"] <= 1.0
    assert report["average_flops_router"] <= report["average_flops_max"]
    assert report["router_type"] == "argmax"

    # the calibrated router: binary cross-entropy on the targets, type and threshold written into the config
    calibrated = workdir / "router_calibrated"
    assert main(["train-router", "--model", str(universal), "--data", data, "--labels", str(labelled), "--output-dir",
                 str(calibrated), "--max-steps", "3", "--router-type", "calibrated", "--router-threshold", "0.8", *COMMON]) == 0
    assert changed(weights(universal), weights(calibrated)) and all(k.startswith("model.router.") for k in changed(weights(universal), weights(calibrated)))
    saved = json.loads((calibrated / "config.json").read_text())
    assert saved["router_type"] == "calibrated" and saved["router_threshold"] == 0.8
    assert 0.0 <= json.loads((calibrated / "router_report.json").read_text())["routed_configuration_keeps"] <= 1.0
    # its curve: every configuration as a point and the router at each threshold (0: the cheapest, 1: the maximal)
    assert main(["evaluate", "--model", str(calibrated), "--data", eval_data, "--curve", "--thresholds", "0,0.5,1",
                 "--output-dir", str(workdir / "curve")]) == 0
    curve = json.loads((workdir / "curve" / "curve.json").read_text())
    points = {p["name"]: p for p in curve["points"]}
    assert set(points) == {"fixed []", "fixed [2]", "fixed [4]", "fixed [2, 4]", "router t=0", "router t=0.5", "router t=1"}
    assert points["router t=0"]["configuration_histogram"] == {"[]": 8} and points["router t=1"]["configuration_histogram"] == {"[2, 4]": 8}
    assert points["router t=1"]["accuracy"] == points["fixed [2, 4]"]["accuracy"]
    assert curve["lookup_agreement"] == 1.0 and (workdir / "curve" / "curve.png").is_file()
    for bad in ("1.5", "-0.1"):  # refused in one line, as the CLI reports bad input
        capsys.readouterr()
        assert main(["evaluate", "--model", str(calibrated), "--data", eval_data, "--router-threshold", bad]) == 2
        assert "visor-hf evaluate: error: visor_router_threshold must be in [0, 1]" in capsys.readouterr().err

    # evaluation with the router and with a fixed configuration
    for configuration, name in (("auto", "eval_router"), ("max", "eval_max"), ("0", "eval_ca_only")):
        assert main(["evaluate", "--model", str(routed), "--data", eval_data, "--configuration", configuration,
                     "--output-dir", str(workdir / name)]) == 0
    router_summary = json.loads((workdir / "eval_router/summary.json").read_text())
    max_summary = json.loads((workdir / "eval_max/summary.json").read_text())
    ca_only = json.loads((workdir / "eval_ca_only/summary.json").read_text())
    assert sum(router_summary["configuration_histogram"].values()) == 8
    assert max_summary["configuration_histogram"] == {"[2, 4]": 8}
    assert ca_only["configuration_histogram"] == {"[]": 8}
    assert ca_only["average_flops"] < max_summary["average_flops"] == max_summary["average_flops_max"]
    assert len((workdir / "eval_router/per_sample.jsonl").read_text().splitlines()) == 8


def test_resume_continues_the_configuration_sequence(workdir, stage1):
    data = str(workdir / "data/data.jsonl")
    searched = workdir / "search_resume"
    assert main(["search", "--model", str(stage1), "--data", data, "--output-dir", str(searched), "--threshold", "1.0", "--limit", "4",
                 "--rule", "pooled"]) == 0  # every subset written: the schedule cycles over 4 configurations
    straight, resumed = workdir / "universal_straight", workdir / "universal_resumed"
    args = ["train", "--stage", "universal", "--model", str(searched), "--data", data, "--seed", "5", "--max-steps", "6",
            "--save-steps", "3", *COMMON]
    assert main([*args, "--output-dir", str(straight)]) == 0
    assert (straight / "checkpoint-3").is_dir()
    assert main([*args, "--output-dir", str(resumed), "--resume-from-checkpoint", str(straight / "checkpoint-3")]) == 0

    def schedule(folder):
        return [(e["step"], e["configuration"]) for e in map(json.loads, (folder / "universal_configurations.jsonl").read_text().splitlines())]

    full = schedule(straight)
    assert [s for s, _ in full] == list(range(6))
    assert schedule(resumed) == full[3:]  # the resumed run picks up at step 3 with the same configurations
    assert full == [(k, UniversalConfigurationSampler(4, seed=5)(k)) for k in range(6)]
    # and ends with the same weights as the run that was not interrupted
    a, b = weights(straight), weights(resumed)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6)
    # resumed in the interrupted run's own folder (which logged steps 3-5 after checkpoint-3): each step logged once
    assert main([*args, "--output-dir", str(straight), "--resume-from-checkpoint", str(straight / "checkpoint-3")]) == 0
    assert schedule(straight) == full


DDP_SCRIPT = """
import json, os, sys, torch
torch.set_num_threads(1)
from visor_hf.training import train_stage
model, data, out = sys.argv[1:4]
trainer = train_stage(model, data, out, "universal", seed=2, training_args=dict(
    max_steps=4, per_device_train_batch_size=2, gradient_accumulation_steps=2, use_cpu=True, save_strategy="no",
    report_to="none", disable_tqdm=True, ddp_backend="gloo"))
with open(os.path.join(out, "trace_rank%s.json" % os.environ.get("RANK", "0")), "w") as f:
    json.dump({"world_size": trainer.args.world_size, "trace": trainer.configuration_trace}, f)
"""


@pytest.mark.slow
def test_universal_on_two_ddp_processes_draws_the_same_configurations(workdir, stage1, tmp_path):
    """Two real processes (torchrun, gloo on the CPU): same configuration at every step on both ranks, no hang."""
    searched = workdir / "search_ddp"
    assert main(["search", "--model", str(stage1), "--data", str(workdir / "eval/data.jsonl"), "--output-dir", str(searched),
                 "--threshold", "1.0", "--limit", "2", "--rule", "pooled"]) == 0
    out = tmp_path / "ddp"
    run_script(DDP_SCRIPT, tmp_path, searched, workdir / "data/data.jsonl", out, processes=2)
    traces = [json.loads((out / f"trace_rank{r}.json").read_text()) for r in range(2)]
    assert [t["world_size"] for t in traces] == [2, 2]
    assert traces[0]["trace"] == traces[1]["trace"]
    assert {s for s, _ in traces[0]["trace"]} == {0, 1, 2, 3}
    sampler = UniversalConfigurationSampler(4, seed=2)
    assert all(c == sampler(s) for s, c in traces[0]["trace"])


def test_scores_match_the_models_own_loss_and_argmax(workdir):
    """Per-sample loss / exact match of `score_dataset` (logits only at answer positions) against a full forward."""
    from visor_hf.training import VisorDataCollator, load_model, load_processor, load_records, score_dataset
    from visor_hf.training.data import model_inputs

    model = load_model(workdir / "visor").eval()
    collator = VisorDataCollator(load_processor(workdir / "visor"))
    dataset = load_records(workdir / "data/data.jsonl", limit=6)
    for configuration in ("max", [], 1):
        results = score_dataset(model, dataset, collator, configuration, batch_size=3, progress=False)
        assert [r["index"] for r in results] == list(range(6))
        for result in results:
            batch = collator([dataset[result["index"]]])
            with torch.no_grad():
                out = model(**model_inputs(batch), visor_configuration=configuration)
            assert result["loss"] == pytest.approx(out.loss.item(), rel=1e-4)
            labels = batch["labels"][0, 1:]
            predicted = out.logits[0, :-1].argmax(-1)
            answer = labels != -100
            assert result["correct"] == bool((predicted[answer] == labels[answer]).all())
            assert result["answer_tokens"] == int(answer.sum())
            assert result["flops"] <= result["flops_max"] <= result["flops_dense"] or result["n_visual"] == 0


@pytest.mark.slow
def test_a_model_that_learns_gives_consistent_search_labels_and_router_reports(workdir, tmp_path):
    """Stage 2 long enough for the tiny model to answer about half of the synthetic questions, then search, labels
    and router on real (non-zero) accuracies."""
    from visor_hf.training import (
        VisorDataCollator,
        evaluate,
        load_model,
        load_processor,
        load_records,
        pseudo_label,
        score_dataset,
        search,
        train_router,
    )
    from visor_hf.training.data import model_inputs

    data = make_synthetic_dataset(tmp_path / "data", num_samples=32, seed=4)
    trained = tmp_path / "trained"
    train_stage(workdir / "visor", data, trained, "2", training_args={
        "max_steps": 60, "per_device_train_batch_size": 8, "learning_rate": 3e-3, "warmup_steps": 5, "use_cpu": True,
        "report_to": "none", "save_strategy": "no", "disable_tqdm": True,
    })
    summary = evaluate(trained, data, visor_configuration="max")
    assert summary["accuracy"] > 0.25

    # exact match from the answer-only logits agrees with a full forward, on correct and wrong samples alike
    model = load_model(trained).eval()
    collator = VisorDataCollator(load_processor(trained))
    dataset = load_records(data)
    results = score_dataset(model, dataset, collator, "max", batch_size=8, progress=False)
    assert {r["correct"] for r in results} == {True, False}
    for result in results[:12]:
        batch = collator([dataset[result["index"]]])
        with torch.no_grad():
            out = model(**model_inputs(batch), visor_configuration="max")
        labels, predicted = batch["labels"][0, 1:], out.logits[0, :-1].argmax(-1)
        assert result["correct"] == bool((predicted[labels != -100] == labels[labels != -100]).all())

    result = search(trained, data, tmp_path / "searched", threshold=0.2)
    reference = result["reference"]["accuracy"]
    for candidate in result["candidates"]:
        assert candidate["viable"] == (candidate["accuracy"] >= 0.8 * reference - 1e-12 or candidate["layers"] == [2, 4])
    assert [2, 4] in result["written"]

    if len(result["written"]) > 1:
        report = pseudo_label(tmp_path / "searched", data, tmp_path / "labels")
        assert report["label_accuracy"] >= 0.99 * report["max_accuracy"] - 1e-12
        assert report["average_flops_labels"] <= report["average_flops_max"]
        router = train_router(tmp_path / "searched", data, tmp_path / "labels", tmp_path / "router", training_args={
            "max_steps": 20, "per_device_train_batch_size": 8, "learning_rate": 1e-2, "use_cpu": True, "report_to": "none",
            "save_strategy": "no", "disable_tqdm": True,
        })
        assert 0 <= router["router_accuracy"] <= 1
        assert router["average_flops_router"] <= router["average_flops_max"]


def test_cached_router_inputs_are_what_the_router_reads_in_a_forward(workdir):
    """`train_router` trains on router inputs computed once: they equal the hidden states the router reads in the
    model's own forward (router outputs compared with `router_logits`, sample by sample), and training on them
    changes the router only."""
    from visor_hf.training import VisorDataCollator, load_model, load_processor, load_records, train_router
    from visor_hf.training.data import model_inputs
    from visor_hf.training.router import routing_features

    model = load_model(workdir / "visor").eval()
    collator = VisorDataCollator(load_processor(workdir / "visor"))
    records = load_records(workdir / "data/data.jsonl")
    features, samples = routing_features(model, records, collator, batch_size=5)
    assert sorted(set(samples.tolist())) == list(range(12))  # every sample, one row per routing token (question)
    for index in (0, 7, 11):
        with torch.no_grad():
            out = model(**model_inputs(collator([records[index]]), keep_labels=False), visor_configuration="max",
                        output_router_logits=True)
            mine = model.model.router(features[samples == index])
        torch.testing.assert_close(mine, out.router_logits, rtol=1e-5, atol=1e-5)
    labels = workdir / "labels_cached"
    labels.mkdir()
    (labels / "pseudo_labels.jsonl").write_text("".join(json.dumps({"index": i, "label": i % 3, "targets": [1.0, float(i % 2), 1.0]}) + "\n"
                                                        for i in range(12)))
    for router_type in ("argmax", "calibrated"):
        out_dir = workdir / f"router_cached_{router_type}"
        train_router(workdir / "visor", workdir / "data/data.jsonl", labels, out_dir, router_type=router_type, training_args={
            "max_steps": 30, "per_device_train_batch_size": 4, "learning_rate": 1e-2, "use_cpu": True, "report_to": "none",
            "save_strategy": "no", "disable_tqdm": True})
        diff = changed(weights(workdir / "visor"), weights(out_dir))
        assert diff and all(k.startswith("model.router.") for k in diff)
        assert json.loads((out_dir / "config.json").read_text())["router_type"] == router_type

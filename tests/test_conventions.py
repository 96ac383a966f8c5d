"""What a Hugging Face user expects around the model: one-line errors, `--version`, help on every option, logging
through transformers' verbosity, the data loader's sources (Hub ids, streaming), the collator at top level, the LoRA
preset on the model, `stop_strings` with the shipped tokenizer, `py.typed`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import pytest
import torch
from transformers.utils import logging as hf_logging

import visor_hf
from visor_hf.cli import build_parser
from visor_hf.cli import main as cli_main
from visor_hf.toy.inference import DEFAULT_CHECKPOINT
from visor_hf.training import IGNORE_INDEX, load_records, make_synthetic_dataset


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["--version"])
    assert exit_info.value.code == 0
    import transformers

    assert capsys.readouterr().out.strip() == f"visor-hf {visor_hf.__version__} (transformers {transformers.__version__})"


def test_every_option_has_help():
    missing = []

    def walk(parser, where):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, f"{where} {name}")
            elif not action.help:
                missing.append(f"{where} {action.option_strings or action.dest}")

    walk(build_parser(), "visor-hf")
    assert missing == []


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--stage", "1", "--model", "MISSING", "--data", "DATA", "--output-dir", "OUT"],
        ["evaluate", "--model", "MISSING", "--data", "DATA"],
        ["search", "--model", "MISSING", "--data", "DATA", "--output-dir", "OUT"],
        ["label", "--model", "MISSING", "--data", "DATA", "--output-dir", "OUT"],
        ["train-router", "--model", "MISSING", "--data", "DATA", "--labels", "DATA", "--output-dir", "OUT"],
    ],
    ids=lambda argv: argv[0],
)
@pytest.mark.parametrize("bad", ["model", "data"])
def test_bad_path_is_one_line(argv, bad, tmp_path, capsys):
    data = make_synthetic_dataset(tmp_path / "data", num_samples=2)
    values = {"MISSING": str(tmp_path / "no-such-model") if bad == "model" else str(DEFAULT_CHECKPOINT),
              "DATA": str(data) if bad == "model" else str(tmp_path / "no-such-data.jsonl"), "OUT": str(tmp_path / "out")}
    assert cli_main([values.get(a, a) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"visor-hf {argv[0]}: error: ") and "no such" in err, err


def test_bad_jsonl_line_is_reported_at_its_line(tmp_path, capsys):
    path = make_synthetic_dataset(tmp_path, num_samples=3)
    lines = path.read_text().splitlines()
    lines.insert(1, "")  # a blank line still counts
    lines[3] = lines[3][:-5]  # line 4 of the file is cut
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=rf"{path.name}, line 4, column \d+: not valid JSON"):
        load_records(path)
    assert cli_main(["evaluate", "--model", str(DEFAULT_CHECKPOINT), "--data", str(path)]) == 2
    assert "line 4, column" in capsys.readouterr().err


def test_logging_follows_transformers_verbosity(tmp_path, caplog):
    from visor_hf.conversion.publish import clean_leftovers

    caplog.set_level(logging.DEBUG)
    try:
        for verbosity, expected in ((hf_logging.WARNING, 1), (hf_logging.ERROR, 0)):
            hf_logging.set_verbosity(verbosity)
            caplog.clear()
            (tmp_path / ".dst.tmp-0000").mkdir()
            clean_leftovers(tmp_path / "dst")
            assert len([r for r in caplog.records if "left by a killed conversion" in r.getMessage()]) == expected
    finally:
        hf_logging.set_verbosity(hf_logging.WARNING)


@pytest.fixture(scope="module")
def toy():
    from visor_hf.toy.inference import load_toy

    return load_toy(attn_implementation="eager")


def test_collator_at_top_level_and_remove_unused_columns_hint(toy, tmp_path):
    from transformers import Trainer, TrainingArguments

    model, processor = toy
    collator = visor_hf.VisorDataCollator(processor)
    dataset = load_records(make_synthetic_dataset(tmp_path, num_samples=2))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True, per_device_train_batch_size=2)
    assert args.remove_unused_columns  # transformers' default
    loader = Trainer(model=model, args=args, data_collator=collator, train_dataset=dataset).get_train_dataloader()
    with pytest.raises(ValueError, match="remove_unused_columns=False"):
        next(iter(loader))
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True, per_device_train_batch_size=2,
                             remove_unused_columns=False)
    batch = next(iter(Trainer(model=model, args=args, data_collator=collator, train_dataset=dataset).get_train_dataloader()))
    assert (batch["labels"] != IGNORE_INDEX).any()


def test_streaming_and_hub_dataset_sources(toy, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    _, processor = toy
    collator = visor_hf.VisorDataCollator(processor)
    path = make_synthetic_dataset(tmp_path, num_samples=4)
    eager = load_records(path)
    # a local JSONL read through `datasets.load_dataset(..., streaming=True)`, by path or as the stream itself
    for source in (path, datasets.load_dataset("json", data_files=str(path), split="train", streaming=True)):
        streamed = load_records(source, streaming=True, image_root=path.parent)
        assert isinstance(streamed, torch.utils.data.IterableDataset)
        records = list(streamed)
        assert len(records) == 4 and [r["__index__"] for r in records] == [0, 1, 2, 3]
        expected, got = collator([eager[0], eager[1]]), collator(records[:2])
        for key in ("input_ids", "labels", "pixel_values"):
            torch.testing.assert_close(got[key], expected[key])
    assert len(list(load_records(path, streaming=True, limit=3))) == 3

    # a Hub dataset id goes to `datasets.load_dataset` (here answered from the local file: no network)
    calls, local = [], datasets.DatasetDict({"train": datasets.load_dataset("json", data_files=str(path), split="train")})

    def load_dataset(name, **kwargs):
        calls.append((name, kwargs))
        return local

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    hub = load_records("someone/visor-data", image_root=path.parent)
    assert calls == [("someone/visor-data", {"streaming": False})] and len(hub) == 4
    assert hub[1]["conversations"] == eager[1]["conversations"]
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_records(tmp_path / "missing.jsonl")


def test_lora_preset_on_the_model_and_router_warning(visor, caplog):
    from peft import LoraConfig, get_peft_model

    from visor_hf.training import LORA_TARGET_MODULES

    caplog.set_level(logging.WARNING)
    preset = visor.visor_lora_targets()
    assert preset == {"target_modules": LORA_TARGET_MODULES, "modules_to_save": ["router"]}
    assert any("router gets no gradient from the language-modelling loss" in r.getMessage() for r in caplog.records)
    wrapped = get_peft_model(visor.__class__(visor.config), LoraConfig(r=2, **preset))
    adapted = {name.rsplit(".lora_A", 1)[0] for name, _ in wrapped.named_parameters() if ".lora_A" in name}
    assert any("language_model.layers.0.self_attn.q_proj" in n for n in adapted)
    assert any("cross_attention_blocks" in n and "cross_attn.q_proj" in n for n in adapted)
    assert not any("vision_tower" in n for n in adapted)
    with_vision = visor.visor_lora_targets(include_vision_tower=True)["target_modules"]
    assert with_vision.startswith(LORA_TARGET_MODULES) and "vision_tower" in with_vision


def test_stop_strings_with_the_shipped_tokenizer(toy):
    from visor_hf.toy.data import make_scene, render, sample_questions
    from visor_hf.toy.inference import prompt

    model, processor = toy
    scene = make_scene(1)
    question = sample_questions(scene)[0]
    inputs = processor(images=[render(scene)], text=prompt(processor, question.text), return_tensors="pt")
    start = inputs["input_ids"].shape[1]
    with torch.no_grad():
        free = model.generate(**inputs, max_new_tokens=4, do_sample=False)[0, start:].tolist()
        answer = processor.tokenizer.decode(free[:1])
        stopped = model.generate(**inputs, max_new_tokens=4, do_sample=False, stop_strings=[answer], tokenizer=processor.tokenizer)
    assert len(free) >= 2 and stopped[0, start:].tolist() == free[:1]  # stops right after the stop string


def test_py_typed_ships():
    package = Path(visor_hf.__file__).parent
    assert (package / "py.typed").is_file()
    setup = (package.parent.parent / "setup.cfg").read_text()
    assert "py.typed" in setup

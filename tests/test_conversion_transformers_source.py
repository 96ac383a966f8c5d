"""Conversion of a LLaVA-OV checkpoint saved by transformers itself, the way a user has it: a config like
transformers' own LLaVA-OV tests use, `save_pretrained` of the model alone (no tokenizer, no processor), tied or
untied embeddings, sharded safetensors with an index, float32 or bfloat16 weights."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

import visor_hf  # noqa: F401  (registers the Auto classes)
from visor_hf.cli import main as cli_main
from visor_hf.conversion import ConversionError, convert
from visor_hf.conversion.convert import default_image_processor
from visor_hf.modeling import VisorForConditionalGeneration
from visor_hf.testing import random_image

VOCAB_SIZE = 99
IMAGE_TOKEN, VIDEO_TOKEN, PAD = 1, 2, 0


def transformers_test_config(tie: bool) -> LlavaOnevisionConfig:
    """The shape of transformers' `LlavaOnevisionVisionText2TextModelTester` config (vocab 99, no spare row; a
    SigLIP tower with 8-px tiles on a 16-px anyres grid), with LLaVA-OV's `"full"` feature selection."""
    return LlavaOnevisionConfig(
        text_config={
            "model_type": "qwen2", "vocab_size": VOCAB_SIZE, "hidden_size": 32, "intermediate_size": 37,
            "num_hidden_layers": 6, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 580,
            "tie_word_embeddings": tie, "pad_token_id": PAD,
        },
        vision_config={
            "model_type": "siglip_vision_model", "image_size": 8, "patch_size": 4, "hidden_size": 32,
            "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
        },
        image_token_index=IMAGE_TOKEN,
        video_token_index=VIDEO_TOKEN,
        image_grid_pinpoints=[[16, 16], [16, 8], [8, 16]],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        tie_word_embeddings=tie,
    )


def save_source(path: Path, tie: bool, dtype: torch.dtype = torch.float32) -> LlavaOnevisionForConditionalGeneration:
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(transformers_test_config(tie)).to(dtype).eval()
    model.save_pretrained(path, max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").is_file() and not (path / "tokenizer_config.json").exists()
    return model


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


def source_tensors(llava) -> dict[str, torch.Tensor]:
    """The source's tensors under transformers' current names (its files use llava-hf's legacy names); a tied LM
    head is the embedding matrix and is not written."""
    tied = llava.get_output_embeddings().weight.data_ptr() == llava.get_input_embeddings().weight.data_ptr()
    return {k: v for k, v in llava.state_dict().items() if not (tied and k == "lm_head.weight")}


def hand_batch(model, config: dict) -> dict:
    """Two left-padded samples, each with one anyres image, ids built by hand (the source has no tokenizer)."""
    image_processor = default_image_processor(config)
    pixels = image_processor([random_image(8, 16, seed=0), random_image(16, 16, seed=1)], return_tensors="pt")
    with torch.no_grad():
        features = model.model.get_image_features(pixels["pixel_values"], pixels["image_sizes"], return_dict=True)
    counts = [f.shape[0] for f in features.pooler_output]
    rows = [[5, 6, 7] + [IMAGE_TOKEN] * counts[0] + [8, 9], [10] + [IMAGE_TOKEN] * counts[1] + [11, 12, 13, 14]]
    length = max(map(len, rows))
    input_ids = torch.tensor([[PAD] * (length - len(r)) + r for r in rows])
    attention_mask = torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in rows])
    return {"input_ids": input_ids, "attention_mask": attention_mask, **pixels}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("transformers-source")
    return {tie: (root / f"src-{tie}", save_source(root / f"src-{tie}", tie)) for tie in (True, False)}


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_dense_conversion_of_a_model_saved_alone(sources, tmp_path, tie):
    src, llava = sources[tie]
    dst = convert(src, tmp_path / "dense", dense=True)
    # no tokenizer in the source: no routing token (the dense layout has no router), so nothing but the format changes
    config = json.loads((dst / "config.json").read_text())
    assert config["routing_token_id"] is None and config["text_config"]["vocab_size"] == VOCAB_SIZE
    assert config["tie_word_embeddings"] is tie
    assert not (dst / "tokenizer_config.json").exists() and (dst / "preprocessor_config.json").is_file()
    source, out = source_tensors(llava), folder_tensors(dst)
    assert set(out) == set(source)  # no new tensor in the dense layout
    for name, tensor in source.items():
        assert out[name].dtype == tensor.dtype and torch.equal(out[name], tensor), name

    model = AutoModelForImageTextToText.from_pretrained(dst).eval()
    assert isinstance(model, VisorForConditionalGeneration)
    head, embeddings = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert (head.data_ptr() == embeddings.data_ptr()) is tie
    batch = hand_batch(llava, config)
    with torch.no_grad():
        reference, logits = llava(**batch).logits, model(**batch).logits
    assert logits.shape == reference.shape
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[mask], reference[mask], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        expected = llava.generate(**batch, max_new_tokens=4, do_sample=False)
        got = model.generate(**batch, max_new_tokens=4, do_sample=False)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_paper_conversion_of_a_model_saved_alone(sources, tmp_path, tie):
    src, llava = sources[tie]
    dst = convert(src, tmp_path / "paper")
    config = json.loads((dst / "config.json").read_text())
    # no tokenizer and no spare row: the routing token is a new row, the mean of the source rows
    assert config["routing_token_id"] == VOCAB_SIZE and config["text_config"]["vocab_size"] == VOCAB_SIZE + 1
    assert config["router_layer"] is not None and config["cross_attention_layers"]
    out, source = folder_tensors(dst), source_tensors(llava)
    for name, tensor in source.items():
        if out[name].shape != tensor.shape:
            assert name in ("model.language_model.embed_tokens.weight", "lm_head.weight"), name
            assert torch.equal(out[name][:VOCAB_SIZE], tensor), name
            torch.testing.assert_close(out[name][VOCAB_SIZE], tensor.mean(0))
        else:
            assert torch.equal(out[name], tensor), name
    assert set(out) - set(source) == {n for n in out if n.startswith(("model.cross_attention_blocks.", "model.router.", "model.token_packing."))}
    assert "routing token: id 99" in (dst / "README.md").read_text()

    model = AutoModelForImageTextToText.from_pretrained(dst).eval()
    batch = hand_batch(llava, config)
    batch["input_ids"] = torch.cat([batch["input_ids"], torch.full((2, 1), VOCAB_SIZE)], 1)
    batch["attention_mask"] = torch.cat([batch["attention_mask"], torch.ones(2, 1, dtype=torch.long)], 1)
    with torch.no_grad():
        output = model(**batch, output_router_logits=True)
        generated = model.generate(**batch, max_new_tokens=3, do_sample=False)
    assert torch.isfinite(output.logits).all() and output.router_logits.shape == (2, len(config["configurations"]))
    assert generated.shape == (2, batch["input_ids"].shape[1] + 3)


def test_bfloat16_source_keeps_its_dtype_and_verifies(tmp_path, capsys):
    src = tmp_path / "src"
    llava = save_source(src, tie=True, dtype=torch.bfloat16)
    assert cli_main(["convert", str(src), str(tmp_path / "dst"), "--dense"]) == 0
    source, out = source_tensors(llava), folder_tensors(tmp_path / "dst")
    assert {t.dtype for t in out.values()} == {torch.bfloat16} and set(out) == set(source)
    assert all(torch.equal(out[name], tensor) for name, tensor in source.items())
    assert cli_main(["verify", str(tmp_path / "dst"), "--against", str(src), "--max-new-tokens", "2"]) == 0
    assert "greedy tokens identical" in capsys.readouterr().out


def test_verify_without_processor_reports_failures(sources, tmp_path, capsys):
    src, _ = sources[False]
    dst = convert(src, tmp_path / "paper")
    assert cli_main(["verify", str(dst), "--against", str(src), "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "built by hand" in out and "1 routing token(s)" in out and "max |logit difference| 0 " in out
    # against another LLaVA-OV: the dense layout differs, exit 1
    assert cli_main(["verify", str(dst), "--against", str(sources[True][0]), "--max-new-tokens", "2"]) == 1
    assert "dense layout differs" in capsys.readouterr().err
    # a source that is not LLaVA-OV, a LLaVA-OV folder given as DST: named, exit 1
    assert cli_main(["verify", str(dst), "--against", str(dst)]) == 1
    assert "model_type 'visor'" in capsys.readouterr().err
    assert cli_main(["verify", str(src)]) == 1
    assert "not a VISOR checkpoint" in capsys.readouterr().err


def test_output_that_holds_the_source_is_refused(sources, tmp_path):
    src = tmp_path / "out" / "llava"
    shutil.copytree(sources[False][0], src)
    with pytest.raises(ConversionError, match="must not be the source folder"):
        convert(src, tmp_path / "out", overwrite=True)
    with pytest.raises(ConversionError, match="must not be the source folder"):
        convert(src, src / "visor")
    assert (src / "config.json").is_file() and sorted(p.name for p in (tmp_path / "out").iterdir()) == ["llava"]


def test_failure_while_writing_leaves_no_partial_output(sources, tmp_path, monkeypatch):
    src, _ = sources[False]
    dst = tmp_path / "dst"
    shutil.copytree(src, dst)  # an earlier output that --overwrite may replace
    before = sorted(p.name for p in dst.iterdir())

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(VisorForConditionalGeneration, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        convert(src, dst, overwrite=True, dense=True)
    with pytest.raises(OSError, match="disk full"):
        convert(src, tmp_path / "new", dense=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dst"]  # no temporary folder, no "new"
    assert sorted(p.name for p in dst.iterdir()) == before


@pytest.mark.slow
def test_console_script_convert_and_verify_in_a_subprocess(sources, tmp_path):
    """`visor-hf convert SRC DST --dense` and the default paper layout through the installed console script, with
    its exit codes (0, and 2 for an existing output)."""
    script = shutil.which("visor-hf") or pytest.skip("the visor-hf console script is not installed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    src, _ = sources[True]

    def run(*args):
        return subprocess.run([script, *map(str, args)], env=env, capture_output=True, text=True, timeout=300)

    dense = run("convert", src, tmp_path / "dense", "--dense")
    assert dense.returncode == 0, dense.stderr[-3000:]
    assert json.loads((tmp_path / "dense" / "config.json").read_text())["cross_attention_layers"] == []
    paper = run("convert", src, tmp_path / "paper")
    assert paper.returncode == 0, paper.stderr[-3000:]
    assert "router layer:           1" in paper.stdout
    again = run("convert", src, tmp_path / "paper")
    assert again.returncode == 2 and "already exists" in again.stderr
    # the written folders pass verify (in-process: the console script's exit status is `main`'s, as shown above)
    assert cli_main(["verify", str(tmp_path / "paper"), "--against", str(src), "--max-new-tokens", "2"]) == 0
    assert cli_main(["verify", str(tmp_path / "dense"), "--against", str(src), "--max-new-tokens", "2"]) == 0

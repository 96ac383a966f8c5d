"""Conversion LLaVA-OV → VISOR on a tiny random checkpoint saved to a temporary folder (offline)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoTokenizer, LlavaOnevisionForConditionalGeneration

import visor_hf  # noqa: F401  (registers the Auto classes)
from visor_hf.cli import main as cli_main
from visor_hf.conversion import ConversionError, convert, default_configurations, resolve_layout
from visor_hf.modeling import VisorForConditionalGeneration, uniform_layer_layout
from visor_hf.testing import IMAGE_ID, VOCAB, build_batch, save_tiny_llava, word_ids

NUM_LAYERS = 6
CA_SUFFIXES = [
    "input_layernorm.weight",
    "visual_layernorm.weight",
    "position_embedding.weight",
    "position_embedding.bias",
    "cross_attn.q_proj.weight",
    "cross_attn.q_proj.bias",
    "cross_attn.k_proj.weight",
    "cross_attn.k_proj.bias",
    "cross_attn.v_proj.weight",
    "cross_attn.v_proj.bias",
    "cross_attn.o_proj.weight",
]
ROUTER_NAMES = ["model.router.norm.weight", "model.router.fc1.weight", "model.router.fc1.bias", "model.router.fc2.weight", "model.router.fc2.bias"]


def read_folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(shard)))
    return tensors


def no_leftovers(dst: Path) -> bool:
    return not dst.exists() and not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}.")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("conversion")
    save_tiny_llava(root / "src", num_layers=NUM_LAYERS)
    convert(root / "src", root / "paper", max_shard_size="50KB")
    convert(root / "src", root / "dense", dense=True)
    return root


@pytest.fixture(scope="module")
def source_model(workdir):
    return LlavaOnevisionForConditionalGeneration.from_pretrained(workdir / "src", attn_implementation="eager").eval()


def routing_id(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["routing_token_id"]


def test_output_folder_layout(workdir):
    dst = workdir / "paper"
    names = {p.name for p in dst.iterdir()}
    for required in (
        "config.json", "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "processor_config.json",
        "chat_template.jinja", "generation_config.json", "README.md",
        "configuration_visor.py", "modeling_visor.py", "cache_visor.py", "processing_visor.py",
    ):
        assert required in names, required
    assert len(list(dst.glob("model-*-of-*.safetensors"))) > 1  # sharded
    assert not [n for n in names if n.endswith((".bin", ".pt", ".pth", ".ckpt"))]
    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "visor"
    assert config["auto_map"]["AutoModelForImageTextToText"] == "modeling_visor.VisorForConditionalGeneration"
    assert config["auto_map"]["AutoConfig"] == "configuration_visor.VisorConfig"
    assert json.loads((dst / "processor_config.json").read_text())["auto_map"] == {"AutoProcessor": "processing_visor.VisorProcessor"}
    card = (dst / "README.md").read_text()
    assert "cross-attention layers: [0, 3]" in card and "trust_remote_code=True" in card
    # a local source is named in the text; Hub metadata `base_model` must be a Hub id (see the Hub id test)
    assert "converted from `src`" in card and "base_model:" not in card
    assert card.startswith("---\nlibrary_name: transformers\npipeline_tag: image-text-to-text\ntags:\n")
    for index, configuration in enumerate(config["configurations"]):  # the configurations table
        assert f"| {index} | {configuration} | {len(configuration)} |" in card
    assert f"router layer: {config['router_layer']}" in card and f"`<route>`, id {config['routing_token_id']}" in card
    assert "**The new modules are untrained**" in card
    dense_card = (workdir / "dense" / "README.md").read_text()
    assert "**Dense layout**" in dense_card and "cross-attention layers: []" in dense_card
    assert not [p for p in workdir.iterdir() if ".tmp-" in p.name]


def test_paper_defaults(workdir):
    config = json.loads((workdir / "paper" / "config.json").read_text())
    cross, selfs = uniform_layer_layout(NUM_LAYERS)
    assert config["cross_attention_layers"] == cross and config["self_attention_layers"] == selfs
    assert len(cross) == len(selfs) == NUM_LAYERS // 3
    assert config["configurations"] == default_configurations(selfs)
    assert [] in config["configurations"] and selfs in config["configurations"]
    assert config["router_layer"] == selfs[0] - 1
    assert config["routing_token_id"] == len(VOCAB)  # the first spare row of the embedding matrix
    dense = json.loads((workdir / "dense" / "config.json").read_text())
    assert dense["cross_attention_layers"] == [] and dense["self_attention_layers"] == list(range(NUM_LAYERS))
    assert dense["router_layer"] is None


@pytest.mark.parametrize("num_layers", [6, 9, 24, 28, 32, 36])
def test_default_configurations_are_nested(num_layers):
    selfs = uniform_layer_layout(num_layers)[1]
    configurations = default_configurations(selfs)
    k = len(selfs)
    assert configurations[0] == [] and configurations[-1] == selfs
    assert [len(c) for c in configurations] == sorted({0, k // 4, k // 2, 3 * k // 4, k})
    for smaller, larger in zip(configurations, configurations[1:]):
        assert set(smaller) < set(larger)
    assert default_configurations([2, 4, 8, 10, 14, 16, 20, 22]) == [[], [2, 14], [2, 8, 14, 20], [2, 4, 8, 10, 14, 20], [2, 4, 8, 10, 14, 16, 20, 22]]


def test_default_layout():
    layout = resolve_layout(24)
    assert (layout["cross_attention_layers"], layout["self_attention_layers"]) == uniform_layer_layout(24)
    assert resolve_layout(6, cross_attention_layers=[1])["self_attention_layers"] == [0, 2, 3, 4, 5]


def test_every_source_tensor_unchanged_and_exact_new_names(workdir, source_model):
    dst = workdir / "paper"
    out = read_folder_tensors(dst)
    source = source_model.state_dict()
    route = routing_id(dst)
    for name, tensor in source.items():
        assert name in out, f"{name} missing from the output"
        assert out[name].dtype == tensor.dtype and out[name].shape == tensor.shape, name
        # bit-identical, the embedding and LM head included: the routing token took a spare row as it is
        assert torch.equal(out[name], tensor), name
    assert route == len(VOCAB) < source["model.language_model.embed_tokens.weight"].shape[0]
    config = json.loads((dst / "config.json").read_text())
    expected_new = {f"model.cross_attention_blocks.{layer}.{suffix}" for layer in config["cross_attention_layers"] for suffix in CA_SUFFIXES}
    expected_new |= set(ROUTER_NAMES)
    expected_new |= {f"model.token_packing.pack{k}.{p}" for k in config["packing_factors"] for p in ("weight", "bias")}
    expected_new |= {  # the packing module's 2-D position tables (zero-initialised)
        f"model.token_packing.position{k}.{view}_{axis}.weight"
        for k in config["packing_factors"]
        for view in ("base", "grid")
        for axis in ("row", "col")
    }
    assert config["packing_factors"] == [2, 4]  # added by default (tests/test_packing.py checks its values)
    assert set(out) - set(source) == expected_new
    # warm start: each CA block starts from its host layer; conv position embedding at zero
    for layer in config["cross_attention_layers"]:
        host = f"model.language_model.layers.{layer}"
        block = f"model.cross_attention_blocks.{layer}"
        for projection in ("q_proj", "k_proj", "v_proj", "o_proj"):
            assert torch.equal(out[f"{block}.cross_attn.{projection}.weight"], source[f"{host}.self_attn.{projection}.weight"])
        assert torch.equal(out[f"{block}.input_layernorm.weight"], source[f"{host}.input_layernorm.weight"])
        assert torch.equal(out[f"{block}.visual_layernorm.weight"], source[f"{host}.input_layernorm.weight"])
        assert not out[f"{block}.position_embedding.weight"].any() and not out[f"{block}.position_embedding.bias"].any()
    # the raw source files, under llava-hf's legacy names, hold exactly these tensors
    raw = read_folder_tensors(workdir / "src")
    assert len(raw) == len(source)
    for name, tensor in raw.items():
        assert torch.equal(source[legacy_to_current(name)], tensor), name


def legacy_to_current(name: str) -> str:
    """llava-hf's on-disk tensor names → the names transformers (and the VISOR checkpoint) use."""
    for old, new in (
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
        ("image_newline", "model.image_newline"),
    ):
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def test_tokenizer_gets_the_routing_token(workdir):
    dst = workdir / "paper"
    tokenizer = AutoTokenizer.from_pretrained(dst)
    source_tokenizer = AutoTokenizer.from_pretrained(workdir / "src")
    assert "<route>" not in source_tokenizer.get_vocab()
    assert tokenizer.convert_tokens_to_ids("<route>") == routing_id(dst)
    text = "<|im_start|>user <image> what is the colour ?<|im_end|>"
    assert tokenizer(text).input_ids == source_tokenizer(text).input_ids  # source ids unchanged


def test_dense_layout_reproduces_llava(workdir, source_model):
    dense = AutoModelForImageTextToText.from_pretrained(workdir / "dense", attn_implementation="eager").eval()
    assert isinstance(dense, VisorForConditionalGeneration)
    samples = [
        {"text": word_ids("what is") + ["<image>"] + word_ids("the colour ?"), "images": [(16, 32)]},
        {"text": ["<image>"] + word_ids("describe") + ["<image>"] + word_ids("how many ?"), "images": [(32, 16), (16, 16)]},
        {"text": word_ids("is there any red circle ?")},
    ]
    route = routing_id(workdir / "dense")
    samples[0]["text"].append(route)  # the routing token is a spare row of the source, unchanged: same logits too
    batch = build_batch(source_model, samples)
    with torch.no_grad():
        reference = source_model(**batch).logits
        logits = dense(**batch).logits
    assert logits.shape == reference.shape  # every logit column, the routing token's included
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[mask], reference[mask], atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        expected = source_model.generate(**batch, max_new_tokens=5, do_sample=False)
        got = dense.generate(**batch, max_new_tokens=5, do_sample=False)
    assert torch.equal(got, expected)


def test_paper_layout_loads_runs_forward_and_generate(workdir):
    from transformers import AutoProcessor

    from visor_hf.testing import random_image

    dst = workdir / "paper"
    model = AutoModelForImageTextToText.from_pretrained(dst).eval()
    processor = AutoProcessor.from_pretrained(dst)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is the colour ?"}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=[random_image(16, 32)], text=prompt, return_tensors="pt")
    assert (inputs["input_ids"] == model.config.routing_token_id).sum() == 1
    with torch.no_grad():
        output = model(**inputs, output_router_logits=True)
    assert torch.isfinite(output.logits).all()
    assert output.router_logits.shape == (1, len(model.config.configurations))
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        forced = model.generate(**inputs, max_new_tokens=3, do_sample=False, visor_configuration=[])
    assert generated.shape == forced.shape == (1, inputs["input_ids"].shape[1] + 3)


def test_conversion_holds_one_copy_of_the_weights():
    """`build_visor` takes the source's tensors themselves (no second copy in memory); only the new modules are
    allocated, and they hold real, finite values."""
    from visor_hf.conversion.convert import build_visor, visor_config_from_source
    from visor_hf.testing import tiny_llava

    llava = tiny_llava(0, num_layers=6)
    layout = resolve_layout(6)
    visor = build_visor(llava, visor_config_from_source(llava.config, layout, routing_token_id=5))
    source = llava.state_dict()
    target = visor.state_dict()
    for name, tensor in source.items():
        assert target[name].data_ptr() == tensor.data_ptr(), name
    new = [n for n in target if n not in source]
    assert new and all(n.startswith(("model.cross_attention_blocks.", "model.router.")) for n in new)
    for name in new:
        assert not target[name].is_meta and torch.isfinite(target[name]).all(), name
    assert target["model.router.fc1.weight"].std() > 0


def test_resize_when_the_embedding_has_no_spare_row(tmp_path):
    llava = save_tiny_llava(tmp_path / "src", vocab_size=len(VOCAB))
    dst = convert(tmp_path / "src", tmp_path / "dst")
    config = json.loads((dst / "config.json").read_text())
    assert config["routing_token_id"] == len(VOCAB) and config["text_config"]["vocab_size"] == len(VOCAB) + 1
    out = read_folder_tensors(dst)
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        source = llava.state_dict()[name]
        assert out[name].shape[0] == len(VOCAB) + 1
        assert torch.equal(out[name][: len(VOCAB)], source)
        assert torch.allclose(out[name][len(VOCAB)], source.mean(0), atol=1e-6)
    model = AutoModelForImageTextToText.from_pretrained(dst)
    with torch.no_grad():
        assert model(input_ids=torch.tensor([word_ids("what is") + [config["routing_token_id"]]])).logits.shape[-1] == len(VOCAB) + 1


def test_routing_token_init_mean_on_a_spare_row(tmp_path, workdir, source_model):
    """`--routing-token-init mean`: the spare row (embedding and LM head) becomes the mean of the tokenizer's rows;
    every other row is unchanged."""
    assert cli_main(["convert", str(workdir / "src"), str(tmp_path / "mean"), "--dense", "--routing-token-init", "mean"]) == 0
    out, source = read_folder_tensors(tmp_path / "mean"), source_model.state_dict()
    route = routing_id(tmp_path / "mean")
    assert route == len(VOCAB)
    for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
        keep = torch.arange(source[name].shape[0]) != route
        assert out[name].shape == source[name].shape and torch.equal(out[name][keep], source[name][keep]), name
        torch.testing.assert_close(out[name][route], source[name][: len(VOCAB)].mean(0))
        assert not torch.equal(out[name][route], source[name][route])
    with pytest.raises(ConversionError, match="routing token initialisation"):
        convert(workdir / "src", tmp_path / "bad", routing_token_init="zero")


def test_dense_without_spare_row_has_no_routing_token(tmp_path):
    """The dense layout has no router: with no spare row it takes no routing token, so no shape changes and its
    processor gives LLaVA-OV's inputs."""
    from transformers import AutoProcessor

    from visor_hf.testing import llava_processor, random_image

    llava = save_tiny_llava(tmp_path / "src", vocab_size=len(VOCAB))
    dst = convert(tmp_path / "src", tmp_path / "dst", dense=True)
    config = json.loads((dst / "config.json").read_text())
    assert config["routing_token_id"] is None and config["text_config"]["vocab_size"] == len(VOCAB)
    out = read_folder_tensors(dst)
    assert all(torch.equal(out[name], tensor) for name, tensor in llava.state_dict().items())
    processor = AutoProcessor.from_pretrained(dst)
    assert processor.routing_token is None and "<route>" not in processor.tokenizer.get_vocab()
    text = "<|im_start|>user <image>\nwhat is the colour ?<|im_end|>\n<|im_start|>assistant\n"
    ours = processor(text=text, images=[random_image(16, 32)], return_tensors="pt")
    theirs = llava_processor()(text=text, images=[random_image(16, 32)], return_tensors="pt")
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    model = AutoModelForImageTextToText.from_pretrained(dst, attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**ours).logits, llava(**theirs).logits, atol=1e-5, rtol=1e-5)


def test_dtype_option(tmp_path, workdir):
    dst = convert(workdir / "src", tmp_path / "bf16", dtype="bfloat16")
    tensors = read_folder_tensors(dst)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}


def test_custom_layout_and_bad_layout(tmp_path, workdir):
    dst = convert(
        workdir / "src", tmp_path / "custom",
        cross_attention_layers=[1, 4], self_attention_layers=[0, 2, 3, 5], configurations=[[0], [0, 3], [0, 2, 3, 5]],
    )
    config = json.loads((dst / "config.json").read_text())
    assert config["router_layer"] == 1  # the layer before the first switchable SA layer (2)
    with pytest.raises(ConversionError, match="disjoint"):
        convert(workdir / "src", tmp_path / "bad", cross_attention_layers=[1, 2], self_attention_layers=[2, 3])
    with pytest.raises(ConversionError, match="router_layer"):
        convert(workdir / "src", tmp_path / "bad", cross_attention_layers=[1], self_attention_layers=[2, 3],
                configurations=[[2], [2, 3]], router_layer=3)
    assert no_leftovers(tmp_path / "bad")


# -- refusals ------------------------------------------------------------------------------------------------------


def test_existing_output_is_refused_without_overwrite(tmp_path, workdir):
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite"):
        convert(workdir / "src", dst)
    assert cli_main(["convert", str(workdir / "src"), str(dst)]) != 0
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    # --overwrite replaces a checkpoint only: a folder of someone's files is refused, naming why
    with pytest.raises(ConversionError, match="refuses to replace .*no config.json"):
        convert(workdir / "src", dst, overwrite=True, dense=True)
    assert cli_main(["convert", str(workdir / "src"), str(dst), "--overwrite"]) == 2
    assert [p.name for p in dst.iterdir()] == ["keep.txt"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def _copy_source(workdir, tmp_path) -> Path:
    src = tmp_path / "src"
    shutil.copytree(workdir / "src", src)
    return src


def _single_file_source(tmp_path) -> Path:
    src = tmp_path / "single"
    save_tiny_llava(src, max_shard_size="100MB")
    assert (src / "model.safetensors").is_file()
    return src


def test_wrong_model_type_is_refused(tmp_path, workdir):
    src = _copy_source(workdir, tmp_path)
    config = json.loads((src / "config.json").read_text())
    config["model_type"] = "llava_next"
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="model_type 'llava_next'"):
        convert(src, tmp_path / "dst")
    assert no_leftovers(tmp_path / "dst")
    with pytest.raises(ConversionError, match="already a VISOR checkpoint"):
        convert(workdir / "paper", tmp_path / "dst")
    assert no_leftovers(tmp_path / "dst")


def test_truncated_safetensors_is_refused(tmp_path, workdir):
    src = _copy_source(workdir, tmp_path)
    shard = sorted(src.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match=f"{shard.name} is corrupt or truncated"):
        convert(src, tmp_path / "dst")
    assert no_leftovers(tmp_path / "dst")
    assert cli_main(["convert", str(src), str(tmp_path / "dst")]) == 2
    assert no_leftovers(tmp_path / "dst")


def test_missing_tensor_is_refused(tmp_path):
    src = _single_file_source(tmp_path)
    tensors = load_file(str(src / "model.safetensors"))
    victim = next(k for k in tensors if "layers.2.mlp.up_proj" in k)
    del tensors[victim]
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="missing tensors"):
        convert(src, tmp_path / "dst")
    assert no_leftovers(tmp_path / "dst")


def test_index_naming_an_absent_tensor_is_refused(tmp_path, workdir):
    src = _copy_source(workdir, tmp_path)
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    index["weight_map"]["language_model.model.layers.0.mlp.extra.weight"] = shard
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConversionError, match=f"places tensors .*extra.weight.* in {shard}, which lacks them"):
        convert(src, tmp_path / "dst")
    assert no_leftovers(tmp_path / "dst")


def test_shape_mismatch_is_refused(tmp_path):
    src = _single_file_source(tmp_path)
    tensors = load_file(str(src / "model.safetensors"))
    victim = next(k for k in tensors if "layers.1.self_attn.q_proj.weight" in k)
    tensors[victim] = torch.zeros(tensors[victim].shape[0] + 1, tensors[victim].shape[1])
    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConversionError, match="shape|size"):
        convert(src, tmp_path / "dst")
    assert no_leftovers(tmp_path / "dst")


class _Trap:
    """Unpickling this object creates a marker file: proof that a pickle was loaded."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_pickle_checkpoint_is_refused_and_never_loaded(tmp_path, workdir):
    src = _copy_source(workdir, tmp_path)
    for shard in src.glob("*.safetensors"):
        shard.unlink()
    (src / "model.safetensors.index.json").unlink()
    marker = tmp_path / "unpickled"
    with open(src / "pytorch_model.bin", "wb") as f:
        pickle.dump(_Trap(str(marker)), f)
    with pytest.raises(ConversionError, match="pickle"):
        convert(src, tmp_path / "dst")
    assert not marker.exists()
    assert no_leftovers(tmp_path / "dst")


def test_unknown_source_is_refused(tmp_path):
    with pytest.raises(ConversionError, match="neither a local folder nor a Hub model"):
        convert("nobody-visor-test/does-not-exist", tmp_path / "dst")
    assert no_leftovers(tmp_path / "dst")


def test_hub_id_resolves_through_the_cache(tmp_path, workdir, monkeypatch):
    calls = {}

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kwargs):
        calls.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return str(workdir / "src")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    dst = convert("someone/tiny-llava-ov", tmp_path / "dst", dense=True)
    assert calls["repo_id"] == "someone/tiny-llava-ov"
    assert not any(p.endswith((".bin", ".pt", ".pth")) for p in calls["allow_patterns"])
    assert "base_model: someone/tiny-llava-ov" in (dst / "README.md").read_text()


def test_hub_id_from_a_real_offline_cache(tmp_path, workdir, monkeypatch, capsys):
    """A Hub id resolves offline (HF_HUB_OFFLINE=1) from huggingface_hub's cache layout, for convert and verify."""
    from huggingface_hub import constants

    assert constants.HF_HUB_OFFLINE
    repo = tmp_path / "hub" / "models--someone--tiny-llava-ov"
    shutil.copytree(workdir / "src", repo / "snapshots" / ("a" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    dst = convert("someone/tiny-llava-ov", tmp_path / "dst", dense=True)
    assert "base_model: someone/tiny-llava-ov" in (dst / "README.md").read_text()
    assert cli_main(["verify", str(dst), "--against", "someone/tiny-llava-ov", "--max-new-tokens", "2"]) == 0
    assert "max |logit difference| 0 " in capsys.readouterr().out


# -- the command line ----------------------------------------------------------------------------------------------


def test_cli_convert_and_verify(tmp_path, workdir, capsys):
    dst = tmp_path / "cli"
    code = cli_main([
        "convert", str(workdir / "src"), str(dst), "--ca-layers", "1,4", "--sa-layers", "0,2,3,5",
        "--configurations", "0; 0,3; 0,2,3,5", "--max-shard-size", "30KB",
    ])
    assert code == 0
    config = json.loads((dst / "config.json").read_text())
    assert config["configurations"] == [[0], [0, 3], [0, 2, 3, 5]] and config["router_layer"] == 1
    assert cli_main(["verify", str(dst), "--against", str(workdir / "src"), "--max-new-tokens", "3"]) == 0
    report = capsys.readouterr().out
    assert "greedy tokens identical" in report and "OK" in report


def test_verify_fails_against_another_model(tmp_path, workdir, capsys):
    other = tmp_path / "other"
    save_tiny_llava(other, seed=1)
    assert cli_main(["verify", str(workdir / "dense"), "--against", str(other), "--max-new-tokens", "2"]) == 1
    assert "FAILED" in capsys.readouterr().err


def test_image_token_id_kept(workdir):
    config = json.loads((workdir / "paper" / "config.json").read_text())
    assert config.get("image_token_id", config.get("image_token_index")) == IMAGE_ID
    assert os.path.basename(workdir / "paper") == "paper"
    with safe_open(str(next((workdir / "paper").glob("*.safetensors"))), "pt") as handle:
        assert handle.metadata().get("format") == "pt"

"""`visor-hf convert` / `verify` on the Qwen2-VL family, the converted folder's remote code in a fresh process that
never imports visor_hf, and a PEFT LoRA round trip on the converted model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

import visor_hf  # noqa: F401  (registers the Auto classes)
from visor_hf.cli import main as cli_main
from visor_hf.conversion import ConversionError, convert
from visor_hf.testing import IMAGE_ID, QWEN_FAMILIES, random_image, save_tiny_qwen_vl

LAYOUT = {"cross_attention_layers": [1, 4], "self_attention_layers": [0, 2, 3, 5],
          "configurations": [[0], [0, 3], [0, 2, 3, 5]], "router_layer": 1}
LORA_TARGETS = (
    r"model\.language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
    r"|model\.cross_attention_blocks\.\d+\.cross_attn\.(q|k|v|o)_proj"
)
CONVERSATION = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is the colour ?"}]}]


@pytest.fixture(scope="module", params=QWEN_FAMILIES)
def source(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    save_tiny_qwen_vl(root / "src", request.param)
    return root / "src"


@pytest.fixture(scope="module")
def sparse_folder(source):
    return convert(source, source.parent / "visor", **LAYOUT)


def processor_inputs(folder, image_size=(16, 32)) -> dict:
    processor = AutoProcessor.from_pretrained(folder)
    prompt = processor.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    return dict(processor(images=[random_image(*image_size)], text=prompt, return_tensors="pt"))


def test_dense_conversion_detects_the_family_and_verifies(source, tmp_path, capsys):
    dst = tmp_path / "dense"
    assert cli_main(["convert", str(source), str(dst), "--dense"]) == 0
    config = json.loads((dst / "config.json").read_text())
    family = json.loads((source / "config.json").read_text())["model_type"]
    assert config["model_type"] == f"visor_{family}"
    assert config["auto_map"]["AutoModelForImageTextToText"].startswith("modeling_qwen2_vl_visor.")
    names = {p.name for p in dst.iterdir()}
    assert {"modeling_qwen2_vl_visor.py", "backbone_qwen2_vl_visor.py", "configuration_qwen2_vl_visor.py",
            "processing_qwen2_vl_visor.py", "modeling_visor.py", "plan_visor.py"} <= names
    assert cli_main(["verify", str(dst), "--against", str(source), "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "max |logit difference| 0 " in out and "greedy tokens identical" in out


def test_the_processor_carries_the_routing_token_and_the_family_inputs(sparse_folder):
    processor = AutoProcessor.from_pretrained(sparse_folder)
    assert type(processor).__name__ == "VisorQwen2VLProcessor"
    model = AutoModelForImageTextToText.from_pretrained(sparse_folder).eval()
    inputs = processor_inputs(sparse_folder)
    routing = model.config.routing_token_id
    assert int((inputs["input_ids"] == routing).sum()) == 1
    assert {"image_grid_thw", "mm_token_type_ids", "pixel_values"} <= set(inputs)
    tokens = int(inputs["image_grid_thw"].prod()) // 4
    assert int((inputs["input_ids"] == IMAGE_ID).sum()) == tokens
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert out.shape[1] > inputs["input_ids"].shape[1]


def test_unsupported_family_is_refused_naming_the_supported_ones(source, tmp_path):
    config = json.loads((source / "config.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**config, "model_type": "idefics3"}))
    with pytest.raises(ConversionError, match=r"'idefics3'.*Qwen2-VL \(model_type 'qwen2_vl'\).*Qwen2.5-VL"):
        convert(other, tmp_path / "out")


REMOTE_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder, inputs_file, out_file = sys.argv[1:4]
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = load_file(inputs_file)
    with torch.no_grad():
        logits = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    save_file({"logits": logits.contiguous(), "generated": generated.contiguous()}, out_file)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is the colour ?"}]}]
    print(json.dumps({
        "class": type(model).__module__ + "." + type(model).__name__,
        "processor": type(processor).__name__,
        "prompt": processor.apply_chat_template(conversation, add_generation_prompt=True),
        "visor_hf_imported": any(name == "visor_hf" or name.startswith("visor_hf.") for name in sys.modules),
    }))
    """
)


@pytest.mark.slow
def test_remote_code_in_a_fresh_process(sparse_folder, tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(sparse_folder).eval()
    inputs = {k: v.contiguous() for k, v in processor_inputs(sparse_folder).items()}
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    with torch.no_grad():
        expected = model(**inputs).logits
        generated = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"),
               OMP_NUM_THREADS="1", PYTHONPATH="")
    script = tmp_path / "load_remote.py"
    script.write_text(REMOTE_SCRIPT)
    result = subprocess.run(
        [sys.executable, str(script), str(sparse_folder), str(tmp_path / "inputs.safetensors"), str(tmp_path / "out.safetensors")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["class"].startswith("transformers_modules.") and ".modeling_qwen2_vl_visor.Visor" in report["class"]
    assert report["processor"] == "VisorQwen2VLProcessor"
    assert report["visor_hf_imported"] is False
    assert report["prompt"] == AutoProcessor.from_pretrained(sparse_folder).apply_chat_template(CONVERSATION, add_generation_prompt=True)
    out = load_file(str(tmp_path / "out.safetensors"))
    torch.testing.assert_close(out["logits"], expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(out["generated"], generated)


def test_lora_trains_saves_reloads_and_merges(sparse_folder, tmp_path):
    torch.manual_seed(0)
    base = AutoModelForImageTextToText.from_pretrained(sparse_folder, attn_implementation="eager")
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=LORA_TARGETS, modules_to_save=["router"]))
    wrapped = {name for name, module in model.named_modules() if hasattr(module, "lora_A")}
    assert wrapped and not [n for n in wrapped if ".visual." in n]
    assert any("cross_attention_blocks" in n for n in wrapped)
    batch = processor_inputs(sparse_folder)
    labels = batch["input_ids"].clone()
    labels[(labels == IMAGE_ID) | (labels == base.config.routing_token_id)] = -100
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for step in range(4):
        output = model(**batch, labels=labels, visor_configuration=["max", "auto"][step % 2], output_router_logits=True)
        (output.loss + output.router_logits.logsumexp(-1).mean() * 0.01).backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(output.loss.item())
    assert losses[-1] < losses[0]
    model.eval()
    with torch.no_grad():
        expected = model(**batch, visor_configuration=1).logits
        expected_router = model(**batch, output_router_logits=True).router_logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(
        AutoModelForImageTextToText.from_pretrained(sparse_folder, attn_implementation="eager"), tmp_path / "adapter"
    ).eval()
    merged = reloaded.merge_and_unload()
    assert type(merged) is type(base)
    merged.save_pretrained(tmp_path / "merged")
    again = AutoModelForImageTextToText.from_pretrained(tmp_path / "merged", attn_implementation="eager").eval()
    with torch.no_grad():
        torch.testing.assert_close(again(**batch, visor_configuration=1).logits, expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(again(**batch, output_router_logits=True).router_logits, expected_router, atol=1e-5, rtol=1e-5)

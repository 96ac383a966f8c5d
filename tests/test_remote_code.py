"""A converted folder loads with `trust_remote_code=True` in a fresh process that never imports `visor_hf`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText, AutoProcessor

import visor_hf  # noqa: F401
from visor_hf.conversion import convert
from visor_hf.testing import random_image, save_tiny_llava

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder, inputs_file, out_file, resave = sys.argv[1:5]
    inputs = load_file(inputs_file)
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    with torch.no_grad():
        logits = model(**inputs).logits
    # the processor shipped as remote code gives the same ids as the in-process one
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is the colour ?"}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    # push_to_hub goes through save_pretrained: the folder must again carry the code and auto_map
    model.save_pretrained(resave)
    processor.save_pretrained(resave)
    reloaded = AutoModelForImageTextToText.from_pretrained(resave, trust_remote_code=True).eval()
    with torch.no_grad():
        relogits = reloaded(**inputs).logits
    save_file({"logits": logits.contiguous(), "relogits": relogits.contiguous()}, out_file)
    print(json.dumps({
        "class": type(model).__module__ + "." + type(model).__name__,
        "processor": type(processor).__name__,
        "prompt": prompt,
        "visor_hf_imported": any(name == "visor_hf" or name.startswith("visor_hf.") for name in sys.modules),
    }))
    """
)


def test_remote_code_in_a_fresh_process(tmp_path):
    save_tiny_llava(tmp_path / "src")
    folder = convert(tmp_path / "src", tmp_path / "visor-tiny")
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what is the colour ?"}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=[random_image(16, 32)], text=prompt, return_tensors="pt")
    inputs = {k: v.contiguous() for k, v in inputs.items()}
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    with torch.no_grad():
        expected = model(**inputs).logits

    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(
        HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"),
        OMP_NUM_THREADS="1", PYTHONPATH="",
    )
    script = tmp_path / "load_remote.py"
    script.write_text(SCRIPT)
    resave = tmp_path / "resaved"
    result = subprocess.run(
        [sys.executable, str(script), str(folder), str(tmp_path / "inputs.safetensors"), str(tmp_path / "out.safetensors"), str(resave)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["class"].startswith("transformers_modules.") and report["class"].endswith("modeling_visor.VisorForConditionalGeneration")
    assert report["processor"] == "VisorProcessor"
    assert report["visor_hf_imported"] is False
    assert report["prompt"] == prompt
    out = load_file(str(tmp_path / "out.safetensors"))
    torch.testing.assert_close(out["logits"], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out["relogits"], expected, atol=1e-5, rtol=1e-5)

    # the re-saved folder is again a complete remote-code checkpoint
    names = {p.name for p in resave.iterdir()}
    assert {"configuration_visor.py", "modeling_visor.py", "cache_visor.py", "processing_visor.py", "routing_visor.py"} <= names
    config = json.loads((resave / "config.json").read_text())
    assert config["auto_map"]["AutoModelForImageTextToText"].endswith("modeling_visor.VisorForConditionalGeneration")
    assert config["auto_map"]["AutoConfig"].endswith("configuration_visor.VisorConfig")
    processor_config = json.loads((resave / "processor_config.json").read_text())
    assert processor_config["auto_map"]["AutoProcessor"].endswith("processing_visor.VisorProcessor")


def test_remote_code_files_use_relative_imports_only():
    from visor_hf.conversion.convert import remote_code_files

    for path in remote_code_files():
        source = path.read_text()
        assert "from visor_hf" not in source and "import visor_hf" not in source, path


@pytest.mark.slow
def test_verify_trust_remote_code_runs_the_shipped_code(tmp_path, capsys):
    """`visor-hf verify DST --trust-remote-code` loads DST through its own code files in a fresh process and compares
    with visor_hf: it passes on a converted folder and fails once the shipped code computes something else."""
    from visor_hf.cli import main as cli_main

    save_tiny_llava(tmp_path / "src")
    folder = convert(tmp_path / "src", tmp_path / "visor-tiny")
    assert cli_main(["verify", str(folder), "--trust-remote-code", "--max-new-tokens", "1"]) == 0
    out = capsys.readouterr().out
    assert "remote code (fresh process, visor_hf not imported): transformers_modules." in out and "OK" in out
    # the shipped code drifts from the package: the check must catch it
    modeling = folder / "modeling_visor.py"
    source = modeling.read_text()
    assert source.count("logits = self.lm_head(") >= 1
    modeling.write_text(source.replace("logits = self.lm_head(", "logits = 2 * self.lm_head(", 1))
    assert cli_main(["verify", str(folder), "--trust-remote-code", "--max-new-tokens", "1"]) == 1
    assert "remote code: logits differ" in capsys.readouterr().err

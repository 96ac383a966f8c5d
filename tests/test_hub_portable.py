"""Every saved VISOR folder is Hub-portable: `save_pretrained` (also `Trainer.save_model`, `push_to_hub`) writes the
code files, `auto_map` and a model card, and the folder, like the shipped toy, loads and generates the same tokens in a
fresh process where `visor_hf` cannot be imported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from transformers import AutoModelForImageTextToText, AutoProcessor

import visor_hf
from visor_hf.modeling.processing_visor import VisorProcessor
from visor_hf.testing import CHAT_TEMPLATE, LLAVA_PROCESSOR_FIELDS, random_image, tiny_image_processor, tiny_tokenizer
from visor_hf.toy.data import make_scene, render, sample_questions
from visor_hf.toy.inference import DEFAULT_CHECKPOINT, TR_CHECKPOINT

CODE_FILES = {"configuration_visor.py", "modeling_visor.py", "cache_visor.py", "flops_visor.py", "hub_visor.py"}

# `visor_hf` cannot be imported at all: the folder's own code files must do everything
FRESH_PROCESS = textwrap.dedent(
    """
    import sys
    sys.modules["visor_hf"] = None
    import json
    import torch
    torch.set_num_threads(1)
    from PIL import Image
    import transformers
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder, image_file, question, max_new_tokens = sys.argv[1:5]
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=[Image.open(image_file)], text=prompt, return_tensors="pt")
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=int(max_new_tokens), do_sample=False)
    print(json.dumps({
        "model": type(model).__module__ + "." + type(model).__name__,
        "processor": type(processor).__name__,
        "input_ids": inputs["input_ids"].tolist(),
        "tokens": tokens.tolist(),
        "transformers": transformers.__version__,
    }))
    """
)


def generate_here(folder: Path, image, question: str, max_new_tokens: int) -> dict:
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=[image], text=prompt, return_tensors="pt")
    with torch.no_grad():
        tokens = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    return {"input_ids": inputs["input_ids"].tolist(), "tokens": tokens.tolist()}


def generate_in_a_fresh_process(folder: Path, image, question: str, max_new_tokens: int, tmp_path: Path, python=sys.executable) -> dict:
    tmp_path.mkdir(parents=True, exist_ok=True)
    script, image_file = tmp_path / "fresh.py", tmp_path / "image.png"
    script.write_text(FRESH_PROCESS)
    image.save(image_file)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1", PYTHONPATH="")
    result = subprocess.run(
        [str(python), str(script), str(folder), str(image_file), question, str(max_new_tokens)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["model"].startswith("transformers_modules.") and report["model"].endswith(".VisorForConditionalGeneration")
    assert report["processor"] == "VisorProcessor"
    return report


def tiny_processor() -> VisorProcessor:
    fields = {k: v for k, v in LLAVA_PROCESSOR_FIELDS.items() if k != "processor_class"}
    return VisorProcessor(image_processor=tiny_image_processor(), tokenizer=tiny_tokenizer(with_routing_token=True), chat_template=CHAT_TEMPLATE, **fields)


def assert_portable(folder: Path) -> None:
    names = {p.name for p in folder.iterdir()}
    assert CODE_FILES | {"processing_visor.py", "README.md"} <= names, names
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_visor.VisorConfig",
        "AutoModel": "modeling_visor.VisorModel",
        "AutoModelForImageTextToText": "modeling_visor.VisorForConditionalGeneration",
    }
    processor_config = json.loads((folder / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": "processing_visor.VisorProcessor"}
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "image-text-to-text"
    assert {"visor", "custom_code"} <= set(card.data.tags)


def test_save_pretrained_of_a_model_built_in_process_loads_without_visor_hf(visor, tmp_path):
    folder = tmp_path / "saved"
    visor.save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    assert_portable(folder)
    assert type(visor)._auto_class is None and type(visor.config)._auto_class is None  # registered only while saving
    assert "| configuration | SA layers | count |" in ModelCard.load(folder / "README.md").text  # the layout
    image, question = random_image(16, 32), "what is the colour ?"
    here = generate_here(folder, image, question, max_new_tokens=4)
    there = generate_in_a_fresh_process(folder, image, question, max_new_tokens=4, tmp_path=tmp_path)
    assert there["input_ids"] == here["input_ids"] and there["tokens"] == here["tokens"]


@pytest.mark.parametrize("checkpoint", [DEFAULT_CHECKPOINT, TR_CHECKPOINT], ids=lambda p: p.name)
def test_the_shipped_toy_loads_without_visor_hf(tmp_path, checkpoint):
    assert_portable(checkpoint)
    scene = make_scene(12345)
    question = sample_questions(scene)[0].text
    image = render(scene)
    here = generate_here(checkpoint, image, question, max_new_tokens=3)
    there = generate_in_a_fresh_process(checkpoint, image, question, max_new_tokens=3, tmp_path=tmp_path)
    assert there["input_ids"] == here["input_ids"] and there["tokens"] == here["tokens"]


def remote_code_range() -> tuple[str, str]:
    """The transformers range of `[tool.visor_hf] remote-code-transformers` in pyproject.toml: (oldest, upper bound)."""
    import re

    import tomllib

    pyproject = Path(visor_hf.__file__).resolve().parents[2] / "pyproject.toml"
    spec = tomllib.loads(pyproject.read_text())["tool"]["visor_hf"]["remote-code-transformers"]
    match = re.fullmatch(r">=([\d.]+),<([\d.]+)", spec)
    assert match, spec
    return match.group(1), match.group(2)


def test_the_installed_transformers_is_inside_the_remote_code_range():
    from packaging.version import Version
    from transformers import __version__

    oldest, upper = remote_code_range()
    assert Version(oldest) <= Version(__version__) < Version(upper)


def oldest_transformers_python() -> Path:
    """A venv (cached under tests/.cache/) that sees the installed packages but holds the oldest supported
    transformers, installed from PyPI."""
    oldest, _ = remote_code_range()
    venv = Path(__file__).resolve().parent / ".cache" / f"venv-transformers-{oldest}"
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import transformers; print(transformers.__version__)"]
    if not python.exists() or subprocess.run(probe, capture_output=True, text=True).stdout.strip() != oldest:
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--clear", str(venv)], check=True, timeout=600)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", f"transformers=={oldest}"],
                       check=True, timeout=1200)
    assert subprocess.run(probe, capture_output=True, text=True).stdout.strip() == oldest
    return python


@pytest.mark.slow
def test_remote_code_runs_on_the_oldest_supported_transformers(visor, tmp_path):
    """The code files of a saved folder and of the shipped toy load and generate the same tokens under the oldest
    transformers of the declared range (a separate venv: the global environment keeps its transformers)."""
    python = oldest_transformers_python()
    folder = tmp_path / "saved"
    visor.save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    scene = make_scene(12345)
    cases = [(folder, random_image(16, 32), "what is the colour ?"), (DEFAULT_CHECKPOINT, render(scene), sample_questions(scene)[0].text)]
    for index, (path, image, question) in enumerate(cases):
        here = generate_here(path, image, question, max_new_tokens=3)
        there = generate_in_a_fresh_process(path, image, question, 3, tmp_path / f"old-{index}", python=python)
        assert there["transformers"] == remote_code_range()[0]
        assert there["input_ids"] == here["input_ids"] and there["tokens"] == here["tokens"]


@pytest.mark.parametrize("checkpoint", [DEFAULT_CHECKPOINT, TR_CHECKPOINT], ids=lambda p: p.name)
def test_the_toy_ships_every_modeling_file(checkpoint):
    modeling = Path(visor_hf.__file__).parent / "modeling"
    assert {p.name for p in modeling.glob("*.py")} - {"__init__.py"} <= {p.name for p in checkpoint.glob("*.py")}


def test_trainer_save_model_writes_code_and_auto_map(visor, tmp_path):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to=[], use_cpu=True)
    Trainer(model=visor, args=args).save_model(str(tmp_path / "saved"))
    names = {p.name for p in (tmp_path / "saved").iterdir()}
    assert CODE_FILES | {"README.md", "config.json"} <= names
    assert "AutoModelForImageTextToText" in json.loads((tmp_path / "saved" / "config.json").read_text())["auto_map"]


def test_push_to_hub_uploads_code_auto_map_and_tags(visor, tmp_path, monkeypatch):
    """The upload itself is replaced by a copy of the folder `push_to_hub` would send (no network)."""
    import transformers.utils.hub as hub
    from huggingface_hub.errors import EntryNotFoundError

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            return type("Repo", (), {"repo_id": repo_id})()

    def no_card(*args, **kwargs):
        raise EntryNotFoundError("no card yet")

    def capture(self, folder, *args, **kwargs):
        shutil.copytree(folder, tmp_path / "pushed")

    monkeypatch.setattr(hub, "hf_api", lambda: FakeApi())
    monkeypatch.setattr(hub.ModelCard, "load", no_card)
    monkeypatch.setattr(type(visor), "_upload_modified_files", capture)
    visor.push_to_hub("someone/visor-tiny")
    names = {p.name for p in (tmp_path / "pushed").iterdir()}
    assert CODE_FILES <= names
    card = ModelCard((tmp_path / "pushed" / "README.md").read_text())
    assert {"visor", "custom_code"} <= set(card.data.tags) and card.data.library_name == "transformers"

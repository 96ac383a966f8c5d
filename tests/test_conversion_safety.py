"""`visor-hf convert` never loses data: faults are injected between the conversion's steps (a monkeypatched save, a
process that dies at a chosen step), never timed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from transformers import LlavaOnevisionForConditionalGeneration

from visor_hf.cli import main as cli_main
from visor_hf.conversion import ConversionError, convert
from visor_hf.modeling import VisorForConditionalGeneration
from visor_hf.testing import save_tiny_llava


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    folder = tmp_path_factory.mktemp("safety") / "src"
    save_tiny_llava(folder, num_layers=3)
    return folder


def hidden(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def after_save(monkeypatch, action):
    """Run `action()` once the output is written to its temporary folder, before it is published."""
    save = VisorForConditionalGeneration.save_pretrained

    def save_then_act(self, *args, **kwargs):
        result = save(self, *args, **kwargs)
        action()
        return result

    monkeypatch.setattr(VisorForConditionalGeneration, "save_pretrained", save_then_act)


def never_load(monkeypatch):
    """Fail the test if the source model is loaded (allocated)."""

    def refuse(*args, **kwargs):
        raise AssertionError("the source model was loaded")

    monkeypatch.setattr(LlavaOnevisionForConditionalGeneration, "from_pretrained", refuse)


@pytest.mark.parametrize("with_file", [True, False], ids=["folder-with-a-file", "empty-folder"])
def test_output_created_meanwhile_is_never_deleted(src, tmp_path, monkeypatch, with_file):
    dst = tmp_path / "dst"

    def someone_creates_dst():
        dst.mkdir()
        if with_file:
            (dst / "notes.txt").write_text("someone's work")

    after_save(monkeypatch, someone_creates_dst)
    with pytest.raises(FileExistsError, match="appeared while the conversion ran"):
        convert(src, dst, dense=True)
    assert sorted(p.name for p in dst.iterdir()) == (["notes.txt"] if with_file else [])
    assert hidden(tmp_path, "dst") == []


def test_two_conversions_to_one_output_cannot_both_succeed(src, tmp_path, monkeypatch):
    dst = tmp_path / "dst"
    errors = []

    def second_conversion():
        try:
            convert(src, dst)
        except ConversionError as error:
            errors.append(str(error))

    after_save(monkeypatch, second_conversion)
    convert(src, dst, dense=True)  # the first conversion holds DST's lock while the second one starts
    assert len(errors) == 1 and "another conversion is writing" in errors[0]
    assert json.loads((dst / "config.json").read_text())["cross_attention_layers"] == []  # the first one's output
    assert hidden(tmp_path, "dst") == []


@pytest.mark.parametrize(
    "content, reason",
    [
        ({"notes.txt": "my project"}, "no config.json"),
        ({"config.json": json.dumps({"model_type": "bert"})}, "model_type 'bert'"),
        ({"config.json": "{not json"}, "not a valid model config"),
    ],
)
def test_overwrite_refuses_what_is_not_a_checkpoint(src, tmp_path, monkeypatch, content, reason):
    never_load(monkeypatch)
    dst = tmp_path / "project"
    dst.mkdir()
    for name, text in content.items():
        (dst / name).write_text(text)
    with pytest.raises(ConversionError, match=f"refuses to replace .*{reason}"):
        convert(src, dst, overwrite=True)
    assert sorted(p.name for p in dst.iterdir()) == sorted(content)
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(ConversionError, match="not a folder"):
        convert(src, file, overwrite=True)


def test_overwrite_replaces_a_checkpoint(src, tmp_path):
    dst = tmp_path / "dst"
    shutil.copytree(src, dst)  # a LLaVA-OneVision checkpoint
    convert(src, dst, overwrite=True, dense=True)
    assert json.loads((dst / "config.json").read_text())["model_type"] == "visor"
    convert(src, dst, overwrite=True)  # a VISOR checkpoint
    assert json.loads((dst / "config.json").read_text())["cross_attention_layers"] == [0]
    assert hidden(tmp_path, "dst") == []


KILLED_RUN = textwrap.dedent(
    """
    import os, sys
    import torch
    torch.set_num_threads(1)
    from visor_hf.conversion import convert, publish
    src, dst, step = sys.argv[1:4]

    if step == "before-publish":  # the output is complete in its temporary folder
        publish.publish = lambda *a, **k: os._exit(9)
        sys.modules["visor_hf.conversion.convert"].publish = publish.publish
    elif step == "after-swap":  # the new output is in place, the old one not yet deleted
        publish.shutil.rmtree = lambda *a, **k: os._exit(9)
    elif step == "between-renames":  # a system without renameat2: the old output is set aside, the new not yet in
        publish._renameat2 = lambda *a, **k: False
        rename = os.rename
        def rename_then_die(a, b):
            rename(a, b)
            if ".old-" in str(b):
                os._exit(9)
            return None
        publish.os.rename = rename_then_die
    convert(src, dst, overwrite=True, dense=True)
    """
)


def killed_conversion(src: Path, dst: Path, step: str, tmp_path: Path) -> None:
    script = tmp_path / "killed_run.py"
    script.write_text(KILLED_RUN)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, str(script), str(src), str(dst), step], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 9, result.stderr[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("step", ["before-publish", "after-swap", "between-renames"])
def test_a_killed_conversion_never_leaves_dst_missing_and_the_next_run_recovers(src, tmp_path, step, caplog):
    dst = tmp_path / "dst"
    shutil.copytree(src, dst)  # the previous output
    killed_conversion(src, dst, step, tmp_path)
    leftovers = hidden(tmp_path, "dst")
    assert leftovers, "the killed run left nothing behind to recover"
    if step == "between-renames":  # only without renameat2: DST is missing, the old output is set aside
        assert not dst.exists() and any(".old-" in name for name in leftovers)
    else:  # with renameat2 DST is never missing: the old output before the swap, the new one after it
        model_type = json.loads((dst / "config.json").read_text())["model_type"]
        assert model_type == ("llava_onevision" if step == "before-publish" else "visor")
    # the next conversion to DST restores a set-aside output and removes every leftover, saying so
    if not dst.exists():
        with pytest.raises(FileExistsError):
            convert(src, dst, dense=True)  # the restored output exists: refused without --overwrite
        assert json.loads((dst / "config.json").read_text())["model_type"] == "llava_onevision"
        assert any("restored" in r.getMessage() for r in caplog.records)
    convert(src, dst, overwrite=True, dense=True)
    assert any("left by a killed conversion" in r.getMessage() for r in caplog.records)
    assert hidden(tmp_path, "dst") == []
    assert json.loads((dst / "config.json").read_text())["model_type"] == "visor"


def test_source_config_without_text_config_is_refused_before_loading(src, tmp_path, monkeypatch):
    never_load(monkeypatch)
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    config = json.loads((bad / "config.json").read_text())
    del config["text_config"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="has no text_config"):
        convert(bad, tmp_path / "dst")
    # a config describing far more weights than the files hold (a text model 16 times wider)
    config = json.loads((src / "config.json").read_text())
    config["text_config"].update(hidden_size=512, intermediate_size=1024)
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match="describes a model of .* weights but its safetensors files hold"):
        convert(bad, tmp_path / "dst")
    assert not (tmp_path / "dst").exists() and hidden(tmp_path, "dst") == []


def test_bad_arguments_and_os_errors_are_one_line_before_loading(src, tmp_path, monkeypatch, capsys):
    never_load(monkeypatch)
    assert cli_main(["convert", str(src), str(tmp_path / "dst"), "--max-shard-size", "lots"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max shard size 'lots'" in err
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    assert cli_main(["convert", str(src), str(blocker / "dst")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a file, not a folder" in err


def test_disk_full_is_one_line(src, tmp_path, monkeypatch, capsys):
    # too little free space for the weights on disk: refused before loading
    usage = shutil.disk_usage(tmp_path)
    with monkeypatch.context() as patch:
        never_load(patch)
        patch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
        assert cli_main(["convert", str(src), str(tmp_path / "dst")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "free on" in err and "needs about" in err

    # the disk fills up while writing: one line too (after the progress bars), and nothing is left behind
    def full(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(VisorForConditionalGeneration, "save_pretrained", full)
    assert cli_main(["convert", str(src), str(tmp_path / "dst")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.splitlines()[-1] == "visor-hf convert: error: [Errno 28] No space left on device"
    assert sorted(p.name for p in tmp_path.iterdir()) == []

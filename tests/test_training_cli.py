"""The training command line: every command's --help, and the real-scale example script only uses options that the
commands accept (the script itself needs GPUs and LLaVA-OV 0.5B; a CPU dry run is described in docs/training.md)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from visor_hf.cli import build_parser, main

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_llava_ov_0.5b.sh"
COMMANDS = ["train", "search", "label", "train-router", "evaluate"]


@pytest.mark.parametrize("command", COMMANDS)
def test_help_of_every_training_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"usage: visor-hf {command}") and "--model" in text and "--data" in text


def _subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return action.choices


def test_example_script_uses_only_existing_options():
    text = SCRIPT.read_text()
    if shutil.which("bash"):
        assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    joined = re.sub(r"\\\n\s*", " ", text)
    common = re.search(r"COMMON=\((.*?)\)\n", joined, re.S).group(1)
    subparsers = _subparsers()
    used = {}
    for line in joined.splitlines():
        match = re.search(r"(?:\$LAUNCH|visor-hf) (convert|train-router|train|search|label|evaluate)\b(.*)", line)
        if match:
            options = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", match.group(2)))
            if '"${COMMON[@]}"' in match.group(2):
                options |= set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", common))
            used.setdefault(match.group(1), set()).update(options)
    assert set(used) == {"convert", "train", "search", "label", "train-router", "evaluate"}
    for command, options in used.items():
        known = {o for action in subparsers[command]._actions for o in action.option_strings}
        assert options <= known, (command, sorted(options - known))
    # the paper's two stages and the rest of the recipe are all there
    for stage in ("--stage 1", "--stage 2", "--stage universal"):
        assert stage in joined
    assert "llava-onevision-qwen2-0.5b-ov-hf" in joined

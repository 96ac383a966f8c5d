"""A tiny VISOR checkpoint with synthetic training records, and the weights of a written checkpoint: shared by the
training tests."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from visor_hf.conversion import convert
from visor_hf.testing import save_tiny_llava
from visor_hf.training import make_synthetic_dataset


def weights(folder) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(path)))
    return out


def make_training_workdir(root: Path) -> Path:
    """`root/visor` (CA 0, 3; SA 2, 4; configurations [], [2], [2, 4]; router layer 1), `root/data/data.jsonl`
    (8 records), `root/mixed.json` (one record with an image, one without) and `root/text_only.json`."""
    save_tiny_llava(root / "llava")
    convert(root / "llava", root / "visor")
    data = make_synthetic_dataset(root / "data", num_samples=8, seed=0)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    for r in records:
        if "image" in r:
            r["image"] = str(root / "data" / r["image"])  # absolute: the files below live in another folder
    (root / "mixed.json").write_text(json.dumps([next(r for r in records if "image" in r), next(r for r in records if "image" not in r)]))
    (root / "text_only.json").write_text(json.dumps([r for r in records if "image" not in r]))
    return root


def run_script(source: str, folder: Path, *args, processes: int = 0, timeout: int = 300) -> None:
    """Run `source` as a script (one CPU thread, offline), under `torchrun` with `processes` ranks (gloo) when given;
    fails on an error or when the timeout (a hang) is reached."""
    import os
    import socket
    import subprocess
    import sys

    script = Path(folder) / "script.py"
    script.write_text(source)
    command = [sys.executable, str(script), *map(str, args)]
    if processes:
        with socket.socket() as probe:  # a free port for the rendezvous
            probe.bind(("127.0.0.1", 0))
            port = str(probe.getsockname()[1])
        command[1:1] = ["-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--master_port", port]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]

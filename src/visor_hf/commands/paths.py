"""Checks of the paths a command reads, before anything is loaded: a missing path is one clear line, not the
traceback of a loader deep inside transformers or datasets."""

from __future__ import annotations

from pathlib import Path

from ..hub_ids import looks_like_hub_id


def check_model_path(value: str, what: str = "--model") -> None:
    """A checkpoint folder with a config.json, or a Hub id."""
    path = Path(value).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{what} {value} has no config.json: not a checkpoint folder")
        return
    if path.exists():
        raise NotADirectoryError(f"{what} {value} is a file; give the checkpoint folder")
    if not looks_like_hub_id(value):
        raise FileNotFoundError(f"{what} {value}: no such checkpoint folder")


def check_data_path(value: str | None, what: str = "--data") -> None:
    """A .json/.jsonl file, a folder (saved `datasets` dataset or data files), or a Hub dataset id."""
    if value is None:
        return
    path = Path(value).expanduser()
    if not path.exists() and not looks_like_hub_id(value):
        raise FileNotFoundError(f"{what} {value}: no such file or folder (nor a Hub dataset id 'owner/name')")

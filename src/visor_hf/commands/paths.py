"""What the commands that score a checkpoint on records share: their common options, and checks of the paths they
read before anything is loaded (a missing path is one clear line, not the traceback of a loader deep inside
transformers or datasets)."""

from __future__ import annotations

import argparse
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


def add_scoring_arguments(parser: argparse.ArgumentParser, limit_help: str = "use the first N records") -> None:
    """The options of every command that runs a checkpoint over records (`evaluate`, `label`, `search`)."""
    parser.add_argument("--batch-size", type=int, default=8, help="samples per forward pass")
    parser.add_argument("--limit", type=int, default=None, help=limit_help)
    parser.add_argument("--image-root", default=None, help="folder of the relative image paths (default: the data file's folder)")
    parser.add_argument("--dtype", default=None, help="load the weights in this dtype (float32, bfloat16, ...)")
    parser.add_argument("--attn-implementation", default=None, help="eager or sdpa")
    parser.add_argument("--packing", type=int, choices=[1, 2, 4], default=1,
                        help="token packing factor of the images (needs a checkpoint with the packing module; default 1)")


def scoring_options(args: argparse.Namespace) -> dict:
    """Check `--model` and `--data`, then the keyword arguments that `add_scoring_arguments` gave."""
    check_model_path(args.model)
    check_data_path(args.data)
    return {
        "batch_size": args.batch_size, "limit": args.limit, "image_root": args.image_root, "dtype": args.dtype,
        "attn_implementation": args.attn_implementation, "packing": args.packing,
    }

"""Telling a Hub id from a local path (a light module: the command line imports it before anything heavy)."""

from __future__ import annotations

import re
from pathlib import Path


def looks_like_hub_id(value: str) -> bool:
    """`owner/name` that is not an existing local path: an id that transformers / datasets may resolve on the Hub."""
    return (
        bool(re.fullmatch(r"[\w.-]+/[\w.-]+", value))
        and ".." not in value
        and not value.endswith((".json", ".jsonl"))
        and not Path(value).expanduser().exists()
    )

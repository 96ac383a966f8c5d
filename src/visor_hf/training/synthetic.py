"""A tiny synthetic conversation dataset (solid-colour pictures and questions in the tiny test vocabulary).

Used by the tests and the worked example: `make_synthetic_dataset(folder)` writes PNG pictures and a LLaVA-style
`data.jsonl` whose words all belong to `visor_hf.testing.VOCAB`, so the tiny word-level tokenizer reads them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 40), "white": (245, 245, 245), "black": (10, 10, 10)}
NUMBERS = ["zero", "one", "two", "three", "four"]


def make_synthetic_dataset(folder, num_samples: int = 16, seed: int = 0, image_size: tuple[int, int] = (16, 16), filename: str = "data.jsonl") -> Path:
    """Write `num_samples` records to `folder/filename` (pictures in `folder/images/`); returns the file path.

    Record kinds, in rotation: a colour question about one picture; a two-turn conversation about one picture; a
    text-only question. Answers are single words (the colour; the number of pictures; "yes"/"no").
    """
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    records = []
    for i in range(num_samples):
        colour = names[int(rng.integers(len(names)))]
        pixels = np.clip(np.array(COLOURS[colour])[None, None] + rng.integers(-20, 21, size=(*image_size, 3)), 0, 255).astype(np.uint8)
        image = f"images/{i:05d}.png"
        Image.fromarray(pixels).save(folder / image)
        kind = i % 4
        if kind in (0, 1):
            records.append({"id": i, "image": image, "conversations": [
                {"from": "human", "value": "<image>\nwhat is the colour of the background ?"},
                {"from": "gpt", "value": colour},
            ]})
        elif kind == 2:
            other = names[int(rng.integers(len(names)))]
            records.append({"id": i, "image": image, "conversations": [
                {"from": "human", "value": f"<image>\nis the background {other} ?"},
                {"from": "gpt", "value": "yes" if other == colour else "no"},
                {"from": "human", "value": "what is the colour of the background ?"},
                {"from": "gpt", "value": colour},
            ]})
        else:
            count = int(rng.integers(len(NUMBERS)))
            records.append({"id": i, "conversations": [
                {"from": "human", "value": f"how many are there in {NUMBERS[count]} ?"},
                {"from": "gpt", "value": NUMBERS[count]},
            ]})
    path = folder / filename
    with open(path, "w") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")
    return path


__all__ = ["make_synthetic_dataset"]

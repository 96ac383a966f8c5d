"""Training-free visual token reduction (VisionZip) on a toy checkpoint: the rows of docs/toy.md, written to its
`results.json`.

    HF_HUB_OFFLINE=1 python examples/toy/token_reduction_rows.py [--model DIR] [--write]

Runs `visor-hf toy`'s own path (`visor_hf.toy.inference.answer_examples`: greedy `generate`, router) on the fresh
pictures of `visor-hf toy --images 40 --seed 123`, with no reduction and with each `--specs` reduction, and prints
the table; `--write` stores it as `token_reduction` in the checkpoint's `results.json` (what
`tests/test_toy.py` checks docs/toy.md against). About 1 minute on one thread.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import dump  # noqa: E402

from visor_hf.toy.inference import DEFAULT_CHECKPOINT, answer_examples, fresh_examples, load_toy  # noqa: E402

SPECS = (
    "visionzip:0.5",
    "visionzip:0.25",
    "visionzip:0.125",
    "visionzip:0.5:keep-newlines",
    "visionzip:0.25:keep-newlines",
)
FULL_TOKENS = 88  # every visual token of a toy picture


def row(answers, tokens: int) -> dict:
    """Accuracy per difficulty and overall, mean SA layers per difficulty, FLOPs against dense LLaVA-OV."""
    out = {"visual_tokens": tokens, "accuracy": {}, "mean_sa_layers": {}}
    for difficulty in ("easy", "hard"):
        part = [a for a in answers if a.example.question.difficulty == difficulty]
        out["accuracy"][difficulty] = sum(a.correct for a in part) / len(part)
        out["mean_sa_layers"][difficulty] = sum(len(a.sa_layers) for a in part) / len(part)
    out["accuracy"]["all"] = sum(a.correct for a in answers) / len(answers)
    out["flops_ratio"] = sum(a.prefill_flops for a in answers) / sum(a.dense_prefill_flops for a in answers)
    return out


def markdown(rows: dict) -> str:
    lines = [
        "| reduction | visual tokens in the LLM | easy | hard | all | mean SA layers easy / hard | FLOPs vs dense | saving |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for spec, r in rows.items():
        name = spec if spec == "none" else f"`{spec}`"
        a, layers = r["accuracy"], r["mean_sa_layers"]
        lines.append(
            f"| {name} | {r['visual_tokens']} | {a['easy']:.3f} | {a['hard']:.3f} | {a['all']:.3f} | "
            f"{layers['easy']:.2f} / {layers['hard']:.2f} | {r['flops_ratio']:.3f} | {1 / r['flops_ratio']:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def kept_tokens(spec: str) -> int:
    amount = spec.split(":")[1]
    return round(FULL_TOKENS * float(amount)) if "." in amount else int(amount)


def reduction_rows(model, processor, seed: int = 123, images: int = 40, specs=SPECS) -> dict:
    examples = fresh_examples(seed, images)
    rows = {"none": row(answer_examples(model, processor, examples), FULL_TOKENS)}
    for spec in specs:
        rows[spec] = row(answer_examples(model, processor, examples, token_reduction=spec), kept_tokens(spec))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--images", type=int, default=40)
    parser.add_argument("--write", action="store_true", help="store the rows in the checkpoint's results.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, processor = load_toy(args.model)
    rows = reduction_rows(model, processor, args.seed, args.images)
    print(markdown(rows))
    if args.write:
        path = Path(args.model) / "results.json"
        results = json.loads(path.read_text())
        results["token_reduction"] = {"seed": args.seed, "images": args.images, "rows": rows}
        dump(path, results)


if __name__ == "__main__":
    main()

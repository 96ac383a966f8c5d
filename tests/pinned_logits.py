"""Logits pinned before the engine refactor: the shipped toy and a tiny converted model, on fixed inputs.

`python tests/pinned_logits.py --write` records them in `tests/data/pinned_logits.json`;
`python tests/pinned_logits.py --check [--exact]` compares the current code against the file (`--exact`: bit for
bit). The test suite runs the same comparison (`test_pinned_logits.py`) with a tolerance of a few float ULPs.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

PINNED = Path(__file__).resolve().parent / "data" / "pinned_logits.json"
LAST_POSITIONS = 3  # text positions pinned at the end of every row


def _toy_cases() -> dict[str, dict]:
    from visor_hf.toy.inference import fresh_examples, load_toy, prompt

    model, processor = load_toy(attn_implementation="sdpa")
    examples = fresh_examples(seed=123, num_images=1)[:4]
    texts = [prompt(processor, e.question.text) for e in examples]
    inputs = processor(images=[e.image for e in examples], text=texts, return_tensors="pt", padding=True)
    requests = {"auto": "auto", "max": "max", "ca_only": [], "index_1": 1, "mixed": [[], "auto", "max", [1]]}
    return _cases(model, inputs, requests)


def _tiny_cases() -> dict[str, dict]:
    from samples import ROUTED_ANYRES, ROUTED_ONE_IMAGE, ROUTED_TEXT_ONLY, ROUTED_TWO_IMAGES
    from visor_hf.testing import build_batch, tiny_visor

    cases = {}
    for implementation in ("eager", "sdpa"):
        model = tiny_visor(seed=0, attn_implementation=implementation)
        inputs = build_batch(model, [ROUTED_ONE_IMAGE, ROUTED_TWO_IMAGES, ROUTED_TEXT_ONLY, ROUTED_ANYRES])
        requests = {"auto": "auto", "max": "max", "ca_only": [], "mixed": [[0], "max", "auto", [0, 3]]}
        cases.update({f"{implementation}_{k}": v for k, v in _cases(model, inputs, requests).items()})
    return cases


@torch.no_grad()
def _cases(model, inputs: dict, requests: dict) -> dict[str, dict]:
    """Per request: the last prefill logits of every row, the configurations, and one cached decode step. Recorded
    with masked batching (a mixed request's grouped prefill agrees within float rounding, not bit for bit)."""
    out = {}
    for name, request in requests.items():
        prefill = model(**inputs, visor_configuration=request, use_cache=True, visor_batching="masked")
        next_ids = prefill.logits[:, -1].argmax(-1, keepdim=True)
        mask = torch.cat([inputs["attention_mask"], torch.ones_like(next_ids)], dim=1)
        step = model(input_ids=next_ids, attention_mask=mask, past_key_values=prefill.past_key_values)
        out[name] = {
            "configurations": [list(c) for c in prefill.visor_configurations],
            "prefill": prefill.logits[:, -LAST_POSITIONS:].tolist(),
            "decode": step.logits[:, -1].tolist(),
        }
    return out


def compute() -> dict[str, dict]:
    torch.manual_seed(0)
    return {"toy": _toy_cases(), "tiny": _tiny_cases()}


def compare(expected: dict, actual: dict, atol: float) -> list[str]:
    problems = []
    for model_name, cases in expected.items():
        for case, want in cases.items():
            got = actual[model_name][case]
            if got["configurations"] != want["configurations"]:
                problems.append(f"{model_name}/{case}: configurations {got['configurations']} != {want['configurations']}")
            for key in ("prefill", "decode"):
                diff = (torch.tensor(got[key]) - torch.tensor(want[key])).abs().max().item()
                if diff > atol:
                    problems.append(f"{model_name}/{case}: {key} logits differ by {diff:.3g} (> {atol})")
    return problems


def main() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="record the current logits")
    parser.add_argument("--check", action="store_true", help="compare the current logits with the recorded ones")
    parser.add_argument("--exact", action="store_true", help="with --check: bit for bit")
    args = parser.parse_args()
    actual = compute()
    if args.write:
        PINNED.parent.mkdir(parents=True, exist_ok=True)
        PINNED.write_text(json.dumps(actual))
        print(f"wrote {PINNED}")
    if args.check:
        problems = compare(json.loads(PINNED.read_text()), actual, atol=0.0 if args.exact else 1e-6)
        print("\n".join(problems) or "pinned logits match" + (" bit for bit" if args.exact else ""))
        raise SystemExit(1 if problems else 0)


if __name__ == "__main__":
    main()

"""How the toy finds a cell: by the 1-D distance between the question and the grid tokens (RoPE), not by content.

    HF_HUB_OFFLINE=1 python examples/toy/cell_lookup_positions.py [--model DIR] [--images 100]

On the cell questions of the held-out set (`eval_set(2, N)`), at packing 1 and one configuration (default `[3, 6, 7]`,
the one the router picks for cell questions), the greedy first answer token's accuracy when:

- nothing changes;
- every base-view token (16), or every anyres-grid token (72, newlines included), is replaced by the mean of its
  group (the group's content and position-in-content removed, its 1-D positions kept);
- the positions of the tokens after the image are shifted by +5 or +20, or every position up to the end of the
  image by -10 (the distance between the question and the picture changes, the tokens do not).

Token packing changes exactly that distance (a packed row is shorter), which is why cell lookup is the one kind of
question that packing breaks until training teaches the packed layouts (docs/toy.md, "Token packing").
"""

from __future__ import annotations

import argparse

import torch

from visor_hf.toy.data import eval_set
from visor_hf.toy.inference import DEFAULT_CHECKPOINT, load_toy
from visor_hf.toy.model import IMAGE_ID, encode_batch

BASE_TOKENS = 16  # the toy's base view: 4 x 4


def accuracy(model, inputs, answers, configuration, position_ids=None) -> float:
    with torch.no_grad():
        out = model(**inputs, position_ids=position_ids, visor_configuration=configuration, logits_to_keep=1)
    return float((out.logits[:, -1].argmax(-1) == answers).float().mean())


def mean_over(features: torch.Tensor, first: int, last: int | None) -> torch.Tensor:
    """One image's `[N, d]` features with the tokens `first:last` replaced by their mean."""
    features = features.clone()
    features[first:last] = features[first:last].mean(0, keepdim=True)
    return features


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--images", type=int, default=100, help="held-out pictures (one cell question each)")
    parser.add_argument("--configuration", default="3,6,7", help="SA layers of the configuration run")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, _ = load_toy(args.model)
    configuration = [int(i) for i in args.configuration.split(",") if i]
    examples = [e for e in eval_set(2, args.images) if e.question.kind == "cell"]
    batch = encode_batch(examples, model.config.routing_token_id)
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")}
    answers = batch["answers"]
    rows = {"unchanged": accuracy(model, inputs, answers, configuration)}

    features = model.model.get_image_features
    for name, (first, last) in (
        ("base view tokens -> their mean", (0, BASE_TOKENS)),
        ("grid tokens -> their mean", (BASE_TOKENS, None)),
    ):

        def averaged(*a, first=first, last=last, **k):
            out = features(*a, **k)
            out.pooler_output = [mean_over(f, first, last) for f in out.pooler_output]
            return out

        model.model.get_image_features = averaged
        rows[name] = accuracy(model, inputs, answers, configuration)
        model.model.get_image_features = features

    positions = (inputs["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    image = inputs["input_ids"] == IMAGE_ID
    after = (image.long().cumsum(-1) == image.sum(-1, keepdim=True)) & ~image  # the tokens after the picture
    for shift in (5, 20):
        rows[f"positions after the image +{shift}"] = accuracy(model, inputs, answers, configuration, positions + shift * after)
    rows["positions up to the image's end -10"] = accuracy(
        model, inputs, answers, configuration, positions - 10 * (~after).long()
    )
    print(f"{len(examples)} cell questions, configuration {configuration}, {args.model}")
    for name, value in rows.items():
        print(f"| {name} | {value:.3f} |")


if __name__ == "__main__":
    main()

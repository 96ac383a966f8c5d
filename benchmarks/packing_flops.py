"""Analytical LLM prefill FLOPs of VISOR-TR (token packing 2x / 4x) at LLaVA-OV 0.5B shapes, against dense LLaVA-OV
on every visual token: how the savings of sparse vision-language layers and of fewer visual tokens multiply.

Nothing runs a model: the counts are `visor_hf.modeling.flops_visor.prefill_flops` (what is counted:
docs/benchmarks.md, "What the FLOPs count") on the token counts that `packing_visor.image_token_layouts` gives for an
image of the given size (SigLIP-384, 27 x 27 tokens per crop, LLaVA-OV's anyres grid pinpoints up to 6 x 6 crops,
`anyres_max_9`), plus 64 text tokens. The packing module's own FLOPs (`packing_flops`) are listed apart, as the
projector's would be.

    python benchmarks/packing_flops.py                     # markdown table on stdout
    python benchmarks/packing_flops.py --size 384 384 --text 32
"""

from __future__ import annotations

import argparse
from types import SimpleNamespace

from visor_hf.conversion.convert import default_configurations
from visor_hf.modeling import uniform_layer_layout
from visor_hf.modeling.flops_visor import FlopsShape, packing_flops, prefill_flops
from visor_hf.modeling.packing_visor import image_token_layouts

# Qwen2-0.5B, the LLM of LLaVA-OV 0.5B
SHAPE = FlopsShape(
    num_layers=24, hidden_size=896, intermediate_size=4864, num_heads=14, num_kv_heads=2, head_dim=64, vocab_size=151936
)
PINPOINTS = [[384 * i, 384 * j] for i in range(1, 7) for j in range(1, 7)]
LLAVA_OV = SimpleNamespace(
    vision_config=SimpleNamespace(image_size=384, patch_size=14),
    image_grid_pinpoints=PINPOINTS,
    vision_aspect_ratio="anyres_max_9",
)


def rows(height: int, width: int, n_text: int) -> list[dict]:
    (layout,) = image_token_layouts(LLAVA_OV, [(height, width)])
    cross, selfs = uniform_layer_layout(SHAPE.num_layers)
    dense = prefill_flops(SHAPE, n_text, layout.num_tokens(1))
    out = [
        {
            "method": "LLaVA-OV (dense)",
            "packing": 1,
            "sa_layers": "all 24 (dense)",
            "visual_tokens": layout.num_tokens(1),
            "flops": dense,
            "packing_flops": 0,
        }
    ]
    for factor in (1, 2, 4):
        visual = layout.num_tokens(factor)
        for layers in default_configurations(selfs):
            out.append(
                {
                    "method": "VISOR" if factor == 1 else f"VISOR-TR {factor}x",
                    "packing": factor,
                    "sa_layers": str(layers),
                    "visual_tokens": visual,
                    "flops": prefill_flops(SHAPE, n_text, visual, layers, cross),
                    "packing_flops": packing_flops(SHAPE.hidden_size, factor, visual),
                }
            )
    for row in out:
        row["saving"] = dense / row["flops"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--size", type=int, nargs=2, default=(768, 1024), metavar=("HEIGHT", "WIDTH"), help="image size in pixels"
    )
    parser.add_argument("--text", type=int, default=64, help="text tokens of the prompt")
    args = parser.parse_args()
    print(
        f"LLaVA-OV 0.5B shapes, one {args.size[0]}x{args.size[1]} image, {args.text} text tokens; LLM prefill FLOPs (LM head on one token)\n"
    )
    print("| method | SA layers | visual tokens | prefill GFLOPs | saving vs dense | packing module GFLOPs |")
    print("|---|---|---|---|---|---|")
    for r in rows(*args.size, args.text):
        print(
            f"| {r['method']} | {r['sa_layers']} | {r['visual_tokens']} | {r['flops'] / 1e9:.1f} | {r['saving']:.1f}x | "
            f"{r['packing_flops'] / 1e9:.2f} |"
        )


if __name__ == "__main__":
    main()

"""`visor-hf convert SRC DST`: LLaVA-OneVision checkpoint → VISOR checkpoint folder (see docs/conversion.md)."""

from __future__ import annotations

import argparse
import json
import sys

from ..modeling.requests_visor import parse_configuration_list, parse_layers
from . import argument_type


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert a LLaVA-OneVision checkpoint (folder or Hub id) into a VISOR checkpoint folder",
        description="Convert a LLaVA-OneVision checkpoint (transformers layout; local folder or Hub id) into a VISOR "
        "checkpoint folder with sharded safetensors, tokenizer and processor with the routing token, chat template, "
        "model card and remote code. Defaults follow the paper: |CA| = |SA| = L/3 spread uniformly.",
    )
    parser.add_argument("src", help="LLaVA-OneVision checkpoint: a local folder or a Hub id (cached ids work offline)")
    parser.add_argument("dst", help="output folder (refused if it exists, unless --overwrite)")
    parser.add_argument("--dense", action="store_true", help="all-SA layout, no CA layer, no router (reproduces LLaVA-OV)")
    parser.add_argument("--ca-layers", type=argument_type(parse_layers), default=None, help="cross-attention layers, e.g. '0,3,6'")
    parser.add_argument("--sa-layers", type=argument_type(parse_layers), default=None, help="switchable self-attention layers, e.g. '2,4'")
    parser.add_argument(
        "--configurations", type=argument_type(parse_configuration_list), default=None,
        help="viable SA subsets: JSON '[[], [2], [2, 4]]' or '; 2; 2,4' (empty item = CA only)",
    )
    parser.add_argument("--router-layer", type=int, default=None, help="layer whose output the router reads")
    parser.add_argument("--routing-token", default=None, help="routing token to add to the tokenizer (default <route>)")
    parser.add_argument(
        "--routing-token-init", default="keep", choices=["keep", "mean"],
        help="a spare embedding row taken by the routing token: keep its values (default: no tensor changes) or set "
        "it to the mean of the tokenizer's rows (a new row always starts at the mean)",
    )
    parser.add_argument(
        "--packing", action=argparse.BooleanOptionalAction, default=None,
        help="add the VISOR-TR token packing module for 2x and 4x, average-initialised (default: yes, except with "
        "--dense, whose output holds exactly the source's tensors); --no-packing leaves it out",
    )
    parser.add_argument("--dtype", default=None, choices=["float32", "float16", "bfloat16"], help="cast weights (default: keep)")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    parser.add_argument("--revision", default=None, help="Hub revision of SRC")
    parser.add_argument(
        "--overwrite", action="store_true",
        help="replace an existing DST that holds a VISOR or LLaVA-OneVision checkpoint (anything else is refused)",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..conversion import ConversionError, convert
    from ..modeling.processing_visor import DEFAULT_ROUTING_TOKEN

    try:
        out = convert(
            args.src,
            args.dst,
            cross_attention_layers=args.ca_layers,
            self_attention_layers=args.sa_layers,
            configurations=args.configurations,
            router_layer=args.router_layer,
            dense=args.dense,
            dtype=args.dtype,
            max_shard_size=args.max_shard_size,
            overwrite=args.overwrite,
            routing_token=args.routing_token or DEFAULT_ROUTING_TOKEN,
            routing_token_init=args.routing_token_init,
            revision=args.revision,
            packing=args.packing,
        )
    except (ConversionError, OSError) as error:  # OSError: FileExistsError, no space left, permission, ...
        print(f"visor-hf convert: error: {error}", file=sys.stderr)
        return 2
    config = json.loads((out / "config.json").read_text())
    print(f"wrote {out}")
    print(f"  cross-attention layers: {config['cross_attention_layers']}")
    print(f"  self-attention layers:  {config['self_attention_layers']}")
    print(f"  configurations:         {config['configurations']}")
    print(f"  router layer:           {config['router_layer']}  (routing token id {config['routing_token_id']})")
    print(f"  token packing factors:  {config.get('packing_factors') or 'none'}")
    return 0

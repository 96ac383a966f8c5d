"""`visor-hf lmms-tasks`: the folder of VISOR's lmms-eval tasks, for `lmms_eval --include_path`."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "lmms-tasks",
        help="print the folder of VISOR's lmms-eval tasks (visor_toy), for lmms_eval --include_path",
        description="Print the folder holding VISOR's lmms-eval task definitions (the visor_toy group with its "
        'visor_toy_easy and visor_toy_hard tasks), e.g. python -m lmms_eval ... --include_path "$(visor-hf lmms-tasks)".',
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..lmms import TASKS_DIR

    print(TASKS_DIR)
    return 0

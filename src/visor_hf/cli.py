"""The `visor-hf` command line: one subcommand per job (`demo`, `convert`, `verify`, ...)."""

from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .commands import analyze, convert, demo, label, lmms_tasks, search, toy, train, train_router, verify
from .commands import evaluate as evaluate_command

# Each command module exposes `add_parser(subparsers)`, which registers its subcommand with `func=run`.
COMMANDS = [demo, convert, verify, train, search, label, train_router, evaluate_command, toy, lmms_tasks, analyze]


def build_parser() -> argparse.ArgumentParser:
    import transformers

    parser = argparse.ArgumentParser(prog="visor-hf", description="VISOR (VISion On Request) for Hugging Face Transformers")
    parser.add_argument(
        "--version", action="version", version=f"visor-hf {__version__} (transformers {transformers.__version__})",
        help="print the version of visor-hf and of the transformers it runs on",
    )
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (OSError, ValueError) as error:
        # bad input (a missing path, an unreadable record, a refused value): one line, as argparse reports its own
        # errors; VISOR_HF_TRACEBACK=1 shows the traceback
        if os.environ.get("VISOR_HF_TRACEBACK"):
            raise
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"visor-hf {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

"""The `visor-hf` command line: one subcommand per job (`demo`, `convert`, `verify`, ...)."""

from __future__ import annotations

import argparse
import sys

from .commands import analyze, convert, demo, label, lmms_tasks, search, toy, train, train_router, verify
from .commands import evaluate as evaluate_command

# Each command module exposes `add_parser(subparsers)`, which registers its subcommand with `func=run`.
COMMANDS = [demo, convert, verify, train, search, label, train_router, evaluate_command, toy, lmms_tasks, analyze]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="visor-hf", description="VISOR (VISion On Request) for Hugging Face Transformers")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())

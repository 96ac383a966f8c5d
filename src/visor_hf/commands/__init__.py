"""Subcommands of the `visor-hf` console script."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def argument_type(parse: Callable[[str], object]) -> Callable[[str], object]:
    """`parse` as an argparse `type=`: its `ValueError` message reaches the user (argparse would print only
    "invalid value" for a plain `ValueError`)."""

    def wrapped(text: str):
        try:
            return parse(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error)) from error

    wrapped.__name__ = parse.__name__
    return wrapped

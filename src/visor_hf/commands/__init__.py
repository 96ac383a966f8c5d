"""Subcommands of the `visor-hf` console script."""

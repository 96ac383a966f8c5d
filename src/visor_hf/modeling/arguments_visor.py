"""Checks of the arguments of VISOR's forward pass that would otherwise be ignored or misread silently."""

from __future__ import annotations

import difflib
import inspect
import numbers

import torch
from transformers.utils.generic import TransformersKwargs

# keyword arguments that transformers (generation, the Trainer, attention backends) passes through `**kwargs`
PASSTHROUGH_KWARGS = frozenset(TransformersKwargs.__annotations__) | {"return_dict", "cache_position", "mm_encoder_outputs"}


def check_forward_kwargs(forward, kwargs: dict) -> None:
    """Refuse a keyword argument of `forward`'s `**kwargs` that is a misspelling of a real argument (or an unknown
    `visor_*` one): `**kwargs` goes on to the attention functions, which would ignore it."""
    known = set(inspect.signature(forward).parameters) - {"self", "kwargs"}
    for name in kwargs:
        if name in known or name in PASSTHROUGH_KWARGS:
            continue
        close = difflib.get_close_matches(name, sorted(known | PASSTHROUGH_KWARGS), n=1, cutoff=0.8)
        if close or name.startswith("visor_"):
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise TypeError(f"{type(forward.__self__).__name__}.forward() got an unexpected keyword argument {name!r}{hint}")


def check_visor_budget(budget) -> None:
    """A compute budget is a fraction of the dense FLOPs (one number, or one per sample), never a bool."""
    values = budget.flatten().tolist() if isinstance(budget, torch.Tensor) else budget
    values = list(values) if isinstance(values, (list, tuple)) else [values]
    if isinstance(budget, torch.Tensor) and budget.dtype == torch.bool:
        values = [True]
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, numbers.Real)]
    if bad:
        raise ValueError(f"visor_budget must be a fraction of the dense FLOPs (a float, or one per sample), got {bad[0]!r}")

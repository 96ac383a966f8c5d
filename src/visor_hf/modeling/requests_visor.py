"""What `visor_configuration=` takes, and the one parser of configuration strings (command lines, evaluation).

A *request* names the SA layers that run for each sample: an index into `config.configurations`, an explicit
list of SA layers, `"max"` (every SA layer) or `"auto"` (the router decides), for the whole batch or one entry per
sample. `resolve_configuration_request` turns it into one entry per sample and refuses what the model cannot run.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Sequence

import torch

AUTO = "auto"
MAX = "max"
# what `visor_configuration=` takes: an index, a list of SA layers, "max"/"auto", or one entry per sample
ConfigurationRequest = int | str | Sequence[int | str | Sequence[int] | torch.Tensor] | torch.Tensor | None


def resolve_configuration_request(config, value: ConfigurationRequest, batch_size: int, has_router: bool) -> list[tuple[int, ...] | str]:
    """Turn `visor_configuration=` into one entry per sample: a tuple of SA layers, or "auto" (ask the router).

    - `None`: "auto" when the model has a router, else the default configuration;
    - `int`: index into `config.configurations`; a list of ints: an explicit set of SA layers; `"max"`: all of them;
    - per sample: a 1-D integer tensor of configuration indices, or a list (one entry per sample) whose entries
      are lists, ints or strings. A plain list of ints is never per-sample.
    """
    if value is None:
        value = AUTO
    if isinstance(value, torch.Tensor) and value.dim() == 0:
        value = value.item()  # a 0-d tensor is one index for every sample
    if isinstance(value, torch.Tensor):
        if value.dim() != 1 or value.dtype in (torch.bool,) or value.is_floating_point():
            raise ValueError(f"a visor_configuration tensor must be a 1-D integer tensor of configuration indices, got {tuple(value.shape)} {value.dtype}")
        per_sample = value.tolist()
    elif is_per_sample(value):
        per_sample = list(value)
    else:
        return [resolve_configuration(config, value, has_router)] * batch_size
    if len(per_sample) != batch_size:
        raise ValueError(f"visor_configuration has {len(per_sample)} per-sample entries for a batch of {batch_size}")
    return [resolve_configuration(config, v, has_router) for v in per_sample]


def is_per_sample(value) -> bool:
    """A list holding lists, strings or tensors is one entry per sample (a plain list of ints is one layer set)."""
    return isinstance(value, (list, tuple)) and any(isinstance(v, (list, tuple, str, torch.Tensor)) for v in value)


def resolve_configuration(config, value, has_router: bool) -> tuple[int, ...] | str:
    """One sample's request as a tuple of SA layers, or "auto" (only when `has_router`)."""
    if isinstance(value, torch.Tensor):
        value = value.tolist()
    if isinstance(value, str):
        if value == AUTO:
            return AUTO if has_router else tuple(config.default_layers())
        if value == MAX:
            return tuple(config.self_attention_layers)
        raise ValueError(f"unknown visor_configuration {value!r}: use 'auto', 'max', an index or a list of SA layers")
    if isinstance(value, bool):
        raise TypeError("visor_configuration must not be a bool")
    if isinstance(value, numbers.Integral):
        value = int(value)  # numpy integers too
    if isinstance(value, int):
        count = len(config.configurations)
        if not 0 <= value < count:
            raise ValueError(
                f"unknown configuration index {value}: configuration index {value} is out of range, the model has "
                f"{count} configurations {config.configurations} (0..{count - 1})"
            )
        return tuple(config.configurations[value])
    if isinstance(value, (list, tuple)):
        if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in value):
            raise TypeError(f"a configuration given as a list must hold SA-layer indices (ints), got {value!r}")
        value = [int(v) for v in value]
        extra = sorted(set(value) - set(config.self_attention_layers))
        if extra:
            raise ValueError(f"layers {extra} are not SA layers of the model (self_attention_layers = {config.self_attention_layers})")
        return tuple(sorted(set(value)))
    raise TypeError(f"unsupported visor_configuration {value!r}")


def check_configuration(config, value) -> None:
    """Raise `ValueError` unless a model with `config` can run the request `value` as given (in particular "auto"
    needs a router: a command that asks for it explicitly is refused, not silently given the default)."""
    if value == AUTO and config.router_layer is None:
        raise ValueError("the model has no router: use a configuration index, 'max' or a list of SA layers")
    try:
        resolve_configuration(config, value, has_router=config.router_layer is not None)
    except TypeError as error:
        raise ValueError(str(error)) from error


# ----------------------------------------------------------------------------------------------------------------
# Configuration strings (command lines, evaluation records)


def parse_layers(text: str) -> list[int]:
    """`"0,3,6"`, `"0 3 6"`, `"[0, 3]"` or `""`/`"[]"` (none) → list of layer indices."""
    items = [t for t in text.strip().strip("[]()").replace(",", " ").split() if t]
    try:
        return [int(t) for t in items]
    except ValueError as error:
        raise ValueError(f"a layer list must hold integers, got {text!r}") from error


def parse_configuration(text: str | None) -> str | int | list[int]:
    """A configuration string: `auto`, `max`, a configuration index (`2`) or an explicit list of SA layers (`1,6`,
    `[1, 6]`, `[]`). `None` is `auto`. Whether the model can run it is `check_configuration`'s job."""
    if text is None:
        return AUTO
    text = text.strip()
    if text in (AUTO, MAX):
        return text
    if text.startswith(("[", "(")) or "," in text:
        return parse_layers(text)
    try:
        return int(text)
    except ValueError as error:
        raise ValueError(
            f"--configuration must be 'auto', 'max', a configuration index or a list of SA layers like '1,6' or '[]', "
            f"got {text!r}"
        ) from error


def parse_configuration_list(text: str) -> list[list[int]]:
    """A list of layer sets: JSON (`"[[], [2], [2, 4]]"`) or `;`-separated layer lists (`"; 2; 2,4"`, an empty item
    is the CA-only configuration)."""
    text = text.strip()
    if not text.startswith("["):
        return [parse_layers(item) for item in text.split(";")]
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"--configurations is not valid JSON: {error}") from error
    if not isinstance(value, list) or not all(isinstance(c, list) and all(isinstance(i, int) for i in c) for c in value):
        raise ValueError("--configurations must be a list of lists of layer indices")
    return value


__all__ = [
    "AUTO",
    "MAX",
    "ConfigurationRequest",
    "check_configuration",
    "is_per_sample",
    "parse_configuration",
    "parse_configuration_list",
    "parse_layers",
    "resolve_configuration",
    "resolve_configuration_request",
]

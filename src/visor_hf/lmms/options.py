"""The VISOR keys of `--model_args` (`visor_configuration`, `visor_budget`, `visor_router_threshold`), checked
against the loaded model. Kept free of lmms-eval so that it is testable on its own."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from ..modeling.requests_visor import check_configuration, parse_configuration


@dataclass
class VisorOptions:
    """What every `generate`/forward call of the plugin passes on top of the task's own generation settings."""

    configuration: str | int | list[int] | None = None  # None: the model's own default ("auto" with a router)
    budget: float | None = None
    router_threshold: float | None = None

    def generate_kwargs(self) -> dict:
        kwargs: dict = {}
        if self.budget is not None:
            kwargs["visor_budget"] = self.budget
        else:
            kwargs["visor_configuration"] = "auto" if self.configuration is None else self.configuration
        if self.router_threshold is not None:
            kwargs["visor_router_threshold"] = self.router_threshold
        return kwargs


def _configuration(value) -> str | int | list[int]:
    """lmms-eval hands `visor_configuration=2` over as an int and `[1,6]` as a string; `1;6` is a list too (a bare
    comma would end the model_args entry)."""
    if isinstance(value, bool) or isinstance(value, float):
        raise ValueError(
            f"visor_configuration must be auto, max, a configuration index or a layer list like [1,6], got {value!r}"
        )
    if isinstance(value, int):
        return value
    try:
        return parse_configuration(str(value).replace(";", ","))
    except ValueError as error:
        raise ValueError(str(error).replace("--configuration", "visor_configuration")) from error


def _number(name: str, value, low: float, high: float | None) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a number, got {value!r}") from error
    if isinstance(value, bool) or number < low or (high is not None and number > high):
        bound = f"in [{low:g}, {high:g}]" if high is not None else f">= {low:g}"
        raise ValueError(f"{name} must be a number {bound}, got {value!r}")
    return number


def parse_options(visor_configuration=None, visor_budget=None, visor_router_threshold=None) -> VisorOptions:
    """The VISOR model_args as values (`ValueError` naming the key on a bad one)."""
    configuration = None if visor_configuration is None else _configuration(visor_configuration)
    budget = None if visor_budget is None else _number("visor_budget", visor_budget, 0.0, None)
    if budget is not None and configuration not in (None, "auto"):
        raise ValueError("pass either visor_configuration or visor_budget, not both")
    threshold = None if visor_router_threshold is None else _number("visor_router_threshold", visor_router_threshold, 0.0, 1.0)
    return VisorOptions(configuration, budget, threshold)


def check_options(options: VisorOptions, model) -> None:
    """`ValueError` when the options do not fit the loaded model (configuration out of range, no router for
    "auto"/a threshold, a model that does not take `visor_router_threshold` yet)."""
    config = model.config
    if options.configuration is not None:
        try:
            check_configuration(config, options.configuration)
        except ValueError as error:
            raise ValueError(f"visor_configuration: {error}") from error
    if options.router_threshold is not None:
        accepted = inspect.signature(model.forward).parameters
        if "visor_router_threshold" not in accepted:
            raise ValueError(
                "visor_router_threshold is not supported by the installed visor_hf model (its forward has no "
                "visor_router_threshold argument): update visor_hf, or drop the key"
            )
        if config.router_layer is None:
            raise ValueError("visor_router_threshold needs a router, and this checkpoint has none")

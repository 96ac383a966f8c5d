"""The VISOR keys of `--model_args` (`visor_configuration`, `visor_budget`, `visor_router_threshold`,
`visor_packing`), checked against the loaded model. Kept free of lmms-eval so that it is testable on its own."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from ..modeling.packing_visor import PACKING_BLOCKS
from ..modeling.requests_visor import check_configuration, parse_configuration


@dataclass
class VisorOptions:
    """What every `generate`/forward call of the plugin passes on top of the task's own generation settings."""

    configuration: str | int | list[int] | None = None  # None: the model's own default ("auto" with a router)
    budget: float | None = None
    router_threshold: float | None = None
    packing: int = 1  # VISOR-TR token packing factor of the images (1: none)

    def processor_kwargs(self) -> dict:
        """What every processor call of the plugin passes: the packing factor, always (it wins over a factor saved
        with the checkpoint's processor, so that prompt and model agree)."""
        return {"packing": self.packing}

    def generate_kwargs(self) -> dict:
        kwargs: dict = {}
        if self.packing != 1:  # 1 is the model's default: the call stays as without packing
            kwargs["visor_packing"] = self.packing
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


def _packing(value) -> int:
    """1, 2 or 4; lmms-eval hands `visor_packing=2` over as an int (a string of digits from Python is accepted)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value not in PACKING_BLOCKS:
        factors = ", ".join(str(f) for f in PACKING_BLOCKS)
        raise ValueError(f"visor_packing must be a token packing factor ({factors}; 1: no packing), got {value!r}")
    return value


def parse_options(visor_configuration=None, visor_budget=None, visor_router_threshold=None, visor_packing=None) -> VisorOptions:
    """The VISOR model_args as values (`ValueError` naming the key on a bad one)."""
    configuration = None if visor_configuration is None else _configuration(visor_configuration)
    budget = None if visor_budget is None else _number("visor_budget", visor_budget, 0.0, None)
    if budget is not None and configuration not in (None, "auto"):
        raise ValueError("pass either visor_configuration or visor_budget, not both")
    threshold = None if visor_router_threshold is None else _number("visor_router_threshold", visor_router_threshold, 0.0, 1.0)
    packing = 1 if visor_packing is None else _packing(visor_packing)
    return VisorOptions(configuration, budget, threshold, packing)


def check_options(options: VisorOptions, model) -> None:
    """`ValueError` when the options do not fit the loaded model (configuration out of range, no router for
    "auto"/a threshold, a model that does not take `visor_router_threshold` yet, a packing factor the checkpoint has
    no module for)."""
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
    check_packing(options.packing, config)


def check_packing(packing: int, config) -> None:
    """A factor other than 1 needs the checkpoint's packing module and LLaVA-OV's whole patch grid."""
    if packing == 1:
        return
    factors = list(getattr(config, "packing_factors", None) or [])
    if packing not in factors:
        raise ValueError(
            f"visor_packing={packing}: this checkpoint has no token packing module for it (config.packing_factors = "
            f"{factors}); convert the checkpoint with packing (`visor-hf convert`, its default) or use visor_packing=1"
        )
    if getattr(config, "vision_feature_select_strategy", "full") != "full":
        raise ValueError(
            f"visor_packing={packing} needs the whole patch grid (vision_feature_select_strategy='full'), and this "
            f"checkpoint uses {config.vision_feature_select_strategy!r}"
        )

"""Configuration of VISOR models (LLaVA-OneVision with sparse vision-language interaction)."""

from __future__ import annotations

import numbers
from dataclasses import dataclass

from huggingface_hub.dataclasses import strict
from transformers import LlavaOnevisionConfig

from .packing_visor import check_packing_factors
from .routing_visor import ROUTER_TYPES, check_threshold


def uniform_layer_layout(num_layers: int, num_cross: int | None = None, num_self: int | None = None) -> tuple[list[int], list[int]]:
    """The paper's default layout: |C| = |S| = L/3, spread uniformly over depth.

    The layers are cut into ``num_cross + num_self`` equal groups; groups alternate between a
    cross-attention (CA) layer and a self-attention (SA) layer, starting with CA so that the text
    sees the image early, and each group contributes its first layer. Returns ``(ca_layers, sa_layers)``.
    """
    num_cross = num_layers // 3 if num_cross is None else num_cross
    num_self = num_layers // 3 if num_self is None else num_self
    total = num_cross + num_self
    if total > num_layers:
        raise ValueError(f"{num_cross} CA + {num_self} SA layers do not fit in {num_layers} layers")
    if total == 0:
        return [], []
    chosen = sorted({round(i * num_layers / total) for i in range(total)})
    kinds = ["ca", "sa"] * total
    # Hand out CA/SA alternately, but never more than asked for of either kind.
    cross, selfs = [], []
    for layer, kind in zip(chosen, kinds):
        if (kind == "ca" and len(cross) < num_cross) or len(selfs) >= num_self:
            cross.append(layer)
        else:
            selfs.append(layer)
    return cross, selfs


def _layer_list(name: str, layers) -> list[int]:
    """`layers` as a sorted list of ints (duplicates kept, so that validation can name them)."""
    if isinstance(layers, (str, bytes)) or not isinstance(layers, (list, tuple)):
        raise TypeError(f"{name} must be a list of LLM layer indices, got {layers!r}")
    if not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in layers):
        raise TypeError(f"{name} must hold LLM layer indices (ints), got {list(layers)!r}")
    return sorted(int(i) for i in layers)


@dataclass
class VisorLayoutMixin:
    """VISOR's layer layout on top of a backbone's config: the fields (see `VisorConfig`), their validation and the
    helpers every VISOR config shares. A dataclass, so that the config dataclass that inherits it (placed before the
    backbone's config, under `@strict`) takes its fields."""

    # `Trainer.evaluate/predict` gather every other output field as predictions: keep them to the logits
    keys_to_ignore_at_inference = [
        "past_key_values", "image_hidden_states", "video_hidden_states", "router_logits", "routing_token_batch_index",
        "visor_configurations", "configuration_index", "flops", "flops_alone", "visor_computed_layers",
    ]

    cross_attention_layers: list | None = None
    self_attention_layers: list | None = None
    configurations: list | None = None
    router_layer: int | None = None
    router_hidden_size: int | None = None
    routing_token_id: int | None = None
    router_type: str = "argmax"
    router_threshold: float = 0.9
    default_configuration: int | str = "max"
    position_embedding_kernel_size: int = 7

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.normalize_layout()

    def normalize_layout(self) -> None:
        """Fill the layout defaults (dense: every layer an SA layer) and check the layout."""
        num_layers = self.text_config.num_hidden_layers
        if self.cross_attention_layers is None:
            self.cross_attention_layers = []
        self.cross_attention_layers = _layer_list("cross_attention_layers", self.cross_attention_layers)
        if self.self_attention_layers is None:
            self.self_attention_layers = [i for i in range(num_layers) if i not in self.cross_attention_layers]
        self.self_attention_layers = _layer_list("self_attention_layers", self.self_attention_layers)
        if self.configurations is None:
            self.configurations = [list(self.self_attention_layers)]
        if not isinstance(self.configurations, (list, tuple)):
            raise TypeError(f"configurations must be a list of lists of SA-layer indices, got {self.configurations!r}")
        self.configurations = [_layer_list(f"configuration {i}", c) for i, c in enumerate(self.configurations)]
        # plain ints (a numpy integer would not survive `to_json_string`)
        for name in ("router_layer", "router_hidden_size", "routing_token_id", "default_configuration"):
            value = getattr(self, name)
            if isinstance(value, numbers.Integral) and not isinstance(value, bool):
                setattr(self, name, int(value))
        # checked here too (not only in `validate_architecture`), so that a bad layout raises a plain `ValueError`
        # rather than the wrapper error of the strict-dataclass validators
        self.check_layout()

    def validate_architecture(self):
        super().validate_architecture()
        self.check_layout()

    def check_layout(self) -> None:
        """Refuse a bad layer layout with a `ValueError` naming the problem (run at construction; call it again after
        changing the layout fields of an existing config)."""
        num_layers = self.text_config.num_hidden_layers
        cross, selfs = self.cross_attention_layers, self.self_attention_layers
        for name, layers in (("cross_attention_layers", cross), ("self_attention_layers", selfs)):
            bad = [i for i in layers if not 0 <= i < num_layers]
            if bad:
                raise ValueError(f"{name} has layer index {bad[0]} out of range: the LLM has {num_layers} layers (0..{num_layers - 1})")
            if len(set(layers)) != len(layers):
                raise ValueError(f"{name} lists a layer twice: {layers}")
        both = sorted(set(cross) & set(selfs))
        if both:
            raise ValueError(f"cross_attention_layers and self_attention_layers must be disjoint; both hold {both}")
        if not self.configurations:
            raise ValueError("configurations must hold at least one configuration (a subset of self_attention_layers)")
        for index, configuration in enumerate(self.configurations):
            extra = sorted(set(configuration) - set(selfs))
            if extra:
                raise ValueError(f"configuration {index} ({configuration}) uses layers {extra} that are not in self_attention_layers {selfs}")
            if len(set(configuration)) != len(configuration):
                raise ValueError(f"configuration {index} lists a layer twice: {configuration}")
        default = self.default_configuration
        if isinstance(default, str):
            if default != "max":
                raise ValueError(f"default_configuration must be an index into configurations or 'max', got {default!r}")
        elif isinstance(default, bool) or not isinstance(default, numbers.Integral):
            raise ValueError(f"default_configuration must be an index into configurations (an int) or 'max', got {default!r}")
        elif not 0 <= self.default_configuration < len(self.configurations):
            raise ValueError(f"default_configuration {self.default_configuration} is out of range for {len(self.configurations)} configurations")
        kernel = self.position_embedding_kernel_size
        if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 != 1:
            raise ValueError(f"position_embedding_kernel_size must be a positive odd integer (padding k // 2 keeps the length), got {kernel!r}")
        width = self.router_hidden_size
        if width is not None and (isinstance(width, bool) or not isinstance(width, numbers.Integral)):
            raise ValueError(f"router_hidden_size must be an int width (or None for hidden_size // 4), got {width!r}")
        self.check_routing_token_id()
        if self.router_hidden_size is not None and not self.router_hidden_size > 0:
            raise ValueError(f"router_hidden_size must be a positive width (or None for hidden_size // 4), got {self.router_hidden_size}")
        if self.router_type not in ROUTER_TYPES:
            raise ValueError(f"router_type must be one of {ROUTER_TYPES}, got {self.router_type!r}")
        self.router_threshold = check_threshold(self.router_threshold, "router_threshold")
        if self.router_layer is not None:
            if self.routing_token_id is None:
                raise ValueError(
                    f"router_layer {self.router_layer} is set but routing_token_id is None: the router reads the hidden "
                    "state of the routing token, so give its id (or set router_layer=None for a model without router)"
                )
            if not 0 <= self.router_layer < num_layers:
                raise ValueError(f"router_layer {self.router_layer} is out of range: the LLM has {num_layers} layers")
            switchable = self.switchable_layers
            if switchable and self.router_layer >= switchable[0]:
                raise ValueError(
                    f"router_layer {self.router_layer} must come before the first SA layer that a configuration "
                    f"switches off ({switchable[0]}): the router decides before that layer runs"
                )

    def check_routing_token_id(self) -> None:
        """The routing token must be a token of the vocabulary of its own: the router reads its hidden state, and an
        id shared with the image, video or pad token (or out of the vocabulary) would never be found."""
        token = self.routing_token_id
        if token is None:
            return
        if isinstance(token, bool) or not isinstance(token, numbers.Integral):
            raise ValueError(f"routing_token_id must be a token id (an int), got {token!r}")
        vocab_size = self.text_config.vocab_size
        if not 0 <= token < vocab_size:
            raise ValueError(f"routing_token_id {token} is outside the vocabulary (0..{vocab_size - 1})")
        taken = {
            "image token": getattr(self, "image_token_id", None),
            "video token": getattr(self, "video_token_id", None),
            "pad token": getattr(self.text_config, "pad_token_id", None),
        }
        for name, value in taken.items():
            if value is not None and token == value:
                raise ValueError(f"routing_token_id {token} is also the {name} id: the routing token needs an id of its own")

    @property
    def switchable_layers(self) -> list[int]:
        """SA layers that at least one configuration switches off."""
        always = set.intersection(*(set(c) for c in self.configurations)) if self.configurations else set()
        return sorted(set(self.self_attention_layers) - always)

    @property
    def max_configuration(self) -> list[int]:
        return list(self.self_attention_layers)

    def default_layers(self) -> list[int]:
        """SA layers of the configuration used when no router decision exists."""
        if self.default_configuration == "max":
            return self.max_configuration
        return list(self.configurations[self.default_configuration])



@strict
class VisorConfig(VisorLayoutMixin, LlavaOnevisionConfig):
    r"""
    Configuration of a VISOR model: everything [`LlavaOnevisionConfig`] holds, plus the layer layout.

    cross_attention_layers (`list[int]`, *optional*, defaults to `[]`):
        LLM layers that run a cross-attention block (text queries, visual keys/values) before the text-only layer.
    self_attention_layers (`list[int]`, *optional*, defaults to every layer):
        Candidate full self-attention layers (text and image together). The default, every layer with no CA
        layer, computes exactly what LLaVA-OneVision computes.
    configurations (`list[list[int]]`, *optional*, defaults to `[self_attention_layers]`):
        The viable subsets of `self_attention_layers`; the router picks one of them per sample.
    router_layer (`int`, *optional*):
        The router reads the routing token's hidden state at the output of this layer. `None`: no router.
    router_hidden_size (`int`, *optional*):
        Width of the router MLP (defaults to the LLM hidden size // 4, at least 8).
    routing_token_id (`int`, *optional*):
        Id of the routing token placed after each question.
    router_type (`str`, *optional*, defaults to `"argmax"`):
        `"argmax"`: the paper's router (one class per configuration, the arg-max runs). `"calibrated"`: one
        probability per configuration that it keeps the maximal configuration's answer; the cheapest configuration
        at or above the threshold runs (see `routing_visor.py`).
    router_threshold (`float`, *optional*, defaults to 0.9):
        Default threshold of the calibrated router, in [0, 1]; `visor_router_threshold=` overrides it per call.
    default_configuration (`int` or `"max"`, *optional*, defaults to `"max"`):
        Configuration used when no router decision exists (no router, or a sample without a routing token).
    position_embedding_kernel_size (`int`, *optional*, defaults to 7):
        Kernel of the depth-wise 1-D convolution that gives visual tokens their position for cross-attention.
    packing_factors (`list[int]`, *optional*, defaults to `[]`):
        The token packing factors (from 2, 4) this checkpoint has a packing module for (`model.token_packing.pack2`,
        `pack4`); `visor_packing=` picks one per sample (1, no packing, is always available). See `packing_visor.py`.
    packing_positions (`bool`, *optional*, defaults to `True`):
        With `packing_factors`: learned 2-D row / column embeddings added to the packed tokens of each factor
        (`model.token_packing.position2`, `position4`, zero-initialised). A checkpoint saved before they existed loads
        with zero tables, which is the same model.
    """

    model_type = "visor"

    packing_factors: list | None = None
    packing_positions: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.packing_factors = check_packing_factors(self.packing_factors)


__all__ = ["VisorConfig", "VisorLayoutMixin", "uniform_layer_layout"]

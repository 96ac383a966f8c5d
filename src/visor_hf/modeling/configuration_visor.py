"""Configuration of VISOR models (LLaVA-OneVision with sparse vision-language interaction)."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import LlavaOnevisionConfig


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


@strict
class VisorConfig(LlavaOnevisionConfig):
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
        Width of the router MLP (defaults to the LLM hidden size // 4).
    routing_token_id (`int`, *optional*):
        Id of the routing token placed after each question.
    default_configuration (`int` or `"max"`, *optional*, defaults to `"max"`):
        Configuration used when no router decision exists (no router, or a sample without a routing token).
    position_embedding_kernel_size (`int`, *optional*, defaults to 7):
        Kernel of the depth-wise 1-D convolution that gives visual tokens their position for cross-attention.
    """

    model_type = "visor"

    cross_attention_layers: list | None = None
    self_attention_layers: list | None = None
    configurations: list | None = None
    router_layer: int | None = None
    router_hidden_size: int | None = None
    routing_token_id: int | None = None
    default_configuration: int | str = "max"
    position_embedding_kernel_size: int = 7

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        num_layers = self.text_config.num_hidden_layers
        if self.cross_attention_layers is None:
            self.cross_attention_layers = []
        if self.self_attention_layers is None:
            self.self_attention_layers = [i for i in range(num_layers) if i not in self.cross_attention_layers]
        self.cross_attention_layers = sorted(int(i) for i in self.cross_attention_layers)
        self.self_attention_layers = sorted(int(i) for i in self.self_attention_layers)
        if self.configurations is None:
            self.configurations = [list(self.self_attention_layers)]
        self.configurations = [sorted(int(i) for i in c) for c in self.configurations]

    def validate_architecture(self):
        super().validate_architecture()
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
        if isinstance(self.default_configuration, str):
            if self.default_configuration != "max":
                raise ValueError(f"default_configuration must be an index into configurations or 'max', got {self.default_configuration!r}")
        elif not 0 <= self.default_configuration < len(self.configurations):
            raise ValueError(f"default_configuration {self.default_configuration} is out of range for {len(self.configurations)} configurations")
        if self.router_layer is not None:
            if not 0 <= self.router_layer < num_layers:
                raise ValueError(f"router_layer {self.router_layer} is out of range: the LLM has {num_layers} layers")
            switchable = self.switchable_layers
            if switchable and self.router_layer >= switchable[0]:
                raise ValueError(
                    f"router_layer {self.router_layer} must come before the first SA layer that a configuration "
                    f"switches off ({switchable[0]}): the router decides before that layer runs"
                )

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


__all__ = ["VisorConfig", "uniform_layer_layout"]

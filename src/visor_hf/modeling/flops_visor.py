"""Analytical FLOPs of dense LLaVA-OneVision and of VISOR: the one set of functions used by
`generate`'s report, the compute budget, the training/toy evaluations and the benchmarks.

`count_flops` gives everything for one sample in one call (prefill, every decode step, vision tower and projector
apart); `prefill_flops`, `decode_flops` and `vision_flops` are its parts.

What is counted (a multiply-add is 2 FLOPs; matrix products and convolutions are counted):

- **Projections of a decoder layer** run on `n` tokens: `q_proj` `2·n·d·H·hd`, `k_proj` and `v_proj`
  `2·n·d·KV·hd` each (grouped-query attention: the K/V width is `KV·hd`), `o_proj` `2·n·H·hd·d`; **MLP** (gate,
  up, down) `3·2·n·d·F`.
- **Self-attention scores and mixing** (`QKᵀ` and `AV`): `2·2·H·hd` per visible query-key pair (every query
  head; the K/V heads are shared, not cheaper). A causal pass over `n` tokens has `n(n+1)/2` visible pairs (what
  a causal kernel needs, not the `n²` that a dense kernel may compute). The same rule for dense LLaVA-OV, for
  VISOR's SA layers (all `N` tokens) and its text-only layers (`n_text` tokens). At a decode step the new token
  sees every cached token of the layer plus itself.
- **Dense LLaVA-OV** (`sa_layers=None`): every layer runs over `N = n_text + n_visual` tokens.
- **VISOR** (`sa_layers` given): an SA layer listed in `sa_layers` is a dense layer over `N`; every other layer
  runs over the `n_text` text tokens only; a CA layer (`ca_layers`) adds the cross-attention block:
  `q_proj` and `o_proj` over the text; at prefill only (decoding reuses them from the cache) the conditional
  position embedding (depth-wise convolution, `2·k·d` per visual token, kernel `k` = 7) and `k_proj`/`v_proj` over
  the `n_visual` visual tokens; and `2·2·H·hd` per (text, visual) pair counting *every* pair
  (`n_text·n_visual`: the causal rule "a text token sees only earlier images" depends on the token order, which
  counts do not hold, and a masked cross-attention kernel computes every pair anyway).
  A sample without visual tokens (`n_visual == 0`) skips the CA blocks and is a plain LM.
  `sa_layers=range(L)` with no CA layer is dense LLaVA-OV.
- **LM head**: `2·d·V` per token whose logits are computed (`lm_head_tokens`, 1 in generation).
- **Not counted**: embeddings lookup, RMSNorms, RoPE, softmax, activations, residual adds, biases, the
  image-boundary correction of the position convolution, the router MLP, padding tokens.
- **Vision** (`vision_flops`, reported separately because VISOR does not change it): SigLIP patch embedding,
  every encoder layer (projections, full non-causal attention over the patches of a crop, MLP) for every crop,
  and optionally the 2-layer projector over every patch token (`projector_flops` alone).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field


@dataclass
class FlopsShape:
    """The LLM dimensions that the FLOPs depend on."""

    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    position_kernel_size: int = 7  # kernel of the CA blocks' depth-wise position convolution (0: not counted)

    def __post_init__(self):
        for name in ("num_layers", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim",
                     "vocab_size", "position_kernel_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"FlopsShape.{name} must be a non-negative int, got {value!r}")
        if self.num_kv_heads == 0 or self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

    @classmethod
    def from_config(cls, config) -> FlopsShape:
        """From a `VisorConfig`, a `LlavaOnevisionConfig` (their `text_config`) or a `Qwen2Config`.

        The position-convolution kernel is the VISOR config's `position_embedding_kernel_size` (7, the paper's, for
        a config that has none: the VISOR model a LLaVA-OV config would be converted to).
        """
        text = getattr(config, "text_config", None) or config
        heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        return cls(
            num_layers=text.num_hidden_layers,
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_heads=heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=head_dim,
            vocab_size=text.vocab_size,
            position_kernel_size=getattr(config, "position_embedding_kernel_size", None) or 7,
        )

    # -- building blocks (FLOPs) ---------------------------------------------------------------------------------

    def projections(self, tokens: int) -> int:
        """q, k, v, o projections and the MLP of one decoder layer over `tokens` tokens."""
        d, qd, kvd = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return 2 * tokens * (d * qd + 2 * d * kvd + qd * d + 3 * d * self.intermediate_size)

    def attention(self, pairs: int) -> int:
        """Scores and weighted sum for `pairs` visible (query, key) pairs."""
        return 4 * pairs * self.num_heads * self.head_dim

    def position_convolution(self, visual_tokens: int) -> int:
        """The depth-wise position convolution of a CA block over `visual_tokens` tokens."""
        return 2 * visual_tokens * self.position_kernel_size * self.hidden_size

    def cross_attention(self, text_tokens: int, visual_tokens: int, project_visual: bool) -> int:
        """The CA block: q/o over the text, text x visual attention and, with `project_visual` (prefill; decoding
        reads them from the cache), the position convolution and k/v projections of the visual tokens."""
        if visual_tokens == 0:
            return 0
        d, qd, kvd = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        flops = 2 * text_tokens * (d * qd + qd * d) + self.attention(text_tokens * visual_tokens)
        if project_visual:
            flops += self.position_convolution(visual_tokens) + 2 * visual_tokens * 2 * d * kvd
        return flops

    def lm_head(self, tokens: int) -> int:
        return 2 * tokens * self.hidden_size * self.vocab_size


def _causal_pairs(n: int) -> int:
    return n * (n + 1) // 2


def _count(name: str, value) -> int:
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise ValueError(f"{name} must be a non-negative integer, got {value!r}")
    return int(value)


def _layer_kinds(shape: FlopsShape, n_visual: int, sa_layers, ca_layers) -> tuple[int, int, int]:
    """(number of full layers, number of text-only layers, number of CA blocks) for one sample."""
    if sa_layers is None:
        if ca_layers:
            raise ValueError("ca_layers needs sa_layers (sa_layers=None is dense LLaVA-OV, which has no CA layer)")
        return shape.num_layers, 0, 0
    if isinstance(sa_layers, str) or isinstance(ca_layers, str):
        raise TypeError("sa_layers and ca_layers are lists of LLM layer indices (resolve names such as 'max' first)")
    sa = {int(i) for i in sa_layers}
    ca = {int(i) for i in ca_layers or ()}
    bad = sorted(i for i in sa | ca if not 0 <= i < shape.num_layers)
    if bad:
        raise ValueError(f"layer {bad[0]} is out of range for {shape.num_layers} layers")
    if sa & ca:
        raise ValueError(f"layers {sorted(sa & ca)} are both SA and CA layers; the two sets must be disjoint")
    if n_visual == 0:
        return 0, shape.num_layers, 0
    full = len(sa)
    return full, shape.num_layers - full, len(ca)


def prefill_flops(
    shape: FlopsShape,
    n_text: int,
    n_visual: int,
    sa_layers: Iterable[int] | None = None,
    ca_layers: Iterable[int] | None = (),
    lm_head_tokens: int = 1,
) -> int:
    """FLOPs of the LLM forward over a prompt of `n_text` text and `n_visual` visual tokens (one sample).

    `sa_layers=None`: dense LLaVA-OV (every layer over all tokens). Otherwise VISOR with the given active SA layers
    and CA layers (see the module docstring). The vision tower is not included (`vision_flops`).
    """
    n_text, n_visual = _count("n_text", n_text), _count("n_visual", n_visual)
    total = n_text + n_visual
    full, text_only, cross = _layer_kinds(shape, n_visual, sa_layers, ca_layers)
    flops = full * (shape.projections(total) + shape.attention(_causal_pairs(total)))
    flops += text_only * (shape.projections(n_text) + shape.attention(_causal_pairs(n_text)))
    flops += cross * shape.cross_attention(n_text, n_visual, project_visual=True)
    return flops + shape.lm_head(_count("lm_head_tokens", lm_head_tokens))


def decode_flops(
    shape: FlopsShape,
    context_text: int,
    context_visual: int,
    sa_layers: Iterable[int] | None = None,
    ca_layers: Iterable[int] | None = (),
) -> int:
    """FLOPs of one decoding step (one new token) after `context_text` text and `context_visual` visual tokens.

    The context is what precedes the new token (prompt plus earlier generated tokens); the new token attends to it
    and to itself. Text-only layers see the text context only; CA blocks attend the cached visual keys/values.
    """
    context_text, context_visual = _count("context_text", context_text), _count("context_visual", context_visual)
    full, text_only, cross = _layer_kinds(shape, context_visual, sa_layers, ca_layers)
    flops = full * (shape.projections(1) + shape.attention(context_text + context_visual + 1))
    flops += text_only * (shape.projections(1) + shape.attention(context_text + 1))
    flops += cross * shape.cross_attention(1, context_visual, project_visual=False)
    return flops + shape.lm_head(1)


def _patches(vision_config) -> int:
    return (vision_config.image_size // vision_config.patch_size) ** 2


def vision_flops(vision_config, num_crops: int, projector_out: int | None = None) -> int:
    """FLOPs of the SigLIP tower over `num_crops` crops (base image + anyres tiles), plus the projector if
    `projector_out` (the LLM width) is given. `vision_config` may also be a full LLaVA-OV/VISOR config: its vision
    config is used and `projector_out` defaults to the LLM width (pass `projector_out=0` for the tower alone)."""
    if hasattr(vision_config, "vision_config") and hasattr(vision_config, "text_config"):
        if projector_out is None:
            projector_out = vision_config.text_config.hidden_size
        vision_config = vision_config.vision_config
    num_crops = _count("num_crops", num_crops)
    d, ffn = vision_config.hidden_size, vision_config.intermediate_size
    patch = vision_config.patch_size
    patches = _patches(vision_config)
    channels = getattr(vision_config, "num_channels", 3)
    per_crop = 2 * patches * channels * patch * patch * d  # patch embedding
    per_layer = 2 * patches * (4 * d * d + 2 * d * ffn) + 4 * patches * patches * d
    per_crop += vision_config.num_hidden_layers * per_layer
    flops = num_crops * per_crop
    if projector_out:
        flops += projector_flops(vision_config, num_crops, projector_out)
    return flops


def projector_flops(vision_config, num_crops: int, projector_out: int | None = None) -> int:
    """FLOPs of LLaVA-OV's 2-layer projector (`d_vision -> d_llm -> d_llm`) over every patch of `num_crops` crops.
    `vision_config` may be a full LLaVA-OV/VISOR config (`projector_out` then defaults to the LLM width)."""
    if hasattr(vision_config, "vision_config") and hasattr(vision_config, "text_config"):
        if projector_out is None:
            projector_out = vision_config.text_config.hidden_size
        vision_config = vision_config.vision_config
    if not projector_out:
        raise ValueError("projector_flops needs projector_out (the LLM hidden size) or a full LLaVA-OV/VISOR config")
    d = vision_config.hidden_size
    return _count("num_crops", num_crops) * 2 * _patches(vision_config) * (d * projector_out + projector_out**2)


def packing_flops(hidden_size: int, factor: int, packed_tokens: int) -> int:
    """FLOPs of the VISOR-TR token packing (`Linear(factor * d, d)` on each packed token; factor 1: none). Like the
    projector, before the LLM and apart from its count."""
    if factor == 1:
        return 0
    return 2 * factor * hidden_size * hidden_size * _count("packed_tokens", packed_tokens)


@dataclass
class FlopsCount:
    """Analytical FLOPs of one sample (see `count_flops`)."""

    prefill: int
    decode: list[int]
    dense_prefill: int
    dense_decode: list[int]
    vision_tower: int = 0
    projector: int = 0

    @property
    def prefill_ratio(self) -> float:
        """Dense LLaVA-OV / this prefill (the analytical speedup; 1.0 for dense itself)."""
        return self.dense_prefill / self.prefill if self.prefill else 1.0

    @property
    def total(self) -> int:
        """LLM prefill, every decode step, the vision tower and the projector."""
        return self.prefill + sum(self.decode) + self.vision_tower + self.projector


def count_flops(
    shape_or_config,
    n_text: int,
    n_visual: int,
    sa_layers: Iterable[int] | None = None,
    ca_layers: Iterable[int] | None = None,
    decode_steps: int = 0,
    num_crops: int = 0,
    lm_head_tokens: int = 1,
) -> FlopsCount:
    """Everything for one sample in one call: the LLM prefill over `n_text` text and `n_visual` visual tokens, each
    of `decode_steps` decoding steps (step k sees the prompt and k earlier new tokens), the same for dense LLaVA-OV,
    and, apart, the vision tower and projector over `num_crops` crops.

    `shape_or_config`: a `FlopsShape` or a VISOR / LLaVA-OV / Qwen2 config. `sa_layers=None`: dense LLaVA-OV; a
    list: the active SA layers; with a VISOR config also an index into `config.configurations` or `"max"` (all of
    its SA layers). With a VISOR config, `ca_layers=None` means its `cross_attention_layers` (else no CA layer).
    Vision FLOPs need a config with a vision tower (`num_crops > 0`).
    """
    config = None if isinstance(shape_or_config, FlopsShape) else shape_or_config
    shape = shape_or_config if config is None else FlopsShape.from_config(config)
    if isinstance(sa_layers, (str, int)) and not isinstance(sa_layers, bool):
        configurations = getattr(config, "configurations", None)
        if configurations is None:
            raise ValueError(f"sa_layers={sa_layers!r} needs a VISOR config (its configurations); pass a list of layers")
        if sa_layers == "max":
            sa_layers = list(config.self_attention_layers)
        elif isinstance(sa_layers, int) and -len(configurations) <= sa_layers < len(configurations):
            sa_layers = list(configurations[sa_layers])
        else:
            raise ValueError(f"sa_layers={sa_layers!r}: expected 'max', a configuration index below "
                             f"{len(configurations)} or a list of layers")
    if ca_layers is None:
        ca_layers = () if sa_layers is None else (getattr(config, "cross_attention_layers", None) or ())
    steps = _count("decode_steps", decode_steps)
    vision = projector = 0
    if _count("num_crops", num_crops):
        if config is None or not hasattr(config, "vision_config"):
            raise ValueError("num_crops needs a LLaVA-OV or VISOR config (the vision tower's shape)")
        vision = vision_flops(config, num_crops, projector_out=0)
        projector = projector_flops(config, num_crops)
    return FlopsCount(
        prefill=prefill_flops(shape, n_text, n_visual, sa_layers, ca_layers, lm_head_tokens=lm_head_tokens),
        decode=[decode_flops(shape, n_text + k, n_visual, sa_layers, ca_layers) for k in range(steps)],
        dense_prefill=prefill_flops(shape, n_text, n_visual, lm_head_tokens=lm_head_tokens),
        dense_decode=[decode_flops(shape, n_text + k, n_visual) for k in range(steps)],
        vision_tower=vision,
        projector=projector,
    )


# ----------------------------------------------------------------------------------------------------------------
# Per-sample reports and the compute budget


@dataclass
class VisorFlopsReport:
    """Configuration and analytical LLM FLOPs of each sample of a VISOR generation (one row per returned sequence).

    `prefill_flops` / `decode_flops` are what the batch computed for the row: its prompt over `computed_layers` (the
    layers its (sub-)batch ran over the whole sequence at prefill: a masked mixed batch runs the union of its samples'
    SA layers for every sample, a grouped one its group's, see `visor_batching=`), and every decoding step over the
    cache's full layers (one layout for the whole batch). `prefill_flops_alone` / `decode_flops_alone` are the same
    with the row's own configuration only, as if it ran alone (what `visor_budget=` bounds). `decode_flops[i][k]` is
    the FLOPs of the k-th token fed after the prompt for row i: in plain generation the k-th decoding forward (the
    first generated token comes from the prefill, so `n` new tokens give `n - 1` decoding forwards); a forward feeding
    several tokens (assisted decoding, a second turn) costs the sum of its tokens'. `dense_*` are the same quantities
    for dense LLaVA-OV on the same tokens. Vision tower FLOPs are not included (see `vision_flops`).
    """

    configurations: list[tuple[int, ...]]
    configuration_index: list[int]
    num_text_tokens: list[int]
    num_visual_tokens: list[int]
    prefill_flops: list[int]
    decode_flops: list[list[int]]
    dense_prefill_flops: list[int]
    dense_decode_flops: list[list[int]] = field(default_factory=list)
    computed_layers: list[tuple[int, ...]] = field(default_factory=list)
    prefill_flops_alone: list[int] = field(default_factory=list)
    decode_flops_alone: list[list[int]] = field(default_factory=list)

    @property
    def prefill_ratio(self) -> list[float]:
        """VISOR (computed) / dense prefill FLOPs per row."""
        return [v / d if d else 1.0 for v, d in zip(self.prefill_flops, self.dense_prefill_flops)]

    @property
    def total_flops(self) -> list[int]:
        """Computed prefill plus decoding FLOPs per row."""
        return [p + sum(d) for p, d in zip(self.prefill_flops, self.decode_flops)]

    @property
    def total_flops_alone(self) -> list[int]:
        """Prefill plus decoding FLOPs per row as if it ran alone."""
        return [p + sum(d) for p, d in zip(self.prefill_flops_alone, self.decode_flops_alone)]


def configuration_costs(config, n_text: int, n_visual: int) -> list[int]:
    """Prefill FLOPs (LM head on one token) of each of `config.configurations` for one sample."""
    shape = FlopsShape.from_config(config)
    return [
        prefill_flops(shape, n_text, n_visual, sa_layers=c, ca_layers=config.cross_attention_layers)
        for c in config.configurations
    ]


def select_by_budget(config, budget: float, n_text: int, n_visual: int):
    """The configuration a compute budget picks for one sample (an index, or "max"/index of the default).

    Rule: among `config.configurations`, those whose prefill FLOPs are at most `budget` x the dense LLaVA-OV prefill
    FLOPs of the same tokens; of these the most expensive, ties going to the higher index. A sample without visual
    tokens costs the same under every configuration: it gets `config.default_configuration`. No configuration
    within the budget: `ValueError`.
    """
    budget = float(budget)
    if n_visual == 0:
        return config.default_configuration
    shape = FlopsShape.from_config(config)
    dense = prefill_flops(shape, n_text, n_visual)
    costs = configuration_costs(config, n_text, n_visual)
    fitting = [(cost, index) for index, cost in enumerate(costs) if cost <= budget * dense]
    if not fitting:
        cheapest = min(costs) / dense
        raise ValueError(
            f"visor_budget={budget:g} is below every configuration for a sample with {n_text} text and {n_visual} "
            f"visual tokens: the cheapest configuration costs {cheapest:.4f} of the dense prefill FLOPs"
        )
    return max(fitting)[1]


__all__ = [
    "FlopsShape",
    "FlopsCount",
    "count_flops",
    "prefill_flops",
    "decode_flops",
    "vision_flops",
    "projector_flops",
    "packing_flops",
    "VisorFlopsReport",
    "configuration_costs",
    "select_by_budget",
]

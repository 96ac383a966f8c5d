"""Analytical FLOPs of dense LLaVA-OneVision and of VISOR (DESIGN.md section 6): the one set of functions used by
`generate`'s report, the compute budget and the benchmarks.

What is counted (a multiply-add is 2 FLOPs; only matrix products are counted):

- **Projections of a decoder layer** run on `n` tokens: `q_proj` `2·n·d·H·hd`, `k_proj` and `v_proj`
  `2·n·d·KV·hd` each, `o_proj` `2·n·H·hd·d`; **MLP** (gate, up, down) `3·2·n·d·F`.
- **Self-attention scores and mixing** (`QKᵀ` and `AV`): `2·2·H·hd` per visible query-key pair. A causal pass
  over `n` tokens has `n(n+1)/2` visible pairs (what a causal kernel needs, not the `n²` that a dense kernel
  may compute). At a decode step the new token sees every cached token of the layer plus itself.
- **Dense LLaVA-OV** (`sa_layers=None`): every layer runs over `N = n_text + n_visual` tokens.
- **VISOR** (`sa_layers` given): an SA layer listed in `sa_layers` is a dense layer over `N`; every other layer
  runs over the `n_text` text tokens only; a CA layer (`ca_layers`) adds the cross-attention block: `q_proj` and
  `o_proj` over the text, `k_proj`/`v_proj` over the `n_visual` visual tokens (at prefill only; decoding reuses
  them from the cache), and `2·2·H·hd` per (text, visual) pair counting *every* pair (`n_text·n_visual`; the
  causal rule "a text token sees only earlier images" depends on the token order, which counts do not hold).
  A sample without visual tokens (`n_visual == 0`) skips the CA blocks and is a plain LM.
- **LM head**: `2·d·V` per token whose logits are computed (`lm_head_tokens`, 1 in generation).
- **Not counted**: embeddings lookup, RMSNorms, RoPE, softmax, activations, residual adds, biases, the
  depth-wise position convolution of the CA blocks (`2·7·d` per visual token), the router MLP, padding tokens.
- **Vision** (`vision_flops`, reported separately because VISOR does not change it): SigLIP patch embedding,
  every encoder layer (projections, full non-causal attention over the patches of a crop, MLP) for every crop,
  and optionally the 2-layer projector over every patch token.
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

    @classmethod
    def from_config(cls, config) -> FlopsShape:
        """From a `VisorConfig`, a `LlavaOnevisionConfig` (their `text_config`) or a `Qwen2Config`."""
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
        )

    # -- building blocks (FLOPs) ---------------------------------------------------------------------------------

    def projections(self, tokens: int) -> int:
        """q, k, v, o projections and the MLP of one decoder layer over `tokens` tokens."""
        d, qd, kvd = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return 2 * tokens * (d * qd + 2 * d * kvd + qd * d + 3 * d * self.intermediate_size)

    def attention(self, pairs: int) -> int:
        """Scores and weighted sum for `pairs` visible (query, key) pairs."""
        return 4 * pairs * self.num_heads * self.head_dim

    def cross_attention(self, text_tokens: int, visual_tokens: int, project_visual: bool) -> int:
        """The CA block: q/o over the text, k/v over the visual tokens (prefill only), text x visual attention."""
        if visual_tokens == 0:
            return 0
        d, qd, kvd = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        flops = 2 * text_tokens * (d * qd + qd * d) + self.attention(text_tokens * visual_tokens)
        if project_visual:
            flops += 2 * visual_tokens * 2 * d * kvd
        return flops

    def lm_head(self, tokens: int) -> int:
        return 2 * tokens * self.hidden_size * self.vocab_size


def _causal_pairs(n: int) -> int:
    return n * (n + 1) // 2


def _layer_kinds(shape: FlopsShape, n_visual: int, sa_layers, ca_layers) -> tuple[int, int, int]:
    """(number of full layers, number of text-only layers, number of CA blocks) for one sample."""
    if sa_layers is None:
        return shape.num_layers, 0, 0
    sa = {int(i) for i in sa_layers}
    ca = {int(i) for i in ca_layers}
    if n_visual == 0:
        return 0, shape.num_layers, 0
    bad = sorted(i for i in sa | ca if not 0 <= i < shape.num_layers)
    if bad:
        raise ValueError(f"layer {bad[0]} is out of range for {shape.num_layers} layers")
    full = len(sa)
    return full, shape.num_layers - full, len(ca)


def prefill_flops(
    shape: FlopsShape,
    n_text: int,
    n_visual: int,
    sa_layers: Iterable[int] | None = None,
    ca_layers: Iterable[int] = (),
    lm_head_tokens: int = 1,
) -> int:
    """FLOPs of the LLM forward over a prompt of `n_text` text and `n_visual` visual tokens (one sample).

    `sa_layers=None`: dense LLaVA-OV (every layer over all tokens). Otherwise VISOR with the given active SA layers
    and CA layers (see the module docstring). The vision tower is not included (`vision_flops`).
    """
    n_text, n_visual = int(n_text), int(n_visual)
    total = n_text + n_visual
    full, text_only, cross = _layer_kinds(shape, n_visual, sa_layers, ca_layers)
    flops = full * (shape.projections(total) + shape.attention(_causal_pairs(total)))
    flops += text_only * (shape.projections(n_text) + shape.attention(_causal_pairs(n_text)))
    flops += cross * shape.cross_attention(n_text, n_visual, project_visual=True)
    return flops + shape.lm_head(int(lm_head_tokens))


def decode_flops(
    shape: FlopsShape,
    context_text: int,
    context_visual: int,
    sa_layers: Iterable[int] | None = None,
    ca_layers: Iterable[int] = (),
) -> int:
    """FLOPs of one decoding step (one new token) after `context_text` text and `context_visual` visual tokens.

    The context is what precedes the new token (prompt plus earlier generated tokens); the new token attends to it
    and to itself. Text-only layers see the text context only; CA blocks attend the cached visual keys/values.
    """
    context_text, context_visual = int(context_text), int(context_visual)
    full, text_only, cross = _layer_kinds(shape, context_visual, sa_layers, ca_layers)
    flops = full * (shape.projections(1) + shape.attention(context_text + context_visual + 1))
    flops += text_only * (shape.projections(1) + shape.attention(context_text + 1))
    flops += cross * shape.cross_attention(1, context_visual, project_visual=False)
    return flops + shape.lm_head(1)


def vision_flops(vision_config, num_crops: int, projector_out: int | None = None) -> int:
    """FLOPs of the SigLIP tower over `num_crops` crops (base image + anyres tiles), plus the projector if
    `projector_out` (the LLM width) is given. `vision_config` may also be a full LLaVA-OV/VISOR config: its vision
    config is used and `projector_out` defaults to the LLM width."""
    if hasattr(vision_config, "vision_config") and hasattr(vision_config, "text_config"):
        if projector_out is None:
            projector_out = vision_config.text_config.hidden_size
        vision_config = vision_config.vision_config
    d, ffn = vision_config.hidden_size, vision_config.intermediate_size
    patch = vision_config.patch_size
    patches = (vision_config.image_size // patch) ** 2
    channels = getattr(vision_config, "num_channels", 3)
    per_crop = 2 * patches * channels * patch * patch * d  # patch embedding
    per_layer = 2 * patches * (4 * d * d + 2 * d * ffn) + 4 * patches * patches * d
    per_crop += vision_config.num_hidden_layers * per_layer
    if projector_out:
        per_crop += 2 * patches * (d * projector_out + projector_out * projector_out)
    return int(num_crops) * per_crop


# ----------------------------------------------------------------------------------------------------------------
# Per-sample reports and the compute budget


@dataclass
class VisorFlopsReport:
    """Configuration and analytical LLM FLOPs of each sample of a VISOR generation (one row per returned sequence).

    `decode_flops[i][k]` is the FLOPs of the k-th token fed after the prompt for row i: in plain generation the k-th
    decoding forward (the first generated token comes from the prefill, so `n` new tokens give `n - 1` decoding
    forwards); a forward feeding several tokens (assisted decoding, a second turn) costs the sum of its tokens'. `dense_*` are the same quantities for
    dense LLaVA-OV on the same tokens. Vision tower FLOPs are not included (see `vision_flops`).
    """

    configurations: list[tuple[int, ...]]
    configuration_index: list[int]
    num_text_tokens: list[int]
    num_visual_tokens: list[int]
    prefill_flops: list[int]
    decode_flops: list[list[int]]
    dense_prefill_flops: list[int]
    dense_decode_flops: list[list[int]] = field(default_factory=list)

    @property
    def prefill_ratio(self) -> list[float]:
        """VISOR / dense prefill FLOPs per row."""
        return [v / d if d else 1.0 for v, d in zip(self.prefill_flops, self.dense_prefill_flops)]

    @property
    def total_flops(self) -> list[int]:
        return [p + sum(d) for p, d in zip(self.prefill_flops, self.decode_flops)]


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
    "prefill_flops",
    "decode_flops",
    "vision_flops",
    "VisorFlopsReport",
    "configuration_costs",
    "select_by_budget",
]

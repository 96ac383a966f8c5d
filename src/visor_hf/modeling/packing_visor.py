"""VISOR-TR token packing: fewer visual tokens before the LLM, by a trained merge of neighbouring tokens.

LLaVA-OneVision lays out the projected tokens of one image (`pack_image_features`) as the base view (a
`side x side` grid, 27 x 27 at SigLIP-384 shapes), then the unpadded anyres grid row by row with one
`image_newline` token after each row; an image of a multi-image prompt is its base view and one newline. Packing by
a factor `k` works on that layout, per image, keeping the 2-D arrangement:

- `k = 2` merges horizontal pairs (a row of `w` tokens becomes `ceil(w / 2)`), every row stays;
- `k = 4` merges 2 x 2 blocks (`h x w` becomes `ceil(h / 2) x ceil(w / 2)`);
- a merge concatenates the `k` neighbours' channels (row-major inside the block) and projects them back with a
  `Linear(k * d, d)` initialised to the average (`[I/k, ..., I/k]`, bias 0): an untrained module is exactly average
  pooling;
- a side the block does not divide is completed by repeating its last row / column (edge padding), so the last
  block of an odd side holds its real tokens only, and the average init averages exactly those;
- the newline tokens are kept, one per packed row (the row's first newline), never merged.

`k = 1` is the identity (LLaVA-OV's layout unchanged). Videos are not packed (LLaVA-OV already pools them 2 x 2).
The same count formula serves the processor (placeholders) and the model (features); see `ImageTokenLayout`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from transformers import initialization as init
from transformers.image_processing_utils import select_best_resolution

PACKING_FACTORS = (2, 4)
# (rows, columns) merged by one packed token
PACKING_BLOCKS = {1: (1, 1), 2: (1, 2), 4: (2, 2)}


def check_packing_factors(factors) -> list[int]:
    """`config.packing_factors` as a sorted list of distinct supported factors (a `ValueError` names a bad one)."""
    if factors is None:
        return []
    if isinstance(factors, (str, bytes)) or not isinstance(factors, (list, tuple)):
        raise ValueError(f"packing_factors must be a list of packing factors (from {PACKING_FACTORS}), got {factors!r}")
    bad = [f for f in factors if isinstance(f, bool) or not isinstance(f, numbers.Integral) or int(f) not in PACKING_FACTORS]
    if bad:
        raise ValueError(
            f"packing_factors holds {bad[0]!r}: supported packing factors are {PACKING_FACTORS} (1, no packing, needs no module)"
        )
    return sorted({int(f) for f in factors})


def packed_side(length: int, step: int) -> int:
    return -(-length // step)


def packed_shape(shape: tuple[int, int], factor: int) -> tuple[int, int]:
    """(rows, cols) of a `shape` grid of tokens packed by `factor`."""
    rows, cols = PACKING_BLOCKS[factor]
    return packed_side(shape[0], rows), packed_side(shape[1], cols)


@dataclass(frozen=True)
class ImageTokenLayout:
    """How LLaVA-OV lays out one image's tokens: a `base` view (rows, cols), then either an anyres `grid` (rows, cols)
    with one newline after each row, or (`grid` None: an image of a multi-image prompt) one newline."""

    base: tuple[int, int]
    grid: tuple[int, int] | None

    def num_tokens(self, factor: int = 1) -> int:
        rows, cols = PACKING_BLOCKS[factor]
        base = packed_side(self.base[0], rows) * packed_side(self.base[1], cols)
        if self.grid is None:
            return base + 1
        grid_rows = packed_side(self.grid[0], rows)
        return base + grid_rows * (packed_side(self.grid[1], cols) + 1)


def anyres_grid_shape(image_size, grid_pinpoints, crop_size: int, side: int, vision_aspect_ratio: str) -> tuple[int, int]:
    """(rows, cols) of the unpadded (and, past `anyres_max_N`, downsized) anyres grid of an image of `image_size`
    (height, width), as LLaVA-OV's `pack_image_features` computes it: crops of `crop_size` px, `side` tokens each way."""
    height, width = (int(v) for v in image_size)
    best_height, best_width = select_best_resolution([height, width], grid_pinpoints)
    rows, cols = side * (best_height // crop_size), side * (best_width // crop_size)
    if width / height > cols / rows:  # LLaVA-OV's `unpad_image`: the padding bands of the resized picture go
        padding = (rows - int(round(height * (cols / width), 7))) // 2
        rows -= 2 * padding
    else:
        padding = (cols - int(round(width * (rows / height), 7))) // 2
        cols -= 2 * padding
    max_num_patches = int(vision_aspect_ratio.removeprefix("anyres_max_"))
    ratio = math.sqrt(rows * cols / (max_num_patches * side**2))
    if ratio > 1.1:
        rows, cols = int(rows // ratio), int(cols // ratio)
    return rows, cols


def image_token_layouts(
    config, image_sizes, vision_aspect_ratio: str | None = None, batch_num_images=None
) -> list[ImageTokenLayout]:
    """The layout of every image's features, as `get_image_features` makes them (a LLaVA-OV / VISOR config)."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    aspect = vision_aspect_ratio or getattr(config, "vision_aspect_ratio", None) or "anyres_max_9"
    sizes = image_sizes.tolist() if isinstance(image_sizes, torch.Tensor) else [list(s) for s in image_sizes]
    if batch_num_images is None:
        anyres = [True] * len(sizes)
    else:  # as `get_image_features`: an image of a multi-image prompt is its base view only
        counts = batch_num_images.tolist() if isinstance(batch_num_images, torch.Tensor) else list(batch_num_images)
        anyres = [n == 1 for n in counts for _ in range(n)]
    return [
        ImageTokenLayout(
            (side, side), anyres_grid_shape(size, config.image_grid_pinpoints, vision.image_size, side, aspect) if whole else None
        )
        for size, whole in zip(sizes, anyres)
    ]


def packing_per_sample(packing, batch: int, supported: Sequence[int]) -> list[int]:
    """`visor_packing=` (an int, or one per sample as a list or 1-D tensor) as one factor per sample; a factor the
    checkpoint has no module for is a `ValueError`."""
    if packing is None:
        return [1] * batch
    if isinstance(packing, torch.Tensor):
        if packing.dtype == torch.bool or packing.is_floating_point() or packing.dim() > 1:
            raise ValueError(
                f"visor_packing must be an int or one int per sample, got a {packing.dtype} tensor of shape {tuple(packing.shape)}"
            )
        packing = packing.item() if packing.dim() == 0 else packing.tolist()
    values = list(packing) if isinstance(packing, (list, tuple)) else [packing] * batch
    if len(values) != batch:
        raise ValueError(f"visor_packing has {len(values)} entries for a batch of {batch}")
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"visor_packing must be a packing factor (1, 2 or 4), got {value!r}")
        if int(value) != 1 and int(value) not in supported:
            raise ValueError(
                f"visor_packing={int(value)}: this checkpoint has no packing module for it (config.packing_factors = "
                f"{list(supported)}; 1 needs none)"
            )
    return [int(v) for v in values]


def images_of_samples(
    image_tokens: list[int], layouts: list[ImageTokenLayout], factors: list[int], batch_num_images=None
) -> list[int]:
    """Which sample each image belongs to: from `batch_num_images` (one entry per sample), else by filling every
    sample's image tokens with the packed images in order. A count that does not match is a `ValueError` naming both."""
    if batch_num_images is not None:
        counts = batch_num_images.tolist() if isinstance(batch_num_images, torch.Tensor) else list(batch_num_images)
        if len(counts) == len(image_tokens) and sum(counts) == len(layouts):
            owners = [b for b, n in enumerate(counts) for _ in range(n)]
            check_packed_counts(image_tokens, layouts, factors, owners)
            return owners
    owners, next_image = [], 0
    for sample, tokens in enumerate(image_tokens):
        taken = 0
        while taken < tokens and next_image < len(layouts):
            taken += layouts[next_image].num_tokens(factors[sample])
            owners.append(sample)
            next_image += 1
        if taken != tokens:
            raise ValueError(mismatch_message(sample, tokens, taken, factors[sample]))
    if next_image != len(layouts):
        raise ValueError(
            f"{len(layouts)} images were given but the prompts' image tokens hold {next_image} images packed by {factors}"
        )
    return owners


def check_packed_counts(image_tokens: list[int], layouts, factors: list[int], owners: list[int]) -> None:
    expected = [0] * len(image_tokens)
    for layout, owner in zip(layouts, owners):
        expected[owner] += layout.num_tokens(factors[owner])
    for sample, (tokens, packed) in enumerate(zip(image_tokens, expected)):
        if tokens != packed:
            raise ValueError(mismatch_message(sample, tokens, packed, factors[sample]))


def mismatch_message(sample: int, tokens: int, packed: int, factor: int) -> str:
    return (
        f"sample {sample} holds {tokens} image tokens but its images packed by visor_packing={factor} give {packed} "
        f"features: process the prompt with the same packing (VisorProcessor(packing={factor}) or "
        f"processor(..., packing={factor}))"
    )


class VisorPackedPositions(nn.Module):
    """Learned 2-D positions of one factor's packed tokens: a row and a column embedding for the base view and for the
    anyres grid, added to each packed token, zero-initialised (an untrained module adds nothing).

    A packed row is shorter than LLaVA-OV's (fewer tokens before its newline), so the 1-D positions that locate a
    token in the picture differ per packing factor; these embeddings tell the LLM where a packed token sits in the
    same way at every image size, so the model does not have to relearn the layout from 1-D positions for each factor.
    Rows / columns are indexed by the packed coordinate; the tables cover the largest grid the checkpoint's
    `image_grid_pinpoints` allow."""

    def __init__(self, hidden_size: int, base_side: tuple[int, int], grid_side: tuple[int, int]):
        super().__init__()
        self.base_row = nn.Embedding(base_side[0], hidden_size)
        self.base_col = nn.Embedding(base_side[1], hidden_size)
        self.grid_row = nn.Embedding(grid_side[0], hidden_size)
        self.grid_col = nn.Embedding(grid_side[1], hidden_size)
        # the tables are read scaled by sqrt(d), the scale of a token's norm, so that an optimiser step moves a position
        # as far, relative to the tokens, as it moves the tokens' own projections
        self.scale = hidden_size**0.5

    def forward(self, packed: torch.Tensor, view: str) -> torch.Tensor:
        """`[rows, cols, d]` packed tokens of the `"base"` view or the `"grid"` plus their row and column embeddings."""
        rows, cols = getattr(self, f"{view}_row"), getattr(self, f"{view}_col")
        height, width = packed.shape[:2]
        if height > rows.num_embeddings or width > cols.num_embeddings:
            raise ValueError(
                f"a packed {view} of {height} x {width} tokens is larger than the packing position tables "
                f"({rows.num_embeddings} x {cols.num_embeddings}) built from the config's image_grid_pinpoints"
            )
        index = partial(torch.arange, device=packed.device)
        position = rows(index(height))[:, None] + cols(index(width))[None]
        return packed + (position * self.scale).to(packed.dtype)


class VisorTokenPacking(nn.Module):
    """One `Linear(k * d, d)` per packing factor `k` (`pack2`, `pack4`), merging `k` neighbouring visual tokens, and
    (with `max_base` / `max_grid`, the unpacked sides of the largest base view and anyres grid) the factor's learned
    2-D positions (`position2`, `position4`, see `VisorPackedPositions`)."""

    def __init__(
        self,
        hidden_size: int,
        factors: Sequence[int],
        max_base: tuple[int, int] | None = None,
        max_grid: tuple[int, int] | None = None,
    ):
        super().__init__()
        self.factors = tuple(factors)
        for factor in self.factors:
            self.add_module(f"pack{factor}", nn.Linear(factor * hidden_size, hidden_size))
            if max_base is not None and max_grid is not None:
                sides = packed_shape(max_base, factor), packed_shape(max_grid, factor)
                self.add_module(f"position{factor}", VisorPackedPositions(hidden_size, *sides))

    @torch.no_grad()
    def reset_to_average(self, guarded: bool = True) -> None:
        """Each merge starts as the average of its `k` tokens (`[I/k, ..., I/k]`, bias 0) and adds no position (tables
        0). `guarded` (the model's `_init_weights`): through transformers' init functions, which leave weights loaded
        from a checkpoint as they are; else (a warm start) always."""
        for factor in self.factors:
            linear = getattr(self, f"pack{factor}")
            weight = linear.weight
            if weight.is_meta:
                continue
            average = torch.eye(linear.out_features, device=weight.device, dtype=weight.dtype).repeat(1, factor) / factor
            zeros = [linear.bias] + list(getattr(self, f"position{factor}", nn.Module()).parameters())
            if guarded:
                init.copy_(weight, average)
                for tensor in zeros:
                    init.zeros_(tensor)
            else:
                weight.copy_(average)
                for tensor in zeros:
                    tensor.zero_()

    def pack_grid(self, grid: torch.Tensor, factor: int, view: str) -> torch.Tensor:
        """`[rows, cols, d]` -> `[ceil(rows / r), ceil(cols / c), d]` for the factor's `r x c` block (plus the
        factor's positions of the `view`, "base" or "grid"); an odd side is edge-padded (its last row / column
        repeated)."""
        rows, cols = PACKING_BLOCKS[factor]
        height, width, hidden = grid.shape
        pad_rows, pad_cols = packed_side(height, rows) * rows - height, packed_side(width, cols) * cols - width
        if pad_rows:
            grid = torch.cat([grid, grid[-1:].expand(pad_rows, -1, -1)], dim=0)
        if pad_cols:
            grid = torch.cat([grid, grid[:, -1:].expand(-1, pad_cols, -1)], dim=1)
        out_rows, out_cols = grid.shape[0] // rows, grid.shape[1] // cols
        # [R, r, C, c, d] -> [R, C, r, c, d]: the block's tokens row-major, channels concatenated
        blocks = grid.reshape(out_rows, rows, out_cols, cols, hidden).permute(0, 2, 1, 3, 4).reshape(out_rows, out_cols, -1)
        packed = getattr(self, f"pack{factor}")(blocks)
        positions = getattr(self, f"position{factor}", None)
        return packed if positions is None else positions(packed, view)

    def pack_image(self, features: torch.Tensor, layout: ImageTokenLayout, factor: int) -> torch.Tensor:
        """One image's `[N, d]` features in LLaVA-OV's layout -> its packed features, in the same layout."""
        if factor == 1:
            return features
        expected = layout.num_tokens(1)
        if features.shape[0] != expected:
            raise ValueError(
                f"an image has {features.shape[0]} features where its LLaVA-OneVision layout {layout} holds {expected}: "
                "token packing needs the features of `get_image_features` (vision_feature_select_strategy='full')"
            )
        hidden = features.shape[-1]
        base_rows, base_cols = layout.base
        base = features[: base_rows * base_cols].view(base_rows, base_cols, hidden)
        base = self.pack_grid(base, factor, "base").flatten(0, 1)
        rest = features[base_rows * base_cols :]
        if layout.grid is None:  # base view and its newline
            return torch.cat([base, rest], dim=0)
        grid_rows, grid_cols = layout.grid
        rest = rest.view(grid_rows, grid_cols + 1, hidden)
        packed = self.pack_grid(rest[:, :grid_cols], factor, "grid")
        newlines = rest[:: PACKING_BLOCKS[factor][0], grid_cols:]  # the first newline of each packed row
        return torch.cat([base, torch.cat([packed, newlines], dim=1).flatten(0, 1)], dim=0)


def max_packing_sides(config) -> tuple[tuple[int, int], tuple[int, int]]:
    """(base view, largest anyres grid) sides in tokens, unpacked, for a LLaVA-OV / VISOR config."""
    vision = config.vision_config
    side = vision.image_size // vision.patch_size
    pinpoints = config.image_grid_pinpoints
    max_rows = max(side * (height // vision.image_size) for height, _ in pinpoints)
    max_cols = max(side * (width // vision.image_size) for _, width in pinpoints)
    return (side, side), (max(max_rows, side), max(max_cols, side))


__all__ = [
    "ImageTokenLayout",
    "PACKING_FACTORS",
    "VisorPackedPositions",
    "VisorTokenPacking",
    "anyres_grid_shape",
    "check_packing_factors",
    "image_token_layouts",
    "images_of_samples",
    "max_packing_sides",
    "packing_per_sample",
]

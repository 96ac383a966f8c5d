"""VISOR-TR (token packing 2x / 4x) as benchmark rows: the VISOR model packs the column's visual features itself
(`visor_packing=`, the packing module inside the timed forward), then runs CA only, 2 SA layers or every SA layer on
the packed tokens. The dense reference stays LLaVA-OV on every unpacked token.

Packing needs a real image layout (base view, anyres grid, one newline per grid row), which the model derives from
`image_sizes`. A column of `n` visual tokens gets the image size of `PACKING_IMAGE_SIZES[n]`, a real LLaVA-OV image
whose layout holds exactly `n` tokens (checked when the rows are built), so the dense row's `n` features are the
unpacked features of that image and the packed count is the processor's. A column with no such image gets no VISOR-TR
row, with a message: 729 (a single LLaVA-OV image holds at least 1,149 tokens; an image of a multi-image prompt is
729 + 1 newline) and 2,916 (base view plus a grid of `rows x (cols + 1)` = 2,187 = 3^7 tokens: 27 x 80 or 81 x 26,
which unpadding never gives, as it removes an even number of rows or columns from 27 / 81)."""

from __future__ import annotations

from visor_hf.modeling.flops_visor import decode_flops, packing_flops, prefill_flops
from visor_hf.modeling.packing_visor import ImageTokenLayout, image_token_layouts

# visual tokens of a column -> (height, width) of a real image whose LLaVA-OV layout (SigLIP-384, the default
# pinpoints, anyres_max_9) holds exactly that many tokens; found by a search over image sizes
PACKING_IMAGE_SIZES = {
    7290: (1166, 1154),  # 3 x 3 crops, unpadded to 81 x 81, downsized to an 81 x 80 grid: 729 + 81 * 81
}
PACKING_ROWS = {2: ("ca", "sa2", "max"), 4: ("ca", "sa2", "max")}


def packing_layout(config, n_visual: int) -> tuple[tuple[int, int], ImageTokenLayout] | None:
    """(image size, layout) of the column's image, or None when the table has no image of `n_visual` tokens."""
    size = PACKING_IMAGE_SIZES.get(n_visual)
    if size is None:
        return None
    (layout,) = image_token_layouts(config, [size])
    if layout.num_tokens(1) != n_visual:
        raise ValueError(f"image {size} holds {layout.num_tokens(1)} tokens in this config's layout, not {n_visual}")
    return size, layout


def merged_tokens(layout: ImageTokenLayout, factor: int) -> int:
    """Packed tokens the `Linear(k * d, d)` computes: every packed token but the newlines, which are kept as they are."""
    newlines = 1 if layout.grid is None else -(-layout.grid[0] // (2 if factor == 4 else 1))
    return layout.num_tokens(factor) - newlines


def packing_row_flops(shape, n_text: int, layout: ImageTokenLayout, factor: int, layers, ca) -> tuple[int, int]:
    """(prefill, decode) FLOPs of VISOR on the packed tokens, the packing module's own cost in the prefill."""
    packed = layout.num_tokens(factor)
    own = packing_flops(shape.hidden_size, factor, merged_tokens(layout, factor))
    return prefill_flops(shape, n_text, packed, layers, ca) + own, decode_flops(shape, n_text, packed, layers, ca)

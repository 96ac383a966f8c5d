"""VISOR-TR token packing: layouts and counts against LLaVA-OneVision's own feature packing, the average-initialised
module against average pooling, the processor against the model, mixed packing factors in a batch, the cache,
generation, conversion and remote code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel, image_size_to_num_patches

import visor_hf  # noqa: F401  (registers the Auto classes)
from samples import ANYRES, ONE_IMAGE, TEXT_ONLY, TWO_IMAGES, assert_row_matches_alone
from visor_hf import VisorProcessor
from visor_hf.cli import main as cli_main
from visor_hf.conversion import convert
from visor_hf.modeling.packing_visor import VisorTokenPacking, image_token_layouts
from visor_hf.testing import (
    CHAT_TEMPLATE,
    IMAGE_ID,
    LLAVA_PROCESSOR_FIELDS,
    TINY_LAYOUT,
    build_batch,
    random_image,
    save_tiny_llava,
    tiny_image_processor,
    tiny_tokenizer,
    visor_from_llava,
)

# LLaVA-OneVision's SigLIP-384 shapes: 27 x 27 tokens per crop, crops of 384 px, its anyres grid pinpoints
SIDE, CROP = 27, 384
PINPOINTS = [[CROP * i, CROP * j] for i in range(1, 7) for j in range(1, 7)]
ODD_SIZES = [(500, 333), (1000, 207), (123, 987), (2304, 1700), (401, 401), (77, 1500)]


def llava_config(pinpoints=PINPOINTS):
    vision = SimpleNamespace(image_size=CROP, patch_size=CROP // SIDE)
    return SimpleNamespace(vision_config=vision, image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_9")


def llava_layout(size, hidden=3, seed=0):
    """LLaVA-OV's own packed features of one image of `size` (random projected features), the newline vector, and
    the grid shape read off the features themselves (where the newlines are)."""
    config = llava_config()
    crops = image_size_to_num_patches(list(size), PINPOINTS, CROP)
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(crops, SIDE * SIDE, hidden, generator=generator)
    newline = torch.randn(hidden, generator=generator)
    (packed,), _ = LlavaOnevisionModel.pack_image_features(
        SimpleNamespace(config=config),
        [features],
        torch.tensor([size]),
        image_newline=newline,
        vision_aspect_ratio="anyres_max_9",
    )
    grid = packed[SIDE * SIDE :]
    is_newline = (grid == newline).all(-1)
    rows = int(is_newline.sum())
    cols = int(is_newline.nonzero()[0, 0])
    return packed, newline, (rows, cols)


def average_pool(grid: torch.Tensor, factor: int) -> torch.Tensor:
    """`[H, W, d]` averaged over horizontal pairs (2) or 2 x 2 blocks (4); a block cut by the border averages the tokens
    it has."""
    if factor == 4:
        grid = torch.stack([grid[i : i + 2].mean(0) for i in range(0, grid.shape[0], 2)])
    return torch.stack([grid[:, j : j + 2].mean(1) for j in range(0, grid.shape[1], 2)], dim=1)


def reference_packing(features: torch.Tensor, newline: torch.Tensor, base_side: int, grid_shape, factor: int) -> torch.Tensor:
    """The packed sequence of one image built by hand: pooled base view, then each pooled row and its newline."""
    hidden = features.shape[-1]
    base = average_pool(features[: base_side * base_side].view(base_side, base_side, hidden), factor).flatten(0, 1)
    if grid_shape is None:
        return torch.cat([base, newline[None]])
    rows, cols = grid_shape
    grid = features[base_side * base_side :].view(rows, cols + 1, hidden)[:, :cols]
    pooled = average_pool(grid, factor)
    lines = torch.cat([pooled, newline.expand(pooled.shape[0], 1, hidden)], dim=1)
    return torch.cat([base, lines.flatten(0, 1)])


def real_processor(packing=1):
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": CROP, "width": CROP}, image_grid_pinpoints=PINPOINTS)
    return VisorProcessor(
        image_processor=image_processor,
        tokenizer=tiny_tokenizer(with_routing_token=True),
        num_image_tokens=SIDE * SIDE,
        vision_feature_select_strategy="full",
        packing=packing,
    )


def tiny_processor(packing=1):
    fields = {k: v for k, v in LLAVA_PROCESSOR_FIELDS.items() if k != "processor_class"}
    return VisorProcessor(
        image_processor=tiny_image_processor(),
        tokenizer=tiny_tokenizer(with_routing_token=True),
        chat_template=CHAT_TEMPLATE,
        packing=packing,
        **fields,
    )


@pytest.fixture(scope="module")
def packed(llava):
    """The tiny sparse VISOR model with a packing module whose weights are random (not the average)."""
    model = visor_from_llava(llava, **TINY_LAYOUT, packing_factors=[2, 4])
    torch.manual_seed(1)
    with torch.no_grad():
        for block in model.model.cross_attention_blocks.values():  # the CA convolution, off its identity start
            block.position_embedding.weight.normal_(std=0.2)
        for factor in (2, 4):
            linear = getattr(model.model.token_packing, f"pack{factor}")
            linear.weight.add_(torch.randn_like(linear.weight) * 0.1)
            linear.bias.normal_(std=0.1)
            for table in getattr(model.model.token_packing, f"position{factor}").parameters():
                table.normal_(std=0.1)
    return model


# -- layouts and counts ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [tuple(p) for p in PINPOINTS] + ODD_SIZES, ids=str)
def test_layout_and_counts_match_llava_onevision_and_the_processor(size):
    features, newline, grid_shape = llava_layout(size)
    (layout,) = image_token_layouts(llava_config(), [size])
    assert layout.base == (SIDE, SIDE) and layout.grid == grid_shape
    assert layout.num_tokens(1) == features.shape[0]
    rows, cols = grid_shape
    assert layout.num_tokens(2) == SIDE * 14 + rows * (-(-cols // 2) + 1)
    assert layout.num_tokens(4) == 14 * 14 + (-(-rows // 2)) * (-(-cols // 2) + 1)
    for factor in (1, 2, 4):
        processor = real_processor(packing=factor)
        assert processor._get_number_of_features(size[0], size[1], CROP, CROP) == layout.num_tokens(factor)


@pytest.mark.parametrize("size", [(384, 384), (768, 1152), (2304, 2304), (500, 333), (77, 1500), (1000, 207)], ids=str)
@pytest.mark.parametrize("factor", [2, 4])
def test_average_initialised_packing_is_average_pooling(size, factor):
    features, newline, grid_shape = llava_layout(size)
    (layout,) = image_token_layouts(llava_config(), [size])
    module = VisorTokenPacking(features.shape[-1], [2, 4])
    module.reset_to_average(guarded=False)
    with torch.no_grad():
        ours = module.pack_image(features, layout, factor)
    expected = reference_packing(features, newline, SIDE, grid_shape, factor)
    assert ours.shape == expected.shape == (layout.num_tokens(factor), features.shape[-1])
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-6)


def test_an_image_of_a_multi_image_prompt_is_its_base_view_and_one_newline():
    (layout,) = image_token_layouts(llava_config(), [(500, 333)], batch_num_images=[1])
    multi = image_token_layouts(llava_config(), [(500, 333), (384, 384)], batch_num_images=[2])
    assert layout.grid is not None and [m.grid for m in multi] == [None, None]
    assert [m.num_tokens(k) for k in (1, 2, 4) for m in multi[:1]] == [SIDE * SIDE + 1, SIDE * 14 + 1, 14 * 14 + 1]
    features = torch.randn(SIDE * SIDE + 1, 3)
    module = VisorTokenPacking(3, [4])
    module.reset_to_average(guarded=False)
    with torch.no_grad():
        ours = module.pack_image(features, multi[0], 4)
    torch.testing.assert_close(ours, reference_packing(features[:-1], features[-1], SIDE, None, 4), atol=1e-6, rtol=1e-6)


# -- the tiny model with its processor ----------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_processor_count_equals_model_count(packed, factor):
    processor = tiny_processor()
    for height, width in [(16, 16), (16, 10), (10, 16), (32, 32), (13, 29), (30, 7), (20, 40), (7, 7)]:
        inputs = processor(
            text="<image>\nwhat is the colour ?", images=[random_image(height, width)], packing=factor, return_tensors="pt"
        )
        with torch.no_grad():
            out = packed(**inputs, visor_packing=factor)
        assert out.image_hidden_states.shape[0] == int((inputs["input_ids"] == IMAGE_ID).sum()), (height, width)
    # two images in one prompt (each its base view and a newline), the constructor's packing
    processor = tiny_processor(packing=factor)
    inputs = processor(
        text="<image><image>\nwhat is the colour ?", images=[[random_image(16, 10), random_image(30, 7)]], return_tensors="pt"
    )
    assert inputs["batch_num_images"].tolist() == [2]
    with torch.no_grad():
        out = packed(**inputs, visor_packing=factor)
    assert out.image_hidden_states.shape[0] == int((inputs["input_ids"] == IMAGE_ID).sum()) == 2 * {1: 17, 2: 9, 4: 5}[factor]


def test_processor_packing_survives_save_and_load(tmp_path):
    processor = tiny_processor(packing=4)
    processor.save_pretrained(tmp_path)
    reloaded = AutoProcessor.from_pretrained(tmp_path)
    assert type(reloaded) is VisorProcessor and reloaded.packing == 4
    image = random_image(20, 40)
    ids = reloaded(text="<image> what", images=[image]).input_ids
    assert ids == processor(text="<image> what", images=[image]).input_ids
    assert ids != reloaded(text="<image> what", images=[image], packing=1).input_ids
    with pytest.raises(ValueError, match="packing"):
        tiny_processor(packing=3)


def packed_and_unpacked(model, factor: int):
    """One 13 x 29 image through the model at `factor`: its packed features, its unpacked features, the newline
    vector and the anyres grid shape (read off where the newlines are)."""
    inputs = tiny_processor(packing=factor)(text="<image> what", images=[random_image(13, 29)], return_tensors="pt")
    with torch.no_grad():
        unpacked = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output[0]
        packed = model(**inputs, visor_packing=factor).image_hidden_states
    newline = model.model.image_newline.detach()
    is_newline = (unpacked[16:] == newline).all(-1)
    return packed, unpacked, newline, (int(is_newline.sum()), int(is_newline.nonzero()[0, 0]))


@pytest.mark.parametrize("factor", [2, 4])
def test_untrained_module_in_the_model_is_average_pooling(llava, factor):
    model = visor_from_llava(llava, **TINY_LAYOUT, packing_factors=[2, 4])  # the documented average start
    ours, unpacked, newline, grid_shape = packed_and_unpacked(model, factor)
    torch.testing.assert_close(ours, reference_packing(unpacked, newline, 4, grid_shape, factor), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("factor", [2, 4])
def test_packed_positions_are_added_at_each_packed_row_and_column(llava, factor):
    model = visor_from_llava(llava, **TINY_LAYOUT, packing_factors=[2, 4])  # average merge, positions set below
    positions = getattr(model.model.token_packing, f"position{factor}")
    with torch.no_grad():
        for table in positions.parameters():
            table.normal_()
    ours, unpacked, newline, grid_shape = packed_and_unpacked(model, factor)
    expected = reference_packing(unpacked, newline, 4, grid_shape, factor).clone()
    block_rows, block_cols = {2: (1, 2), 4: (2, 2)}[factor]
    base_rows, base_cols = 4 // block_rows, 4 // block_cols
    grid_rows, grid_cols = -(-grid_shape[0] // block_rows), -(-grid_shape[1] // block_cols)
    scale = model.config.text_config.hidden_size**0.5  # the tables are read scaled by sqrt(d)
    tables = {name: table.weight.detach() * scale for name, table in positions.named_children()}
    for r in range(base_rows):
        for c in range(base_cols):
            expected[r * base_cols + c] += tables["base_row"][r] + tables["base_col"][c]
    for r in range(grid_rows):
        for c in range(grid_cols):  # each packed row: its tokens, then its newline (left as it is)
            expected[base_rows * base_cols + r * (grid_cols + 1) + c] += tables["grid_row"][r] + tables["grid_col"][c]
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-6)


def test_a_checkpoint_without_position_tables_loads_as_zero_positions(llava, tmp_path):
    without = visor_from_llava(llava, **TINY_LAYOUT, packing_factors=[2, 4], packing_positions=False)
    assert not any("position" in name for name, _ in without.model.token_packing.named_parameters())
    with torch.no_grad():
        without.model.token_packing.pack2.bias.normal_(std=0.1)
    without.save_pretrained(tmp_path / "old")
    reference = AutoModelForImageTextToText.from_pretrained(tmp_path / "old").eval()  # loaded as saved: no tables
    config = json.loads((tmp_path / "old" / "config.json").read_text())
    del config["packing_positions"]  # a checkpoint written before the tables existed
    (tmp_path / "old" / "config.json").write_text(json.dumps(config))
    loaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "old").eval()
    assert loaded.config.packing_positions
    assert all(not table.any() for table in loaded.model.token_packing.position2.parameters())
    batch = build_batch(without, [ANYRES], packing=2)
    with torch.no_grad():
        assert torch.equal(loaded(**batch, visor_packing=2).logits, reference(**batch, visor_packing=2).logits)


def test_processor_calls_in_threads_each_keep_their_packing(monkeypatch):
    import threading

    processor = tiny_processor()
    image = random_image(20, 40)
    alone = {k: processor(text="<image> what", images=[image], packing=k).input_ids for k in (1, 2, 4)}
    inside = threading.Barrier(3)
    count = type(processor)._get_number_of_features

    def meet(self, *args):  # every call is inside `__call__` before any counts its tokens
        inside.wait(timeout=30)
        return count(self, *args)

    monkeypatch.setattr(type(processor), "_get_number_of_features", meet)
    results = {}
    threads = [
        threading.Thread(
            target=lambda k=k: results.update({k: processor(text="<image> what", images=[image], packing=k).input_ids})
        )
        for k in (1, 2, 4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert results == alone and len({len(ids[0]) for ids in alone.values()}) == 3


def test_factor_one_is_the_unpacked_model(llava, packed):
    plain = visor_from_llava(llava, **TINY_LAYOUT)  # the same weights without the packing module
    missing, unexpected = plain.load_state_dict(packed.state_dict(), strict=False)
    assert not missing and all(k.startswith("model.token_packing.") for k in unexpected)
    batch = build_batch(plain, [ANYRES, TWO_IMAGES])
    with torch.no_grad():
        expected = plain(**batch, visor_configuration=1).logits
        for factor in (None, 1, [1, 1], torch.tensor([1, 1])):
            assert torch.equal(packed(**batch, visor_configuration=1, visor_packing=factor).logits, expected)


@pytest.mark.parametrize("batching", ["masked", "grouped"])
def test_mixed_packing_factors_in_a_batch_match_each_sample_alone(packed, batching):
    samples = [ANYRES, TEXT_ONLY, TWO_IMAGES, ONE_IMAGE]
    factors = [2, 4, 4, 1]
    request = [[0], "max", [], [0, 2]]
    batch = build_batch(packed, samples, packing=factors)
    with torch.no_grad():
        together = packed(**batch, visor_configuration=request, visor_packing=factors, visor_batching=batching)
        tokens = packed.generate(
            **batch,
            visor_configuration=request,
            visor_packing=torch.tensor(factors),
            max_new_tokens=4,
            do_sample=False,
            visor_batching=batching,
        )
    report = packed.last_visor_report
    width = batch["input_ids"].shape[1]
    for row, (sample, factor, wanted) in enumerate(zip(samples, factors, request)):
        alone = build_batch(packed, [sample], packing=factor)
        with torch.no_grad():
            logits = packed(**alone, visor_configuration=wanted, visor_packing=factor).logits[0]
            own = packed.generate(**alone, visor_configuration=wanted, visor_packing=factor, max_new_tokens=4, do_sample=False)
        assert_row_matches_alone(together.logits, row, alone, logits)
        length = alone["input_ids"].shape[1]
        assert tokens[row, width:].tolist() == own[0, length:].tolist()
    # the packed prompts are shorter: the FLOPs report counts the packed visual tokens
    assert report.num_visual_tokens == (batch["input_ids"] == IMAGE_ID).sum(1).tolist()
    unpacked = build_batch(packed, samples)
    assert (batch["input_ids"] == IMAGE_ID).sum() < (unpacked["input_ids"] == IMAGE_ID).sum()


def test_beams_and_returned_sequences_follow_a_per_sample_packing_list(packed):
    samples, factors = [ANYRES, TWO_IMAGES], [4, 2]
    batch = build_batch(packed, samples, packing=factors)
    options = {"max_new_tokens": 3, "do_sample": False, "num_beams": 2, "num_return_sequences": 2, "visor_configuration": 1}
    with torch.no_grad():
        together = packed.generate(**batch, visor_packing=factors, **options)
    width = batch["input_ids"].shape[1]
    for row, (sample, factor) in enumerate(zip(samples, factors)):
        alone = build_batch(packed, [sample], packing=factor)
        with torch.no_grad():
            own = packed.generate(**alone, visor_packing=factor, **options)
        length = alone["input_ids"].shape[1]
        assert together[2 * row : 2 * row + 2, width:].tolist() == own[:, length:].tolist()


def test_cache_equals_recompute_with_packing(packed):
    batch = build_batch(packed, [ANYRES, ONE_IMAGE], packing=[4, 2])
    options = {"visor_configuration": [[0, 3], []], "visor_packing": [4, 2]}
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        out = packed(**batch, **options, use_cache=True)
        for _ in range(3):
            token = out.logits[:, -1:].argmax(-1)
            ids, mask = torch.cat([ids, token], 1), torch.cat([mask, torch.ones_like(token)], 1)
            out = packed(input_ids=token, attention_mask=mask, past_key_values=out.past_key_values, visor_packing=[4, 2])
            full = packed(**{**batch, "input_ids": ids, "attention_mask": mask}, **options, use_cache=False)
            torch.testing.assert_close(out.logits[:, -1], full.logits[:, -1], atol=1e-5, rtol=1e-5)


def test_count_mismatch_and_unsupported_factors_are_refused(llava, packed):
    unpacked = build_batch(packed, [ANYRES])
    tokens = int((unpacked["input_ids"] == IMAGE_ID).sum())
    features = int((build_batch(packed, [ANYRES], packing=2)["input_ids"] == IMAGE_ID).sum())
    assert features < tokens
    with pytest.raises(
        ValueError, match=rf"sample 0 holds {tokens} image tokens but its images packed by visor_packing=2 give {features} "
    ):
        packed(**unpacked, visor_packing=2)
    two = build_batch(packed, [ANYRES, ONE_IMAGE], packing=2)
    with pytest.raises(ValueError, match=r"holds \d+ image tokens but its images packed by visor_packing=4"):
        packed(**two, visor_packing=[4, 2])
    with pytest.raises(ValueError, match="no packing module for it"):
        packed(**unpacked, visor_packing=3)
    plain = visor_from_llava(llava, **TINY_LAYOUT)
    with pytest.raises(ValueError, match=r"visor_packing=2: this checkpoint has no packing module"):
        plain(**build_batch(plain, [TEXT_ONLY]), visor_packing=2)
    with pytest.raises(ValueError, match="entries for a batch of 1"):
        packed(**unpacked, visor_packing=[1, 2])
    with pytest.raises(ValueError, match="packing factor"):
        packed(**unpacked, visor_packing=2.0)
    with pytest.raises(TypeError, match="visor_packing"):
        packed(**unpacked, visor_pakcing=2)


# -- checkpoints ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("packing")
    save_tiny_llava(root / "src")
    convert(root / "src", root / "packed")
    return root


def read_tensors(folder):
    tensors = {}
    for path in folder.glob("*.safetensors"):
        tensors.update(load_file(path))
    return tensors


def test_conversion_adds_the_average_initialised_module_by_default(folders, tmp_path, capsys):
    tensors = read_tensors(folders / "packed")
    names = sorted(k for k in tensors if k.startswith("model.token_packing."))
    tables = [f"position{k}.{view}_{axis}.weight" for k in (2, 4) for view in ("base", "grid") for axis in ("col", "row")]
    linears = [f"pack{k}.{p}" for k in (2, 4) for p in ("bias", "weight")]
    assert names == sorted(f"model.token_packing.{n}" for n in linears + tables)
    for factor in (2, 4):
        assert torch.equal(tensors[f"model.token_packing.pack{factor}.weight"], torch.eye(32).repeat(1, factor) / factor)
        assert not tensors[f"model.token_packing.pack{factor}.bias"].any()
    assert all(not tensors[f"model.token_packing.{n}"].any() for n in tables)  # positions start at zero
    assert json.loads((folders / "packed" / "config.json").read_text())["packing_factors"] == [2, 4]
    # without the module: no tensor, no factor; the dense layout with the module still reproduces the source
    assert cli_main(["convert", str(folders / "src"), str(tmp_path / "plain"), "--no-packing"]) == 0
    assert not any(k.startswith("model.token_packing.") for k in read_tensors(tmp_path / "plain"))
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["packing_factors"] == []
    assert cli_main(["convert", str(folders / "src"), str(tmp_path / "dense"), "--dense", "--packing"]) == 0
    assert json.loads((tmp_path / "dense" / "config.json").read_text())["packing_factors"] == [2, 4]
    capsys.readouterr()
    assert cli_main(["verify", str(tmp_path / "dense"), "--against", str(folders / "src"), "--max-new-tokens", "3"]) == 0
    assert "OK" in capsys.readouterr().out


def test_trained_packing_weights_survive_save_and_load(folders, tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(folders / "packed").eval()
    with torch.no_grad():
        model.model.token_packing.pack4.weight.mul_(1.5)
    model.save_pretrained(tmp_path / "trained")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "trained")
    assert torch.equal(reloaded.model.token_packing.pack4.weight, model.model.token_packing.pack4.weight)


REMOTE = textwrap.dedent(
    """
    import json, sys
    import torch
    torch.set_num_threads(1)
    from safetensors.torch import save_file
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from PIL import Image
    import numpy as np

    folder, out_file = sys.argv[1:3]
    model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(20, 40, 3), dtype=np.uint8))
    inputs = processor(images=[image], text="<image> what is the colour ?", packing=4, return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs, visor_packing=4).logits
    save_file({"logits": logits.contiguous(), "input_ids": inputs["input_ids"].contiguous()}, out_file)
    print(json.dumps({"visor_hf_imported": any(n == "visor_hf" or n.startswith("visor_hf.") for n in sys.modules)}))
    """
)


def test_packed_checkpoint_as_remote_code_in_a_fresh_process(folders, tmp_path):
    folder = folders / "packed"
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    with torch.no_grad():  # trained-looking weights, saved with the code
        model.model.token_packing.pack4.bias.normal_(std=0.1)
    model.save_pretrained(tmp_path / "trained")
    AutoProcessor.from_pretrained(folder).save_pretrained(tmp_path / "trained")
    processor = AutoProcessor.from_pretrained(tmp_path / "trained")
    inputs = processor(images=[random_image(20, 40)], text="<image> what is the colour ?", packing=4, return_tensors="pt")
    with torch.no_grad():
        expected = model(**inputs, visor_packing=4).logits
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_MODULES_CACHE=str(tmp_path / "modules"),
        OMP_NUM_THREADS="1",
        PYTHONPATH="",
    )
    script = tmp_path / "remote.py"
    script.write_text(REMOTE)
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "trained"), str(tmp_path / "out.safetensors")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert json.loads(result.stdout.strip().splitlines()[-1]) == {"visor_hf_imported": False}
    out = load_file(str(tmp_path / "out.safetensors"))
    assert torch.equal(out["input_ids"], inputs["input_ids"])
    torch.testing.assert_close(out["logits"], expected, atol=1e-5, rtol=1e-5)


# -- training -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_repacked_batch_equals_the_processor_with_packing(packed, padding_side):
    from visor_hf.training.data import repack_placeholders

    processor = tiny_processor()
    processor.tokenizer.padding_side = padding_side
    images = [[random_image(13, 29)], [], [random_image(16, 10), random_image(30, 7)], [random_image(32, 32)]]
    texts = ["<image> what is", "how many red", "<image> a <image> what is the colour ?", "<image>"]
    full = dict(processor(text=texts, images=images, padding=True, return_tensors="pt"))
    full["labels"] = torch.where(full["input_ids"] == IMAGE_ID, -100, full["input_ids"])
    for factors in ([2] * 4, [4] * 4, [1, 2, 4, 2]):
        repacked = repack_placeholders(full, packed.config, factors)
        for row, factor in enumerate(factors):
            alone = processor(
                text=[texts[row]], images=[images[row]] if images[row] else None, packing=factor, return_tensors="pt"
            )
            valid = repacked["attention_mask"][row].bool()
            assert repacked["input_ids"][row][valid].tolist() == alone["input_ids"][0].tolist()
            assert (
                repacked["labels"][row][valid].tolist()
                == torch.where(alone["input_ids"][0] == IMAGE_ID, -100, alone["input_ids"][0]).tolist()
            )
            assert valid.tolist() == sorted(valid.tolist(), reverse=padding_side == "right")  # padding stays on its side
        inputs = {k: repacked[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images")}
        with torch.no_grad():
            packed(**inputs, visor_packing=factors)  # the model accepts the counts


def train_tiny(folders, tmp_path, stage: str, packing, steps: int, learning_rate: float, seed: int = 0):
    """`train_stage` on 8 synthetic records from the converted tiny checkpoint, to `tmp_path / "stage<stage>"`."""
    from visor_hf.training import make_synthetic_dataset, train_stage

    make_synthetic_dataset(tmp_path / "data", num_samples=8, seed=0)
    data = str(tmp_path / "data" / "data.jsonl")
    args = tiny_training_args(steps, learning_rate)
    return train_stage(
        folders / "packed", data, tmp_path / f"stage{stage}", stage, seed=seed, packing=packing, training_args=args
    )


def tiny_training_args(steps: int, learning_rate: float) -> dict:
    return {
        "max_steps": steps,
        "per_device_train_batch_size": 2,
        "learning_rate": learning_rate,
        "use_cpu": True,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
    }


def test_universal_fine_tuning_samples_configuration_and_packing_pairs(folders, tmp_path):
    from visor_hf.training import UniversalConfigurationSampler, train_stage

    config = json.loads((folders / "packed" / "config.json").read_text())
    pairs = [(c, k) for c in range(len(config["configurations"])) for k in (1, 2, 4)]
    trainer = train_tiny(folders, tmp_path, "universal", [4, 1, 2], len(pairs), 1e-3, seed=5)
    expected = [pairs[i] for i in UniversalConfigurationSampler(len(pairs), seed=5).sequence(0, len(pairs))]
    assert [drawn for _, drawn in trainer.configuration_trace] == expected
    assert sorted(expected) == pairs  # one cycle visits every (configuration, packing) pair
    log = [json.loads(line) for line in (tmp_path / "stageuniversal" / "universal_configurations.jsonl").read_text().splitlines()]
    assert [(e["configuration"], e["packing"]) for e in log] == expected
    summary = json.loads((tmp_path / "stageuniversal" / "visor_training.json").read_text())
    assert summary["universal"]["packing"] == [1, 2, 4]
    before, after = read_tensors(folders / "packed"), read_tensors(tmp_path / "stageuniversal")
    for name in ("model.token_packing.pack2.weight", "model.token_packing.pack4.weight"):
        assert not torch.equal(before[name], after[name]), name  # both packing modules trained
    with pytest.raises(ValueError, match="packing factor 3"):
        train_stage(folders / "packed", str(tmp_path / "data" / "data.jsonl"), tmp_path / "bad", "universal", packing=[1, 3])


def test_stage_one_with_packing_warms_up_the_new_modules_at_the_maximal_configuration(folders, tmp_path):
    from visor_hf.training import UniversalConfigurationSampler, train_stage

    trainer = train_tiny(folders, tmp_path, "1", [2, 4, 1], 3, 1e-2, seed=3)
    pool = [("max", 1), ("max", 2), ("max", 4)]
    assert [drawn for _, drawn in trainer.configuration_trace] == [
        pool[i] for i in UniversalConfigurationSampler(3, seed=3).sequence(0, 3)
    ]
    before, after = read_tensors(folders / "packed"), read_tensors(tmp_path / "stage1")
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert {"model.token_packing.pack2.weight", "model.token_packing.pack4.weight"} <= changed
    assert any(name.startswith("model.token_packing.position") for name in changed)
    assert any(name.startswith("model.cross_attention_blocks.") for name in changed)
    assert all(name.startswith(("model.token_packing.", "model.cross_attention_blocks.")) for name in changed)
    summary = json.loads((tmp_path / "stage1" / "visor_training.json").read_text())
    assert summary["sampled"]["packing"] == [1, 2, 4] and summary["sampled"]["configurations"] == ["max"]
    # without packing, stage 1 leaves the packing module frozen
    train_stage(
        folders / "packed",
        str(tmp_path / "data" / "data.jsonl"),
        tmp_path / "plain1",
        "1",
        training_args=tiny_training_args(1, 1e-3),
    )
    plain = read_tensors(tmp_path / "plain1")
    assert all(torch.equal(before[n], plain[n]) for n in before if n.startswith("model.token_packing."))


def test_evaluation_and_labels_at_a_packing_factor(folders, tmp_path, capsys):
    from visor_hf.training import make_synthetic_dataset, pseudo_label
    from visor_hf.training.evaluation import evaluate, read_jsonl

    make_synthetic_dataset(tmp_path / "data", num_samples=6, seed=2)
    data = str(tmp_path / "data" / "data.jsonl")
    rows = {}
    for factor in (1, 2, 4):
        summary = evaluate(folders / "packed", data, visor_configuration="max", packing=factor, output=tmp_path / f"eval{factor}")
        assert summary["packing"] == factor and summary["samples"] == 6
        rows[factor] = read_jsonl(tmp_path / f"eval{factor}" / "per_sample.jsonl")
    assert any(r["n_visual"] for r in rows[1]) and not all(r["n_visual"] for r in rows[1])
    for one, two, four in zip(rows[1], rows[2], rows[4]):
        assert one["n_text"] == two["n_text"] == four["n_text"]  # the same prompts, fewer visual tokens
        if one["n_visual"]:
            assert one["n_visual"] > two["n_visual"] > four["n_visual"] > 0
            assert one["flops"] > two["flops"] > four["flops"]
        else:  # a text-only record: the same result (the loss up to the batch's other padding)
            assert one["flops"] == two["flops"] == four["flops"] and one["correct"] == two["correct"] == four["correct"]
            assert one["loss"] == pytest.approx(two["loss"], rel=1e-5) and one["loss"] == pytest.approx(four["loss"], rel=1e-5)
    report = pseudo_label(folders / "packed", data, tmp_path / "labels", packing=4)
    assert report["packing"] == 4
    table = read_jsonl(tmp_path / "labels" / "pseudo_label_table.jsonl")
    assert {(r["index"], r["flops_dense"]) for r in table} == {(r["index"], r["flops_dense"]) for r in rows[4]}
    capsys.readouterr()
    assert (
        cli_main(["evaluate", "--model", str(folders / "packed"), "--data", data, "--configuration", "0", "--packing", "2"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["packing"] == 2


# -- the toy --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_toy_encoding_and_processor_agree_with_packing(factor):
    from visor_hf.toy.data import eval_set
    from visor_hf.toy.inference import DEFAULT_CHECKPOINT, prompt
    from visor_hf.toy.model import encode_batch

    if not (DEFAULT_CHECKPOINT / "config.json").is_file():
        pytest.skip("the toy checkpoint is not shipped in this tree")
    processor = AutoProcessor.from_pretrained(DEFAULT_CHECKPOINT)
    routing = json.loads((DEFAULT_CHECKPOINT / "config.json").read_text())["routing_token_id"]
    examples = eval_set(9, 2)[:4]
    texts = [prompt(processor, e.question.text) for e in examples]
    inputs = processor(images=[e.image for e in examples], text=texts, return_tensors="pt", padding=True, packing=factor)
    assert torch.equal(inputs["input_ids"], encode_batch(examples, routing, packing=factor)["input_ids"])


def test_toy_command_refuses_a_factor_the_checkpoint_lacks(capsys):
    from visor_hf.toy.inference import DEFAULT_CHECKPOINT

    assert not json.loads((DEFAULT_CHECKPOINT / "config.json").read_text()).get("packing_factors")  # the toy VISOR
    assert cli_main(["toy", "--images", "1", "--seed", "0", "--model", "toy-visor", "--packing", "2"]) == 2
    assert "no packing module" in capsys.readouterr().err


# -- the shipped toy VISOR-TR ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_tr():
    from visor_hf.toy.inference import TR_CHECKPOINT, load_toy

    model, _ = load_toy("toy-visor-tr")
    return model, json.loads((TR_CHECKPOINT / "results_packing.json").read_text())


@pytest.mark.parametrize("factor", [1, 2, 4])
def test_shipped_toy_visor_tr_matches_its_recorded_accuracy(toy_tr, factor):
    from visor_hf.toy.data import eval_set
    from visor_hf.toy.evaluation import evaluate_visor, report

    model, recorded = toy_tr
    assert model.config.packing_factors == [2, 4]
    ci = recorded["ci"]
    examples = eval_set(ci["seed"], ci["images"])
    result = report(evaluate_visor(model, examples, "auto", packing=factor), examples)
    expected = ci["rows"][str(factor)]
    for part in ("easy", "hard", "all"):
        assert abs(result["accuracy"][part] - expected["accuracy"][part]) <= 0.02, (part, result, expected)
    assert abs(result["flops_ratio"] - expected["flops_ratio"]) <= 0.02


def test_docs_report_the_toy_visor_tr_results(toy_tr):
    """docs/toy.md and docs/toy_packing_results.md hold the recorded rows of every configuration and the router at
    every packing factor (the last stage of `results_packing.json`)."""
    _, recorded = toy_tr
    rows = recorded["stages"][list(recorded["stages"])[-1]]
    assert {name.split(" ", 1)[0] for name in rows} == {"1x", "2x", "4x"}
    docs = Path(__file__).resolve().parents[1] / "docs"
    for text in ((docs / "toy.md").read_text(), (docs / "toy_packing_results.md").read_text()):
        for name, row in rows.items():
            factor, what = name.split(" ", 1)
            assert f"| {factor} | {what} | {row['accuracy']['all']:.3f} |" in text, name


def test_toy_command_with_packing_runs_the_toy_visor_tr(toy_tr, capsys):
    """`visor-hf toy --packing 2` (no --model) answers with the toy VISOR-TR; every printed answer and SA layer set is
    that question's own, run alone through `forward` at packing 2, and the FLOPs are against dense LLaVA-OV on all
    88 visual tokens."""
    import re

    from visor_hf.modeling.flops_visor import FlopsShape, prefill_flops
    from visor_hf.toy.inference import TR_CHECKPOINT, fresh_examples
    from visor_hf.toy.model import VOCAB, encode_batch

    model, _ = toy_tr
    assert cli_main(["toy", "--images", "2", "--seed", "5", "--packing", "2"]) == 0
    out = capsys.readouterr().out
    assert f"toy VISOR from {TR_CHECKPOINT}" in out and "token packing 2x" in out
    pattern = re.compile(
        r"^  \[(easy|hard)\] (.+?) +answer (\S*) +truth (\S+) +(ok |BAD) SA layers (\[[\d, ]*\]) +FLOPs ([\d.]+)x dense$"
    )
    lines = [m for m in map(pattern.match, out.splitlines()) if m]
    examples = fresh_examples(5, 2)
    assert len(lines) == len(examples) == 10
    shape = FlopsShape.from_config(model.config)
    for m, example in zip(lines, examples):
        _, text, answer, truth, _, layers, ratio = m.groups()
        batch = encode_batch([example], model.config.routing_token_id, packing=2)
        with torch.no_grad():
            alone = model(
                **{k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_sizes")}, visor_packing=2
            )
        routed = list(alone.visor_configurations[0])
        assert (text, truth) == (example.question.text, example.question.answer)
        assert answer == VOCAB[int(alone.logits[0, -1].argmax())] and json.loads(layers) == routed
        n_text = 2 + len(text.split()) + 1 + 3  # chat tokens, question, routing token
        visor = prefill_flops(shape, n_text, 48, routed, model.config.cross_attention_layers)  # 2x: 88 -> 48 tokens
        assert abs(float(ratio) - visor / prefill_flops(shape, n_text - 1, 88)) <= 0.005


def test_packing_and_token_reduction_are_refused_together(packed):
    """Token reduction rewrites each image's layout, which packing needs intact: combined, a clear error."""
    import copy

    from visor_hf import apply_token_reduction

    model = copy.deepcopy(packed)
    apply_token_reduction(model, "visionzip:0.5")
    inputs = tiny_processor()(text="<image>\nwhat is the colour ?", images=[random_image(16, 16)], packing=2, return_tensors="pt")
    with pytest.raises(ValueError, match="token reduction"), torch.no_grad():
        model(**inputs, visor_packing=2)

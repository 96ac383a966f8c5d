"""benchmarks/run.py keeps its results: the JSON and markdown are written before the plots, and a missing
matplotlib skips the plots with a warning instead of losing the run. The VISOR-TR rows pack to the processor's count
inside the timed prefill, and their recorded FLOPs recompute."""

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
FULL_RUN = BENCHMARKS / "results"


def load_run(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # as `python benchmarks/run.py` does
    spec = importlib.util.spec_from_file_location("benchmarks_run", BENCHMARKS / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_rerender_without_matplotlib_writes_json_and_markdown(tmp_path, monkeypatch, capsys):
    run = load_run(monkeypatch)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    with pytest.warns(RuntimeWarning, match="matplotlib is not installed"):
        run.main(["--from-json", str(FULL_RUN / "results.json"), "--out", str(tmp_path)])
    # the markdown is the one the full run wrote (same tables, same header)
    assert (tmp_path / "results.md").read_text() == (FULL_RUN / "results.md").read_text()
    report = json.loads((tmp_path / "results.json").read_text())
    original = json.loads((FULL_RUN / "results.json").read_text())
    assert report["plots"] == [] and original["plots"]
    assert report["markdown"] == original["markdown"]
    assert {key: value for key, value in report.items() if key != "plots"} == {
        key: value for key, value in original.items() if key != "plots"}
    assert not list(tmp_path.glob("*.png"))


def test_rerender_with_matplotlib_adds_the_plots(tmp_path, monkeypatch, capsys):
    pytest.importorskip("matplotlib")
    run = load_run(monkeypatch)
    run.main(["--from-json", str(FULL_RUN / "results.json"), "--out", str(tmp_path)])
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["plots"] == ["latency_vs_visual_tokens.png", "flops_vs_time.png"]
    for name in report["plots"]:
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "results.md").read_text() == (FULL_RUN / "results.md").read_text()


def test_plot_failure_leaves_the_json_and_markdown_written(tmp_path, monkeypatch, capsys):
    """The order matters: a plot that raises (here: a broken matplotlib) comes after both files are on disk."""
    run = load_run(monkeypatch)
    import visor_bench.report as report_module

    def broken_plots(report, directory):
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(report_module, "plots", broken_plots)
    with pytest.raises(RuntimeError, match="plotting failed"):
        run.main(["--from-json", str(FULL_RUN / "results.json"), "--out", str(tmp_path)])
    assert (tmp_path / "results.md").read_text() == (FULL_RUN / "results.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["markdown"]


# -- VISOR-TR (token packing) rows ----------------------------------------------------------------------------------

VISOR_TR_RUN = BENCHMARKS / "results" / "visor_tr"


def real_processor(packing):
    """LLaVA-OV's image processor (SigLIP-384 crops, the benchmark config's pinpoints) in VISOR's processor: the
    placeholder count of an image, the rule the model's packed count must follow."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    from visor_hf import VisorProcessor
    from visor_hf.testing import tiny_tokenizer

    sys.path.insert(0, str(BENCHMARKS))
    from visor_bench.shapes import QWEN2_0_5B, llava_config

    pinpoints = llava_config(QWEN2_0_5B).image_grid_pinpoints
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": 384, "width": 384}, image_grid_pinpoints=pinpoints)
    return VisorProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer(with_routing_token=True),
                          num_image_tokens=729, vision_feature_select_strategy="full", packing=packing)


def processor_count(size, packing):
    return real_processor(packing)._get_number_of_features(size[0], size[1], 384, 384)


def test_packing_image_sizes_hold_their_column_by_the_processor_rule(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from visor_bench.packing import PACKING_IMAGE_SIZES

    assert PACKING_IMAGE_SIZES
    for n_visual, size in PACKING_IMAGE_SIZES.items():
        assert processor_count(size, 1) == n_visual
        assert processor_count(size, 4) < processor_count(size, 2) < n_visual


def small_visor_tr(run):
    """The benchmark's LLaVA-OV config (SigLIP-384 layout, pinpoints, image token id) with a small LLM and a one-layer
    tower (never run: the features are given), converted to VISOR-TR as `run.main` does."""
    from transformers import LlavaOnevisionForConditionalGeneration
    from visor_bench.shapes import QWEN2_0_5B, llava_config

    from visor_hf.modeling import uniform_layer_layout
    from visor_hf.testing import visor_from_llava

    text = dict(QWEN2_0_5B, hidden_size=64, intermediate_size=128, num_hidden_layers=12, num_attention_heads=4,
                num_key_value_heads=2)
    config = llava_config(text)
    config.vision_config.num_hidden_layers = 1
    llava = LlavaOnevisionForConditionalGeneration._from_config(config, attn_implementation="sdpa").eval()
    ca, sa = uniform_layer_layout(12)
    visor_tr = run.share_weights(visor_from_llava(llava, attn_implementation="sdpa", cross_attention_layers=ca,
                                                  self_attention_layers=sa, configurations=[sa], router_layer=None,
                                                  packing_factors=[2, 4]), llava)
    sa_sets = [("visor_ca", "VISOR CA only (0 SA)", []), ("visor_sa2", f"VISOR 2 SA {sa[::2]}", sa[::2]),
               ("visor_max", f"VISOR max ({len(sa)} SA {sa})", list(sa))]
    return visor_tr, ca, sa_sets


def test_packing_rows_pack_inside_the_prefill_to_the_processor_count(monkeypatch):
    run = load_run(monkeypatch)
    from visor_bench.packing import PACKING_IMAGE_SIZES
    from visor_bench.shapes import TEXT_AFTER, TEXT_BEFORE, make_features

    from visor_hf.modeling.flops_visor import FlopsShape

    visor_tr, ca, sa_sets = small_visor_tr(run)
    shape = FlopsShape.from_config(visor_tr.config)

    def visor_step(model):
        def step(token, cache, position):
            with torch.inference_mode():
                return model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        return step

    logged = []
    assert run.packing_rows(visor_tr, None, 729, torch.device("cpu"), shape, ca, sa_sets, visor_step, logged.append) == []
    assert "no VISOR-TR rows at 729" in logged[0]
    n_visual = 7290
    size = PACKING_IMAGE_SIZES[n_visual]
    features = make_features(n_visual, 64, torch.float32, "cpu")
    rows = run.packing_rows(visor_tr, features, n_visual, torch.device("cpu"), shape, ca, sa_sets, visor_step, print)
    assert [r.name for r in rows] == [f"visor_tr{k}_{c}" for k in (2, 4) for c in ("ca", "sa2", "max")]
    layers_of = {name.removeprefix("visor_"): layers for name, _, layers in sa_sets}
    calls = []
    for factor in (2, 4):
        getattr(visor_tr.model.token_packing, f"pack{factor}").register_forward_hook(
            lambda module, args, out, factor=factor: calls.append((factor, out.shape[:2])))
    for row in rows:
        factor = row.result["packing"]
        calls.clear()
        logits, cache, length = row.prefill()
        packed = processor_count(size, factor)
        assert length == TEXT_BEFORE + packed + TEXT_AFTER
        assert row.llm_visual_tokens == f"{n_visual}->{packed}"
        # the module ran inside the timed forward, on the base view and the grid of the column's image
        assert [c[0] for c in calls] == [factor, factor]
        merged = sum(rows_ * cols for _, (rows_, cols) in calls)
        grid_rows = calls[1][1][0]
        assert merged + grid_rows == packed  # every packed token but one newline per packed grid row
        row.decode(torch.full((1, 1), 1234), cache, length)
        assert row.result["image_size"] == list(size)
        assert row.result["sa_layers"] == layers_of[row.name.split("_")[-1]]


NEWLINE = torch.tensor([1e6])


def llava_onevision_features(size):
    """The projected features of an image of `size` as LLaVA-OV's own `pack_image_features` lays them out (random
    features of width 1, `NEWLINE` for the newline)."""
    from transformers.models.llava_onevision.modeling_llava_onevision import (
        LlavaOnevisionModel,
        image_size_to_num_patches,
    )
    from visor_bench.shapes import QWEN2_0_5B, llava_config

    config = llava_config(QWEN2_0_5B)
    crops = image_size_to_num_patches(list(size), config.image_grid_pinpoints, 384)
    features = torch.rand(crops, 729, 1)
    (packed,), _ = LlavaOnevisionModel.pack_image_features(
        SimpleNamespace(config=config), [features], torch.tensor([size]), image_newline=NEWLINE,
        vision_aspect_ratio="anyres_max_9")
    return packed


def test_recorded_visor_tr_rows_recompute():
    """The FLOPs recorded for the VISOR-TR rows of the recorded run: the LLM on the processor's packed count plus
    2 k d^2 per merged token (every packed token but the newlines), against dense LLaVA-OV on every unpacked token."""
    sys.path.insert(0, str(BENCHMARKS))
    from visor_bench.report import recompute_flops

    from visor_hf.modeling.flops_visor import FlopsShape, decode_flops, prefill_flops

    original = json.loads((VISOR_TR_RUN / "results.json").read_text())
    report = json.loads((VISOR_TR_RUN / "results.json").read_text())
    recompute_flops(report)
    shape = FlopsShape(num_layers=24, hidden_size=896, intermediate_size=4864, num_heads=14, num_kv_heads=2,
                       head_dim=64, vocab_size=151936)
    ca = original["model"]["cross_attention_layers"]
    checked = 0
    for size, again in zip(original["sizes"], report["sizes"]):
        n_visual, n_text = size["n_visual"], size["n_text"]
        dense = prefill_flops(shape, n_text, n_visual)
        for row, row_again in zip(size["rows"], again["rows"]):
            if "packing" not in row:
                continue
            factor, image = row["packing"], row["image_size"]
            packed = processor_count(image, factor)
            assert processor_count(image, 1) == n_visual
            assert row["llm_visual_tokens"] == f"{n_visual}->{packed}"
            features = llava_onevision_features(image)
            assert features.shape[0] == n_visual
            grid_rows = int((features == NEWLINE).all(-1).sum())  # one newline per anyres grid row
            newlines = grid_rows if factor == 2 else -(-grid_rows // 2)  # 4x merges pairs of rows
            own = 2 * factor * 896 * 896 * (packed - newlines)
            layers = row["sa_layers"]
            expected = prefill_flops(shape, n_text, packed, layers, ca) + own
            assert row["flops_prefill"] == row_again["flops_prefill"] == expected
            assert row["flops_decode"] == row_again["flops_decode"] == decode_flops(shape, n_text, packed, layers, ca)
            assert row["speedup_flops"] == pytest.approx(dense / expected, rel=1e-12)
            assert row_again["speedup_flops"] == pytest.approx(row["speedup_flops"], rel=1e-12)
            checked += 1
    assert checked >= 6

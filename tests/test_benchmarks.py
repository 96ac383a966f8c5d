"""benchmarks/run.py keeps its results: the JSON and markdown are written before the plots, and a missing
matplotlib skips the plots with a warning instead of losing the run."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

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

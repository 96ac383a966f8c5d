"""The two figures of a run (prefill latency against visual tokens; measured against analytical speedup).
matplotlib is optional (the `bench` extra): without it the plots are skipped with a warning."""

from __future__ import annotations

import warnings
from pathlib import Path


def plots(report, directory: Path) -> list[str]:
    """Write the two PNGs into `directory`; returns their file names (none without matplotlib)."""
    try:
        import matplotlib
    except ImportError:
        warnings.warn("matplotlib is not installed (pip install 'visor-hf[bench]'): plots skipped; "
                      f"results.json and results.md are in {directory}", RuntimeWarning, stacklevel=2)
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in report["sizes"][0]["rows"]]
    labels = {r["name"]: r["label"] for r in report["sizes"][0]["rows"]}
    xs = [s["n_visual"] for s in report["sizes"]]
    fig, ax = plt.subplots(figsize=(7, 5))
    for name in names:
        ys = [next(r for r in s["rows"] if r["name"] == name)["prefill_ms"] / 1000 for s in report["sizes"]]
        ax.plot(xs, ys, marker="o", label=labels[name], linestyle="--" if name in ("pool2x", "pool4x", "fastv") or "visionzip" in name else "-")
    ax.set_title(f"Prefill latency, LLaVA-OV 0.5B shapes, {report['machine']['device_name']}")
    latency = _save_log_log(plt, fig, ax, "visual tokens (before any reduction)", "prefill latency, s (median)",
                            directory / "latency_vs_visual_tokens.png")

    fig, ax = plt.subplots(figsize=(6, 6))
    top = 1.0
    for s in report["sizes"]:
        xs_, ys_ = [r["speedup_flops"] for r in s["rows"]], [r["speedup_time"] for r in s["rows"]]
        top = max(top, *xs_, *ys_)
        ax.scatter(xs_, ys_, label=f"{s['n_visual']} visual tokens")
        if s is report["sizes"][-1]:
            for r in s["rows"]:
                ax.annotate(r["name"], (r["speedup_flops"], r["speedup_time"]), fontsize=7)
    line = [1, top * 1.2]
    ax.plot(line, line, "k-", lw=0.8, label="measured = FLOPs")
    ax.plot(line, [0.7 * x for x in line], "k:", lw=0.8, label="70 % of FLOPs")
    scatter = _save_log_log(plt, fig, ax, "analytical prefill speedup over dense (FLOPs ratio)",
                            "measured prefill speedup over dense (time ratio)", directory / "flops_vs_time.png")
    return [latency.name, scatter.name]


def _save_log_log(plt, fig, ax, xlabel: str, ylabel: str, path: Path) -> Path:
    """Log-log axes with labels, grid and legend; the figure written to `path` and closed."""
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

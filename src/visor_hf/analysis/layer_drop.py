"""Layer-drop analysis: how much each data group needs vision in each layer.

The visual tokens are removed from a subset of the layers that can skip them, and the accuracy of every data group is
measured against the layers that keep vision. With VISOR this needs no new model code: a model's SA layers are the
layers that can drop vision, and `visor_configuration=[layers]` runs exactly those with vision (a dense-layout
checkpoint, `visor-hf convert SRC DST --dense`, has every layer as SA layer: the analysis of LLaVA-OV itself).

From the accuracies of all subsets:

- **vision sensitivity** of layer l for group g: mean accuracy of the subsets that keep vision in l minus the mean
  accuracy of those that do not (the main effect of l; subsets are drawn evenly over their sizes);
- **easy/hard clustering**: each group's curve of mean accuracy against the number of layers that keep vision,
  divided by its accuracy with every layer, split into two clusters (2-means); the cluster that keeps more accuracy
  when vision is dropped is "easy";
- **suggested layout**: the most sensitive layers become SA layers, the other layers that still matter become CA
  layers (see `suggest_layout`).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import numpy as np


def layer_subsets(layers: list[int], per_size: int | None = None, seed: int = 0) -> list[tuple[int, ...]]:
    """Subsets of `layers` that keep vision: every subset when `per_size` is None, else up to `per_size` random
    subsets of each size 0..len(layers) (the empty and the full set always)."""
    layers = sorted(layers)
    rng = np.random.default_rng(seed)
    out: list[tuple[int, ...]] = []
    for k in range(len(layers) + 1):
        total = math.comb(len(layers), k)
        if per_size is None or total <= per_size:
            out += [tuple(c) for c in itertools.combinations(layers, k)]
            continue
        seen: set[tuple[int, ...]] = set()
        while len(seen) < per_size:
            seen.add(tuple(sorted(int(x) for x in rng.choice(layers, size=k, replace=False))))
        out += sorted(seen)
    return out


@dataclass
class LayerDropResult:
    """Accuracy per (subset that keeps vision, group), and the analysis derived from it."""

    layers: list[int]  # the layers that can drop vision (the model's SA layers)
    cross_attention_layers: list[int]
    num_layers: int
    groups: list[str]
    subsets: list[tuple[int, ...]]
    accuracy: np.ndarray  # [subset, group]
    counts: dict[str, int] = field(default_factory=dict)

    def curve(self) -> np.ndarray:
        """[group, k]: mean accuracy over the subsets with k layers keeping vision, k = 0..len(layers) (NaN for a
        size that no subset has)."""
        sizes = np.array([len(s) for s in self.subsets])
        empty = np.full(len(self.groups), np.nan)
        return np.stack([self.accuracy[sizes == k].mean(0) if (sizes == k).any() else empty
                         for k in range(len(self.layers) + 1)], axis=1)

    def sensitivity(self) -> np.ndarray:
        """[group, layer]: mean accuracy with vision in the layer minus without it (balanced over subset sizes; NaN
        when no subset pair of sizes k+1 with the layer and k without it was run)."""
        sizes = np.array([len(s) for s in self.subsets])
        out = np.zeros((len(self.groups), len(self.layers)))
        for j, layer in enumerate(self.layers):
            has = np.array([layer in s for s in self.subsets])
            diffs = []
            for k in range(len(self.layers)):  # sizes where both a subset with and one without the layer exist
                with_l, without_l = has & (sizes == k + 1), ~has & (sizes == k)
                if with_l.any() and without_l.any():
                    diffs.append(self.accuracy[with_l].mean(0) - self.accuracy[without_l].mean(0))
            out[:, j] = np.mean(diffs, axis=0) if diffs else np.nan
        return out

    def clusters(self) -> dict[str, str]:
        """"easy" or "hard" per group: 2-means on the accuracy curves, each divided by the group's full accuracy."""
        curves = self.curve()
        curves = curves[:, ~np.isnan(curves).any(0)]  # the sizes that were run
        full = np.maximum(curves[:, -1:], 1e-9)
        points = curves / full
        robustness = points.mean(1)
        if len(self.groups) == 1:
            return {self.groups[0]: "easy" if robustness[0] >= 0.9 else "hard"}
        centres = points[[int(np.argmax(robustness)), int(np.argmin(robustness))]]
        for _ in range(50):
            labels = np.argmin(((points[:, None] - centres[None]) ** 2).sum(-1), axis=1)
            new = np.stack([points[labels == c].mean(0) if (labels == c).any() else centres[c] for c in (0, 1)])
            if np.allclose(new, centres):
                break
            centres = new
        easy = int(np.argmax(centres.mean(1)))
        return {g: "easy" if label == easy else "hard" for g, label in zip(self.groups, labels)}

    def suggest_layout(self, sa_count: int | None = None, min_gain: float = 0.01) -> dict:
        """CA/SA layers from the sensitivity (the largest over groups, per layer).

        SA layers: the `sa_count` most sensitive layers (default: those at least half as sensitive as the most
        sensitive one). CA layers: the model's CA layers, plus the other droppable layers whose sensitivity is at
        least `min_gain` (vision read there still helps), plus layer 0 when nothing else reads vision early. The
        remaining layers become text-only. Pass them to `visor-hf convert SRC DST --ca-layers ... --sa-layers ...`.
        """
        score = np.nan_to_num(self.sensitivity(), nan=0.0).max(0)
        order = [self.layers[i] for i in np.argsort(-score, kind="stable")]
        if sa_count is None:
            sa_count = max(1, int((score >= 0.5 * score.max()).sum())) if score.max() > 0 else 1
        sa = sorted(order[:sa_count])
        by_layer = dict(zip(self.layers, score))
        ca = set(self.cross_attention_layers) | {layer for layer in self.layers if layer not in sa and by_layer[layer] >= min_gain}
        if not ca and 0 not in sa:
            ca.add(0)
        return {"cross_attention_layers": sorted(ca), "self_attention_layers": sa,
                "command": f"--ca-layers {','.join(map(str, sorted(ca)))} --sa-layers {','.join(map(str, sa))}"}

    def to_dict(self) -> dict:
        def number(v):
            return None if np.isnan(v) else float(v)

        sens = self.sensitivity()
        return {
            "layers": self.layers,
            "cross_attention_layers": self.cross_attention_layers,
            "groups": self.groups,
            "samples": self.counts,
            "accuracy": [{"vision_layers": list(s), **{g: float(a) for g, a in zip(self.groups, row)}}
                         for s, row in zip(self.subsets, self.accuracy)],
            "curve": {g: [number(v) for v in row] for g, row in zip(self.groups, self.curve())},
            "sensitivity": {g: {str(layer): number(v) for layer, v in zip(self.layers, row)} for g, row in zip(self.groups, sens)},
            "clusters": self.clusters(),
            "suggested_layout": self.suggest_layout(),
        }


def run_layer_drop(score, layers: list[int], subsets: list[tuple[int, ...]], groups: list[str], cross_attention_layers: list[int],
                   num_layers: int) -> LayerDropResult:
    """`score(subset)` -> per-sample correctness (bools, one per sample, same order every call); `groups[i]` is sample
    i's data group. Accuracy per subset and group."""
    names = sorted(set(groups), key=groups.index)
    index = np.array([names.index(g) for g in groups])
    rows = []
    for subset in subsets:
        correct = np.asarray(score(list(subset)), dtype=float)
        if correct.shape != index.shape:
            raise ValueError(f"score returned {correct.shape[0]} results for {index.shape[0]} samples")
        rows.append([correct[index == g].mean() for g in range(len(names))])
    counts = {name: int((index == g).sum()) for g, name in enumerate(names)}
    return LayerDropResult(sorted(layers), sorted(cross_attention_layers), num_layers, names, list(subsets), np.array(rows), counts)


def plot(result: LayerDropResult, path) -> None:
    """Accuracy against the number of layers keeping vision (one line per group, dashed = hard cluster) and the
    per-layer sensitivity heat map. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clusters = result.clusters()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    ks = np.arange(len(result.layers) + 1)
    for g, row in zip(result.groups, result.curve()):
        left.plot(ks, row, marker="o", linestyle="-" if clusters[g] == "easy" else "--", label=f"{g} ({clusters[g]})")
    left.set_xlabel("layers keeping vision (of the droppable layers)")
    left.set_ylabel("accuracy")
    left.set_xticks(ks)
    left.legend(fontsize=8)
    left.set_title("accuracy as vision is dropped from random layers")
    sens = result.sensitivity()
    image = right.imshow(sens, cmap="viridis", aspect="auto")
    right.set_xticks(range(len(result.layers)), [str(layer) for layer in result.layers])
    right.set_yticks(range(len(result.groups)), result.groups)
    right.set_xlabel("layer")
    right.set_title("vision sensitivity (accuracy gain from vision in the layer)")
    fig.colorbar(image, ax=right)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


__all__ = ["LayerDropResult", "layer_subsets", "plot", "run_layer_drop"]

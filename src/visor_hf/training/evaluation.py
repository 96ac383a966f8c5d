"""Per-sample scoring of a VISOR model on conversation records (shared by search, pseudo-labels, router and evaluation).

Metrics of one sample (teacher forcing, one forward over prompt + reference answer):

- `loss`: mean cross-entropy over the answer tokens (the `labels` that are not -100);
- `correct`: every answer token, end-of-turn included, is the model's arg-max prediction. Under teacher forcing this
  is exactly "greedy decoding reproduces the reference answer and stops", computed without generating;
- `flops`: analytical LLM prefill FLOPs of the *prompt* (every token before the first answer token) with the
  configuration that ran, LM head on one token (`flops_visor.prefill_flops`); `flops_max` and `flops_dense` are the
  same prompt under the maximal configuration and under dense LLaVA-OV.

Inference runs through `accelerate` (`accelerate launch` shards the data over processes; results are gathered).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch
from torch.nn import functional as F

from ..modeling.flops_visor import FlopsShape, prefill_flops
from ..modeling.requests_visor import check_configuration, parse_configuration
from .data import IGNORE_INDEX, model_inputs

FIELDS = ("index", "correct", "loss", "answer_tokens", "n_text", "n_visual", "layers_mask", "configuration", "flops", "flops_max", "flops_dense")


def layers_to_mask(layers) -> int:
    return sum(1 << int(i) for i in layers)


def mask_to_layers(mask: int) -> list[int]:
    return [i for i in range(64) if (int(mask) >> i) & 1]


def _accelerator(accelerator=None):
    if accelerator is not None:
        return accelerator
    from accelerate import Accelerator

    return Accelerator()


@torch.no_grad()
def score_dataset(model, dataset, collator, visor_configuration="max", batch_size: int = 8, accelerator=None, progress: bool = True, prepare_inputs=None,
                  router_threshold=None) -> list[dict]:
    """One result dict per sample (fields `FIELDS`, `layers` instead of `layers_mask`), sorted by dataset index.

    `visor_configuration`: anything the model's forward takes (index, layer list, `"max"`, `"auto"` = the router).
    `prepare_inputs(model, inputs)`: changes the forward's inputs only (not what is counted), e.g. the unseen image
    that a sharded model needs on a text-only batch (`sharding.ShardedStep`).
    `router_threshold`: the calibrated router's threshold (`visor_router_threshold=`; default: the config's).
    """
    from torch.utils.data import DataLoader

    accelerator = _accelerator(accelerator)
    unwrapped = accelerator.unwrap_model(model)
    config = unwrapped.config
    shape = FlopsShape.from_config(config)
    cross = config.cross_attention_layers
    visual_ids = {config.image_token_id, config.video_token_id}
    was_training = model.training
    model.eval()
    device = accelerator.device
    if next(model.parameters()).device != device:
        model.to(device)
    loader = accelerator.prepare(DataLoader(dataset, batch_size=batch_size, collate_fn=collator, shuffle=False))
    rows = []
    iterator = loader
    if progress and accelerator.is_main_process:
        from tqdm.auto import tqdm

        iterator = tqdm(loader, desc=f"scoring {visor_configuration!r}", leave=False)
    for batch in iterator:
        labels = batch["labels"]
        keep = torch.zeros_like(labels, dtype=torch.bool)
        keep[:, :-1] = labels[:, 1:] != IGNORE_INDEX
        targets = labels[:, 1:][keep[:, :-1]]
        inputs = {**model_inputs(batch, keep_labels=False), "logits_to_keep": keep}
        if prepare_inputs is not None:
            inputs = prepare_inputs(model, inputs)
        extra = {"visor_router_threshold": router_threshold} if router_threshold is not None else {}
        out = model(**inputs, visor_configuration=visor_configuration, use_cache=False, **extra)
        logits = out.logits.reshape(-1, out.logits.shape[-1]).float()
        row_of = keep.nonzero()[:, 0]
        size = labels.shape[0]
        token_loss = F.cross_entropy(logits, targets, reduction="none") if targets.numel() else logits.new_zeros(0)
        token_ok = (logits.argmax(-1) == targets).long() if targets.numel() else targets.new_zeros(0)
        count = torch.zeros(size, dtype=torch.long, device=labels.device).index_add_(0, row_of, torch.ones_like(row_of))
        loss_sum = torch.zeros(size, device=labels.device).index_add_(0, row_of, token_loss)
        ok = torch.zeros(size, dtype=torch.long, device=labels.device).index_add_(0, row_of, token_ok)

        valid = batch["attention_mask"].bool()
        is_visual = torch.zeros_like(valid)
        for token in visual_ids:
            if token is not None:
                is_visual |= batch["input_ids"] == token
        answer = labels != IGNORE_INDEX
        first_answer = torch.where(answer.any(1), answer.float().argmax(1), torch.full_like(answer[:, 0], labels.shape[1], dtype=torch.long))
        before = torch.arange(labels.shape[1], device=labels.device)[None] < first_answer[:, None]
        n_text = (valid & ~is_visual & before).sum(1).tolist()
        n_visual = (valid & is_visual).sum(1).tolist()
        layer_sets = out.visor_configurations or [tuple(config.max_configuration)] * size
        index = out.configuration_index if out.configuration_index is not None else torch.full((size,), -1)
        flops, flops_max, flops_dense = [], [], []
        for layers, t, v in zip(layer_sets, n_text, n_visual):
            flops.append(prefill_flops(shape, t, v, layers, cross))
            flops_max.append(prefill_flops(shape, t, v, config.max_configuration, cross))
            flops_dense.append(prefill_flops(shape, t, v))
        columns = [
            batch["sample_index"].to(device),
            (ok == count) & (count > 0),
            loss_sum / count.clamp(min=1),
            count,
            torch.tensor(n_text, device=device),
            torch.tensor(n_visual, device=device),
            torch.tensor([layers_to_mask(s) for s in layer_sets], device=device),
            index.to(device),
            torch.tensor(flops, device=device),
            torch.tensor(flops_max, device=device),
            torch.tensor(flops_dense, device=device),
        ]
        table = torch.stack([c.to(torch.float64) for c in columns], 1)
        rows.append(accelerator.gather_for_metrics(table).cpu())
    if was_training:
        model.train()
    results = []
    if rows:
        for values in torch.cat(rows).tolist():
            record = dict(zip(FIELDS, values))
            for key in ("index", "answer_tokens", "n_text", "n_visual", "configuration", "flops", "flops_max", "flops_dense"):
                record[key] = int(record[key])
            record["correct"] = bool(record["correct"])
            record["layers"] = mask_to_layers(int(record.pop("layers_mask")))
            results.append(record)
    results.sort(key=lambda r: r["index"])
    return results


def summarize(results: list[dict]) -> dict:
    """Accuracy, losses, average FLOPs (and their ratio to the maximal configuration and to dense LLaVA-OV) and the
    histogram of the configurations that ran."""
    n = len(results)
    if n == 0:
        return {"samples": 0}
    tokens = sum(r["answer_tokens"] for r in results)
    flops = sum(r["flops"] for r in results) / n
    flops_max = sum(r["flops_max"] for r in results) / n
    flops_dense = sum(r["flops_dense"] for r in results) / n
    histogram = Counter(json.dumps(r["layers"]) for r in results)
    return {
        "samples": n,
        "accuracy": sum(r["correct"] for r in results) / n,
        "loss": sum(r["loss"] * r["answer_tokens"] for r in results) / max(tokens, 1),  # per answer token
        "sample_loss": sum(r["loss"] for r in results) / n,  # mean of the per-sample means
        "average_flops": flops,
        "average_flops_max": flops_max,
        "average_flops_dense": flops_dense,
        "flops_ratio_to_max": flops / flops_max if flops_max else None,
        "flops_saving_vs_dense": flops_dense / flops if flops else None,
        "configuration_histogram": {k: v for k, v in sorted(histogram.items(), key=lambda kv: -kv[1])},
    }


def write_jsonl(path, rows) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return path


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def evaluate(model_path, data, *, visor_configuration="auto", batch_size: int = 8, image_root=None, limit=None, output=None, dtype=None,
             attn_implementation=None, router_threshold=None, packing: int = 1) -> dict:
    """Run a checkpoint on an evaluation set with a fixed configuration or the router (`"auto"`); returns the
    summary (accuracy, average FLOPs, configuration histogram) and writes `output` (a folder: `summary.json` and
    `per_sample.jsonl`) when given. `packing`: the images' token packing factor (the FLOPs count the packed tokens)."""
    from .data import VisorDataCollator, load_processor, load_records
    from .stages import load_model

    model = load_model(model_path, dtype, attn_implementation)
    check_configuration(model.config, visor_configuration)
    processor = load_processor(model_path)
    dataset = load_records(data, image_root, limit)
    accelerator = _accelerator()
    results = score_dataset(model, dataset, VisorDataCollator(processor, packing=packing), visor_configuration, batch_size, accelerator,
                            router_threshold=router_threshold)
    summary = summarize(results)
    summary["visor_configuration"] = visor_configuration
    summary["packing"] = packing
    summary["router_threshold"] = router_threshold
    summary["checkpoint"] = str(model_path)
    if output is not None and accelerator.is_main_process:
        output = Path(output)
        output.mkdir(parents=True, exist_ok=True)
        write_jsonl(output / "per_sample.jsonl", results)
        (output / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


DEFAULT_THRESHOLDS = (0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 0.97, 0.98, 0.99, 1.0)


@torch.no_grad()
def router_choices(model, dataset, collator, thresholds, batch_size: int = 8, accelerator=None) -> dict[int, list[int]]:
    """`{sample index: [configuration the router picks at each threshold]}` (one entry for an arg-max router,
    `thresholds` ignored). One forward per batch with the cheapest configuration: the router reads a layer before
    every switchable SA layer, so its choice does not depend on the configuration that runs."""
    from torch.utils.data import DataLoader

    from ..modeling.routing_visor import check_threshold, select_configurations

    accelerator = _accelerator(accelerator)
    config = accelerator.unwrap_model(model).config
    calibrated = config.router_type == "calibrated"
    thresholds = [check_threshold(t) for t in thresholds] if calibrated else [None]
    cheapest = min(range(len(config.configurations)), key=lambda c: (len(config.configurations[c]), c))
    model.eval()
    loader = accelerator.prepare(DataLoader(dataset, batch_size=batch_size, collate_fn=collator, shuffle=False))
    rows = []
    for batch in loader:
        out = model(**model_inputs(batch, keep_labels=False), visor_configuration=cheapest, output_router_logits=True,
                    logits_to_keep=1, use_cache=False)
        size = batch["input_ids"].shape[0]
        columns = [batch["sample_index"].to(torch.float64)]
        for t in thresholds:
            chosen = select_configurations(out.router_logits, out.routing_token_batch_index, size, config.configurations,
                                           None if t is None else [t] * size)
            columns.append(torch.tensor(chosen, dtype=torch.float64, device=batch["sample_index"].device))
        rows.append(accelerator.gather_for_metrics(torch.stack(columns, 1)).cpu())
    return {int(r[0]): [int(v) for v in r[1:]] for r in torch.cat(rows).tolist()} if rows else {}


def _point(results: list[dict], groups: list[str] | None) -> dict:
    summary = summarize(results)
    point = {k: summary[k] for k in ("samples", "accuracy", "loss", "average_flops", "flops_ratio_to_max", "flops_saving_vs_dense")}
    point["flops_ratio_to_dense"] = summary["average_flops"] / summary["average_flops_dense"] if summary["average_flops_dense"] else None
    if groups is not None:
        from .search import group_summaries

        point["groups"] = {g: v["accuracy"] for g, v in group_summaries(results, groups).items()}
    point["configuration_histogram"] = summary["configuration_histogram"]
    return point


def router_curve(model, dataset, collator, thresholds=DEFAULT_THRESHOLDS, batch_size: int = 8, accelerator=None,
                 groups: list[str] | None = None) -> dict:
    """The accuracy-vs-FLOPs curve of the router: every configuration of the model run on every sample (the fixed
    points), and the router at each threshold (`thresholds`; one point for an arg-max router), whose per-sample result
    is that of the configuration it picks (exact: the router's input does not depend on the configuration). Also
    the router at the model's own threshold through `visor_configuration="auto"`, as a check of the lookup."""
    accelerator = _accelerator(accelerator)
    config = accelerator.unwrap_model(model).config
    fixed = [score_dataset(model, dataset, collator, c, batch_size, accelerator, progress=False) for c in range(len(config.configurations))]
    by_index = [{r["index"]: r for r in rows} for rows in fixed]
    choices = router_choices(model, dataset, collator, thresholds, batch_size, accelerator)
    points = [{"name": f"fixed {layers}", "layers": layers, **_point(rows, groups)} for layers, rows in zip(config.configurations, fixed)]
    calibrated = config.router_type == "calibrated"
    for k, t in enumerate(thresholds if calibrated else [None]):
        rows = [by_index[choice[k] if choice[k] >= 0 else -1][index] for index, choice in sorted(choices.items())]
        points.append({"name": "router" if t is None else f"router t={t:g}", "threshold": t, **_point(rows, groups)})
    measured = score_dataset(model, dataset, collator, "auto", batch_size, accelerator, progress=False)
    looked_up = [by_index[r["configuration"]][r["index"]]["correct"] for r in measured]
    return {
        "router_type": config.router_type,
        "router_threshold": config.router_threshold if calibrated else None,
        "configurations": config.configurations,
        "points": points,
        "measured_router": _point(measured, groups),
        "lookup_agreement": sum(a == r["correct"] for a, r in zip(looked_up, measured)) / max(len(measured), 1),
    }


def curve_table(curve: dict) -> str:
    """A Markdown table of a `router_curve` (accuracy overall and per group, FLOPs against dense)."""
    groups = sorted({g for p in curve["points"] for g in p.get("groups", {})})
    lines = ["| point | accuracy | " + " | ".join(groups) + (" | " if groups else "") + "prefill FLOPs / dense | saving |",
             "|---|---|" + "---|" * len(groups) + "---|---|"]
    for p in curve["points"]:
        cells = " | ".join(f"{p['groups'].get(g, float('nan')):.3f}" for g in groups)
        lines.append(f"| {p['name']} | {p['accuracy']:.3f} | {cells}{' | ' if groups else ''}{p['flops_ratio_to_dense']:.3f} | "
                     f"{p['flops_saving_vs_dense']:.2f}x |")
    return "\n".join(lines) + "\n"


def plot_curve(curve: dict, path) -> None:
    """Accuracy against prefill FLOPs / dense: fixed configurations as points, the router's thresholds as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    fixed = [p for p in curve["points"] if "layers" in p]
    router = [p for p in curve["points"] if "layers" not in p]
    ax.scatter([p["flops_ratio_to_dense"] for p in fixed], [p["accuracy"] for p in fixed], color="tab:blue", label="fixed configurations", zorder=3)
    for p in fixed:
        ax.annotate(str(p["layers"]), (p["flops_ratio_to_dense"], p["accuracy"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.plot([p["flops_ratio_to_dense"] for p in router], [p["accuracy"] for p in router], "-*", color="tab:red", label="router (thresholds)")
    for p in router:
        if p.get("threshold") is not None:
            ax.annotate(f"{p['threshold']:g}", (p["flops_ratio_to_dense"], p["accuracy"]), fontsize=6, xytext=(2, -9), textcoords="offset points", color="tab:red")
    ax.set_xlabel("LLM prefill FLOPs / dense LLaVA-OV")
    ax.set_ylabel("exact-match accuracy")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def evaluate_curve(model_path, data, *, thresholds=DEFAULT_THRESHOLDS, group_field: str | None = "source", batch_size: int = 8,
                   image_root=None, limit=None, output=None, dtype=None, attn_implementation=None, packing: int = 1) -> dict:
    """`router_curve` of a checkpoint on an evaluation set (images packed by `packing`); writes `curve.json`,
    `curve.md` and `curve.png` to `output` when given."""
    from .data import VisorDataCollator, load_processor, load_records
    from .search import record_groups
    from .stages import load_model

    model = load_model(model_path, dtype, attn_implementation)
    if model.model.router is None:
        raise ValueError("this checkpoint has no router: there is no curve to draw")
    processor = load_processor(model_path)
    dataset = load_records(data, image_root, limit)
    groups = record_groups(dataset, group_field) if group_field else None
    accelerator = _accelerator()
    curve = router_curve(model, dataset, VisorDataCollator(processor, packing=packing), thresholds, batch_size, accelerator, groups)
    curve["checkpoint"] = str(model_path)
    curve["packing"] = packing
    curve["group_field"] = group_field
    if output is not None and accelerator.is_main_process:
        output = Path(output)
        output.mkdir(parents=True, exist_ok=True)
        (output / "curve.json").write_text(json.dumps(curve, indent=2))
        (output / "curve.md").write_text(curve_table(curve))
        plot_curve(curve, output / "curve.png")
    return curve


__all__ = ["DEFAULT_THRESHOLDS", "curve_table", "evaluate", "evaluate_curve", "parse_configuration", "plot_curve", "read_jsonl",
           "router_choices", "router_curve", "score_dataset", "summarize", "write_jsonl"]

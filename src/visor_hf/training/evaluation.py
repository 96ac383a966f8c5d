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
def score_dataset(model, dataset, collator, visor_configuration="max", batch_size: int = 8, accelerator=None, progress: bool = True, prepare_inputs=None) -> list[dict]:
    """One result dict per sample (fields `FIELDS`, `layers` instead of `layers_mask`), sorted by dataset index.

    `visor_configuration`: anything the model's forward takes (index, layer list, `"max"`, `"auto"` = the router).
    `prepare_inputs(model, inputs)`: changes the forward's inputs only (not what is counted), e.g. the unseen image
    that a sharded model needs on a text-only batch (`sharding.ShardedStep`).
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
        out = model(**inputs, visor_configuration=visor_configuration, use_cache=False)
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


def evaluate(model_path, data, *, visor_configuration="auto", batch_size: int = 8, image_root=None, limit=None, output=None, dtype=None, attn_implementation=None) -> dict:
    """Run a checkpoint on an evaluation set with a fixed configuration or the router (`"auto"`); returns the
    summary (accuracy, average FLOPs, configuration histogram) and writes `output` (a folder: `summary.json` and
    `per_sample.jsonl`) when given."""
    from .data import VisorDataCollator, load_processor, load_records
    from .stages import load_model

    model = load_model(model_path, dtype, attn_implementation)
    check_configuration(model.config, visor_configuration)
    processor = load_processor(model_path)
    dataset = load_records(data, image_root, limit)
    accelerator = _accelerator()
    results = score_dataset(model, dataset, VisorDataCollator(processor), visor_configuration, batch_size, accelerator)
    summary = summarize(results)
    summary["visor_configuration"] = visor_configuration
    summary["checkpoint"] = str(model_path)
    if output is not None and accelerator.is_main_process:
        output = Path(output)
        output.mkdir(parents=True, exist_ok=True)
        write_jsonl(output / "per_sample.jsonl", results)
        (output / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


__all__ = ["evaluate", "parse_configuration", "read_jsonl", "score_dataset", "summarize", "write_jsonl"]

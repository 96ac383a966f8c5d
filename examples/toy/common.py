"""Shared pieces of the toy training script: seeds, logging, packed batches, evaluation."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch

from visor_hf.toy.data import all_questions, make_scene, render
from visor_hf.toy.evaluation import summarize  # noqa: F401  (used by the other scripts)
from visor_hf.toy.model import (
    ASSISTANT_ID,
    IM_END_ID,
    IM_START_ID,
    IMAGE_ID,
    NUM_IMAGE_TOKENS,
    PAD_ID,
    USER_ID,
    WORD_ID,
    image_features,
    pixel_batch,
    word_ids,
)

TRAIN_SEED_BASE = 10_000_000  # training pictures: seeds from here on; evaluation sets use seeds below it
START = time.time()


def log(message: str, file=None) -> None:
    line = f"[{time.time() - START:7.1f}s] {message}"
    print(line, flush=True)
    if file is not None:
        with open(file, "a") as f:
            f.write(line + "\n")


def lr_factor(step: int, total: int, warmup: int = 100, hold: float = 0.6) -> float:
    """Linear warm-up, constant until `hold` of the run, then cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    start = int(total * hold)
    if step < start:
        return 1.0
    return 0.5 * (1 + math.cos(math.pi * (step - start) / max(1, total - start)))


def train_scenes(step: int, batch: int, offset: int = 0):
    return [make_scene(TRAIN_SEED_BASE + offset + step * batch + i) for i in range(batch)]


def packed_questions(scene, rng, num_cells: int = 8):
    questions = [q for q in all_questions(scene) if q.kind != "cell"]
    cells = [q for q in all_questions(scene) if q.kind == "cell"]
    picks = rng.permutation(len(cells))[:num_cells]
    return questions + [cells[i] for i in sorted(picks)]


KEY_WORD = {"cell": 3, "count_shape": 2, "count_colour": 2}  # "what is in r3c2 ?", "how many blue shapes are there ?"


def packed_batch(scenes, rng, num_cells: int = 8, processor=None, cell_word_target: bool = False,
                 count_word_target: bool = False) -> dict:
    """One row per picture: the image prefix, then every question as its own segment that sees only the image and
    itself (4-D mask), positions restarting after the image. Equivalent to one sample per question.

    `cell_word_target`: a cell question's answer is also a target at the cell word itself ("r3c2"), an auxiliary
    target (kind None, so evaluations ignore it; `auxiliary` marks it) that makes the cell token fetch its cell's
    content from the image. `count_word_target`: the same for counting questions, at the colour or shape word."""
    prefix = [IM_START_ID, USER_ID] + [IMAGE_ID] * NUM_IMAGE_TOKENS
    rows, targets = [], []
    for scene in scenes:
        ids, segs, tgt = list(prefix), [], []
        for q in packed_questions(scene, rng, num_cells):
            seg = word_ids(q.text) + [IM_END_ID, IM_START_ID, ASSISTANT_ID, WORD_ID[q.answer], IM_END_ID]
            start = len(ids)
            ids += seg
            segs.append((start, len(ids)))
            if (cell_word_target and q.kind == "cell") or (count_word_target and q.kind.startswith("count")):
                tgt.append((start + KEY_WORD[q.kind], WORD_ID[q.answer], None, True))
            # predict the answer at "assistant", and <|im_end|> at the answer
            tgt.append((len(ids) - 3, WORD_ID[q.answer], q.kind, False))
            tgt.append((len(ids) - 2, IM_END_ID, None, False))
        rows.append((ids, segs))
        targets.append(tgt)
    width = max(len(ids) for ids, _ in rows)
    n = len(rows)
    input_ids = torch.full((n, width), PAD_ID, dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    mask = torch.zeros((n, 1, width, width), dtype=torch.bool)
    p = len(prefix)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    for i, (ids, segs) in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        position_ids[i, :p] = torch.arange(p)
        mask[i, 0, :p, :p] = causal[:p, :p]
        for s, e in segs:
            position_ids[i, s:e] = torch.arange(p, p + e - s)
            mask[i, 0, s:e, :p] = True
            mask[i, 0, s:e, s:e] = causal[: e - s, : e - s]
        for j in range(len(ids), width):  # padding rows see themselves (no NaN)
            mask[i, 0, j, j] = True
    rows_idx, pos_idx, labels, kinds, aux = [], [], [], [], []
    for i, tgt in enumerate(targets):
        for pos, label, kind, auxiliary in tgt:
            rows_idx.append(i)
            pos_idx.append(pos)
            labels.append(label)
            kinds.append(kind)
            aux.append(auxiliary)
    batch = pixel_batch([render(s) for s in scenes], processor)
    batch.update(input_ids=input_ids, position_ids=position_ids, attention_mask=mask,
                 target_rows=torch.tensor(rows_idx), target_pos=torch.tensor(pos_idx), labels=torch.tensor(labels),
                 kinds=kinds, auxiliary=torch.tensor(aux, dtype=torch.bool))
    return batch


def packed_forward(llava, batch, pool: int = 1):
    """Logits at the target positions of a packed batch."""
    inner = llava.model
    embeds = inner.get_input_embeddings()(batch["input_ids"])
    feats = image_features(llava, batch["pixel_values"], pool)
    image_mask = (batch["input_ids"] == IMAGE_ID).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(image_mask, feats.to(embeds.dtype))
    hidden = inner.language_model(inputs_embeds=embeds, attention_mask=batch["attention_mask"],
                                  position_ids=batch["position_ids"]).last_hidden_state
    picked = hidden[batch["target_rows"], batch["target_pos"]]
    return llava.lm_head(picked)


def dense_logits(llava, batch: dict, pool: int = 1) -> torch.Tensor:
    """Last-position logits of a left-padded batch from `encode_batch`, with optional token pooling (the image
    placeholders of each row are cut down to the pooled count)."""
    from visor_hf.toy.model import num_pooled_tokens

    input_ids = batch["input_ids"]
    if pool != 1:
        keep = num_pooled_tokens(pool)
        rows = []
        for r in input_ids.tolist():
            r = [t for t in r if t != PAD_ID]
            first = r.index(IMAGE_ID)
            rows.append(r[:first] + [IMAGE_ID] * keep + r[first + NUM_IMAGE_TOKENS:])
        width = max(len(r) for r in rows)
        input_ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
        attn = torch.zeros_like(input_ids)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r):] = torch.tensor(r)
            attn[i, width - len(r):] = 1
    else:
        attn = batch["attention_mask"]
    inner = llava.model
    embeds = inner.get_input_embeddings()(input_ids)
    feats = image_features(llava, batch["pixel_values"], pool)
    image_mask = (input_ids == IMAGE_ID).unsqueeze(-1).expand_as(embeds)
    embeds = embeds.masked_scatter(image_mask, feats.to(embeds.dtype))
    position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
    hidden = inner.language_model(inputs_embeds=embeds, attention_mask=attn, position_ids=position_ids).last_hidden_state
    return llava.lm_head(hidden[:, -1])


def fmt(acc: dict) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in acc.items())


def start_run(out: str) -> tuple[Path, Path]:
    """One torch thread, no Hub access, the output folder made: `(out, out / "log.txt")`."""
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = Path(out).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return folder, folder / "log.txt"


def dump(path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def set_seed(seed: int) -> np.random.Generator:
    torch.manual_seed(seed)
    return np.random.default_rng(seed)


"""Step 1 of the toy recipe: train a tiny LLaVA-OneVision from scratch.

(a) the SigLIP-style tower is pre-trained per patch (cell content of every patch of every view, the cell's row and
column for base-view patches, base view or crop) -- the stand-in for a pretrained SigLIP;
(b) the whole LLaVA-OV is trained on packed questions (every question of a picture in one row, each segment seeing
only the image and itself), loss on the answer and the closing <|im_end|>.
"""

from __future__ import annotations

import time

import torch
from common import dense_logits, dump, fmt, log, lr_factor, packed_batch, packed_forward, set_seed, summarize, train_scenes
from transformers import LlavaOnevisionForConditionalGeneration

from visor_hf.toy.data import GRID, eval_set, render
from visor_hf.toy.model import encode_batch, pixel_batch, save_llava_checkpoint, toy_image_processor, toy_llava_config


def tower_targets(scenes):
    """Per-patch targets: content [B, 5, 16], row/col of base patches [B, 16], is-base flag per view."""
    content = torch.zeros(len(scenes), 5, 4, 4, dtype=torch.long)
    for b, s in enumerate(scenes):
        for i in range(4):
            for j in range(4):
                content[b, 0, i, j] = s.content_class(i, j)
        for a in range(2):
            for c in range(2):
                for i in range(4):
                    for j in range(4):
                        content[b, 1 + a * 2 + c, i, j] = s.content_class((a * 4 + i) // 2, (c * 4 + j) // 2)
    rows = torch.arange(GRID).repeat_interleave(GRID)
    cols = torch.arange(GRID).repeat(GRID)
    return content.reshape(len(scenes), 5, 16), rows, cols


def pretrain_tower(model, steps: int, batch: int, lr: float, logfile) -> dict:
    tower = model.model.vision_tower
    d = tower.config.hidden_size
    heads = torch.nn.ModuleDict({"content": torch.nn.Linear(d, 13), "row": torch.nn.Linear(d, GRID),
                                 "col": torch.nn.Linear(d, GRID), "view": torch.nn.Linear(d, 2)})
    params = list(tower.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    processor = toy_image_processor()
    tower.train()
    acc = {}
    for step in range(steps):
        scenes = train_scenes(step, batch, offset=900_000_000)
        pv = pixel_batch([render(s) for s in scenes], processor)["pixel_values"]
        h = tower(pv.flatten(0, 1), output_hidden_states=True).hidden_states[-1]  # [B*5, 16, d]
        h = h.reshape(len(scenes), 5, 16, d)
        content, rows, cols = tower_targets(scenes)
        logits = heads["content"](h)
        view_target = torch.zeros(len(scenes), 5, 16, dtype=torch.long)
        view_target[:, 0] = 1
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 2), content.flatten())
        loss = loss + torch.nn.functional.cross_entropy(heads["view"](h).flatten(0, 2), view_target.flatten())
        base = h[:, 0]
        loss = loss + torch.nn.functional.cross_entropy(heads["row"](base).flatten(0, 1), rows.repeat(len(scenes)))
        loss = loss + torch.nn.functional.cross_entropy(heads["col"](base).flatten(0, 1), cols.repeat(len(scenes)))
        for g in opt.param_groups:
            g["lr"] = lr * lr_factor(step, steps, warmup=20, hold=0.5)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            pred = logits.argmax(-1)
            acc = {"base_content": (pred[:, 0] == content[:, 0]).float().mean().item(),
                   "crop_content": (pred[:, 1:] == content[:, 1:]).float().mean().item(),
                   "row": (heads["row"](base).argmax(-1) == rows).float().mean().item(),
                   "col": (heads["col"](base).argmax(-1) == cols).float().mean().item()}
            log(f"tower step {step} loss {loss.item():.4f} {fmt(acc)}", logfile)
    tower.eval()
    return acc


@torch.no_grad()
def evaluate_llava(model, examples, pool: int = 1, batch_size: int = 64) -> tuple[dict, list[bool]]:
    model.eval()
    processor = toy_image_processor()
    correct = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        batch = encode_batch(chunk, processor=processor)
        pred = dense_logits(model, batch, pool).argmax(-1)
        correct += (pred == batch["answers"]).tolist()
    return summarize(correct, [e.question.kind for e in examples]), correct


def train_llava(out_dir, steps: int = 1500, batch: int = 16, lr: float = 1e-3, tower_lr: float = 1e-4,
                tower_steps: int = 800, eval_every: int = 300, seed: int = 0, logfile=None,
                eval_images: int = 100, cell_word_target: bool = True, cell_word_steps: int | None = None,
                cell_word_weight_after: float = 0.1, count_word_target: bool = True) -> dict:
    """`cell_word_target` / `count_word_target`: the auxiliary key-word targets of `packed_batch` (the answer of a
    cell / counting question also predicted at its cell / colour or shape word), each weighted 1 like every other
    target; with `cell_word_steps`, only for that many steps, then `cell_word_weight_after`."""
    rng = set_seed(seed)
    model = LlavaOnevisionForConditionalGeneration._from_config(toy_llava_config(), attn_implementation="sdpa")
    n_params = sum(p.numel() for p in model.parameters())
    log(f"LLaVA-OV from scratch: {n_params / 1e6:.2f} M parameters", logfile)
    t0 = time.time()
    tower_acc = pretrain_tower(model, tower_steps, 32, 2e-3, logfile)
    tower_time = time.time() - t0

    tower_params = list(model.model.vision_tower.parameters())
    ids = {id(p) for p in tower_params}
    rest = [p for p in model.parameters() if id(p) not in ids]
    opt = torch.optim.AdamW([{"params": rest, "lr": lr}, {"params": tower_params, "lr": tower_lr}], weight_decay=0.0,
                            betas=(0.9, 0.98))
    base_lrs = [lr, tower_lr]
    held_out = eval_set(seed=1, num_images=eval_images)
    processor = toy_image_processor()
    history = []
    t1 = time.time()
    for step in range(steps):
        model.train()
        scenes = train_scenes(step, batch)
        b = packed_batch(scenes, rng, processor=processor, cell_word_target=cell_word_target,
                         count_word_target=count_word_target)
        logits = packed_forward(model, b)
        weights = torch.ones(len(b["labels"]))
        if cell_word_steps is not None and step >= cell_word_steps:
            weights[b["auxiliary"]] = cell_word_weight_after
        losses = torch.nn.functional.cross_entropy(logits, b["labels"], reduction="none")
        loss = (losses * weights).sum() / weights.sum()
        for g, base_lr in zip(opt.param_groups, base_lrs):
            g["lr"] = base_lr * lr_factor(step, steps)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0:
            log(f"llava step {step} loss {loss.item():.4f} ({(time.time() - t1) / (step + 1):.2f} s/step)", logfile)
        if (step + 1) % eval_every == 0 or step == steps - 1:
            acc, _ = evaluate_llava(model, held_out)
            history.append({"step": step + 1, "seconds": round(time.time() - t1, 1), **acc})
            log(f"llava eval step {step + 1}: {fmt(acc)}", logfile)
    model.eval()
    save_llava_checkpoint(model, out_dir)
    summary = {"parameters": n_params, "tower_pretraining": {"steps": tower_steps, "seconds": round(tower_time, 1), **tower_acc},
               "steps": steps, "batch_images": batch, "seconds": round(time.time() - t1, 1), "history": history}
    dump(f"{out_dir}/training_log.json", summary)
    return summary


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("out_dir")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--tower-steps", type=int, default=800)
    parser.add_argument("--eval-every", type=int, default=300)
    parser.add_argument("--cell-word-target", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--cell-word-steps", type=int, default=None)
    parser.add_argument("--cell-word-weight-after", type=float, default=0.1)
    parser.add_argument("--count-word-target", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train_llava(args.out_dir, steps=args.steps, tower_steps=args.tower_steps, eval_every=args.eval_every,
                logfile=f"{args.out_dir}.log", cell_word_target=args.cell_word_target, cell_word_steps=args.cell_word_steps,
                cell_word_weight_after=args.cell_word_weight_after, count_word_target=args.count_word_target)

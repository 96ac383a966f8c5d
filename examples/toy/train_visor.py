"""Helpers of the toy recipe's VISOR part: LLaVA-style JSONL data sets for `visor_hf.training` (the project's
training pipeline, which runs stage 1, stage 2, search, universal fine-tuning, pseudo-labels and the router) and
the evaluation of a VISOR checkpoint under any configuration (accuracy per question kind, analytical FLOPs).
"""

from __future__ import annotations

import torch

from visor_hf.modeling import VisorForConditionalGeneration
from visor_hf.toy.data import CELL_WORDS, COLOURS, KINDS, SHAPES, make_scene, sample_questions
from visor_hf.toy.evaluation import evaluate_visor, report  # noqa: F401  (re-exported for train_toy.py)
from visor_hf.training.data import IGNORE_INDEX, VisorDataCollator

VISOR_TRAIN_SEED_BASE = 20_000_000  # VISOR training pictures
LABEL_SEED_BASE = 30_000_000  # router labelling pictures


def load(path) -> VisorForConditionalGeneration:
    model = VisorForConditionalGeneration.from_pretrained(path, attn_implementation="sdpa")
    return model.float().eval()


# -- the project's training pipeline (visor_hf.training) -----------------------------------------------------------


def write_records(folder, num_images: int, base_seed: int, filename: str = "data.jsonl", cells: int = 1) -> str:
    """A LLaVA-style JSONL data set for `visor_hf.training`: one record per question (one of each kind per picture,
    `cells` cell questions), pictures as PNG files next to it. Each record's `source` (the group of the configuration
    search and of the curve's per-group accuracy) is its question kind. Returns the file path."""
    import json
    from pathlib import Path

    from visor_hf.toy.data import render

    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(num_images):
        scene = make_scene(base_seed + i)
        name = f"images/{base_seed + i}.png"
        render(scene).save(folder / name)
        for q in sample_questions(scene, {**{kind: 1 for kind in KINDS}, "cell": cells}):
            records.append({"image": name, "kind": q.kind, "source": q.kind, "conversations": [
                {"from": "human", "value": "<image>\n" + q.text}, {"from": "gpt", "value": q.answer}]})
    path = folder / filename
    with open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return str(path)


KEY_WORDS = {"cell": CELL_WORDS, "count_shape": tuple(f"{shape}s" for shape in SHAPES), "count_colour": tuple(COLOURS)}


class KeyWordCollator(VisorDataCollator):
    """The pipeline's collator plus the toy's auxiliary targets (`train_toy.py --cell-word-target`,
    `--count-word-target`): in a question of one of `kinds` the answer is also the target of the question's key word
    (the cell word of "what is in r3c2 ?", the colour or shape word of a counting question), as in step 1's
    `packed_batch`. Labels are shifted inside the model, so the target sits on the token after the key word."""

    def __init__(self, processor, kinds=("cell",), **kwargs):
        super().__init__(processor, **kwargs)
        self.key_ids = {kind: torch.tensor(self.tokenizer.convert_tokens_to_ids(list(KEY_WORDS[kind]))) for kind in kinds}

    def __call__(self, records) -> dict:
        batch = super().__call__(records)
        labels = batch["labels"]
        for row, record in enumerate(records):
            if record.get("kind") not in self.key_ids:
                continue
            keys = torch.isin(batch["input_ids"][row], self.key_ids[record["kind"]]).nonzero().flatten()
            answer = labels[row][labels[row] != IGNORE_INDEX]
            if len(keys) != 1 or not len(answer):
                raise ValueError(f"a {record['kind']} record needs one key word and an answer: {record['conversations']}")
            labels[row, keys[0] + 1] = answer[0]
        return batch


def trainer_args(steps: int, lr: float, batch: int, warmup: int, seed: int) -> dict:
    return {"max_steps": steps, "learning_rate": lr, "per_device_train_batch_size": batch, "warmup_steps": warmup,
            "lr_scheduler_type": "cosine", "weight_decay": 0.0, "adam_beta2": 0.98, "max_grad_norm": 1.0,
            "logging_steps": 25, "save_strategy": "no", "use_cpu": True, "dataloader_num_workers": 0, "seed": seed,
            "data_seed": seed, "disable_tqdm": True}

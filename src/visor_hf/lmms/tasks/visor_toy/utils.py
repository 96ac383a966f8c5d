"""The `visor_toy` lmms-eval task: documents generated from `visor_hf.toy.data`, exact-match accuracy on the first
word of the answer (every toy answer is one word)."""

from __future__ import annotations

from datasets import Dataset, DatasetDict
from lmms_eval.api.task import ConfigurableTask

from visor_hf.toy.data import KINDS, make_scene, render
from visor_hf.toy.inference import fresh_examples


def toy_documents(seed: int, images: int, difficulty: str) -> list[dict]:
    """One document per question of the given difficulty, in picture order (as `visor-hf toy` asks them)."""
    return [
        {"picture_seed": e.scene.seed, "kind": e.question.kind, "question": e.question.text, "answer": e.question.answer}
        for e in fresh_examples(seed, images)
        if KINDS[e.question.kind] == difficulty
    ]


class VisorToyTask(ConfigurableTask):
    """A task whose documents are generated, not downloaded (`dataset_kwargs`: `seed`, `images`; the yaml's
    `difficulty`: easy or hard)."""

    def __init__(self, *args, config: dict | None = None, **kwargs) -> None:
        config = dict(config or {})
        config.pop("class", None)
        self._difficulty = config.pop("difficulty")
        super().__init__(*args, config=config, **kwargs)

    def download(self, dataset_kwargs: dict | None = None) -> None:
        options = dict(dataset_kwargs or {})
        docs = toy_documents(int(options.get("seed", 0)), int(options.get("images", 200)), self._difficulty)
        self.dataset = DatasetDict({self.config.test_split: Dataset.from_list(docs)})
        self.dataset_no_image = self.dataset


def doc_to_visual(doc: dict) -> list:
    return [render(make_scene(int(doc["picture_seed"])))]


def doc_to_text(doc: dict, lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def process_results(doc: dict, results: list[str]) -> dict:
    words = results[0].split()
    return {"exact_match": float(bool(words) and words[0] == doc["answer"])}

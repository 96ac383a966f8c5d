"""The embedded default: a synthetic visual question-answering task and the tiny VISOR trained on it.

- `visor_hf.toy.data`: the deterministic generator (pictures of shapes in a 4x4 grid; easy and hard questions);
- `visor_hf.toy.model`: the toy LLaVA-OneVision (tokenizer, config, processor, input encoding);
- `visor_hf.toy.inference`: adaptive inference with the shipped checkpoint (`visor-hf toy`).

The checkpoint ships in `visor_hf/assets/toy-visor/`; `examples/toy/train_toy.py` reproduces it.
"""

from .data import (
    EASY_KINDS,
    HARD_KINDS,
    KINDS,
    Example,
    Question,
    Scene,
    all_questions,
    eval_set,
    make_scene,
    render,
    sample_questions,
)

__all__ = [
    "EASY_KINDS",
    "HARD_KINDS",
    "KINDS",
    "Example",
    "Question",
    "Scene",
    "all_questions",
    "eval_set",
    "make_scene",
    "render",
    "sample_questions",
]

"""Deterministic synthetic visual questions: a background colour and shapes in a 4x4 grid.

Every image is drawn from a seed alone (`make_scene(seed)`), so a data set is a range of seeds. Questions come in two
kinds:

- **easy** (coarse content): the background colour, and whether any red shape is present;
- **hard** (fine detail): how many shapes of one kind (or one colour) there are, and what is in one cell.

Every answer is one word of the toy vocabulary, so accuracy is exact match.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 128
GRID = 4
CELL = IMAGE_SIZE // GRID
EMPTY_PROB = 0.4

SHAPES = ("circle", "square", "triangle")
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 70, 220), "yellow": (235, 205, 30)}
BACKGROUNDS = {
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "orange": (240, 140, 40),
    "purple": (130, 50, 160),
    "cyan": (60, 200, 210),
}
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
           "thirteen", "fourteen", "fifteen", "sixteen")
CELL_WORDS = tuple(f"r{r}c{c}" for r in range(1, GRID + 1) for c in range(1, GRID + 1))

# Question kinds and their difficulty.
KINDS = {"background": "easy", "red": "easy", "count_shape": "hard", "count_colour": "hard", "cell": "hard"}
EASY_KINDS = tuple(k for k, v in KINDS.items() if v == "easy")
HARD_KINDS = tuple(k for k, v in KINDS.items() if v == "hard")

# Per-cell content classes (the vision tower's pre-training targets): 0 = empty, then colour x shape.
CONTENT_CLASSES = ("empty",) + tuple(f"{c} {s}" for c in COLOURS for s in SHAPES)


@dataclass(frozen=True)
class Scene:
    """One picture: its background and the content of each cell (`None` = empty, else `(colour, shape)`)."""

    seed: int
    background: str
    cells: tuple  # GRID x GRID tuple of tuples
    jitter: tuple  # per cell (dx, dy, size delta) in pixels

    def content_class(self, row: int, col: int) -> int:
        cell = self.cells[row][col]
        if cell is None:
            return 0
        colour, shape = cell
        return 1 + list(COLOURS).index(colour) * len(SHAPES) + SHAPES.index(shape)

    def objects(self) -> list[tuple[str, str]]:
        return [c for row in self.cells for c in row if c is not None]


@dataclass(frozen=True)
class Question:
    kind: str
    text: str
    answer: str

    @property
    def difficulty(self) -> str:
        return KINDS[self.kind]


def make_scene(seed: int) -> Scene:
    rng = np.random.default_rng([seed, 7])
    background = list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))]
    # Vary the density per image so that counts spread over the whole range.
    empty = float(rng.uniform(0.15, 0.85)) if rng.random() < 0.7 else EMPTY_PROB
    cells, jitter = [], []
    for _ in range(GRID):
        row, jrow = [], []
        for _ in range(GRID):
            if rng.random() < empty:
                row.append(None)
            else:
                row.append((list(COLOURS)[rng.integers(len(COLOURS))], SHAPES[rng.integers(len(SHAPES))]))
            jrow.append(tuple(int(v) for v in rng.integers(-2, 3, size=3)))
        cells.append(tuple(row))
        jitter.append(tuple(jrow))
    return Scene(seed, background, tuple(cells), tuple(jitter))


def render(scene: Scene) -> Image.Image:
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for r in range(GRID):
        for c in range(GRID):
            cell = scene.cells[r][c]
            if cell is None:
                continue
            colour, shape = cell
            dx, dy, ds = scene.jitter[r][c]
            margin = 5 + ds
            x0, y0 = c * CELL + margin + dx, r * CELL + margin + dy
            x1, y1 = (c + 1) * CELL - margin + dx, (r + 1) * CELL - margin + dy
            fill = COLOURS[colour]
            if shape == "circle":
                draw.ellipse([x0, y0, x1, y1], fill=fill)
            elif shape == "square":
                draw.rectangle([x0, y0, x1, y1], fill=fill)
            else:
                draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return image


def all_questions(scene: Scene) -> list[Question]:
    """Every question of a scene: background, any red, a count per shape, a count per colour, and every cell."""
    objects = scene.objects()
    questions = [
        Question("background", "what is the colour of the background ?", scene.background),
        Question("red", "is there any red shape ?", "yes" if any(c == "red" for c, _ in objects) else "no"),
    ]
    for shape in SHAPES:
        n = sum(s == shape for _, s in objects)
        questions.append(Question("count_shape", f"how many {shape}s are there ?", NUMBERS[n]))
    for colour in COLOURS:
        n = sum(c == colour for c, _ in objects)
        questions.append(Question("count_colour", f"how many {colour} shapes are there ?", NUMBERS[n]))
    for r in range(GRID):
        for c in range(GRID):
            cell = scene.cells[r][c]
            questions.append(Question("cell", f"what is in {CELL_WORDS[r * GRID + c]} ?", "empty" if cell is None else cell[1]))
    return questions


def sample_questions(scene: Scene, per_kind: dict[str, int] | None = None) -> list[Question]:
    """A fixed, seed-determined subset of a scene's questions: `per_kind[k]` questions of kind k (default: one of each
    kind, as in the evaluation sets)."""
    per_kind = per_kind or {k: 1 for k in KINDS}
    rng = np.random.default_rng([scene.seed, 11])
    by_kind: dict[str, list[Question]] = {}
    for q in all_questions(scene):
        by_kind.setdefault(q.kind, []).append(q)
    chosen = []
    for kind, n in per_kind.items():
        pool = by_kind[kind]
        picks = rng.permutation(len(pool))[: min(n, len(pool))]
        chosen.extend(pool[i] for i in sorted(picks))
    return chosen


def vocabulary() -> list[str]:
    """Every word a question or answer of the generator can use (no special tokens)."""
    words: list[str] = []
    fixed = ["what", "is", "the", "colour", "of", "background", "there", "any", "shape", "shapes", "how", "many", "are",
             "in", "?", "yes", "no", "empty"]
    words += fixed
    words += list(BACKGROUNDS) + list(COLOURS) + list(SHAPES) + [s + "s" for s in SHAPES]
    words += list(NUMBERS) + list(CELL_WORDS)
    seen, out = set(), []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


@dataclass(frozen=True)
class Example:
    scene: Scene
    question: Question

    @property
    def image(self) -> Image.Image:
        return render(self.scene)


def eval_set(seed: int, num_images: int) -> list[Example]:
    """A held-out evaluation set: images `seed * 1_000_000 + i`, one question of each kind per image."""
    examples = []
    for i in range(num_images):
        scene = make_scene(seed * 1_000_000 + i)
        examples += [Example(scene, q) for q in sample_questions(scene)]
    return examples

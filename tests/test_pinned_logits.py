"""The engine keeps its numbers: logits of the shipped toy and of a tiny converted model, recorded before the engine
refactor (`tests/pinned_logits.py --write`), must not move."""

import json

from pinned_logits import PINNED, compare, compute


def test_logits_equal_the_pinned_ones():
    problems = compare(json.loads(PINNED.read_text()), compute(), atol=1e-6)
    assert not problems, "\n".join(problems)

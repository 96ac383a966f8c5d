"""Prompts shared by the model, cache and generation tests: `{"text": [ids or "<image>"], "images": [(h, w)]}`,
built into model inputs by `visor_hf.testing.build_batch`."""

from visor_hf.testing import ROUTE_ID, word_ids

ONE_IMAGE = {"text": [*word_ids("user"), "<image>", *word_ids("what is the colour of background ?")], "images": [(16, 16)], "seed": 0}
ANYRES = {"text": ["<image>", *word_ids("describe this picture .")], "images": [(20, 40)], "seed": 1}
TWO_IMAGES = {
    "text": [*word_ids("what is this ?"), "<image>", *word_ids("a picture"), "<image>", *word_ids("? yes")],
    "images": [(16, 16), (40, 24)],
    "seed": 2,
}
TEXT_ONLY = {"text": word_ids("how many red circle are there ?"), "seed": 3}


def routed(sample: dict) -> dict:
    """The same prompt with the routing token after the question."""
    return {**sample, "text": [*sample["text"], ROUTE_ID]}


ROUTED_ONE_IMAGE, ROUTED_ANYRES, ROUTED_TWO_IMAGES, ROUTED_TEXT_ONLY = map(routed, (ONE_IMAGE, ANYRES, TWO_IMAGES, TEXT_ONLY))

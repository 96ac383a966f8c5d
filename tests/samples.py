"""Prompts shared by the model, cache and generation tests: `{"text": [ids or "<image>"], "images": [(h, w)]}`,
built into model inputs by `visor_hf.testing.build_batch`."""

import contextlib

import torch

from visor_hf.testing import IMAGE_ID, ROUTE_ID, word_ids

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


def text_positions(batch: dict, row: int = 0) -> torch.Tensor:
    """`[T]` the real (unpadded) text positions of one row of a batch."""
    return (batch["input_ids"][row] != IMAGE_ID) & batch["attention_mask"][row].bool()


def assert_row_matches_alone(batched_logits: torch.Tensor, row: int, alone: dict, alone_logits: torch.Tensor) -> None:
    """Row `row` of a left-padded batch's logits equals the same sample run alone (`alone`, its logits `[T, V]`) at
    every text position."""
    length = alone["input_ids"].shape[1]
    text = text_positions(alone)
    torch.testing.assert_close(batched_logits[row, -length:][text], alone_logits[text], atol=1e-5, rtol=1e-5)


def assert_no_text_sees_a_later_image(model, batch: dict) -> None:
    """Other pixels change no logit of the text before the first image, and do change the text after it."""
    other = dict(batch, pixel_values=torch.randn_like(batch["pixel_values"]))
    text = text_positions(batch)
    first_image = int((batch["input_ids"][0] == IMAGE_ID).nonzero()[0])
    before, after = text.clone(), text.clone()
    before[first_image:] = False
    after[:first_image] = False
    with torch.no_grad():
        a, b = model(**batch).logits[0], model(**other).logits[0]
    torch.testing.assert_close(a[before], b[before], atol=0, rtol=0)
    assert (a[after] - b[after]).abs().max() > 1e-4


HOST_SYNC_METHODS = ["item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"]


@contextlib.contextmanager
def recorded_host_syncs():
    """Inside the block, every call of a tensor method that reads a device value on the host is recorded (the list
    it yields); the methods are restored afterwards."""
    saved = {name: getattr(torch.Tensor, name) for name in HOST_SYNC_METHODS}
    calls = []

    def spy(name):
        def call(self, *args, **kwargs):
            calls.append(name)
            return saved[name](self, *args, **kwargs)

        return call

    try:
        for name in HOST_SYNC_METHODS:
            setattr(torch.Tensor, name, spy(name))
        yield calls
    finally:
        for name, function in saved.items():
            setattr(torch.Tensor, name, function)

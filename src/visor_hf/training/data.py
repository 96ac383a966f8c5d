"""Training data: LLaVA-style conversation records and the collator that turns them into VISOR inputs.

A record is a dict in the LLaVA format::

    {"image": "path/to/picture.jpg",            # or a list of paths, or absent (text-only sample)
     "conversations": [{"from": "human", "value": "<image>\\nWhat colour is the ball?"},
                       {"from": "gpt", "value": "Red."}, ...]}

Accepted variants: `"images"` instead of `"image"`; images given as `PIL.Image` objects (a `datasets` dataset with
an `Image` column) or as paths relative to `image_root`; roles `human`/`user` and `gpt`/`assistant`/`model`; a
`"messages"` list of `{"role", "content"}` dicts instead of `"conversations"`.

The collator renders each record with the processor's chat template (images first in the user turn that held the
`<image>` markers, as LLaVA-OneVision does), lets the [`VisorProcessor`] expand the image placeholders and put the
routing token after every user question, and builds `labels` that hold the assistant answers (and their end-of-turn
token) only: the prompt, the images, the routing tokens and the padding are `-100`.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from ..hub_ids import looks_like_hub_id

IGNORE_INDEX = -100
USER_ROLES = {"human": "user", "user": "user"}
ASSISTANT_ROLES = {"gpt": "assistant", "assistant": "assistant", "model": "assistant", "bot": "assistant"}
IMAGE_MARKER = "<image>"


# -- loading -------------------------------------------------------------------------------------------------------


def load_records(source, image_root: str | os.PathLike | None = None, limit: int | None = None, streaming: bool = False):
    """A dataset of records from a JSON file (a list), a JSONL file, a folder saved with
    `datasets.Dataset.save_to_disk`, a folder of data files or a Hub dataset id (`datasets.load_dataset`, split
    `train`), a `datasets.Dataset` (a `DatasetDict`: its `train` split), a streaming `datasets.IterableDataset`, or a
    list of dicts. `limit` keeps the first records. `streaming=True` reads files and Hub datasets as a stream
    (`datasets.load_dataset(..., streaming=True)`): the result is a torch `IterableDataset` (give the `Trainer`
    `max_steps`).

    Relative image paths of a file source are resolved against `image_root` (default: the file's folder).
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists() and not looks_like_hub_id(str(source)):
            raise FileNotFoundError(f"data {source}: no such file or folder (nor a Hub dataset id 'owner/name')")
        if streaming or not path.exists() or (path.is_dir() and not _saved_dataset(path)):
            records = _load_with_datasets(str(source), path, streaming)
        elif path.is_dir():
            import datasets

            records = _single_split(datasets.load_from_disk(str(path)), path)
        elif path.suffix == ".jsonl":
            records = []
            with open(path) as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        records.append(_check_record(_json_line(line, path, number), f"{path}, line {number}"))
        elif path.suffix == ".json":
            with open(path) as f:
                try:
                    records = json.load(f)
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}, line {error.lineno}, column {error.colno}: not valid JSON ({error.msg})") from None
            if not isinstance(records, list):
                raise ValueError(f"{path} must hold a JSON list of records (LLaVA format), not a {type(records).__name__}")
            for number, record in enumerate(records):
                _check_record(record, f"{path}, record {number}")
        else:
            raise ValueError(f"unsupported data file {path}: use .json (a list of records), .jsonl or a saved `datasets` folder")
        if image_root is None and path.exists() and not path.is_dir():
            image_root = path.parent
    else:
        records = _single_split(source, "the dataset")
    if _is_iterable(records):
        if limit is not None:
            records = records.take(limit) if hasattr(records, "take") else itertools.islice(records, limit)
        return IterableRecordDataset(records, image_root)
    if limit is not None:
        records = records.select(range(min(limit, len(records)))) if hasattr(records, "select") else records[:limit]
    return RecordDataset(records, image_root)


def _json_line(line: str, path: Path, number: int):
    """One JSONL record; an error names the file's own line (json's error would say line 1 of the string)."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path}, line {number}, column {error.colno}: not valid JSON ({error.msg})") from None


def _saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _load_with_datasets(source: str, path: Path, streaming: bool):
    """`datasets.load_dataset` on a local file (`json` builder), a folder of data files or a Hub dataset id."""
    try:
        import datasets
    except ImportError as error:
        raise ImportError(f"reading {source} needs the `datasets` package: pip install datasets") from error
    if path.is_file():
        if path.suffix not in (".json", ".jsonl"):
            raise ValueError(f"unsupported data file {path}: use .json or .jsonl")
        loaded = datasets.load_dataset("json", data_files=str(path), split="train", streaming=streaming)
    else:
        try:
            loaded = datasets.load_dataset(source, streaming=streaming)
        except FileNotFoundError as error:
            raise FileNotFoundError(f"data {source}: no such file or folder, nor a dataset on the Hub ({error})") from None
    return _single_split(loaded, source)


def _is_iterable(records) -> bool:
    return isinstance(records, torch.utils.data.IterableDataset) or type(records).__name__ == "IterableDataset"


def _check_record(record, where: str) -> dict:
    if not isinstance(record, dict):
        raise ValueError(f"{where}: a record must be a JSON object (LLaVA format), got {type(record).__name__}")
    return record


def _single_split(records, where):
    """A `datasets.DatasetDict` (or `IterableDatasetDict`) gives its `train` split (or its only split)."""
    if isinstance(records, dict) and records and all(hasattr(v, "select") or _is_iterable(v) for v in records.values()):
        splits = list(records.keys())
        if "train" in splits:
            return records["train"]
        if len(splits) == 1:
            return records[splits[0]]
        raise ValueError(f"{where} holds several splits {splits} and none is 'train': save or pass a single split")
    return records


class RecordDataset(torch.utils.data.Dataset):
    """Records with their index (`__index__`), and image paths made absolute (a `torch` map-style dataset)."""

    def __init__(self, records, image_root: str | os.PathLike | None = None):
        self.records = records
        self.image_root = Path(image_root) if image_root is not None else None

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        return self.prepare(dict(self.records[int(index)]), int(index), self.image_root)

    @staticmethod
    def prepare(record: dict, index: int, image_root: Path | None) -> dict:
        record["__index__"] = index
        if image_root is not None:
            images = record_images(record)
            record["images"] = [str(image_root / i) if isinstance(i, str) and not os.path.isabs(i) else i for i in images]
            record.pop("image", None)
        return record


class IterableRecordDataset(torch.utils.data.IterableDataset):
    """A stream of records (a streaming `datasets.IterableDataset`), numbered in order (`__index__`), with image paths
    made absolute as `RecordDataset` does."""

    def __init__(self, records, image_root: str | os.PathLike | None = None):
        self.records = records
        self.image_root = Path(image_root) if image_root is not None else None

    def __iter__(self):
        for index, record in enumerate(self.records):
            yield RecordDataset.prepare(dict(record), index, self.image_root)


def record_images(record: dict) -> list:
    images = record.get("images", record.get("image"))
    if images is None:
        return []
    if isinstance(images, (str, os.PathLike)) or hasattr(images, "convert"):
        return [images]
    return list(images)


def open_image(image):
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as opened:
            return opened.convert("RGB")
    if isinstance(image, dict) and ("bytes" in image or "path" in image):  # a `datasets` Image feature, undecoded
        import io

        data = image.get("bytes")
        return Image.open(io.BytesIO(data)).convert("RGB") if data else open_image(image["path"])
    return image.convert("RGB")


def record_messages(record: dict) -> list[dict]:
    """The record as chat messages (`[{"role", "content": [...]}]`); `<image>` markers become image entries placed
    first in their turn. A record whose turns hold no marker gets its images at the start of the first user turn."""
    turns = record.get("conversations")
    if turns is None:
        turns = record.get("messages")
    if not turns:
        stripped = " (Trainer's remove_unused_columns=True, its default, strips the record columns before the collator " \
            "sees them: pass TrainingArguments(remove_unused_columns=False))" if not set(record) - {"__index__", "labels"} else ""
        raise ValueError(f"record {record.get('__index__', '?')} has no 'conversations' (or 'messages'){stripped}")
    num_images = len(record_images(record))
    messages, placed = [], 0
    for turn in turns:
        role = turn.get("from", turn.get("role"))
        value = turn.get("value", turn.get("content"))
        if role in USER_ROLES:
            role = "user"
        elif role in ASSISTANT_ROLES:
            role = "assistant"
        elif role != "system":
            raise ValueError(f"unknown role {role!r} in record {record.get('__index__', '?')}")
        if not isinstance(value, str):  # already in the chat-content format
            messages.append({"role": role, "content": value})
            placed += sum(1 for c in value if isinstance(c, dict) and c.get("type") == "image")
            continue
        markers = value.count(IMAGE_MARKER) if role == "user" else 0
        text = value.replace(IMAGE_MARKER, "").strip() if markers else value
        content = [{"type": "image"} for _ in range(markers)] + [{"type": "text", "text": text}]
        messages.append({"role": role, "content": content})
        placed += markers
    if placed == 0 and num_images:
        first_user = next(m for m in messages if m["role"] == "user")
        first_user["content"] = [{"type": "image"} for _ in range(num_images)] + first_user["content"]
    elif placed != num_images:
        raise ValueError(f"record {record.get('__index__', '?')} has {num_images} images but {placed} <image> markers")
    return messages


# -- the collator --------------------------------------------------------------------------------------------------


def _find(sequence: list[int], pattern: list[int], start: int) -> int:
    width = len(pattern)
    for i in range(start, len(sequence) - width + 1):
        if sequence[i : i + width] == pattern:
            return i
    return -1


class VisorDataCollator:
    """Batches of VISOR training inputs from conversation records.

    processor: a [`VisorProcessor`] (or any LLaVA-OneVision-style processor with a chat template, a `tokenizer` and
        an image processor; it must put the routing token after each question itself).
    max_length: sequences longer than this are cut on the right (`None`: no cut). A cut never removes image tokens
        (that would break the image features): make it larger than the longest prompt.
    assistant_header / turn_end: the text that opens an assistant turn and closes a turn in the rendered template
        (Qwen2 / LLaVA-OV: `"<|im_start|>assistant"` and `"<|im_end|>"`). The label span of an answer starts after the
        header (and the white space the template puts after it) and ends with `turn_end`, included, so the model
        learns to stop.
    packing: a token packing factor (1, 2 or 4): images expand to their packed placeholder counts
        (`VisorProcessor(..., packing=)`) and the batch carries `visor_packing` for the forward. For evaluation, the
        search, pseudo-labels and router training at one factor; universal fine-tuning samples the factor per step
        and packs an unpacked batch itself (`repack_placeholders`).
    The output holds `input_ids`, `attention_mask`, `labels`, the image tensors (`pixel_values`, `image_sizes`,
    `batch_num_images`) when the batch has images, `visor_packing` with a packing factor, and `sample_index` (the
    dataset index of each row; the trainers remove it before the forward).
    """

    def __init__(self, processor, max_length: int | None = None, assistant_header: str = "<|im_start|>assistant", turn_end: str = "<|im_end|>",
                 packing: int = 1):
        if packing != 1 and not hasattr(processor, "active_packing"):
            raise ValueError(f"packing={packing} needs a VisorProcessor (it lays out the packed image tokens), got {type(processor).__name__}")
        self.packing = packing
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.max_length = max_length
        self.header_ids = self.tokenizer(assistant_header, add_special_tokens=False)["input_ids"]
        self.end_ids = self.tokenizer(turn_end, add_special_tokens=False)["input_ids"]
        # white space after the header ("\n" in Qwen2) belongs to the prompt
        self.space_ids = {i for w in ("\n", " ", "\n\n", " \n") for i in self.tokenizer(w, add_special_tokens=False)["input_ids"]}
        if not self.header_ids or not self.end_ids:
            raise ValueError("assistant_header and turn_end must tokenize to at least one token")

    def render(self, record: dict) -> str:
        return self.processor.apply_chat_template(record_messages(record), tokenize=False, add_generation_prompt=False)

    def answer_mask(self, ids: list[int]) -> list[bool]:
        """True at the tokens of every assistant answer (its text and its end-of-turn token)."""
        mask = [False] * len(ids)
        position = 0
        while True:
            start = _find(ids, self.header_ids, position)
            if start < 0:
                return mask
            begin = start + len(self.header_ids)
            while begin < len(ids) and ids[begin] in self.space_ids:
                begin += 1
            end = _find(ids, self.end_ids, begin)
            stop = len(ids) if end < 0 else end + len(self.end_ids)
            for i in range(begin, stop):
                mask[i] = True
            position = stop

    def __call__(self, records: Sequence[dict]) -> dict:
        texts, images = [], []
        for record in records:
            texts.append(self.render(record))
            images.append([open_image(i) for i in record_images(record)])
        kwargs = {"text": texts, "return_tensors": "pt", "padding": True}
        if self.packing != 1:
            kwargs["packing"] = self.packing
        if any(images):
            # nested per sample, as LLaVA-OneVision's processor takes them: a sample with several images gets the
            # multi-image treatment (no anyres crops) and `batch_num_images` counts the images of each sample
            kwargs["images"] = images
        batch = dict(self.processor(**kwargs))
        input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
        labels = torch.full_like(input_ids, IGNORE_INDEX)
        for row in range(input_ids.shape[0]):
            ids = input_ids[row].tolist()
            mask = self.answer_mask(ids)
            for i, (m, valid) in enumerate(zip(mask, attention_mask[row].tolist())):
                if m and valid:
                    labels[row, i] = ids[i]
        if self.max_length is not None and input_ids.shape[1] > self.max_length:
            # cut the tail of right-padded rows / the end of every row (keeps the images, which come first)
            keep = self.max_length
            if getattr(self.tokenizer, "padding_side", "right") == "left":
                raise ValueError("max_length cuts need right padding: set processor.tokenizer.padding_side = 'right'")
            batch["input_ids"], batch["attention_mask"], labels = input_ids[:, :keep], attention_mask[:, :keep], labels[:, :keep]
        batch["labels"] = labels
        if self.packing != 1:
            batch["visor_packing"] = torch.full((input_ids.shape[0],), self.packing, dtype=torch.long)
        batch["sample_index"] = torch.tensor([r.get("__index__", -1) for r in records], dtype=torch.long)
        return batch


def repack_placeholders(batch: dict, config, packing: int | list[int], pad_token_id: int | None = None) -> dict:
    """A collated batch laid out for token packing: each image's run of placeholders shortened to its packed count
    (`packing_visor.ImageTokenLayout`), which is what the processor gives with `packing=` (the placeholders are one
    repeated token; labels there are -100). `packing`: one factor or one per row; 1 leaves a row as it is.

    Universal fine-tuning draws the factor per optimisation step, after the data loader has collated (and prefetched)
    the batch, so the trainer packs the batch here rather than in the collator. Rows are re-padded on the side their
    padding was on; `input_ids`, `attention_mask` and `labels` change, the image tensors do not.
    """
    from ..modeling.packing_visor import image_token_layouts, images_of_samples

    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    rows = input_ids.shape[0]
    factors = list(packing) if isinstance(packing, (list, tuple)) else [int(packing)] * rows
    if all(f == 1 for f in factors) or batch.get("image_sizes") is None:
        return batch
    image = (input_ids == config.image_token_id) & attention_mask.bool()
    layouts = image_token_layouts(config, batch["image_sizes"], batch_num_images=batch.get("batch_num_images"))
    owners = images_of_samples(image.sum(1).tolist(), layouts, [1] * rows, batch.get("batch_num_images"))
    keep = attention_mask.bool().clone()
    for row in range(rows):
        positions = image[row].nonzero()[:, 0].tolist()
        start = 0
        for layout in (layout for layout, owner in zip(layouts, owners) if owner == row):
            full, packed = layout.num_tokens(1), layout.num_tokens(factors[row])
            keep[row, positions[start + packed : start + full]] = False
            start += full
    left = bool((attention_mask[:, 0] == 0).any() and (attention_mask[:, -1] == 1).all())
    width = int(keep.sum(1).max())
    out = dict(batch)
    if pad_token_id is None:
        pad_token_id = getattr(config.get_text_config(), "pad_token_id", None) or 0
    fills = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    for key, fill in fills.items():
        if key not in batch:
            continue
        tensor = batch[key]
        packed = torch.full((rows, width), fill, dtype=tensor.dtype, device=tensor.device)
        for row in range(rows):
            values = tensor[row][keep[row]]
            packed[row, slice(width - len(values), width) if left else slice(0, len(values))] = values
        out[key] = packed
    return out


def load_processor(path: str | os.PathLike):
    """The processor of a VISOR checkpoint (`AutoProcessor`, the `VisorProcessor` registered by `import visor_hf`)."""
    from transformers import AutoProcessor

    import visor_hf  # noqa: F401  (registers the auto classes)

    return AutoProcessor.from_pretrained(str(path))


# LLaVA-OneVision's image inputs, then the Qwen2-VL family's
MODEL_INPUT_KEYS = (
    "input_ids", "attention_mask", "pixel_values", "image_sizes", "batch_num_images", "image_grid_thw", "mm_token_type_ids",
    "visor_packing", "labels",
)


def model_inputs(batch: dict, keep_labels: bool = True) -> dict:
    """The entries of a collated batch that the model's forward takes."""
    keys = MODEL_INPUT_KEYS if keep_labels else MODEL_INPUT_KEYS[:-1]
    return {k: batch[k] for k in keys if k in batch}


__all__ = [
    "IGNORE_INDEX",
    "IterableRecordDataset",
    "RecordDataset",
    "VisorDataCollator",
    "load_processor",
    "load_records",
    "model_inputs",
    "record_messages",
    "repack_placeholders",
]

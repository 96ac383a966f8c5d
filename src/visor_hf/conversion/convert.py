"""LLaVA-OneVision / Qwen2-VL / Qwen2.5-VL checkpoint (transformers layout) → VISOR checkpoint folder (Hub-ready, with
remote code). The source family is read from its `config.json` (`families.FAMILIES`).

See `docs/conversion.md` for the defaults, the initialisation of the new modules and the layout of the output.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import torch

from ..hub_ids import looks_like_hub_id
from ..logging_utils import get_logger
from ..modeling import VisorConfig, VisorForConditionalGeneration, uniform_layer_layout
from ..modeling.hub_visor import loading_section
from ..modeling.packing_visor import PACKING_FACTORS
from ..modeling.processing_visor import DEFAULT_ROUTING_TOKEN, VisorProcessor
from .errors import ConversionError
from .families import VISOR_MODEL_TYPES, SourceFamily, family_of, supported_sources
from .publish import check_output, publish, staged_output
from .warm_start import warm_start_new_modules

logger = get_logger(__name__)

MODELING_DIR = Path(__file__).resolve().parent.parent / "modeling"


def remote_code_files() -> list[Path]:
    """The files that ship with every converted checkpoint as remote code: every module of `visor_hf.modeling`
    (they import each other relatively; the package `__init__.py` is not needed)."""
    return sorted(p for p in MODELING_DIR.glob("*.py") if p.name != "__init__.py")

# Files fetched for a Hub id: never pickle weights (*.bin, *.pt, *.pth, *.ckpt).
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken", "chat_templates/*"]
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
LLAVA_ONEVISION = "llava_onevision"
DEFAULT_MAX_SHARD_SIZE = "5GB"
# a source whose config describes more weights than this factor times those on disk is refused before loading
SIZE_SLACK = 1.1
# How the routing token's rows start: "keep" uses a spare row as it is (no tensor changes); "mean" sets it to the mean
# of the source tokenizer's rows. A new row (no spare one) always starts at the mean.
ROUTING_TOKEN_INITS = ("keep", "mean")


# -- defaults ------------------------------------------------------------------------------------------------------


def spread_order(k: int) -> list[int]:
    """The indices 0..k-1 in the order a farthest-point walk adds them: start at 0, then repeatedly the index
    farthest from every index taken so far and from the end k (ties: the lower index)."""
    order: list[int] = []
    while len(order) < k:
        taken = order + [k]
        order.append(max((i for i in range(k) if i not in order), key=lambda i: (min(abs(i - t) for t in taken), -i)))
    return order


def default_configurations(self_attention_layers: list[int]) -> list[list[int]]:
    """Nested subsets of the k SA layers by count: 0 (CA only), k/4, k/2, 3k/4 and k (all), rounded down.

    The subset of n layers holds the first n SA layers of `spread_order(k)` (the first SA layer, then the layers
    farthest from those already chosen), so the layers are spread over depth and every subset holds the smaller ones.
    """
    selfs = sorted(self_attention_layers)
    order = spread_order(len(selfs))
    k = len(selfs)
    return [sorted(selfs[i] for i in order[:n]) for n in sorted({0, k // 4, k // 2, (3 * k) // 4, k})]


def default_router_layer(config: VisorConfig) -> int | None:
    """The layer just before the first SA layer that some configuration switches off; `None` when there is nothing to
    decide (one configuration) or no layer before it."""
    if len(config.configurations) < 2:
        return None
    switchable = config.switchable_layers
    if not switchable or switchable[0] == 0:
        return None
    return switchable[0] - 1


def resolve_layout(
    num_layers: int,
    cross_attention_layers=None,
    self_attention_layers=None,
    configurations=None,
    router_layer=None,
    dense: bool = False,
) -> dict:
    """The layer layout a conversion writes (see `docs/conversion.md`)."""
    if dense:
        if cross_attention_layers or router_layer is not None or configurations is not None:
            raise ConversionError("--dense takes no CA layers, configurations or router layer: it is the all-SA layout")
        every = list(range(num_layers))
        return {"cross_attention_layers": [], "self_attention_layers": every, "configurations": [every], "router_layer": None}
    if cross_attention_layers is None and self_attention_layers is None:
        cross, selfs = uniform_layer_layout(num_layers)
    elif self_attention_layers is None:
        cross = list(cross_attention_layers)
        selfs = [i for i in range(num_layers) if i not in set(cross)]
    else:
        cross = list(cross_attention_layers or [])
        selfs = list(self_attention_layers)
    if configurations is None:
        configurations = default_configurations(selfs)
    return {
        "cross_attention_layers": sorted(int(i) for i in cross),
        "self_attention_layers": sorted(int(i) for i in selfs),
        "configurations": [sorted(int(i) for i in c) for c in configurations],
        "router_layer": router_layer,
    }


# -- the source ----------------------------------------------------------------------------------------------------


def resolve_source(src: str | os.PathLike, revision: str | None = None) -> Path:
    """A local folder, or a Hub id resolved through huggingface_hub's cache (offline once cached); pickle weight files
    are never downloaded."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise ConversionError(f"source {src} is a file, not a checkpoint folder")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id=str(src), revision=revision, allow_patterns=HUB_ALLOW_PATTERNS))
    except Exception as error:  # not a repo id, offline without cache, gated, ...
        raise ConversionError(
            f"source {src!r} is neither a local folder nor a Hub model that could be resolved "
            f"(offline with HF_HUB_OFFLINE=1 a Hub id works only once it is in the local cache): {error}"
        ) from error


def check_source(src: Path) -> dict:
    """Refuse what is not a checkpoint of a supported family in safetensors before loading anything; return its
    config."""
    config_file = src / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"source {src} has no config.json: not a transformers checkpoint")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as error:
        raise ConversionError(f"source {config_file} is not valid JSON: {error}") from error
    model_type = config.get("model_type")
    if family_of(model_type) is None:
        hint = " (it is already a VISOR checkpoint)" if model_type in VISOR_MODEL_TYPES else ""
        raise ConversionError(
            f"source {src} has model_type {model_type!r}{hint}; supported sources (transformers layout): "
            f"{supported_sources()}"
        )
    shards = safetensors_files(src)
    if not shards:
        pickles = sorted(p.name for p in src.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise ConversionError(
                f"source {src} holds only pickle weight files ({', '.join(pickles)}); they are never loaded "
                "(arbitrary code execution). Convert them to safetensors first."
            )
        raise ConversionError(f"source {src} has no safetensors weights (model.safetensors or model.safetensors.index.json)")
    from safetensors import safe_open

    index = src / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"] if index.is_file() else {}
    for shard in shards:
        if not shard.is_file():
            raise ConversionError(f"source {src}: the index names the weight file {shard.name}, which is missing")
        try:
            with safe_open(str(shard), framework="pt") as handle:
                names = set(handle.keys())
        except Exception as error:
            raise ConversionError(f"source weight file {shard} is corrupt or truncated: {error}") from error
        absent = sorted(name for name, file in weight_map.items() if file == shard.name and name not in names)
        if absent:
            raise ConversionError(f"source {src}: the index places tensors {absent[:8]} in {shard.name}, which lacks them")
    return config


def check_max_shard_size(max_shard_size: int | str) -> int | str:
    """Refuse a `--max-shard-size` that `save_pretrained` would reject, before the model is loaded."""
    from transformers.utils.hub import convert_file_size_to_int

    try:
        size = convert_file_size_to_int(max_shard_size)
    except (ValueError, TypeError):
        size = None
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
        raise ConversionError(f"max shard size {max_shard_size!r} is not a positive size such as '5GB', '500MB' or 1000000")
    return max_shard_size


SAFETENSORS_ITEMSIZE = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}


def stored_tensors(src: Path) -> list[tuple[list[int], str]]:
    """Shape and dtype of every tensor in the source's safetensors files, read from their headers (nothing is loaded)."""
    from safetensors import safe_open

    tensors = []
    for shard in safetensors_files(src):
        with safe_open(str(shard), framework="pt") as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)
                tensors.append((piece.get_shape(), piece.get_dtype()))
    return tensors


def check_free_space(src: Path, dst: Path, dtype: torch.dtype | str | None) -> None:
    """Refuse, before loading, an output folder whose file system has less free space than the weights need (the
    source's tensors in the output dtype; the new modules are small)."""
    needed = 0
    for shape, stored_dtype in stored_tensors(src):
        size = dtype.itemsize if isinstance(dtype, torch.dtype) else SAFETENSORS_ITEMSIZE.get(stored_dtype, 4)
        needed += math.prod(shape) * size
    parent = next((p for p in [dst.parent, *dst.parent.parents] if p.exists()), dst.anchor)
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise ConversionError(f"only {free:,} bytes free on {parent}; the output needs about {needed:,} bytes")


def check_source_sizes(src: Path, config: dict):
    """The source's config (its family's class), once its sizes agree with the weights on disk.

    A config.json without `text_config` or `vision_config` would make the family fall back to its default sizes
    (a 7B language model) and the conversion allocate gigabytes before noticing: it is refused, as is a config that
    describes far more weights (over `SIZE_SLACK` times) than the safetensors headers hold. The count comes from the
    model built on the meta device (no memory). A smaller gap (a few missing tensors) is left to the loader, which
    names the tensors; what it allocates is then bounded by the weights on disk.
    """
    absent = [key for key in ("text_config", "vision_config") if not isinstance(config.get(key), dict)]
    if absent:
        raise ConversionError(
            f"source {src}/config.json has no {' and no '.join(absent)}: the model would fall back to its "
            "default sizes, which need not match the weights; give the sub-configs explicitly"
        )
    from accelerate import init_empty_weights

    family = family_of(config.get("model_type")) or family_of(LLAVA_ONEVISION)
    model_class = family.source_model_class()
    try:
        llava_config = model_class.config_class.from_pretrained(str(src))
        with init_empty_weights():
            skeleton = model_class(llava_config)
            skeleton.tie_weights()
    except Exception as error:
        raise ConversionError(f"source {src}/config.json is not a valid {family.name} config: {error}") from error
    expected = sum(p.numel() for p in skeleton.parameters())  # tied weights counted once
    stored = sum(math.prod(shape) for shape, _ in stored_tensors(src))
    if expected > SIZE_SLACK * stored:
        raise ConversionError(
            f"source {src}/config.json describes a model of {expected:,} weights but its safetensors files hold "
            f"{stored:,}: the config does not match the weights (nothing was loaded)"
        )
    return llava_config


def safetensors_files(src: Path) -> list[Path]:
    index = src / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as error:
            raise ConversionError(f"source index {index} is not a valid safetensors index: {error}") from error
        return [src / name for name in sorted(set(weight_map.values()))]
    single = src / "model.safetensors"
    return [single] if single.is_file() else []


def load_source_model(src: Path, dtype: torch.dtype | str | None, family: SourceFamily | None = None):
    family = family or family_of(LLAVA_ONEVISION)
    try:
        model, info = family.source_model_class().from_pretrained(
            str(src), dtype=dtype or "auto", use_safetensors=True, output_loading_info=True, attn_implementation="eager"
        )
    except Exception as error:
        raise ConversionError(f"source {src} could not be loaded as {family.name}: {error}") from error
    problems = []
    if info.get("missing_keys"):
        problems.append(f"missing tensors {sorted(info['missing_keys'])[:8]}")
    if info.get("unexpected_keys"):
        problems.append(f"unexpected tensors {sorted(info['unexpected_keys'])[:8]}")
    if info.get("mismatched_keys"):
        problems.append(f"tensors of the wrong shape {sorted(info['mismatched_keys'])[:8]}")
    if info.get("error_msgs"):
        problems.append(f"errors {info['error_msgs'][:4]}")
    if problems:
        raise ConversionError(f"source {src} is not a complete {family.name} checkpoint: " + "; ".join(problems))
    return model.eval()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "tokenizer.tiktoken")


def load_source_tokenizer(src: Path):
    """The source's tokenizer, or `None` when the folder holds no tokenizer file at all (a model saved alone with
    `save_pretrained`); a tokenizer that is there but cannot be loaded is an error."""
    if not any((src / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(src))
    except Exception as error:
        raise ConversionError(f"source {src} has no usable tokenizer: {error}") from error


def default_image_processor(config: dict):
    """LLaVA-OneVision's image processor (the PIL one, no torchvision needed) for a model config, for sources saved
    without one: tile size from the vision tower, anyres grid from `image_grid_pinpoints`, LLaVA-OV's defaults for
    everything else."""
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    vision = config.get("vision_config") or {}
    if config.get("model_type") in ("qwen2_vl", "qwen2_5_vl", *VISOR_MODEL_TYPES[1:]):
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        # the family's processor with the tower's patch, merge and temporal sizes
        keys = {"patch_size": "patch_size", "spatial_merge_size": "merge_size", "temporal_patch_size": "temporal_patch_size"}
        return Qwen2VLImageProcessorPil(**{new: vision[old] for old, new in keys.items() if old in vision})
    side = int(vision.get("image_size", 384))
    kwargs = {"size": {"height": side, "width": side}}
    if config.get("image_grid_pinpoints"):
        kwargs["image_grid_pinpoints"] = config["image_grid_pinpoints"]
    return LlavaOnevisionImageProcessorPil(**kwargs)


def has_image_processor(src: Path) -> bool:
    if (src / "preprocessor_config.json").is_file():
        return True
    processor_file = src / "processor_config.json"
    if processor_file.is_file():
        try:
            return "image_processor" in json.loads(processor_file.read_text())
        except json.JSONDecodeError:
            return False
    return False


def load_source_image_processor(src: Path, family: SourceFamily | None = None):
    """The source's image processor (the PIL one: no torchvision needed), or the family's default one for its config
    when it has none."""
    from transformers import AutoImageProcessor

    config = json.loads((src / "config.json").read_text())
    if not has_image_processor(src):
        logger.warning("source %s has no image processor: using the family's default one for its config", src)
        return default_image_processor(config)
    try:
        if config.get("model_type") in ("qwen2_vl", "qwen2_5_vl"):
            return AutoImageProcessor.from_pretrained(str(src), backend="pil")
        return AutoImageProcessor.from_pretrained(str(src))
    except Exception as error:
        raise ConversionError(f"source {src} has an image processor that cannot be loaded: {error}") from error


def load_source_processor(src: Path, tokenizer, routing_token: str | None, family: SourceFamily | None = None) -> VisorProcessor:
    """A VisorProcessor (the family's) from the source's image processor, processor settings and chat template."""
    if family is not None and family.model_type != LLAVA_ONEVISION:
        return family.visor_class("processor")(
            image_processor=load_source_image_processor(src, family), tokenizer=tokenizer,
            chat_template=source_chat_template(src, tokenizer), routing_token=routing_token,
        )
    fields = {}
    processor_file = src / "processor_config.json"
    if processor_file.is_file():
        try:
            fields = json.loads(processor_file.read_text())
        except json.JSONDecodeError as error:
            raise ConversionError(f"source {processor_file} is not valid JSON: {error}") from error
    image_processor = load_source_image_processor(src)
    keep = ("num_image_tokens", "vision_feature_select_strategy", "vision_aspect_ratio", "image_token", "video_token")
    kwargs = {k: fields[k] for k in keep if k in fields}
    config = json.loads((src / "config.json").read_text())
    vision = config.get("vision_config", {})
    if kwargs.get("num_image_tokens") is None and "image_size" in vision and "patch_size" in vision:
        kwargs["num_image_tokens"] = (vision["image_size"] // vision["patch_size"]) ** 2
    if kwargs.get("vision_feature_select_strategy") is None:
        kwargs["vision_feature_select_strategy"] = config.get("vision_feature_select_strategy", "full")
    chat_template = source_chat_template(src, tokenizer)
    video_processor = None
    if "video_processor" in VisorProcessor.get_attributes():  # torchvision is installed: carry a video processor over
        from transformers import AutoVideoProcessor, LlavaOnevisionVideoProcessor

        try:
            video_processor = AutoVideoProcessor.from_pretrained(str(src))
        except Exception:  # the source has none: LLaVA-OV's defaults
            video_processor = LlavaOnevisionVideoProcessor()
    return VisorProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=chat_template,
        routing_token=routing_token,
        **kwargs,
    )


def source_chat_template(src: Path, tokenizer) -> str | None:
    """The source's chat template: `chat_template.jinja`, `chat_template.json`, else the tokenizer's."""
    if (src / "chat_template.jinja").is_file():
        return (src / "chat_template.jinja").read_text()
    if (src / "chat_template.json").is_file():
        return json.loads((src / "chat_template.json").read_text()).get("chat_template")
    return getattr(tokenizer, "chat_template", None)


# -- the routing token ---------------------------------------------------------------------------------------------


@torch.no_grad()
def add_routing_token(
    model, tokenizer, routing_token: str, allow_resize: bool = True, init: str = "keep"
) -> int | None:
    """Add the routing token to the tokenizer and give it an embedding row and an LM-head row; return its id.

    - The token takes the tokenizer's next id. When that id is a spare row of the embedding matrix (the matrix is
      longer than the tokenizer, as in Qwen2 checkpoints), the row is used as it is: no tensor changes at all, so
      every source tensor stays bit-identical and the converted model computes what the source computes on any ids.
    - Otherwise the embedding matrix and the LM head grow by one row (`text_config.vocab_size` + 1), initialised to
      the mean of the rows of the source tokenizer's tokens (computed in float32, cast back).
    - `tokenizer=None` (a source saved without one): the matrices grow by one row, initialised to the mean of every
      row, and that row is the routing token's id.

    With `allow_resize=False` (the dense layout, which has no router to read the token) nothing is added when there
    is no spare row, and `None` is returned. `init="mean"` also sets a spare row (embedding and LM head) to the mean
    of the source tokenizer's rows, as a new row is.
    """
    if init not in ROUTING_TOKEN_INITS:
        raise ConversionError(f"unknown routing token initialisation {init!r}: one of {', '.join(ROUTING_TOKEN_INITS)}")
    embeddings = model.get_input_embeddings()
    rows = embeddings.weight.shape[0]
    if tokenizer is None:
        if not allow_resize:
            return None
        token_id, num_source_tokens = rows, rows
    else:
        vocab = tokenizer.get_vocab()
        if routing_token in vocab:
            raise ConversionError(
                f"the source tokenizer already holds the routing token {routing_token!r} (id {vocab[routing_token]}); "
                "convert a LLaVA-OneVision checkpoint, or choose another routing token (--routing-token)"
            )
        num_source_tokens = len(tokenizer)
        if num_source_tokens >= rows and not allow_resize:
            return None
        tokenizer.add_special_tokens({"additional_special_tokens": [routing_token]}, replace_extra_special_tokens=False)
        token_id = tokenizer.convert_tokens_to_ids(routing_token)
        if token_id < rows and init == "keep":  # a spare row: used as it is
            return token_id
    if token_id >= rows:
        model.resize_token_embeddings(token_id + 1, mean_resizing=False)
    embeddings = model.get_input_embeddings()
    source_rows = min(num_source_tokens, rows)
    embeddings.weight[token_id] = embeddings.weight[:source_rows].float().mean(0).to(embeddings.weight.dtype)
    head = model.get_output_embeddings()
    if head is not None and head.weight.data_ptr() != embeddings.weight.data_ptr():
        head.weight[token_id] = head.weight[:source_rows].float().mean(0).to(head.weight.dtype)
        if getattr(head, "bias", None) is not None:
            head.bias[token_id] = head.bias[:source_rows].float().mean(0).to(head.bias.dtype)
    return token_id


# -- the conversion ------------------------------------------------------------------------------------------------


def visor_config_from_source(llava_config, layout: dict, routing_token_id: int, family: SourceFamily | None = None) -> VisorConfig:
    family = family or family_of(LLAVA_ONEVISION)
    fields = llava_config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "auto_map"):
        fields.pop(key, None)
    fields.update(layout)
    fields["routing_token_id"] = routing_token_id
    try:
        config = family.visor_class("config")(**fields)
        config.validate_architecture()
    except ConversionError:
        raise
    except Exception as error:
        raise ConversionError(f"invalid VISOR layout: {error}") from error
    if config.router_layer is None and layout.get("router_layer") is None:
        router = default_router_layer(config)
        if router is not None:
            config.router_layer = router
    config.auto_map = family.auto_map
    config.architectures = [family.generation.rsplit(".", 1)[1]]
    return config


def build_visor(llava, config: VisorConfig, family: SourceFamily | None = None) -> VisorForConditionalGeneration:
    """A VISOR model holding every source tensor unchanged plus the warm-started new modules.

    The VISOR skeleton is built on the meta device and takes the source's tensors themselves (`assign=True`), so the
    conversion holds one copy of the weights, not two; only the new modules get fresh storage.
    """
    from accelerate import init_empty_weights

    family = family or family_of(LLAVA_ONEVISION)
    with init_empty_weights(include_buffers=False):
        visor = family.visor_class("generation")._from_config(config, dtype=llava.dtype, attn_implementation="eager")
    missing, unexpected = visor.load_state_dict(llava.state_dict(), strict=False, assign=True)
    if unexpected:
        raise ConversionError(f"{family.name} tensors with no place in VISOR: {unexpected[:8]}")
    new = ("model.cross_attention_blocks.", "model.router.", "model.token_packing.")
    tied = {"lm_head.weight"} if getattr(config.get_text_config(), "tie_word_embeddings", False) or config.tie_word_embeddings else set()
    leftover = [k for k in missing if not k.startswith(new) and k not in tied]
    if leftover:
        raise ConversionError(f"VISOR tensors that the source does not provide: {leftover[:8]}")
    visor.tie_weights()
    materialize_new_modules(visor, device=llava.get_input_embeddings().weight.device, dtype=llava.dtype)
    warm_start_new_modules(visor)
    return visor.eval()


@torch.no_grad()
def materialize_new_modules(model: VisorForConditionalGeneration, device: torch.device, dtype: torch.dtype) -> None:
    """Give every parameter still on the meta device (the new modules) real storage and the model's own
    initialisation (`_init_weights`), as `_from_config` would have."""
    for module in model.modules():
        fresh = False
        for name, param in list(module.named_parameters(recurse=False)):
            if param.is_meta:
                module._parameters[name] = torch.nn.Parameter(
                    torch.empty(param.shape, device=device, dtype=dtype), requires_grad=param.requires_grad
                )
                fresh = True
        if fresh:
            model._init_weights(module)
    still_meta = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    if still_meta:
        raise ConversionError(f"internal error: tensors left without storage {still_meta[:8]}")


def hub_id(name: str | None) -> str | None:
    """`name` when it has the shape of a Hub model id (`owner/name`) and is not a local path; else `None`."""
    return name if name and looks_like_hub_id(name) else None


def packing_line(config) -> str:
    factors = getattr(config, "packing_factors", None)
    if not factors:
        return "none (1 only)"
    return f"1, {', '.join(map(str, factors))} (`model.token_packing`, average-initialised until trained)"


def model_card(src_name: str, config: VisorConfig, routing_token: str, has_processor: bool = True, family: SourceFamily | None = None) -> str:
    """The README.md of a converted checkpoint: Hub metadata, layer layout, configurations, how to load.

    `base_model` goes into the metadata only for a Hub id (the Hub checks it names a model): a local folder is named
    in the text only.
    """
    family = family or family_of(LLAVA_ONEVISION)
    base_model = f"base_model: {hub_id(src_name)}\n" if hub_id(src_name) else ""
    text = config.get_text_config()
    configurations = "\n".join(f"| {i} | {c} | {len(c)} |" for i, c in enumerate(config.configurations))
    if config.routing_token_id is None:
        routing = "none (no router: the dense layout has no routing token)"
    else:
        routing = f"`{routing_token}`, id {config.routing_token_id}" if has_processor else f"id {config.routing_token_id}"
    no_processor = (
        ""
        if has_processor
        else "\n**The source had no tokenizer**: this folder holds no tokenizer and no processor. Copy the LLaVA-OneVision "
        f"tokenizer here and add the routing token as id {config.routing_token_id}, or put that id after each question "
        "yourself.\n"
    )
    if config.cross_attention_layers or config.router_layer is not None:
        initialisation = (
            "The cross-attention blocks start from their host layer's attention and norm weights, the position "
            "convolutions at zero, the router at random. **The new modules are untrained**: fine-tune (stage 1: new "
            "modules, stage 2: everything) and train the router before use."
        )
    else:
        initialisation = (
            "**Dense layout**: every LLM layer is an active self-attention layer and there is no cross-attention layer "
            "and no router, so this checkpoint computes exactly what the source computes (the equivalence check: "
            "`visor-hf verify DST --against SOURCE`)."
        )
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
{base_model}tags:
- visor
- {family.model_type.replace("_", "-")}
- custom_code
---

# VISOR (VISion On Request) model converted from `{src_name}`

A {family.name} model whose language model meets the visual tokens only at a few layers: cross-attention (CA)
layers (text queries, visual keys/values) and switchable self-attention (SA) layers; a router picks, per sample,
which SA layers run. Every weight of `{src_name}` is kept unchanged. {initialisation}
{no_processor}
## Layer layout

- LLM layers: {text.num_hidden_layers}
- cross-attention layers: {config.cross_attention_layers}
- self-attention layers: {config.self_attention_layers}
- router layer: {config.router_layer}
- routing token: {routing}
- default configuration without a router decision: {config.default_configuration!r}
- token packing factors (`visor_packing=`, with the processor's `packing=`): {packing_line(config)}

| configuration | SA layers | count |
|---|---|---|
{configurations}

{loading_section(routing_token)}"""


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    cross_attention_layers: list[int] | None = None,
    self_attention_layers: list[int] | None = None,
    configurations: list[list[int]] | None = None,
    router_layer: int | None = None,
    dense: bool = False,
    dtype: torch.dtype | str | None = None,
    max_shard_size: int | str = DEFAULT_MAX_SHARD_SIZE,
    overwrite: bool = False,
    routing_token: str = DEFAULT_ROUTING_TOKEN,
    routing_token_init: str = "keep",
    revision: str | None = None,
    packing: bool | None = None,
) -> Path:
    """Convert a LLaVA-OneVision checkpoint (local folder or Hub id) into a VISOR checkpoint folder `dst`.

    Layout defaults (paper): |CA| = |SA| = L/3 spread uniformly (`uniform_layer_layout`), configurations nested by
    SA count (`default_configurations`), router just before the first switchable SA layer. `dense=True` writes the
    all-SA layout (no CA layer, no router) that reproduces LLaVA-OneVision. `dtype` casts the weights (default:
    the source's). The output is written to a fresh temporary folder next to `dst` and published with one atomic
    rename (see `publish.py`); an existing `dst` is refused unless `overwrite`, which replaces only a VISOR or
    LLaVA-OneVision checkpoint folder. `routing_token_init` ("keep" or "mean") says how a spare embedding row
    taken by the routing token starts (see `add_routing_token`). `packing` adds the VISOR-TR token packing module
    (`model.token_packing.pack2` / `pack4`, average-initialised: an untrained module is average pooling; LLaVA-OneVision
    sources only); `visor_packing=1`, the default, does not use it. Default (`None`): added, except with `dense=True`
    (the dense layout holds exactly the source's tensors). Returns the output folder.
    """
    if routing_token_init not in ROUTING_TOKEN_INITS:
        raise ConversionError(f"unknown routing token initialisation {routing_token_init!r}: one of {', '.join(ROUTING_TOKEN_INITS)}")
    # every argument and the output are checked before anything is loaded
    max_shard_size = check_max_shard_size(max_shard_size)
    dst = Path(dst).expanduser().absolute()
    if not overwrite:
        check_output(dst, overwrite)  # before a Hub source is fetched
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ConversionError(f"unknown dtype {dtype!r} (float32, float16, bfloat16)")
        dtype = getattr(torch, dtype)
    src_path = resolve_source(src, revision)
    if dst.resolve() == src_path or src_path in dst.resolve().parents or dst.resolve() in src_path.parents:
        raise ConversionError(f"output {dst} must not be the source folder, inside it, or hold it")
    check_output(dst, overwrite)
    source_config = check_source(src_path)
    family = family_of(source_config["model_type"])
    # the layout and the sizes are resolved before the weights are read (config.json may leave defaults out: read it
    # as transformers does)
    llava_config = check_source_sizes(src_path, source_config)
    check_free_space(src_path, dst, dtype)
    num_layers = llava_config.get_text_config().num_hidden_layers
    layout = resolve_layout(num_layers, cross_attention_layers, self_attention_layers, configurations, router_layer, dense)
    if family.visor_model_type == "visor":  # token packing works on LLaVA-OneVision's anyres layout
        layout["packing_factors"] = list(PACKING_FACTORS) if (not dense if packing is None else packing) else []

    with staged_output(dst, overwrite) as tmp:
        llava = load_source_model(src_path, dtype, family)
        tokenizer = load_source_tokenizer(src_path)
        # the dense layout has no router: it takes the routing token only where no tensor changes (a spare row)
        routing_token_id = add_routing_token(llava, tokenizer, routing_token, allow_resize=not dense, init=routing_token_init)
        if tokenizer is None:
            logger.warning(
                "source %s has no tokenizer: the output gets no tokenizer and no processor (%s)", src_path,
                "no routing token" if routing_token_id is None else f"the routing token is id {routing_token_id}, a new row",
            )
            processor, image_processor = None, load_source_image_processor(src_path, family)
        else:
            if routing_token_id is None:
                logger.warning("dense layout: no spare embedding row for the routing token, so none is added")
            processor = load_source_processor(src_path, tokenizer, routing_token if routing_token_id is not None else None, family)
            image_processor = None
        config = visor_config_from_source(llava.config, layout, routing_token_id, family)
        visor = build_visor(llava, config, family)
        del llava

        visor.save_pretrained(str(tmp), max_shard_size=max_shard_size)
        if (src_path / "generation_config.json").is_file():
            shutil.copyfile(src_path / "generation_config.json", tmp / "generation_config.json")
        if processor is not None:
            processor.auto_map = family.processor_auto_map
            processor.save_pretrained(str(tmp))
        else:
            image_processor.save_pretrained(str(tmp))
        for path in remote_code_files():
            shutil.copyfile(path, tmp / path.name)
        name = str(src) if not Path(str(src)).expanduser().is_dir() else (source_config.get("_name_or_path") or src_path.name)
        (tmp / "README.md").write_text(model_card(name, config, routing_token, has_processor=processor is not None, family=family))
        for leftover in tmp.iterdir():
            if leftover.suffix in PICKLE_SUFFIXES:
                raise ConversionError(f"internal error: a pickle file {leftover.name} was written")
        publish(tmp, dst, overwrite)
    logger.info("wrote VISOR checkpoint %s", dst)
    return dst


__all__ = [
    "ConversionError",
    "convert",
    "default_configurations",
    "default_router_layer",
    "resolve_layout",
    "resolve_source",
    "check_source",
    "add_routing_token",
]

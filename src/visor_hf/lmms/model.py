"""`--model visor`: VISOR checkpoints in lmms-eval, with each answer's configuration and compute.

Every answer (a `generate_until` or `loglikelihood` request) comes back as lmms-eval's `GenerationResult` whose
`token_counts` also carries the SA layers that ran, their number and the LLM prefill FLOPs against dense LLaVA-OV
on the same prompt without the routing token (unpacked: with `visor_packing`, VISOR runs on the packed visual
tokens and LLaVA-OV on every token); `--log_samples` writes them with each sample. After each request
type, the means per task (FLOPs ratio, saving, SA layers) go to lmms-eval's run summary, printed under the results
table and stored in `results["throughput"]` (as `avg_visor_...`).
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.models.model_utils.gen_metrics import log_metrics
from loguru import logger
from PIL import Image

from ..modeling.flops_visor import FlopsShape, prefill_flops
from ..modeling.packing_visor import image_token_layouts
from .options import check_options, parse_options

DEFAULT_MAX_NEW_TOKENS = 1024  # what lmms-eval's own HF models use when a task does not say


@dataclass
class VisorUsage(TokenCounts):
    """lmms-eval's per-request token counts plus VISOR's compute for that request."""

    visor_configuration: list[int] | None = None
    visor_prefill_flops: int | None = None
    visor_dense_prefill_flops: int | None = None
    visor_packing: int = 1

    @property
    def flops_ratio(self) -> float:
        return self.visor_prefill_flops / self.visor_dense_prefill_flops

    def to_dict(self) -> dict:
        out = super().to_dict()
        out.update(
            visor_configuration=self.visor_configuration,
            visor_sa_layers=len(self.visor_configuration),
            visor_prefill_flops=self.visor_prefill_flops,
            visor_dense_prefill_flops=self.visor_dense_prefill_flops,
            visor_flops_ratio=self.flops_ratio,
            visor_packing=self.visor_packing,
        )
        return out


def load_visor(pretrained: str, device: str, dtype: str, attn_implementation: str | None):
    """The VISOR model and processor of a folder; `ValueError` when it cannot be loaded or is not VISOR."""
    from transformers import AutoConfig, AutoProcessor

    import visor_hf  # noqa: F401  (registers the VISOR classes with the Auto classes)

    from ..modeling import VisorForConditionalGeneration

    try:
        config = AutoConfig.from_pretrained(pretrained)
    except (OSError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"pretrained={pretrained}: cannot load a checkpoint config ({first})") from error
    if config.model_type != "visor":
        raise ValueError(
            f"pretrained={pretrained} is not a VISOR checkpoint (model_type {config.model_type!r}); convert it first "
            "with `visor-hf convert SRC DST`"
        )
    torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
    model = VisorForConditionalGeneration.from_pretrained(pretrained, dtype=torch_dtype, attn_implementation=attn_implementation)
    processor = AutoProcessor.from_pretrained(pretrained)
    processor.tokenizer.padding_side = "left"  # batched generation
    return model.to(device).eval(), processor


def _flatten(visuals) -> list:
    if visuals is None:
        return []
    if isinstance(visuals, (list, tuple)):
        return (
            [v for item in visuals for v in _flatten(item)]
            if any(isinstance(v, (list, tuple)) for v in visuals)
            else list(visuals)
        )
    return [visuals]


class Visor(lmms):
    """lmms-eval model `visor`. model_args: `pretrained` (a VISOR folder), `visor_configuration` (auto, max, an
    index or SA layers `[1,6]`), `visor_budget`, `visor_router_threshold`, `visor_packing` (VISOR-TR token packing
    of the images: 1, 2 or 4), `dtype`, `attn_implementation`, `max_frames_num` (frames per video), plus lmms-eval's
    `batch_size` and `device`."""

    is_simple = True

    def __init__(
        self,
        pretrained: str | None = None,
        visor_configuration=None,
        visor_budget=None,
        visor_router_threshold=None,
        visor_packing=None,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        device: str | None = None,
        dtype: str = "auto",
        attn_implementation: str | None = "sdpa",
        max_frames_num: int = 8,
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(
                f"unknown model_args key(s) for --model visor: {', '.join(sorted(unknown))}; accepted: pretrained, "
                "visor_configuration, visor_budget, visor_router_threshold, visor_packing, dtype, attn_implementation, "
                "max_frames_num"
            )
        if not pretrained:
            raise ValueError("--model visor needs model_args pretrained=DIR (a VISOR checkpoint folder)")
        self.options = parse_options(visor_configuration, visor_budget, visor_router_threshold, visor_packing)
        self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.processor = load_visor(str(pretrained), str(self._device), dtype, attn_implementation)
        check_options(self.options, self.model)
        self.tokenizer = self.processor.tokenizer
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"--model visor takes a positive integer batch size, got {batch_size!r}")
        self.batch_size = int(batch_size)
        self.max_frames_num = int(max_frames_num)
        self._shape = FlopsShape.from_config(self.model.config)
        self._warned_video_packing = False

    # -- inputs ------------------------------------------------------------------------------------------------------

    def _visuals(self, instance_args) -> tuple[list, list]:
        """The images and videos a request's document gives (a video: a file path or a list of frames)."""
        doc_to_visual, doc_id, task, split = instance_args[2:6]
        if doc_to_visual is None:
            return [], []
        images, videos = [], []
        for visual in _flatten(doc_to_visual(self.task_dict[task][split][doc_id])):
            if isinstance(visual, Image.Image):
                images.append(visual.convert("RGB"))
            elif isinstance(visual, str):
                videos.append(self._load_video(visual))
            else:
                raise ValueError(
                    f"--model visor: unsupported visual input of type {type(visual).__name__} (images or video paths)"
                )
        if videos and self.options.packing != 1 and not self._warned_video_packing:
            self._warned_video_packing = True
            logger.warning(
                f"--model visor: visor_packing={self.options.packing} packs images only; the videos of this task run "
                "unpacked (LLaVA-OneVision already pools video frames 2 x 2), their tokens counted unpacked"
            )
        return images, videos

    def _load_video(self, path: str):
        from transformers.video_utils import load_video

        if getattr(self.processor, "video_processor", None) is None:
            raise ValueError(
                f"--model visor: the task gives a video ({path}), but the processor has no video processor: "
                "LLaVA-OneVision's video processor needs torchvision (and a video decoder such as PyAV)"
            )

        frames, _ = load_video(path, num_frames=self.max_frames_num)
        return frames

    def _prompt(self, context: str, images: list, videos: list) -> str:
        """The chat prompt (routing token included by the processor): the visuals first, then the task's text."""
        content = []
        if "<image>" not in context and "<video>" not in context:
            content += [{"type": "image"}] * len(images) + [{"type": "video"}] * len(videos)
        content.append({"type": "text", "text": context})
        return self.processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)

    def _encode(self, texts: list[str], images: list, videos: list) -> dict:
        kwargs = {"text": texts, "return_tensors": "pt", "padding": True, **self.options.processor_kwargs()}
        if images:
            kwargs["images"] = images
        if videos:
            kwargs["videos"] = videos
        return self.processor(**kwargs).to(self._device)

    # -- compute -----------------------------------------------------------------------------------------------------

    def _unpacked_image_tokens(self, inputs, images_per_sample: list[int]) -> list[int] | None:
        """Per sample, the tokens of its images in LLaVA-OV's layout (what dense LLaVA-OV reads), from the images'
        sizes; None without packing (the prompt then holds exactly those)."""
        if self.options.packing == 1 or not any(images_per_sample):
            return None
        layouts = image_token_layouts(
            self.model.config,
            inputs["image_sizes"],
            getattr(self.processor, "vision_aspect_ratio", None),
            inputs.get("batch_num_images"),
        )
        tokens = [layout.num_tokens(1) for layout in layouts]
        starts = itertools.accumulate([0, *images_per_sample])
        return [sum(tokens[start : start + n]) for start, n in zip(starts, images_per_sample)]

    def _usage(
        self, layers, input_ids: torch.Tensor, output_tokens: int | None, unpacked_images: int | None = None
    ) -> VisorUsage:
        """Prefill FLOPs of one prompt (its real tokens, the images packed by `visor_packing`) with the SA layers that
        ran, and of dense LLaVA-OV on the same prompt without the routing token and with `unpacked_images` image
        tokens (default: the prompt's)."""
        config = self.model.config
        images = int((input_ids == config.image_token_id).sum())
        videos = int((input_ids == config.video_token_id).sum())
        n_visual = images + videos
        n_text = int(input_ids.numel()) - n_visual
        n_routing = int((input_ids == config.routing_token_id).sum())
        dense_visual = n_visual if unpacked_images is None else unpacked_images + videos
        layers = sorted(int(x) for x in layers)
        return VisorUsage(
            input_tokens=int(input_ids.numel()),
            output_tokens=output_tokens,
            visor_configuration=layers,
            visor_prefill_flops=prefill_flops(self._shape, n_text, n_visual, layers, config.cross_attention_layers),
            visor_dense_prefill_flops=prefill_flops(self._shape, n_text - n_routing, dense_visual),
            visor_packing=self.options.packing,
        )

    def _summarise(self, kind: str, requests: list[Instance], results: list[GenerationResult], seconds: float) -> None:
        """Mean SA layers, FLOPs ratio (sum VISOR / sum dense) and saving per task and overall, to lmms-eval's run
        summary and the log."""
        by_task: dict[str, list[VisorUsage]] = {}
        for request, result in zip(requests, results):
            by_task.setdefault(request.task_name, []).append(result.token_counts)
        by_task["all"] = [r.token_counts for r in results]
        metrics = {}
        for task, usages in by_task.items():
            visor = sum(u.visor_prefill_flops for u in usages)
            dense = sum(u.visor_dense_prefill_flops for u in usages)
            layers = sum(len(u.visor_configuration) for u in usages) / len(usages)
            suffix = "" if task == "all" else f" ({task})"
            metrics.update(
                {
                    f"visor_flops_ratio{suffix}": visor / dense,
                    f"visor_saving{suffix}": dense / visor,
                    f"visor_sa_layers{suffix}": layers,
                }
            )
            logger.info(
                f"VISOR {kind} {task}: {len(usages)} samples, mean SA layers {layers:.2f}, LLM prefill FLOPs "
                f"{visor / dense:.3f}x dense, mean saving {dense / visor:.2f}x"
            )
        generated = sum(r.token_counts.output_tokens or 0 for r in results)
        log_metrics(
            total_elapsed_time=seconds,
            total_gen_tokens=generated,
            avg_speed=generated / seconds if seconds > 0 else 0.0,
            additional_metrics=metrics,
        )

    # -- lmms-eval requests ------------------------------------------------------------------------------------------

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        """Greedy (or sampled) answers in left-padded batches of `batch_size`, grouped by generation settings and
        sorted by prompt length; each answer is cut at the first of the task's `until` strings."""
        started = time.perf_counter()
        order = sorted(
            range(len(requests)),
            key=lambda i: (json.dumps(requests[i].args[1], sort_keys=True, default=str), -len(requests[i].args[0])),
        )
        results: list[GenerationResult | None] = [None] * len(requests)
        start = 0
        while start < len(order):
            key = json.dumps(requests[order[start]].args[1], sort_keys=True, default=str)
            chunk = [order[start]]
            while len(chunk) < self.batch_size and start + len(chunk) < len(order):
                nxt = order[start + len(chunk)]
                if json.dumps(requests[nxt].args[1], sort_keys=True, default=str) != key:
                    break
                chunk.append(nxt)
            start += len(chunk)
            for index, result in zip(chunk, self._generate_batch([requests[i] for i in chunk])):
                results[index] = result
        self._summarise("generate_until", requests, results, time.perf_counter() - started)
        return results

    def _generate_batch(self, batch: list[Instance]) -> list[GenerationResult]:
        gen = dict(batch[0].args[1] or {})
        until = gen.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        texts, images, videos, images_per_sample = [], [], [], []
        for request in batch:
            sample_images, sample_videos = self._visuals(request.args)
            texts.append(self._prompt(request.args[0], sample_images, sample_videos))
            images += sample_images
            videos += sample_videos
            images_per_sample.append(len(sample_images))
        inputs = self._encode(texts, images, videos)
        unpacked = self._unpacked_image_tokens(inputs, images_per_sample)
        temperature = float(gen.pop("temperature", 0) or 0)
        settings = {
            "max_new_tokens": int(gen.pop("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)),
            "do_sample": temperature > 0,
            "num_beams": int(gen.pop("num_beams", 1) or 1),
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if temperature > 0:
            settings["temperature"] = temperature
            if gen.get("top_p") is not None:
                settings["top_p"] = float(gen["top_p"])
        with torch.inference_mode():
            out = self.model.generate(**inputs, **settings, **self.options.generate_kwargs())
        report = self.model.last_visor_report
        new_tokens = out[:, inputs["input_ids"].shape[1] :]
        results = []
        for i in range(len(batch)):
            text = self.tokenizer.decode(new_tokens[i], skip_special_tokens=True)
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop)[0]
            real = inputs["input_ids"][i][inputs["attention_mask"][i].bool()]
            produced = int((new_tokens[i] != self.tokenizer.pad_token_id).sum())
            usage = self._usage(report.configurations[i], real, produced, None if unpacked is None else unpacked[i])
            results.append(GenerationResult(text=text, token_counts=usage))
        return results

    def loglikelihood(self, requests: list[Instance]) -> list[GenerationResult]:
        """(mean negative log-likelihood of the continuation, whether greedy decoding gives it), one sample at a time.

        The first value is a loss, as lmms-eval's own models return it and as its multiple-choice scoring expects
        (it picks the lowest). It is wrapped in a `GenerationResult` so that the compute is logged with it.
        """
        started = time.perf_counter()
        results = []
        for request in requests:
            context, target, _, doc_id, task, split = request.args[:6]
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            images, videos = self._visuals(request.args)
            prompt = self._prompt(context, images, videos)
            prompt_inputs = self._encode([prompt], images, videos)
            prompt_ids = prompt_inputs["input_ids"][0]
            inputs = self._encode([prompt + continuation], images, videos)
            ids = inputs["input_ids"][0]
            n = len(prompt_ids)
            if len(ids) <= n or not torch.equal(ids[:n], prompt_ids):
                raise ValueError(f"--model visor: the continuation {continuation!r} does not tokenize as a suffix of the prompt")
            kwargs = self.options.generate_kwargs()
            with torch.inference_mode():
                out = self.model(**inputs, **kwargs, use_cache=False)
            logits = out.logits[0, n - 1 : -1].float()
            targets = ids[n:]
            loss = torch.nn.functional.cross_entropy(logits, targets).item()
            greedy = bool((logits.argmax(-1) == targets).all())
            unpacked = self._unpacked_image_tokens(prompt_inputs, [len(images)])
            usage = self._usage(out.visor_configurations[0], prompt_ids, None, None if unpacked is None else unpacked[0])
            results.append(GenerationResult(text=(loss, greedy), token_counts=usage))
        self._summarise("loglikelihood", requests, results, time.perf_counter() - started)
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("--model visor does not implement multi-round generation")


__all__ = ["Visor", "VisorUsage", "load_visor"]

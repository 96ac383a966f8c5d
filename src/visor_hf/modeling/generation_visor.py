"""Generation plumbing of VISOR: the per-sample report of `generate`, the VISOR cache it starts with, the expansion
of per-sample inputs (images, configuration requests, budgets) for beams and returned sequences, and the inputs
that a draft model of assisted decoding does not take."""

from __future__ import annotations

import inspect
import threading
import weakref

import torch
from torch import nn
from transformers.cache_utils import DynamicCache, StaticCache
from transformers.generation import GenerationMixin
from transformers.modeling_outputs import ModelOutput
from transformers.utils import logging

from .cache_visor import VisorCache, VisorStaticCache
from .flops_visor import VisorFlopsReport
from .packing_visor import image_token_layouts, images_of_samples, packing_per_sample
from .report_visor import budget_request, generation_report, prompt_token_counts
from .requests_visor import is_per_sample
from .streams_visor import embedded_token_mask

logger = logging.get_logger(__name__)

# inputs of `generate` that a draft model (assisted decoding) receives only if its forward takes them
_TARGET_ONLY_GENERATE_KWARGS = (
    "visor_configuration", "visor_budget", "visor_router_threshold", "visor_batching", "visor_packing", "pixel_values", "image_sizes", "pixel_values_videos", "image_sizes_videos",
    "batch_num_images", "vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio",
)

# what a `generate` call leaves behind (its report, the cache it ran with), per thread and per model: two threads
# generating with one model must not see each other's
_THREAD_STATE = threading.local()


def _thread_slots(name: str) -> weakref.WeakKeyDictionary:
    slots = getattr(_THREAD_STATE, name, None)
    if slots is None:
        slots = weakref.WeakKeyDictionary()
        setattr(_THREAD_STATE, name, slots)
    return slots


class VisorGenerationMixin(GenerationMixin):
    """`GenerationMixin` with VISOR's hooks; the model provides `config`, `model.get_image_features` and the input
    embeddings."""

    @property
    def last_visor_report(self) -> VisorFlopsReport | None:
        """The report of the last `generate` call of this thread with this model (None before, or without a cache)."""
        return _thread_slots("reports").get(self)

    def _prompt_token_counts(
        self, input_ids, attention_mask, inputs_embeds=None, visual_inputs: bool = True
    ) -> tuple[list[int], list[int]] | None:
        """Real text and visual tokens of each prompt (see `report_visor.prompt_token_counts`)."""
        embeddings = self.get_input_embeddings()
        return prompt_token_counts(self.config, embeddings, input_ids, attention_mask, inputs_embeds, visual_inputs)

    def generate(self, *args, **kwargs) -> torch.LongTensor | ModelOutput:
        """`GenerationMixin.generate`, plus the per-sample VISOR report.

        After the call, `model.last_visor_report` (and `output.visor_report` when `return_dict_in_generate=True`)
        is a `VisorFlopsReport`: configuration and analytical FLOPs (prefill, every decoding step, dense reference)
        of each returned sequence. None when generating without a cache.
        """
        _thread_slots("reports").pop(self, None)
        caches = _thread_slots("caches")
        prompt = next(
            (p for p in (kwargs.get("input_ids"), kwargs.get("inputs"), args[0] if args else None, kwargs.get("inputs_embeds")) if p is not None),
            None,
        )
        cache_in = kwargs.get("past_key_values")
        continuing = isinstance(cache_in, VisorCache) and cache_in.visor_state is not None
        if kwargs.get("visor_budget") is not None and not continuing and isinstance(prompt, torch.Tensor):
            # decide once, on the prompt: without a cache every step re-runs the prefill on a longer text, whose
            # budget could pick another configuration (or none) halfway through the answer
            embeds = prompt.is_floating_point()
            visual_inputs = any(kwargs.get(k) is not None for k in ("pixel_values", "pixel_values_videos", "mm_encoder_outputs"))
            counts = self._prompt_token_counts(
                None if embeds else prompt, kwargs.get("attention_mask"), prompt if embeds else None, visual_inputs
            )
            kwargs["visor_configuration"] = budget_request(self.config, kwargs.pop("visor_budget"), kwargs.get("visor_configuration"), counts)
        try:
            output = super().generate(*args, **kwargs)
        finally:
            cache = caches.pop(self, None)
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        state = cache.visor_state if isinstance(cache, VisorCache) else None
        report = generation_report(self.config, state, prompt.shape[0] if prompt is not None else None, sequences.shape[0])
        _thread_slots("reports")[self] = report
        if isinstance(output, ModelOutput):
            output["visor_report"] = report
            if report is not None:  # the names the forward output uses, for the returned sequences
                output["visor_configurations"] = list(report.configurations)
                output["configuration_index"] = torch.tensor(report.configuration_index, dtype=torch.long)
        return output

    def _expand_images_per_sample(self, expand_size, input_ids, model_kwargs) -> dict:
        """Expand `pixel_values`/`image_sizes` sample by sample (all images of a sample, then again for each copy).

        `generate` repeats every tensor row by row, which is right only with one image per sample: with several, the
        copies of a sample would get the images in the wrong order. Images per sample come from `batch_num_images`
        (when it has one entry per sample), else from the runs of image tokens in `input_ids`, else (adjacent images,
        as LLaVA-OV's chat template puts them, form one run) by matching each sample's image tokens with the images'
        feature lengths. Pops and returns the expanded tensors (empty: nothing to do).
        """
        pixel_values = model_kwargs.get("pixel_values")
        if expand_size <= 1 or not isinstance(pixel_values, torch.Tensor):
            return {}
        embeds = model_kwargs.get("inputs_embeds")
        if input_ids is not None and input_ids.shape[1] > 0:
            image = input_ids == self.config.image_token_id
        elif isinstance(embeds, torch.Tensor):  # placeholders found as LLaVA-OV finds them in embeddings
            image = embedded_token_mask(self.get_input_embeddings(), embeds, [self.config.image_token_id])
        else:
            return {}
        images, batch = pixel_values.shape[0], image.shape[0]
        counts = model_kwargs.get("batch_num_images")
        if counts is not None:
            counts = torch.as_tensor(counts).flatten().tolist()
        if counts is None or len(counts) != batch or sum(counts) != images:
            starts = image & ~nn.functional.pad(image[:, :-1], (1, 0), value=False)
            counts = starts.sum(1).tolist()  # once per generate call
            if sum(counts) != images:
                counts = self._images_per_sample(pixel_values, image.sum(1).tolist(), model_kwargs)
        if all(c == 1 for c in counts):
            return {}
        first = [sum(counts[:i]) for i in range(len(counts))]
        order = [first[i] + k for i, c in enumerate(counts) for _ in range(expand_size) for k in range(c)]
        order = torch.tensor(order, device=pixel_values.device)
        expanded = {"pixel_values": model_kwargs.pop("pixel_values").index_select(0, order)}
        if isinstance(model_kwargs.get("image_sizes"), torch.Tensor):
            sizes = model_kwargs.pop("image_sizes")
            expanded["image_sizes"] = sizes.index_select(0, order.to(sizes.device))
        return expanded

    def _images_per_sample(self, pixel_values, image_tokens: list[int], model_kwargs) -> list[int]:
        """Images of each sample, from the feature length of every image (one extra vision pass, only for
        adjacent images without `batch_num_images`): images fill the samples' image tokens in order."""
        if model_kwargs.get("visor_packing") is not None:  # packed images: their counts follow from their sizes
            factors = packing_per_sample(model_kwargs["visor_packing"], len(image_tokens), self.config.packing_factors)
            layouts = image_token_layouts(self.config, model_kwargs.get("image_sizes"), model_kwargs.get("vision_aspect_ratio"))
            owners = images_of_samples(image_tokens, layouts, factors)
            return [owners.count(sample) for sample in range(len(image_tokens))]
        options = ("vision_feature_layer", "vision_feature_select_strategy", "vision_aspect_ratio", "batch_num_images")
        with torch.no_grad():
            features = self.model.get_image_features(
                pixel_values, model_kwargs.get("image_sizes"), return_dict=True,
                **{key: model_kwargs[key] for key in options if model_kwargs.get(key) is not None},
            ).pooler_output
        lengths = [f.shape[0] for f in features]
        counts, next_image = [], 0
        for tokens in image_tokens:
            taken, first = 0, next_image
            while taken < tokens and next_image < len(lengths):
                taken += lengths[next_image]
                next_image += 1
            if taken != tokens:
                raise ValueError(
                    f"the images' features ({lengths} tokens each) do not fill the samples' image tokens "
                    f"({image_tokens} per sample)"
                )
            counts.append(next_image - first)
        if next_image != len(lengths):
            raise ValueError(f"{len(lengths)} images were given for {next_image} images' worth of image tokens ({image_tokens} per sample)")
        return counts

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        cache = model_kwargs.get("past_key_values")
        if cache is not None and not isinstance(cache, VisorCache) and cache.get_seq_length() == 0:
            model_kwargs["past_key_values"] = self._visor_cache_for(cache, generation_config.cache_implementation)
        # kept for the report that `generate` builds when it returns (dropped right after)
        _thread_slots("caches")[self] = model_kwargs.get("past_key_values")

    def _visor_cache_for(self, cache, asked: str | None) -> VisorCache:
        """The VISOR cache that replaces the empty `cache` that `generate` prepared or was given: a `VisorStaticCache`
        of the same `max_cache_len` for a `StaticCache` (`cache_implementation="static"`), else a `VisorCache`. A
        replacement the user did not ask for is named in a warning, with the reason."""
        what = f"cache_implementation={asked!r}" if asked is not None else f"the given {type(cache).__name__}"
        # which layers cache visual keys/values is decided at prefill (per sample): no cache is laid out beforehand
        why = "VISOR lays its cache out at prefill (which layers hold visual keys/values is decided per sample)"
        if isinstance(cache, StaticCache):
            length = cache.get_max_length()
            if cache.offloading:
                logger.warning(
                    f"VISOR replaces {what} with a VisorStaticCache(max_cache_len={length}) that does not offload: {why}"
                )
            elif asked is None:
                logger.warning(
                    f"VISOR replaces {what} with a VisorStaticCache(max_cache_len={length}), which generate fills instead "
                    f"(the given object stays empty): {why}"
                )
            return VisorStaticCache(config=self.config.text_config, max_cache_len=length)
        offloading = getattr(cache, "offloading", False)
        if asked is not None or type(cache) is not DynamicCache or offloading:  # the user chose it: say what happens
            reason = "it does not offload" if offloading else why
            logger.warning(f"VISOR replaces {what} with a VisorCache: {reason}")
        return VisorCache(config=self.config.text_config)

    def create_masks_for_generate(self, config, inputs_embeds, attention_mask, past_key_values=None, **kwargs):
        """What `generate` passes as `attention_mask` with a compileable cache (where transformers builds a 4D mask):
        VISOR builds its masks itself, per layout, so the 2D mask stays 2D. Once a `VisorStaticCache` holds a prompt,
        the mask is padded to `max_cache_len` columns, so that every decoding step's inputs have one shape."""
        if isinstance(past_key_values, VisorStaticCache) and past_key_values.visor_state is not None:
            if attention_mask is not None and attention_mask.dim() == 2:
                missing = past_key_values.max_cache_len - attention_mask.shape[1]
                attention_mask = nn.functional.pad(attention_mask, (0, max(missing, 0)))
        return attention_mask

    def _update_model_kwargs_for_generation(self, outputs, model_kwargs, *args, **kwargs):
        model_kwargs = super()._update_model_kwargs_for_generation(outputs, model_kwargs, *args, **kwargs)
        configurations = getattr(outputs, "visor_configurations", None)
        if configurations and getattr(outputs, "past_key_values", None) is None:
            # without a cache every step re-runs the prefill over prompt and answer: keep the configuration decided
            # on the prompt (a routing token in the answer must not re-route it), as a cache would
            model_kwargs["visor_configuration"] = [tuple(layers) for layers in configurations]
            model_kwargs.pop("visor_router_threshold", None)  # it took effect on the prompt; it has no router to steer now
        return model_kwargs

    def _get_candidate_generator(self, *args, **kwargs):
        generator = super()._get_candidate_generator(*args, **kwargs)
        assistant = kwargs.get("assistant_model")
        assistant_kwargs = getattr(generator, "assistant_kwargs", None)
        if assistant is not None and isinstance(assistant_kwargs, dict):
            # the draft gets copies of the target's inputs: drop those it does not take (VISOR's configuration
            # request; the images for a text-only draft, as LLaVA-OV's generate, which pre-encodes them, does)
            accepted = set(inspect.signature(assistant.forward).parameters)
            for key in _TARGET_ONLY_GENERATE_KWARGS:
                if key not in accepted:
                    assistant_kwargs.pop(key, None)
        return generator

    def _expand_inputs_for_generation(self, expand_size=1, is_encoder_decoder=False, input_ids=None, **model_kwargs):
        images = self._expand_images_per_sample(expand_size, input_ids, model_kwargs)
        input_ids, model_kwargs = super()._expand_inputs_for_generation(
            expand_size, is_encoder_decoder, input_ids, **model_kwargs
        )
        model_kwargs.update(images)
        request = model_kwargs.get("visor_configuration")
        if expand_size > 1 and is_per_sample(request):
            # a per-sample request follows its sample into the beams / returned sequences
            model_kwargs["visor_configuration"] = [v for v in request for _ in range(expand_size)]
        for name in ("visor_budget", "visor_router_threshold", "visor_packing"):  # per-sample lists follow their sample (tensors are
            value = model_kwargs.get(name)  # expanded row by row by `generate` itself)
            if expand_size > 1 and isinstance(value, (list, tuple)):
                model_kwargs[name] = [v for v in value for _ in range(expand_size)]
        return input_ids, model_kwargs


__all__ = ["VisorGenerationMixin"]

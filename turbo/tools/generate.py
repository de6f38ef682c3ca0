"""`turbo generate`: greedy answers of an LLM-based VLM (LLaVA, BLIP-2) to a prompt about one image, the
vision tower merged and the image tokens reduced inside the language model; PyTorch, streaming."""

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from turbo.core.errors import UsageError
from turbo.core.files import MANIFEST_FILE
from turbo.data.images import Sample, pixel_batch
from turbo.export.options import ExportOptions
from turbo.merging.llm_drop import parse_llm_drop
from turbo.models.build import build_merged_model, build_plan
from turbo.models.llm_plan import LlmPlan, llm_plan
from turbo.models.loading import load_image_processor, load_tokenizer
from turbo.runtimes.llm_generation import VlmGenerator, image_prompt_ids, split_prompt
from turbo.runtimes.llm_onnx import OnnxVlm


@dataclass
class GenerateOptions:
    model: str
    image: Path
    prompt: str
    r: int | None = None
    method: str | None = None
    alpha: float | None = None
    schedule: str = "constant"
    threshold: int | None = None
    llm_drop: str | None = None  # as --llm-drop takes it; None: none (a model) or the export's
    max_new_tokens: int = 32
    random_weights: bool = False
    tiny: bool = False
    seed: int = 0


@dataclass
class Generation:
    """What a run generated and how long it took."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    prompt_tokens: int = 0
    first_token_s: float = 0.0  # image encoding and prefill, to the first token
    seconds: float = 0.0
    plan: LlmPlan | None = None

    @property
    def decode_tokens_per_s(self) -> float:
        decoded, spent = len(self.token_ids) - 1, self.seconds - self.first_token_s
        return decoded / spent if decoded > 0 and spent > 0 else 0.0


@dataclass
class PreparedGeneration:
    """A checked request, ready to stream."""

    tokens: Callable[[int], Iterator[int]]  # max_new_tokens -> the greedy tokens, as they come
    tokenizer: object
    prompt_tokens: int
    plan: LlmPlan
    runtime: str  # pytorch | onnxruntime
    random_weights: bool
    read: Callable[[], list[int]] = list  # image tokens each LLM layer read in the last prefill


def prepare_generation(options: GenerateOptions) -> PreparedGeneration:
    """Check the request and load what it needs (a model in PyTorch, or an export on ONNX
    Runtime); UsageError before any model is built."""
    if options.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, not {options.max_new_tokens}")
    if not options.image.is_file():
        raise UsageError(f"no such image file: {options.image}")
    if (Path(options.model) / MANIFEST_FILE).is_file():
        return _prepare_export(options)
    drop = parse_llm_drop(options.llm_drop or "none")
    built = build_plan(options.model, options.r, options.method, options.alpha, options.schedule, options.threshold,
                       tiny=options.tiny)
    language = built.source.adapter.language_model
    if language is None:
        raise UsageError(f"turbo generate is for LLM-based VLMs (llava, blip2); {built.source.name} is a "
                         f"{built.source.adapter.task_of(built.source.architecture).name} model")
    if options.tiny and not options.random_weights:
        raise UsageError("--tiny models have no weights: add --random-weights")
    tokenizer, _ = load_tokenizer(built.source, options.random_weights)
    processor, _ = load_image_processor(built.source, built.image_size, options.random_weights)
    config = built.source.config
    image_tokens = language.image_tokens(config, built.plan.final_tokens)
    ids = image_prompt_ids(tokenizer, options.prompt, language.image_token_id(config), image_tokens,
                           language.image_first)
    plan = llm_plan(built, drop, len(ids) - image_tokens)
    pixels = torch.from_numpy(pixel_batch([Sample(options.image)], processor, built.pixel_shape[0]))
    model, _ = build_merged_model(built, options.random_weights, seed=options.seed)
    generator = VlmGenerator(model, language, drop, built.interpolate_pos_encoding)
    eos = language.special_ids(config).get("eos_token_id")

    def tokens(max_new_tokens: int) -> Iterator[int]:
        return (int(step[0]) for step in generator.stream(pixels, torch.tensor([ids]), max_new_tokens, eos))

    return PreparedGeneration(tokens, tokenizer, len(ids), plan, "pytorch", options.random_weights,
                              lambda: generator.image_per_layer)


def _prepare_export(options: GenerateOptions) -> PreparedGeneration:
    """An export directory: its vision graph and language-model graphs on ONNX Runtime, with the
    merge and the reduction it was exported with."""
    given = [flag for flag, value in (("--r", options.r), ("--method", options.method), ("--alpha", options.alpha),
                                      ("--threshold", options.threshold), ("--llm-drop", options.llm_drop))
             if value is not None]
    if given or options.random_weights or options.tiny:
        flags = given + ["--random-weights"] * options.random_weights + ["--tiny"] * options.tiny
        raise UsageError(f"{options.model} is an export: it carries its model, merge and --llm-drop; drop "
                         f"{', '.join(flags)} (or pass a model to run it in PyTorch)")
    vlm = OnnxVlm.open(options.model)
    record = vlm.record
    prefix, suffix = split_prompt(vlm.tokenizer, options.prompt, record.image_token_id, record.image_first)
    built = ExportOptions.from_manifest(vlm.manifest).plan()
    plan = llm_plan(built, parse_llm_drop(record.llm_drop), len(prefix) + len(suffix))
    pixels = pixel_batch([Sample(options.image)], vlm.processor, built.pixel_shape[0])

    def tokens(max_new_tokens: int) -> Iterator[int]:
        return vlm.greedy_tokens(pixels, prefix, suffix, max_new_tokens)

    return PreparedGeneration(tokens, vlm.tokenizer, len(prefix) + record.image_tokens + len(suffix), plan,
                              "onnxruntime", vlm.manifest.model.random_weights, lambda: vlm.image_per_layer)


def stream_generation(prepared: PreparedGeneration, max_new_tokens: int, result: Generation) -> Iterator[str]:
    """Yields the answer's text piece by piece (whole characters); fills `result` as it goes."""
    result.plan, result.prompt_tokens = prepared.plan, prepared.prompt_tokens
    tokenizer = prepared.tokenizer
    begin = time.perf_counter()
    shown = ""
    for token in prepared.tokens(max_new_tokens):
        if not result.token_ids:
            result.first_token_s = time.perf_counter() - begin
        result.token_ids.append(token)
        text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
        if len(text) > len(shown) and not text.endswith("\ufffd"):
            yield text[len(shown):]
            shown = text
        result.seconds = time.perf_counter() - begin
    if prepared.plan.drop.method == "mustdrop":  # its counts are the prompt's: those it read
        read = prepared.read()
        result.plan = replace(prepared.plan, image_per_layer=tuple(read))
        result.prompt_tokens += read[0] - prepared.plan.image_tokens  # its spatial merge decides the first
    result.text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
    if len(result.text) > len(shown):  # an incomplete character at the end, as the tokenizer decodes it
        yield result.text[len(shown):]

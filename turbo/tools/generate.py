"""`turbo generate`: greedy answers of an LLM-based VLM (LLaVA) to a prompt about one image, the
vision tower merged and the image tokens reduced inside the language model; PyTorch, streaming."""

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from turbo.core.errors import UsageError
from turbo.data.images import Sample, pixel_batch
from turbo.merging.llm_drop import LlmDropConfig
from turbo.models.build import build_merged_model, build_plan
from turbo.models.llm_plan import LlmPlan, llm_plan
from turbo.models.loading import load_image_processor, load_tokenizer
from turbo.runtimes.llm_generation import VlmGenerator, image_prompt_ids


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
    llm_drop: LlmDropConfig = field(default_factory=LlmDropConfig)
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
    """A checked request: the merged model, its tokenizer, the image and the prompt's ids."""

    generator: VlmGenerator
    tokenizer: object
    pixels: torch.Tensor  # (1, C, H, W)
    input_ids: list[int]
    eos_token_id: int | None
    plan: LlmPlan


def prepare_generation(options: GenerateOptions) -> PreparedGeneration:
    """Check the request and load what it needs; UsageError before any model is built."""
    if options.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be at least 1, not {options.max_new_tokens}")
    if not options.image.is_file():
        raise UsageError(f"no such image file: {options.image}")
    built = build_plan(options.model, options.r, options.method, options.alpha, options.schedule, options.threshold,
                       tiny=options.tiny)
    language = built.source.adapter.language_model
    if language is None:
        raise UsageError(f"turbo generate is for LLM-based VLMs (llava); {built.source.name} is a "
                         f"{built.source.adapter.task_of(built.source.architecture).name} model")
    if options.tiny and not options.random_weights:
        raise UsageError("--tiny models have no weights: add --random-weights")
    tokenizer, _ = load_tokenizer(built.source, options.random_weights)
    processor, _ = load_image_processor(built.source, built.image_size, options.random_weights)
    config = built.source.config
    image_tokens = language.image_tokens(config, built.plan.final_tokens)
    ids = image_prompt_ids(tokenizer, options.prompt, language.image_token_id(config), image_tokens)
    plan = llm_plan(built, options.llm_drop, len(ids) - image_tokens)
    pixels = torch.from_numpy(pixel_batch([Sample(options.image)], processor, built.pixel_shape[0]))
    model, _ = build_merged_model(built, options.random_weights, seed=options.seed)
    generator = VlmGenerator(model, language, options.llm_drop, built.interpolate_pos_encoding)
    return PreparedGeneration(generator, tokenizer, pixels, ids, language.special_ids(config).get("eos_token_id"),
                              plan)


def stream_generation(prepared: PreparedGeneration, max_new_tokens: int, result: Generation) -> Iterator[str]:
    """Yields the answer's text piece by piece (whole characters); fills `result` as it goes."""
    result.plan, result.prompt_tokens = prepared.plan, len(prepared.input_ids)
    tokenizer = prepared.tokenizer
    begin = time.perf_counter()
    shown = ""
    stream = prepared.generator.stream(prepared.pixels, torch.tensor([prepared.input_ids]), max_new_tokens,
                                       prepared.eos_token_id)
    for tokens in stream:
        if not result.token_ids:
            result.first_token_s = time.perf_counter() - begin
        result.token_ids.append(int(tokens[0]))
        text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
        if len(text) > len(shown) and not text.endswith("\ufffd"):
            yield text[len(shown):]
            shown = text
        result.seconds = time.perf_counter() - begin
    result.text = tokenizer.decode(result.token_ids, skip_special_tokens=True)
    if len(result.text) > len(shown):  # an incomplete character at the end, as the tokenizer decodes it
        yield result.text[len(shown):]

"""Greedy generation with an LLM-based VLM in PyTorch: the merged vision tower's image tokens in
place of the prompt's placeholder, image tokens reduced inside the language model, KV-cache decode."""

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from turbo.core.errors import UsageError
from turbo.merging.llm_drop import LlmDropConfig, RatePredictor
from turbo.models.adapters import LanguageModel
from turbo.models.llm_decoder import MustDropDecoder, PruningDecoder, ReducedDecoder, insert_image_features


def image_prompt_ids(tokenizer, prompt: str, image_token_id: int, image_tokens: int,
                     image_first: bool = False) -> list[int]:
    """The prompt's token ids with its image placeholder expanded to `image_tokens` copies;
    UsageError for a prompt that does not place one image (see split_prompt)."""
    before, after = split_prompt(tokenizer, prompt, image_token_id, image_first)
    return before + [image_token_id] * image_tokens + after


def split_prompt(tokenizer, prompt: str, image_token_id: int, image_first: bool = False) -> tuple[list[int], list[int]]:
    """The prompt's token ids before and after the image: around its one placeholder, or (a model
    that reads the image first) none before. UsageError for a prompt with another count."""
    ids = tokenizer(prompt)["input_ids"]
    found = ids.count(image_token_id)
    placeholder = tokenizer.convert_ids_to_tokens(image_token_id)
    if image_first:
        if found:
            raise UsageError(f"the prompt has {found} image placeholder(s), but this model reads the image before "
                             f"the prompt: leave {placeholder} out, e.g. \"Question: what is in the picture? Answer:\"")
        return [], ids
    if found != 1:
        what = "no image placeholder" if found == 0 else f"{found} image placeholders for 1 image"
        raise UsageError(f"the prompt has {what}: put {placeholder} once where the image goes, e.g. "
                         f"\"USER: {placeholder}\\nWhat is in the picture? ASSISTANT:\"")
    at = ids.index(image_token_id)
    return ids[:at], ids[at + 1:]


def fit_image_run(input_ids: torch.Tensor, image_token_id: int, count: int) -> torch.Tensor:
    """input_ids (B, T) with their run of image placeholders made `count` long: the image-token
    count MustDrop's spatial merge decides per image (a batch of 1); unchanged when it is that."""
    placeholder = (input_ids[0] == image_token_id).nonzero()[:, 0]
    if len(placeholder) == count or len(placeholder) == 0:
        return input_ids
    start, end = int(placeholder[0]), int(placeholder[-1]) + 1
    image = torch.full((input_ids.shape[0], count), image_token_id, dtype=input_ids.dtype, device=input_ids.device)
    return torch.cat([input_ids[:, :start], image, input_ids[:, end:]], dim=1)


@dataclass
class VlmGenerator:
    """A model's image encoder and its reduced language model, as one greedy generator."""

    model: nn.Module
    language: LanguageModel
    drop: LlmDropConfig
    interpolate_pos_encoding: bool = False

    def __post_init__(self) -> None:
        self.image_per_layer: list[int] = []  # image tokens each LLM layer read in the last prefill
        self.predictor = None  # DyRate's rate predictor, read once (a bad file: UsageError before any run)
        if self.drop.predictor:
            heads = self.language.text_config(self.model.config).num_attention_heads
            self.predictor = RatePredictor.load(self.drop.predictor, heads)

    @property
    def decoder(self) -> ReducedDecoder:
        stack = self.language.stack(self.model)
        if self.drop.method == "dyrate":
            return PruningDecoder(stack, self.drop, self.predictor)
        if self.drop.method == "mustdrop":
            return MustDropDecoder(stack, self.drop)
        return ReducedDecoder(stack, self.drop)

    def image_tokens(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The image features the LLM reads (B, N, C) and, for MustDrop, the tower's CLS attention
        on each (B, N), which its key set comes from."""
        if self.drop.method != "mustdrop":
            return self.language.image_features(self.model, pixel_values, self.interpolate_pos_encoding), None
        return self.language.cls_attention(self.model, pixel_values, self.interpolate_pos_encoding,
                                           self.drop.spatial_merge())

    def stream(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, max_new_tokens: int,
               eos_token_id: int | None = None) -> Iterator[torch.Tensor]:
        """Yields each step's tokens (B,) until every row ended (eos) or max_new_tokens."""
        with torch.inference_mode():
            yield from self.stream_from(*self.image_tokens(pixel_values), input_ids, max_new_tokens, eos_token_id)

    def stream_from(self, features: torch.Tensor, cls_attention: torch.Tensor | None, input_ids: torch.Tensor,
                    max_new_tokens: int, eos_token_id: int | None = None) -> Iterator[torch.Tensor]:
        """`stream` from the image tokens on (see `image_tokens`)."""
        finished = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        for step, logits in enumerate(self.step_logits(features, cls_attention, input_ids)):
            tokens = logits.argmax(dim=-1)  # (B,)
            yield tokens
            if eos_token_id is not None:
                finished |= tokens == eos_token_id
            if finished.all() or step == max_new_tokens - 1:
                return

    def step_logits(self, features: torch.Tensor, cls_attention: torch.Tensor | None,
                    input_ids: torch.Tensor) -> Iterator[torch.Tensor]:
        """From the image tokens on (see `image_tokens`), each greedy step's logits (B, V): the
        prefill's, then each decode step's, for as long as the caller reads."""
        decoder = self.decoder
        image_token_id = self.language.image_token_id(self.model.config)
        input_ids = fit_image_run(input_ids, image_token_id, features.shape[1])
        embeds, image = insert_image_features(decoder.embed(input_ids), input_ids, features, image_token_id)
        prefill = decoder.prefill(embeds, image, cls_attention)
        text = input_ids.shape[1] - image.count
        self.image_per_layer = [seen.shape[1] - text for seen in prefill.positions]
        logits, cache, position = prefill.logits, prefill.cache, prefill.next_position
        images = decoder.images(prefill, image) if isinstance(decoder, PruningDecoder) else None
        while True:
            yield logits
            tokens = logits.argmax(dim=-1, keepdim=True)  # (B, 1)
            positions = torch.full_like(tokens, position)
            if images is None:
                logits, cache = decoder.decode(tokens, positions, cache)
            else:
                logits, cache, images = decoder.decode_pruning(tokens, positions, cache, images)
            position += 1

    def generate(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, max_new_tokens: int,
                 eos_token_id: int | None = None) -> torch.Tensor:
        """The generated tokens (B, steps), without the prompt."""
        return torch.stack(list(self.stream(pixel_values, input_ids, max_new_tokens, eos_token_id)), dim=1)

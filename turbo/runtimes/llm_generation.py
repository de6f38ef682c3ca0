"""Greedy generation with an LLM-based VLM in PyTorch: the merged vision tower's image tokens in
place of the prompt's placeholder, image tokens reduced inside the language model, KV-cache decode."""

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from turbo.core.errors import UsageError
from turbo.merging.llm_drop import LlmDropConfig, RatePredictor
from turbo.models.adapters import LanguageModel
from turbo.models.llm_decoder import PruningDecoder, ReducedDecoder, insert_image_features


def image_prompt_ids(tokenizer, prompt: str, image_token_id: int, image_tokens: int) -> list[int]:
    """The prompt's token ids with its one image placeholder expanded to `image_tokens` copies;
    UsageError for a prompt without exactly one."""
    before, after = split_prompt(tokenizer, prompt, image_token_id)
    return before + [image_token_id] * image_tokens + after


def split_prompt(tokenizer, prompt: str, image_token_id: int) -> tuple[list[int], list[int]]:
    """The prompt's token ids before and after its one image placeholder; UsageError for a prompt
    without exactly one."""
    ids = tokenizer(prompt)["input_ids"]
    found = ids.count(image_token_id)
    if found != 1:
        placeholder = tokenizer.convert_ids_to_tokens(image_token_id)
        what = "no image placeholder" if found == 0 else f"{found} image placeholders for 1 image"
        raise UsageError(f"the prompt has {what}: put {placeholder} once where the image goes, e.g. "
                         f"\"USER: {placeholder}\\nWhat is in the picture? ASSISTANT:\"")
    at = ids.index(image_token_id)
    return ids[:at], ids[at + 1:]


@dataclass
class VlmGenerator:
    """A model's image encoder and its reduced language model, as one greedy generator."""

    model: nn.Module
    language: LanguageModel
    drop: LlmDropConfig
    interpolate_pos_encoding: bool = False

    def __post_init__(self) -> None:
        self.predictor = None  # DyRate's rate predictor, read once (a bad file: UsageError before any run)
        if self.drop.predictor:
            heads = self.language.text_config(self.model.config).num_attention_heads
            self.predictor = RatePredictor.load(self.drop.predictor, heads)

    @property
    def decoder(self) -> ReducedDecoder:
        module, head = self.language.module(self.model), self.language.lm_head(self.model)
        if self.drop.method == "dyrate":
            return PruningDecoder(module, head, self.drop, self.predictor)
        return ReducedDecoder(module, head, self.drop)

    def stream(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, max_new_tokens: int,
               eos_token_id: int | None = None) -> Iterator[torch.Tensor]:
        """Yields each step's tokens (B,) until every row ended (eos) or max_new_tokens."""
        decoder = self.decoder
        with torch.inference_mode():
            features = self.language.image_features(self.model, pixel_values, self.interpolate_pos_encoding)
            image_token_id = self.language.image_token_id(self.model.config)
            embeds, image = insert_image_features(decoder.embed(input_ids), input_ids, features, image_token_id)
            prefill = decoder.prefill(embeds, image)
            logits, cache, position = prefill.logits, prefill.cache, prefill.next_position
            images = decoder.images(prefill, image) if isinstance(decoder, PruningDecoder) else None
            finished = torch.zeros(input_ids.shape[0], dtype=torch.bool)
            for step in range(max_new_tokens):
                tokens = logits.argmax(dim=-1)  # (B,)
                yield tokens
                if eos_token_id is not None:
                    finished |= tokens == eos_token_id
                if finished.all() or step == max_new_tokens - 1:
                    return
                positions = torch.full_like(tokens[:, None], position)
                if images is None:
                    logits, cache = decoder.decode(tokens[:, None], positions, cache)
                else:
                    logits, cache, images = decoder.decode_pruning(tokens[:, None], positions, cache, images)
                position += 1

    def generate(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, max_new_tokens: int,
                 eos_token_id: int | None = None) -> torch.Tensor:
        """The generated tokens (B, steps), without the prompt."""
        return torch.stack(list(self.stream(pixel_values, input_ids, max_new_tokens, eos_token_id)), dim=1)

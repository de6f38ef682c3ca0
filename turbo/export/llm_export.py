"""Export an LLM-based VLM's language model: a prefill graph (the prompt around the image tokens ->
the last token's logits and every layer's KV cache) and a decode graph (one token with the cache),
sharing one weights file.

Image-token counts are fixed: the prefill reads the vision merge's N image tokens and drops them
to each layer's planned count inside the graph (static TopK sizes), so layer l's cache holds
P + N_l + S tokens. The prompt's text around the image (P before, S after) and the cache lengths
are dynamic; batch is 1.
"""

from pathlib import Path

import numpy as np
import torch
from torch import nn

from turbo.core.errors import describe_error
from turbo.core.files import (
    LLM_DECODE_FILE,
    LLM_DECODE_INPUTS,
    LLM_PREFILL_FILE,
    LLM_PREFILL_INPUTS,
    LLM_WEIGHTS_FILE,
    cache_names,
)
from turbo.core.manifest import LanguageModelRecord
from turbo.export.decoder_validate import CaptionCheck
from turbo.export.onnx_export import GraphSpec, export_sharing_weights
from turbo.export.validate import ValidationReport, exact_check, seeded_pixels
from turbo.merging.llm_drop import LlmDropConfig
from turbo.models.llm_decoder import DecodeGraph, PrefillGraph, ReducedDecoder, insert_image_features
from turbo.models.loading import ModelSource
from turbo.runtimes.llm_generation import VlmGenerator
from turbo.runtimes.llm_onnx import OnnxVlm

LOGITS = "logits"
KV = ("key", "value")  # each layer's cache: past.L.key, past.L.value
LLM_RUN = "language model"  # how its checks and errors are named in a ValidationReport
LOGIT_STEPS = 4  # the prefill's logits and three decode steps'
GREEDY_STEPS = 8


def reduced_decoder(model: nn.Module, source: ModelSource, drop: LlmDropConfig) -> ReducedDecoder:
    return ReducedDecoder(source.adapter.language_model.stack(model), drop)


def export_language_model(model: nn.Module, source: ModelSource, tokenizer: tuple[object, str], directory: Path,
                          image_tokens: int, drop: LlmDropConfig, opset: int) -> LanguageModelRecord:
    """Write LLM_PREFILL_FILE, LLM_DECODE_FILE, their shared LLM_WEIGHTS_FILE and the tokenizer into
    `directory`; returns the manifest's `llm` section. fp32, whatever the vision part's precision."""
    language = source.adapter.language_model
    decoder = reduced_decoder(model, source, drop)
    text = language.text_config(source.config)
    layers = decoder.num_layers
    generator = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, text.vocab_size, (1, 3), generator=generator)  # lengths ≥ 2: not specialised
    suffix = torch.randint(0, text.vocab_size, (1, 5), generator=generator)
    features = torch.randn(1, image_tokens, decoder.embed(prefix).shape[-1], generator=generator)
    prefill, decode = PrefillGraph(decoder), DecodeGraph(decoder)
    with torch.inference_mode():
        cache = prefill(prefix, features, suffix)[1:]
    text_dims = ({1: torch.export.Dim("prefix", min=0)}, {}, {1: torch.export.Dim("suffix", min=0)})
    past = [torch.export.Dim(f"past_{layer}") for layer in range(layers)]
    position = torch.tensor([[prefix.shape[1] + image_tokens + suffix.shape[1]]])
    decode_dims = ({}, {}, tuple({2: past[index // 2]} for index in range(2 * layers)))
    presents = [LOGITS, *cache_names("present", layers, KV)]
    stats = export_sharing_weights(
        [GraphSpec(prefill, (prefix, features, suffix), list(LLM_PREFILL_INPUTS), presents, text_dims,
                   LLM_PREFILL_FILE),
         GraphSpec(decode, (prefix[:, :1], position, *cache), [*LLM_DECODE_INPUTS, *cache_names("past", layers, KV)],
                   presents, decode_dims, LLM_DECODE_FILE)],
        directory, LLM_WEIGHTS_FILE, opset)
    tokenizer, origin = tokenizer
    tokenizer.save_pretrained(directory)
    keys = cache[0]  # (1, H_kv, T, d)
    return LanguageModelRecord(
        prefill=LLM_PREFILL_FILE, decode=LLM_DECODE_FILE, weights=LLM_WEIGHTS_FILE, image_tokens=image_tokens,
        image_per_layer=decoder.plan(image_tokens), llm_drop=drop.label, layers=layers, kv_heads=keys.shape[1],
        head_dim=keys.shape[3], vocab_size=text.vocab_size, image_token_id=language.image_token_id(source.config),
        eos_token_id=language.special_ids(source.config).get("eos_token_id"), image_first=language.image_first,
        tokenizer={"origin": origin},
        weights_bytes=stats["data_bytes"], shared_bytes=stats["shared_bytes"])


def validate_language_model(model: nn.Module, source: ModelSource, drop: LlmDropConfig, pipeline: OnnxVlm,
                            report: ValidationReport, pixel_shape: tuple[int, int, int], interpolate: bool,
                            exact_tokens: bool, seed: int = 0) -> None:
    """Append to `report`: the prefill's and decode steps' logits against PyTorch (both fed
    PyTorch's image features), and greedy tokens of the whole ONNX pipeline (vision graph
    included) against the PyTorch model's."""
    language = source.adapter.language_model
    decoder = reduced_decoder(model, source, drop)
    rng = np.random.default_rng(seed)
    image_token_id = language.image_token_id(source.config)
    vocab = [token for token in range(min(pipeline.record.vocab_size, 1000)) if token != image_token_id]
    before = 0 if language.image_first else 4  # text before the image, as the model's prompts place it
    prefix, suffix = [list(map(int, rng.choice(vocab, size))) for size in (before, 6)]
    pixels = seeded_pixels(1, pixel_shape, seed)
    try:
        with torch.inference_mode():
            features = language.image_features(model, torch.from_numpy(pixels), interpolate)
            ids = torch.tensor([prefix + [image_token_id] * features.shape[1] + suffix])
            want = _step_logits(decoder, ids, features, image_token_id, LOGIT_STEPS)
        got = np.concatenate(list(pipeline.stream(features.numpy(), prefix, suffix, LOGIT_STEPS)))
        report.outputs += [exact_check(f"{LLM_RUN} prefill", "logits", want[:1], got[:1]),
                           exact_check(f"{LLM_RUN} decode ({LOGIT_STEPS - 1} steps)", "logits", want[1:], got[1:])]
        generator = VlmGenerator(model, language, drop, interpolate)
        eos = pipeline.record.eos_token_id
        expected = generator.generate(torch.from_numpy(pixels), ids, GREEDY_STEPS, eos)[0].tolist()
        produced = list(pipeline.greedy_tokens(pixels, prefix, suffix, GREEDY_STEPS))
    except Exception as exc:  # ORT load or run failures of the language-model graphs are validation failures
        report.runtime_error = f"{LLM_RUN}: {describe_error(exc)}"
        return
    report.captions.append(CaptionCheck("greedy tokens, onnx vs pytorch", 1, 1, int(produced != expected),
                                        gated=exact_tokens))


def _step_logits(decoder: ReducedDecoder, ids: torch.Tensor, features: torch.Tensor, image_token_id: int,
                 steps: int) -> np.ndarray:
    """PyTorch's greedy logits (steps, V): the prefill's, then each decode step's."""
    embeds, image = insert_image_features(decoder.embed(ids), ids, features, image_token_id)
    prefill = decoder.prefill(embeds, image)
    logits, cache, rows = prefill.logits, prefill.cache, []
    for step in range(steps):
        rows.append(logits.numpy())
        position = torch.tensor([[prefill.next_position + step]])
        logits, cache = decoder.decode(logits.argmax(dim=-1, keepdim=True), position, cache)
    return np.concatenate(rows)

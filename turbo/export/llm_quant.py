"""Weight-only quantization of an LLM-based VLM's language model inside `turbo export`: GPTQ or
rounding of its decoder blocks' Linears (and, with --quant-heads, its LM head), calibrated block
after block on each calibration image's tokens inside a prompt; checked by next-token agreement
with the fp32 model."""

import numpy as np
import torch
from torch import nn

from turbo.export.validate import seeded_pixels
from turbo.graph.weight_quant import QuantizedWeight
from turbo.merging.llm_drop import LlmDropConfig
from turbo.models.llm_decoder import insert_image_features
from turbo.models.loading import ModelSource
from turbo.quant.quantize import LayerReport, quantize_sequential
from turbo.runtimes.llm_generation import VlmGenerator, split_prompt
from turbo.runtimes.llm_onnx import OnnxVlm

CALIBRATION_QUESTION = "Describe the image in detail."
ANSWER_TOKENS = 16  # the model's own greedy answer, where no calibration captions are given
QUALITY_IMAGES = 4
QUALITY_TOKENS = 16

State = tuple[torch.Tensor, object]  # a block's input hidden states (1, T, C) and what it reads of the positions


def language_model_linears(model: nn.Module, source: ModelSource) -> list[nn.Linear]:
    """The Linears --quant quantizes in the language model's blocks."""
    stack = source.adapter.language_model.stack(model)
    return [module for module in stack.layers.modules() if isinstance(module, nn.Linear)]


def quantize_language_model(model: nn.Module, source: ModelSource, interpolate: bool, pixels: np.ndarray,
                            texts: list[str] | None, tokenizer, mode: str, group: int, act_order: bool,
                            heads: bool) -> tuple[dict[str, QuantizedWeight], list[LayerReport], str]:
    """Quantize the language model's block Linears in place (their weights become the dequantized
    values), each block calibrated on the quantized blocks' outputs before it; returns the weights
    by name, per-layer errors and what the text was."""
    language = source.adapter.language_model
    stack = language.stack(model)
    states, text = _calibration_states(model, source, interpolate, pixels, texts, tokenizer)

    def step(layer: nn.Module, state: State) -> State:
        hidden, positional = state
        return stack.block(layer, hidden, positional).hidden, positional

    weights, reports, states = quantize_sequential(stack.layers, states, step, mode, group, act_order,
                                                   prefix="language_model.")
    if heads:  # untied first: the word embeddings keep their fp32 values
        stack.lm_head.weight = nn.Parameter(stack.lm_head.weight.detach().clone())
        head_weights, head_reports, _ = quantize_sequential(
            nn.ModuleList([stack.lm_head]), states, lambda _, state: stack.logits(state[0].transpose(0, 1)),
            mode, group, act_order, prefix="language_model.lm_head.")  # every token as a batch row: (T, 1, C)
        weights.update(head_weights)
        reports += head_reports
    return weights, reports, text


def _calibration_states(model: nn.Module, source: ModelSource, interpolate: bool, pixels: np.ndarray,
                        texts: list[str] | None, tokenizer) -> tuple[list[State], str]:
    """Each calibration image's first-block input: the family's prompt asking for a description,
    the image's tokens (from the tower as quantized so far, as deployed) in place of its
    placeholder, then the image's calibration caption or else the model's own greedy answer."""
    language = source.adapter.language_model
    image_token_id, before, after = _question_prompt(source, tokenizer)
    generator = VlmGenerator(model, language, LlmDropConfig(), interpolate)
    decoder, eos = generator.decoder, language.special_ids(source.config).get("eos_token_id")
    states = []
    with torch.inference_mode():
        for index, image in enumerate(torch.from_numpy(pixels).split(1)):
            features, _ = generator.image_tokens(image)  # (1, N, C)
            ids = torch.tensor([before + [image_token_id] * features.shape[1] + after])
            if texts is not None:
                answer = tokenizer(texts[index], add_special_tokens=False)["input_ids"]
            else:
                answer = [int(t) for t in generator.stream_from(features, None, ids, ANSWER_TOKENS, eos)]
            ids = torch.cat([ids, torch.tensor([answer], dtype=ids.dtype)], dim=1)
            embeds, _ = insert_image_features(decoder.embed(ids), ids, features, image_token_id)
            positions = torch.arange(ids.shape[1])[None]
            hidden = decoder.stack.start(embeds, positions)
            states.append((hidden, decoder.stack.positional(hidden, positions)))
    text = "calibration captions as answers" if texts is not None else \
        f"the model's own greedy answers ({ANSWER_TOKENS} tokens) to \"{CALIBRATION_QUESTION}\""
    return states, text


def answer_agreement(reference: nn.Module, source: ModelSource, drop: LlmDropConfig, pipeline: OnnxVlm,
                     tokenizer, pixel_shape: tuple[int, int, int], interpolate: bool) -> float:
    """Next-token agreement of the quantized export (ONNX Runtime, its reduction on) with the fp32
    model (the same reduction), teacher-forced on the fp32 model's greedy answers to the
    calibration question about seeded images: at each position up to its end of text, does the
    export pick the fp32 model's token?"""
    image_token_id, prefix, suffix = _question_prompt(source, tokenizer)
    generator = VlmGenerator(reference, source.adapter.language_model, drop, interpolate)
    eos = pipeline.record.eos_token_id
    agreed = counted = 0
    for image in seeded_pixels(QUALITY_IMAGES, pixel_shape, seed=5):
        pixels = image[None]
        with torch.inference_mode():
            features, cls_attention = generator.image_tokens(torch.from_numpy(pixels))
            ids = torch.tensor([prefix + [image_token_id] * features.shape[1] + suffix])
            want = [int(t) for t in generator.stream_from(features, cls_attention, ids, QUALITY_TOKENS, eos)]
        steps = pipeline.stream(pipeline.image_features(pixels), prefix, suffix, len(want))
        logits = next(steps)
        for position, token in enumerate(want):
            agreed += int(logits[0].argmax()) == token
            counted += 1
            if position == len(want) - 1:
                break
            logits = steps.send(token)  # the fp32 model's token, whatever the export picked
    return agreed / counted


def _question_prompt(source: ModelSource, tokenizer) -> tuple[int, list[int], list[int]]:
    """The image token id and the ids before and after the image in the family's prompt asking
    CALIBRATION_QUESTION."""
    language = source.adapter.language_model
    image_token_id = language.image_token_id(source.config)
    prompt = language.question_prompt.replace("{question}", CALIBRATION_QUESTION)
    return image_token_id, *split_prompt(tokenizer, prompt, image_token_id, language.image_first)

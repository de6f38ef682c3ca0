"""Export BLIP's text decoder: a first-step graph and a with-past graph sharing one weights file.

A caption decoder cross-attends to the image tokens: their count N is the plan's final token count
(r changes the cross-attention length), fixed in both graphs. A VQA answer decoder cross-attends to
the encoded question with its mask, both of dynamic length. Batch, prompt length and past length
are dynamic.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import GenerationConfig

from turbo.core.files import DECODER_WEIGHTS_FILE as WEIGHTS_FILE
from turbo.core.files import (
    FIRST_STEP_FILE,
    GENERATION_FILE,
    QUESTION_EMBEDS,
    QUESTION_MASK,
    WITH_PAST_FILE,
    cache_names,
)
from turbo.core.manifest import DecoderRecord
from turbo.export.onnx_export import GraphSpec, export_sharing_weights
from turbo.graph.weight_quant import dequantizing
from turbo.models.blip_decoder import (
    CROSS_KV,
    SELF_KV,
    DecoderFirstStep,
    DecoderWithPast,
    MaskedDecoderFirstStep,
    MaskedDecoderWithPast,
)
from turbo.models.loading import ModelSource
from turbo.runtimes.caption import DEFAULT_PROMPT

IDS, IMAGE_EMBEDS, LOGITS = "input_ids", "image_embeds", "logits"


@dataclass(frozen=True)
class DecoderGraphs:
    """Input and output names of both decoder graphs (the runner's contract)."""

    layers: int
    first_inputs: list[str]
    first_outputs: list[str]
    past_inputs: list[str]
    past_outputs: list[str]

    @classmethod
    def for_layers(cls, layers: int, masked: bool = False) -> "DecoderGraphs":
        """masked: the cross input is the encoded question and its mask, not the image tokens."""
        cross, mask = ([QUESTION_EMBEDS], [QUESTION_MASK]) if masked else ([IMAGE_EMBEDS], [])
        return cls(
            layers,
            [IDS, *cross, *mask], [LOGITS, *cache_names("present", layers, SELF_KV + CROSS_KV)],
            [IDS, *mask, *cache_names("past", layers, SELF_KV + CROSS_KV)],
            [LOGITS, *cache_names("present", layers, SELF_KV)],
        )


def export_decoder(text_decoder: nn.Module, directory: Path, image_tokens: int | None, opset: int,
                   dtype: torch.dtype = torch.float32, quantized: dict | None = None) -> dict:
    """Write FIRST_STEP_FILE, WITH_PAST_FILE and their shared WEIGHTS_FILE into `directory`;
    returns what the manifest records of them. image_tokens None: the masked graphs of an answer
    decoder, cross-attending to questions of any length. `quantized` (name -> QuantizedWeight,
    already fake-quantized in `text_decoder`) become integer weights + DequantizeLinear in both graphs."""

    config = text_decoder.config
    masked = image_tokens is None
    graphs = DecoderGraphs.for_layers(config.num_hidden_layers, masked)
    first_class, past_class = (MaskedDecoderFirstStep, MaskedDecoderWithPast) if masked else \
        (DecoderFirstStep, DecoderWithPast)
    first, with_past = first_class(text_decoder).to(dtype), past_class(text_decoder).to(dtype)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, config.vocab_size, (2, 3), generator=generator)  # sizes ≥ 2: not specialised
    states = torch.randn(2, image_tokens or 5, config.encoder_hidden_size, generator=generator).to(dtype)
    mask = torch.ones(2, states.shape[1], dtype=torch.int64)
    cross_inputs = (states, mask) if masked else (states,)
    with torch.inference_mode():
        cache = first(ids, *cross_inputs)[1:]
    batch, sequence, past = torch.export.Dim("batch"), torch.export.Dim("sequence"), torch.export.Dim("past")
    cross = torch.export.Dim("cross") if masked else None
    cross_axes = {0: batch, 1: cross} if masked else {0: batch}
    first_dynamic = ({0: batch, 1: sequence}, *[cross_axes] * len(cross_inputs))
    cached = tuple({0: batch, 2: past} if name.split(".", 2)[2] in SELF_KV else {0: batch, 2: cross} if masked
                   else {0: batch} for name in graphs.past_inputs[1 + masked:])
    past_dynamic = ({0: batch}, *([cross_axes] if masked else []), cached)  # forward(input_ids, [mask,] *past)
    past_args = (ids[:, :1], *([mask] if masked else []), *cache)
    stats = export_sharing_weights(
        [GraphSpec(first, (ids, *cross_inputs), graphs.first_inputs, graphs.first_outputs, first_dynamic,
                   FIRST_STEP_FILE),
         GraphSpec(with_past, past_args, graphs.past_inputs, graphs.past_outputs, past_dynamic, WITH_PAST_FILE)],
        directory, WEIGHTS_FILE, opset, dequantizing(quantized, "decoder"))
    return {
        "first_step": FIRST_STEP_FILE,
        "with_past": WITH_PAST_FILE,
        "weights": WEIGHTS_FILE,
        "image_tokens": image_tokens,
        "layers": config.num_hidden_layers,
        "heads": config.num_attention_heads,
        "vocab_size": config.vocab_size,
        "weights_bytes": stats["data_bytes"],
        "shared_bytes": stats["shared_bytes"],
    }


def write_generation_config(directory: Path, ids: dict[str, int], max_new_tokens: int = 20) -> None:
    """generation_config.json (transformers' format) with the ids BLIP's generate uses."""

    GenerationConfig(**ids, max_new_tokens=max_new_tokens).save_pretrained(directory)


def export_captioner(model: nn.Module, source: ModelSource, tokenizer: tuple[object, str], directory: Path,
                     image_tokens: int, opset: int, quantized: dict | None = None) -> DecoderRecord:
    """The decoder graphs, tokenizer (and its origin) and generation config of a captioning model;
    the manifest's `decoder` section. The decoder stays fp32 whatever the encoder's precision."""
    caption = source.adapter.caption_decoder
    tokenizer, origin = tokenizer
    info = export_decoder(caption.module(model), directory, image_tokens, opset, quantized=quantized)
    tokenizer.save_pretrained(directory)
    write_generation_config(directory, caption.generation_ids(source.config))
    precision = "fp32" if not quantized else "fp32 with quantized weights"
    positions = getattr(caption.module(model).config, "max_position_embeddings", None)
    return DecoderRecord(**info, precision=precision, prompt=DEFAULT_PROMPT, generation_config=GENERATION_FILE,
                         tokenizer={"origin": origin}, max_positions=positions)

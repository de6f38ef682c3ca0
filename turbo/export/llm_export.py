"""Export an LLM-based VLM's language model: a prefill graph (the prompt around the image tokens ->
the last token's logits and every layer's KV cache) and a decode graph (one token with the cache),
sharing one weights file.

The prefill reads the vision merge's N image tokens and drops them inside the graph, so layer l's
cache holds P + N_l + S tokens: FastV's and PyramidDrop's N_l are the plan's (static TopK sizes);
MustDrop's are decided inside the prefill graph from the prompt's attention, DyRate's inside each
decode step. The prompt's text around the image (P before, S after) and the cache lengths are
dynamic; batch is 1.
"""

import itertools
from pathlib import Path

import numpy as np
import torch
from torch import nn

from turbo.core.errors import describe_error
from turbo.core.files import (
    CLS_ATTENTION,
    IMAGE_FEATURES,
    KEPT_IMAGES,
    LLM_DECODE_FILE,
    LLM_DECODE_INPUTS,
    LLM_PREFILL_FILE,
    LLM_PREFILL_INPUTS,
    LLM_PROMPT_LAYOUT,
    LLM_WEIGHTS_FILE,
    TOKENS_READ,
    cache_names,
)
from turbo.core.manifest import LanguageModelRecord
from turbo.export.decoder_validate import CaptionCheck
from turbo.export.onnx_export import GraphSpec, export_sharing_weights
from turbo.export.validate import ValidationReport, exact_check, seeded_pixels
from turbo.graph.weight_quant import QuantizedWeight, dequantizing
from turbo.merging.llm_drop import LlmDropConfig
from turbo.models.llm_decoder import (
    DecodeGraph,
    MustDropDecoder,
    PrefillGraph,
    PruningDecodeGraph,
    PruningDecoder,
    ReducedDecoder,
)
from turbo.models.loading import ModelSource
from turbo.runtimes.llm_generation import VlmGenerator
from turbo.runtimes.llm_onnx import OnnxVlm

LOGITS = "logits"
KV = ("key", "value")  # each layer's cache: past.L.key, past.L.value
LLM_RUN = "language model"  # how its checks and errors are named in a ValidationReport
LOGIT_STEPS = 4  # the prefill's logits and three decode steps'
GREEDY_STEPS = 8


def reduced_decoder(model: nn.Module, source: ModelSource, drop: LlmDropConfig) -> ReducedDecoder:
    return VlmGenerator(model, source.adapter.language_model, drop).decoder


def export_language_model(model: nn.Module, source: ModelSource, tokenizer: tuple[object, str], directory: Path,
                          image_tokens: int, drop: LlmDropConfig, opset: int,
                          quantized: dict[str, QuantizedWeight] | None = None) -> LanguageModelRecord:
    """Write LLM_PREFILL_FILE, LLM_DECODE_FILE, their shared LLM_WEIGHTS_FILE and the tokenizer into
    `directory`; returns the manifest's `llm` section. fp32, whatever the vision part's precision;
    `quantized` (name -> QuantizedWeight, already fake-quantized in `model`) become integer weights
    + DequantizeLinear in both graphs."""
    language = source.adapter.language_model
    decoder = reduced_decoder(model, source, drop)
    text = language.text_config(source.config)
    layers = decoder.num_layers
    generator = torch.Generator().manual_seed(0)
    prefix = torch.randint(0, text.vocab_size, (1, 3), generator=generator)  # lengths ≥ 2: not specialised
    suffix = torch.randint(0, text.vocab_size, (1, 5), generator=generator)
    features = torch.randn(1, image_tokens, decoder.embed(prefix).shape[-1], generator=generator)
    prefill = _prefill_spec(decoder, prefix, features, suffix, generator)
    with torch.inference_mode():
        outputs = prefill.module(*prefill.args)
    position = torch.tensor([[prefix.shape[1] + image_tokens + suffix.shape[1]]])
    decode = _decode_spec(decoder, outputs, prefix[:, :1], position, prefix.shape[1], image_tokens)
    stats = export_sharing_weights([prefill, decode], directory, LLM_WEIGHTS_FILE, opset,
                                   dequantizing(quantized, "language model"))
    tokenizer, origin = tokenizer
    tokenizer.save_pretrained(directory)
    keys = outputs[1]  # layer 0's (1, H_kv, T, d)
    return LanguageModelRecord(
        prefill=LLM_PREFILL_FILE, decode=LLM_DECODE_FILE, weights=LLM_WEIGHTS_FILE, image_tokens=image_tokens,
        image_per_layer=decoder.plan(image_tokens), llm_drop=drop.label, layers=layers, kv_heads=keys.shape[1],
        head_dim=keys.shape[3], vocab_size=text.vocab_size, image_token_id=language.image_token_id(source.config),
        eos_token_id=language.special_ids(source.config).get("eos_token_id"), image_first=language.image_first,
        tokenizer={"origin": origin},
        weights_bytes=stats["data_bytes"], shared_bytes=stats["shared_bytes"])


def _prefill_spec(decoder: ReducedDecoder, prefix: torch.Tensor, features: torch.Tensor, suffix: torch.Tensor,
                  generator: torch.Generator) -> GraphSpec:
    """The prefill graph with example inputs: MustDrop's also reads the tower's CLS attention and
    gives the tokens each layer read; DyRate's gives the image tokens its caches hold."""
    args, names = (prefix, features, suffix), list(LLM_PREFILL_INPUTS)
    dims = ({1: torch.export.Dim("prefix", min=0)}, {}, {1: torch.export.Dim("suffix", min=0)})
    outputs = [LOGITS, *cache_names("present", decoder.num_layers, KV)]
    if isinstance(decoder, MustDropDecoder):
        image = {1: torch.export.Dim("image", min=2)} if decoder.drop.spatial_merge() else {}  # decided per image
        args += (torch.rand(features.shape[:2], generator=generator).softmax(dim=-1),)
        names.append(CLS_ATTENTION)
        dims = (dims[0], image, dims[2], (image,))  # the last: PrefillGraph's *cls_attention
        outputs.append(TOKENS_READ)
    if isinstance(decoder, PruningDecoder):
        outputs.append(f"present.{KEPT_IMAGES}")
    return GraphSpec(PrefillGraph(decoder), args, names, outputs, dims, LLM_PREFILL_FILE)


def _decode_spec(decoder: ReducedDecoder, prefill_outputs: tuple[torch.Tensor, ...], token: torch.Tensor,
                 position: torch.Tensor, image_start: int, image_tokens: int) -> GraphSpec:
    """The decode graph with example inputs (the prefill's caches): DyRate's also reads the
    prompt's layout and carries the image tokens its caches hold."""
    layers = decoder.num_layers
    cache = prefill_outputs[1:1 + 2 * layers]
    past = [torch.export.Dim(f"past_{layer}") for layer in range(layers)]
    cache_dims = tuple({2: past[index // 2]} for index in range(2 * layers))
    caches = cache_names("past", layers, KV)
    outputs = [LOGITS, *cache_names("present", layers, KV)]
    if not isinstance(decoder, PruningDecoder):
        return GraphSpec(DecodeGraph(decoder), (token, position, *cache), [*LLM_DECODE_INPUTS, *caches], outputs,
                         ({}, {}, cache_dims), LLM_DECODE_FILE)
    args = (token, position, torch.tensor([image_start]), position[0], prefill_outputs[-1], *cache)
    names = [*LLM_DECODE_INPUTS, *LLM_PROMPT_LAYOUT, f"past.{KEPT_IMAGES}", *caches]
    dims = ({}, {}, {}, {}, {1: torch.export.Dim("kept", min=1)}, cache_dims)
    return GraphSpec(PruningDecodeGraph(decoder, image_tokens), args, names, [*outputs, f"present.{KEPT_IMAGES}"],
                     dims, LLM_DECODE_FILE)


def validate_language_model(model: nn.Module, source: ModelSource, drop: LlmDropConfig, pipeline: OnnxVlm,
                            report: ValidationReport, pixel_shape: tuple[int, int, int], interpolate: bool,
                            exact_tokens: bool, seed: int = 0) -> None:
    """Append to `report`: the prefill's and decode steps' logits against PyTorch (both fed
    PyTorch's image features), and greedy tokens of the whole ONNX pipeline (vision graph
    included) against the PyTorch model's."""
    language = source.adapter.language_model
    generator = VlmGenerator(model, language, drop, interpolate)
    rng = np.random.default_rng(seed)
    image_token_id = language.image_token_id(source.config)
    vocab = [token for token in range(min(pipeline.record.vocab_size, 1000)) if token != image_token_id]
    before = 0 if language.image_first else 4  # text before the image, as the model's prompts place it
    prefix, suffix = [list(map(int, rng.choice(vocab, size))) for size in (before, 6)]
    pixels = seeded_pixels(1, pixel_shape, seed)
    try:
        with torch.inference_mode():
            features, cls_attention = generator.image_tokens(torch.from_numpy(pixels))
            ids = torch.tensor([prefix + [image_token_id] * features.shape[1] + suffix])
            want = np.concatenate([logits.numpy() for logits in itertools.islice(
                generator.step_logits(features, cls_attention, ids), LOGIT_STEPS)])
        image = {IMAGE_FEATURES: features.numpy()} | ({} if cls_attention is None else
                                                      {CLS_ATTENTION: cls_attention.numpy()})
        got = np.concatenate(list(pipeline.stream(image, prefix, suffix, LOGIT_STEPS)))
        report.outputs += [exact_check(f"{LLM_RUN} prefill", "logits", want[:1], got[:1]),
                           exact_check(f"{LLM_RUN} decode ({LOGIT_STEPS - 1} steps)", "logits", want[1:], got[1:])]
        eos = pipeline.record.eos_token_id
        expected = generator.generate(torch.from_numpy(pixels), ids, GREEDY_STEPS, eos)[0].tolist()
        produced = list(pipeline.greedy_tokens(pixels, prefix, suffix, GREEDY_STEPS))
    except Exception as exc:  # ORT load or run failures of the language-model graphs are validation failures
        report.runtime_error = f"{LLM_RUN}: {describe_error(exc)}"
        return
    report.captions.append(CaptionCheck("greedy tokens, onnx vs pytorch", 1, 1, int(produced != expected),
                                        gated=exact_tokens))


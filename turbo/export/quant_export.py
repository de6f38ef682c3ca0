"""Quantization inside `turbo export`, calibrated on the merged model: weight-only (GPTQ or
rounding of the encoder Linears, written as blocked DequantizeLinear) or INT8 QDQ (ONNX Runtime
static quantization); then the quantized graph is checked against the fp32 merged model."""

import copy
import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from turbo.core.errors import TurboError, UsageError
from turbo.core.manifest import CalibrationRecord, QuantizationRecord
from turbo.data.images import SYNTHETIC, batches, calibration_set
from turbo.export.decoder_validate import reference_ids
from turbo.export.llm_quant import language_model_linears, quantize_language_model
from turbo.export.onnx_export import rewrite_onnx
from turbo.export.validate import mean_cosine, seeded_pixels, weighted_mean_token
from turbo.graph.weight_quant import MIN_OPSET, QuantizedWeight, insert_dequantize
from turbo.models.loading import load_image_processor
from turbo.quant.int8 import quantize_int8
from turbo.quant.quantize import WEIGHT_ONLY, LayerReport, quantize_blocks
from turbo.runtimes.caption import DEFAULT_PROMPT
from turbo.runtimes.onnxrt import OnnxRuntimeRunner

CALIBRATION_BATCH = 8
QUALITY_SAMPLES = 16
INT8 = "int8"  # weights and activations, QDQ
MODES = (*WEIGHT_ONLY, INT8)
BITS = {**{mode: bits for mode, (bits, _) in WEIGHT_ONLY.items()}, INT8: 8}
# Minimum output cosine with the fp32 merged model (per sample, averaged), and ViT top-1
# agreement, by bits. Agreement is gated only with real weights: random-weight logits are
# near ties, so any perturbation reorders them.
MIN_COSINE = {8: 0.995, 4: 0.95}
MIN_TOP1_AGREEMENT = {8: 0.95, 4: 0.80}
MIN_CAPTION_AGREEMENT = {8: 0.95, 4: 0.80}  # next tokens equal to fp32's, teacher-forced on fp32 captions/answers


def check_quant_options(quant: str | None, calib: str | None, opset: int, precision: str, group: int,
                        calib_images: str | None = None) -> None:
    if quant is None:
        return
    if quant not in MODES:
        raise UsageError(f"unknown --quant {quant!r}; choose one of {', '.join(MODES)}")
    if calib is None:
        raise UsageError("a quantized export needs calibration images: pass --calib IMAGES (a folder of images or an "
                         "HF datasets directory; --calib synthetic only for smoke tests)")
    for option, path in (("--calib", calib), ("--calib-images", calib_images)):
        if path is not None and path != SYNTHETIC and not Path(path).exists():
            raise UsageError(f"{option} {path}: no such file or folder")
    if opset < MIN_OPSET and quant != INT8:
        raise UsageError(f"--quant writes blocked DequantizeLinear, which needs --opset {MIN_OPSET} or later")
    if precision != "fp32":
        raise UsageError("--quant stacks on fp32 exports (the scales are fp32); drop --precision")
    if group < 1:
        raise UsageError(f"--group-size must be positive, not {group}")


@dataclass(frozen=True)
class QuantOptions:
    """The quantization stage's options: `--quant` and its calibration."""

    mode: str  # gptq-int4 | gptq-int8 | rtn-int4 | int8
    calib: str | None  # image folder, HF datasets directory, COCO-format captions .json, or "synthetic"
    group_size: int = 128
    act_order: bool = False
    calib_size: int = 128
    calib_seed: int = 0
    calib_images: str | None = None  # image root of a captions file (default: its folder)
    heads: bool = False  # also the classifier (ViT) and the LM head (BLIP, LLM-based VLMs)
    language_model: bool = False  # also an LLM-based VLM's language model (exported with it)


@dataclass(frozen=True)
class QualityCheck:
    name: str
    value: float
    minimum: float
    gated: bool

    @property
    def passed(self) -> bool:
        return self.value >= self.minimum or not self.gated


@dataclass
class QuantizedModel:
    mode: str
    group: int
    act_order: bool
    calibration: CalibrationRecord
    weights: dict[str, QuantizedWeight]
    layers: list[LayerReport]
    reference: nn.Module  # the fp32 merged model, for the quality check
    random_weights: bool
    quality: list[QualityCheck] = field(default_factory=list)
    pixels: np.ndarray | None = None  # INT8: the calibration images, for activation ranges
    decoder_weights: dict[str, QuantizedWeight] = field(default_factory=dict)  # BLIP's decoder, an LLM
    decoder_text: str | None = None  # what the decoder or language model was calibrated on
    heads: bool = False  # the classifier / LM head quantized too
    float_heads: tuple[np.ndarray, ...] = ()  # INT8: head weights left float

    def write(self, path: Path) -> None:
        """Rewrite the exported model with integer weights and DequantizeLinear (in place)."""

        if self.mode == INT8:
            _quantize_int8_in_place(path, self.pixels, self.float_heads)
            return

        def dequantize(model):
            model, missing = insert_dequantize(model, self.weights)
            if missing:
                raise TurboError(f"{len(missing)} quantized Linears were not found in the exported graph "
                                 f"(first: {missing[0]}); report this with the model name")
            return model

        rewrite_onnx(path, dequantize)

    def check_quality(self, module: nn.Module, report, path: Path, pixel_shape: tuple[int, int, int],
                      static_batch: int | None = None) -> None:
        """The quantized graph (ONNX Runtime) against the fp32 merged model on seeded inputs, fed
        `static_batch` at a time to a static-batch graph."""

        runner = OnnxRuntimeRunner(path)  # as deployed: ORT's default int4 kernels
        pixels = seeded_pixels(QUALITY_SAMPLES, pixel_shape, seed=3)
        reference = copy.copy(module)
        reference.model = self.reference
        with torch.inference_mode():
            want = [t.numpy() for t in reference(torch.from_numpy(pixels))]
        runs = [[value[:count] for value in runner.run({runner.input_names[0]: chunk}).values()]
                for chunk, count in batches(pixels, static_batch or len(pixels), static=bool(static_batch))]
        got = [np.concatenate(parts) for parts in zip(*runs)]
        bits = BITS[self.mode]
        a, b = (_summary(outputs, module.merges) for outputs in (want, got))
        cosine = mean_cosine(a, b)
        self.quality = [QualityCheck("output cosine with fp32", cosine, MIN_COSINE[bits], True)]
        if want[0].ndim == 2:  # classifier logits
            agreement = float((want[0].argmax(-1) == got[0].argmax(-1)).mean())
            self.quality.append(QualityCheck("top-1 agreement with fp32", agreement, MIN_TOP1_AGREEMENT[bits],
                                             not self.random_weights))
        report.quality.extend(self.quality)

    def check_captions(self, pipeline, report, pixel_shape: tuple[int, int, int], interpolate: bool,
                       prompt: str) -> None:
        """Next-token agreement of the quantized ONNX captioner (default kernels) with the fp32
        merged model, teacher-forced on the fp32 model's greedy captions: at each position up to
        its EOS, does the quantized model pick the fp32 model's token? (Free-running captions
        would count every token after a first difference as different.)"""

        pixels = seeded_pixels(pipeline.static_batch or 4, pixel_shape, seed=4)
        prompt_ids = pipeline.prompt_ids(prompt)
        ids = reference_ids(self.reference, pixels, prompt_ids, pipeline.settings, interpolate)  # (B, P + n)
        decoder, start = pipeline.decoder, len(prompt_ids)
        decoder.image_embeds = next(iter(pipeline.encoder.run({pipeline.encoder.input_names[0]: pixels}).values()))
        first, stepped = decoder.teacher_forced(ids[:, :-1], start)
        picked = np.concatenate([first[:, -1:], stepped], axis=1).argmax(-1)  # the next token at each position
        target = ids[:, start:]
        ended = np.cumsum(target == pipeline.settings.eos_token_id, axis=1)
        counted = (ended == 0) | ((ended == 1) & (target == pipeline.settings.eos_token_id))  # up to the EOS
        agreement = float((picked == target)[counted].mean())
        check = QualityCheck("caption next-token agreement with fp32", agreement,
                             MIN_CAPTION_AGREEMENT[BITS[self.mode]], not self.random_weights)
        self.quality.append(check)
        report.quality.append(check)

    def check_answers(self, agreement: float, report) -> None:
        """The language model's next-token agreement with fp32 (llm_quant.answer_agreement)."""
        check = QualityCheck("answer next-token agreement with fp32", agreement, MIN_CAPTION_AGREEMENT[BITS[self.mode]],
                             not self.random_weights)
        self.quality.append(check)
        report.quality.append(check)

    def record(self) -> QuantizationRecord:
        weight_only = self.mode in WEIGHT_ONLY
        return QuantizationRecord(
            mode=self.mode, bits=BITS[self.mode],
            method=WEIGHT_ONLY[self.mode][1] if weight_only else "onnxruntime static (MinMax)",
            group_size=self.group if weight_only else None, act_order=self.act_order, heads=self.heads,
            calibration=self.calibration, quantized_linears=len(self.weights) if weight_only else None,
            format=("DequantizeLinear (opset 21, blocked, symmetric)" if weight_only else
                    "QDQ: int8 weights per channel and activations per tensor, symmetric; weight MatMuls only"),
            decoder=({"quantized_linears": len(self.decoder_weights), "calibration_text": self.decoder_text}
                     if self.decoder_weights else None),
            layers=[asdict(layer) for layer in self.layers],
            quality=[{**asdict(q), "passed": q.passed} for q in self.quality],
        )


def _quantize_int8_in_place(path: Path, pixels: np.ndarray, keep_float: tuple[np.ndarray, ...]) -> None:

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer's advice to pre-process goes to the root logger
    try:
        with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
            target = Path(scratch) / path.name
            quantize_int8(path, target, "pixel_values", pixels, keep_float)
            for produced in Path(scratch).iterdir():
                produced.replace(path.parent / produced.name)
    finally:
        root.setLevel(level)


def _summary(outputs: list[np.ndarray], merges: bool) -> np.ndarray:
    """Per sample, what quantization may change without being wrong: logits as they are; token
    outputs by their CLS token and size-weighted mean token (quantization may flip near-tied merge
    decisions, which moves tokens)."""
    first = outputs[0].astype(np.float64)
    if first.ndim == 2:
        return first
    return np.concatenate([first[:, 0], weighted_mean_token(first, outputs[-1] if merges else None)], axis=1)


def quantize_model(model: nn.Module, built, options: QuantOptions, random_weights: bool,
                   tokenizer=None) -> QuantizedModel:
    """Calibrate on the merged model and quantize its encoder Linears in place, then (captioning
    models) the text decoder's, calibrated on the quantized encoder's image embeddings and the
    calibration captions (or, for image-only sources, the model's own greedy captions)."""

    adapter = built.source.adapter
    layers = adapter.encoder_layers(model)
    caption = adapter.caption_decoder
    decoder = caption.module(model) if caption is not None else None
    processor, _ = load_image_processor(built.source, built.image_size, random_weights)
    language = options.language_model and adapter.language_model is not None
    if options.mode != INT8:
        quantized_modules = [layers, *([caption.layers(decoder)] if decoder is not None else [])]
        widths = {m.in_features for blocks in quantized_modules for m in blocks.modules() if isinstance(m, nn.Linear)}
        if language:
            widths |= {m.in_features for m in language_model_linears(model, built.source)}
        if any(width % options.group_size for width in widths):
            raise UsageError(f"--group-size {options.group_size} must divide every quantized layer's input width "
                             f"({', '.join(map(str, sorted(widths)))})")
    calibration = calibration_set(options.calib, options.calib_size, options.calib_seed, processor, built.pixel_shape,
                                  options.calib_images)
    if options.mode == INT8:  # the graph is quantized after export, from these calibration images
        head = adapter.classifier(model)
        keep = () if options.heads or not isinstance(head, nn.Linear) else (head.weight.detach().numpy(),)
        return QuantizedModel(INT8, 0, False, calibration.info, {}, [], model, random_weights,
                              pixels=calibration.pixels, heads=options.heads, float_heads=keep)
    reference = copy.deepcopy(model)
    pixels = calibration.pixels
    batches = [torch.from_numpy(pixels[i:i + CALIBRATION_BATCH]) for i in range(0, len(pixels), CALIBRATION_BATCH)]
    run = lambda x: adapter.export_outputs(model, x, built.interpolate_pos_encoding)  # noqa: E731
    weights, reports = quantize_blocks(layers, run, batches, options.mode, options.group_size, options.act_order,
                                       prefix="encoder.")
    head = adapter.classifier(model)
    if options.heads and isinstance(head, nn.Linear):
        head_weights, head_reports = quantize_blocks(nn.ModuleList([head]), run, batches, options.mode,
                                                     options.group_size, options.act_order, prefix="classifier.")
        weights.update(head_weights)
        reports += head_reports
    quantized = QuantizedModel(options.mode, options.group_size, options.act_order, calibration.info, weights,
                               reports, reference, random_weights, heads=options.heads)
    if decoder is not None:
        quantized.decoder_weights, decoder_reports, quantized.decoder_text = _quantize_decoder(
            model, decoder, built, calibration, tokenizer, options)
        quantized.layers += decoder_reports
    if language:
        quantized.decoder_weights, language_reports, quantized.decoder_text = quantize_language_model(
            model, built.source, built.interpolate_pos_encoding, calibration.pixels, calibration.texts, tokenizer,
            options.mode, options.group_size, options.act_order, options.heads)
        quantized.layers += language_reports
    return quantized


def _quantize_decoder(model: nn.Module, decoder: nn.Module, built, calibration, tokenizer, options: QuantOptions):
    """The text decoder's Linears, one calibration image (and its caption ids) per batch."""

    ids_config = built.source.adapter.caption_decoder.generation_ids(built.source.config)
    bos, eos = ids_config["bos_token_id"], ids_config["eos_token_id"]
    pixels = torch.from_numpy(calibration.pixels)
    with torch.inference_mode():
        embeds = built.source.adapter.caption_decoder.image_embeds(  # the quantized encoder's, as deployed
            model, pixels, built.interpolate_pos_encoding)
        if calibration.texts is not None and tokenizer is not None:
            source = "calibration captions"
            ids = [[bos, *tokenizer(f"{DEFAULT_PROMPT} {text}", add_special_tokens=False)["input_ids"], eos]
                   for text in calibration.texts]
        else:
            source = "the model's own greedy captions of the calibration images (no captions given)"
            prompt = torch.tensor([[bos, eos]] * len(pixels))
            ids = model.generate(pixel_values=pixels, input_ids=prompt, max_new_tokens=20,
                                 interpolate_pos_encoding=built.interpolate_pos_encoding).tolist()
    batches = [(torch.tensor([row]), embeds[i:i + 1]) for i, row in enumerate(ids)]

    def run(batch):
        return decoder(input_ids=batch[0], encoder_hidden_states=batch[1])

    weights, reports = quantize_blocks(built.source.adapter.caption_decoder.layers(decoder), run, batches,
                                       options.mode, options.group_size, options.act_order, prefix="decoder.")
    if options.heads:  # untied first: the word embeddings keep their fp32 values
        head = built.source.adapter.caption_decoder.lm_head(decoder)
        head.weight = nn.Parameter(head.weight.detach().clone())
        head_weights, head_reports = quantize_blocks(nn.ModuleList([head]), run, batches, options.mode,
                                                     options.group_size, options.act_order, prefix="decoder.lm_head.")
        weights.update(head_weights)
        reports += head_reports
    return weights, reports, source

"""The PyTorch model an export is made from, and every comparison of the export's files with it.

`turbo export` validates with these before it writes its directory; `turbo check` runs the same
two calls on a finished export, so the two can never drift apart.
"""

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from turbo.core.files import MODEL_FILE
from turbo.core.manifest import DecoderRecord, LanguageModelRecord, QuestionRecord, TextRecord
from turbo.export.decoder_validate import captions_are_exact, validate_decoder
from turbo.export.llm_export import validate_language_model
from turbo.export.llm_quant import answer_agreement
from turbo.export.onnx_export import ExportModule
from turbo.export.options import ExportOptions, Stage, no_stage
from turbo.export.quant_export import INT8, QuantizedModel, quantize_model
from turbo.export.text_export import validate_text_tower
from turbo.export.validate import ValidationReport, validate_export
from turbo.export.vqa_export import validate_answerer
from turbo.graph.summary import GraphSummary
from turbo.models.build import BuiltPlan
from turbo.models.loading import load_model
from turbo.models.patch import apply_turbo
from turbo.runtimes.caption import CaptionPipeline
from turbo.runtimes.llm_onnx import OnnxVlm
from turbo.runtimes.vqa import VqaPipeline


@dataclass
class ReferenceModel:
    """The merged (and, with --quant, fake-quantized) PyTorch model and its export wrapper."""

    model: nn.Module
    module: ExportModule
    quantized: QuantizedModel | None = None
    tokenizer: tuple[object, str] | None = None  # a captioning model's tokenizer and where it came from
    unmerged: nn.Module | None = None  # the same weights without the merges (keep_unmerged)


def prepare_model(built: BuiltPlan, options: ExportOptions,
                  load_tokenizer: Callable[[], tuple[object, str]] | None = None,
                  stage: Stage = no_stage, keep_unmerged: bool = False) -> ReferenceModel:
    """Load the weights (or the seeded random ones) and, for a captioning model, its tokenizer
    (the decoder's calibration captions are tokenized with it); patch in the plan's merges; quantize
    as the options say."""
    with stage("load"):
        model = load_model(built.source, options.random_weights, options.seed)
        tokenizer = load_tokenizer() if load_tokenizer is not None else None
        unmerged = copy.deepcopy(model) if keep_unmerged else None
    with stage("patch"):
        apply_turbo(model, built.source.adapter, built.plan, built.merge_config, options.kernel)
        drop = options.llm_drop_config()
        module = ExportModule(model, built, cls_attention=drop.method == "mustdrop", spatial=drop.spatial_merge())
    quantized = None
    if options.quant:
        with stage("quantize"):
            quantized = quantize_model(model, built, options.quantization(), options.random_weights,
                                       tokenizer[0] if tokenizer else None)
    return ReferenceModel(model, module, quantized, tokenizer, unmerged)


def validate_files(reference: ReferenceModel, built: BuiltPlan, options: ExportOptions, directory: Path,
                   summary: GraphSummary, decoder: DecoderRecord | None, text: TextRecord | None = None,
                   question: QuestionRecord | None = None, llm: LanguageModelRecord | None = None,
                   static_checks: bool = True) -> ValidationReport:
    """The encoder graph against the PyTorch model (and against the plan, with static_checks); a
    captioning export's decoder graphs and whole captions against upstream generate; a retrieval
    export's text encoder against the PyTorch text tower; a VQA export's question encoder, answer
    decoder and whole answers against PyTorch and upstream generate; an LLM-based VLM's language
    model graphs and greedy tokens against PyTorch; a quantized export's quality against the fp32
    model."""
    path = directory / MODEL_FILE
    report = validate_export(reference.module, reference.module.output_names(), path, summary,
                             built.plan, options.kernel, options.batch, options.precision, built.pixel_shape,
                             options.seed, static_checks=static_checks, compare=options.quant != INT8,
                             tokens=options.output_tokens(built))
    quantized = reference.quantized
    exact_text = captions_are_exact(options.precision, options.quant)
    if question is not None:
        pipeline = VqaPipeline.load(directory, MODEL_FILE, question, decoder, options.batch, exact=True)
        validate_answerer(reference.model, built.source.adapter.question_answerer, pipeline, report,
                          built.pixel_shape, built.interpolate_pos_encoding, exact_text, options.seed)
    elif decoder is not None:
        pipeline = CaptionPipeline.load(directory, MODEL_FILE, decoder, options.batch, exact=True)
        validate_decoder(reference.model, built.source.adapter.caption_decoder, pipeline, report, built.pixel_shape,
                         built.interpolate_pos_encoding, decoder.prompt, exact_text, options.seed)
    if llm is not None:
        pipeline = OnnxVlm.from_files(directory, MODEL_FILE, llm, options.batch, exact=True)
        validate_language_model(reference.model, built.source, options.llm_drop_config(), pipeline, report,
                                built.pixel_shape, built.interpolate_pos_encoding, exact_text, options.seed)
    if text is not None:
        adapter = built.source.adapter
        validate_text_tower(reference.model, adapter.text_tower, directory, text,
                            adapter.vision_config(built.source.config).hidden_size, report)
    if quantized is not None:
        quantized.check_quality(reference.module, report, path, built.pixel_shape, options.batch)
        if llm is not None and quantized.decoder_weights:  # as deployed: ONNX Runtime's default kernels
            pipeline = OnnxVlm.from_files(directory, MODEL_FILE, llm, options.batch)
            quantized.check_answers(answer_agreement(quantized.reference, built.source, options.llm_drop_config(),
                                                     pipeline, reference.tokenizer[0], built.pixel_shape,
                                                     built.interpolate_pos_encoding), report)
        if decoder is not None and question is None:  # as deployed: ONNX Runtime's default kernels
            quantized.check_captions(CaptionPipeline.load(directory, MODEL_FILE, decoder, options.batch), report,
                                     built.pixel_shape, built.interpolate_pos_encoding, decoder.prompt)
    return report

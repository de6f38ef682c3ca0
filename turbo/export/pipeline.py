"""`turbo export` as a library call: plan, load, patch, export, validate, write the manifest,
all inside a staging directory that replaces the output only when complete."""

import contextlib
import copy
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from turbo.core.cache import cache_root
from turbo.core.errors import UsageError
from turbo.core.files import MODEL_FILE, PROCESSOR_FILE
from turbo.core.integrity import record_files
from turbo.core.manifest import (
    ImageProcessorRecord,
    Manifest,
    ModelRecord,
    OnnxRecord,
    PlanRecord,
    TensorRTRecord,
    TurboRecord,
    now,
    read_export_manifest,
    versions,
    write_manifest,
)
from turbo.core.staging import check_target, staged_directory
from turbo.export.decoder_export import export_captioner
from turbo.export.llm_export import export_language_model
from turbo.export.onnx_export import PRECISIONS, check_export_options, export_onnx, fold_merge_ops
from turbo.export.options import ExportOptions, Stage, no_stage
from turbo.export.quant_export import check_quant_options
from turbo.export.reference import prepare_model, validate_files
from turbo.export.tensorrt.stage import build_and_validate, check_trt_options
from turbo.export.text_export import export_text_tower
from turbo.export.validate import ValidationReport
from turbo.export.vqa_export import export_answerer
from turbo.graph.summary import GraphSummary, summarize
from turbo.models.build import BuiltPlan
from turbo.models.llm_plan import llm_plan
from turbo.models.loading import load_image_processor, load_tokenizer
from turbo.runtimes.availability import tensorrt_reason, tensorrt_version


@dataclass
class ExportResult:
    directory: Path
    manifest: Manifest
    report: ValidationReport | None
    warnings: list[str] = field(default_factory=list)
    engine_report: ValidationReport | None = None
    engine_missing: str | None = None  # --trt asked for, but TensorRT or a GPU is missing here

    @property
    def passed(self) -> bool:
        """True when validated and passed, or when validation was switched off."""
        return all(report is None or report.passed for report in (self.report, self.engine_report))


def run_export(options: ExportOptions, output: str | Path, force: bool = False, stage: Stage = no_stage,
               command_line: str | None = None) -> ExportResult:
    """Export into `output`. Bad options raise UsageError before anything is written; a failed
    validation still writes the directory, with the manifest saying failed."""
    started = now()
    check_export_options(options.opset, options.precision, options.batch, options.kernel, options.merge_op)
    check_quant_options(options.quant, options.calib, options.opset, options.precision, options.group_size,
                        options.calib_images)
    if options.trt is not None:
        if options.precision != options.trt.onnx_precision():
            raise UsageError(f"a {options.trt.precision} engine is built from {options.trt.onnx_precision()} ONNX, "
                             f"not {options.precision}")
        check_trt_options(options.trt, options.batch, options.quant, tensorrt_version())
    built = options.plan()
    if built.source.adapter.language_model is not None or options.llm_drop != "none":
        llm_plan(built, options.llm_drop_config())  # a reduction that cannot run: refused here
        if options.trt is not None and options.llm_drop_config().spatial_merge():
            raise UsageError("--trt: MustDrop's spatial merge decides each image's token count, and turbo builds "
                             "TensorRT engines for the plan's counts; export with window=0 (turbo's --r merges the "
                             "tower instead), or without --trt (ONNX Runtime runs the merge)")
    check_target(Path(output), force, protect=Path(built.source.location))
    seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(name: str) -> Iterator[None]:
        begin = time.perf_counter()
        with stage(name):
            yield
        seconds[name] = round(time.perf_counter() - begin, 2)

    with staged_directory(output, force) as staging:
        captioning = built.source.adapter.caption_decoder is not None and options.decoder
        retrieval = built.source.adapter.text_tower is not None
        answering = built.source.adapter.question_answerer is not None
        generating = built.source.adapter.language_model is not None and options.decoder
        reads_text = captioning or retrieval or answering or generating
        tokenizer = (lambda: load_tokenizer(built.source, options.random_weights)) if reads_text else None
        reference = prepare_model(built, options, tokenizer, timed)
        model, module, quantized = reference.model, reference.module, reference.quantized
        with timed("export"):
            dtype = PRECISIONS[options.precision]
            exported = module if options.precision == "fp32" else copy.deepcopy(module).to(dtype)
            export_onnx(exported, staging / MODEL_FILE, options.opset, options.batch, options.external_data)
            if options.merge_op == "function":
                fold_merge_ops(staging / MODEL_FILE, options.kernel)
            if quantized is not None:
                quantized.write(staging / MODEL_FILE)
            del exported
            processor, processor_origin = load_image_processor(built.source, built.image_size, options.random_weights)
            processor.save_pretrained(staging)
        decoder = None
        if captioning:
            with timed("decoder"):
                decoder = export_captioner(model, built.source, reference.tokenizer, staging, built.plan.final_tokens,
                                           options.opset, quantized.decoder_weights if quantized else None)
        text = None
        if retrieval:
            with timed("text"):
                text = export_text_tower(model, built.source, reference.tokenizer, staging, options.opset,
                                         built.plan.final_tokens)
        question = None
        if answering:
            with timed("text"):
                question, decoder = export_answerer(model, built.source, reference.tokenizer, staging,
                                                    built.plan.final_tokens, options.opset)
        llm = None
        if generating:
            with timed("language model"):
                image_tokens = built.source.adapter.language_model.image_tokens(built.source.config,
                                                                               built.plan.final_tokens)
                llm = export_language_model(model, built.source, reference.tokenizer, staging, image_tokens,
                                            options.llm_drop_config(), options.opset,
                                            quantized.decoder_weights if quantized else None)
        summary = summarize(staging / MODEL_FILE)
        report = None
        if options.validate:
            with timed("validate"):
                report = validate_files(reference, built, options, staging, summary, decoder, text, question, llm)
        warnings = []
        if not options.random_weights and processor_origin.endswith("default"):
            warnings.append(f"{built.source.location} has no image processor config; wrote the "
                            f"{processor_origin} (check its mean/std and resize before serving)")
        manifest = _manifest(built, options, model, summary, report, staging, processor_origin, seconds, started,
                             command_line)
        manifest.decoder, manifest.text, manifest.question, manifest.llm = decoder, text, question, llm
        manifest.quantization = quantized.record() if quantized is not None else None
        engine_report = missing = None
        if options.trt is not None:
            with timed("tensorrt"):
                manifest.tensorrt, engine_report, missing = _engine_stage(options, staging, manifest)
            manifest.stage_seconds = seconds
        manifest.files = record_files(staging)
        write_manifest(staging, manifest)
    return ExportResult(Path(output), read_export_manifest(output), report, warnings, engine_report, missing)


def _engine_stage(options: ExportOptions, staging: Path,
                  manifest: Manifest) -> tuple[TensorRTRecord, ValidationReport | None, str | None]:
    """(the manifest's "tensorrt" entry, the engine's validation, what is missing to build it)."""
    missing = tensorrt_reason()
    if missing is not None:
        return TensorRTRecord(False, reason=missing), None, missing
    if manifest.failed:
        return TensorRTRecord(False, reason="the ONNX failed validation"), None, None
    engine, engine_report = build_and_validate(options.trt, staging, manifest, options.quant,
                                               cache_root() / "tensorrt")
    if engine_report is not None:
        engine["validation"] = engine_report.to_dict()
        if not engine_report.passed:
            manifest.status = "failed"
    return TensorRTRecord.from_dict({"built": True, **engine}, "tensorrt"), engine_report, None


def _manifest(built: BuiltPlan, options: ExportOptions, model, summary: GraphSummary,
              report: ValidationReport | None, staging: Path, processor_origin: str, seconds: dict[str, float],
              started: str, command_line: str | None) -> Manifest:
    status = "not validated" if report is None else "passed" if report.passed else "failed"
    data_files = sorted(p.name for p in staging.iterdir() if p.name.startswith(MODEL_FILE) and p.name != MODEL_FILE)
    tokens = options.output_tokens(built)
    return Manifest(
        status=status,
        model=ModelRecord(
            name=built.source.name, source=built.source.location, architecture=built.source.architecture,
            revision=None if options.random_weights else getattr(model.config, "_commit_hash", None),
            random_weights=options.random_weights, tiny=options.tiny,
            seed=options.seed if options.random_weights else None),
        turbo=TurboRecord(
            method=built.merge_config.method, alpha=built.merge_config.alpha, fusion=built.merge_config.fusion,
            threshold=built.plan.threshold, schedule=built.schedule, r_requested=built.r_requested,
            merge_kernel=options.kernel, r_auto=options.r_auto,
            merge_auto=options.merge_auto),
        plan=PlanRecord(**built.plan.to_dict()),
        onnx=OnnxRecord(file=MODEL_FILE, opset=options.opset, precision=options.precision,
                        batch=options.batch or "dynamic", image_size=list(built.image_size), external_data=data_files,
                        merge_op=options.merge_op,
                        excluded_tokens=tokens.excluded, fixed_tokens=tokens.fixed,
                        decided_tokens=list(tokens.decided), **summary.to_dict()),
        image_processor=ImageProcessorRecord(PROCESSOR_FILE, processor_origin),
        validation=report.to_dict() if report else {"skipped": True},
        versions=versions(),
        command=command_line or "python API (turbo.export.pipeline.run_export)",
        started=started,
        finished=now(),
        stage_seconds=seconds,
    )

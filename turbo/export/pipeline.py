"""`turbo export` as a library call: plan, load, patch, export, validate, write the manifest,
all inside a staging directory that replaces the output only when complete."""

import contextlib
import copy
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

from turbo.core.cache import cache_root
from turbo.core.errors import UsageError
from turbo.core.files import MODEL_FILE, PROCESSOR_FILE
from turbo.core.manifest import (
    DecoderRecord,
    ImageProcessorRecord,
    Manifest,
    ModelRecord,
    OnnxRecord,
    PlanRecord,
    QuantizationRecord,
    TensorRTRecord,
    TurboRecord,
    now,
    read_export_manifest,
    versions,
    write_manifest,
)
from turbo.core.staging import check_target, staged_directory
from turbo.export.decoder_export import export_captioner
from turbo.export.decoder_validate import captions_are_exact, validate_decoder
from turbo.export.onnx_export import (
    DEFAULT_OPSET,
    PRECISIONS,
    ExportModule,
    check_export_options,
    export_onnx,
    fold_merge_ops,
)
from turbo.export.quant_export import check_quant_options, quantize_model
from turbo.export.tensorrt.stage import TrtOptions, build_and_validate, check_trt_options
from turbo.export.validate import ValidationReport, validate_export
from turbo.graph.summary import GraphSummary, summarize
from turbo.graph.weight_quant import MIN_OPSET as QUANT_OPSET
from turbo.models.build import BuiltPlan, build_plan
from turbo.models.loading import load_image_processor, load_model, load_tokenizer
from turbo.models.patch import apply_turbo
from turbo.runtimes.availability import tensorrt_reason, tensorrt_version
from turbo.runtimes.caption import CaptionPipeline

Stage = Callable[[str], AbstractContextManager]


@dataclass
class ExportOptions:
    model: str = "blip-caption"
    r: int | None = None  # None: the model's default
    method: str = "turbo"
    alpha: float | None = None
    threshold: int | None = None
    schedule: str = "constant"
    fusion: str = "s1"
    kernel: str = "matmul"
    opset: int | None = None  # None: 20, or 21 with quant (blocked DequantizeLinear)
    batch: int | None = None  # None: dynamic batch axis
    image_size: int | None = None
    precision: str | None = None  # None: fp32, or the ONNX a `trt` engine is built from
    random_weights: bool = False
    validate: bool = True
    seed: int = 0
    external_data: bool | None = None  # None: only for weights of 1 GiB or more
    tiny: bool = False  # the registry's 4-layer tiny variant (tests, CI smoke checks)
    r_auto: dict | None = None  # how `--r auto` chose r (recorded in the manifest)
    merge_op: str = "function"  # one turbo::TurboMerge function node per merge block, or "inline" plain ops
    quant: str | None = None  # weight-only: gptq-int4 | gptq-int8 | rtn-int4
    group_size: int = 128
    act_order: bool = False
    calib: str | None = None  # image folder, HF datasets directory, or "synthetic" (smoke tests)
    calib_size: int = 128
    calib_seed: int = 0
    calib_images: str | None = None  # image root of a COCO-format --calib file (default: the file's folder)
    quant_heads: bool = False  # also the classifier (ViT) and the LM head (BLIP), excluded by default
    decoder: bool = True  # captioning models: also the text decoder (False: the vision encoder only)
    trt: TrtOptions | None = None  # also build a TensorRT engine (model.plan) from the validated ONNX

    def __post_init__(self) -> None:
        if self.opset is None:
            self.opset = QUANT_OPSET if self.quant else DEFAULT_OPSET
        if self.precision is None:
            self.precision = self.trt.onnx_precision() if self.trt is not None else "fp32"

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> "ExportOptions":
        """The options an export was made with, read back from its turbo.json."""
        model, turbo, onnx_info = manifest.model, manifest.turbo, manifest.onnx
        schedule = turbo.schedule
        return cls(
            model=model.name, r=turbo.r_requested, method=turbo.method, alpha=turbo.alpha,
            threshold=turbo.threshold, fusion=turbo.fusion, kernel=turbo.merge_kernel,
            schedule=",".join(map(str, schedule)) if isinstance(schedule, list) else schedule,
            opset=onnx_info.opset, batch=onnx_info.static_batch, image_size=onnx_info.image_size,
            precision=onnx_info.precision, random_weights=model.random_weights,
            seed=model.seed if model.seed is not None else 0, tiny=model.tiny, merge_op=onnx_info.merge_op,
            **_quant_options(manifest.quantization), decoder=manifest.decoder is not None,
        )

    def plan(self) -> BuiltPlan:
        return build_plan(self.model, self.r, self.method, self.alpha, self.schedule, self.threshold, self.fusion,
                          self.tiny, self.image_size)


def _quant_options(quantization: QuantizationRecord | None) -> dict:
    if quantization is None:
        return {}
    calibration = quantization.calibration
    return {"quant": quantization.mode, "group_size": quantization.group_size or 128,
            "act_order": quantization.act_order, "calib": calibration.source, "calib_size": calibration.count,
            "calib_seed": calibration.seed, "calib_images": calibration.images, "quant_heads": quantization.heads}


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


@contextlib.contextmanager
def no_stage(name: str) -> Iterator[None]:
    """A `Stage` that only runs the stage (the CLI's shows progress)."""
    yield


def run_export(options: ExportOptions, output: str | Path, force: bool = False, stage: Stage = no_stage,
               command_line: str | None = None) -> ExportResult:
    """Export into `output`. Bad options raise UsageError before anything is written; a failed
    validation still writes the directory, with the manifest saying failed."""
    started = now()
    check_export_options(options.opset, options.precision, options.batch, options.kernel, options.merge_op)
    check_quant_options(options.quant, options.calib, options.opset, options.precision, options.group_size)
    if options.trt is not None:
        if options.precision != options.trt.onnx_precision():
            raise UsageError(f"a {options.trt.precision} engine is built from {options.trt.onnx_precision()} ONNX, "
                             f"not {options.precision}")
        check_trt_options(options.trt, options.batch, options.quant, tensorrt_version())
    built = options.plan()
    check_target(Path(output), force)
    seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def timed(name: str) -> Iterator[None]:
        begin = time.perf_counter()
        with stage(name):
            yield
        seconds[name] = round(time.perf_counter() - begin, 2)

    with staged_directory(output, force) as staging:
        captioning = built.source.adapter.caption_decoder is not None and options.decoder
        with timed("load"):
            model = load_model(built.source, options.random_weights, options.seed)
            tokenizer = load_tokenizer(built.source, options.random_weights) if captioning else None
        with timed("patch"):
            apply_turbo(model, built.source.adapter, built.plan, built.merge_config, options.kernel)
            module = ExportModule(model, built)
        quantized = None
        if options.quant:
            with timed("quantize"):
                quantized = quantize_model(model, built, options, tokenizer[0] if tokenizer else None)
        with timed("export"):
            dtype = PRECISIONS[options.precision]
            exported = module if options.precision == "fp32" else copy.deepcopy(module).to(dtype)
            names = export_onnx(exported, staging / MODEL_FILE, built.image_size, options.opset, options.batch,
                                options.external_data)
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
                decoder = export_captioner(model, built.source, tokenizer, staging, built.plan.final_tokens,
                                           options.opset, quantized.decoder_weights if quantized else None)
        summary = summarize(staging / MODEL_FILE)
        report = None
        if options.validate:
            with timed("validate"):
                report = validate_export(module, names, staging / MODEL_FILE, summary, built.plan, options.kernel,
                                         options.batch, options.precision, built.image_size, options.seed,
                                         compare=options.quant != "int8")
                if decoder is not None:
                    _validate_captioner(model, built, options, staging, decoder, report)
                if quantized is not None:
                    quantized.check_quality(module, report, staging / MODEL_FILE, built.image_size)
                if quantized is not None and decoder is not None:
                    quantized.check_captions(CaptionPipeline.load(staging, MODEL_FILE, decoder, options.batch), report,
                                             built.image_size, built.interpolate_pos_encoding, decoder.prompt)
        warnings = []
        if not options.random_weights and processor_origin.endswith("default"):
            warnings.append(f"{built.source.location} has no image processor config; wrote the "
                            f"{processor_origin} (check its mean/std and resize before serving)")
        manifest = _manifest(built, options, model, summary, report, staging, processor_origin, seconds, started,
                             command_line)
        manifest.decoder = decoder
        manifest.quantization = quantized.record() if quantized is not None else None
        engine_report = missing = None
        if options.trt is not None:
            with timed("tensorrt"):
                manifest.tensorrt, engine_report, missing = _engine_stage(options, staging, manifest)
            manifest.stage_seconds = seconds
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


def _validate_captioner(model, built: BuiltPlan, options: ExportOptions, staging: Path, decoder: DecoderRecord,
                        report: ValidationReport) -> None:
    """The decoder graphs and the whole ONNX captioner against upstream generate."""

    pipeline = CaptionPipeline.load(staging, MODEL_FILE, decoder, options.batch, exact=True)
    validate_decoder(model, built.source.adapter.caption_decoder, pipeline, report, built.image_size,
                     built.interpolate_pos_encoding, decoder.prompt,
                     captions_are_exact(options.precision, options.quant), options.seed)


def _manifest(built: BuiltPlan, options: ExportOptions, model, summary: GraphSummary,
              report: ValidationReport | None, staging: Path, processor_origin: str, seconds: dict[str, float],
              started: str, command_line: str | None) -> Manifest:
    status = "not validated" if report is None else "passed" if report.passed else "failed"
    data_files = sorted(p.name for p in staging.iterdir() if p.name.startswith(MODEL_FILE) and p.name != MODEL_FILE)
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
            merge_kernel=options.kernel, r_auto=options.r_auto),
        plan=PlanRecord(**built.plan.to_dict()),
        onnx=OnnxRecord(file=MODEL_FILE, opset=options.opset, precision=options.precision,
                        batch=options.batch or "dynamic", image_size=built.image_size, external_data=data_files,
                        merge_op=options.merge_op, **summary.to_dict()),
        image_processor=ImageProcessorRecord(PROCESSOR_FILE, processor_origin),
        validation=report.to_dict() if report else {"skipped": True},
        versions=versions(),
        command=command_line or "python API (turbo.export.pipeline.run_export)",
        started=started,
        finished=now(),
        stage_seconds=seconds,
    )

"""`turbo export --trt`: the options, their checks before anything is written, and the engine
stage after the ONNX export validated (lint, build, validation against ONNX Runtime)."""

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from turbo.core.errors import TurboError, UsageError
from turbo.core.manifest import DecoderRecord, Manifest, OnnxRecord, TensorRTRecord
from turbo.export.decoder_validate import CAPTION_BATCH, CaptionCheck
from turbo.export.tensorrt.engine import EngineRequest, build_engine
from turbo.export.tensorrt.settings import (
    MIN_VERSION,
    TRT_MERGES,
    TRT_PRECISIONS,
    BatchProfile,
    batch_profile,
    builder_plan,
    decoder_builder_plan,
    decoder_ranges,
    onnx_input_dims,
    parse_version,
    plugin_mode,
    profile_shapes,
)
from turbo.export.validate import HALF, OutputCheck, Tolerance, ValidationReport, compare_runners, seeded_pixels
from turbo.graph.trt_lint import lint
from turbo.runtimes.caption import CaptionPipeline
from turbo.runtimes.onnxrt import OnnxRuntimeRunner
from turbo.runtimes.tensorrt import TensorRTRunner

# TensorRT may run fp32 layers in TF32 and picks its own fused kernels; near-tied merge decisions can
# then flip as in half precision, so flipped samples are summarised, not gated (like fp16 exports).
ENGINE_TOLERANCE = {"fp32": Tolerance(1e-3, flips_allowed=True), "fp16": HALF, "bf16": Tolerance(5e-2, True),
                    "int8": Tolerance(5e-2, flips_allowed=True)}
DECODER_ENGINE_ATOL = 1e-3  # fp32 decoder engines without TF32 vs the ONNX decoder, on logits


class EngineError(TurboError):
    """The engine could not be built (lint errors, parser or builder failure)."""


@dataclass(frozen=True)
class TrtOptions:
    precision: str = "fp32"  # the engine's: fp32 | fp16 | bf16 | int8
    workspace_gb: float = 4.0
    min_batch: int | None = None
    opt_batch: int | None = None
    max_batch: int | None = None
    merge: str = "plugin"  # plugin (turbo::TurboMerge, Triton kernel) | native (the function inlined)
    validate: bool = True

    def onnx_precision(self) -> str:
        """The ONNX the engine is built from: fp16 for fp16 engines, fp32 otherwise (TensorRT 10
        lowers it with BF16/INT8 flags; INT8 also needs the Q/DQ graph of --quant int8)."""
        return "fp16" if self.precision == "fp16" else "fp32"


def check_trt_options(options: TrtOptions, onnx_batch: int | None, quant: str | None, version: str | None) -> None:
    """Every check that can fail before the export starts; version-specific ones when TensorRT is here."""
    if options.precision not in TRT_PRECISIONS:
        raise UsageError(f"unknown TensorRT precision {options.precision!r}; choose one of {', '.join(TRT_PRECISIONS)}")
    if options.merge not in TRT_MERGES:
        raise UsageError(f"unknown --trt-merge {options.merge!r}; choose plugin or native")
    if options.workspace_gb <= 0:
        raise UsageError("--workspace takes a positive number of GB")
    batch_profile(onnx_batch or "dynamic", options.min_batch, options.opt_batch, options.max_batch)
    # without TensorRT here, the rules every supported version shares (10.0's)
    builder_plan(parse_version(version) if version else MIN_VERSION, options.precision, options.onnx_precision(),
                 quant, options.merge)
    if version is not None and options.merge == "plugin":
        plugin_mode(parse_version(version))


def build_and_validate(options: TrtOptions, directory: Path, manifest: Manifest, quant: str | None,
                       cache_dir: Path) -> tuple[dict, ValidationReport | None]:
    """Lint, build model.plan (and a captioning export's decoder engines) into `directory`, and
    compare the engines with ONNX Runtime."""
    import tensorrt as trt

    onnx_info = manifest.onnx
    onnx_path = directory / onnx_info.file
    _lint(onnx_path)
    version = parse_version(trt.__version__)
    profile = batch_profile(onnx_info.batch, options.min_batch, options.opt_batch, options.max_batch)
    plan = builder_plan(version, options.precision, onnx_info.precision, quant, options.merge)
    shapes = profile_shapes(onnx_input_dims(onnx_path), {"batch": profile.range()})
    engine = build_engine(EngineRequest(onnx_path, shapes, plan, options.merge, options.workspace_gb, cache_dir),
                          directory)
    engine["batch_profile"] = list(profile.range())
    pipeline = None
    if manifest.decoder is not None:
        pipeline = _ort_captioner(directory, manifest)
        engine["decoder"] = decoder_engine_plan(manifest.decoder, profile, pipeline)
        if engine["decoder"]["built"]:
            engine["decoder"]["engines"] = {}
            for key in ("first_step", "with_past"):
                graph = directory / getattr(manifest.decoder, key)
                _lint(graph)
                request = EngineRequest(graph, profile_shapes(onnx_input_dims(graph), engine["decoder"]["ranges"]),
                                        decoder_builder_plan(version), None, options.workspace_gb, cache_dir,
                                        graph.with_suffix(".plan").name)
                engine["decoder"]["engines"][key] = build_engine(request, directory)
    if not options.validate:
        return engine, None
    report = ValidationReport(reference="onnxruntime (cpu)", candidate=f"tensorrt {trt.__version__}")
    _validate_encoder(options, directory, onnx_info, engine, profile, report)
    if pipeline is not None and engine["decoder"]["built"]:
        _validate_captioner(directory, manifest, engine, pipeline, report)
    return engine, report


def decoder_engine_plan(decoder: DecoderRecord, profile: BatchProfile, pipeline: CaptionPipeline) -> dict:
    """The decoder engines' profile ranges (rows = images x the generation config's beams; the
    prompt and caption lengths it allows), or why none are built."""
    if decoder.precision != "fp32":
        return {"built": False, "reason": f"the decoder has {decoder.precision}; turbo builds TensorRT decoder "
                                          "engines for fp32 decoders only (export without --quant)"}
    beams = max(1, pipeline.settings.num_beams)
    rows = BatchProfile(profile.minimum, profile.optimum * beams, profile.maximum * beams)
    ranges = decoder_ranges(rows, len(pipeline.prompt_ids(decoder.prompt)), pipeline.settings.max_new_tokens)
    return {"built": True, "ranges": {name: list(span) for name, span in ranges.items()}}


def _lint(onnx_path: Path) -> None:
    errors = [f for f in lint(onnx_path) if f.severity == "error"]
    if errors:
        raise EngineError(f"TensorRT lint of {onnx_path.name}: " + "; ".join(
            f"{f.node or 'graph'} ({f.op_type}): {f.message}" for f in errors))


def _ort_captioner(directory: Path, manifest: Manifest) -> CaptionPipeline:
    return CaptionPipeline.load(directory, manifest.onnx.file, manifest.decoder, manifest.onnx.static_batch,
                                exact=True)


def _validate_encoder(options: TrtOptions, directory: Path, onnx_info: OnnxRecord, engine: dict, profile: BatchProfile,
                      report: ValidationReport) -> None:
    batches = tuple(sorted({profile.minimum, max(profile.minimum, min(3, profile.maximum))}))
    compare_runners(f"tensorrt {options.precision}", OnnxRuntimeRunner(directory / onnx_info.file, exact=True),
                    TensorRTRunner(directory / engine["file"]), report, onnx_info.pixel_shape, batches,
                    ENGINE_TOLERANCE[options.precision])


def _validate_captioner(directory: Path, manifest: Manifest, engine: dict, reference: CaptionPipeline,
                        report: ValidationReport) -> None:
    """Decoder engines against the ONNX decoder, fed the same image embeddings and greedy ids
    (logits, gated), and whole greedy captions of both pipelines (reported: the encoder engine
    may flip near-tied merges)."""
    candidate = CaptionPipeline.load(directory, manifest.onnx.file, manifest.decoder, reference.static_batch,
                                     engines=TensorRTRecord.from_dict({"built": True, **engine}, "tensorrt"))
    low, _, high = engine["batch_profile"]
    batch = reference.static_batch or min(max(CAPTION_BATCH, low), high)
    pixels = seeded_pixels(batch, manifest.onnx.pixel_shape)
    prompt_ids = reference.prompt_ids(manifest.decoder.prompt)
    settings = replace(reference.settings, num_beams=1)
    ids = reference.generate(pixels, prompt_ids, settings)
    embeds = reference.decoder.image_embeds
    candidate.decoder.image_embeds = embeds
    want = reference.decoder.teacher_forced(ids, len(prompt_ids))
    got = candidate.decoder.teacher_forced(ids, len(prompt_ids))
    for run, expected, actual in zip(("decoder engine first step", "decoder engine with past"), want, got):
        report.outputs.append(OutputCheck(run, "logits", batch, expected.shape, actual.shape,
                                          float(np.abs(expected - actual).max()), DECODER_ENGINE_ATOL))
    captions = candidate.generate(pixels, prompt_ids, settings)
    differing = batch if captions.shape != ids.shape else int((captions != ids).any(axis=1).sum())
    report.captions.append(CaptionCheck("greedy, tensorrt vs onnx", batch, 1, differing, gated=False))

"""`turbo export --trt`: the options, their checks before anything is written, and the engine
stage after the ONNX export validated (lint, build, validation against ONNX Runtime)."""

from dataclasses import dataclass
from pathlib import Path

from exporters.errors import TurboError, UsageError
from exporters.tensorrt.settings import (
    MIN_VERSION,
    TRT_MERGES,
    TRT_PRECISIONS,
    batch_profile,
    builder_plan,
    parse_version,
    plugin_mode,
)
from exporters.validate import HALF, Tolerance, ValidationReport, compare_runners

# TensorRT may run fp32 layers in TF32 and picks its own fused kernels; near-tied merge decisions can
# then flip as in half precision, so flipped samples are summarised, not gated (like fp16 exports).
ENGINE_TOLERANCE = {"fp32": Tolerance(1e-3, flips_allowed=True), "fp16": HALF, "bf16": Tolerance(5e-2, True),
                    "int8": Tolerance(5e-2, flips_allowed=True)}


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


def build_and_validate(options: TrtOptions, directory: Path, manifest: dict, quant: str | None,
                       cache_dir: Path) -> tuple[dict, ValidationReport | None]:
    """Lint, build model.plan into `directory`, and compare the engine with ONNX Runtime."""
    import tensorrt as trt

    from exporters.tensorrt.engine import EngineRequest, build_engine
    from graph_passes.trt_lint import lint
    from runtimes.onnxrt import OnnxRuntimeRunner
    from runtimes.tensorrt import TensorRTRunner

    onnx_path = directory / manifest["onnx"]["file"]
    errors = [f for f in lint(onnx_path) if f.severity == "error"]
    if errors:
        raise EngineError("TensorRT lint: " + "; ".join(f"{f.node or 'graph'} ({f.op_type}): {f.message}"
                                                          for f in errors))
    onnx_info = manifest["onnx"]
    profile = batch_profile(onnx_info["batch"], options.min_batch, options.opt_batch, options.max_batch)
    plan = builder_plan(parse_version(trt.__version__), options.precision, onnx_info["precision"], quant,
                        options.merge)
    engine = build_engine(EngineRequest(onnx_path, onnx_info["inputs"][0]["name"], onnx_info["image_size"], profile,
                                        plan, options.merge, options.workspace_gb, cache_dir), directory)
    if not options.validate:
        return engine, None
    report = ValidationReport(reference="onnxruntime (cpu)", candidate=f"tensorrt {trt.__version__}")
    batches = tuple(sorted({profile.minimum, max(profile.minimum, min(3, profile.maximum))}))
    compare_runners(f"tensorrt {options.precision}", OnnxRuntimeRunner(onnx_path, exact=True),
                    TensorRTRunner(directory / engine["file"]), report, onnx_info["image_size"], batches,
                    ENGINE_TOLERANCE[options.precision])
    return engine, report

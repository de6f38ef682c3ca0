"""Build a TensorRT engine from an export's ONNX: the thin layer over the TensorRT API.

Every decision (flags per version, batch profile, plugin mode, lint) comes from settings.py and
turbo.graph.trt_lint; this module only applies them. Written against the documented TensorRT
10/11 Python API; not run here (TensorRT can't be installed on our machines).
"""

import time
from dataclasses import dataclass
from pathlib import Path

import onnx
import onnx.inliner
import torch

from turbo.core.errors import TurboError
from turbo.core.files import BUILD_LOG, ENGINE_FILE
from turbo.export.tensorrt.settings import BuilderPlan, Shapes, parse_version, plugin_mode, timing_cache_name

NATIVE_ONNX = "model.native.onnx"  # the TurboMerge functions inlined, for --trt-merge native


class EngineBuildError(TurboError):
    """TensorRT could not parse or build the network."""


@dataclass(frozen=True)
class EngineRequest:
    onnx_path: Path
    shapes: dict[str, Shapes]  # every input's (min, opt, max) shape: the optimisation profile
    plan: BuilderPlan
    merge: str | None  # plugin | native; None for graphs without TurboMerge nodes (the text decoder)
    workspace_gb: float
    cache_dir: Path
    engine_file: str = ENGINE_FILE


def inline_merge_functions(onnx_path: Path, out: Path) -> Path:
    """A copy of the graph with every TurboMerge function inlined (native TensorRT layers)."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    inlined = onnx.inliner.inline_local_functions(model)
    onnx.save(inlined, str(out))  # external data keeps pointing at the export's weight file
    return out


def build_engine(request: EngineRequest, out_dir: Path) -> dict:
    """Parse, build and write the engine and its part of the build log into out_dir; returns the
    manifest entry."""
    import tensorrt as trt

    log_lines: list[str] = []

    class BuildLogger(trt.ILogger):
        def __init__(self) -> None:
            trt.ILogger.__init__(self)

        def log(self, severity, msg) -> None:
            log_lines.append(f"[{severity.name}] {msg}")

    logger = BuildLogger()
    version = parse_version(trt.__version__)
    trt.init_libnvinfer_plugins(logger, "")
    source = request.onnx_path
    if request.merge == "plugin":
        plugin_mode(version)
        import turbo.export.tensorrt.plugin  # noqa: F401  (registers turbo::TurboMerge)
    elif request.merge == "native":
        source = inline_merge_functions(request.onnx_path, request.onnx_path.parent / NATIVE_ONNX)
    builder = trt.Builder(logger)
    network_flags = 0
    for name in request.plan.network_flags + (("STRONGLY_TYPED",) if request.plan.strongly_typed and
                                              hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED") else ()):
        network_flags |= 1 << int(getattr(trt.NetworkDefinitionCreationFlag, name))
    network = builder.create_network(network_flags)
    parser = trt.OnnxParser(network, logger)
    try:
        if not parser.parse_from_file(str(source)):
            errors = "; ".join(str(parser.get_error(i).desc()) for i in range(parser.num_errors))
            raise EngineBuildError(f"TensorRT could not parse {source.name}: {errors}")
    finally:
        if source != request.onnx_path:
            source.unlink(missing_ok=True)
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(request.workspace_gb * (1 << 30)))
    for name in request.plan.builder_flags:
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in request.plan.cleared_flags:
        config.clear_flag(getattr(trt.BuilderFlag, name))
    profile = builder.create_optimization_profile()
    for name, shapes in request.shapes.items():
        profile.set_shape(name, *shapes)
    config.add_optimization_profile(profile)
    cache_path = request.cache_dir / timing_cache_name(trt.__version__, torch.cuda.get_device_name(),
                                                       torch.cuda.get_device_capability())
    reused = cache_path.exists()
    cache = config.create_timing_cache(cache_path.read_bytes() if reused else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    begin = time.perf_counter()
    serialized = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - begin
    with open(out_dir / BUILD_LOG, "a") as log:
        log.write("".join(f"{line}\n" for line in [f"== {request.engine_file} from {request.onnx_path.name}",
                                                     *log_lines]))
    if serialized is None:
        raise EngineBuildError(f"TensorRT could not build {request.engine_file}; see {out_dir / BUILD_LOG}")
    (out_dir / request.engine_file).write_bytes(bytes(serialized))
    request.cache_dir.mkdir(parents=True, exist_ok=True)
    cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    return {
        "file": request.engine_file, "build_log": BUILD_LOG, "tensorrt": trt.__version__,
        "device": torch.cuda.get_device_name(), "merge": request.merge,
        "plugin": plugin_mode(version) if request.merge == "plugin" else None,
        "builder": request.plan.to_dict(), "workspace_gb": request.workspace_gb,
        "profile": {name: [list(shape) for shape in shapes] for name, shapes in request.shapes.items()},
        "timing_cache": {"file": str(cache_path), "reused": reused}, "build_seconds": round(seconds, 1),
    }

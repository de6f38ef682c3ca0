"""Every TensorRT build decision as a pure function (tested without TensorRT): what each version
supports, the builder flags for a precision, the optimisation profiles (batch; the decoder's
sequence and past lengths), the plugin's shape rule and type combinations. `engine.py` only maps
these onto the TensorRT API."""

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx

from turbo.core.errors import UsageError

TRT_PRECISIONS = ("fp32", "fp16", "bf16", "int8")
TRT_MERGES = ("plugin", "native")
MIN_VERSION = (10, 0)
QDP_VERSION = (10, 6)  # tensorrt.plugin (quickly deployable plugins), JIT implementations
AOT_VERSION = (10, 9)  # @trtp.aot_impl: engines run without Python (trtexec, C++)
STRONGLY_TYPED_ONLY = (11, 0)  # precision flags and implicit INT8 removed; precision from the ONNX types
PLUGIN_TYPES = ("FP32", "FP16", "BF16")
DEFAULT_BATCHES = (1, 8, 64)  # min, opt, max for a dynamic-batch ONNX
MAX_PROMPT_TOKENS = 32  # decoder engines: the longest prompt ([DEC] + word pieces) their profile takes
Shapes = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # min, opt, max of one input


def parse_version(text: str) -> tuple[int, int]:
    """'10.13.2.6' -> (10, 13)."""
    parts = text.split(".")
    try:
        return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        raise ValueError(f"not a TensorRT version: {text!r}") from None


@dataclass(frozen=True)
class BuilderPlan:
    """How the network and builder config are set up for one precision on one TensorRT version."""

    strongly_typed: bool  # network flag STRONGLY_TYPED (TensorRT 10) / always (11)
    builder_flags: tuple[str, ...]  # trt.BuilderFlag names
    network_flags: tuple[str, ...]  # trt.NetworkDefinitionCreationFlag names
    note: str  # one line for the build log and manifest
    cleared_flags: tuple[str, ...] = ()  # trt.BuilderFlag names switched off (TF32 is on by default)

    def to_dict(self) -> dict:
        return asdict(self)


def builder_plan(version: tuple[int, int], precision: str, onnx_precision: str, quant: str | None,
                 merge: str) -> BuilderPlan:
    """Flags for `precision` given what the ONNX holds (fp32/fp16 graph, Q/DQ from --quant int8).

    TensorRT 11 is strongly typed: the engine runs in the ONNX's own types, so the requested
    precision must be the ONNX's. TensorRT 10 takes precision flags on top of the graph.
    """
    if precision not in TRT_PRECISIONS:
        raise UsageError(f"unknown TensorRT precision {precision!r}; choose one of {', '.join(TRT_PRECISIONS)}")
    if version < MIN_VERSION:
        raise UsageError(f"TensorRT {version[0]}.{version[1]} is too old; turbo needs 10.0 or newer")
    qdq = quant == "int8"
    if precision == "int8" and not qdq:
        raise UsageError("--precision int8 with --trt needs --quant int8 (explicit Q/DQ in the ONNX); TensorRT's "
                         "implicit INT8 calibration is deprecated (10.1) and removed (11)")
    if qdq and precision not in ("int8", "fp32"):
        raise UsageError(f"--quant int8 builds an INT8 engine; use --precision int8, not {precision}")
    precision = "int8" if qdq else precision
    if merge == "plugin" and precision == "bf16" and version < AOT_VERSION:
        raise UsageError(f"TensorRT {version[0]}.{version[1]} runs the TurboMerge plugin in Python (JIT), which cannot "
                         "hand bf16 tensors to its kernel; use TensorRT 10.9+, --precision fp16 or --trt-merge native")
    network_flags = ("PREFER_AOT_PYTHON_PLUGINS",) if merge == "plugin" and version >= AOT_VERSION else ()
    if version >= STRONGLY_TYPED_ONLY:
        graph = "int8" if qdq else onnx_precision
        if precision != graph:
            raise UsageError(f"TensorRT {version[0]}.{version[1]} is strongly typed: the engine runs in the ONNX's "
                             f"types ({onnx_precision}); export with --precision {precision}"
                             + (" (turbo exports fp32 or fp16 ONNX; bf16 needs TensorRT 10)" if precision == "bf16"
                                else ""))
        return BuilderPlan(True, (), network_flags, f"strongly typed ({graph} ONNX)")
    flags = {"fp32": (), "fp16": ("FP16",), "bf16": ("BF16",), "int8": ("INT8", "FP16")}[precision]
    if onnx_precision == "fp16" and precision == "fp32":
        raise UsageError("the ONNX is fp16; an fp32 engine needs an fp32 export")
    return BuilderPlan(False, flags, network_flags, f"precision flags {', '.join(flags) or 'none (fp32)'}")


def decoder_builder_plan(version: tuple[int, int]) -> BuilderPlan:
    """The text decoder's engines: fp32 like its ONNX whatever the encoder's precision, without
    TF32 (10-bit mantissas would move logits by ~1e-2 and flip greedy near-ties)."""
    if version < MIN_VERSION:
        raise UsageError(f"TensorRT {version[0]}.{version[1]} is too old; turbo needs 10.0 or newer")
    return BuilderPlan(version >= STRONGLY_TYPED_ONLY, (), (), "fp32 text decoder, TF32 off", ("TF32",))


@dataclass(frozen=True)
class BatchProfile:
    minimum: int
    optimum: int
    maximum: int

    def range(self) -> tuple[int, int, int]:
        return self.minimum, self.optimum, self.maximum


def batch_profile(onnx_batch: int | str, minimum: int | None, optimum: int | None,
                  maximum: int | None) -> BatchProfile:
    """The optimisation profile of the batch axis: a static ONNX batch fixes it; a dynamic one
    defaults to 1/8/64, with opt and max raised or lowered to stay ordered."""
    given = [b for b in (minimum, optimum, maximum) if b is not None]
    if any(b < 1 for b in given):
        raise UsageError("--min-batch, --opt-batch and --max-batch must be positive")
    if onnx_batch != "dynamic":
        if any(b != onnx_batch for b in given):
            raise UsageError(f"the ONNX has a static batch of {onnx_batch}; leave out --min/--opt/--max-batch "
                             "or export with --batch dynamic")
        return BatchProfile(onnx_batch, onnx_batch, onnx_batch)
    low = minimum if minimum is not None else min([DEFAULT_BATCHES[0], *given])
    high = maximum if maximum is not None else max([DEFAULT_BATCHES[2], *given])
    mid = optimum if optimum is not None else min(max(DEFAULT_BATCHES[1], low), high)
    if not low <= mid <= high:
        raise UsageError(f"the batch profile must satisfy min <= opt <= max, got {low}/{mid}/{high}")
    return BatchProfile(low, mid, high)


def onnx_input_dims(path: str | Path) -> dict[str, list[int | str]]:
    """Each graph input's dims: ints where fixed, the dim's name where dynamic ("batch", "past")."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}


def profile_shapes(inputs: dict[str, list[int | str]], ranges: dict[str, tuple[int, int, int]]) -> dict[str, Shapes]:
    """Each engine input's (min, opt, max) shape: fixed dims stay, named (dynamic) dims take
    their range, e.g. inputs {"input_ids": ["batch", "sequence"]} and ranges {"batch": (1, 8, 64), ...}."""
    unknown = sorted({d for dims in inputs.values() for d in dims if isinstance(d, str) and d not in ranges})
    if unknown:
        raise ValueError(f"no profile range for the dynamic dimension(s) {', '.join(unknown)}")
    return {name: tuple(tuple(ranges[d][k] if isinstance(d, str) else d for d in dims) for k in range(3))
            for name, dims in inputs.items()}


def decoder_ranges(rows: BatchProfile, prompt_tokens: int, max_new_tokens: int) -> dict[str, tuple[int, int, int]]:
    """Profile ranges of the decoder graphs' dynamic dims: batch (rows = images x beams), sequence
    (the first step's prompt, up to MAX_PROMPT_TOKENS) and past (cached positions while stepping)."""
    if not 1 <= prompt_tokens <= MAX_PROMPT_TOKENS:
        raise UsageError(f"decoder engines take prompts of 1 to {MAX_PROMPT_TOKENS} tokens, not {prompt_tokens}")
    longest = MAX_PROMPT_TOKENS + max_new_tokens - 2  # the last step's past (the first token needs no step)
    return {"batch": rows.range(), "sequence": (1, prompt_tokens, MAX_PROMPT_TOKENS),
            "past": (1, min(prompt_tokens + max_new_tokens // 2, longest), longest)}


def plugin_mode(version: tuple[int, int]) -> str:
    """'aot' (kernel compiled into the engine), or 'jit' (the engine needs Python and turbo at run time)."""
    if version < QDP_VERSION:
        raise UsageError(f"TensorRT {version[0]}.{version[1]} has no Python plugins (tensorrt.plugin, 10.6+); "
                         "use --trt-merge native")
    return "aot" if version >= AOT_VERSION else "jit"


def merged_tokens(tokens, r: int):
    """The plugin's output token dimension (works on ints and TensorRT shape expressions)."""
    return tokens - r


def plugin_type_combinations() -> str:
    """The AutoTuneCombination I/O types: x, size and both outputs share one float type; the
    packed index is always INT64."""
    floats = "|".join(PLUGIN_TYPES)
    index = "|".join("INT64" for _ in PLUGIN_TYPES)
    return ", ".join([floats, floats, index, floats, floats])


def timing_cache_name(version_text: str, device_name: str, capability: tuple[int, int]) -> str:
    """One timing cache per TensorRT version and GPU, reused by every build on that pair."""
    tag = hashlib.sha256(device_name.encode()).hexdigest()[:8]
    return f"timing-trt{version_text}-sm{capability[0]}{capability[1]}-{tag}.cache"

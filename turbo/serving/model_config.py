"""Triton model configurations (`config.pbtxt`), built as Triton's own protobuf message
(`ModelConfig`, shipped in tritonclient) and checked against it after writing."""

from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import text_format
from google.protobuf.message import Message

from turbo.core.errors import TurboError, UsageError

try:  # the `serve` extra; without it nothing here can run
    from tritonclient.grpc import model_config_pb2 as pb
except ImportError:  # pragma: no cover - reported by require_client
    pb = None

CONFIG_FILE = "config.pbtxt"
DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "int64": "TYPE_INT64", "int32": "TYPE_INT32",
          "bytes": "TYPE_STRING", "bool": "TYPE_BOOL"}


class ModelConfigError(UsageError):
    """A config.pbtxt Triton would refuse."""


def require_client() -> None:
    if pb is None:
        raise TurboError("tritonclient is not installed: pip install 'turbo-vlm[serve]'")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # numpy name: float32, int64, bytes, ...
    shape: tuple[int, ...]  # without the batch dim when the model batches; -1 where dynamic
    optional: bool = False


@dataclass
class Batching:
    """How Triton batches requests to one model."""

    max_batch: int = 8  # 0: the model takes whole tensors (static batch or no batch dim)
    dynamic: bool = True
    max_queue_delay_us: int = 0
    preferred: tuple[int, ...] = ()
    instances: int = 1
    kind: str = "KIND_CPU"  # KIND_GPU for engines and CUDA sessions


@dataclass
class ModelSpec:
    """One model of a repository: what runs it and its tensors."""

    name: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    batching: Batching
    platform: str = ""  # onnxruntime_onnx, tensorrt_plan
    backend: str = ""  # python
    parameters: dict[str, str] = field(default_factory=dict)
    warmup: bool = False  # one zero-filled request per instance at load
    default_model_filename: str = ""


def build_config(spec: ModelSpec) -> Message:
    """The ModelConfig message of one model."""
    require_client()
    config = pb.ModelConfig(name=spec.name, platform=spec.platform, backend=spec.backend,
                            max_batch_size=spec.batching.max_batch)
    if spec.default_model_filename:
        config.default_model_filename = spec.default_model_filename
    for tensor in spec.inputs:
        config.input.add(name=tensor.name, data_type=DTYPES[tensor.dtype], dims=list(tensor.shape),
                         optional=tensor.optional)
    for tensor in spec.outputs:
        config.output.add(name=tensor.name, data_type=DTYPES[tensor.dtype], dims=list(tensor.shape))
    batching = spec.batching
    if batching.max_batch > 0 and batching.dynamic:
        config.dynamic_batching.max_queue_delay_microseconds = batching.max_queue_delay_us
        config.dynamic_batching.preferred_batch_size.extend(batching.preferred)
    config.instance_group.add(kind=batching.kind, count=batching.instances)
    for key, value in spec.parameters.items():
        config.parameters[key].string_value = value
    if spec.warmup:
        _add_warmup(config, spec)
    return config


def _add_warmup(config: Message, spec: ModelSpec) -> None:
    """One request of zeros (batch 1 where the model batches) run by each instance before it serves."""
    warmup = config.model_warmup.add(name="zeros", batch_size=1 if spec.batching.max_batch > 0 else 0)
    for tensor in spec.inputs:
        if tensor.optional:
            continue
        if any(dim < 0 for dim in tensor.shape):
            raise ModelConfigError(f"{spec.name}: warm-up needs fixed dims, and input {tensor.name} has "
                                   f"{list(tensor.shape)}")
        warmup.inputs[tensor.name].data_type = DTYPES[tensor.dtype]
        warmup.inputs[tensor.name].dims.extend(tensor.shape)
        warmup.inputs[tensor.name].zero_data = True


def write_config(spec: ModelSpec, model_dir: Path) -> Path:
    path = model_dir / CONFIG_FILE
    path.write_text(text_format.MessageToString(build_config(spec)))
    check_config(path)
    return path


def check_config(path: Path) -> Message:
    """Parse a config.pbtxt with Triton's schema and check what the schema cannot say: a name that is
    its directory's, a platform or backend, batch dims consistent with max_batch_size, versions present."""
    require_client()
    config = pb.ModelConfig()
    try:
        text_format.Parse(path.read_text(), config)
    except text_format.ParseError as exc:
        raise ModelConfigError(f"{path}: not a Triton model config ({exc})") from None
    where = f"{path}"
    if config.name != path.parent.name:
        raise ModelConfigError(f"{where}: name {config.name!r} is not its directory's {path.parent.name!r}")
    if not (config.platform or config.backend):
        raise ModelConfigError(f"{where}: names neither a platform nor a backend")
    if config.max_batch_size < 0:
        raise ModelConfigError(f"{where}: max_batch_size {config.max_batch_size} is negative")
    for tensor in [*config.input, *config.output]:
        if not tensor.dims:
            raise ModelConfigError(f"{where}: tensor {tensor.name} has no dims")
        if tensor.data_type == pb.TYPE_INVALID:
            raise ModelConfigError(f"{where}: tensor {tensor.name} has no data type")
    if config.HasField("dynamic_batching") and config.max_batch_size == 0:
        raise ModelConfigError(f"{where}: dynamic batching needs max_batch_size > 0")
    too_big = [size for size in config.dynamic_batching.preferred_batch_size if size > config.max_batch_size]
    if too_big:
        raise ModelConfigError(f"{where}: preferred batch size {too_big[0]} exceeds max_batch_size "
                               f"{config.max_batch_size}")
    if not any(child.is_dir() and child.name.isdigit() for child in path.parent.iterdir()):
        raise ModelConfigError(f"{where}: no version directory (1/) beside it")
    return config


def check_repository(repository: Path) -> list[Message]:
    """Every model of a repository checked (check_config); a UsageError when it is not one."""
    if not repository.is_dir():
        raise UsageError(f"{repository} is not a directory; write a repository with turbo deploy triton")
    models = sorted(child for child in repository.iterdir() if child.is_dir() and not child.name.startswith("."))
    if not models:
        raise UsageError(f"{repository} holds no models; write a repository with turbo deploy triton")
    missing = [model.name for model in models if not (model / CONFIG_FILE).is_file()]
    if missing:
        raise ModelConfigError(f"{repository / missing[0]} has no {CONFIG_FILE}; it is not a Triton model")
    return [check_config(model / CONFIG_FILE) for model in models]

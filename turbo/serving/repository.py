"""A Triton model repository from turbo exports. Per export directory NAME (its folder's name):

- NAME-encoder: the (merged) vision encoder, on the onnxruntime backend, TensorRT (the export's
  engine) or the python backend (ONNX Runtime in the server's python, with turbo's merge kernel);
- NAME-decoder-first, NAME-decoder-next (captioning): the decoder's two graphs, likewise;
- NAME-prefill, NAME-decode (LLM-based VLMs): the language model's two graphs, likewise;
- NAME: the python-backend model clients call: encoded image bytes in; labels and scores out for
  classifiers, a caption for captioning, the answer to a prompt for LLM-based VLMs, the encoder's
  outputs for embedding models.
"""

import json
import re
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import onnx
import torch

from turbo.core.errors import UsageError
from turbo.core.files import ENGINE_FILE, GENERATION_FILE, MODEL_FILE
from turbo.core.manifest import Manifest
from turbo.models.adapters import CAPTIONING, CLASSIFICATION, GENERATION, Task
from turbo.models.loading import resolve_source
from turbo.models.registry import adapter_for
from turbo.serving.model_config import Batching, ModelSpec, TensorSpec, write_config

BACKENDS = ("auto", "onnxruntime", "tensorrt", "python")
PLATFORMS = {"onnxruntime": "onnxruntime_onnx", "tensorrt": "tensorrt_plan"}
ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
               onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32"}
NAME = re.compile(r"[^A-Za-z0-9_.-]+")
LABELS_FILE = "labels.json"
TOP_K = 5
SAMPLE_PROMPT = "sample_prompt"  # a model parameter: a prompt load tests may send
SHIM = """\"\"\"Written by turbo deploy triton; the model is turbo.serving.{module}.{cls}.\"\"\"
import os
import sys

# `turbo serve` names its environment's packages here (the bundled server's python stub has no site-packages)
sys.path[:0] = [path for path in os.environ.get("TURBO_PYTHONPATH", "").split(os.pathsep) if path not in sys.path]

from turbo.serving.{module} import {cls} as TritonPythonModel  # noqa: E402,F401
"""


@dataclass(frozen=True)
class DeployOptions:
    backend: str = "auto"  # auto: the export's TensorRT engine when it has one, else onnxruntime
    max_batch: int = 8
    instances: int = 1
    dynamic_batching: bool = True
    max_queue_delay_us: int = 100
    preferred_batch: tuple[int, ...] = ()
    warmup: bool = True
    threads: int = 0  # python backend: ONNX Runtime threads per instance (0: its default)


@dataclass(frozen=True)
class DeployedModel:
    """What one export became: the model clients call and the models behind it."""

    export: str
    name: str  # the model clients call (image bytes in)
    task: str
    encoder: str  # the encoder model (pixel tensors in)
    backend: str
    models: tuple[str, ...]
    batching: str  # "dynamic up to N" or why the model takes whole batches
    labels: str = ""  # where classifier labels came from


def model_name(directory: Path) -> str:
    return NAME.sub("-", directory.resolve().name).strip("-.") or "model"


def check_options(options: DeployOptions) -> None:
    if options.backend not in BACKENDS:
        raise UsageError(f"--backend must be one of {', '.join(BACKENDS)}, not {options.backend!r}")
    for flag, value, least in (("--max-batch", options.max_batch, 1), ("--instances", options.instances, 1),
                               ("--max-queue-delay-us", options.max_queue_delay_us, 0),
                               ("--threads", options.threads, 0)):
        if value < least:
            raise UsageError(f"{flag} must be at least {least}, not {value}")
    too_big = [size for size in options.preferred_batch if size < 1 or size > options.max_batch]
    if too_big:
        raise UsageError(f"--preferred-batch {too_big[0]} is outside 1..--max-batch {options.max_batch}")


def deploy_export(directory: Path, manifest: Manifest, repository: Path, options: DeployOptions) -> DeployedModel:
    """Write the models of one verified export into `repository` (a staging directory)."""
    name, encoder = model_name(directory), f"{model_name(directory)}-encoder"
    task = adapter_for(manifest.model.architecture).task_of(manifest.model.architecture)
    backend = _backend(directory, manifest, options)
    static = manifest.onnx.static_batch
    facts = {"turbo_r": str(manifest.turbo.r_requested), "turbo_export": str(directory.resolve()),
             "turbo_flops_bound": str(manifest.plan.speedup_bound)}  # read by turbo bench --url
    inputs, outputs = _tensors(manifest.onnx.inputs, not static), _tensors(manifest.onnx.outputs, not static)
    alone = bool(manifest.onnx.output_tokens.decided)  # a batch's images would share the fewest's token count
    batching = Batching(max_batch=0 if static else 1 if alone else options.max_batch, dynamic=options.dynamic_batching,
                        max_queue_delay_us=options.max_queue_delay_us, preferred=options.preferred_batch,
                        instances=options.instances, kind="KIND_GPU" if backend == "tensorrt" else "KIND_CPU")
    _graph_model(repository / encoder, directory, manifest.onnx.file, inputs, outputs, batching, backend, options,
                 engine=manifest.tensorrt.file if backend == "tensorrt" else None, facts=facts)
    client = Batching(max_batch=options.max_batch, dynamic=options.dynamic_batching,
                      max_queue_delay_us=options.max_queue_delay_us, preferred=options.preferred_batch,
                      instances=options.instances)  # the image-bytes model batches even over a static encoder
    parameters = {**facts, "channels": str(manifest.onnx.pixel_shape[0]), "static_batch": str(static or 0),
                  "encoder_max_batch": str(batching.max_batch)}
    labels = ""
    if task == CAPTIONING:
        models = _caption_models(repository, name, directory, manifest, backend, options, encoder, inputs, outputs,
                                 client, parameters)
    elif task == GENERATION:
        models = _generation_models(repository, name, directory, manifest, backend, options, encoder, inputs,
                                    outputs, client, parameters)
    else:
        parameters.update(encoder=encoder, encoder_input=inputs[0].name,
                          encoder_outputs=json.dumps([t.name for t in outputs]))
        labels = _image_model(repository / name, directory, manifest, task, outputs, static, client, parameters)
        models = [name]
    described = (f"dynamic, up to {options.max_batch} per batch" if not static and not alone else
                 f"one image per batch to {encoder}: MustDrop's spatial merge decides each image's token count"
                 if alone else
                 f"static batch {static}: max_batch_size 0, clients send {static} images per request to {encoder}; "
                 f"{name} pads smaller requests")
    return DeployedModel(str(directory), name, task.name, encoder, backend, (encoder, *models), described, labels)


def _image_model(model_dir: Path, directory: Path, manifest: Manifest, task: Task, encoder_outputs: list[TensorSpec],
                 static: int | None, batching: Batching, parameters: dict[str, str]) -> str:
    """Image bytes -> top-k labels (classifiers) or the encoder's outputs; where labels came from."""
    _assets(model_dir, directory, [manifest.image_processor.file])
    if task != CLASSIFICATION:
        outputs = [TensorSpec(t.name, t.dtype, t.shape[1:] if static else t.shape) for t in encoder_outputs]
        _python_model(model_dir, "ImageModel", [TensorSpec("image", "bytes", (1,))], outputs, batching, parameters)
        return ""
    classes = encoder_outputs[0].shape[-1]
    labels, origin = _labels(manifest, classes)
    (model_dir / "1" / LABELS_FILE).write_text(json.dumps(labels))
    top_k = min(TOP_K, classes)
    outputs = [TensorSpec("labels", "bytes", (top_k,)), TensorSpec("classes", "int64", (top_k,)),
               TensorSpec("scores", "float32", (top_k,))]
    _python_model(model_dir, "ImageModel", [TensorSpec("image", "bytes", (1,))], outputs, batching,
                  {**parameters, "labels_file": LABELS_FILE, "top_k": str(top_k)})
    return origin


def _backend(directory: Path, manifest: Manifest, options: DeployOptions) -> str:
    engine = manifest.tensorrt
    has_engine = bool(engine and engine.built and engine.file)
    if options.backend == "tensorrt" and not has_engine:
        reason = engine.reason if engine and engine.reason else "it was exported without --trt"
        raise UsageError(f"{directory} has no TensorRT engine ({reason}); deploy it with --backend onnxruntime or "
                         "python, or re-export with --trt")
    if options.backend in ("auto", "tensorrt") and has_engine:
        _check_engine(directory, engine.build)
        return "tensorrt"
    return "onnxruntime" if options.backend == "auto" else options.backend


def _check_engine(directory: Path, build: dict) -> None:
    """Refuse an engine Triton's TensorRT backend cannot run: one whose TurboMerge plugin runs in
    Python (built on TensorRT before 10.9), or one built for another GPU than this machine's (when
    it has one to compare with: the serving machine usually is the deploying one)."""
    if build.get("plugin") == "jit":
        raise UsageError(f"{directory}'s engine runs its TurboMerge plugin in Python (TensorRT "
                         f"{build.get('tensorrt', '?')}, before 10.9), which Triton's TensorRT backend cannot load; "
                         "re-export with --trt-merge native, or deploy with --backend onnxruntime")
    built_for = build.get("device")
    here = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    if here and built_for and here != built_for:
        raise UsageError(f"{directory}'s TensorRT engine was built for {built_for}, this machine has {here}: "
                         "re-export with --trt here, or deploy with --backend onnxruntime")


def _tensors(records: list[dict], batched: bool) -> list[TensorSpec]:
    """Manifest tensors (name, shape with "batch" or a static size first, dtype) as Triton dims."""
    specs = []
    for record in records:
        shape = [dim if isinstance(dim, int) else -1 for dim in record["shape"]]
        specs.append(TensorSpec(record["name"], record["dtype"], tuple(shape[1:] if batched else shape)))
    return specs


def _graph_tensors(path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """An ONNX graph's inputs and outputs with every dim (dynamic ones -1), for max_batch_size 0."""
    graph = onnx.load(str(path), load_external_data=False).graph

    def spec(value) -> TensorSpec:
        tensor = value.type.tensor_type
        dims = tuple(dim.dim_value if dim.HasField("dim_value") else -1 for dim in tensor.shape.dim)
        return TensorSpec(value.name, ONNX_DTYPES[tensor.elem_type], dims)

    return [spec(v) for v in graph.input], [spec(v) for v in graph.output]


def _external_files(path: Path) -> list[str]:
    """The external-data files an ONNX file reads (relative names)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    names = {entry.value for tensor in graph.initializer for entry in tensor.external_data if entry.key == "location"}
    return sorted(names)


def _graph_model(model_dir: Path, directory: Path, onnx_file: str, inputs: list[TensorSpec],
                 outputs: list[TensorSpec], batching: Batching, backend: str, options: DeployOptions,
                 engine: str | None = None, facts: dict[str, str] | None = None) -> None:
    version = model_dir / "1"
    version.mkdir(parents=True)
    if backend == "tensorrt":
        shutil.copy2(directory / engine, version / ENGINE_FILE)
    else:
        shutil.copy2(directory / onnx_file, version / MODEL_FILE)
        for name in _external_files(directory / onnx_file):
            shutil.copy2(directory / name, version / name)
    warmup = options.warmup and all(dim > 0 for tensor in inputs for dim in tensor.shape)
    if backend == "python":
        (version / "model.py").write_text(SHIM.format(module="graph_model", cls="GraphModel"))
        spec = ModelSpec(model_dir.name, inputs, outputs, batching, backend="python", warmup=warmup,
                         parameters={**(facts or {}), "onnx_file": MODEL_FILE, "threads": str(options.threads)})
    else:
        spec = ModelSpec(model_dir.name, inputs, outputs, batching, platform=PLATFORMS[backend], warmup=warmup,
                         default_model_filename=ENGINE_FILE if backend == "tensorrt" else MODEL_FILE,
                         parameters=facts or {})
    write_config(spec, model_dir)


def _python_model(model_dir: Path, cls: str, inputs: list[TensorSpec], outputs: list[TensorSpec],
                  batching: Batching, parameters: dict[str, str]) -> None:
    version = model_dir / "1"
    version.mkdir(parents=True, exist_ok=True)
    (version / "model.py").write_text(SHIM.format(module="pipeline_models", cls=cls))
    write_config(ModelSpec(model_dir.name, inputs, outputs, batching, backend="python", parameters=parameters),
                 model_dir)


def _assets(model_dir: Path, directory: Path, files: list[str]) -> None:
    version = model_dir / "1"
    version.mkdir(parents=True, exist_ok=True)
    for name in files:
        shutil.copy2(directory / name, version / name)


def _labels(manifest: Manifest, classes: int) -> tuple[list[str], str]:
    """The checkpoint's id2label, or the class indices when its config cannot be read any more."""
    try:
        config = resolve_source(manifest.model.name, tiny=manifest.model.tiny).config
        labels = [str(config.id2label[i]) for i in range(classes)]
        return labels, f"the config of {manifest.model.name}"
    except Exception:  # noqa: BLE001 - the checkpoint may be gone; the labels are then the indices
        return [str(i) for i in range(classes)], f"class indices ({manifest.model.name}'s config is not available)"


def _caption_models(repository: Path, name: str, directory: Path, manifest: Manifest, backend: str,
                    options: DeployOptions, encoder: str, encoder_inputs: list[TensorSpec],
                    encoder_outputs: list[TensorSpec], batching: Batching, common: dict[str, str]) -> list[str]:
    decoder = manifest.decoder
    graph_backend = "python" if backend == "python" else "onnxruntime"  # decoder engines are driven by turbo caption
    whole = Batching(max_batch=0, dynamic=False, instances=options.instances)
    graphs = {"encoder": {"model": encoder, "inputs": [encoder_inputs[0].name],
                          "outputs": [encoder_outputs[0].name]}}
    for key, file, suffix in (("first_step", decoder.first_step, "first"), ("with_past", decoder.with_past, "next")):
        inputs, outputs = _graph_tensors(directory / file)
        model = f"{name}-decoder-{suffix}"
        _graph_model(repository / model, directory, file, inputs, outputs, whole, graph_backend, options)
        graphs[key] = {"model": model, "inputs": [t.name for t in inputs], "outputs": [t.name for t in outputs]}
    pipeline = repository / name
    _assets(pipeline, directory, [manifest.image_processor.file, GENERATION_FILE, decoder.first_step,
                                  decoder.with_past, *_tokenizer_files(manifest)])
    record = {key: getattr(decoder, key) for key in decoder.__dataclass_fields__}
    parameters = {**common, "graphs": json.dumps(graphs), "decoder_record": json.dumps(record)}
    _python_model(pipeline, "CaptionModel", [TensorSpec("image", "bytes", (1,)),
                                             TensorSpec("prompt", "bytes", (1,), optional=True)],
                  [TensorSpec("caption", "bytes", (1,))], batching, parameters)
    return [graphs["first_step"]["model"], graphs["with_past"]["model"], name]


def _generation_models(repository: Path, name: str, directory: Path, manifest: Manifest, backend: str,
                       options: DeployOptions, encoder: str, encoder_inputs: list[TensorSpec],
                       encoder_outputs: list[TensorSpec], batching: Batching, common: dict[str, str]) -> list[str]:
    """An LLM-based VLM: its prefill and decode graphs, taking whole requests (batch 1, dynamic
    lengths), and the python model answering a prompt about an image with them and the encoder."""
    llm = manifest.llm
    graph_backend = "python" if backend == "python" else "onnxruntime"
    whole = Batching(max_batch=0, dynamic=False, instances=options.instances)
    graphs = {"encoder": {"model": encoder, "inputs": [encoder_inputs[0].name],
                          "outputs": [t.name for t in encoder_outputs]}}
    for key, file in (("prefill", llm.prefill), ("decode", llm.decode)):
        inputs, outputs = _graph_tensors(directory / file)
        model = f"{name}-{key}"
        _graph_model(repository / model, directory, file, inputs, outputs, whole, graph_backend, options)
        graphs[key] = {"model": model, "inputs": [t.name for t in inputs], "outputs": [t.name for t in outputs]}
    pipeline = repository / name
    _assets(pipeline, directory, [manifest.image_processor.file, *_tokenizer_files(manifest)])
    question = adapter_for(manifest.model.architecture).language_model.question_prompt
    parameters = {**common, "graphs": json.dumps(graphs), "llm_record": json.dumps(asdict(llm)),
                  SAMPLE_PROMPT: question.replace("{question}", "What is in the image?")}  # for turbo bench --url
    _python_model(pipeline, "GenerateModel", [TensorSpec("image", "bytes", (1,)), TensorSpec("prompt", "bytes", (1,)),
                                              TensorSpec("max_new_tokens", "int32", (1,), optional=True)],
                  [TensorSpec("text", "bytes", (1,))], batching, parameters)
    return [graphs["prefill"]["model"], graphs["decode"]["model"], name]


def _tokenizer_files(manifest: Manifest) -> list[str]:
    """The files its tokenizer was saved as (they are among the export's verified files)."""
    prefixes = ("tokenizer", "special_tokens", "vocab", "merges", "added_tokens", "chat_template")
    return [file for file in manifest.files if file.startswith(prefixes)]

"""turbo.json: everything needed to reproduce and trust an export, as one typed record.

This module is the one place that knows the file's keys (docs/reference/manifest.md): the export
pipeline builds a `Manifest` and writes it, every reader gets one from `read_export_manifest`.
`SCHEMA_VERSION` counts incompatible changes. A manifest without `schema_version` is version 1,
written before the schema was versioned with the same keys, and still loads; a newer version, or
a manifest missing a part turbo needs, is refused with one line saying how to re-export.
"""

import json
import math
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

from turbo.core.errors import UsageError
from turbo.core.files import MANIFEST_FILE

SCHEMA_VERSION = 3
PACKAGES = {"turbo": "turbo-vlm", "torch": "torch", "transformers": "transformers", "onnx": "onnx",
            "onnxscript": "onnxscript", "onnxruntime": "onnxruntime"}
Json = dict[str, Any]


class ManifestError(UsageError):
    """turbo.json is missing, unreadable, from a newer turbo, or lacks what turbo needs."""


@dataclass
class ModelRecord:
    name: str
    source: str  # the registry's hub id, a hub id or a local directory
    architecture: str  # transformers class name
    revision: str | None = None  # the hub commit (real weights)
    random_weights: bool = False
    tiny: bool = False
    seed: int | None = None  # random weights only


@dataclass
class TurboRecord:
    method: str
    alpha: float
    fusion: str
    threshold: int
    schedule: str | list[int]
    r_requested: int
    merge_kernel: str
    r_auto: Json | None = None  # how `--r auto` chose r
    merge_auto: Json | None = None  # how `--method auto` / `--alpha auto` chose the merge: every candidate's scores


@dataclass
class PlanRecord:
    """The token plan as merging.plan.TokenPlan.to_dict writes it."""

    method: str
    threshold: int
    r: list[int]  # per layer
    tokens_in: int
    final_tokens: int
    flops: int
    baseline_flops: int
    speedup_bound: float
    clamped_layers: list[int]
    layers: list[Json]
    protected_tokens: int = 1  # leading tokens never merged (manifests before other families: CLS only)

    @property
    def merges(self) -> bool:
        return any(self.r)


@dataclass(frozen=True)
class OutputTokens:
    """How many tokens each (B, N, C) output of the image encoder holds: the plan's final tokens,
    less those some outputs leave out (LLaVA's features drop the CLS), or a count the merge does
    not change (BLIP-2's Q-Former queries)."""

    excluded: dict[str, int] = field(default_factory=dict)
    fixed: dict[str, int] = field(default_factory=dict)
    decided: tuple[str, ...] = ()  # outputs whose count the graph decides per image (MustDrop's spatial merge)

    def expected(self, name: str, final_tokens: int) -> int | None:
        """The token dim output `name` should have; None: a run-time axis, decided per image."""
        if name in self.decided:
            return None
        return self.fixed.get(name, final_tokens - self.excluded.get(name, 0))

    def holds(self, name: str, dim: int | str, final_tokens: int) -> bool:
        """Whether a token dim `dim` (a name where it is a run-time axis) is what output `name` should have."""
        expected = self.expected(name, final_tokens)
        return isinstance(dim, str) if expected is None else dim == expected


@dataclass
class OnnxRecord:
    file: str
    opset: int
    precision: str
    batch: int | str  # a static batch, or "dynamic"
    image_size: int | list[int]  # [height, width] (one int: square, manifests before non-square inputs)
    inputs: list[Json]  # name, shape, dtype
    outputs: list[Json]
    merge_r: list[int]  # r of every merge block found in the graph
    merge_blocks: int
    external_data: list[str] = field(default_factory=list)
    merge_op: str = "inline"  # exports made before TurboMerge function nodes have inline ops
    nodes: int = 0
    turbo_merge_nodes: int = 0
    op_counts: dict[str, int] = field(default_factory=dict)
    excluded_tokens: dict[str, int] = field(default_factory=dict)  # outputs without some final tokens (LLaVA's CLS)
    fixed_tokens: dict[str, int] = field(default_factory=dict)  # outputs the merge leaves alone (BLIP-2's queries)
    decided_tokens: list[str] = field(default_factory=list)  # outputs MustDrop's spatial merge sizes per image

    @property
    def output_tokens(self) -> OutputTokens:
        return OutputTokens(self.excluded_tokens, self.fixed_tokens, tuple(self.decided_tokens))

    @property
    def static_batch(self) -> int | None:
        return self.batch if isinstance(self.batch, int) else None

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one input image, as the graph takes it."""
        channels, height, width = self.inputs[0]["shape"][1:]
        return channels, height, width


@dataclass
class ImageProcessorRecord:
    file: str
    origin: str  # where it came from: the checkpoint, or the family's default


@dataclass
class DecoderRecord:
    """A captioning export's text decoder graphs (or a VQA export's answer decoder) and what they
    were built with."""

    first_step: str
    with_past: str
    weights: str
    image_tokens: int | None  # the image tokens it cross-attends to; None: it reads the question
    layers: int
    heads: int
    vocab_size: int
    precision: str
    prompt: str
    generation_config: str
    weights_bytes: int = 0
    shared_bytes: int = 0
    tokenizer: Json = field(default_factory=dict)  # origin: the checkpoint's, or a placeholder vocabulary
    max_positions: int | None = None  # prompt plus caption tokens the decoder can take (None: not recorded)

    @property
    def files(self) -> list[str]:
        return [self.first_step, self.with_past, self.weights, self.generation_config]


@dataclass
class TextRecord:
    """A retrieval export's text encoder: texts padded to `max_length` tokens -> embeddings in the
    space of the image embeddings; similarity logits are `logit_scale` times their cosine."""

    file: str
    max_length: int
    embed_dim: int
    logit_scale: float
    precision: str
    tokenizer: Json = field(default_factory=dict)  # origin: the checkpoint's, or a placeholder vocabulary
    match_file: str | None = None  # the image-text matching head (BLIP's ITM), when the model has one
    image_tokens: int | None = None  # the image tokens it reads (the plan's final tokens)

    @property
    def files(self) -> list[str]:
        return [self.file] + ([self.match_file] if self.match_file else [])


@dataclass
class QuestionRecord:
    """A VQA export's question encoder: questions (B, L), L up to `max_length`, read with
    cross-attention over the merged image tokens -> question states the answer decoder reads."""

    file: str
    max_length: int
    image_tokens: int  # the image tokens it reads (the plan's final tokens)
    precision: str
    tokenizer: Json = field(default_factory=dict)  # origin: the checkpoint's, or a placeholder vocabulary

    @property
    def files(self) -> list[str]:
        return [self.file]


@dataclass
class CalibrationRecord:
    source: str  # an image folder, a datasets directory, a captions file, or "synthetic"
    count: int
    seed: int
    synthetic: bool = False
    available: int | None = None  # samples the source holds
    images: str | None = None  # image root of a captions file
    captions: bool = False  # calibrated on captions (the decoder's text)


@dataclass
class QuantizationRecord:
    mode: str  # gptq-int4 | gptq-int8 | rtn-int4 | int8
    bits: int
    method: str
    group_size: int | None
    act_order: bool
    calibration: CalibrationRecord
    format: str
    heads: bool = False  # the classifier / LM head quantized too
    quantized_linears: int | None = None
    decoder: Json | None = None
    layers: list[Json] = field(default_factory=list)
    quality: list[Json] = field(default_factory=list)


@dataclass
class TensorRTRecord:
    """The `--trt` stage: `built` with the engine's file and build facts, or why not."""

    built: bool
    reason: str | None = None
    file: str | None = None
    decoder: Json | None = None  # the decoder engines: built, reason, engines, ranges
    build: Json = field(default_factory=dict)  # version, device, flags, profile, validation, ...

    def to_dict(self) -> Json:
        known = {"built": self.built, "reason": self.reason, "file": self.file, "decoder": self.decoder}
        return {**{key: value for key, value in known.items() if value is not None}, **self.build}

    @classmethod
    def from_dict(cls, data: Json, where: str) -> "TensorRTRecord":
        record = _record(cls, {key: data[key] for key in ("built", "reason", "file", "decoder") if key in data}, where)
        record.build = {key: value for key, value in data.items() if key not in ("built", "reason", "file", "decoder")}
        return record


@dataclass
class LanguageModelRecord:
    """An LLM-based VLM's language model: its prefill and decode graphs, what they were built with,
    and the image tokens each of its layers keeps."""

    prefill: str
    decode: str
    weights: str
    image_tokens: int  # image tokens the prefill reads (the vision merge's output)
    image_per_layer: list[int]  # image tokens each layer keeps in its KV cache
    llm_drop: str  # the reduction inside the language model, as --llm-drop takes it
    layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    image_token_id: int
    eos_token_id: int | None
    image_first: bool = False  # the image goes before the prompt, which has no placeholder (BLIP-2)
    precision: str = "fp32"
    tokenizer: Json = field(default_factory=dict)  # origin: the checkpoint's, or a placeholder vocabulary
    weights_bytes: int = 0
    shared_bytes: int = 0

    @property
    def files(self) -> list[str]:
        return [self.prefill, self.decode, self.weights]


@dataclass
class Manifest:
    status: str  # passed | failed | not validated
    model: ModelRecord
    turbo: TurboRecord
    plan: PlanRecord
    onnx: OnnxRecord
    image_processor: ImageProcessorRecord
    validation: Json  # the ValidationReport's dict, or {"skipped": true}
    versions: dict[str, str | None]
    command: str
    started: str
    finished: str
    stage_seconds: dict[str, float]
    decoder: DecoderRecord | None = None
    text: TextRecord | None = None
    question: QuestionRecord | None = None
    quantization: QuantizationRecord | None = None
    tensorrt: TensorRTRecord | None = None
    llm: LanguageModelRecord | None = None
    files: dict[str, Json] = field(default_factory=dict)  # every file's "bytes" and "sha256" (core/integrity.py)
    schema_version: int = SCHEMA_VERSION

    @property
    def failed(self) -> bool:
        return self.status == "failed"

    def to_dict(self) -> Json:
        data = {"schema_version": self.schema_version}
        for item in fields(self):
            if item.name == "schema_version":
                continue
            value = getattr(self, item.name)
            if value is None and item.name in ("decoder", "text", "question", "quantization", "tensorrt", "llm"):
                continue
            data[item.name] = _plain(value)
        return data

    @classmethod
    def from_dict(cls, data: Any, where: str = MANIFEST_FILE) -> "Manifest":
        if not isinstance(data, dict):
            raise ManifestError(f"{where} is not a turbo manifest (a JSON object); re-export the directory")
        version = data.get("schema_version", 1)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise ManifestError(f"{where} has schema version {version}, newer than this turbo's {SCHEMA_VERSION}; "
                                "upgrade turbo or re-export the directory with this one")
        return _record(cls, {**data, "schema_version": SCHEMA_VERSION}, where)


def _plain(value: Any) -> Any:
    """A record as JSON-ready dicts and lists, in field order (ModelRecord leaves out an unset seed)."""
    if isinstance(value, TensorRTRecord):
        return value.to_dict()
    if hasattr(value, "__dataclass_fields__"):
        data = {item.name: _plain(getattr(value, item.name)) for item in fields(value)}
        if isinstance(value, ModelRecord) and value.seed is None:
            del data["seed"]
        return data
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _record(cls: type, data: Any, where: str) -> Any:
    """`cls` from `data`, checked: every field without a default present, each of its type."""
    hints = typing.get_type_hints(cls)
    if not isinstance(data, dict):
        raise ManifestError(f"{where} is not a {cls.__name__}; re-export the directory")
    values = {}
    for item in fields(cls):
        if item.name not in data:
            if item.default is MISSING and item.default_factory is MISSING:
                raise ManifestError(f"{where} lacks {item.name}; re-export the directory")
            continue
        values[item.name] = _value(hints[item.name], data[item.name], f"{where}: {item.name}")
    return cls(**values)


def _value(hint: Any, value: Any, where: str) -> Any:
    """`value` as `hint` (a record, a plain type, a union of them); a ManifestError when it is not."""
    options = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union \
        else (hint,)
    if value is None and type(None) in options:
        return None
    for option in options:
        if option is type(None):
            continue
        if hasattr(option, "from_dict"):
            if isinstance(value, dict):
                return option.from_dict(value, where)
        elif hasattr(option, "__dataclass_fields__"):
            if isinstance(value, dict):
                return _record(option, value, where)
        elif _is(value, option):
            return value
    raise ManifestError(f"{where} is {type(value).__name__}, not {_name(hint)}; re-export the directory")


def _is(value: Any, kind: Any) -> bool:
    """Whether `value` is of the plain type or generic `kind` (list[int], dict[str, Any], ...),
    elements included."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin is list:
        return isinstance(value, list) and all(_is(item, args[0]) for item in value)
    if origin is dict:
        return isinstance(value, dict) and all(_is(k, args[0]) and _is(v, args[1]) for k, v in value.items())
    if origin is not None and (origin is types.UnionType or origin is typing.Union):
        return any(_is(value, arg) for arg in args)
    if kind is type(None):
        return value is None
    if kind is Any:
        return True
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def _name(hint: Any) -> str:
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))


def finite(value: Any) -> Any:
    """`value` with every non-finite float (NaN, ±inf) as None: strict JSON has no such numbers."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def versions() -> dict[str, str | None]:
    found = {}
    for name, distribution in PACKAGES.items():
        try:
            found[name] = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def write_manifest(directory: Path, manifest: Manifest) -> Path:
    path = directory / MANIFEST_FILE
    path.write_text(json.dumps(finite(manifest.to_dict()), indent=2, allow_nan=False) + "\n")
    return path


def read_export_manifest(directory: str | Path) -> Manifest:
    """An export directory's turbo.json; a ManifestError (one line) when DIR is not an export or
    its manifest is unreadable, from a newer turbo, or incomplete."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise ManifestError(f"{directory} has no {MANIFEST_FILE}: not a turbo export directory")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ManifestError(f"{path} is not readable JSON ({exc}); re-export the directory") from None
    return Manifest.from_dict(data, str(path))

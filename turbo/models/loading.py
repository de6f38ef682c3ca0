"""Resolve a model name, HF id or local directory to a config, and load it (weights or random)."""

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import transformers
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.utils import logging as hub_logging
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer
from transformers.utils import logging as transformers_logging

from turbo.core.errors import ModelLoadError, UsageError, describe_error
from turbo.core.integrity import file_record
from turbo.merging.matching import CLS_METHODS, METHODS
from turbo.models.adapters import FamilyAdapter, as_pair
from turbo.models.registry import (
    ADAPTERS,
    BY_MODEL_TYPE,
    FAMILIES,
    REGISTRY,
    UNSUPPORTED_FAMILIES,
    ModelSpec,
    list_models,
    supported_architectures,
    supported_families,
)

PROCESSOR_CONFIG = "preprocessor_config.json"


@dataclass
class ModelSource:
    """A model resolved without loading weights."""

    name: str  # registry name, HF id or directory as the user gave it
    location: str  # HF id or local path that weights come from
    architecture: str
    config: object  # transformers PretrainedConfig
    spec: ModelSpec | None
    processor_size: tuple[int, int] | None = None  # the output size of its image processor, when it has one

    @property
    def adapter(self) -> FamilyAdapter:
        return ADAPTERS[self.architecture]

    @property
    def input_size(self) -> tuple[int, int]:
        """The default export size: its image processor's output size, else the config's image size."""
        return self.processor_size or self.adapter.image_size(self.config)

    @property
    def method(self) -> str:
        """The default merge method: the registry's, else turbo, or tome for a model without CLS."""
        if self.spec:
            return self.spec.method
        return "turbo" if self.adapter.has_cls_token(self.config) else "tome"

    @property
    def default_r(self) -> int:
        return self.spec.default_r if self.spec else 0

    @property
    def alpha(self) -> float:
        return self.spec.alpha if self.spec else 5.0

    @property
    def threshold(self) -> int:
        return self.spec.threshold if self.spec else 0


def _config_from_dict(values: dict, where: str = "the registry") -> object:
    values = dict(values)
    try:
        return AutoConfig.for_model(values.pop("model_type"), **values)
    except Exception as exc:  # transformers' strict fields: a wrong type or value names the field
        reason = " ".join(str(exc).split())[:240]  # the field and the expected type span lines
        raise UsageError(f"{where}: config.json is not a valid config ({reason}); fix the field it names") from None


def _check_architecture(name: str, values: dict) -> str:
    """The config's architecture, or its family's base model when it names none; a UsageError
    naming the family and the supported ones otherwise."""
    architecture, model_type = (values.get("architectures") or [None])[0], values.get("model_type")
    if architecture in ADAPTERS:
        return architecture
    families = f"supported families: {', '.join(supported_families())} (registry: {', '.join(list_models())})"
    if model_type in UNSUPPORTED_FAMILIES:
        raise UsageError(f"{name}: {model_type} models cannot be merged: {UNSUPPORTED_FAMILIES[model_type]}; "
                         + families)
    if architecture is None and model_type in BY_MODEL_TYPE:
        return BY_MODEL_TYPE[model_type].architectures[-1]
    if model_type in BY_MODEL_TYPE:
        raise UsageError(f"{name}: {architecture} is not supported (family {BY_MODEL_TYPE[model_type].family} "
                         f"supports {', '.join(BY_MODEL_TYPE[model_type].architectures)}); " + families)
    raise UsageError(f"{name}: architecture {architecture or 'unknown'} (model_type {model_type or 'unknown'}) is "
                     f"not supported; {families}; architectures: {', '.join(supported_architectures())}")


def processor_output_size(values: dict) -> tuple[int, int] | None:
    """The fixed (height, width) an image processor config produces: its crop, or a fixed resize;
    None when its output follows each image's aspect ratio (a shortest-edge resize, no crop)."""
    if values.get("do_center_crop") and isinstance(values.get("crop_size"), (dict, int)):
        crop = values["crop_size"]
        return as_pair(crop) if isinstance(crop, int) else (int(crop["height"]), int(crop["width"]))
    size = values.get("size")
    if isinstance(size, dict) and "height" in size and "width" in size and values.get("do_resize", True):
        return int(size["height"]), int(size["width"])
    return None


def _processor_size(location: Path | str) -> tuple[int, int] | None:
    """The output size of a local directory's or a cached hub model's image processor config."""
    if isinstance(location, Path):
        path = location / PROCESSOR_CONFIG
    else:
        cached = try_to_load_from_cache(location, PROCESSOR_CONFIG)
        path = Path(cached) if isinstance(cached, str) else None
    if path is None or not path.is_file():
        return None
    try:
        return processor_output_size(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{path}: not a readable image processor config ({exc.__class__.__name__}); fix or "
                         "remove it") from None


def resolve_source(model: str, tiny: bool = False) -> ModelSource:
    """A registry name, a local directory with config.json, or a Hugging Face id (cached config)."""
    if tiny and model not in REGISTRY:
        raise UsageError(f"--tiny needs a registry model ({', '.join(list_models())}), not {model!r}")
    if model in REGISTRY:
        spec = REGISTRY[model]
        values = _merge(spec.config, spec.tiny_overrides) if tiny else spec.config
        config = _config_from_dict(values)
        config.architectures = [spec.architecture]
        size = as_pair(spec.input_size) if spec.input_size and not tiny else None
        return ModelSource(model, spec.hf_id, spec.architecture, config, spec, size)
    path = Path(model)
    if path.exists():
        config_file = path / "config.json"
        try:
            values = json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"{model}: cannot read {config_file.name} ({exc.__class__.__name__}); "
                             "a model directory needs a transformers config.json") from None
        architecture = _check_architecture(model, values)
        config = _config_from_dict({"model_type": ADAPTERS[architecture].model_types[0], **values}, model)
        config.architectures = [architecture]
        location = str(path.resolve())  # recorded absolute: the export is usable from any directory
        return _checked(ModelSource(location, location, architecture, config, None, _processor_size(path)))
    if model.startswith(("/", ".", "~")) or model.count("/") > 1:
        raise UsageError(f"{model}: no such model directory (a Hugging Face id is org/name)")
    if "/" not in model:
        raise UsageError(f"unknown model {model!r}; use one of {', '.join(list_models())}, "
                         "a Hugging Face id (org/name) or a local model directory")

    try:
        config = from_cache_or_hub(AutoConfig.from_pretrained, model)
    except Exception as exc:  # hub, cache and parse errors all mean the same to the user
        raise ModelLoadError(f"{model}: cannot get its config ({_reason(exc)}); {_cache_hint(model, False)}; "
                              f"registry names work offline: {', '.join(list_models())}") from None
    architecture = _check_architecture(model, {"architectures": config.architectures, "model_type": config.model_type})
    config.architectures = [architecture]
    return _checked(ModelSource(model, model, architecture, config, None, _processor_size(model)))


def _checked(source: ModelSource) -> ModelSource:
    """The source, or a UsageError when its family cannot take this config's variant."""
    problem = source.adapter.config_problem(source.config)
    if problem:
        raise UsageError(f"{source.name}: {problem}")
    return source


def _merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def from_cache_or_hub(load: Callable, location: str):
    """The local cache first (instant); the hub only when not offline, without its retry chatter."""
    try:
        return load(location, local_files_only=True)
    except Exception:
        if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
            raise

    level = hub_logging.get_verbosity()
    hub_logging.set_verbosity_error()
    try:
        return load(location)
    finally:
        hub_logging.set_verbosity(level)


def _reason(exc: Exception) -> str:
    return describe_error(exc, limit=160)


def _cache_hint(hf_id: str, random_weights_help: bool = True) -> str:
    hint = (f"download it on a connected machine (`hf download {hf_id}`) into the Hugging Face cache "
            "(HF_HOME, default ~/.cache/huggingface; set HF_HUB_OFFLINE=1 to use only the cache) "
            "or pass a local directory")
    if random_weights_help:
        hint += "; or pass --random-weights for export and speed work (never for accuracy)"
    return hint


def load_model(source: ModelSource, random_weights: bool = False, seed: int = 0) -> nn.Module:
    """The model in eval mode. Never falls back to random weights on its own."""

    model_class = getattr(transformers, source.architecture)
    if random_weights:
        source.adapter.prepare_random_config(source.config)
        torch.manual_seed(seed)
        model = model_class(source.config)
        source.adapter.init_random_weights(model)
    else:
        shown = transformers_logging.is_progress_bar_enabled()
        transformers_logging.disable_progress_bar()  # turbo reports its own progress, on stderr
        try:
            model, info = from_cache_or_hub(partial(model_class.from_pretrained, output_loading_info=True),
                                            source.location)
        except Exception as exc:  # missing files, no network, corrupt weights
            raise ModelLoadError(
                f"cannot load weights for {source.name} from {source.location} ({_reason(exc)}); "
                + _cache_hint(source.location)
            ) from None
        finally:
            if shown:
                transformers_logging.enable_progress_bar()
        _drop_missing_parts(model, source, info)
    return model.eval()


def _drop_missing_parts(model: nn.Module, source: ModelSource, info: dict) -> None:
    """Remove the optional parts the checkpoint lacks (transformers initialised them at random);
    refuse it when any other weight is missing (a weight of another shape fails the load itself)."""
    missing = set(info.get("missing_keys") or [])
    for prefix, drop in source.adapter.optional_parts.items():
        lacking = {key for key in missing if key.startswith(prefix)}
        if lacking:
            drop(model)
            missing -= lacking
    if missing:
        names = sorted(missing)
        raise ModelLoadError(
            f"{source.location} lacks {len(names)} weights its {source.architecture} needs (first: {names[0]}); "
            "turbo never exports randomly initialised weights: use a checkpoint with them, or the architecture "
            "the checkpoint was saved as (its config.json's architectures)")


def load_image_processor(source: ModelSource, image_size: tuple[int, int], random_weights: bool) -> tuple[object, str]:
    """The model's own image processor (cache or hub) set to produce `image_size` images with the
    model's channels, and where it came from.

    Random weights, or a model that ships none, get the family's default processor (which
    matches the registry models' hub configs); the origin says which, and what was adapted.
    """
    processor = None
    if not random_weights:
        try:
            processor = from_cache_or_hub(AutoImageProcessor.from_pretrained, source.location)
        except Exception:  # no processor files: the default below, reported through the origin
            pass
    if processor is None:
        processor = source.adapter.image_processor(image_size, source.config)
        origin = f"{source.adapter.family} default"
    else:
        origin = source.location + _set_output_size(processor, image_size)
    return processor, origin + _fit_channels(processor, source.adapter.arch_spec(source.config).channels)


def _set_output_size(processor, image_size: tuple[int, int]) -> str:
    """Make the processor produce `image_size`: its crop (its resize scaled alike), or a fixed
    resize; what changed, for the origin."""
    settings = processor.to_dict()
    current = processor_output_size(settings)
    if current == image_size:
        return ""
    height, width = image_size
    if settings.get("do_center_crop") and current is not None:
        scale = max(height / current[0], width / current[1])
        processor.size = {key: round(value * scale) for key, value in settings["size"].items() if value is not None}
    else:
        processor.size = {"height": height, "width": width}
    processor.crop_size = {"height": height, "width": width}
    return f" (set to {height}x{width})"


def _fit_channels(processor, channels: int) -> str:
    """Per-channel mean/std of the model's channel count; a processor made for another count gets
    its values averaged (noted in the origin). No RGB conversion for a model that is not RGB."""
    if channels != 3 and getattr(processor, "do_convert_rgb", None):
        processor.do_convert_rgb = False
    notes = []
    for name in ("image_mean", "image_std"):
        values = getattr(processor, name, None)
        if isinstance(values, (list, tuple)) and len(values) != channels:
            setattr(processor, name, [float(sum(values) / len(values))] * channels)
            notes.append(name)
    return f" ({' and '.join(notes)} averaged to {channels} channels)" if notes else ""


def content_fingerprint(source: ModelSource, random_weights: bool) -> str:
    """A digest of what a model is: its config and, for real weights, every file of its directory
    (a local one, or the cached hub snapshot), so a replaced checkpoint never reuses a cache entry."""
    digest = hashlib.sha256(source.config.to_json_string(use_diff=False).encode())
    if not random_weights:
        directory = _weights_directory(source)
        for path in sorted(directory.iterdir()) if directory is not None else ():
            if path.is_file():
                digest.update(f"{path.name}:{file_record(path)['sha256']}".encode())
    return digest.hexdigest()[:16]


def _weights_directory(source: ModelSource) -> Path | None:
    path = Path(source.location)
    if path.is_dir():
        return path
    cached = try_to_load_from_cache(source.location, "config.json")
    return Path(cached).parent if isinstance(cached, str) else None


def load_tokenizer(source: ModelSource, random_weights: bool) -> tuple[object, str]:
    """The tokenizer of a model that reads text (cache or hub) and where it came from. Random
    weights get the family's placeholder vocabulary (their outputs are noise anyway); real weights
    without a tokenizer are an error, never a silent placeholder."""
    text = source.adapter.text_side
    if random_weights:
        return text.placeholder_tokenizer(source.config), "placeholder (random weights: made-up vocabulary)"

    try:
        tokenizer = from_cache_or_hub(AutoTokenizer.from_pretrained, source.location)
    except Exception as exc:  # missing tokenizer files, no network
        raise ModelLoadError(f"cannot load the tokenizer of {source.location} ({_reason(exc)}); "
                             + _cache_hint(source.location, False)) from None
    largest_id = max(text.special_ids(source.config).values())
    if len(tokenizer) <= largest_id:  # transformers builds a near-empty tokenizer when the files are missing
        raise ModelLoadError(f"cannot load the tokenizer of {source.location}: it has {len(tokenizer)} tokens, fewer "
                             f"than the model's special token id {largest_id} (tokenizer files missing?); "
                             + _cache_hint(source.location, False))
    return tokenizer, source.location


def registry_rows() -> list[dict]:
    """`turbo models`: each registry model's hub id, architecture, input, tokens, layers and Turbo defaults."""
    rows = []
    for name in list_models():
        source = resolve_source(name)
        arch = source.adapter.arch_spec(source.config, source.input_size)
        rows.append({
            "name": name, "hf_id": source.location, "family": source.adapter.family,
            "architecture": source.architecture,
            "image_size": list(source.input_size), "tokens": arch.num_tokens,
            "layers": arch.num_layers, "protected_tokens": arch.protected_tokens, "method": source.method,
            "default_r": source.default_r, "alpha": source.alpha, "threshold": source.threshold,
        })
    return rows


def family_rows() -> list[dict]:
    """`turbo models`: each family, its architectures, what it protects and the methods it takes."""
    return [{"family": adapter.family, "model_types": list(adapter.model_types),
             "architectures": list(adapter.architectures), "protected": adapter.protected_names,
             "methods": [method for method in METHODS
                         if adapter.protected_names != "none" or method not in CLS_METHODS]}
            for adapter in FAMILIES]

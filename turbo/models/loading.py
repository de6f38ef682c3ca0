"""Resolve a model name, HF id or local directory to a config, and load it (weights or random)."""

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import transformers
from huggingface_hub.utils import logging as hub_logging
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

from turbo.core.errors import ModelLoadError, UsageError, describe_error
from turbo.models.adapters import FamilyAdapter
from turbo.models.registry import ADAPTERS, REGISTRY, ModelSpec, list_models, supported_architectures


@dataclass
class ModelSource:
    """A model resolved without loading weights."""

    name: str  # registry name, HF id or directory as the user gave it
    location: str  # HF id or local path that weights come from
    architecture: str
    config: object  # transformers PretrainedConfig
    spec: ModelSpec | None

    @property
    def adapter(self) -> FamilyAdapter:
        return ADAPTERS[self.architecture]

    @property
    def default_r(self) -> int:
        return self.spec.default_r if self.spec else 0

    @property
    def alpha(self) -> float:
        return self.spec.alpha if self.spec else 5.0

    @property
    def threshold(self) -> int:
        return self.spec.threshold if self.spec else 0


def _config_from_dict(values: dict) -> object:
    values = dict(values)
    return AutoConfig.for_model(values.pop("model_type"), **values)


def _check_architecture(name: str, architecture: str | None) -> str:
    if architecture not in ADAPTERS:
        raise UsageError(
            f"{name}: architecture {architecture or 'unknown'} is not supported; "
            f"supported: {', '.join(supported_architectures())} (registry: {', '.join(list_models())})"
        )
    return architecture


def resolve_source(model: str, tiny: bool = False) -> ModelSource:
    """A registry name, a local directory with config.json, or a Hugging Face id (cached config)."""
    if tiny and model not in REGISTRY:
        raise UsageError(f"--tiny needs a registry model ({', '.join(list_models())}), not {model!r}")
    if model in REGISTRY:
        spec = REGISTRY[model]
        values = _merge(spec.config, spec.tiny_overrides) if tiny else spec.config
        config = _config_from_dict(values)
        config.architectures = [spec.architecture]
        return ModelSource(model, spec.hf_id, spec.architecture, config, spec)
    path = Path(model)
    if path.exists():
        config_file = path / "config.json"
        try:
            values = json.loads(config_file.read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"{model}: cannot read {config_file.name} ({exc.__class__.__name__}); "
                             "a model directory needs a transformers config.json") from None
        architecture = _check_architecture(model, (values.get("architectures") or [None])[0])
        return ModelSource(model, str(path), architecture, _config_from_dict(values), None)
    if "/" not in model:
        raise UsageError(f"unknown model {model!r}; use one of {', '.join(list_models())}, "
                         "a Hugging Face id (org/name) or a local model directory")

    try:
        config = from_cache_or_hub(AutoConfig.from_pretrained, model)
    except Exception as exc:  # hub, cache and parse errors all mean the same to the user
        raise ModelLoadError(f"{model}: cannot get its config ({_reason(exc)}); {_cache_hint(model, False)}; "
                              f"registry names work offline: {', '.join(list_models())}") from None
    architecture = _check_architecture(model, (config.architectures or [None])[0])
    return ModelSource(model, model, architecture, config, None)


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
    else:
        try:
            model, info = from_cache_or_hub(partial(model_class.from_pretrained, output_loading_info=True),
                                            source.location)
        except Exception as exc:  # missing files, no network, corrupt weights
            raise ModelLoadError(
                f"cannot load weights for {source.name} from {source.location} ({_reason(exc)}); "
                + _cache_hint(source.location)
            ) from None
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


def load_image_processor(source: ModelSource, image_size: int, random_weights: bool) -> tuple[object, str]:
    """The model's own image processor (cache or hub) resized to `image_size`, and where it came from.

    Random weights, or a model that ships none, get the family's default processor (which
    matches the registry models' hub configs); the origin says which.
    """
    if not random_weights:
        try:
            processor = from_cache_or_hub(AutoImageProcessor.from_pretrained, source.location)
        except Exception:  # no processor files: the default below, reported through the origin
            pass
        else:
            processor.size = {"height": image_size, "width": image_size}
            return processor, source.location
    return source.adapter.image_processor(image_size), f"{source.adapter.family} default"


def load_tokenizer(source: ModelSource, random_weights: bool) -> tuple[object, str]:
    """The captioning model's tokenizer (cache or hub) and where it came from. Random weights get
    the family's placeholder vocabulary (their captions are noise anyway); real weights without a
    tokenizer are an error, never a silent placeholder."""
    decoder = source.adapter.caption_decoder
    if random_weights:
        return decoder.placeholder_tokenizer(source.config), "placeholder (random weights: made-up vocabulary)"

    try:
        tokenizer = from_cache_or_hub(AutoTokenizer.from_pretrained, source.location)
    except Exception as exc:  # missing tokenizer files, no network
        raise ModelLoadError(f"cannot load the tokenizer of {source.location} ({_reason(exc)}); "
                             + _cache_hint(source.location, False)) from None
    largest_id = max(decoder.generation_ids(source.config).values())
    if len(tokenizer) <= largest_id:  # transformers builds a near-empty tokenizer when the files are missing
        raise ModelLoadError(f"cannot load the tokenizer of {source.location}: it has {len(tokenizer)} tokens, fewer "
                             f"than the decoder's special token id {largest_id} (tokenizer files missing?); "
                             + _cache_hint(source.location, False))
    return tokenizer, source.location


def registry_rows() -> list[dict]:
    """`turbo models`: each registry model's hub id, architecture, input, tokens, layers and Turbo defaults."""
    rows = []
    for name in list_models():
        source = resolve_source(name)
        arch = source.adapter.arch_spec(source.config)
        rows.append({
            "name": name, "hf_id": source.location, "family": source.adapter.family,
            "architecture": source.architecture,
            "image_size": source.adapter.image_size(source.config), "tokens": arch.num_tokens,
            "layers": arch.num_layers, "default_r": source.default_r, "alpha": source.alpha,
            "threshold": source.threshold,
        })
    return rows

"""Resolve a model name, HF id or local directory to a config, and load it (weights or random)."""

import json
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from exporters.adapters import FamilyAdapter
from exporters.errors import ModelLoadError, UsageError
from exporters.registry import ADAPTERS, REGISTRY, ModelSpec, list_models, supported_architectures


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
    from transformers import AutoConfig

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
    if model in REGISTRY:
        spec = REGISTRY[model]
        values = _merge(spec.config, spec.tiny_overrides) if tiny else spec.config
        return ModelSource(model, spec.hf_id, spec.architecture, _config_from_dict(values), spec)
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
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model)
    except Exception as exc:  # hub, cache and parse errors all mean the same to the user
        raise ModelLoadError(f"{model}: cannot get its config ({exc.__class__.__name__}); {_cache_hint(model)}") from None
    architecture = _check_architecture(model, (config.architectures or [None])[0])
    return ModelSource(model, model, architecture, config, None)


def _merge(base: dict, overrides: dict) -> dict:
    merged = dict(base)
    for key, value in overrides.items():
        merged[key] = _merge(base.get(key, {}), value) if isinstance(value, dict) else value
    return merged


def _cache_hint(hf_id: str) -> str:
    return (f"download it on a connected machine (`hf download {hf_id}`) into the Hugging Face cache "
            "(HF_HOME, default ~/.cache/huggingface) or pass a local directory; "
            "or use --random-weights for export and speed work (never for accuracy)")


def load_model(source: ModelSource, random_weights: bool = False, seed: int = 0) -> nn.Module:
    """The model in eval mode. Never falls back to random weights on its own."""
    import torch
    import transformers

    model_class = getattr(transformers, source.architecture)
    if random_weights:
        source.adapter.prepare_random_config(source.config)
        torch.manual_seed(seed)
        model = model_class(source.config)
    else:
        try:
            model = model_class.from_pretrained(source.location)
        except Exception as exc:  # missing files, no network, corrupt weights
            raise ModelLoadError(
                f"cannot load weights for {source.name} from {source.location} ({exc.__class__.__name__}); "
                + _cache_hint(source.location)
            ) from None
    return model.eval()

"""The model registry: named models with their architecture config (so `--random-weights`
works offline), a tiny variant for tests, and Turbo defaults."""

from dataclasses import dataclass, field

from turbo.core.errors import UsageError
from turbo.models.adapters import FamilyAdapter
from turbo.models.blip import BLIP
from turbo.models.vit import VIT

ADAPTERS: dict[str, FamilyAdapter] = {arch: adapter for adapter in (VIT, BLIP) for arch in adapter.architectures}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    hf_id: str
    architecture: str  # transformers class name
    config: dict  # the hub config's architecture fields (model_type included)
    tiny_overrides: dict  # a small variant of the same architecture, for tests
    default_r: int
    alpha: float = 5.0
    threshold: int = 0
    notes: str = field(default="")

    @property
    def adapter(self) -> FamilyAdapter:
        return ADAPTERS[self.architecture]


def _vit(hidden: int, layers: int, heads: int, mlp: int) -> dict:
    return dict(model_type="vit", hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                intermediate_size=mlp, image_size=224, patch_size=16, num_labels=1000, layer_norm_eps=1e-12)


def _blip(hidden: int, layers: int, heads: int, mlp: int) -> dict:
    vision = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                  intermediate_size=mlp, image_size=384, patch_size=16, layer_norm_eps=1e-5)
    text = dict(vocab_size=30524, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                intermediate_size=3072, encoder_hidden_size=hidden)
    return dict(model_type="blip", vision_config=vision, text_config=text)


_TINY_VIT = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                 image_size=48, patch_size=8, num_labels=10)
_TINY_BLIP = dict(
    vision_config=dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64,
                       image_size=48, patch_size=8, layer_norm_eps=1e-5),
    text_config=dict(vocab_size=30524, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, encoder_hidden_size=32, max_position_embeddings=64),
)

REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec("vit-b16", "google/vit-base-patch16-224", "ViTForImageClassification",
                  _vit(768, 12, 12, 3072), _TINY_VIT, default_r=16),
        ModelSpec("vit-l16", "google/vit-large-patch16-224", "ViTForImageClassification",
                  _vit(1024, 24, 16, 4096), _TINY_VIT, default_r=8),
        ModelSpec("blip-caption", "Salesforce/blip-image-captioning-base", "BlipForConditionalGeneration",
                  _blip(768, 12, 12, 3072), _TINY_BLIP, default_r=30, threshold=40),
        ModelSpec("blip-caption-large", "Salesforce/blip-image-captioning-large", "BlipForConditionalGeneration",
                  _blip(1024, 24, 16, 4096), _TINY_BLIP, default_r=30, threshold=40),
    )
}


def list_models() -> list[str]:
    return list(REGISTRY)


def supported_architectures() -> list[str]:
    return sorted(ADAPTERS)


def adapter_for(architecture: str) -> FamilyAdapter:
    """The adapter of a transformers class name, or a UsageError naming the supported ones."""
    if architecture not in ADAPTERS:
        raise UsageError(f"architecture {architecture} is not supported; "
                         f"supported: {', '.join(supported_architectures())}")
    return ADAPTERS[architecture]

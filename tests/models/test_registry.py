"""Every registered model, every family, every supported architecture and every config variant
users bring has a tiny test model (the registry's tiny variant, or an entry of TINY_CHECKPOINTS),
so no supported checkpoint type goes untested; the tiny variants are small enough for the suite."""

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx
import pytest
import torch
import transformers

from tests.conftest import upstream_outputs
from turbo.models.build import build_merged_model, build_plan
from turbo.models.loading import load_model, resolve_source
from turbo.models.registry import ADAPTERS, REGISTRY, supported_architectures


@dataclass(frozen=True)
class TinyCheckpoint:
    """A config variant users bring that no registry model covers, saved as a tiny checkpoint."""

    base: str  # the registry model whose tiny config it changes
    architecture: str
    changes: dict = field(default_factory=dict)  # config fields set on the tiny config
    build: Callable[[object], torch.nn.Module] | None = None  # config -> model (default: the architecture's class)
    r: int = 4

    def model(self, config: object) -> torch.nn.Module:
        return self.build(config) if self.build else getattr(transformers, self.architecture)(config)


# Every such variant: r=0 must equal transformers, and r>0 must merge by the plan, in torch and in ONNX Runtime.
TINY_CHECKPOINTS: dict[str, TinyCheckpoint] = {
    "ViTModel": TinyCheckpoint("vit-b16", "ViTModel"),
    "ViTModel without pooler": TinyCheckpoint(
        "vit-b16", "ViTModel", build=lambda config: transformers.ViTModel(config, add_pooling_layer=False)),
    "1-channel ViT": TinyCheckpoint("vit-b16", "ViTForImageClassification", {"num_channels": 1}),
    "2-channel ViT": TinyCheckpoint("vit-b16", "ViTForImageClassification", {"num_channels": 2}),
    "4-channel ViT": TinyCheckpoint("vit-b16", "ViTForImageClassification", {"num_channels": 4}),
    "non-square ViT": TinyCheckpoint("vit-b16", "ViTForImageClassification", {"image_size": [40, 64]}),
    "ViT patch 14, size 50": TinyCheckpoint("vit-b16", "ViTForImageClassification",
                                            {"patch_size": 14, "image_size": 50}, r=2),
    "ViT patch 32": TinyCheckpoint("vit-b16", "ViTForImageClassification", {"patch_size": 32, "image_size": 96},
                                   r=2),
    "ViT without qkv bias, quick_gelu, eps 1e-6": TinyCheckpoint(
        "vit-b16", "ViTForImageClassification", {"qkv_bias": False, "hidden_act": "quick_gelu",
                                                 "layer_norm_eps": 1e-6}),
    "ViT with every odd setting": TinyCheckpoint(
        "vit-b16", "ViTForImageClassification", {"num_channels": 2, "image_size": [50, 70], "patch_size": 14,
                                                 "qkv_bias": False, "hidden_act": "gelu_new", "layer_norm_eps": 1e-5},
        r=2),
    "DeiTForImageClassification": TinyCheckpoint("deit-b16", "DeiTForImageClassification"),
    "DeiTModel": TinyCheckpoint("deit-b16", "DeiTModel"),
    "CLIPVisionModel": TinyCheckpoint("clip-b16", "CLIPVisionModel"),
    "SigLIP without head": TinyCheckpoint("siglip-b16", "SiglipVisionModel", {"vision_use_head": False}),
    "Dinov2ForImageClassification": TinyCheckpoint("dinov2-b14", "Dinov2ForImageClassification", {"num_labels": 5}),
    "DINOv2 SwiGLU": TinyCheckpoint("dinov2-b14", "Dinov2Model", {"use_swiglu_ffn": True}),
    "Dinov2WithRegistersForImageClassification": TinyCheckpoint(
        "dinov2-reg-b14", "Dinov2WithRegistersForImageClassification", {"num_labels": 5}),
    "LLaVA reading the CLIP tower's last layer, CLS kept": TinyCheckpoint(
        "llava-1.5-7b", "LlavaForConditionalGeneration",
        {"vision_feature_layer": -1, "vision_feature_select_strategy": "full"}, r=3),
}


def save_tiny_checkpoint(name: str, directory: Path) -> Path:
    variant = TINY_CHECKPOINTS[name]
    config = resolve_source(variant.base, tiny=True).config
    for key, value in variant.changes.items():
        setattr(config, key, value)
    config.architectures = [variant.architecture]
    torch.manual_seed(0)
    variant.model(config).save_pretrained(directory)
    text = ADAPTERS[variant.architecture].text_side
    if text is not None:  # a model that reads text ships its tokenizer
        text.placeholder_tokenizer(config).save_pretrained(directory)
    return directory


def test_every_supported_architecture_has_a_tiny_model():
    tested = {spec.architecture for spec in REGISTRY.values()}
    tested |= {variant.architecture for variant in TINY_CHECKPOINTS.values()}
    assert sorted(set(supported_architectures()) - tested) == []


def test_every_family_has_a_registered_model():
    families = {adapter.family for adapter in ADAPTERS.values()}
    assert sorted(families - {spec.adapter.family for spec in REGISTRY.values()}) == []


def test_every_tiny_variant_is_tiny(model_name):
    source = resolve_source(model_name, tiny=True)
    vision = source.adapter.vision_config(source.config)
    assert REGISTRY[model_name].tiny_overrides
    merged_layers = source.adapter.arch_spec(source.config).num_layers
    assert merged_layers <= 4 and vision.hidden_size <= 64 and max(source.input_size) <= 64
    assert sum(p.numel() for p in load_model(source, random_weights=True).parameters()) < 5_000_000


@pytest.mark.parametrize("name", sorted(TINY_CHECKPOINTS))
def test_a_checkpoint_variant_equals_transformers_at_r0_and_merges_by_the_plan(name, tmp_path):
    directory = str(save_tiny_checkpoint(name, tmp_path))
    reference = load_model(resolve_source(directory))
    exact_plan = build_plan(directory, r=0)
    x = torch.randn(2, *exact_plan.pixel_shape, generator=torch.Generator().manual_seed(0))
    adapter = exact_plan.source.adapter
    exact, _ = build_merged_model(exact_plan)
    with torch.no_grad():
        got = adapter.export_outputs(exact, x, False)
    want = upstream_outputs(reference, x)
    assert next(iter(got)) in want
    for key in set(got) & set(want):
        assert torch.equal(got[key], want[key]), key
    built = build_plan(directory, r=TINY_CHECKPOINTS[name].r)
    assert built.source.architecture == TINY_CHECKPOINTS[name].architecture
    model, state = build_merged_model(built)
    with torch.no_grad():
        hidden = adapter.export_outputs(model, x, False)["last_hidden_state"]
    assert hidden.shape[1] == built.plan.final_tokens < built.plan.tokens_in
    assert state.token_counts == [(layer.tokens_in, layer.tokens_out) for layer in built.plan.layers]


@pytest.mark.parametrize("channels", [1, pytest.param(4, marks=pytest.mark.slow)])
def test_a_checkpoint_with_other_channel_counts_exports_and_checks(channels, tmp_path):
    """The input's channels come from the checkpoint's config: export, validation, check and bench
    feed (B, channels, H, W), never an assumed 3."""
    from typer.testing import CliRunner

    from turbo.cli.app import app

    save_tiny_checkpoint(f"{channels}-channel ViT", tmp_path / "checkpoint")
    out = tmp_path / "out"
    runner = CliRunner()
    export = runner.invoke(app, ["export", "-m", str(tmp_path / "checkpoint"), "--r", "4", "--threshold", "0",
                                 "-o", str(out)])
    assert export.exit_code == 0, export.output
    check = runner.invoke(app, ["check", str(out), "--max-diff", "1e-4"])
    assert check.exit_code == 0, check.output
    bench = runner.invoke(app, ["bench", str(out), "--iters", "2", "--warmup", "0"])
    assert bench.exit_code == 0, bench.output
    model = onnx.load(str(out / "model.onnx"))
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]] == [channels, 48, 48]

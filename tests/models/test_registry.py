"""Every registered model, every family and every supported architecture has a tiny test model
(the registry's tiny variant, or an entry of TINY_ARCHITECTURES), so no supported checkpoint type
goes untested; the tiny variants are small enough for the suite."""

from collections.abc import Callable
from pathlib import Path

import onnx
import pytest
import torch
import transformers

from tests.conftest import pixels
from turbo.models.build import build_merged_model, build_plan
from turbo.models.loading import load_model, resolve_source
from turbo.models.registry import ADAPTERS, REGISTRY, supported_architectures


def _tiny_vit_model(directory: Path) -> str:
    """A headless ViT checkpoint (`ViTModel`), the tiny ViT's config."""
    transformers.ViTModel(resolve_source("vit-b16", tiny=True).config).save_pretrained(directory)
    return "vit-b16"  # the registry model whose tiny inputs fit


# Supported architectures that no registry model uses: how to save a tiny checkpoint of each.
TINY_ARCHITECTURES: dict[str, Callable[[Path], str]] = {"ViTModel": _tiny_vit_model}


def test_every_supported_architecture_has_a_tiny_model():
    tested = {spec.architecture for spec in REGISTRY.values()} | set(TINY_ARCHITECTURES)
    assert sorted(set(supported_architectures()) - tested) == []


def test_every_family_has_a_registered_model():
    families = {adapter.family for adapter in ADAPTERS.values()}
    assert sorted(families - {spec.adapter.family for spec in REGISTRY.values()}) == []


def test_every_tiny_variant_is_tiny(model_name):
    source = resolve_source(model_name, tiny=True)
    vision = source.adapter.vision_config(source.config)
    assert REGISTRY[model_name].tiny_overrides
    assert vision.num_hidden_layers <= 4 and vision.hidden_size <= 64 and source.adapter.image_size(source.config) <= 64
    assert sum(p.numel() for p in load_model(source, random_weights=True).parameters()) < 5_000_000


@pytest.mark.parametrize("architecture", sorted(TINY_ARCHITECTURES))
def test_an_architecture_without_a_registry_model_loads_patches_and_merges(architecture, tmp_path):
    inputs_of = TINY_ARCHITECTURES[architecture](tmp_path)
    reference = load_model(resolve_source(str(tmp_path)))
    x = pixels(inputs_of)
    exact, _ = build_merged_model(build_plan(str(tmp_path), r=0))
    with torch.no_grad():
        assert torch.equal(exact(pixel_values=x).last_hidden_state, reference(pixel_values=x).last_hidden_state)
    built = build_plan(str(tmp_path), r=4)
    assert built.source.architecture == architecture
    model, state = build_merged_model(built)
    with torch.no_grad():
        hidden = model(pixel_values=x).last_hidden_state
    assert hidden.shape[1] == built.plan.final_tokens < built.plan.tokens_in
    assert state.token_counts == [(layer.tokens_in, layer.tokens_out) for layer in built.plan.layers]


@pytest.mark.parametrize("channels", [1, 4])
def test_a_checkpoint_with_other_channel_counts_exports_and_checks(channels, tmp_path):
    """The input's channels come from the checkpoint's config: export, validation, check and bench
    feed (B, channels, H, W), never an assumed 3."""
    from typer.testing import CliRunner

    from turbo.cli.app import app

    config = resolve_source("vit-b16", tiny=True).config
    config.num_channels = channels
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "checkpoint")
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

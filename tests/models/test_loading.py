"""Resolving and loading models: local directories, clear errors, no silent random weights."""

import json

import pytest
import torch

from tests.conftest import encoder_output, pixels
from turbo.core.errors import ModelLoadError, UsageError
from turbo.models.loading import load_model, resolve_source


@pytest.fixture(scope="module")
def tiny_vit_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-vit")
    model = load_model(resolve_source("vit-b16", tiny=True), random_weights=True, seed=7)
    model.save_pretrained(path)
    return path, model


def test_local_directory_loads_its_own_weights(tiny_vit_dir):
    path, saved = tiny_vit_dir
    source = resolve_source(str(path))
    assert source.architecture == "ViTForImageClassification" and source.spec is None
    loaded = load_model(source)
    x = pixels("vit-b16")
    assert torch.equal(encoder_output(loaded, x), encoder_output(saved, x))


def test_missing_weights_never_fall_back_to_random(tmp_path):
    resolve_source("vit-b16", tiny=True).config.save_pretrained(tmp_path)  # config only
    with pytest.raises(ModelLoadError, match="--random-weights") as err:
        load_model(resolve_source(str(tmp_path)))
    assert "HF_HOME" in str(err.value)


def test_registry_weights_missing_offline_name_random_weights():
    with pytest.raises(ModelLoadError, match="hf download google/vit-base-patch16-224.*--random-weights"):
        load_model(resolve_source("vit-b16", tiny=True))


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    with pytest.raises(UsageError, match="BertModel .model_type bert. is not supported; supported families: vit, "
                                         "deit, clip, siglip, dinov2"):
        resolve_source(str(tmp_path))


@pytest.mark.parametrize("model_type, architecture, reason", [
    ("beit", "BeitForImageClassification", "relative position bias"),
    ("data2vec-vision", "Data2VecVisionModel", "relative position bias"),
    ("swin", "SwinForImageClassification", "windowed attention"),
    ("convnext", "ConvNextForImageClassification", "convolutional"),
])
def test_families_merging_would_break_are_refused_by_name(tmp_path, model_type, architecture, reason):
    """One line naming the family, why, and the supported ones; exit 2 from the CLI; nothing written."""
    from typer.testing import CliRunner

    from turbo.cli.app import app

    (tmp_path / "config.json").write_text(json.dumps({"model_type": model_type, "architectures": [architecture]}))
    with pytest.raises(UsageError, match=f"{model_type} models cannot be merged: .*{reason}.*supported families: vit"):
        resolve_source(str(tmp_path))
    result = CliRunner().invoke(app, ["export", "-m", str(tmp_path), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_a_config_without_architectures_gets_its_family_base_model(tmp_path):
    config = resolve_source("deit-b16", tiny=True).config.to_dict()
    config.pop("architectures")
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert resolve_source(str(tmp_path)).architecture == "DeiTModel"


def test_unreadable_model_directory(tmp_path):
    with pytest.raises(UsageError, match="cannot read config.json"):
        resolve_source(str(tmp_path))


def test_unknown_name_lists_the_registry():
    with pytest.raises(UsageError, match="unknown model 'vit-b17'; use one of vit-b16"):
        resolve_source("vit-b17")


def test_uncached_hub_id_fails_fast_with_a_hint():
    with pytest.raises(ModelLoadError, match="cannot get its config.*registry names work offline"):
        resolve_source("nobody/no-such-model")


def test_a_checkpoint_without_its_pooler_exports_without_it(tmp_path):
    """transformers initialises a missing pooler at random; turbo drops it instead of exporting it."""
    import transformers

    from turbo.export.options import ExportOptions
    from turbo.export.pipeline import run_export

    checkpoint = tmp_path / "vit-no-pooler"
    transformers.ViTModel(resolve_source("vit-b16", tiny=True).config, add_pooling_layer=False).save_pretrained(
        checkpoint)
    model = load_model(resolve_source(str(checkpoint)))
    assert model.pooler is None
    result = run_export(ExportOptions(model=str(checkpoint), r=4, threshold=0), tmp_path / "out")
    assert result.passed and [o["name"] for o in result.manifest.onnx.outputs] == ["last_hidden_state", "token_sizes"]


def test_a_checkpoint_missing_a_needed_head_is_refused(tmp_path):
    """A headless checkpoint relabelled as a classifier: its classifier would be random."""
    import transformers

    config = resolve_source("vit-b16", tiny=True).config
    transformers.ViTModel(config).save_pretrained(tmp_path)
    values = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**values, "architectures": ["ViTForImageClassification"]}))
    with pytest.raises(ModelLoadError, match=r"lacks 2 weights .*first: classifier\.bias.*never exports randomly"):
        load_model(resolve_source(str(tmp_path)))

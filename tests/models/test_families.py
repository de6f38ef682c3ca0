"""What each family protects and how its outputs see merged tokens: DeiT's distillation token,
DINOv2's registers and size-weighted patch mean, SigLIP without CLS (tome only, sizes in its
pooling head); input sizes other than the config's, and the r that would merge protected tokens."""

import json

import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import pixels, tiny_pair, upstream_outputs
from tests.models.test_registry import save_tiny_checkpoint
from turbo.cli.app import app
from turbo.core.errors import UsageError
from turbo.models.build import build_merged_model, build_plan
from turbo.models.loading import load_model, resolve_source


@pytest.mark.parametrize("name, protected", [("deit-b16", 2), ("dinov2-reg-b14", 3), ("vit-b16", 1)])
def test_protected_tokens_are_never_merged_at_the_largest_r(name, protected):
    plan = build_plan(name, tiny=True, threshold=0, r=0).plan
    cap = (plan.tokens_in - protected) // 2
    merged, state, _, built = tiny_pair(name, r=cap, method="tome")
    with torch.no_grad():
        built.source.adapter.export_outputs(merged, pixels(name, seed=5), False)
    assert built.plan.protected_tokens == protected and built.plan.layers[0].r == cap
    assert torch.all(state.size[:, :protected] == 1)  # each still stands for itself alone
    assert torch.all(state.size[:, protected:].sum(dim=1) == plan.tokens_in - protected)
    with pytest.raises(UsageError, match=f"allow at most r={cap}"):
        build_plan(name, tiny=True, threshold=0, r=cap + 1)


def test_siglip_refuses_cls_methods_and_defaults_to_tome():
    assert build_plan("siglip-b16", tiny=True).merge_config.method == "tome"
    for method in ("turbo", "semantic"):
        with pytest.raises(UsageError, match=f"--method {method} needs a CLS token.*use --method tome"):
            build_plan("siglip-b16", tiny=True, method=method)
    result = CliRunner().invoke(app, ["plan", "-m", "siglip-b16", "--method", "turbo"])
    assert result.exit_code == 2 and "Traceback" not in result.output


def test_siglip_merges_every_token_and_its_head_weighs_them_by_size():
    merged, state, reference, built = tiny_pair("siglip-b16", r=6, method="tome")
    x = pixels("siglip-b16", seed=7)
    with torch.no_grad():
        ours = built.source.adapter.export_outputs(merged, x, False)["pooler_output"]
        theirs = upstream_outputs(reference, x)["pooler_output"]
    assert state.size.sum(dim=(1, 2)).tolist() == [built.plan.tokens_in] * 2 and state.size.max() > 1
    assert ours.shape == theirs.shape and not torch.allclose(ours, theirs, atol=1e-4)


def test_dinov2_classifier_mean_is_weighted_by_token_sizes(tmp_path):
    """Duplicated patches merged into one token count as often as they did before merging."""
    directory = str(save_tiny_checkpoint("Dinov2ForImageClassification", tmp_path))
    built = build_plan(directory, r=None, schedule="6,0,0,0", method="tome", threshold=0)
    merged, _ = build_merged_model(built)
    reference = load_model(resolve_source(directory))
    copies = list(range(built.plan.tokens_in))
    for pair in range(1, 7):
        copies[2 * pair] = 2 * pair - 1
    outputs = []
    for model in (merged, reference):
        handle = built.source.adapter.encoder_layers(model)[0].register_forward_pre_hook(
            lambda _m, args: (args[0][:, copies], *args[1:]))
        with torch.no_grad():
            outputs.append(built.source.adapter.export_outputs(model, pixels("dinov2-b14", seed=8), False)["logits"])
        handle.remove()
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


def test_an_image_size_other_than_the_configs_interpolates_position_embeddings():
    merged, _, reference, _ = tiny_pair("vit-b16", r=0)
    built = build_plan("vit-b16", tiny=True, r=4, threshold=0, image_size=(40, 64))
    assert built.pixel_shape == (3, 40, 64) and built.plan.tokens_in == 5 * 8 + 1 and built.interpolate_pos_encoding
    exact = build_plan("vit-b16", tiny=True, r=0, image_size=(40, 64))
    model, _ = build_merged_model(exact, random_weights=True)
    x = torch.randn(2, 3, 40, 64)
    with torch.no_grad():
        ours = exact.source.adapter.export_outputs(model, x, True)["logits"]
    assert torch.equal(ours, upstream_outputs(reference, x, interpolate_pos_encoding=True)["logits"])


def test_image_sizes_a_model_cannot_take_are_refused(tmp_path):
    with pytest.raises(UsageError, match="smaller than one patch"):
        build_plan("vit-b16", tiny=True, image_size=(4, 48))
    directory = str(save_tiny_checkpoint("non-square ViT", tmp_path))
    assert build_plan(directory, r=0).pixel_shape == (3, 40, 64)
    with pytest.raises(UsageError, match="not square, so transformers cannot resize them"):
        build_plan(directory, r=0, image_size=(64, 64))


def test_the_image_processor_config_sets_the_export_size_and_preprocessing(tmp_path):
    """A checkpoint's preprocessor_config.json (resize, crop, mean/std) is what export, calibration
    and eval feed; a colour image given to a 1-channel model is converted, and said once."""
    import numpy as np
    from PIL import Image

    from turbo.data.images import Sample, pixel_batch
    from turbo.models.loading import load_image_processor

    directory = save_tiny_checkpoint("1-channel ViT", tmp_path / "checkpoint")
    processor_config = {"image_processor_type": "ViTImageProcessor", "do_resize": True, "size": {"shortest_edge": 48},
                        "do_center_crop": True, "crop_size": {"height": 40, "width": 40}, "do_rescale": True,
                        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": [0.25], "image_std": [0.5]}
    (directory / "preprocessor_config.json").write_text(json.dumps(processor_config))
    built = build_plan(str(directory), r=0)
    assert built.pixel_shape == (1, 40, 40)  # the processor's crop, not the config's 48
    processor, origin = load_image_processor(built.source, built.image_size, random_weights=False)
    assert origin == str(directory)
    image = tmp_path / "colour.png"
    Image.fromarray(np.full((60, 50, 3), 255, dtype=np.uint8)).save(image)
    with pytest.warns(UserWarning, match="RGB images were converted to L for the model's 1 input channels"):
        batch = pixel_batch([Sample(image), Sample(image)], processor, channels=1)
    assert batch.shape == (2, 1, 40, 40) and np.allclose(batch, (1.0 - 0.25) / 0.5)

"""Shared fixtures: tiny variants of every registered model, built from the registry."""

import json
import os
from pathlib import Path

if os.environ.get("PYTEST_XDIST_WORKER"):  # one of the suite's two workers (-n 2): one core's threads each
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from turbo.export.options import ExportOptions
from turbo.export.pipeline import ExportResult, run_export
from turbo.models.build import BuiltPlan, build_merged_model, build_plan
from turbo.models.loading import load_model, resolve_source
from turbo.models.registry import ADAPTERS, list_models


def manifest_json(directory) -> dict:
    """An export's turbo.json as written: the file format, not the typed record."""
    return json.loads((Path(directory) / "turbo.json").read_text())


def tiny_plan(name: str, r: int | None = 4, **kwargs) -> BuiltPlan:
    kwargs.setdefault("threshold", 0)  # BLIP's default 40 exceeds the tiny models' 37 tokens
    return build_plan(name, r=r, tiny=True, **kwargs)


_exports: dict = {}


def tiny_export(tmp_path_factory, name: str, r: int, kernel: str = "matmul", **options) -> ExportResult:
    """One export of a tiny registry model per distinct setting for the whole session (exports take
    seconds each); tests only read them."""
    options.setdefault("decoder", False)  # BLIP's text decoder is tested in tests/test_caption.py
    key = (name, r, kernel, tuple(sorted(options.items())))
    if key not in _exports:
        out = tmp_path_factory.mktemp("export") / "out"
        _exports[key] = run_export(ExportOptions(model=name, r=r, kernel=kernel, threshold=0, tiny=True,
                                                 random_weights=True, **options), out)
    return _exports[key]


def tiny_pair(name: str, r: int | None = 4, kernel: str = "matmul", **kwargs):
    """(merged model, its state, unpatched reference with the same weights, plan)."""
    built = tiny_plan(name, r, **kwargs)
    merged, state = build_merged_model(built, random_weights=True, kernel=kernel)
    reference = load_model(resolve_source(name, tiny=True), random_weights=True)
    return merged, state, reference, built


def encoder_output(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The output a deployment uses (the family's first export output): logits, image embeddings."""
    with torch.no_grad():
        return next(iter(ADAPTERS[type(model).__name__].export_outputs(model, pixel_values, False).values()))


def upstream_outputs(model, pixel_values: torch.Tensor, **kwargs) -> dict[str, torch.Tensor]:
    """transformers' own forward, by output name (BLIP: its vision model's, the image embeddings)."""
    with torch.no_grad():
        if hasattr(model, "text_decoder"):
            return {"image_embeds": model.vision_model(pixel_values=pixel_values, **kwargs).last_hidden_state}
        if hasattr(model, "itm_head"):  # BLIP retrieval: its forward's ITC image feature and image tokens
            tokens = model.vision_model(pixel_values=pixel_values, **kwargs).last_hidden_state
            return {"image_embeds": torch.nn.functional.normalize(model.vision_proj(tokens[:, 0, :]), dim=-1),
                    "last_hidden_state": tokens}
        if hasattr(model.config, "vision_feature_layer"):  # LLaVA: the projected tokens of its feature layer
            config = model.config
            out = model.get_image_features(pixel_values=pixel_values, vision_feature_layer=config.vision_feature_layer,
                                           vision_feature_select_strategy=config.vision_feature_select_strategy,
                                           output_hidden_states=True, **kwargs)
            return {"image_features": torch.stack(list(out.pooler_output)),
                    "last_hidden_state": out.hidden_states[config.vision_feature_layer]}
        if hasattr(model, "qformer"):  # BLIP-2: the Q-Former's queries, projected, and the ViT's tokens
            out = model.get_image_features(pixel_values=pixel_values, **kwargs)
            return {"image_features": out.pooler_output, "last_hidden_state": out.last_hidden_state}
        if hasattr(model, "get_image_features"):  # image-text models: their image side
            features = model.get_image_features(pixel_values=pixel_values, **kwargs)
            return {"image_embeds": features.pooler_output, "last_hidden_state": features.last_hidden_state}
        return {name: value for name, value in model(pixel_values=pixel_values, **kwargs).items() if value is not None}


@pytest.fixture(scope="session")
def image_file(tmp_path_factory) -> str:
    """A small RGB photo of random colours, 50×70, for commands that read an image file."""
    from PIL import Image

    path = tmp_path_factory.mktemp("image") / "photo.png"
    Image.fromarray((np.random.default_rng(0).random((50, 70, 3)) * 255).astype("uint8")).save(path)
    return str(path)


def pixels(name: str, batch: int = 2, seed: int = 0) -> torch.Tensor:
    built = tiny_plan(name)
    return torch.randn(batch, *built.pixel_shape, generator=torch.Generator().manual_seed(seed))


def _tiny_twins() -> set[str]:
    """Registry models whose tiny variant is an earlier one's (same architecture, same config: they
    differ only at full size); tests over every model run them with -m slow only."""
    seen, twins = set(), set()
    for name in list_models():
        source = resolve_source(name, tiny=True)
        key = (source.architecture, json.dumps(source.config.to_dict(), sort_keys=True, default=str))
        (twins if key in seen else seen).add(name if key in seen else key)
    return twins


TINY_TWINS = _tiny_twins()
CI_MODELS = [name for name in list_models() if name not in TINY_TWINS]


@pytest.fixture(params=[pytest.param(name, marks=pytest.mark.slow) if name in TINY_TWINS else name
                        for name in list_models()])
def model_name(request) -> str:
    return request.param


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked gpu need CUDA; tests marked tensorrt need TensorRT and CUDA: skipped, with why."""
    from turbo.runtimes.availability import cuda_reason, tensorrt_reason

    reasons = {"gpu": cuda_reason(), "tensorrt": tensorrt_reason()}
    for item in items:
        for marker, reason in reasons.items():
            if reason and marker in item.keywords:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(autouse=True)
def _session_cache(tmp_path_factory, monkeypatch):
    """turbo's cache (compiled CPU kernels, bench exports) in the session's temporary directory, not
    the user's; tests that need a cache of their own set TURBO_CACHE again."""
    monkeypatch.setenv("TURBO_CACHE", str(tmp_path_factory.getbasetemp() / "turbo-cache"))


@pytest.fixture(autouse=True)
def _offline_hub(monkeypatch):
    """Tests never wait on the hub: only the local cache is consulted."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

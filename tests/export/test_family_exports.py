"""Every family and every config variant users bring, through ONNX Runtime: at r=0 the export
equals transformers, at r>0 it equals the merged PyTorch model, and the graph merges what
`turbo plan` printed (the registry's ViT and BLIP have their own, deeper export tests)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.conftest import upstream_outputs
from tests.models.test_registry import TINY_CHECKPOINTS, save_tiny_checkpoint
from turbo.cli.app import app
from turbo.export.onnx_export import TOKEN_SIZES
from turbo.export.options import ExportOptions
from turbo.export.pipeline import run_export
from turbo.export.validate import graph_problems
from turbo.graph.summary import summarize
from turbo.models.build import build_merged_model, build_plan
from turbo.models.loading import load_model, resolve_source
from turbo.runtimes.onnxrt import OnnxRuntimeRunner

FAMILY_MODELS = ["deit-b16", "clip-b16", "siglip-b16", "dinov2-b14", "dinov2-reg-b14", "llava-1.5-7b",
                 "llava-interleave-qwen-0.5b", "blip2-opt-2.7b"]
# Each export takes seconds: CI exports every family; the config variants (each also tested in
# PyTorch in CI, tests/models/test_registry.py) run with -m slow.
CASES = FAMILY_MODELS + [pytest.param(name, marks=pytest.mark.slow) for name in sorted(TINY_CHECKPOINTS)]
BATCH = 2  # a static batch exports several times faster than a dynamic axis (tested on ViT and BLIP)


def _model(case: str, tmp_path: Path) -> tuple[str, dict, int]:
    """(model argument, the options that select it, r) of a registry family or a saved checkpoint variant."""
    if case in FAMILY_MODELS:
        return case, {"tiny": True, "random_weights": True}, 4
    return str(save_tiny_checkpoint(case, tmp_path / "checkpoint")), {}, TINY_CHECKPOINTS[case].r


def _printed_plan(model: str, r: int, selection: dict) -> dict:
    args = ["plan", "-m", model, "--r", str(r), "--threshold", "0", "--json"] + (["--tiny"] if selection else [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.mark.parametrize("case", CASES)
def test_onnx_runtime_equals_transformers_at_r0_and_the_merged_model_at_r(case, tmp_path):
    model, selection, r = _model(case, tmp_path)
    printed = _printed_plan(model, r, selection)
    merged_export = run_export(ExportOptions(model=model, r=r, threshold=0, batch=BATCH, validate=False, **selection),
                               tmp_path / "merged")
    exact_export = run_export(ExportOptions(model=model, r=0, threshold=0, batch=BATCH, validate=False, **selection),
                              tmp_path / "exact")
    onnx_record = merged_export.manifest.onnx
    assert onnx_record.merge_r == [layer_r for layer_r in printed["r"] if layer_r > 0]

    built = build_plan(model, r=r, threshold=0, tiny=bool(selection))
    merged, _ = build_merged_model(built, random_weights=bool(selection))
    upstream = load_model(resolve_source(model, tiny=bool(selection)), random_weights=bool(selection))
    x = torch.randn(BATCH, *built.pixel_shape, generator=torch.Generator().manual_seed(3))
    feeds = {"pixel_values": x.numpy()}

    got = OnnxRuntimeRunner(merged_export.directory / onnx_record.file).run(feeds)
    with torch.no_grad():
        want = built.source.adapter.export_outputs(merged, x, False)
    assert got[TOKEN_SIZES].shape == (BATCH, printed["final_tokens"])
    tokens = built.source.adapter.output_tokens(built.source.config)
    assert not graph_problems(summarize(merged_export.directory / onnx_record.file), built.plan,
                              "matmul", BATCH, tokens)
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value.numpy(), atol=1e-4, rtol=0, err_msg=name)
        if value.dim() == 3:
            assert value.shape[1] == tokens.expected(name, printed["final_tokens"])

    exact = OnnxRuntimeRunner(exact_export.directory / exact_export.manifest.onnx.file).run(feeds)
    reference = upstream_outputs(upstream, x)
    assert next(iter(exact)) in reference
    for name in set(exact) & set(reference):
        np.testing.assert_allclose(exact[name], reference[name].numpy(), atol=1e-4, rtol=0, err_msg=name)

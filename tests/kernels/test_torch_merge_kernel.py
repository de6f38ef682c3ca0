"""The fused Turbo step for eager PyTorch on the CPU (turbo/kernels/merge_core.c: turbo_step) against the
PyTorch ops it replaces: on synthetic inputs, inside every registry model, and where it must stand aside."""

import contextlib
from unittest import mock

import numpy as np
import pytest
import torch

from tests.conftest import pixels, tiny_pair
from turbo.core.errors import UsageError
from turbo.export.onnx_export import ExportModule
from turbo.kernels.cpu_kernels import MergeKernelUnavailable, c_compiler, kernel_library
from turbo.kernels.torch_merge_kernel import FusedTurboStep, install_merge_kernel
from turbo.merging.attention import _cls_row_attention
from turbo.merging.matching import MergeConfig
from turbo.merging.module import TokenMerge
from turbo.runtimes.pytorch import TorchRunner

needs_compiler = pytest.mark.skipif(c_compiler() is None, reason="no C compiler to build the fused kernel")
CONFIGS = [MergeConfig(), MergeConfig(alpha=0.5, fusion="s2"), MergeConfig(method="tome"),
           MergeConfig(method="semantic")]


def step_inputs(batch: int, tokens: int, heads: int, dim: int, channels: int, sized: bool, seed: int):
    """x (B, N, C), integer sizes 1..4 (or None) and q, k (B, H, N, d) as strided views of one
    projection, the layout the adapters hand over."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, channels, generator=generator)
    size = torch.randint(1, 5, (batch, tokens, 1), generator=generator).float() if sized else None
    qkv = torch.randn(batch, tokens, 3, heads, dim, generator=generator).permute(2, 0, 3, 1, 4)  # 3×(B, H, N, d)
    return x, size, qkv[0], qkv[1]


def ops_step(x, size, query, keys, r: int, config: MergeConfig, scale: float):
    """What the patched block runs without the kernel: the CLS row, then TokenMerge's ops."""
    bias = None if size is None else size.log()[:, None, None, :, 0]
    cls_attn = _cls_row_attention(query, keys, bias, scale)
    return TokenMerge(r, config)(x, size, keys, cls_attn)


@needs_compiler
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.method}-{c.fusion}")
@pytest.mark.parametrize("batch, tokens, heads, dim, r, sized", [
    (1, 5, 1, 4, 1, False), (2, 21, 3, 16, 4, True), (3, 22, 2, 10, 10, True), (2, 197, 12, 64, 16, True),
    (1, 37, 4, 8, 18, False)])
def test_fused_step_equals_the_ops(config, batch, tokens, heads, dim, r, sized):
    x, size, query, keys = step_inputs(batch, tokens, heads, dim, 24, sized, seed=tokens + r)
    fused = FusedTurboStep(kernel_library())
    assert fused.accepts(x, config)
    merged, merged_size = fused(x, size, query, keys, r, config, dim ** -0.5)
    want, want_size = ops_step(x, size, query, keys, r, config, dim ** -0.5)
    assert merged.shape == (batch, tokens - r, 24) and merged_size.shape == (batch, tokens - r, 1)
    torch.testing.assert_close(merged, want, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(merged_size, want_size, rtol=0, atol=0)  # sums of small integers: the same merges


@needs_compiler
def test_fused_step_rejects_inputs_that_do_not_fit():
    x, size, query, keys = step_inputs(1, 21, 2, 8, 16, True, seed=0)
    fused = FusedTurboStep(kernel_library())
    for args in [(x, size, query, keys[:, :1], 4), (x, size[:, :20], query, keys, 4), (x, size, query, keys, 11),
                 (x, size, query, keys, 0)]:
        with pytest.raises(ValueError, match="do not fit"):
            fused(*args, MergeConfig(), 0.3)


@needs_compiler
def test_fused_step_stands_aside_for_autograd_exports_and_other_dtypes():
    fused, config = FusedTurboStep(kernel_library()), MergeConfig()
    x = torch.zeros(1, 5, 4)
    assert fused.accepts(x, config)
    assert not fused.accepts(x.requires_grad_(), config)
    with torch.no_grad():
        assert fused.accepts(x, config)
    assert not fused.accepts(torch.zeros(1, 5, 4, dtype=torch.bfloat16), config)
    assert not fused.accepts(torch.zeros(1, 5, 4, dtype=torch.float64), config)
    with mock.patch("torch.compiler.is_exporting", return_value=True):
        assert not fused.accepts(torch.zeros(1, 5, 4), config)


@needs_compiler
def test_registry_models_give_the_same_outputs_fused(model_name):
    """Every merging block runs the kernel once (the ops path never runs) and the outputs equal the ops'.
    Models protecting more or fewer tokens than CLS alone run the ops (the kernel protects CLS)."""
    model, _, _, built = tiny_pair(model_name, r=4)
    module = ExportModule(model, built)
    names = module.output_names()
    feeds = {"pixel_values": pixels(model_name, batch=3).numpy()}
    want = TorchRunner(module, ["pixel_values"], names, merge_kernel="ops").run(feeds)
    fused_runner = TorchRunner(module, ["pixel_values"], names, merge_kernel="fused")
    cls_only = built.plan.protected_tokens == 1
    ops_guard = mock.patch.object(TokenMerge, "forward", side_effect=AssertionError("the ops ran"))
    with mock.patch.object(FusedTurboStep, "__call__", autospec=True, side_effect=FusedTurboStep.__call__) as calls, \
            (ops_guard if cls_only else contextlib.nullcontext()):
        got = fused_runner.run(feeds)
    merging = sum(layer.r > 0 for layer in built.plan.layers)
    assert merging > 0 and calls.call_count == (merging if cls_only else 0)
    assert fused_runner.describe()["merge_kernel"] == "fused"
    for name in names:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)


def test_runner_choices(monkeypatch, tmp_path):
    model, _, _, built = tiny_pair("vit-b16", r=4)
    module = ExportModule(model, built)
    steps = [m for m in module.modules() if isinstance(m, TokenMerge)]
    assert install_merge_kernel(module, "ops", torch.device("cpu"), torch.float32) == ("ops", None)
    assert all(step.fused_step is None for step in steps)
    assert install_merge_kernel(module, "auto", torch.device("cpu"), torch.bfloat16) == (
        "ops", "the fused Turbo step runs float32 only on the CPU")
    with pytest.raises(UsageError, match="choose one of auto, fused, ops"):
        TorchRunner(module, ["pixel_values"], ["logits"], merge_kernel="fast")
    with pytest.raises(UsageError, match="fused runs float32 .* only on the CPU"):
        TorchRunner(module, ["pixel_values"], ["logits"], dtype=torch.float16, merge_kernel="fused")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    runner = TorchRunner(module, ["pixel_values"], ["logits"], merge_kernel="auto")
    assert runner.describe()["merge_kernel"] == "ops" and "no-such-cc" in runner.describe()["merge_kernel_note"]
    assert all(step.fused_step is None for step in steps)
    with pytest.raises(MergeKernelUnavailable, match="no-such-cc"):
        TorchRunner(module, ["pixel_values"], ["logits"], merge_kernel="fused")

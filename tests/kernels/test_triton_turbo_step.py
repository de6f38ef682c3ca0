"""The Triton Turbo step for eager PyTorch on CUDA (turbo/kernels/triton_turbo_step.py) against the PyTorch
ops it replaces, on synthetic inputs and inside every registry model.

The kernel checks run on CUDA where a GPU is (marker gpu) and, everywhere, under Triton's CPU
interpreter: `test_kernels_in_the_triton_interpreter` re-runs this file in a child process with
TRITON_INTERPRET=1 (it must be set before triton is imported), where they take CPU tensors."""

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

from tests.conftest import CI_MODELS, pixels, tiny_pair
from tests.kernels.test_torch_merge_kernel import CONFIGS, ops_step, step_inputs
from turbo.core.errors import UsageError
from turbo.export.onnx_export import ExportModule
from turbo.kernels.cpu_kernels import MergeKernelUnavailable
from turbo.kernels.torch_merge_kernel import install_merge_kernel
from turbo.merging.matching import MergeConfig
from turbo.merging.module import TokenMerge
from turbo.runtimes.pytorch import TorchRunner

pytest.importorskip("triton")
from turbo.kernels.triton_turbo_step import TritonTurboStep  # noqa: E402

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES = ["cpu"] if INTERPRETED else [pytest.param("cuda", marks=pytest.mark.gpu)]
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRETED else [torch.bfloat16])  # numpy has no bf16
HALF_ATOL = {torch.float16: 1e-2, torch.bfloat16: 5e-2}
# (batch, tokens, heads, dim, r, sized): one head, odd and even token counts, r at the cap, dim below 16
SMALL = [(1, 5, 1, 4, 1, False), (2, 21, 3, 16, 4, True), (3, 22, 2, 10, 10, True), (1, 37, 4, 8, 18, False)]
# ViT-B/16's first layer (two B-side blocks, two A-side programs); on CUDA also its batch 64 and BLIP's 577 tokens
LARGE = [(2, 197, 12, 64, 16, True)] + ([] if INTERPRETED else [(64, 197, 12, 64, 16, True),
                                                                  (8, 577, 12, 64, 30, True)])
CASES = [(shape, config) for shape in SMALL for config in CONFIGS] + [(shape, CONFIGS[0]) for shape in LARGE]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape, config", CASES, ids=lambda c: f"{c.method}-{c.fusion}" if isinstance(c, MergeConfig)
                         else "x".join(map(str, c[:5])))
@pytest.mark.parametrize("device", DEVICES)
def test_step_equals_the_ops(device, shape, config, dtype):
    """The reference is the ops on the same values in float32 (the kernels compute in fp32): the same
    merges (sizes exactly), values to fp tolerance."""
    batch, tokens, heads, dim, r, sized = shape
    x, size, query, keys = step_inputs(batch, tokens, heads, dim, 24, sized, seed=tokens + r)
    inputs = [None if t is None else t.to(device, dtype) for t in (x, size, query, keys)]
    fused = TritonTurboStep(device_type=device)
    assert fused.accepts(inputs[0], config)
    merged, merged_size = fused(*inputs, r, config, dim ** -0.5)
    want, want_size = ops_step(*(None if t is None else t.float() for t in inputs), r, config, dim ** -0.5)
    assert merged.shape == (batch, tokens - r, 24) and merged.dtype == dtype and merged_size.dtype == dtype
    torch.testing.assert_close(merged_size.float(), want_size, rtol=0, atol=0)  # sums of small integers
    tolerance = HALF_ATOL.get(dtype, 1e-5)
    torch.testing.assert_close(merged.float(), want.to(dtype).float(), rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("device", DEVICES)
def test_registry_models_give_the_same_outputs_fused(device, model_name):
    """Every merging block runs the Triton step once (the ops never run); outputs equal the ops'.
    Models protecting more or fewer tokens than CLS alone run the ops (the step protects CLS)."""
    model, _, _, built = tiny_pair(model_name, r=4)
    module = ExportModule(model, built).eval().to(device)
    feeds = pixels(model_name, batch=3).to(device)
    steps = [m for m in module.modules() if isinstance(m, TokenMerge)]
    with torch.inference_mode():
        want = module(feeds)
        for merge in steps:
            merge.fused_step = TritonTurboStep(device_type=device)
        cls_only = built.plan.protected_tokens == 1
        ops_guard = mock.patch.object(TokenMerge, "forward", side_effect=AssertionError("the ops ran"))
        with mock.patch.object(TritonTurboStep, "__call__", autospec=True,
                               side_effect=TritonTurboStep.__call__) as calls, \
                (ops_guard if cls_only else contextlib.nullcontext()):
            got = module(feeds)
    merging = sum(layer.r > 0 for layer in built.plan.layers)
    assert merging > 0 and calls.call_count == (merging if cls_only else 0)
    for got_output, want_output in zip(got, want, strict=True):
        np.testing.assert_allclose(got_output.cpu().numpy(), want_output.cpu().numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_torch_runner_on_cuda_runs_the_triton_step_by_default():
    model, _, _, built = tiny_pair("vit-b16", r=4)
    runner = TorchRunner(ExportModule(model, built), ["pixel_values"], ["logits"], device="cuda",
                         dtype=torch.float16)
    assert runner.describe()["merge_kernel"] == "fused"
    assert all(isinstance(m.fused_step, TritonTurboStep) for m in runner.module.modules() if isinstance(m, TokenMerge))


@pytest.mark.gpu
@pytest.mark.parametrize("merge_kernel", ["fused", "ops"])
def test_cuda_graph_replay_equals_the_eager_forward(model_name, merge_kernel):
    """Every registry model records as one CUDA graph (no host sync in any Turbo step); a replay
    after new inputs are copied in gives the eager forward's outputs on those inputs."""
    model, _, _, built = tiny_pair(model_name, r=4)
    module = ExportModule(model, built)
    runner = TorchRunner(module, ["pixel_values"], module.output_names(), device="cuda",
                         merge_kernel=merge_kernel, cuda_graph=True)
    first, second = (pixels(model_name, batch=3, seed=seed).numpy() for seed in (1, 2))
    replay, inputs, outputs = runner.capture({"pixel_values": first})
    inputs[0].copy_(torch.from_numpy(second))
    replay()
    want = runner.run({"pixel_values": second})
    name = module.output_names()[0]
    assert not np.allclose(want[name], runner.run({"pixel_values": first})[name])  # the copy reached the graph
    for name, got in zip(module.output_names(), outputs, strict=True):
        np.testing.assert_allclose(got.cpu().numpy(), want[name], rtol=1e-4, atol=1e-4)


SAME_TOWER = ("blip-retrieval", "blip-vqa", "clip-vit-b16")  # vision towers of blip-caption and clip-b16


@pytest.mark.skipif(INTERPRETED, reason="this is the interpreter's run")
def test_kernels_in_the_triton_interpreter(tmp_path):
    """This file's CPU cases, in a child process whose Triton interprets every kernel; one registry
    model per vision tower (the other BLIP and CLIP heads run the same tower's steps)."""
    root = Path(__file__).resolve().parents[2]
    models = [name for name in CI_MODELS if name not in SAME_TOWER]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k",
                             "cpu and not " + " and not ".join(SAME_TOWER), f"--basetemp={tmp_path / 'child'}",
                             __file__], cwd=root, env={**os.environ, "TRITON_INTERPRET": "1"}, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    cases = len(SMALL) * len(CONFIGS) + 1  # the interpreter's LARGE is one shape
    expected = 2 * cases + len(models)  # fp32 and fp16 cases, one run per registry model (-m slow: their twins)
    assert f"{expected} passed" in result.stdout, result.stdout[-2000:]


def test_bad_shapes_are_refused_before_any_launch():
    x, size, query, keys = step_inputs(1, 21, 2, 8, 16, True, seed=0)
    for args in [(x, size, query, keys[:, :1], 4), (x, size[:, :20], query, keys, 4), (x, size, query, keys, 11),
                 (x, size, query, keys, 0)]:
        with pytest.raises(ValueError, match="do not fit"):
            TritonTurboStep(device_type="cpu")(*args, MergeConfig(), 0.3)


def test_the_step_stands_aside_off_its_device_for_autograd_and_exports():
    config = MergeConfig()
    assert not TritonTurboStep().accepts(torch.zeros(1, 5, 4), config)  # CPU tensors: the C step's or the ops'
    fused = TritonTurboStep(device_type="meta")
    x = torch.empty(1, 5, 4, device="meta")
    assert fused.accepts(x, config) and fused.accepts(x.half(), config) and fused.accepts(x.bfloat16(), config)
    assert not fused.accepts(x.double(), config)
    assert not fused.accepts(x.requires_grad_(), config)
    with torch.no_grad():
        assert fused.accepts(x, config)
    with mock.patch("torch.compiler.is_exporting", return_value=True):
        assert not fused.accepts(torch.empty(1, 5, 4, device="meta"), config)


def test_install_on_cuda(monkeypatch):
    model, _, _, built = tiny_pair("vit-b16", r=4)
    module = ExportModule(model, built)
    steps = [m for m in module.modules() if isinstance(m, TokenMerge)]
    cuda = torch.device("cuda")
    assert install_merge_kernel(module, "auto", cuda, torch.float16) == ("fused", None)
    assert all(isinstance(s.fused_step, TritonTurboStep) for s in steps)
    with pytest.raises(UsageError, match="fused runs float32 .* only on the CPU"):
        install_merge_kernel(module, "fused", torch.device("cpu"), torch.float16)
    real_find_spec = __import__("importlib.util").util.find_spec
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None if name == "triton" else real_find_spec(name))
    assert install_merge_kernel(module, "auto", cuda, torch.bfloat16) == (
        "ops", "the fused Turbo step on CUDA needs Triton (pip install triton)")
    assert all(s.fused_step is None for s in steps)
    with pytest.raises(MergeKernelUnavailable, match="needs Triton"):
        install_merge_kernel(module, "fused", cuda, torch.float32)


def kernel_signatures(dtype: str) -> list[tuple]:
    """(kernel, argument types, constexprs) of the three step kernels for a ViT-B layer in `dtype`."""
    from turbo.kernels.triton_turbo_step import degree_kernel, select_kernel, unit_metric_kernel

    ints = dict.fromkeys(["key_sb", "key_sh", "key_sn", "query_sb", "query_sh", "tokens", "heads", "dim"], "i32")
    return [
        (unit_metric_kernel, {"keys_ptr": f"*{dtype}", "query_ptr": f"*{dtype}", "size_ptr": f"*{dtype}",
                              "metric_ptr": "*fp32", "logits_ptr": "*fp32", **ints, "scale": "fp32"},
         {"HAS_SIZE": True, "CLS_ROW": True, "BLOCK_T": 32, "BLOCK_D": 64}),
        (degree_kernel, {"metric_ptr": "*fp32", "logits_ptr": "*fp32", "degree_ptr": "*fp32", "best_ptr": "*i32",
                         "tokens": "i32", "heads": "i32", "alpha": "fp32"},
         {"METHOD": 2, "BLOCK_A": 32, "BLOCK_B": 64, "BLOCK_D": 64, "BLOCK_N": 256}),
        (select_kernel, {"degree_ptr": "*fp32", "best_ptr": "*i32", "index_ptr": "*i64", "num_a": "i32", "r": "i32"},
         {"BLOCK": 64}),
    ]


@pytest.mark.skipif(INTERPRETED, reason="the interpreter's kernels do not compile")
@pytest.mark.parametrize("dtype, capability", [("fp16", 90), ("fp32", 80), ("bf16", 90)])
def test_kernels_compile_for_the_gpu(dtype, capability):
    """What the interpreter cannot show: each kernel lowers to PTX and a cubin for the GPU."""
    import triton
    from triton.backends.compiler import GPUTarget

    for kernel, types, constexprs in kernel_signatures(dtype):
        source = triton.compiler.ASTSource(fn=kernel, signature={**types, **dict.fromkeys(constexprs, "constexpr")},
                                           constexprs=constexprs)
        compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32))
        assert f".target sm_{capability}" in compiled.asm["ptx"] and compiled.asm["cubin"]

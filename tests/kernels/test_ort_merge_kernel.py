"""The fused TurboMerge kernel for ONNX Runtime CPU (turbo/kernels/ort_merge_kernel.c) against the merge
it replaces, on synthetic inputs; tests/test_export.py runs it inside the registry's exports."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from turbo.core.errors import UsageError
from turbo.kernels.cpu_kernels import MergeKernelUnavailable, c_compiler
from turbo.kernels.ort_merge_kernel import register_merge_kernel
from turbo.merging.matching import select_merges
from turbo.merging.merge import merge_tokens, pack_indices
from turbo.runtimes.onnxrt import OnnxRuntimeRunner

needs_compiler = pytest.mark.skipif(c_compiler() is None, reason="no C compiler to build the fused kernel")
ELEMENT = {np.float32: TensorProto.FLOAT, np.float16: TensorProto.FLOAT16}


def merge_session(shape: tuple[int, int, int], r: int, dtype=np.float32) -> ort.InferenceSession:
    """A one-node model: TurboMerge(x, size, index) -> (x, size), run by the fused kernel."""
    batch, tokens, channels = shape
    width, element = (tokens - 1) // 2 + r, ELEMENT[dtype]
    node = helper.make_node("TurboMerge", ["x", "size", "index"], ["merged", "merged_size"], domain="turbo", r=r)
    graph = helper.make_graph([node], "turbo_merge", [
        helper.make_tensor_value_info("x", element, [batch, tokens, channels]),
        helper.make_tensor_value_info("size", element, [batch, tokens, 1]),
        helper.make_tensor_value_info("index", TensorProto.INT64, [batch, width]),
    ], [helper.make_tensor_value_info("merged", element, None),
        helper.make_tensor_value_info("merged_size", element, None)])
    model = helper.make_model(graph, ir_version=10, opset_imports=[helper.make_opsetid("", 20),
                                                                   helper.make_opsetid("turbo", 1)])
    options = ort.SessionOptions()
    assert register_merge_kernel(options, "fused", ("CPUExecutionProvider",)) == ("fused", None)
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def random_merge(shape: tuple[int, int, int], r: int, seed: int) -> tuple[torch.Tensor, ...]:
    """x, integer token sizes 1..4 and the packed indices of a random merge choice."""
    batch, tokens, channels = shape
    generator = torch.Generator().manual_seed(seed)
    num_a, num_b = (tokens - 1) // 2, tokens // 2
    x = torch.randn(batch, tokens, channels, generator=generator)
    size = torch.randint(1, 5, (batch, tokens, 1), generator=generator).float()
    degree = torch.randn(batch, num_a, generator=generator)
    best = torch.randint(0, num_b, (batch, num_a), generator=generator)
    return x, size, pack_indices(*select_merges(degree, best, r))


def run(session: ort.InferenceSession, x, size, index, dtype=np.float32) -> list[np.ndarray]:
    return session.run(None, {"x": np.asarray(x, dtype), "size": np.asarray(size, dtype), "index": index.numpy()})


@needs_compiler
@pytest.mark.parametrize("shape, r", [((1, 3, 8), 1), ((2, 21, 32), 4), ((3, 22, 16), 10), ((2, 197, 64), 16),
                                      ((1, 37, 8), 18)])
def test_fused_kernel_equals_merge_tokens(shape, r):
    x, size, index = random_merge(shape, r, seed=shape[1] + r)
    merged, merged_size = run(merge_session(shape, r), x, size, index)
    want, want_size = merge_tokens(x, size, index)
    assert merged.shape == (shape[0], shape[1] - r, shape[2]) and merged_size.shape == (shape[0], shape[1] - r, 1)
    np.testing.assert_allclose(merged, want.numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(merged_size, want_size.numpy())  # sums of small integers: exact


@needs_compiler
def test_float16_is_the_float_result_rounded_once():
    shape, r = (2, 37, 64), 12
    x, size, index = random_merge(shape, r, seed=1)
    x = (x * torch.logspace(-6, 4, shape[-1])).half()  # from subnormal to large halves
    in_float = run(merge_session(shape, r), x.float(), size, index)
    in_half = run(merge_session(shape, r, np.float16), x, size, index, np.float16)
    for half, full in zip(in_half, in_float):
        assert half.dtype == np.float16
        np.testing.assert_array_equal(half, full.astype(np.float16))  # numpy rounds to nearest even


@needs_compiler
def test_float16_keeps_every_half_value():
    """With r = 0 every token is copied or divided by its size 1: all 65536 bit patterns survive."""
    every = np.arange(65536, dtype=np.uint16).view(np.float16)
    x = np.concatenate([every, np.zeros(257 * 256 - every.size, np.float16)]).reshape(1, 257, 256)
    index = torch.arange(128).unsqueeze(0)  # r = 0: every A-side token kept
    merged, _ = run(merge_session(x.shape, 0, np.float16), x, np.ones((1, 257, 1)), index, np.float16)
    order = np.r_[0, 2:257:2, 1:257:2]  # [CLS, A side, B side]
    np.testing.assert_array_equal(merged, x[:, order])  # NaN == NaN for assert_array_equal


@needs_compiler
def test_an_index_out_of_range_is_an_error():
    shape, r = (1, 21, 8), 4
    x, size, index = random_merge(shape, r, seed=0)
    index[0, r] = shape[1] // 2  # a dst index one past the B side
    with pytest.raises(Exception, match="TurboMerge: an index is out of range"):
        run(merge_session(shape, r), x, size, index)


def test_without_a_compiler_auto_runs_the_function_and_fused_refuses(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    options = ort.SessionOptions()
    kernel, note = register_merge_kernel(options, "auto", ("CPUExecutionProvider",))
    assert kernel == "graph" and "could not build the fused merge kernels" in note
    with pytest.raises(MergeKernelUnavailable, match="no-such-cc"):
        register_merge_kernel(options, "fused", ("CPUExecutionProvider",))


def test_the_fused_kernel_is_cpu_only_and_choices_are_checked():
    options = ort.SessionOptions()
    kernel = register_merge_kernel(options, "auto", ("CUDAExecutionProvider",))
    assert kernel == ("graph", "the fused kernel is CPU-only")
    with pytest.raises(UsageError, match="CPU provider only"):
        register_merge_kernel(options, "fused", ("CUDAExecutionProvider",))
    with pytest.raises(UsageError, match="choose one of auto, fused, graph"):
        OnnxRuntimeRunner("unused.onnx", merge_kernel="fast")

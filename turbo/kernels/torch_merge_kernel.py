"""The whole Turbo step of a layer as fused kernels for eager PyTorch: one call of merge_core.c's
turbo_step on the CPU, four Triton launches on CUDA (turbo/kernels/triton_turbo_step.py).

Eager PyTorch pays 5-30 µs of dispatch for every small op, and one layer's step (the CLS attention
row, scores, selection and weighted merge) is ~30 of them: 4-10% of a late ViT-B layer on a CPU.
`install_merge_kernel` gives every TokenMerge of a module a `FusedTurboStep` (CPU) or a
`TritonTurboStep` (CUDA), which the patched blocks call in place of those ops wherever it accepts
the input (float32 on the CPU, fp32/fp16/bf16 on CUDA; no autograd, not exporting or compiling);
elsewhere, and in every export, the ops run as before.
"""

import ctypes
import functools
import importlib.util
from pathlib import Path

import torch
from torch import nn

from turbo.core.errors import UsageError
from turbo.kernels.cpu_kernels import MergeKernelUnavailable, kernel_library
from turbo.merging.matching import ALPHA_SCALE, MergeConfig
from turbo.merging.module import FUSED_METHODS, FusedStep, TokenMerge, check_step_inputs, fused_step_may_run

TORCH_MERGE_KERNELS = ("auto", "fused", "ops")
_POINTER, _INT = ctypes.c_void_p, ctypes.c_int64
_STRIDES = _INT * 3


@functools.cache
def _turbo_step(library: Path) -> ctypes._CFuncPtr:
    step = ctypes.CDLL(str(library)).turbo_step
    step.argtypes = [_POINTER, _POINTER, _POINTER, _STRIDES, _POINTER, _STRIDES, _INT, _INT, _INT, _INT, _INT, _INT,
                     ctypes.c_int, ctypes.c_float, ctypes.c_float, _POINTER, _POINTER]
    step.restype = ctypes.c_int
    return step


class FusedTurboStep:
    """TokenMerge.forward plus the CLS attention row it reads, in one call into the kernel library."""

    def __init__(self, library: Path) -> None:
        self._step = _turbo_step(library)

    def accepts(self, x: torch.Tensor, config: MergeConfig) -> bool:
        return x.device.type == "cpu" and x.dtype == torch.float32 and fused_step_may_run(x, config)

    def __call__(self, x: torch.Tensor, size: torch.Tensor | None, query: torch.Tensor, keys: torch.Tensor, r: int,
                 config: MergeConfig, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, N, C), size (B, N, 1) or None (one patch each), query and keys (B, H, N, d)
        -> x (B, N - r, C), size (B, N - r, 1)."""
        check_step_inputs(x, size, query, keys, r, "fused Turbo step")
        batch, tokens, channels = x.shape
        x = x.contiguous()
        size = None if size is None else size.contiguous()
        query, keys = (t if t.stride(-1) == 1 else t.contiguous() for t in (query, keys))
        merged, merged_size = x.new_empty(batch, tokens - r, channels), x.new_empty(batch, tokens - r, 1)
        method = FUSED_METHODS[config.method, config.fusion]
        status = self._step(x.data_ptr(), None if size is None else size.data_ptr(), keys.data_ptr(),
                            _STRIDES(*keys.stride()[:3]), query.data_ptr(), _STRIDES(*query.stride()[:3]), batch,
                            tokens, channels, keys.shape[1], keys.shape[3], r, method, ALPHA_SCALE * config.alpha,
                            scale, merged.data_ptr(), merged_size.data_ptr())
        if status:
            raise MemoryError("the fused Turbo step could not allocate its scratch memory")
        return merged, merged_size

    def __deepcopy__(self, memo: dict) -> "FusedTurboStep":
        return self  # stateless; the library stays loaded


def check_torch_merge(choice: str, on_cpu: bool, float32: bool, flag: str = "merge kernel") -> None:
    """UsageError unless `choice` is known and, when "fused" on the CPU, the model runs float32."""
    if choice not in TORCH_MERGE_KERNELS:
        raise UsageError(f"unknown {flag} {choice!r}; choose one of {', '.join(TORCH_MERGE_KERNELS)}")
    if choice == "fused" and on_cpu and not float32:
        raise UsageError(f"{flag} fused runs float32 (fp32) models only on the CPU (any precision on CUDA)")


def fused_step(device: torch.device, dtype: torch.dtype) -> FusedStep:
    """The whole-step kernel for models on `device` in `dtype`: the C step (CPU, float32) or the
    Triton step (CUDA); MergeKernelUnavailable says why there is none."""
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise MergeKernelUnavailable("the fused Turbo step on CUDA needs Triton (pip install triton)")
        from turbo.kernels.triton_turbo_step import TritonTurboStep

        return TritonTurboStep()
    if device.type != "cpu":
        raise MergeKernelUnavailable(f"no fused Turbo step for {device.type} devices")
    if dtype != torch.float32:
        raise MergeKernelUnavailable("the fused Turbo step runs float32 only on the CPU")
    return FusedTurboStep(kernel_library())


def install_merge_kernel(module: nn.Module, choice: str, device: torch.device,
                         dtype: torch.dtype) -> tuple[str, str | None]:
    """Give every TokenMerge of `module` the fused step, or none (its ops), as `choice` asks.

    Returns how the merges run, "fused" or "ops", and why "auto" chose "ops" (None otherwise).
    "fused" raises when it cannot be had.
    """
    check_torch_merge(choice, device.type == "cpu", dtype == torch.float32)
    fused, note = None, None
    if choice != "ops":
        try:
            fused = fused_step(device, dtype)
        except MergeKernelUnavailable as error:
            if choice == "fused":
                raise
            note = str(error)
    for merge in module.modules():
        if isinstance(merge, TokenMerge):
            merge.fused_step = fused
    return ("ops", note) if fused is None else ("fused", None)

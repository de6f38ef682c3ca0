"""PyTorch runner: an eval-mode module whose forward takes the inputs by position and returns
a tuple of outputs in `output_names` order; its Turbo steps run fused where they can
(turbo/kernels/torch_merge_kernel.py)."""

import time
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from turbo.kernels.torch_merge_kernel import install_merge_kernel
from turbo.runtimes.base import Runner


class TorchRunner(Runner):
    name = "torch"

    def __init__(self, module: nn.Module, input_names: list[str], output_names: list[str],
                 device: str = "cpu", dtype: torch.dtype | None = None, merge_kernel: str = "auto") -> None:
        """merge_kernel: "fused" runs each Turbo step as fused kernels (one C call on the CPU, Triton on
        CUDA), "ops" as PyTorch ops, "auto" fused where it can be (float32 on the CPU with a C compiler,
        CUDA with Triton) and ops elsewhere."""
        self.device = torch.device(device)
        self.dtype = dtype  # floating inputs and the module are cast to it (None: as they are)
        floats = [p.dtype for p in module.parameters() if p.is_floating_point()]
        model_dtype = dtype or (floats[0] if floats else torch.float32)
        self.merge_kernel, self.merge_kernel_note = install_merge_kernel(module, merge_kernel, self.device, model_dtype)
        self.module = module.eval().to(self.device, dtype) if dtype else module.eval().to(self.device)
        self._inputs = list(input_names)
        self._outputs = list(output_names)

    def _tensors(self, feeds: dict[str, np.ndarray]) -> list[torch.Tensor]:
        args = [torch.from_numpy(np.ascontiguousarray(feeds[name])).to(self.device) for name in self._inputs]
        return [a.to(self.dtype) if self.dtype and a.is_floating_point() else a for a in args]

    def _forward(self, args: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        with torch.inference_mode():
            outputs = self.module(*args)
        return outputs if isinstance(outputs, tuple) else (outputs,)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self._forward(self._tensors(feeds))
        if len(outputs) != len(self._outputs):
            raise RuntimeError(f"{self.name}: module returned {len(outputs)} outputs, expected {len(self._outputs)}")
        return {name: out.detach().float().cpu().numpy() if out.dtype == torch.bfloat16 else out.detach().cpu().numpy()
                for name, out in zip(self._outputs, outputs)}

    def timer(self, feeds: dict[str, np.ndarray], include_transfers: bool = False) -> Callable[[], float]:
        """CUDA: events on the current stream, inputs already on the device unless asked."""
        args = self._tensors(feeds)
        if self.device.type != "cuda":
            def timed() -> float:
                begin = time.perf_counter()
                self._forward(self._tensors(feeds) if include_transfers else args)
                return time.perf_counter() - begin

            return timed

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def timed_cuda() -> float:
            start.record()
            self._forward(self._tensors(feeds) if include_transfers else args)
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return timed_cuda

    def describe(self) -> dict:
        info = {"runtime": self.name, "device": str(self.device), "threads": torch.get_num_threads(),
                "merge_kernel": self.merge_kernel}
        if self.merge_kernel_note:
            info["merge_kernel_note"] = self.merge_kernel_note
        if self.device.type == "cuda":
            info["device_name"] = torch.cuda.get_device_name(self.device)
        return info

"""PyTorch runner: an eval-mode module whose forward takes the inputs by position and returns
a tuple of outputs in `output_names` order; its Turbo steps run fused where they can
(turbo/kernels/torch_merge_kernel.py). On CUDA its timer can replay the forward as one CUDA graph."""

import statistics
import time
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from turbo.core.errors import TurboError, TurboNote, describe_error
from turbo.kernels.torch_merge_kernel import install_merge_kernel
from turbo.runtimes.base import Runner


class TorchRunner(Runner):
    name = "torch"

    def __init__(self, module: nn.Module, input_names: list[str], output_names: list[str],
                 device: str = "cpu", dtype: torch.dtype | None = None, merge_kernel: str = "auto",
                 cuda_graph: bool = False) -> None:
        """merge_kernel: "fused" runs each Turbo step as fused kernels (one C call on the CPU, Triton on
        CUDA), "ops" as PyTorch ops, "auto" fused where it can be (float32 on the CPU with a C compiler,
        CUDA with Triton) and ops elsewhere. cuda_graph: the timer records the forward once as a CUDA
        graph and replays it, so Python's per-op launch cost is not timed (static shapes only)."""
        if cuda_graph and torch.device(device).type != "cuda":
            raise ValueError("CUDA graphs need a CUDA device")
        self.cuda_graph = cuda_graph
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

    def capture(self, feeds: dict[str, np.ndarray]) -> tuple[Callable[[], None], list[torch.Tensor],
                                                             tuple[torch.Tensor, ...]]:
        """Records one forward as a CUDA graph: (replay, its input tensors, its output tensors).
        Warm-up runs on a side stream first (Triton compiles, cuBLAS picks its kernels); copy new
        inputs into the input tensors before a replay."""
        args = self._tensors(feeds)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):
                self._forward(args)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                outputs = self._forward(args)
        except RuntimeError as error:
            raise TurboError(f"the forward cannot be recorded as a CUDA graph ({describe_error(error)}); "
                             "time it eagerly with --no-cuda-graph") from error
        return graph.replay, args, outputs

    def timer(self, feeds: dict[str, np.ndarray], include_transfers: bool = False) -> Callable[[], float]:
        """CUDA: events on the current stream, inputs already on the device unless asked; with
        cuda_graph, each call replays the recorded forward."""
        args = self._tensors(feeds)
        if self.device.type != "cuda":
            def timed() -> float:
                begin = time.perf_counter()
                self._forward(self._tensors(feeds) if include_transfers else args)
                return time.perf_counter() - begin

            return timed

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if self.cuda_graph:
            replay, static_args, _ = self.capture(feeds)
            self._check_replay(replay, args)
            host = [torch.from_numpy(np.ascontiguousarray(feeds[name])) for name in self._inputs]

            def run() -> None:
                if include_transfers:
                    for target, source in zip(static_args, host):
                        target.copy_(source)
                replay()
        else:
            def run() -> None:
                self._forward(self._tensors(feeds) if include_transfers else args)

        def timed_cuda() -> float:
            start.record()
            run()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return timed_cuda

    def _check_replay(self, replay: Callable[[], None], args: list[torch.Tensor]) -> None:
        """Warns when the graph replays slower than the eager forward: a kernel then took another
        path while it was recorded (seen: SDPA's float32 math path instead of cuDNN's), and a
        speedup against it would not be real."""
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def median_ms(run: Callable[[], object]) -> float:
            times = []
            for _ in range(5):
                start.record()
                run()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            return statistics.median(times)

        eager, graphed = median_ms(lambda: self._forward(args)), median_ms(replay)
        if graphed > 1.1 * eager:
            warnings.warn(f"{self.name} on {self.device}: the CUDA graph replays slower than the eager forward "
                          f"({graphed:.2f} vs {eager:.2f} ms): a kernel took a slower path while it was recorded; "
                          "compare with --no-cuda-graph", TurboNote, stacklevel=2)

    def describe(self) -> dict:
        info = {"runtime": self.name, "device": str(self.device), "threads": torch.get_num_threads(),
                "merge_kernel": self.merge_kernel, "cuda_graph": self.cuda_graph}
        if self.merge_kernel_note:
            info["merge_kernel_note"] = self.merge_kernel_note
        if self.device.type == "cuda":
            info["device_name"] = torch.cuda.get_device_name(self.device)
        return info

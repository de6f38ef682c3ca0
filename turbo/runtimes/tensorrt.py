"""TensorRT runner: a deserialised engine run with execute_async_v3 on a torch CUDA stream, timed
with CUDA events around one launch or one CUDA-graph replay. Written against the documented
TensorRT 10/11 Python API; not run here (no TensorRT on our machines)."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from turbo.core.errors import UsageError
from turbo.runtimes.base import Runner


class TensorRTRunner(Runner):
    name = "trt"

    def __init__(self, engine_path: str | Path, cuda_graph: bool = False) -> None:
        import tensorrt as trt

        self._trt, self._torch = trt, torch
        logger = trt.Logger(trt.Logger.WARNING)
        trt.init_libnvinfer_plugins(logger, "")
        self.engine = trt.Runtime(logger).deserialize_cuda_engine(Path(engine_path).read_bytes())
        if self.engine is None:
            raise RuntimeError(f"TensorRT could not deserialise {engine_path} (built by another TensorRT or GPU?)")
        self.context = self.engine.create_execution_context()
        self.stream = torch.cuda.Stream()
        self.cuda_graph = cuda_graph
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self._inputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self._outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]

    def _dtype(self, name: str):
        return self._torch.from_numpy(np.empty(0, self._trt.nptype(self.engine.get_tensor_dtype(name)))).dtype

    def _bind(self, feeds: dict[str, np.ndarray]) -> tuple[dict, dict]:
        """Device copies of the inputs and fresh output buffers, bound to the context."""
        torch = self._torch
        inputs = {n: torch.from_numpy(np.ascontiguousarray(feeds[n])).to("cuda", self._dtype(n)) for n in self._inputs}
        for name, tensor in inputs.items():
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                low, _, high = self.engine.get_tensor_profile_shape(name, 0)
                raise UsageError(f"input {name} of shape {tuple(tensor.shape)} is outside the engine's profile "
                                 f"({tuple(low)} to {tuple(high)}); rebuild it with a wider --min/--max-batch")
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = {n: torch.empty(tuple(self.context.get_tensor_shape(n)), dtype=self._dtype(n), device="cuda")
                   for n in self._outputs}
        for name, tensor in outputs.items():
            self.context.set_tensor_address(name, tensor.data_ptr())
        return inputs, outputs

    def _enqueue(self) -> None:
        if not self.context.execute_async_v3(self.stream.cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        _, outputs = self._bind(feeds)
        self._enqueue()
        self.stream.synchronize()
        return {name: tensor.cpu().numpy() for name, tensor in outputs.items()}

    def timer(self, feeds: dict[str, np.ndarray], include_transfers: bool = False) -> Callable[[], float]:
        """CUDA events on the runner's stream around one launch (or one CUDA-graph replay)."""
        torch = self._torch
        bound = self._bind(feeds)  # kept alive: the context holds their addresses
        self._enqueue()  # the first launch sets up shape-dependent state, before any capture
        graph = None
        if self.cuda_graph:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=self.stream):
                self._enqueue()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def timed() -> float:
            with torch.cuda.stream(self.stream):
                start.record()
                if include_transfers:
                    for name, tensor in bound[0].items():
                        tensor.copy_(torch.from_numpy(np.ascontiguousarray(feeds[name])), non_blocking=False)
                graph.replay() if graph is not None else self._enqueue()
                if include_transfers:
                    [tensor.cpu() for tensor in bound[1].values()]
                end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3

        return timed

    def output_shape(self, name: str) -> tuple:
        return tuple(self.engine.get_tensor_shape(name))

    def describe(self) -> dict:
        return {"runtime": self.name, "device": "cuda", "device_name": self._torch.cuda.get_device_name(),
                "tensorrt": self._trt.__version__, "cuda_graph": self.cuda_graph}

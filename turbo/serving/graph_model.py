"""A python-backend model running one ONNX graph on ONNX Runtime (turbo's fused merge kernel
registered), for servers without an onnxruntime backend. Imports no torch or transformers, so
its instances start fast."""

import numpy as np
import triton_python_backend_utils as pb_utils

from turbo.runtimes.onnxrt import OnnxRuntimeRunner
from turbo.serving.backend_utils import answer_each, error, model_parameters, tensor


class GraphModel:
    """One ONNX graph; requests batched by Triton are run as one batch when their shapes allow."""

    def initialize(self, args: dict) -> None:
        config, parameters, version = model_parameters(args)
        threads = int(parameters.get("threads", "0")) or None
        self.runner = OnnxRuntimeRunner(version / parameters.get("onnx_file", "model.onnx"), threads=threads)
        self.batching = config.get("max_batch_size", 0) > 0
        self.outputs = [output["name"] for output in config["output"]]

    def _feeds(self, request) -> dict[str, np.ndarray]:
        return {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.runner.input_names
                if pb_utils.get_input_tensor_by_name(request, name) is not None}

    def execute(self, requests) -> list:
        if self.batching and len(requests) > 1:
            feeds = [self._feeds(request) for request in requests]
            if all({k: v.shape[1:] for k, v in f.items()} == {k: v.shape[1:] for k, v in feeds[0].items()}
                   for f in feeds):
                return self._run_together(feeds)
        return answer_each(requests, lambda request: self._answer(self._feeds(request)))

    def _answer(self, feeds: dict[str, np.ndarray]) -> list:
        results = self.runner.run(feeds)
        return [tensor(name, results[name]) for name in self.outputs]

    def _run_together(self, feeds: list[dict[str, np.ndarray]]) -> list:
        sizes = [len(next(iter(f.values()))) for f in feeds]
        joined = {name: np.concatenate([f[name] for f in feeds]) for name in feeds[0]}
        try:
            results = self.runner.run(joined)
        except Exception as exc:  # noqa: BLE001 - every request of the batch gets the error
            return [error(f"{type(exc).__name__}: {exc}") for _ in feeds]
        bounds = np.cumsum([0, *sizes])
        return [pb_utils.InferenceResponse(output_tensors=[tensor(name, results[name][a:b]) for name in self.outputs])
                for a, b in zip(bounds[:-1], bounds[1:])]

    def finalize(self) -> None:
        self.runner = None

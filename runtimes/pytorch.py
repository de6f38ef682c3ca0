"""PyTorch runner: an eval-mode module whose forward takes the inputs by position and returns
a tuple of outputs in `output_names` order."""

import numpy as np
import torch
from torch import nn

from runtimes.base import Runner


class TorchRunner(Runner):
    name = "pytorch"

    def __init__(self, module: nn.Module, input_names: list[str], output_names: list[str]) -> None:
        self.module = module.eval()
        self._inputs = list(input_names)
        self._outputs = list(output_names)

    @property
    def input_names(self) -> list[str]:
        return self._inputs

    @property
    def output_names(self) -> list[str]:
        return self._outputs

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        args = [torch.from_numpy(np.ascontiguousarray(feeds[name])) for name in self._inputs]
        with torch.inference_mode():
            outputs = self.module(*args)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        if len(outputs) != len(self._outputs):
            raise RuntimeError(f"{self.name}: module returned {len(outputs)} outputs, expected {len(self._outputs)}")
        return {name: out.detach().cpu().numpy() for name, out in zip(self._outputs, outputs)}

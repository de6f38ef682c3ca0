"""One interface over every backend: named numpy arrays in, named numpy arrays out."""

import time
from abc import ABC, abstractmethod
from collections.abc import Callable

import numpy as np


class Runner(ABC):
    """Runs one model on one backend. Feeds and results are keyed by tensor name."""

    name: str = "runner"
    _inputs: list[str]  # set by runners that know their names up front
    _outputs: list[str]

    @property
    def input_names(self) -> list[str]:
        return self._inputs

    @property
    def output_names(self) -> list[str]:
        return self._outputs

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One inference; returns every output, in `output_names` order."""

    def timer(self, feeds: dict[str, np.ndarray], include_transfers: bool = False) -> Callable[[], float]:
        """A callable running one inference on `feeds` and returning its seconds.

        Backends override it to keep inputs on the device and to time with device events.
        """

        def timed() -> float:
            begin = time.perf_counter()
            self.run(feeds)
            return time.perf_counter() - begin

        return timed

    def output_shape(self, name: str) -> tuple:
        """An output's shape as the backend declares it (dynamic dims as names or -1)."""
        raise NotImplementedError(f"{self.name} runners do not declare output shapes")

    def memory_probe(self) -> "Runner":
        """A runner whose single inference shows the memory one inference needs (default: this one;
        backends that keep memory pools between runs return one without them)."""
        return self

    def describe(self) -> dict:
        """What the timing ran on: backend, device, threads."""
        return {"runtime": self.name}

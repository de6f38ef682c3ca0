"""One interface over every backend: named numpy arrays in, named numpy arrays out."""

from abc import ABC, abstractmethod

import numpy as np


class Runner(ABC):
    """Runs one model on one backend. Feeds and results are keyed by tensor name."""

    name: str = "runner"

    @property
    @abstractmethod
    def input_names(self) -> list[str]: ...

    @property
    @abstractmethod
    def output_names(self) -> list[str]: ...

    @abstractmethod
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One inference; returns every output, in `output_names` order."""

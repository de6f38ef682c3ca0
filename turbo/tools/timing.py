"""Latency statistics and interleaved timing (A B A B …), like trtexec's summary."""

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

CV_WARNING = 0.05  # a coefficient of variation above this makes a run suspect


@dataclass(frozen=True)
class TimingStats:
    """Per-iteration latencies of one run, in milliseconds, and the throughput they imply."""

    iterations: int
    median_ms: float
    mean_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    cv: float  # sample standard deviation / mean
    throughput: float  # images/s at the median latency

    @classmethod
    def from_samples(cls, seconds: list[float], batch: int) -> "TimingStats":
        if not seconds:
            raise ValueError("no timing samples")
        ms = np.asarray(seconds, dtype=np.float64) * 1e3
        mean = float(ms.mean())
        cv = float(ms.std(ddof=1) / mean) if len(ms) > 1 and mean > 0 else 0.0
        median = float(np.median(ms))
        return cls(len(ms), median, mean, float(np.percentile(ms, 90)), float(np.percentile(ms, 99)),
                   float(ms.min()), cv, batch * 1e3 / median)

    @property
    def noisy(self) -> bool:
        return self.cv > CV_WARNING

    def to_dict(self) -> dict:
        return asdict(self)


def efficiency(speedup: float, bound: float) -> float:
    """Measured speedup as a fraction of the FLOPs bound (1.0 = all of it)."""
    return speedup / bound


def interleaved(timers: dict, warmup_s: float, iters: int | None,
                duration_s: float | None) -> dict[object, list[float]]:
    """Time every entry round-robin (A B A B …) so drift hits all of them alike.

    timers: key -> a callable running one iteration and returning its seconds. Each is warmed
    up for `warmup_s` (at least one call) first. Stops after `iters` rounds, or when
    `duration_s` of timing has elapsed (at least 3 rounds).
    """
    for timer in timers.values():
        _warm_up(timer, warmup_s)
    samples: dict[object, list[float]] = {key: [] for key in timers}
    begin = time.perf_counter()
    rounds = 0
    while True:
        for key, timer in timers.items():
            samples[key].append(timer())
        rounds += 1
        if iters is not None and rounds >= iters:
            break
        if iters is None and rounds >= 3 and time.perf_counter() - begin >= (duration_s or 0):
            break
    return samples


def _warm_up(timer: Callable[[], float], seconds: float) -> None:
    end = time.perf_counter() + seconds
    timer()
    while time.perf_counter() < end:
        timer()

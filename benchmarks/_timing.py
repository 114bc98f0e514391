"""Timing helper shared by the benchmark scripts (run as ``python benchmarks/<name>.py``)."""
from __future__ import annotations

import statistics
import time


def median_time(fn, reps: int) -> float:
    """Median seconds of `reps` calls of `fn`, after one warm-up call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)

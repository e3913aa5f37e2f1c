"""Timing helpers shared by the in-process benches (bench/concurrency.py, bench/greedy_head.py)."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def milliseconds(function: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """The median time of `function()` in ms, after `warmup` calls."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return 1e3 * statistics.median(times)

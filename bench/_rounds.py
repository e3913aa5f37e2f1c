"""Timing helpers shared by the averaging benches (bench/training.py, bench/robustness.py)."""

from __future__ import annotations

import threading
import time
from typing import Callable


def timed_round(call: Callable[[int], object], peers: int, timeout: float,
                prepare: Callable[[int], None] | None = None) -> tuple[list[float | None], list]:
    """Runs `call(peer)` in one thread per peer, all released together; per peer: (seconds, result),
    seconds None when that peer's round failed."""
    barrier = threading.Barrier(peers)
    seconds, results = [None] * peers, [None] * peers

    def peer(index: int) -> None:
        if prepare is not None:
            prepare(index)
        barrier.wait()
        started = time.perf_counter()
        try:
            result = call(index)
        except Exception as error:  # a failed round is counted, not fatal
            results[index] = error
            return
        if result is not None:
            seconds[index], results[index] = time.perf_counter() - started, result

    threads = [threading.Thread(target=peer, args=(index,)) for index in range(peers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    return seconds, results

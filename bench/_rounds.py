"""Timing helpers shared by the averaging benches (bench/training.py, bench/robustness.py)."""

from __future__ import annotations

import sys
import threading
import time
from typing import Callable

import torch

from protocol.network import STARTUP_TIMEOUT


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


class HivemindAveragers:
    """`count` of hivemind's DecentralizedAverager (each with its own DHT and averager processes)
    holding tensors of `shapes`, the baseline our rounds are timed against."""

    def __init__(self, initial_peers: list[str], count: int, shapes: list[tuple[int, ...]], prefix: str, *,
                 min_matchmaking_time: float, request_timeout: float, round_timeout: float):
        from hivemind import DHT
        from hivemind.averaging import DecentralizedAverager

        # loopback only, no UPnP/NAT-PMP probes (as our NetworkOptions), the same generous start-up
        network = dict(host_maddrs=["/ip4/127.0.0.1/tcp/0"], nat_port_map=False, startup_timeout=STARTUP_TIMEOUT)
        self.count, self.round_timeout = count, round_timeout
        self.dhts, self.averagers = [], []
        for _ in range(count):
            self.dhts.append(DHT(initial_peers=initial_peers, start=True, **network))
            self.averagers.append(DecentralizedAverager(
                [torch.zeros(shape) for shape in shapes], self.dhts[-1], prefix=prefix, target_group_size=count,
                min_matchmaking_time=min_matchmaking_time, request_timeout=request_timeout,
                allreduce_timeout=round_timeout, start=True))

    def timed_round(self, inputs: list[list[torch.Tensor]], matchmaking_timeout: float
                    ) -> tuple[list[float | None], list, list[list[torch.Tensor]]]:
        """One round on `inputs` (per averager): per averager its seconds (None: failed), what its
        step returned, and the tensors it holds afterwards."""
        def prepare(index):  # the averager averages its own shared tensors in place: load this round's inputs
            with self.averagers[index].get_tensors() as tensors:
                for tensor, value in zip(tensors, inputs[index]):
                    tensor.copy_(value)

        def call(index):
            return self.averagers[index].step(timeout=matchmaking_timeout, allow_retries=False)

        seconds, results = timed_round(call, self.count, self.round_timeout + matchmaking_timeout + 30, prepare)
        outputs = []
        for averager in self.averagers:
            with averager.get_tensors() as tensors:
                outputs.append([tensor.clone() for tensor in tensors])
        return seconds, results, outputs

    def shutdown(self) -> None:
        for process in [*self.averagers, *self.dhts]:
            try:
                process.shutdown()
            except Exception as error:
                print(f"shutting down {type(process).__name__}: {error}", file=sys.stderr)

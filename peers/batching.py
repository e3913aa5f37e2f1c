"""Batching the steps of concurrent sessions: many users cost little more than one.

Steps wait in a queue while the compute thread is busy; when it frees up, every waiting step
over the same blocks runs as one batch (each session keeps its own cache and positions, see
`BlockSpan.forward_many`). No step waits on purpose: a lone step runs at once.

While several sessions are generating, the compute thread may use fewer torch threads
(`busy_threads`): on a small machine shared with other processes, OpenMP workers spinning on
every core starve the network side and the neighbours (measured on 2 cores, 4 clients through
3 peers: 11.1 tokens/s in all with 2 threads each, 30.5 with 1).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

from peers.blocks import AttentionCache, BlockSpan

logger = logging.getLogger(__name__)


@dataclasses.dataclass(eq=False)  # compared by identity: fields hold tensors
class _PendingStep:
    hidden_states: torch.Tensor
    start: int
    end: int
    position: int
    cache: AttentionCache
    result: asyncio.Future


class StepBatcher:
    def __init__(self, blocks: BlockSpan, compute: ThreadPoolExecutor, after_compute: Callable[[], None],
                 max_batch_tokens: int = 256, busy_threads: int | None = None, active_for: float = 1.0):
        self.blocks, self.compute, self.after_compute = blocks, compute, after_compute
        self.max_batch_tokens, self.busy_threads, self.active_for = max_batch_tokens, busy_threads, active_for
        self._last_step: dict[int, float] = {}  # cache id -> when its session last sent a step
        self._idle_threads: int | None = None  # torch threads when one session generates
        self._pending: list[_PendingStep] = []
        self._wakeup = asyncio.Event()
        self._worker: asyncio.Task | None = None
        self.batches_run = 0  # how many multi-session batches ran (for logs and tests)

    async def submit(self, hidden_states: torch.Tensor, start: int, end: int, position: int,
                     cache: AttentionCache) -> torch.Tensor:
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work())
        loop = asyncio.get_running_loop()
        result = loop.create_future()
        self._last_step[id(cache)] = loop.time()
        self._pending.append(_PendingStep(hidden_states, start, end, position, cache, result))
        self._wakeup.set()
        return await result

    def _take_batch(self) -> list[_PendingStep]:
        first = self._pending[0]
        batch, tokens = [], 0
        for step in self._pending:
            size = step.hidden_states.shape[0] * step.hidden_states.shape[1]
            if (step.start, step.end) == (first.start, first.end) and (not batch or tokens + size <= self.max_batch_tokens):
                batch.append(step)
                tokens += size
        taken = {id(step) for step in batch}
        self._pending = [step for step in self._pending if id(step) not in taken]
        return batch

    def _generating_sessions(self, now: float) -> int:
        self._last_step = {key: when for key, when in self._last_step.items() if now - when < self.active_for}
        return len(self._last_step)

    def _run(self, batch: list[_PendingStep], busy: bool = False) -> list[torch.Tensor]:
        """On the compute thread (torch's thread count is per calling thread)."""
        if self._idle_threads is None:
            self._idle_threads = torch.get_num_threads()
        threads = self.busy_threads if busy and self.busy_threads else self._idle_threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        first = batch[0]
        if len(batch) == 1:
            outputs = [self.blocks(first.hidden_states, first.start, first.end, first.position, first.cache)]
        else:
            outputs = self.blocks.forward_many([(step.hidden_states, step.position, step.cache) for step in batch],
                                               first.start, first.end)
        self.after_compute()
        return outputs

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                batch = self._take_batch()
                live = [step for step in batch if not step.result.done()]  # a cancelled client is skipped
                if not live:
                    continue
                try:
                    busy = self._generating_sessions(loop.time()) > 1
                    outputs = await loop.run_in_executor(self.compute, self._run, live, busy)
                except Exception as error:
                    for step in live:
                        if not step.result.done():
                            step.result.set_exception(error)
                    continue
                if len(live) > 1:
                    self.batches_run += 1
                    if self.batches_run in (1, 10, 100) or self.batches_run % 1000 == 0:
                        logger.info(f"batched the steps of {len(live)} sessions ({self.batches_run} batches so far)")
                for step, output in zip(live, outputs):
                    if not step.result.done():
                        step.result.set_result(output)

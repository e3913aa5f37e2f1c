"""Batching the steps of concurrent sessions: many users cost little more than one.

Steps wait in a queue while the compute thread is busy; when it frees up, every waiting step
over the same blocks runs as one batch (each session keeps its own cache and positions, see
`BlockSpan.forward_many`). A lone step runs at once, unless other sessions are generating too:
then it waits for their next steps, but only for those expected soon (each session's rhythm,
the time between its steps, is tracked) and at most `gather_window` after it arrived (by
default twice the time a step takes here: one more session in the batch saves about one step
of compute). Without that wait, sessions that go through a chain of peers drift apart and each
peer runs them one by one (measured on 2 cores, 4 clients through 3 peers: the peers spent
31-36 ms of CPU per token with the batches that happened to form, 17-19 ms once steps waited
up to 20 ms for each other, and the clients got 1.7x one client's tokens/s instead of 2.1x).

While several sessions are generating, the compute thread may use fewer torch threads
(`busy_threads`): on a small machine shared with other processes, OpenMP workers spinning on
every core starve the network side and the neighbours (measured on 2 cores, 4 clients through
3 peers: 11.1 tokens/s in all with 2 threads each, 30.5 with 1).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
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
    arrived: float


@dataclasses.dataclass
class _Rhythm:
    """When a session last sent a step here, over which blocks, and how often it sends them."""

    last_step: float
    span: tuple[int, int]
    generating: bool  # its last step was one token
    interval: float | None = None  # typical time between its generation steps (moving average)


class StepBatcher:
    def __init__(self, blocks: BlockSpan, compute: ThreadPoolExecutor, after_compute: Callable[[], None],
                 max_batch_tokens: int = 256, busy_threads: int | None = None, active_for: float = 1.0,
                 gather_window: float | None = None):
        """`gather_window`: seconds a step may wait for other sessions' steps (None: twice the
        time a step takes here, measured; 0: never wait)."""
        self.blocks, self.compute, self.after_compute = blocks, compute, after_compute
        self.max_batch_tokens, self.busy_threads, self.active_for = max_batch_tokens, busy_threads, active_for
        self.gather_window = gather_window
        self._step_seconds: float | None = None  # moving average of one batch's compute time
        self._rhythms: dict[int, _Rhythm] = {}  # cache id -> its session's rhythm, while it is active
        # blocks -> the typical time between generation steps of the sessions over them, learned
        # from every session: the rhythm expected of a session that has not shown its own yet
        self._span_intervals: dict[tuple[int, int], float] = {}
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
        now, key = loop.time(), id(cache)
        generating = hidden_states.shape[1] == 1
        # the rhythm is learned between generation steps only: the gap after a prompt's step (its
        # prefill on every peer of the route) would start the average several times too long, and
        # steps would not wait for a session still taken to be far off (4 clients through 3 peers:
        # their 2nd to 10th tokens took 90-110 ms per round, against 55 ms once the averages settled)
        rhythm = self._rhythms.get(key)
        if rhythm is None:
            self._rhythms[key] = _Rhythm(now, (start, end), generating)
        else:
            if generating and rhythm.generating:
                interval = now - rhythm.last_step
                rhythm.interval = interval if rhythm.interval is None else 0.7 * rhythm.interval + 0.3 * interval
                known = self._span_intervals.get((start, end))
                self._span_intervals[(start, end)] = interval if known is None else 0.9 * known + 0.1 * interval
            rhythm.last_step, rhythm.span, rhythm.generating = now, (start, end), generating
        self._pending.append(_PendingStep(hidden_states, start, end, position, cache, result, now))
        self._wakeup.set()
        return await result

    def forget(self, cache: AttentionCache) -> None:
        """The session closed: no step of it is worth waiting for."""
        self._rhythms.pop(id(cache), None)

    @property
    def window(self) -> float:
        if self.gather_window is not None:
            return self.gather_window
        return 2 * self._step_seconds if self._step_seconds is not None else 0.0

    async def _gather(self) -> None:
        """Wait (until the window after the oldest waiting step arrived) for the next steps of the
        other generating sessions expected by then, so they run in one batch."""
        loop = asyncio.get_running_loop()
        first = self._pending[0]
        deadline = first.arrived + self.window
        while (remaining := deadline - loop.time()) > 0 and self._expected_by((first.start, first.end), deadline,
                                                                              loop.time()):
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                return

    def _expected_by(self, span: tuple[int, int], deadline: float, now: float) -> bool:
        """Some generating session over `span` (only those share a batch) without a waiting step is
        due to send one before `deadline`. A session that has not shown its rhythm yet (new, or
        just past its prompt) is expected at the rhythm of the span's earlier sessions: clients
        that start together then batch from their first tokens on (4 clients through 3 peers:
        their first 6 to 10 rounds ran as batches of 1 to 3 sessions while they learned it)."""
        waiting = {id(step.cache) for step in self._pending}
        typical = self._span_intervals.get(span)
        for key, rhythm in self._rhythms.items():
            interval = rhythm.interval if rhythm.interval is not None else typical
            if (key not in waiting and interval is not None and rhythm.span == span
                    and now - rhythm.last_step < self.active_for and rhythm.last_step + interval <= deadline):
                return True
        return False

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
        self._rhythms = {key: rhythm for key, rhythm in self._rhythms.items()
                         if now - rhythm.last_step < self.active_for}
        return len(self._rhythms)

    def _run(self, batch: list[_PendingStep], busy: bool = False) -> list[torch.Tensor]:
        """On the compute thread (torch's thread count is per calling thread)."""
        if self._idle_threads is None:
            self._idle_threads = torch.get_num_threads()
        threads = self.busy_threads if busy and self.busy_threads else self._idle_threads
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        first = batch[0]
        started = time.perf_counter()
        # one session alone too: forward_many's leaner layer loop beats transformers' own (8.8 against
        # 9.6 ms for a step through 10 blocks of the embedded model here), same numbers
        outputs = self.blocks.forward_many([(step.hidden_states, step.position, step.cache) for step in batch],
                                           first.start, first.end)
        if all(step.hidden_states.shape[1] == 1 for step in batch):  # generation steps set the window
            seconds = time.perf_counter() - started
            self._step_seconds = seconds if self._step_seconds is None else 0.8 * self._step_seconds + 0.2 * seconds
        self.after_compute()
        return outputs

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wakeup.wait()
            self._wakeup.clear()
            while self._pending:
                if self._generating_sessions(loop.time()) > 1:
                    await self._gather()
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

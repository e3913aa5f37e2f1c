"""Coded rounds: the exact mean gradient from the workers that answer first (gradient coding).

A round of `CodedAverager.coded_round` goes:
1. Matchmaking forms a group of n peers (hivemind's, as for any round). Worker i is the peer at
   position i of the group's order, which the leader drew and every member received: all
   peers number the workers alike.
2. Each worker computes the gradients of its code's s + 1 shards (`compute`, off the event
   loop), and sends their encoding (`swarm.coding`) into a butterfly all-reduce.
3. The reducer of each slice finishes it as soon as the messages heard so far decode
   (`swarm.training.coded_reduce.decide_part`): the s slowest workers are not waited for.
   The slice's result is the decoded sum of the n shard gradients divided by n, the mean
   shard gradient (the full-batch gradient when the shards have equal sizes); it is never a
   robust aggregate: the fractional code's copies check each other instead.
4. A straggler still gets the result: when its message finally comes, reducers that finished
   answer with the decoded slice and ignore the message. A finished round keeps answering
   until every groupmate was served (at most `round_timeout`), so replicas stay equal; even a
   worker later than `sender_timeout`, left out of every slice, gets it that way.

The reducers of a butterfly all-reduce are the group's peers, so a peer that stops answering
(not merely late with its own gradients) still fails the round, all or nothing, as before.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import AsyncIterator  # hivemind reads rpc_* annotations and knows typing's AsyncIterator only

import torch
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.partition import DEFAULT_PART_SIZE_BYTES
from hivemind.p2p import P2PContext, PeerID
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import achain, anext, as_aiter

from swarm.coding import GradientCode
from swarm.training.allreduce import Aggregate, RoundFailed
from swarm.training.averager import GroupAverager
from swarm.training.coded_reduce import CodedOptions, build_code, decide_part

logger = logging.getLogger(__name__)

__all__ = ["CodedAverager", "CodedOptions", "CodedRoundResult", "WorkerAssignment"]


@dataclasses.dataclass(frozen=True)
class WorkerAssignment:
    """What one worker computes in a coded round: the gradients of `shards`, out of `num_shards`
    equal shards of the round's data (shard ids 0..num_shards-1, as many as workers)."""
    worker: int
    num_shards: int
    shards: tuple[int, ...]


# compute(assignment) -> {shard: [gradient of each tensor]} for every shard of the assignment
Compute = Callable[[WorkerAssignment], Mapping[int, Sequence[torch.Tensor]]]


@dataclasses.dataclass(frozen=True)
class CodedRoundResult:
    tensors: list[torch.Tensor]  # the mean of the n shard gradients, equal on every peer of the group
    peer_ids: tuple[str, ...]  # the group: worker i is peer_ids[i]
    worker: int  # this peer's worker index
    left_out: frozenset[str]  # peers whose message came too late for a slice this peer reduced
    liars: frozenset[str]  # peers outvoted by their group (or sending NaN/Inf) in a slice this peer reduced
    seconds: float  # from the group's assembly to this peer holding the result, its computing included
    gathered: dict[str, dict]  # what each groupmate sent along


class CodedPartReducer:
    """Reduces this peer's slices of a coded round; stands in for hivemind's TensorPartReducer
    (same calls from AllReduceRunner) but decides each slice on its own, as messages arrive."""

    def __init__(self, part_shapes: Sequence[torch.Size], sender_workers: Sequence[int], code: GradientCode,
                 options: CodedOptions):
        self.part_shapes, self.num_parts = tuple(part_shapes), len(part_shapes)
        self.num_senders = len(sender_workers)
        self.finished = asyncio.Event()  # hivemind's runner waits on it for auxiliary peers only
        self.liars: set[int] = set()
        self.left_out: set[int] = set()
        self.failure: str | None = None
        self._workers, self._code, self._options = tuple(sender_workers), code, options
        self._messages: list[dict[int, torch.Tensor]] = [{} for _ in range(self.num_parts)]
        loop = asyncio.get_running_loop()
        self._results = [loop.create_future() for _ in range(self.num_parts)]
        for future in self._results:
            future.add_done_callback(_retrieve_exception)  # a failed slice nobody awaits is not an error to log
        self._failed_senders: set[int] = set()
        self._served = [0] * self.num_senders
        # every sender got every slice; one banned for lateness still counts as unserved: if it
        # comes after all, it gets the result (a peer that died keeps this up to round_timeout)
        self.all_served = asyncio.Event()
        self._check_served()

    async def accumulate_part(self, sender_index: int, part_index: int, tensor_part: torch.Tensor,
                              weight: float = 1.0) -> torch.Tensor:
        """The decoded slice, once it decodes. Weights are ignored: the code fixes every message's share.
        A message for a finished slice (a straggler's) is not used, but its sender gets the result."""
        future = self._results[part_index]
        if not future.done() and sender_index not in self._failed_senders:
            self._messages[part_index][self._workers[sender_index]] = tensor_part
            self._decide(part_index)
        result = await asyncio.shield(future)  # one sender's cancelled stream must not cancel the slice for all
        self._served[sender_index] += 1
        self._check_served()
        return result

    def on_sender_failed(self, sender_index: int) -> None:
        """A sender that hivemind gave up on (silent past sender_timeout, or broken stream)."""
        self._failed_senders.add(sender_index)
        worker = self._workers[sender_index]
        for part_index, future in enumerate(self._results):
            if not future.done() and worker not in self._messages[part_index]:
                self._decide(part_index)

    def finalize(self) -> None:
        """The local round ended: slices still undecided fail; decoded ones stay served to latecomers."""
        self.finished.set()
        for future in self._results:
            if not future.done():
                future.set_exception(RoundFailed("the round ended before this slice could be decoded"))

    def _decide(self, part_index: int) -> None:
        messages = self._messages[part_index]
        pending = [worker for sender, worker in enumerate(self._workers)
                   if sender not in self._failed_senders and worker not in messages]
        decision = decide_part(self._code, messages, pending, self._options.agreeing_copies, self._options.tolerance)
        self.liars |= decision.liars
        future = self._results[part_index]
        if decision.decode_from:
            self.left_out |= set(self._workers) - set(messages)
            decoded = self._code.decode({worker: messages[worker] for worker in decision.decode_from})
            future.set_result(decoded.div_(self._code.n))
            self._messages[part_index] = {}  # later messages for this slice are only answered
        elif decision.failure is not None:
            self.failure = self.failure or f"slice {part_index}: {decision.failure}"
            future.set_exception(RoundFailed(self.failure))

    def _check_served(self) -> None:
        if all(served >= self.num_parts for served in self._served):
            self.all_served.set()


def _retrieve_exception(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


class CodedAllReduceRunner(AllReduceRunner):
    """hivemind's butterfly all-reduce, with this peer's message computed once the group is known
    and slices reduced by `CodedPartReducer`. `tensors` are buffers the message is written into."""

    def __init__(self, *, code: GradientCode, coding: CodedOptions, compute: Compute, **kwargs):
        self.started = time.perf_counter()
        super().__init__(**kwargs)
        self.tensor_part_reducer.finished.set()  # the summing reducer built by the parent is never used (nor warns)
        self.code, self.coding, self._compute = code, coding, compute
        self.worker = list(self.ordered_peer_ids).index(self.peer_id)
        self.assignment = WorkerAssignment(self.worker, code.n, tuple(code.shards(self.worker)))
        self._buffers: list[torch.Tensor] = list(kwargs["tensors"])
        workers = [list(self.ordered_peer_ids).index(peer_id) for peer_id in self.sender_peer_ids]
        shapes = tuple(part.shape for part in self.parts_for_local_averaging)
        self.tensor_part_reducer = CodedPartReducer(shapes, workers, code, coding)
        self._missing_senders_watch: asyncio.Task | None = None
        self.seconds: float | None = None
        self.failed_reducers: set[str] = set()  # as AggregatingAllReduceRunner's: read by GroupAverager

    async def run_to_completion(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Compute and encode this worker's message, run the all-reduce, return the decoded mean
        (`tensors` are the buffers given at construction). RoundFailed unless every slice decoded."""
        try:
            gradients = await asyncio.get_running_loop().run_in_executor(None, self._compute, self.assignment)
            for buffer, message in zip(self._buffers, self._encode(gradients)):
                buffer.copy_(message)
        except asyncio.CancelledError:
            self.finalize(cancel=True)
            raise
        except Exception as error:
            self.finalize(exception=error)
            raise
        deltas = [delta async for delta in self.run()]
        if self.tensor_part_reducer.failure is not None:
            raise RoundFailed(f"coded round ({self.code.n} workers, {self.coding.code} code, s={self.code.s}): "
                              f"{self.tensor_part_reducer.failure}")
        failed = self.tensor_part_container.failed_size
        if failed or len(deltas) != len(self._buffers):
            raise RoundFailed(f"coded round: {failed} values of the group's tensors were not decoded (reducers that "
                              f"failed, left, or could not decode from the messages they got in time: "
                              f"{', '.join(sorted(self.failed_reducers)) or 'unknown'})")
        self.seconds = time.perf_counter() - self.started
        return [buffer + delta for buffer, delta in zip(self._buffers, deltas)]

    def _encode(self, gradients: Mapping[int, Sequence[torch.Tensor]]) -> list[torch.Tensor]:
        shards = self.assignment.shards
        missing = [shard for shard in shards if shard not in gradients]
        if missing:
            raise ValueError(f"compute returned the gradients of shards {sorted(gradients)}; worker {self.worker} "
                             f"must return those of shards {list(shards)} (missing {missing})")
        for shard in shards:
            shapes = [tuple(gradient.shape) for gradient in gradients[shard]]
            if shapes != [tuple(buffer.shape) for buffer in self._buffers]:
                raise ValueError(f"compute returned gradients of shapes {shapes} for shard {shard}; the round "
                                 f"averages tensors of shapes {[tuple(b.shape) for b in self._buffers]}")
        return [self.code.encode(self.worker, {shard: gradients[shard][index].to(buffer.dtype) for shard in shards})
                for index, buffer in enumerate(self._buffers)]

    async def _handle_missing_senders(self) -> None:
        # hivemind awaits this task before run() returns, i.e. until every sender started or
        # sender_timeout passed: exactly the wait for stragglers a coded round avoids. The watch
        # (and the bans it leads to) runs beside the round instead.
        self._missing_senders_watch = asyncio.create_task(super()._handle_missing_senders())

    async def _communicate_with_peer(self, peer_id: PeerID) -> None:
        try:
            await super()._communicate_with_peer(peer_id)
        except BaseException:
            self.failed_reducers.add(peer_id.to_base58())
            if peer_id == self.peer_id:
                # our own slices did not decode: mark them failed, or the output iterator waits forever
                self.tensor_part_container.register_failed_reducer(self.ordered_peer_ids.index(peer_id))
            raise

    def _check_reasons_to_reject(self, request: averaging_pb2.AveragingData, context: P2PContext
                                 ) -> averaging_pb2.AveragingData | None:
        # a finished round still answers late senders (hivemind's rejects them): they need the result
        if self._future.done() and not self._future.cancelled() and self._future.exception() is None:
            if request.group_id != self.group_id:
                return averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)
            if context.remote_id not in self.sender_peer_ids:
                return averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return None
        return super()._check_reasons_to_reject(request, context)

    async def wait_served(self, timeout: float) -> None:
        """Until every groupmate got its result, at most `timeout` seconds."""
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self.tensor_part_reducer.all_served.wait(), timeout)

    def close(self) -> None:
        if self._missing_senders_watch is not None:
            self._missing_senders_watch.cancel()
        self.finalize(cancel=True)  # no-op when the round already finished
        self.tensor_part_reducer.finalize()


@dataclasses.dataclass
class _CodedRequest:
    compute: Compute
    coding: CodedOptions
    runner: CodedAllReduceRunner | None = None


def _not_aggregated(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    raise AssertionError("coded rounds decode their slices; no aggregation rule applies")


class CodedAverager(GroupAverager):
    """A GroupAverager that also runs coded rounds (`coded_round`); plain `average` still works.
    One round at a time per averager, as for GroupAverager."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._coded_request: _CodedRequest | None = None
        self._coded_runners: dict[bytes, CodedAllReduceRunner] = {}  # by group id, until latecomers are served
        self._serving: set[asyncio.Task] = set()

    async def coded_round(self, compute: Compute, templates: Sequence[torch.Tensor], tag: str,
                          coding: CodedOptions = CodedOptions(), expected_group_size: int | None = None,
                          gather: dict | None = None) -> CodedRoundResult | None:
        """One coded round with the peers calling it with the same `tag`, `coding` and template
        shapes and dtypes. `compute(assignment)` runs off the event loop once the group formed and
        returns the gradients of the assignment's shards, one list like `templates` per shard.
        None when no group formed in time; RoundFailed when a round began but did not decode."""
        if getattr(self, "accountability", None) is not None:
            # signed contributions and reveals check a rule over individual inputs; a coded slice's
            # inputs are coded messages, checked by redundancy instead (swarm.training.coded_reduce)
            raise ValueError("coded rounds do not run with accountability: make the CodedAverager without peer_key")
        buffers = [torch.zeros(template.shape, dtype=template.dtype) for template in templates]
        request = self._coded_request = _CodedRequest(compute, coding)
        code_tag = f"{tag}/coded-{coding.code}-s{coding.stragglers}-copies{coding.agreeing_copies}"
        try:
            result = await self.average(buffers, code_tag, _not_aggregated, expected_group_size, gather)
        except BaseException:
            self._release(request.runner, serve_latecomers=False)
            raise
        finally:
            self._coded_request = None
        self._release(request.runner, serve_latecomers=True)
        if result is None:
            return None
        runner = request.runner
        reducer = runner.tensor_part_reducer
        return CodedRoundResult(
            tensors=result.tensors, peer_ids=result.peer_ids, worker=runner.worker,
            left_out=frozenset(result.peer_ids[worker] for worker in reducer.left_out),
            liars=frozenset(result.peer_ids[worker] for worker in reducer.liars),
            seconds=runner.seconds, gathered=result.gathered)

    def _make_runner(self, group: GroupInfo, tensors: Sequence[torch.Tensor], aggregate: Aggregate
                     ) -> AllReduceRunner:
        request = self._coded_request
        if request is None:
            return super()._make_runner(group, tensors, aggregate)
        # as GroupAverager's: slices of about 1/n of the data, so every peer reduces (hivemind's 512 KiB
        # parts would leave a small model's reduction to one or two peers)
        total_bytes = sum(tensor.numel() * tensor.element_size() for tensor in tensors)
        part_size = max(1024, min(DEFAULT_PART_SIZE_BYTES, -(-total_bytes // group.group_size)))
        try:
            code = build_code(request.coding, group.group_size)
        except ValueError as error:  # every member sees the same group size, so all of them stop here
            raise RoundFailed(f"a group of {group.group_size} formed, too small or of the wrong size for "
                              f"the round's code: {error}") from None
        runner = CodedAllReduceRunner(
            p2p=self._p2p, servicer_type=type(self), prefix=self.prefix, group_id=group.group_id,
            tensors=list(tensors), ordered_peer_ids=group.peer_ids,
            peer_fractions=(1.0 / group.group_size,) * group.group_size,
            sender_timeout=self.options.sender_timeout, reducer_timeout=self.options.reducer_timeout,
            part_size_bytes=part_size, code=code, coding=request.coding, compute=request.compute)
        request.runner = self._coded_runners[group.group_id] = runner
        return runner

    def _release(self, runner: CodedAllReduceRunner | None, serve_latecomers: bool) -> None:
        if runner is None:
            return
        if not serve_latecomers:
            self._close(runner)
            return
        task = asyncio.create_task(self._serve_latecomers(runner))
        self._serving.add(task)
        task.add_done_callback(self._serving.discard)

    async def _serve_latecomers(self, runner: CodedAllReduceRunner) -> None:
        try:
            await runner.wait_served(self.options.round_timeout)
        finally:
            self._close(runner)

    def _close(self, runner: CodedAllReduceRunner) -> None:
        runner.close()
        if self._coded_runners.get(runner.group_id) is runner:
            del self._coded_runners[runner.group_id]

    async def rpc_aggregate_part(self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
                                 ) -> AsyncIterator[averaging_pb2.AveragingData]:
        # a coded round is answered by its runner also after it finished here, for its stragglers
        request = await anext(stream)
        stream = achain(as_aiter(request), stream)
        runner = self._coded_runners.get(request.group_id)
        handler = super().rpc_aggregate_part if runner is None else runner.rpc_aggregate_part
        async for message in handler(stream, context):
            yield message

"""The network side of collaborative training: groups, all-reduce rounds and state download.

Runs in this process, on the event loop and P2P of a `SwarmClient` (no forked averager process
to orphan). Groups are formed by hivemind's `Matchmaking` (leaders declared under the run's DHT
key); a round is `AggregatingAllReduceRunner`'s butterfly all-reduce, all or nothing. Only peers
averaging the same thing meet: the round's tag (e.g. the epoch) goes into the schema hash that
every join request is checked against.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import logging
import re
from typing import AsyncIterator, Callable, Sequence

import msgpack
import torch
from hivemind.averaging.group_info import GroupInfo
from hivemind.averaging.matchmaking import Matchmaking
from hivemind.averaging.partition import DEFAULT_PART_SIZE_BYTES
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, P2PContext, PeerID, ServicerBase
from hivemind.proto import averaging_pb2
from hivemind.utils import get_dht_time
from hivemind.utils.asyncio import achain, aiter_with_timeout, anext, as_aiter

from protocol.peer_keys import PeerKey
from swarm.training.accountability import Accountability, AccountabilityOptions
from swarm.training.accountable import AccountableAllReduceRunner
from swarm.training.allreduce import Aggregate, AggregatingAllReduceRunner, RoundFailed
from swarm.training.evidence import SignedTensor

logger = logging.getLogger(__name__)
# hivemind advises power-of-two groups (its key bucketing, which a run of one bucket does not use)
logging.getLogger("hivemind.averaging.key_manager").setLevel(logging.ERROR)


class _QuietAbandonedWaits(logging.Filter):
    """hivemind's part reducer leaves an `Event.wait()` task per part for the garbage collector,
    which asyncio then reports as an error; they are harmless, so keep them out of our logs."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.getMessage().startswith("Task was destroyed but it is pending")
                    and "Event.wait()" in record.getMessage())


logging.getLogger("asyncio").addFilter(_QuietAbandonedWaits())

_RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_STATE_CHUNK = 1024 * 1024  # under hivemind's 4 MiB message cap


@dataclasses.dataclass(frozen=True)
class AveragingOptions:
    min_matchmaking_time: float = 2.0  # leaders wait this long for followers before starting a round
    request_timeout: float = 1.0  # a join request unanswered this long moves on to the next leader
    matchmaking_timeout: float = 5.0  # no group by then: the round did not happen
    round_timeout: float = 30.0  # the all-reduce itself; a round not done by then failed
    sender_timeout: float = 5.0  # a groupmate silent this long mid-round is left out of the parts it missed
    reducer_timeout: float = 10.0  # a reducer silent this long fails the round (all or nothing)
    state_timeout: float = 30.0  # downloading the current state from a peer


def check_run_id(run_id: str) -> str:
    if not _RUN_ID.match(run_id):
        raise ValueError(f"run id {run_id!r} must be 1-64 letters, digits, '-' or '_' (it names DHT keys)")
    return run_id


class _MatchmakingDHT:
    """hivemind's Matchmaking talks to a `hivemind.DHT` (a forked process); ours is a DHTNode in
    this process, so the same two calls are simply awaited."""

    def __init__(self, node: DHTNode, peer_id: PeerID):
        self.node, self.peer_id = node, peer_id

    async def store(self, key, subkey, value, expiration_time, return_future=True):
        return await self.node.store(key, value, expiration_time, subkey=subkey)

    async def get(self, key, latest=True, return_future=True):
        return await self.node.get(key, latest=latest)


async def _keep_group_key(group_info: GroupInfo) -> None:
    pass


@dataclasses.dataclass
class _Step:
    """The parts of hivemind's StepControl (a multiprocessing future) that Matchmaking reads."""
    scheduled_time: float
    deadline: float
    data_for_gather: bytes

    def get_timeout(self) -> float:
        return max(0.0, self.deadline - get_dht_time())


@dataclasses.dataclass(frozen=True)
class RoundResult:
    tensors: list[torch.Tensor]
    peer_ids: tuple[str, ...]  # the group, in reducer order
    gathered: dict[str, dict]  # what each groupmate sent along (its epoch, samples, ...)


class GroupAverager(ServicerBase):
    """Averages tensors with the run's peers; serves this peer's state to newcomers."""

    def __init_subclass__(cls, **kwargs):
        # hivemind caches a servicer's RPC handlers and stub type in class attributes on first use;
        # a subclass would inherit its parent's (names and methods included) if the parent was used
        # first, and its peers would then call handlers nobody registered
        super().__init_subclass__(**kwargs)
        cls._rpc_handlers, cls._stub_type = None, None

    def __init__(self, p2p: P2P, dht: DHTNode, run_id: str, options: AveragingOptions,
                 state_provider: Callable[[], bytes], peer_key: PeerKey | None = None,
                 accountability: AccountabilityOptions = AccountabilityOptions()):
        """With `peer_key` (this peer's Ed25519 libp2p identity) every round is signed and verified
        before it is applied, and lying reducers are banned and reported (swarm.training.accountability)."""
        self._p2p, self.prefix, self.options = p2p, check_run_id(run_id), options
        self.peer_key = peer_key
        self.accountability = (Accountability(p2p.peer_id.to_base58(), dht, run_id, accountability)
                               if peer_key is not None else None)
        # refused as groupmates on this peer's own finding, with no evidence others could check (peers
        # that coded groups outvoted again and again): peer id -> why
        self.local_bans: dict[str, str] = {}
        self.lie_as_reducer = False  # tests and benches: a Byzantine reducer
        self._reports_task: asyncio.Task | None = None
        self._dht = _MatchmakingDHT(dht, p2p.peer_id)
        self._state_provider = state_provider
        self._matchmaking: Matchmaking | None = None
        self._running_groups: dict[bytes, asyncio.Future] = {}
        self._groups_registered = asyncio.Event()
        self._groups_registered.set()
        self.round_started: Callable[[], None] | None = None  # tests: called once a round's all-reduce began

    @property
    def peer_id(self) -> PeerID:
        return self._p2p.peer_id

    @property
    def looking_for_group(self) -> bool:
        return self._matchmaking is not None and self._matchmaking.is_looking_for_group

    async def start(self) -> None:
        await self.add_p2p_handlers(self._p2p, namespace=self.prefix)
        if self.accountability is not None:
            self._reports_task = asyncio.create_task(self._read_reports_forever())

    async def stop(self) -> None:
        if self._reports_task is not None:
            self._reports_task.cancel()
            await asyncio.gather(self._reports_task, return_exceptions=True)

    async def _read_reports_forever(self, period: float = 2.0) -> None:
        while True:
            try:
                await self.accountability.read_reports()
            except Exception as error:
                logger.debug(f"reading reports failed: {error}")
            await asyncio.sleep(period)

    async def average(self, tensors: Sequence[torch.Tensor], tag: str, aggregate: Aggregate,
                      expected_group_size: int | None = None, gather: dict | None = None) -> RoundResult | None:
        """One round: find a group of peers averaging the same `tag`, aggregate every tensor with
        them. None when no group formed in time; RoundFailed when a round began but did not finish."""
        options = self.options
        schema = hashlib.sha256(repr((tag, [(tuple(t.shape), str(t.dtype)) for t in tensors])).encode()).digest()
        self._groups_registered.clear()
        self._matchmaking = Matchmaking(
            self._p2p, schema, self._dht, servicer_type=type(self), prefix=self.prefix,
            target_group_size=expected_group_size, min_group_size=2,
            min_matchmaking_time=options.min_matchmaking_time, request_timeout=options.request_timeout,
            client_mode=False)
        # hivemind re-buckets the group key after each round assuming groups never exceed the target;
        # ours can (the target is only our guess of the live peers) and the run uses one bucket anyway
        self._matchmaking.group_key_manager.update_key_on_group_assembled = _keep_group_key
        now = get_dht_time()
        step = _Step(scheduled_time=now + options.min_matchmaking_time, deadline=now + options.matchmaking_timeout,
                     data_for_gather=msgpack.packb(gather or {}))
        try:
            group = await self._matchmaking.look_for_group(step)
        except Exception as error:
            raise RoundFailed(f"matchmaking failed: {type(error).__name__}: {error}") from None
        finally:
            self._groups_registered.set()
        if group is None:
            return None
        banned = self._banned_in(group)
        if banned:
            raise RoundFailed(f"the group includes banned peer(s) {', '.join(banned)}: not taking part")
        with self._registered(group) as registered:
            runner = self._make_runner(group, tensors, aggregate)
            registered.set_result(runner)
            if self.round_started is not None:
                self.round_started()
            try:
                averaged = await asyncio.wait_for(runner.run_to_completion(tensors), options.round_timeout)
            except RoundFailed:
                if self.accountability is not None:  # joining groups only to let them fail is a strike
                    for reducer in runner.failed_reducers:
                        self.accountability.strike(reducer, "failed to reduce its part of a round")
                raise
            except Exception as error:
                raise RoundFailed(f"all-reduce with {group.group_size} peers failed: "
                                  f"{type(error).__name__}: {error}") from None
            if self.accountability is not None:  # before anything is applied
                await self.accountability.check_contributions(runner)
                await asyncio.wait_for(self.accountability.verify(runner, aggregate, self._request_reveal),
                                       self.options.round_timeout)
        gathered = {}
        for peer_id, data in zip(group.peer_ids, group.gathered):
            try:
                gathered[peer_id.to_base58()] = msgpack.unpackb(data)
            except Exception:
                gathered[peer_id.to_base58()] = {}
        return RoundResult(averaged, tuple(peer.to_base58() for peer in group.peer_ids), gathered)

    def _make_runner(self, group: GroupInfo, tensors: Sequence[torch.Tensor], aggregate: Aggregate
                     ) -> AggregatingAllReduceRunner:
        """The all-reduce of one round (subclasses swap in another runner, e.g. for coded gradients)."""
        # hivemind assigns whole parts (512 KiB by default) to reducers: a small model would be one part,
        # reduced (and trusted) by one peer. Parts of about 1/n of the data spread the work and the trust.
        total_bytes = sum(tensor.numel() * tensor.element_size() for tensor in tensors)
        part_size = max(1024, min(DEFAULT_PART_SIZE_BYTES, -(-total_bytes // group.group_size)))
        arguments = dict(p2p=self._p2p, servicer_type=type(self), prefix=self.prefix, group_id=group.group_id,
                         tensors=list(tensors), ordered_peer_ids=group.peer_ids,
                         peer_fractions=(1.0 / group.group_size,) * group.group_size,
                         sender_timeout=self.options.sender_timeout, reducer_timeout=self.options.reducer_timeout,
                         aggregate=aggregate, part_size_bytes=part_size)
        if self.accountability is None:
            return AggregatingAllReduceRunner(**arguments)
        runner = AccountableAllReduceRunner(peer_key=self.peer_key, lie_as_reducer=self.lie_as_reducer, **arguments)
        self.accountability.remember(runner)
        return runner

    def refuses(self, peer_id: str) -> bool:
        """Banned with evidence (accountability) or locally: never a groupmate of ours."""
        return peer_id in self.local_bans or (self.accountability is not None and peer_id in self.accountability.banned)

    def _banned_in(self, group: GroupInfo) -> list[str]:
        return [peer.to_base58() for peer in group.peer_ids if self.refuses(peer.to_base58())]

    @contextlib.contextmanager
    def _registered(self, group: GroupInfo):
        future = self._running_groups[group.group_id] = asyncio.get_running_loop().create_future()
        self._groups_registered.set()
        try:
            yield future
        finally:
            self._running_groups.pop(group.group_id, None)

    async def rpc_join_group(self, request: averaging_pb2.JoinRequest, context: P2PContext
                             ) -> AsyncIterator[averaging_pb2.MessageFromLeader]:
        if self.refuses(context.remote_id.to_base58()):
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        if self._matchmaking is None:
            yield averaging_pb2.MessageFromLeader(code=averaging_pb2.NOT_LOOKING_FOR_GROUP)
            return
        async for response in self._matchmaking.rpc_join_group(request, context):
            yield response

    async def rpc_aggregate_part(self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
                                 ) -> AsyncIterator[averaging_pb2.AveragingData]:
        request = await anext(stream)
        if request.group_id not in self._running_groups:
            # the leader may have started the round before its answer with the group id reached us
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._groups_registered.wait(), self.options.sender_timeout)
        future = self._running_groups.get(request.group_id)
        if future is None:
            yield averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)
            return
        runner = await future
        async for message in runner.rpc_aggregate_part(achain(as_aiter(request), stream), context):
            yield message

    async def rpc_download_state(self, _request: averaging_pb2.DownloadRequest, _context: P2PContext
                                 ) -> AsyncIterator[averaging_pb2.DownloadData]:
        # the provider takes the trainer's lock: run it off the event loop
        state = await asyncio.get_running_loop().run_in_executor(None, self._state_provider)
        for offset in range(0, len(state), _STATE_CHUNK):
            yield averaging_pb2.DownloadData(metadata=state[offset: offset + _STATE_CHUNK])

    async def rpc_reveal_part(self, request: averaging_pb2.DownloadData, _context: P2PContext
                              ) -> AsyncIterator[averaging_pb2.DownloadData]:
        """The signed contributions we combined into one part of a recent round."""
        if self.accountability is None:
            return
        try:
            wanted = msgpack.unpackb(request.metadata)
            contributions = self.accountability.reveal(bytes(wanted["group_id"]), int(wanted["part_index"]))
        except Exception:
            return
        for item in contributions:
            yield averaging_pb2.DownloadData(metadata=msgpack.packb(dataclasses.astuple(item)))

    async def _request_reveal(self, reducer: str, group_id: bytes, part_index: int) -> list[SignedTensor]:
        stub = self.get_stub(self._p2p, PeerID.from_base58(reducer), namespace=self.prefix)
        request = averaging_pb2.DownloadData(metadata=msgpack.packb({"group_id": group_id, "part_index": part_index}))
        stream = await stub.rpc_reveal_part(request)
        revealed = []
        async for message in aiter_with_timeout(stream, self.options.sender_timeout):
            signer, tensor, signature = msgpack.unpackb(message.metadata)
            revealed.append(SignedTensor(str(signer), bytes(tensor), bytes(signature)))
        return revealed

    async def download_state(self, peer_id: str) -> bytes:
        """The serialized state of one peer (see CollaborativeOptimizer.state_bytes)."""
        stub = self.get_stub(self._p2p, PeerID.from_base58(peer_id), namespace=self.prefix)
        stream = await stub.rpc_download_state(averaging_pb2.DownloadRequest())
        chunks = [message.metadata async for message in aiter_with_timeout(stream, self.options.state_timeout)]
        if not chunks:
            raise RoundFailed(f"peer {peer_id} sent no state")
        return b"".join(chunks)

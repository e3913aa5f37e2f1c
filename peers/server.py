"""The peer daemon: load the assigned blocks, serve them, announce them in the DHT.

Everything runs in this one process on one event loop: the libp2p daemon (tied to us), a
DHTNode on the same P2P (no forked DHT process to orphan), the RPC handlers, and a compute
thread. SIGINT/SIGTERM announce the peer offline before it leaves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import uvloop
from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time

from peers.blocks import BlockSpan
from peers.service import BlockService, ServingLimits
from peers.throughput import measure_bandwidth, span_throughput
from protocol.network import NetworkOptions, start_p2p
from protocol.records import PeerRecord, PeerState, parse_peer_records
from protocol.signing import RecordIdentity, RecordValidator
from protocol.weights import ModelStore, open_model
from swarm.balancing import better_span, choose_blocks

logger = logging.getLogger(__name__)

SOFTWARE_VERSION = "0.1.0"


@dataclasses.dataclass(frozen=True)
class AnnounceOptions:
    period: float = 15.0  # seconds between announcements
    expiry: float = 45.0  # a record lives this long unless renewed: a dead peer leaves the map by then
    public_name: str = ""
    rebalance_period: float = 60.0  # seconds between checks whether moving would help the swarm (0: never)
    drain_timeout: float = 60.0  # when moving or leaving, how long open sessions may finish first


@dataclasses.dataclass(frozen=True)
class PeerOptions:
    model: str
    blocks: tuple[int, int] | None
    initial_peers: tuple[str, ...]
    num_blocks: int | None = None  # with no blocks: how many to take where the swarm is weakest
    network: NetworkOptions = NetworkOptions()
    announce: AnnounceOptions = AnnounceOptions()
    limits: ServingLimits = ServingLimits()
    cache_dir: str | None = None
    throughput: float | None = None  # tokens/s; measured when not given


def parse_blocks(text: str) -> tuple[int, int]:
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise ValueError(f"--blocks takes A:B (for example 0:15), got {text!r}") from None
    return start, end


def available_memory_bytes() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise OSError("cannot read MemAvailable from /proc/meminfo")


def blocks_that_fit(store: ModelStore, available_bytes: int, share: float = 0.5) -> int:
    """How many blocks to serve from free memory: half of what is available, leaving the rest to the
    attention caches, the process itself and the machine's owner."""
    per_block = max(store.block_bytes(index) for index in range(store.num_blocks))
    return max(1, min(store.num_blocks, int(available_bytes * share // per_block)))


class Peer:
    def __init__(self, options: PeerOptions):
        self.options = options
        self.record_identity: RecordIdentity | None = None  # derived from --identity once p2p has written it
        self.state: PeerState = "joining"
        self.store: ModelStore | None = None
        self.service: BlockService | None = None
        self.throughput = 0.0
        self.bandwidth = 0.0
        self._stop = asyncio.Event()
        # Every torch call of the peer runs on this one thread: each thread that calls torch gets its
        # own OpenMP team, and an idle team's spinning workers halve the speed of the busy one
        # (measured: 27 ms per step on one thread, 50 ms once a second thread had used torch).
        self.compute = ThreadPoolExecutor(max_workers=1, thread_name_prefix="compute")

    async def _in_compute_thread(self, function, *args):
        return await asyncio.get_running_loop().run_in_executor(self.compute, function, *args)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, self._stop.set)
        options = self.options
        store = self.store = await self._in_compute_thread(open_model, options.model, options.cache_dir)
        if options.blocks is not None:
            start, end = options.blocks
            if not 0 <= start < end <= store.num_blocks:
                raise ValueError(f"--blocks {start}:{end} is out of range: {store.identity.name} has "
                                 f"{store.num_blocks} blocks, so use A:B with 0 <= A < B <= {store.num_blocks}")
        if options.num_blocks is not None and not 0 < options.num_blocks <= store.num_blocks:
            raise ValueError(f"--num-blocks {options.num_blocks} is out of range: use 1..{store.num_blocks}")
        p2p = await start_p2p(options.network, options.initial_peers)
        try:
            self.record_identity = (RecordIdentity.derived_from_file(options.network.identity_path)
                                    if options.network.identity_path else RecordIdentity.generate())
            node = await DHTNode.create(p2p=p2p, initial_peers=list(options.initial_peers) or None,
                                        record_validator=RecordValidator(self.record_identity), client_mode=False)
            addresses = [str(address) for address in await p2p.get_visible_maddrs()]
            print(f"peer id {p2p.peer_id}", flush=True)
            for address in addresses:
                print(address, flush=True)
            self.addresses, self.peer_id = addresses, str(p2p.peer_id)
            self.span = options.blocks or await self._choose_span(node)
            start, end = self.span
            await self._announce(node)  # joining: others see our choice before we load
            logger.info(f"loading blocks {start}:{end} of {store.identity.name} ({store.identity.fingerprint})")
            started = time.perf_counter()
            blocks = await self._in_compute_thread(BlockSpan, store, start, end)
            service = BlockService(store.identity, blocks, options.limits, self.compute)
            self.throughput = options.throughput or await self._in_compute_thread(self._measure, service)
            logger.info(f"loaded in {time.perf_counter() - started:.1f} s; {self.throughput:.1f} tokens/s over the span")
            self.service = service
            await self.service.register(p2p)
            others = [record.peer_id for record in await self._read_records(node)
                      if record.peer_id != self.peer_id and record.state == "online"]
            self.bandwidth = await measure_bandwidth(p2p, others[:3])
            if self.bandwidth:
                logger.info(f"network: {self.bandwidth * 8 / 1e6:.0f} Mbit/s to a peer in the swarm")
            self.state = "online"
            await self._announce(node)
            logger.info(f"online: serving blocks {start}:{end} as {p2p.peer_id}")
            background = [asyncio.create_task(self._announce_forever(node))]
            if options.blocks is None and options.announce.rebalance_period > 0:
                background.append(asyncio.create_task(self._rebalance_forever(node)))
            await self._stop.wait()
            for task in background:
                task.cancel()
            logger.info("stopping: announcing offline")
            self.state = "offline"
            await asyncio.wait_for(self._announce(node), timeout=10)
            await node.shutdown()
        finally:
            if self.service is not None:
                self.service.pushes.close()
            await p2p.shutdown()

    async def _read_records(self, node: DHTNode) -> list[PeerRecord]:
        found = await node.get(self.store.identity.dht_key, latest=True)
        values = found.value.values() if found is not None and isinstance(found.value, dict) else ()
        return parse_peer_records((item.value for item in values), self.store.identity)[0]

    async def _choose_span(self, node: DHTNode) -> tuple[int, int]:
        store = self.store
        count = self.options.num_blocks
        if count is None:
            count = blocks_that_fit(store, available_memory_bytes())
            logger.info(f"{count} of {store.num_blocks} blocks fit in half of the free memory")
        records = await self._read_records(node)
        start, end = choose_blocks([record for record in records if record.peer_id != str(node.peer_id)],
                                   store.num_blocks, count)
        logger.info(f"chose blocks {start}:{end}, where the swarm is weakest")
        return start, end

    def _measure(self, service: BlockService) -> float:
        """On the compute thread. The test flag --compute-delay bypasses the cache: it is not the device."""
        cache_file = Path(self.store.path).parent / "throughput.json"
        return span_throughput(service, cache_file, self.store.identity.fingerprint,
                               use_cache=not self.options.limits.compute_delay)

    async def _rebalance_forever(self, node: DHTNode) -> None:
        while True:
            # jittered, so that peers seeing the same imbalance rarely decide in the same instant;
            # a mover announces its new span at once and the others see it before their turn
            await asyncio.sleep(self.options.announce.rebalance_period * random.uniform(0.5, 1.5))
            try:
                target = better_span(await self._read_records(node), self.record(), self.store.num_blocks)
                if target is not None:
                    await self._move(node, target)
            except Exception as error:  # the next period tries again
                logger.warning(f"rebalancing failed: {error}")

    async def _move(self, node: DHTNode, target: tuple[int, int]) -> None:
        """Drain (no new sessions, open ones may finish), then load and serve the new span."""
        logger.info(f"moving from blocks {self.span[0]}:{self.span[1]} to {target[0]}:{target[1]}, "
                     f"where the swarm is weaker; draining first")
        self.state, self.service.draining = "draining", True
        await self._announce(node)
        deadline = time.monotonic() + self.options.announce.drain_timeout
        while self.service.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        if self.service.sessions:
            logger.info(f"{len(self.service.sessions)} sessions still open: their clients continue elsewhere")
        self.span, self.state = target, "joining"
        await self._announce(node)
        blocks = await self._in_compute_thread(BlockSpan, self.store, *target)
        self.service.replace_blocks(blocks)
        self.throughput = self.options.throughput or await self._in_compute_thread(self._measure, self.service)
        self.state, self.service.draining = "online", False
        await self._announce(node)
        logger.info(f"online: serving blocks {target[0]}:{target[1]}")

    def record(self) -> PeerRecord:
        start, end = self.span
        return PeerRecord(
            peer_id=self.peer_id, model=self.store.identity.name, fingerprint=self.store.identity.fingerprint,
            start=start, end=end, state=self.state, throughput=float(self.throughput),
            dtype="float32", cache_tokens_left=self.service.cache_tokens_left if self.service else 0,
            max_session_length=self.options.limits.max_session_length,
            sessions_left=self.options.limits.max_sessions - len(self.service.sessions) if self.service else 0,
            addresses=tuple(self.addresses), public_name=self.options.announce.public_name,
            software_version=SOFTWARE_VERSION, network_bandwidth=self.bandwidth,
        )

    async def _announce(self, node: DHTNode) -> None:
        # the DHT keeps whichever value expires last, so even the offline record must outlive the
        # previous one; clients skip it and it disappears at its expiry
        stored = await node.store(self.store.identity.dht_key, subkey=self.record_identity.owner_subkey,
                                  value=self.record().to_wire(),
                                  expiration_time=get_dht_time() + self.options.announce.expiry)
        if not stored:
            logger.warning("could not store this peer's record in the DHT; will retry at the next announcement")

    async def _announce_forever(self, node: DHTNode) -> None:
        while True:
            await asyncio.sleep(self.options.announce.period)
            try:
                await self._announce(node)
            except Exception as error:  # a flaky DHT must not take the peer down: the next period retries
                logger.warning(f"announcement failed: {error}")


def run_peer(options: PeerOptions) -> int:
    try:
        uvloop.run(Peer(options).run())
    except (ValueError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0

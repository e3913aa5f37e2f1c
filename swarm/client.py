"""The client's connection to the swarm: its own P2P and DHT node on a background event loop,
and a view of a model's peers that refreshes in the background (never in the token loop)."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import threading
import time
from typing import Any, Awaitable

import uvloop
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, PeerID

from protocol.network import NetworkOptions, UnreachablePeersError, start_p2p
from protocol.records import ModelIdentity, PeerRecord, parse_peer_records
from protocol.signing import RecordValidator
from swarm.retry import RetryPolicy
from swarm.routing import RouteMode, coverage

logger = logging.getLogger(__name__)


class SwarmConnectionError(RuntimeError):
    pass


@dataclasses.dataclass(frozen=True)
class ClientOptions:
    initial_peers: tuple[str, ...]
    network: NetworkOptions = NetworkOptions(client_mode=True)
    refresh_period: float = 3.0  # seconds between background DHT reads of the swarm map
    connect_timeout: float = 60.0
    coverage_timeout: float = 15.0  # how long to wait for peers to cover every block before failing
    step_timeout: float = 5.0  # a step unanswered this long (plus the allowance below) counts as a failed peer
    timeout_per_token: float = 0.05  # allowance per position in a step: long prompts and replays take longer
    retry: RetryPolicy = dataclasses.field(default_factory=RetryPolicy)
    route_mode: RouteMode = "latency"  # or "throughput": ignore round trips, favour the fastest compute
    rtt_refresh: float = 30.0  # seconds before a peer's round trip is measured again
    verify_fraction: float = 0.0  # check each peer's first step, then this share of its steps (swarm.verification)
    verify_tolerance: float = 1e-4  # relative error per position above which two answers disagree
    push: bool = True  # peers send each step's output on to the next hop themselves (see peers.push)

    def __post_init__(self) -> None:
        if not 0.0 <= self.verify_fraction <= 1.0:
            raise ValueError(f"verify_fraction must be between 0 (off) and 1 (every step), got {self.verify_fraction}")


class SwarmClient:
    """Owns a background thread running an event loop with this client's P2P and DHT node."""

    def __init__(self, options: ClientOptions):
        if not options.initial_peers:
            raise SwarmConnectionError("no initial peers given: pass the multiaddrs `swarm dht` printed "
                                       "(--initial-peers /ip4/.../tcp/.../p2p/...)")
        self.options = options
        self.retry = options.retry  # one policy for every session and forward of this client
        self.loop = uvloop.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="swarm-client", daemon=True)
        self._thread.start()
        self.p2p: P2P | None = None
        self.dht: DHTNode | None = None
        self._warned: set[str] = set()
        try:
            self.run(self._start(), timeout=options.connect_timeout)
        except BaseException:
            self.shutdown()
            raise

    async def _start(self) -> None:
        try:
            self.p2p = await start_p2p(self.options.network, self.options.initial_peers)
        except UnreachablePeersError as error:
            raise SwarmConnectionError(str(error)) from None
        try:
            self.dht = await DHTNode.create(p2p=self.p2p, initial_peers=list(self.options.initial_peers),
                                            client_mode=self.options.network.client_mode,
                                            record_validator=RecordValidator())
        except Exception as error:
            raise SwarmConnectionError(
                f"none of the initial peers answered ({', '.join(self.options.initial_peers)}): check the "
                f"addresses and that `swarm dht` is running ({type(error).__name__}: {error})") from None

    def step_timeout(self, hidden_states) -> float:
        """Seconds to wait for a peer's answer to hidden states [batch, tokens, hidden]."""
        positions = hidden_states.shape[0] * hidden_states.shape[1]
        return self.options.step_timeout + self.options.timeout_per_token * positions

    def run(self, coroutine: Awaitable[Any], timeout: float | None = None) -> Any:
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"the swarm did not answer within {timeout} s") from None

    def cancel_background(self, task: asyncio.Task) -> None:
        """Stop a task started on this client's loop (a refresher) and wait until it ended."""
        async def cancel() -> None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

        if not self.loop.is_closed():
            self.run(cancel(), timeout=10)

    def shutdown(self) -> None:
        if self.loop.is_closed():
            return

        async def stop() -> None:
            if self.dht is not None:
                await self.dht.shutdown()
            if self.p2p is not None:
                await self.p2p.shutdown()
            # hivemind leaves some background tasks (cache refresh) pending: end them quietly
            others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        if self._thread.is_alive():
            try:
                self.run(stop(), timeout=15)
            except Exception as error:
                logger.debug(f"client shutdown: {error}")
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self.loop.close()

    async def fetch_records(self, identity: ModelIdentity) -> list[PeerRecord]:
        found = await self.dht.get(identity.dht_key, latest=True)
        if found is None or not isinstance(found.value, dict):
            return []
        records, skipped = parse_peer_records((item.value for item in found.value.values()), identity)
        for reason in skipped:
            if reason not in self._warned:  # once per cause, not at every refresh
                self._warned.add(reason)
                logger.warning(f"skipping {reason}")
        return records


class SwarmView:
    """The latest known records of one model's peers, refreshed every `refresh_period`."""

    def __init__(self, client: SwarmClient, identity: ModelIdentity, num_blocks: int):
        self.client, self.identity, self.num_blocks = client, identity, num_blocks
        self.records: list[PeerRecord] = []
        self.rtts: dict[str, float] = {}  # measured round trip to each peer, seconds
        self._rtt_measured_at: dict[str, float] = {}
        self.updated_at = 0.0
        self._refresh_task = client.run(self._start())

    async def _start(self) -> asyncio.Task:
        return asyncio.create_task(self._refresh_forever())

    async def refresh(self) -> list[PeerRecord]:
        self.records = await self.client.fetch_records(self.identity)
        self.updated_at = time.monotonic()
        return self.records

    async def measure_rtts(self, unmeasured_only: bool = False) -> None:
        """Ping peers not measured lately (or, with `unmeasured_only`, never measured) in parallel
        with DHT pings, and keep the round trips."""
        now = time.monotonic()
        limit = float("inf") if unmeasured_only else self.client.options.rtt_refresh
        stale = [record.peer_id for record in self.records
                 if now - self._rtt_measured_at.get(record.peer_id, -1e9) > limit]

        async def ping(peer_id: str) -> None:
            started = time.perf_counter()
            answered = await self.client.dht.protocol.call_ping(PeerID.from_base58(peer_id), validate=False)
            self._rtt_measured_at[peer_id] = time.monotonic()
            if answered is not None:
                self.rtts[peer_id] = time.perf_counter() - started

        await asyncio.gather(*(ping(peer_id) for peer_id in stale), return_exceptions=True)

    async def _refresh_forever(self) -> None:
        while True:
            try:
                await self.refresh()
                await self.measure_rtts()
            except Exception as error:
                logger.warning(f"could not refresh the swarm map: {error}")
            await asyncio.sleep(self.client.options.refresh_period)

    async def wait_for_coverage(self, timeout: float) -> list[PeerRecord]:
        """The records, once every block has an online peer or the timeout passed."""
        deadline = time.monotonic() + timeout
        while True:
            records = await self.refresh()
            if all(coverage(records, self.num_blocks)) or time.monotonic() >= deadline:
                return records
            await asyncio.sleep(min(0.5, self.client.options.refresh_period))

    def close(self) -> None:
        self.client.cancel_background(self._refresh_task)

"""`swarm dht`: a bootstrap peer that only takes part in the DHT."""

from __future__ import annotations

import asyncio
import logging
import signal

import uvloop
from hivemind.dht.node import DHTNode

from protocol.network import NetworkOptions, start_p2p
from protocol.signing import RecordValidator

logger = logging.getLogger(__name__)


async def serve_bootstrap(network: NetworkOptions, initial_peers: tuple[str, ...] = ()) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    p2p = await start_p2p(network, initial_peers)
    try:
        node = await DHTNode.create(p2p=p2p, initial_peers=list(initial_peers) or None,
                                    record_validator=RecordValidator())
        for address in await p2p.get_visible_maddrs():
            print(address, flush=True)
        logger.info(f"DHT bootstrap peer {p2p.peer_id} is running; Ctrl-C stops it")
        await stop.wait()
        await node.shutdown()
    finally:
        await p2p.shutdown()


def run_bootstrap(network: NetworkOptions, initial_peers: tuple[str, ...] = ()) -> int:
    uvloop.run(serve_bootstrap(network, initial_peers))
    return 0

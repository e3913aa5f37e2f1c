"""Peer memory and start-up: resident memory of a peer serving 10 of 30 blocks against one
serving all 30, and the seconds from `swarm peer` to online with a warm block cache.

Run: .venv/bin/python bench/peer.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol.weights import EMBEDDED_MODEL, open_model  # noqa: E402
from swarm.client import ClientOptions, SwarmClient, SwarmView  # noqa: E402
from swarm.local_swarm import LocalSwarm  # noqa: E402


def resident_bytes(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise OSError(f"no VmRSS for {pid}")


def main() -> None:
    store = open_model(EMBEDDED_MODEL)  # warm cache: conversion is not part of start-up here
    results = {}
    with LocalSwarm(EMBEDDED_MODEL) as local:
        local.start_bootstrap()
        client = SwarmClient(ClientOptions(initial_peers=tuple(local.initial_peers)))
        view = SwarmView(client, store.identity, store.num_blocks)
        try:
            for span in ("0:10", "0:30"):
                started = time.perf_counter()
                child = local.start_peer(span)
                local.wait_until_online(view, [child])
                online_after = time.perf_counter() - started
                results[span] = (resident_bytes(child.process.pid), online_after)
                local.stop_peer(child)
        finally:
            view.close()
            client.shutdown()
    unserved = sum(store.block_bytes(index) for index in range(10, 30))
    small, large = results["0:10"][0], results["0:30"][0]
    print("| peer | resident memory | start-up to online (warm cache) |")
    print("|---|---|---|")
    for span, (rss, seconds) in results.items():
        print(f"| blocks {span} | {rss / 2**20:.0f} MiB | {seconds:.1f} s |")
    print(f"\ndifference {(large - small) / 2**20:.0f} MiB; weights of the 20 blocks not served: "
          f"{unserved / 2**20:.0f} MiB ({(large - small) / unserved:.0%} of them)")


if __name__ == "__main__":
    main()

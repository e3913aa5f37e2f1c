"""Route search over synthetic swarms: time to find a route among 10 to 1,000 peer records.

Run: .venv/bin/python bench/routing.py
"""

from __future__ import annotations

import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from protocol.records import PeerRecord  # noqa: E402
from swarm.routing import find_route  # noqa: E402

NUM_BLOCKS = 30


def synthetic_swarm(num_peers: int, rng: random.Random) -> tuple[list[PeerRecord], dict[str, float]]:
    records, rtts = [], {}
    for index in range(num_peers):
        length = rng.randint(1, 15)
        start = rng.randint(0, NUM_BLOCKS - length) if index >= 2 else index * 15  # the first two cover all
        length = 15 if index < 2 else length
        peer_id = f"peer{index}"
        records.append(PeerRecord(peer_id=peer_id, model="m", fingerprint="f", start=start, end=start + length,
                                  state="online", throughput=rng.uniform(1, 100)))
        rtts[peer_id] = rng.uniform(0.001, 0.2)
    return records, rtts


def main() -> None:
    rng = random.Random(0)
    print("| peer records | route search (median of 20) | hops |")
    print("|---|---|---|")
    for num_peers in (10, 100, 1000):
        records, rtts = synthetic_swarm(num_peers, rng)
        times, route = [], []
        for _ in range(20):
            started = time.perf_counter()
            route = find_route(records, NUM_BLOCKS, rtts=rtts, rng=rng)
            times.append(time.perf_counter() - started)
        print(f"| {num_peers} | {statistics.median(times) * 1000:.1f} ms | {len(route)} |")


if __name__ == "__main__":
    main()

"""Routes through the swarm: which peer computes which blocks. Pure functions over records.

A route is the cheapest chain of hops over blocks [start, end). The cost of a hop is the
peer's compute time for the blocks it is asked for (its announced throughput covers its whole
span, so k of its L blocks cost k / (L * throughput) seconds per token) plus, in latency mode,
the client's measured round trip to it. Spans may overlap and a hop may use part of a span.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Iterable, Literal, Mapping, Sequence

from protocol.records import PeerRecord

RouteMode = Literal["latency", "throughput"]
DEFAULT_RTT = 0.005  # seconds, for a peer the client has not measured yet
JITTER = 0.05  # costs are scaled by up to ±5% at random, so clients spread over equal alternatives


@dataclasses.dataclass(frozen=True)
class Hop:
    peer_id: str
    start: int
    end: int  # exclusive; may be inside the peer's announced span


class MissingBlocksError(RuntimeError):
    def __init__(self, missing: Sequence[int], num_blocks: int, detail: str = ""):
        self.missing = list(missing)
        super().__init__(f"no online peer serves blocks {format_blocks(self.missing)} of {num_blocks}{detail}; "
                         f"start a peer for them (swarm peer MODEL --blocks A:B) or wait for one to join")


def format_blocks(blocks: Sequence[int]) -> str:
    """[0, 1, 2, 7] -> '0:3, 7:8' (spans with exclusive ends, like --blocks)."""
    spans: list[list[int]] = []
    for block in sorted(blocks):
        if spans and spans[-1][1] == block:
            spans[-1][1] = block + 1
        else:
            spans.append([block, block + 1])
    return ", ".join(f"{start}:{end}" for start, end in spans)


def coverage(records: Iterable[PeerRecord], num_blocks: int) -> list[int]:
    """Online peers per block."""
    counts = [0] * num_blocks
    for record in records:
        if record.state == "online":
            for block in range(max(0, record.start), min(num_blocks, record.end)):
                counts[block] += 1
    return counts


def find_route(records: Iterable[PeerRecord], num_blocks: int, start: int = 0, end: int | None = None,
               avoid: frozenset[str] = frozenset(), rtts: Mapping[str, float] | None = None,
               mode: RouteMode = "latency", rng: random.Random | None = None) -> list[Hop]:
    """The cheapest route over blocks [start, end) (see the module docstring for the cost).

    Dynamic programming over block boundaries in increasing order: each peer keeps the best
    "entry" value min(dist[s] - s * per_block) over the boundaries s inside its span, so a
    boundary e is reached via that peer at entry + e * per_block + hop cost. Linear in
    (blocks x peers covering them): 1,000 peers over 30 blocks take milliseconds.
    """
    end = num_blocks if end is None else end
    rng = rng or random.Random()
    rtts = rtts or {}
    peers = [record for record in records
             if record.state == "online" and record.peer_id not in avoid and record.start < end and record.end > start]
    per_block, hop_cost = {}, {}
    for record in peers:
        jitter = 1.0 + JITTER * (2 * rng.random() - 1)
        per_block[record.peer_id] = jitter / ((record.end - record.start) * max(record.throughput, 1e-3))
        hop_cost[record.peer_id] = rtts.get(record.peer_id, DEFAULT_RTT) * jitter if mode == "latency" else 0.0

    infinity = float("inf")
    distance = {start: 0.0}
    came_from: dict[int, tuple[int, str]] = {}
    entry: dict[str, tuple[float, int]] = {}  # peer -> (best dist[s] - s * per_block, that s)
    by_start: dict[int, list[PeerRecord]] = {}
    for record in peers:
        by_start.setdefault(max(record.start, start), []).append(record)
    active: list[PeerRecord] = []
    for boundary in range(start, end + 1):
        if boundary > start:  # reach this boundary through any active peer
            best, best_from = infinity, None
            for record in active:
                if record.peer_id not in entry:  # no reachable boundary inside its span yet
                    continue
                value, entered_at = entry[record.peer_id]
                cost = value + boundary * per_block[record.peer_id] + hop_cost[record.peer_id]
                if cost < best:
                    best, best_from = cost, (entered_at, record.peer_id)
            if best_from is not None:
                distance[boundary], came_from[boundary] = best, best_from
        active = [record for record in active if record.end > boundary]
        active += by_start.get(boundary, [])
        if boundary in distance:  # a peer can be entered here
            for record in active:
                value = distance[boundary] - boundary * per_block[record.peer_id]
                if record.peer_id not in entry or value < entry[record.peer_id][0]:
                    entry[record.peer_id] = (value, boundary)
    if end not in distance:
        missing = [block for block, count in enumerate(coverage(peers, num_blocks))
                   if count == 0 and start <= block < end]
        raise MissingBlocksError(missing or [max(distance)], num_blocks)
    route: list[Hop] = []
    boundary = end
    while boundary != start:
        entered_at, peer_id = came_from[boundary]
        route.append(Hop(peer_id, entered_at, boundary))
        boundary = entered_at
    return route[::-1]

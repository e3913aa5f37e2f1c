"""Which blocks a new peer should serve. Pure functions over peer records."""

from __future__ import annotations

import dataclasses
from typing import Iterable

from protocol.records import PeerRecord

JOINING_THROUGHPUT = 1.0  # a joining peer has not measured itself yet, but its choice must count


def block_throughput(records: Iterable[PeerRecord], num_blocks: int) -> list[float]:
    """Total announced throughput per block over online and joining peers."""
    totals = [0.0] * num_blocks
    for record in records:
        if record.state in ("online", "joining"):
            weight = record.throughput if record.state == "online" else max(record.throughput, JOINING_THROUGHPUT)
            for block in range(max(0, record.start), min(num_blocks, record.end)):
                totals[block] += weight
    return totals


def choose_blocks(records: Iterable[PeerRecord], num_blocks: int, count: int) -> tuple[int, int]:
    """The `count` consecutive blocks where the swarm is weakest.

    First the window covering most unserved blocks, then the least total throughput, then the
    lowest start (deterministic, so tests and operators can predict it)."""
    count = max(1, min(count, num_blocks))
    totals = block_throughput(records, num_blocks)

    def weakness(start: int) -> tuple[int, float, int]:
        window = totals[start : start + count]
        return (-sum(1 for value in window if value == 0), sum(window), start)

    start = min(range(num_blocks - count + 1), key=weakness)
    return start, start + count


def swarm_bottleneck(records: Iterable[PeerRecord], num_blocks: int) -> float:
    """The throughput of the weakest block: what limits every route through the model."""
    return min(block_throughput(records, num_blocks))


def better_span(records: Iterable[PeerRecord], me: PeerRecord, num_blocks: int,
                min_gain: float = 1.2) -> tuple[int, int] | None:
    """Where this peer should move, if moving raises the swarm's weakest block by `min_gain`x.

    The gain is simulated on the records: remove the peer, place it where the swarm is then
    weakest, compare bottlenecks. `min_gain` > 1 so that float noise and small differences do
    not make peers churn (every move drains sessions and reloads weights)."""
    others = [record for record in records if record.peer_id != me.peer_id]
    count = me.end - me.start
    start, end = choose_blocks(others, num_blocks, count)
    if (start, end) == (me.start, me.end):
        return None
    moved = dataclasses.replace(me, start=start, end=end)
    now = swarm_bottleneck([*others, me], num_blocks)
    after = swarm_bottleneck([*others, moved], num_blocks)
    if now == 0 and after > 0 or after > now * min_gain:
        return start, end
    return None

"""Which blocks a new peer should serve. Pure functions over peer records."""

from __future__ import annotations

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

"""Routes through the swarm: which peer computes which blocks. Pure functions over records."""

from __future__ import annotations

import dataclasses
import random
from typing import Iterable, Sequence

from protocol.records import PeerRecord


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
               avoid: frozenset[str] = frozenset(), rng: random.Random | None = None) -> list[Hop]:
    """A route over blocks [start, end): from each position, the online peer reaching furthest.

    Fewest hops keeps network round trips (the only swarm overhead) low; ties go to the faster
    peer, then at random so that equal peers share the load.
    """
    end = num_blocks if end is None else end
    rng = rng or random.Random()
    online = [record for record in records if record.state == "online" and record.peer_id not in avoid]
    route: list[Hop] = []
    position = start
    while position < end:
        candidates = [record for record in online if record.start <= position < record.end]
        if not candidates:
            missing = [block for block, count in enumerate(coverage(online, num_blocks))
                       if count == 0 and start <= block < end]
            raise MissingBlocksError(missing, num_blocks)
        best = max(candidates, key=lambda record: (min(record.end, end), record.throughput, rng.random()))
        hop_end = min(best.end, end)
        route.append(Hop(best.peer_id, position, hop_end))
        position = hop_end
    return route

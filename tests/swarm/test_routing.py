import random

import pytest

from protocol.records import PeerRecord
from swarm.routing import MissingBlocksError, coverage, find_route, format_blocks


def peer(name: str, start: int, end: int, state: str = "online", throughput: float = 10.0) -> PeerRecord:
    return PeerRecord(peer_id=name, model="m", fingerprint="f", start=start, end=end, state=state,
                      throughput=throughput)


def test_route_chains_spans_with_fewest_hops():
    records = [peer("a", 0, 15), peer("b", 15, 30), peer("c", 0, 5), peer("d", 5, 30)]
    route = find_route(records, 30, rng=random.Random(0))
    assert [(hop.peer_id, hop.start, hop.end) for hop in route] in ([("a", 0, 15), ("d", 15, 30)],
                                                                     [("a", 0, 15), ("b", 15, 30)])


def test_route_may_use_part_of_a_span():
    route = find_route([peer("a", 0, 20), peer("b", 10, 30)], 30)
    assert [(hop.peer_id, hop.start, hop.end) for hop in route] == [("a", 0, 20), ("b", 20, 30)]


def test_offline_draining_and_avoided_peers_are_not_used():
    records = [peer("a", 0, 30, state="draining"), peer("b", 0, 30, state="offline"), peer("c", 0, 30)]
    assert [hop.peer_id for hop in find_route(records, 30)] == ["c"]
    with pytest.raises(MissingBlocksError):
        find_route(records, 30, avoid=frozenset({"c"}))


def test_missing_blocks_are_named():
    with pytest.raises(MissingBlocksError, match="10:20, 25:30"):
        find_route([peer("a", 0, 10), peer("b", 20, 25)], 30)


def test_coverage_counts_online_peers_per_block():
    assert coverage([peer("a", 0, 2), peer("b", 1, 3), peer("c", 0, 3, state="joining")], 4) == [1, 2, 1, 0]
    assert format_blocks([0, 1, 2, 7]) == "0:3, 7:8"

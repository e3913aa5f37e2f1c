import random

import pytest

from protocol.records import PeerRecord
from swarm.routing import MissingBlocksError, coverage, find_route, format_blocks


def peer(name: str, start: int, end: int, state: str = "online", throughput: float = 10.0) -> PeerRecord:
    return PeerRecord(peer_id=name, model="m", fingerprint="f", start=start, end=end, state=state,
                      throughput=throughput)


def hops(route):
    return [(hop.peer_id, hop.start, hop.end) for hop in route]


def test_route_prefers_fewer_hops_when_compute_is_equal():
    records = [peer("a", 0, 15), peer("b", 15, 30), peer("c", 0, 30, throughput=5.0)]  # c: same time per token
    rtts = {"a": 0.05, "b": 0.05, "c": 0.05}  # one round trip saved outweighs the ±5% jitter of 0.2 s compute
    for seed in range(20):
        assert hops(find_route(records, 30, rtts=rtts, rng=random.Random(seed))) == [("c", 0, 30)]


def test_route_uses_the_fastest_peers_for_each_block():
    records = [peer("a", 0, 15), peer("b", 15, 30), peer("c", 0, 5), peer("d", 5, 30)]
    # d computes each block faster than a or b (same throughput over a longer span)
    assert hops(find_route(records, 30, rng=random.Random(0))) == [("a", 0, 5), ("d", 5, 30)]


def test_slow_peer_is_avoided_when_a_faster_alternative_exists():
    records = [peer("front", 0, 15), peer("slow", 15, 30, throughput=1.0), peer("fast", 15, 30, throughput=20.0)]
    for seed in range(20):
        assert hops(find_route(records, 30, rng=random.Random(seed)))[-1][0] == "fast"


def test_high_latency_peer_is_avoided_in_latency_mode_only():
    records = [peer("near", 0, 30, throughput=10.0), peer("far", 0, 30, throughput=11.0)]
    rtts = {"near": 0.001, "far": 0.5}
    assert hops(find_route(records, 30, rtts=rtts, mode="latency")) == [("near", 0, 30)]
    assert hops(find_route(records, 30, rtts=rtts, mode="throughput")) == [("far", 0, 30)]


def test_equal_alternatives_are_shared_between_clients():
    records = [peer("front", 0, 15), peer("b1", 15, 30), peer("b2", 15, 30)]
    chosen = [find_route(records, 30, rng=random.Random(seed))[-1].peer_id for seed in range(200)]
    assert 60 < chosen.count("b1") < 140


def test_route_over_a_sub_range():
    assert hops(find_route([peer("a", 0, 30)], 30, start=10, end=20)) == [("a", 10, 20)]


def test_route_may_use_part_of_a_span():
    route = find_route([peer("a", 0, 20), peer("b", 10, 30, throughput=100.0)], 30)
    assert hops(route) == [("a", 0, 10), ("b", 10, 30)]


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

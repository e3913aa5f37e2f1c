import dataclasses

from protocol.records import PeerRecord
from swarm.balancing import better_span, block_throughput, choose_blocks


def peer(start, end, state="online", throughput=10.0):
    return PeerRecord(peer_id=f"p{start}-{end}", model="m", fingerprint="f", start=start, end=end, state=state,
                      throughput=throughput)


def test_empty_swarm_starts_at_block_zero():
    assert choose_blocks([], 30, 12) == (0, 12)


def test_three_peers_of_twelve_cover_thirty_blocks():
    records = []
    for _ in range(3):
        start, end = choose_blocks(records, 30, 12)
        records.append(peer(start, end))
    covered = {block for record in records for block in range(record.start, record.end)}
    assert covered == set(range(30))


def test_joining_peers_count_so_simultaneous_starts_spread():
    first = choose_blocks([], 30, 10)
    second = choose_blocks([peer(*first, state="joining", throughput=0.0)], 30, 10)
    assert second != first and second == (10, 20)


def test_offline_peers_do_not_count_and_weak_spans_attract():
    records = [peer(0, 15, throughput=100.0), peer(15, 30, throughput=1.0), peer(0, 30, state="offline")]
    assert choose_blocks(records, 30, 15) == (15, 30)
    assert block_throughput(records, 30)[0] == 100.0
    assert choose_blocks(records, 30, 99) == (0, 30)  # clamps to the model


def test_peer_moves_to_fill_a_gap_left_by_another():
    me = dataclasses.replace(peer(0, 10), peer_id="me")
    records = [me, peer(0, 10), peer(10, 20)]  # blocks 20:30 lost their peer
    assert better_span(records, me, 30) == (20, 30)


def test_peer_stays_when_the_swarm_is_balanced_or_the_gain_is_small():
    me = dataclasses.replace(peer(0, 10), peer_id="me")
    assert better_span([me, peer(10, 20), peer(20, 30)], me, 30) is None
    slightly_weaker = [me, peer(0, 10, throughput=1.0), peer(10, 20, throughput=10.0), peer(20, 30, throughput=9.5)]
    assert better_span(slightly_weaker, me, 30) is None

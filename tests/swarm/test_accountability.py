"""Lying reducers in real rounds (real DHT and libp2p, peers in this process): caught by the
peers they answered, banned, reported, and convicted by a peer that only read the report."""

import os
import tempfile
import threading

import torch

from protocol.network import NetworkOptions
from protocol.peer_keys import PeerKey
from swarm.client import ClientOptions, SwarmClient
from swarm.robust import get_aggregator
from swarm.training import AveragingOptions
from swarm.training.allreduce import RoundFailed
from swarm.training.averager import GroupAverager

FAST = AveragingOptions(min_matchmaking_time=1.0, request_timeout=0.5, matchmaking_timeout=8.0, sender_timeout=20.0,
                        reducer_timeout=40.0)


def accountable_peer(initial_peers, folder):
    path = os.path.join(folder, f"identity-{len(os.listdir(folder))}.key")
    key = PeerKey.create_identity_file(path)
    client = SwarmClient(ClientOptions(initial_peers=tuple(initial_peers), network=NetworkOptions(identity_path=path)))
    averager = GroupAverager(client.p2p, client.dht, "liars", FAST, state_provider=bytes, peer_key=key)
    client.run(averager.start())
    assert client.p2p.peer_id.to_base58() == key.peer_id  # the peer id names the signing key
    return client, averager


def average_all(peers, tensors, tag, expected):
    outcomes = [None] * len(peers)

    def run(index):
        client, averager = peers[index]
        try:
            outcomes[index] = client.run(averager.average(tensors[index], tag, get_aggregator("median"), expected),
                                         timeout=60)
        except RoundFailed as error:
            outcomes[index] = error

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(peers))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return outcomes


def test_a_lying_reducer_is_caught_banned_reported_and_left_out(initial_peers):
    folder = tempfile.mkdtemp()
    peers = [accountable_peer(initial_peers, folder) for _ in range(4)]
    try:
        liar_id = peers[3][1].peer_id.to_base58()
        tensors = [[torch.randn(4000, generator=torch.Generator().manual_seed(index))] for index in range(4)]

        honest_round = average_all(peers, tensors, "honest", 4)
        expected = torch.stack([t[0] for t in tensors]).median(dim=0)  # torch's lower median for an even count
        for outcome in honest_round:
            assert not isinstance(outcome, Exception), outcome
            assert outcome.tensors[0].shape == expected.values.shape

        peers[3][1].lie_as_reducer = True
        lying_round = average_all(peers, tensors, "lying", 4)
        for index in range(3):
            assert isinstance(lying_round[index], RoundFailed), lying_round[index]
            assert "banned and reported" in str(lying_round[index])
            assert liar_id in peers[index][1].accountability.banned

        newcomer = accountable_peer(initial_peers, folder)  # was not in the group: trusts nothing, checks
        peers.append(newcomer)
        accountability = newcomer[1].accountability
        accountability.aggregate = get_aggregator("median")
        newcomer[0].run(accountability.read_reports(), timeout=30)
        assert liar_id in accountability.banned, "the published evidence convicts the liar"

        # the next round goes on without the liar: honest peers refuse it as a groupmate
        honest = [peers[0], peers[1], peers[2]]
        after = average_all([*honest, peers[3]], [*tensors[:3], tensors[3]], "after", 3)
        for outcome in after[:3]:
            assert not isinstance(outcome, Exception) and outcome is not None, outcome
            assert liar_id not in outcome.peer_ids
    finally:
        for client, averager in peers:
            client.run(averager.stop(), timeout=10)
            client.shutdown()


def test_a_peer_sending_nan_again_and_again_is_banned_by_groupmates_and_readers(initial_peers):
    folder = tempfile.mkdtemp()
    peers = [accountable_peer(initial_peers, folder) for _ in range(4)]
    try:
        sender_id = peers[3][1].peer_id.to_base58()
        tensors = [[torch.full((2000,), float(index))] for index in range(3)] + [[torch.full((2000,), float("nan"))]]
        for round_number in range(3):
            outcomes = average_all(peers, tensors, f"nan-{round_number}", 4)
            for outcome in outcomes[:3]:
                assert not isinstance(outcome, Exception) and outcome is not None, outcome
                assert torch.equal(outcome.tensors[0], torch.full((2000,), 1.0))  # the median of 0, 1, 2
        for client, averager in peers[:3]:
            assert sender_id in averager.accountability.banned
        newcomer = accountable_peer(initial_peers, folder)
        peers.append(newcomer)
        newcomer[1].accountability.aggregate = get_aggregator("median")
        newcomer[0].run(newcomer[1].accountability.read_reports(), timeout=30)
        assert sender_id in newcomer[1].accountability.banned
    finally:
        for client, averager in peers:
            client.run(averager.stop(), timeout=10)
            client.shutdown()

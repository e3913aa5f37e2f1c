"""Decentralized averaging with real hivemind DHT and libp2p daemons, peers in this process
(each with its own P2P and DHT node) around a real `swarm dht` bootstrap process."""

import threading

import pytest
import torch

from protocol.network import NetworkOptions
from swarm.client import ClientOptions, SwarmClient
from swarm.robust import get_aggregator
from swarm.training import AveragingOptions, CollaborativeOptimizer
from swarm.training.averager import GroupAverager
from swarm.training.coded import CodedOptions

FAST = AveragingOptions(min_matchmaking_time=1.0, request_timeout=0.5, matchmaking_timeout=10.0)


def run_in_threads(function, count):
    results, errors = [None] * count, []

    def target(index):
        try:
            results[index] = function(index)
        except BaseException as error:  # surfaced below, in the test's thread
            errors.append(error)

    threads = [threading.Thread(target=target, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert not errors, errors
    return results


def assert_equal_parameters(models):
    final = [torch.cat([p.detach().flatten() for p in model.parameters()]) for model in models]
    for other in final[1:]:
        assert torch.allclose(other, final[0], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("rule, expected", [("mean", 250000.75), ("median", 1.0)])
def test_a_group_applies_the_runs_rule_to_every_part(initial_peers, rule, expected):
    """Three honest peers hold 1.0, one sends 1e6: the mean moves (hivemind's figure, 250000.75),
    the median does not. Every peer of the group gets the same result for every part."""
    clients = [SwarmClient(ClientOptions(initial_peers=tuple(initial_peers), network=NetworkOptions()))
               for _ in range(4)]
    try:
        averagers = [GroupAverager(client.p2p, client.dht, f"rule-{rule}", FAST, state_provider=bytes)
                     for client in clients]
        for client, averager in zip(clients, averagers):
            client.run(averager.start())
        values = [1.0, 1.0, 1.0, 1e6]
        aggregate = get_aggregator(rule)

        def average(index):
            tensors = [torch.full((1000,), values[index]), torch.full((7, 3), values[index])]
            return clients[index].run(averagers[index].average(tensors, "round", aggregate, 4), timeout=60)

        results = run_in_threads(average, 4)
        for result in results:
            assert result is not None and len(result.peer_ids) == 4
            for tensor in result.tensors:
                assert torch.allclose(tensor, torch.full_like(tensor, expected))
    finally:
        for client in clients:
            client.shutdown()


def test_replicas_hold_equal_parameters_after_every_round_and_a_late_joiner_catches_up(initial_peers):
    def make(seed):
        torch.manual_seed(seed)  # different initial weights: the first download equalises them
        model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
        return model, CollaborativeOptimizer(model.parameters(), optimizer, run_id="equal", initial_peers=initial_peers,
                                             target_batch_size=48, batch_size_per_step=8, averaging=FAST)

    peers = [make(seed) for seed in range(3)]
    fingerprints = [{} for _ in peers]  # epoch -> parameters on reaching it (by a round or a download)
    rounds = [0 for _ in peers]

    def train(index, until=8):
        model, collaborative = peers[index]
        generator = torch.Generator().manual_seed(100 + index)
        while collaborative.epoch < until:
            inputs = torch.randn(8, 16, generator=generator)
            loss = (model(inputs) - inputs[:, :2]).pow(2).mean()
            loss.backward()
            before = collaborative.epoch
            rounds[index] += collaborative.step()
            if collaborative.epoch != before:
                fingerprints[index][collaborative.epoch] = torch.cat([p.detach().flatten() for p in model.parameters()])
        return collaborative.epoch

    try:
        assert run_in_threads(train, 3) == [8, 8, 8]
        common = set(fingerprints[0]) & set(fingerprints[1]) & set(fingerprints[2])
        assert len(common) >= 4 and min(rounds) >= 1, ([sorted(f) for f in fingerprints], rounds)
        for epoch in common:
            for other in fingerprints[1:]:
                assert torch.allclose(other[epoch], fingerprints[0][epoch], rtol=1e-5, atol=1e-6), epoch

        late_model, late = make(seed=99)  # joins a run at step 8: downloads the state, not from scratch
        assert late.epoch == 8
        for param, reference in zip(late_model.parameters(), peers[0][0].parameters()):
            assert torch.allclose(param, reference, rtol=1e-5, atol=1e-6)
        assert late.optimizer.state_dict()["state"], "the optimizer's statistics come with the state"
        peers.append((late_model, late))
        fingerprints.append({})
        rounds.append(0)
        assert run_in_threads(lambda index: train(index, until=11), 4) == [11, 11, 11, 11]
        assert_equal_parameters([model for model, _ in peers])
    finally:
        for _, collaborative in peers:
            collaborative.close()


def test_worker_momentum_is_sgd_momentum_kept_on_the_peer(initial_peers):
    """Alone in its run, a peer with worker momentum 0.9 and SGD without momentum takes exactly the
    steps of a local SGD with momentum 0.9: the peer keeps torch's momentum buffer itself."""
    torch.manual_seed(3)
    model = torch.nn.Linear(6, 3)
    reference = torch.nn.Linear(6, 3)
    reference.load_state_dict(model.state_dict())
    local = torch.optim.SGD(reference.parameters(), lr=0.05, momentum=0.9)
    collaborative = CollaborativeOptimizer(
        model.parameters(), torch.optim.SGD(model.parameters(), lr=0.05),
        run_id="worker-momentum-alone", initial_peers=initial_peers, target_batch_size=4, batch_size_per_step=4,
        averaging=FAST, worker_momentum=0.9)
    try:
        generator = torch.Generator().manual_seed(0)
        for _ in range(6):
            inputs = torch.randn(4, 6, generator=generator)
            for net in (model, reference):
                net(inputs).square().mean().backward()
            assert collaborative.step()
            local.step()
            local.zero_grad()
        assert collaborative.epoch == 6
        for param, expected in zip(model.parameters(), reference.parameters()):
            torch.testing.assert_close(param, expected, rtol=1e-5, atol=1e-6)
    finally:
        collaborative.close()


def test_worker_momentum_refuses_coded_rounds_and_bad_betas():
    from swarm.training.coded_reduce import CodedOptions

    params = [torch.nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="coded rounds sum shards"):
        CollaborativeOptimizer(params, torch.optim.SGD(params, lr=0.1), run_id="x", initial_peers=[],
                               target_batch_size=1, coding=CodedOptions(code="cyclic", stragglers=1),
                               worker_momentum=0.9)
    with pytest.raises(ValueError, match=r"worker_momentum must be in \[0, 1\)"):
        CollaborativeOptimizer(params, torch.optim.SGD(params, lr=0.1), run_id="x", initial_peers=[],
                               target_batch_size=1, worker_momentum=1.0)


def test_coded_replicas_that_start_apart_are_repaired(initial_peers):
    """Coded rounds average gradients, so replicas that differ (one stepped alone before it saw the
    others, say) would apply the same steps to different parameters forever: the fingerprints sent
    along each round show it, and the group averages its state."""
    def make(seed):
        torch.manual_seed(seed)  # different initial weights and no download: the replicas start apart
        model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        return model, CollaborativeOptimizer(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.05),
                                             run_id="coded-apart", initial_peers=initial_peers, target_batch_size=24,
                                             averaging=FAST, load_state=False,
                                             coding=CodedOptions(code="cyclic", stragglers=1))

    peers = [make(seed) for seed in range(3)]

    def train(index):
        model, collaborative = peers[index]

        def shard_gradients(epoch, shard, num_shards):
            inputs = torch.randn(8, 16, generator=torch.Generator().manual_seed(1000 * epoch + shard))
            loss = (model(inputs) - inputs[:, :2]).pow(2).mean()
            return list(torch.autograd.grad(loss, list(model.parameters())))

        while collaborative.epoch < 4:
            collaborative.coded_step(shard_gradients)
        return collaborative.epoch

    try:
        assert run_in_threads(train, 3) == [4, 4, 4]
        assert_equal_parameters([model for model, _ in peers])
    finally:
        for _, collaborative in peers:
            collaborative.close()

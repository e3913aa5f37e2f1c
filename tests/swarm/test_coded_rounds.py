"""Coded rounds: the decision rule alone, then rounds among in-process peers (each with its own
P2P and DHT node) around a real `swarm dht` bootstrap, with stragglers made by a sleep in the
gradient computation (so the timing does not depend on how busy the machine's cores are)."""

import functools
import threading
import time
import types

import pytest
import torch
from hivemind.averaging.group_info import GroupInfo
from hivemind.proto import averaging_pb2

from protocol.network import NetworkOptions
from swarm.client import ClientOptions, SwarmClient
from swarm.coding import CyclicRepetitionCode, FractionalRepetitionCode
from swarm.local_swarm import LocalSwarm
from swarm.training import AveragingOptions
from swarm.training.allreduce import RoundFailed
from swarm.training.coded import CodedAverager, CodedOptions
from swarm.training.coded_reduce import decide_part

FAST = AveragingOptions(min_matchmaking_time=1.0, request_timeout=0.5, matchmaking_timeout=10.0)
SHAPES = [(6000,), (7, 5)]  # slices of about 1/6 each: every peer reduces one
PEERS = 6


# the decision rule, without a network ---------------------------------------------------------

@functools.cache  # drawn once: the peers' computing should cost next to nothing here
def shard_gradients(shard, num_shards, shapes=tuple(SHAPES)):
    generator = torch.Generator().manual_seed(1000 * num_shards + shard)
    return [torch.randn(shape, generator=generator, dtype=torch.float64) for shape in shapes]


def full_mean(num_shards):
    per_shard = [shard_gradients(shard, num_shards) for shard in range(num_shards)]
    return [sum(tensors) / num_shards for tensors in zip(*per_shard)]


def encoded(code, workers, lie=()):
    messages = {}
    for worker in workers:
        gradients = {shard: shard_gradients(shard, code.n)[0] for shard in code.shards(worker)}
        messages[worker] = code.encode(worker, gradients) * (-3.0 if worker in lie else 1.0)
    return messages


def test_a_part_decodes_from_one_worker_per_group_and_waits_while_copies_disagree():
    code = FractionalRepetitionCode(6, 2)  # groups {0, 1, 2} and {3, 4, 5}
    assert decide_part(code, encoded(code, [0, 3]), pending=[1, 2, 4, 5]).decode_from == (0, 3)
    assert decide_part(code, encoded(code, [0]), pending=[1, 2, 4, 5]).waiting  # group 1 not heard yet

    lying = encoded(code, [0, 1, 3], lie={1})
    decision = decide_part(code, lying, pending=[2, 4, 5])
    assert decision.waiting and not decision.liars  # 0 and 1 differ: no majority, neither is trusted

    lying.update(encoded(code, [2]))
    decision = decide_part(code, lying, pending=[4, 5])
    assert decision.decode_from == (0, 2, 3) and decision.liars == {1}
    exact = code.decode({worker: lying[worker] for worker in decision.decode_from})
    assert torch.allclose(exact, sum(shard_gradients(shard, 6)[0] for shard in range(6)), rtol=1e-12)

    failed = decide_part(code, encoded(code, [0, 1, 3], lie={1}), pending=[])
    assert failed.failure is not None and "differ with no majority" in failed.failure


def test_agreeing_copies_and_non_finite_messages():
    code = FractionalRepetitionCode(6, 2)
    one_each = encoded(code, [0, 3])
    assert decide_part(code, one_each, pending=[1, 2, 4, 5], agreeing_copies=2).waiting
    failed = decide_part(code, one_each, pending=[], agreeing_copies=2)
    assert "2 agreeing copies" in failed.failure and "lower agreeing_copies" in failed.failure
    assert decide_part(code, encoded(code, [0, 1, 3, 4]), pending=[2, 5], agreeing_copies=2).decode_from == (0, 1, 3, 4)

    cyclic = CyclicRepetitionCode(6, 2)  # any 4 workers decode
    messages = encoded(cyclic, [0, 1, 2, 3])
    messages[2] = torch.full_like(messages[2], float("nan"))
    decision = decide_part(cyclic, messages, pending=[4, 5])
    assert decision.waiting and decision.liars == {2}  # 3 usable messages: wait for a fourth
    messages.update(encoded(cyclic, [4]))
    decision = decide_part(cyclic, messages, pending=[5])
    assert decision.decode_from == (0, 1, 3, 4) and decision.liars == {2}

def test_options_say_what_is_wrong():
    with pytest.raises(ValueError, match="fractional code only"):
        CodedOptions(code="cyclic", agreeing_copies=2)
    with pytest.raises(ValueError, match="more than the 2 workers"):
        CodedOptions(stragglers=1, agreeing_copies=3)


# rounds among peers ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def clients():
    with LocalSwarm("unused") as local:
        local.start_bootstrap()
        started = []
        try:
            for _ in range(PEERS):
                started.append(SwarmClient(ClientOptions(initial_peers=tuple(local.initial_peers),
                                                         network=NetworkOptions())))
            yield started
        finally:
            for client in started:
                client.shutdown()


def make_compute(delays=None, liar=None):
    """Worker -> seconds of injected delay; the liar sends its gradients times -3."""
    delays = delays or {}

    def compute(assignment):
        time.sleep(delays.get(assignment.worker, 0.0))
        gradients = {shard: shard_gradients(shard, assignment.num_shards) for shard in assignment.shards}
        if assignment.worker == liar:
            gradients = {shard: [-3.0 * tensor for tensor in tensors] for shard, tensors in gradients.items()}
        return gradients

    return compute


def run_round(clients, run_id, coding, compute, options=FAST):
    """Every client calls one coded round at once; returns (result or exception, seconds) per client."""
    averagers = [CodedAverager(client.p2p, client.dht, run_id, options, state_provider=bytes) for client in clients]
    for client, averager in zip(clients, averagers):
        client.run(averager.start())
    templates = [torch.zeros(shape, dtype=torch.float64) for shape in SHAPES]
    full_mean(len(clients))  # draws every shard's gradients before the clock starts
    outcomes = [None] * len(clients)
    barrier = threading.Barrier(len(clients))

    def target(index):
        barrier.wait()
        started = time.perf_counter()
        try:
            outcome = clients[index].run(averagers[index].coded_round(compute, templates, "round", coding,
                                                                      expected_group_size=len(clients)), timeout=60)
        except Exception as error:
            outcome = error
        outcomes[index] = (outcome, time.perf_counter() - started)

    threads = [threading.Thread(target=target, args=(index,)) for index in range(len(clients))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return outcomes


def relative_error(result, expected):
    return max(float((got - want).norm() / want.norm()) for got, want in zip(result, expected))


@pytest.mark.parametrize("code", ["fractional", "cyclic"])
def test_six_workers_decode_the_full_gradient_without_waiting_for_two_stragglers(clients, code):
    # the stragglers are also later than sender_timeout: left out of every slice, they still get the result
    delay, stragglers = 4.0, {1, 4}
    options = AveragingOptions(min_matchmaking_time=1.0, request_timeout=0.5, matchmaking_timeout=10.0,
                               sender_timeout=2.0, reducer_timeout=4.0)
    outcomes = run_round(clients, f"coded-{code}", CodedOptions(code=code, stragglers=2),
                         make_compute({worker: delay for worker in stragglers}), options)
    expected = full_mean(PEERS)
    results = [outcome for outcome, _ in outcomes]
    assert all(not isinstance(result, BaseException) and result is not None for result in results), results
    peer_ids = results[0].peer_ids
    assert len(peer_ids) == PEERS and sorted(result.worker for result in results) == list(range(PEERS))
    late = {peer_ids[worker] for worker in stragglers}
    for result in results:
        assert result.peer_ids == peer_ids and not result.liars
        assert relative_error(result.tensors, expected) < 1e-6  # float64 all the way: about 1e-16
        if result.worker in stragglers:
            assert result.seconds >= delay  # it computed for `delay`, then got the result from the reducers
        else:
            assert result.seconds < delay, result.seconds  # done before the stragglers even sent: not waited for
            assert late <= result.left_out
    for result in results[1:]:  # every replica applies the same gradient, up to the rounding of
        for tensor, reference in zip(result.tensors, results[0].tensors):  # message + (result - message)
            assert torch.allclose(tensor, reference, rtol=1e-12, atol=1e-14)


def test_a_liar_is_outvoted_by_its_group_and_the_result_stays_exact(clients):
    # worker 1 lies; worker 2 of its group is late, so reducers first hear 0 and 1 disagree, wait
    # for a second agreeing copy (agreeing_copies=2), and the majority {0, 2} outvotes 1
    outcomes = run_round(clients, "coded-liar", CodedOptions(code="fractional", stragglers=2, agreeing_copies=2),
                         make_compute({2: 2.0}, liar=1))
    results = [outcome for outcome, _ in outcomes]
    assert all(not isinstance(result, BaseException) and result is not None for result in results), results
    liar = results[0].peer_ids[1]
    for result in results:
        assert result.liars == {liar}
        assert relative_error(result.tensors, full_mean(PEERS)) < 1e-6


def test_too_few_workers_to_decode_fail_the_round_with_a_clear_error(clients):
    # fractional n=4, s=1: groups {0, 1} and {2, 3}; both workers of group 0 are late past sender_timeout
    options = AveragingOptions(min_matchmaking_time=1.0, request_timeout=0.5, matchmaking_timeout=10.0,
                               sender_timeout=1.0, reducer_timeout=2.0)
    started = time.perf_counter()
    outcomes = run_round(clients[:4], "coded-too-few", CodedOptions(code="fractional", stragglers=1),
                         make_compute({0: 4.0, 1: 4.0}), options)
    assert time.perf_counter() - started < 30
    errors = [outcome for outcome, _ in outcomes]
    assert all(isinstance(error, RoundFailed) for error in errors), errors
    undecodable = [error for error in errors if "do not determine the gradient sum" in str(error)]
    assert len(undecodable) >= 2, errors  # the two workers on time say why (their own slices failed)
    assert "FractionalRepetitionCode(n=4, s=1) decodes from any 3 workers" in str(undecodable[0])


def test_a_locally_banned_peer_is_refused_as_a_groupmate(clients):
    """Peers that coded groups outvoted in 3 rounds are banned locally (CollaborativeOptimizer):
    their requests to join are refused, and a group that includes them is not taken part in."""
    averager = CodedAverager(clients[0].p2p, clients[0].dht, "coded-local-ban", FAST, state_provider=bytes)
    clients[0].run(averager.start())
    outsider, member = clients[1].p2p.peer_id, clients[2].p2p.peer_id
    averager.local_bans[outsider.to_base58()] = "outvoted by its coded group in 3 rounds"

    async def join(remote):
        context = types.SimpleNamespace(remote_id=remote)
        return [response.code async for response in averager.rpc_join_group(averaging_pb2.JoinRequest(), context)]

    assert clients[0].run(join(outsider)) == [averaging_pb2.PROTOCOL_VIOLATION]
    assert clients[0].run(join(member)) != [averaging_pb2.PROTOCOL_VIOLATION]  # not looking for a group: another code
    group = GroupInfo(group_id=b"g", peer_ids=(clients[0].p2p.peer_id, outsider, member), gathered=(b"", b"", b""))
    assert averager._banned_in(group) == [outsider.to_base58()]
    assert averager.refuses(outsider.to_base58()) and not averager.refuses(member.to_base58())
    clients[0].run(averager.stop())

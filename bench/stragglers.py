"""Stragglers: a coded round (gradient coding, n=6, s=2) against a round that waits for everyone.

Six peers in this process (one P2P and DHT node each) around one `swarm dht` bootstrap run
rounds of `CodedAverager.coded_round` on the same model and data. Each round, two peers
(drawn per round, the same draw for both modes) are stragglers: an injected 2 s wait before
they send, standing in for a slow machine. Per-shard compute is cheap (a 1024 x 768 linear
layer on 32 samples, one thread per peer), so the two shared cores do not decide the result.

- coded: fractional repetition code, s = 2: each worker computes 3 shards and sends their sum;
  a slice's reducer decodes as soon as one worker of each group was heard.
- wait for all: the same round with s = 0 (each worker computes its one shard, every reducer
  needs all six messages): a plain mean of the six shard gradients, which waits for the stragglers.

A peer's step time runs from the group's assembly to the peer holding the result (its own
computing included; matchmaking, the same for both, excluded). Printed per mode: the median
over rounds of the on-time peers' and of the stragglers' step times, and the largest relative
error of any peer's result against the full gradient (the mean of the six shard gradients,
computed locally in float64). Rounds of the two modes are interleaved, after one warm-up each.

Run: .venv/bin/python bench/stragglers.py   (about a minute)
"""

from __future__ import annotations

import os

os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")

import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from protocol.network import NetworkOptions  # noqa: E402
from swarm.client import ClientOptions, SwarmClient  # noqa: E402
from swarm.local_swarm import LocalSwarm  # noqa: E402
from swarm.training.averager import AveragingOptions  # noqa: E402
from swarm.training.coded import CodedAverager, CodedOptions, WorkerAssignment  # noqa: E402

PEERS, STRAGGLERS, DELAY = 6, 2, 2.0
IN_FEATURES, OUT_FEATURES, SHARD_SAMPLES = 1024, 768, 32  # 787k float32 values: every peer reduces a slice
ROUNDS, WARM_UP = 5, 1
MODES = {"coded (s=2)": CodedOptions(code="fractional", stragglers=STRAGGLERS),
         "wait for all (s=0)": CodedOptions(code="fractional", stragglers=0)}
OPTIONS = AveragingOptions(min_matchmaking_time=1.0, request_timeout=1.0, matchmaking_timeout=15.0,
                           round_timeout=60.0)


def make_model() -> torch.nn.Linear:
    torch.manual_seed(0)  # every replica starts equal; the bench applies no update, so they stay equal
    return torch.nn.Linear(IN_FEATURES, OUT_FEATURES)


def shard_batch(round_index: int, shard: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(10_000 * round_index + shard)
    inputs = torch.randn(SHARD_SAMPLES, IN_FEATURES, generator=generator)
    return inputs, torch.randn(SHARD_SAMPLES, OUT_FEATURES, generator=generator)


def shard_gradient(model: torch.nn.Linear, round_index: int, shard: int) -> list[torch.Tensor]:
    inputs, targets = shard_batch(round_index, shard)
    loss = torch.nn.functional.mse_loss(model(inputs), targets)
    return [gradient.detach() for gradient in torch.autograd.grad(loss, list(model.parameters()))]


def full_gradient(model: torch.nn.Linear, round_index: int) -> list[torch.Tensor]:
    per_shard = [shard_gradient(model, round_index, shard) for shard in range(PEERS)]
    return [sum(tensor.double() for tensor in tensors) / PEERS for tensors in zip(*per_shard)]


def delayed_peers(round_index: int) -> set[int]:
    return set(random.Random(round_index).sample(range(PEERS), STRAGGLERS))


def main() -> None:
    torch.set_num_threads(1)
    schedule = [(mode, round_index) for round_index in range(WARM_UP + ROUNDS) for mode in MODES]
    # step times by mode: (on-time peers, stragglers); worst relative error and failures by mode
    times = {mode: ([], []) for mode in MODES}
    errors = {mode: 0.0 for mode in MODES}
    failures = {mode: 0 for mode in MODES}
    models = [make_model() for _ in range(PEERS)]
    references = {round_index: full_gradient(models[0], round_index) for _, round_index in schedule}
    lock = threading.Lock()

    with LocalSwarm("unused") as local:
        local.start_bootstrap()
        clients = [SwarmClient(ClientOptions(initial_peers=tuple(local.initial_peers), network=NetworkOptions()))
                   for _ in range(PEERS)]
        try:
            averagers = [CodedAverager(client.p2p, client.dht, "stragglers", OPTIONS, state_provider=bytes)
                         for client in clients]
            for client, averager in zip(clients, averagers):
                client.run(averager.start())
            barrier = threading.Barrier(PEERS)

            def peer(index: int) -> None:
                model, client, averager = models[index], clients[index], averagers[index]
                templates = [torch.zeros_like(param) for param in model.parameters()]
                for mode, round_index in schedule:
                    straggler = index in delayed_peers(round_index)

                    def compute(assignment: WorkerAssignment, straggler: bool = straggler,
                                round_index: int = round_index) -> dict[int, list[torch.Tensor]]:
                        if straggler:
                            time.sleep(DELAY)  # the injected wait before this worker can send
                        return {shard: shard_gradient(model, round_index, shard) for shard in assignment.shards}

                    barrier.wait()  # rounds start together: a straggler of the last round is not late to this one
                    try:
                        result = client.run(averager.coded_round(compute, templates, f"{mode}-{round_index}",
                                                                 MODES[mode], expected_group_size=PEERS),
                                            timeout=OPTIONS.matchmaking_timeout + OPTIONS.round_timeout + 10)
                    except Exception as error:
                        print(f"peer {index}, {mode}, round {round_index}: {error}", file=sys.stderr)
                        result = None
                    with lock:
                        if result is None or len(result.peer_ids) != PEERS:
                            failures[mode] += 1
                            continue
                        error = max(float((got.double() - want).norm() / want.norm())
                                    for got, want in zip(result.tensors, references[round_index]))
                        errors[mode] = max(errors[mode], error)
                        if round_index >= WARM_UP:
                            times[mode][straggler].append(result.seconds)

            threads = [threading.Thread(target=peer, args=(index,)) for index in range(PEERS)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            for client in clients:
                client.shutdown()

    print(f"{PEERS} peers, {STRAGGLERS} of them delayed {DELAY:.0f} s per round, {ROUNDS} rounds per mode "
          f"(after {WARM_UP} warm-up); step time = group assembled -> result held, median over peer-rounds")
    print(f"{'mode':<20} {'on-time peers (s)':>18} {'stragglers (s)':>15} {'max rel. error':>15} {'failed':>7}")
    for mode in MODES:
        on_time, late = times[mode]
        print(f"{mode:<20} {_median(on_time):>18} {_median(late):>15} {errors[mode]:>15.1e} {failures[mode]:>7}")


def _median(values: list[float]) -> str:
    return f"{statistics.median(values):.3f}" if values else "-"


if __name__ == "__main__":
    main()

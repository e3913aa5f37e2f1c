"""Collaborative training: loss against wall-clock time with 1 and 3 peers, and the time of one
averaging round with our GroupAverager next to hivemind's DecentralizedAverager.

1. `swarm train digits` (40 global steps of 256 samples, local batches of 32, seed 0) run by one
   peer alone, then by three peers at once under another run id, around one `swarm dht`
   bootstrap. Prints seconds and loss at steps 10/20/30/40, the totals, the held-out accuracy
   and whether the three peers end with equal parameters.
   On this shared 2-core machine the three peers compete for the same two cores, so no
   wall-clock gain from adding peers is expected here: the 3-peer figures show what averaging
   costs (one group round per global step), not the speed-up of peers on separate machines.
2. One averaging round of the same 1M float32 values (4 MiB in two tensors) among 3 peers, by
   our GroupAverager (all-or-nothing butterfly all-reduce, peers in this process, one P2P and
   DHT node each) and by hivemind's DecentralizedAverager (its DHT and averager processes),
   rounds of the two interleaved so load on the machine hits both alike. Both use hivemind's
   Matchmaking with the same min_matchmaking_time, request_timeout and target group size 3, the
   same default part size and no compression, one attempt per round (no retries), and all six
   DHT nodes join the same bootstrap. Our three peers share this process (one GIL), as the
   tests host them; hivemind's each have their own averager process. A round's time is per
   peer: from the moment all three called it (a barrier) to when that peer holds the result;
   the median over peers and rounds is printed, after one warm-up round each. Every result is
   checked against the mean of the inputs (fresh random inputs every round).

Run: .venv/bin/python bench/training.py   (about 2 minutes)
"""

from __future__ import annotations

import os

os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")  # keep the table readable; failures are counted below

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from protocol.network import NetworkOptions  # noqa: E402
from swarm.client import ClientOptions, SwarmClient  # noqa: E402
from swarm.local_swarm import LocalSwarm  # noqa: E402
from swarm.robust import get_aggregator  # noqa: E402
from swarm.training.averager import AveragingOptions, GroupAverager  # noqa: E402
from _rounds import HivemindAveragers, timed_round  # noqa: E402  (bench/ is the script's folder)

STEPS, MILESTONES = 40, (10, 20, 30, 40)
TRAIN_FLAGS = ["--steps", str(STEPS), "--target-batch-size", "256", "--batch-size", "32", "--seed", "0"]
PEERS = 3
SHAPES = [(1024, 768), (256, 1024)]  # 2**20 float32 values in all
ROUNDS, WARM_UP = 5, 1
MIN_MATCHMAKING_TIME, REQUEST_TIMEOUT, MATCHMAKING_TIMEOUT = 1.0, 1.0, 15.0
ROUND_TIMEOUT = 60.0


# 1. loss against wall-clock time ---------------------------------------------------------------

def train(local: LocalSwarm, run_id: str, peers: int) -> tuple[list[dict], float]:
    started = time.perf_counter()
    trainers = [local.start_trainer("digits", run_id, TRAIN_FLAGS, name=f"{run_id}-{index}") for index in range(peers)]
    results = [local.trainer_result(trainer) for trainer in trainers]
    return results, time.perf_counter() - started


def at_step(result: dict, step: int) -> tuple[float, float]:
    """(seconds since the peer's training began, its mean local loss) at the first global step >= `step`."""
    return next((seconds, loss) for seconds, reached, loss in result["history"] if reached >= step)


def print_training(alone: list[dict], alone_wall: float, group: list[dict], group_wall: float) -> None:
    print(f"digits, {STEPS} global steps of 256 samples, local batches of 32, seed 0; "
          f"3 peers: slowest peer's seconds, mean of the peers' losses")
    print("| global step | 1 peer: s | 1 peer: loss | 3 peers: s | 3 peers: loss |")
    print("|---|---|---|---|---|")
    for step in MILESTONES:
        seconds, loss = at_step(alone[0], step)
        points = [at_step(result, step) for result in group]
        print(f"| {step} | {seconds:.1f} | {loss:.3f} | {max(s for s, _ in points):.1f} | "
              f"{statistics.mean(l for _, l in points):.3f} |")
    fingerprints = [result["params_fingerprint"] for result in group]
    spread = max(abs(f - fingerprints[0]) for f in fingerprints) / max(abs(fingerprints[0]), 1e-12)
    accuracies = [result["accuracy"] for result in group]
    print()
    print("| | 1 peer | 3 peers |")
    print("|---|---|---|")
    print(f"| training loop, s (first to last global step, slowest peer) | {alone[0]['history'][-1][0]:.1f} | "
          f"{max(result['history'][-1][0] for result in group):.1f} |")
    print(f"| wall clock, s (processes started to all results, start-up included) | {alone_wall:.1f} | "
          f"{group_wall:.1f} |")
    print(f"| held-out accuracy | {alone[0]['accuracy']:.3f} | "
          f"{' / '.join(f'{accuracy:.3f}' for accuracy in accuracies)} |")
    print(f"| global steps reached | {alone[0]['steps']} | {' / '.join(str(r['steps']) for r in group)} |")
    print(f"| final parameter average with a group | {alone[0]['final_average']} | "
          f"{' / '.join(str(result['final_average']) for result in group)} |")
    print(f"| equal parameters (fingerprints within 1e-6 relative) | - | {spread < 1e-6} ({spread:.1e}) |")


# 2. one averaging round: ours against hivemind's -----------------------------------------------

def inputs_for(round_index: int) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(1000 + round_index)
    return [[torch.randn(shape, generator=generator) for shape in SHAPES] for _ in range(PEERS)]


def close_to_mean(tensors, inputs: list[list[torch.Tensor]]) -> bool:
    means = [torch.stack(parts).mean(0) for parts in zip(*inputs)]
    return len(tensors) == len(means) and all(torch.allclose(tensor, mean, atol=1e-5)
                                              for tensor, mean in zip(tensors, means))


class Ours:
    def __init__(self, initial_peers: list[str]):
        options = AveragingOptions(min_matchmaking_time=MIN_MATCHMAKING_TIME, request_timeout=REQUEST_TIMEOUT,
                                   matchmaking_timeout=MATCHMAKING_TIMEOUT, round_timeout=ROUND_TIMEOUT)
        self.clients, self.averagers = [], []
        for _ in range(PEERS):
            self.clients.append(SwarmClient(ClientOptions(initial_peers=tuple(initial_peers),
                                                          network=NetworkOptions())))
            self.averagers.append(GroupAverager(self.clients[-1].p2p, self.clients[-1].dht, "bench-ours", options,
                                                state_provider=bytes))
            self.clients[-1].run(self.averagers[-1].start())
        self.aggregate = get_aggregator("mean")

    def round(self, round_index: int, inputs: list[list[torch.Tensor]]) -> tuple[list, bool]:
        def call(index):
            coroutine = self.averagers[index].average(inputs[index], f"round{round_index}", self.aggregate, PEERS)
            return self.clients[index].run(coroutine, timeout=ROUND_TIMEOUT + MATCHMAKING_TIMEOUT)

        seconds, results = timed_round(call, PEERS, ROUND_TIMEOUT + MATCHMAKING_TIMEOUT + 30)
        correct = all(elapsed is not None and close_to_mean(result.tensors, inputs)
                      for elapsed, result in zip(seconds, results))
        return seconds, correct

    def shutdown(self) -> None:
        for client in self.clients:
            client.shutdown()


class Hivemind(HivemindAveragers):
    def __init__(self, initial_peers: list[str]):
        super().__init__(initial_peers, PEERS, SHAPES, "bench-hivemind", min_matchmaking_time=MIN_MATCHMAKING_TIME,
                         request_timeout=REQUEST_TIMEOUT, round_timeout=ROUND_TIMEOUT)

    def round(self, round_index: int, inputs: list[list[torch.Tensor]]) -> tuple[list, bool]:
        seconds, _, outputs = self.timed_round(inputs, MATCHMAKING_TIMEOUT)
        correct = all(elapsed is not None and close_to_mean(output, inputs) for elapsed, output in zip(seconds, outputs))
        return seconds, correct


def compare_rounds(initial_peers: list[str]) -> None:
    # hivemind forks its DHT and averager processes: start them before this process has threads
    # (our clients' event loops), and keep OpenMP out of it (not fork-safe); both sides then
    # aggregate on one thread per process
    torch.set_num_threads(1)
    hivemind = ours = None
    try:
        hivemind = Hivemind(initial_peers)
        ours = Ours(initial_peers)
        times = {"ours": [], "hivemind": []}
        failed = {"ours": 0, "hivemind": 0}
        all_correct = {"ours": True, "hivemind": True}
        for round_index in range(WARM_UP + ROUNDS):
            inputs = inputs_for(round_index)
            for name, side in (("ours", ours), ("hivemind", hivemind)):
                seconds, correct = side.round(round_index, inputs)
                if round_index < WARM_UP:
                    continue
                times[name] += [s for s in seconds if s is not None]
                failed[name] += sum(s is None for s in seconds)
                all_correct[name] &= correct
    finally:
        for side in (ours, hivemind):
            if side is not None:
                side.shutdown()
    count = 4 * sum(torch.Size(shape).numel() for shape in SHAPES)
    print()
    print(f"one averaging round, {PEERS} peers, {count / 2**20:.0f} MiB of float32 in {len(SHAPES)} tensors, "
          f"min_matchmaking_time {MIN_MATCHMAKING_TIME} s, target group {PEERS}; per peer from the common "
          f"call to its result; {ROUNDS} rounds after {WARM_UP} warm-up")
    print("| averager | median s | min s | max s | failed peer-rounds | equals the mean of the inputs |")
    print("|---|---|---|---|---|---|")
    for name, label in (("ours", "GroupAverager (ours)"), ("hivemind", "hivemind DecentralizedAverager")):
        values = times[name] or [float("nan")]
        print(f"| {label} | {statistics.median(values):.3f} | {min(values):.3f} | {max(values):.3f} | "
              f"{failed[name]} of {PEERS * ROUNDS} | {all_correct[name]} |")
    if times["ours"] and times["hivemind"]:
        ratio = statistics.median(times["ours"]) / statistics.median(times["hivemind"])
        print(f"| ours / hivemind (medians) | {ratio:.2f} | | | | |")


def main() -> None:
    with LocalSwarm("unused") as local:
        local.start_bootstrap()
        alone, alone_wall = train(local, "bench-digits-1", 1)
        group, group_wall = train(local, "bench-digits-3", PEERS)
        print_training(alone, alone_wall, group, group_wall)
        compare_rounds(local.initial_peers)


if __name__ == "__main__":
    main()

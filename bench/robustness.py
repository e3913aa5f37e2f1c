"""Byzantine robustness of aggregation: accuracy under attack on a real task, a lying reducer
caught by accountability, and what robust aggregation costs when nobody attacks. One run prints
the three results and a verdict.

1. Attack matrix. Eight peers in this process, each a GroupAverager on its own SwarmClient (own
   libp2p daemon and DHT node, an Ed25519 identity for section 3) around one `swarm dht`
   bootstrap, average as one group of 8 every step (expected group size 8, a fresh tag per run
   and step). Two of the eight are Byzantine senders; the six honest peers each keep a replica of
   the digits MLP (`swarm.training.tasks`, identical start, seed 0), compute the gradient of their
   own batches (64 samples, a fixed data seed per peer, the same in every run), fold it into their
   own momentum (m = 0.9 m + g: worker momentum, as `CollaborativeOptimizer(worker_momentum=0.9)`
   does) and send m as one vector; the liars send what `swarm.attacks` makes of that step's honest
   vectors (an omniscient, colluding attacker). All eight call `average` at once (one thread
   each); each honest peer applies the aggregate with its own plain SGD (lr 0.2), so the six
   replicas stay equal, which is checked at the end of every run. With the mean this is exactly
   SGD with momentum 0.9 on the averaged gradient; with a robust rule it is Karimireddy, He and
   Jaggi's remedy ("Learning from history for Byzantine robust optimization", ICML 2021): averaged
   over ten steps the honest vectors spread far less than single gradients, so what a rule lets
   through of a liar, or loses of the honest mean, shrinks with them. (Momentum applied after the
   aggregate instead, as this bench did first, left centered clip and trimmed mean 3.6-3.9 points
   behind under inner product eps 100 and the median 2.2 under ALIE at 50 steps.) In the
   attack-free run the other two peers are honest as well and send the momentum of their own
   batches. Here the liars
   only lie as senders: as reducers of their slice of the butterfly all-reduce they run the same
   rule as everybody (lying reducers: section 3). Each part is combined by the run's rule with
   num_byzantine=2 and its defaults (centered clip: start at the median, radius the median
   distance to it, 3 iterations). A step whose round fails for any honest peer is retried under
   a new tag (at most 3 tries); a step that never succeeds is skipped and counted. Reported:
   held-out accuracy of honest replica 0 after STEPS (50) steps, rows = attacks, columns = rules,
   attack-free run included. Verdict: each robust rule within 2 accuracy points of its
   attack-free run under every attack; the mean collapses (20 points or more below its
   attack-free run) under scaling and NaN/Inf. Read the points with care: this is one data seed,
   359 held-out images (1 point = 3.6 images), at a fixed step of a run not yet converged, so a
   rule that only slows progress shows as lost points (an offline check of this recipe without
   the network, 4 other data seeds, 50 steps: every robust rule within 0.6 points of its
   attack-free run on average; `--steps 100` if you have the time).
   Attacks (see swarm/attacks.py): sign flip (-mean), scaling (100 x mean), Gaussian noise
   (sigma 100 x the honest coordinates' RMS), NaN/Inf (one NaN, one +Inf), a little is enough
   (mean - z std, z = 0.32 for n = 8, f = 2 from Baruch et al.'s formula), inner product
   manipulation with epsilon 0.1 (Xie et al.'s small setting) and 100 (large).
2. Cost without attacks. One round of 10M float32 values (40 MB per peer) among 4 peers: our
   GroupAverager with the mean, the median and centered clip next to hivemind's
   DecentralizedAverager (its DHT and averager processes), rounds of all four interleaved so load
   on the machine hits them alike, as bench/training.py does: the same min_matchmaking_time and
   request_timeout, target group 4, default part size, no compression, one attempt per round.
   Like hivemind's averagers, each of our four peers runs in its own process (spawned, its own
   SwarmClient and GroupAverager, one torch thread, started after hivemind's): per round it makes
   the round's inputs (all four peers', from the round's seed, to check its result), waits at a
   barrier shared by the four processes, times its round, waits until all four are done (so no
   check competes with a peer still in its round), then checks its result and sends every 10th
   value back. A round's time is per peer, from the moment all four called it (the barrier)
   to when that peer holds the result; the median over peers and rounds after one warm-up round
   is printed, with the ratio to hivemind's (target: at most 1.3x) and to ours with the mean
   (what the rule adds to our own round), and the CPU seconds of the rule alone over all 10M
   values (one thread, the parts the reducers see), which the group's reducers share. Results are
   checked: the mean against the inputs' mean, the median against the inputs' median (first 1M
   values), and every rule for the same result on every peer (every 10th value).
3. A lying reducer, caught and excluded. The run of section 1 once more with the median and a
   little is enough, now with accountability on: each peer's accountable GroupAverager signs
   with its Ed25519 identity and checks every other reducer of every round (verify_fraction 1)
   before anything is applied. Of the two Byzantine senders, peer 7 also lies as a reducer from
   step 20 on (the parts it reduces come back + 1; it reduced honestly before). Honest peers'
   rounds then fail ("banned and reported"); once every honest peer has banned it the bench stops
   driving it (banned peers are refused as groupmates; its own calls would only fail) and the
   step is retried with the other seven, whose later rounds run without it. Reported: the step
   and try it was caught, how many honest peers banned it (and whether anybody else was banned),
   the group size of every later applied round, the final accuracy. Verdict: caught in the step
   it began lying, banned by all six honest peers and nobody else, every later step applied by
   7 peers, accuracy within 2 points of the median's attack-free run.

Run: .venv/bin/python bench/robustness.py [--steps N]
Time budget: 12 minutes on this shared 2-core machine at the default 50 steps. Measured: 672 s
with the load average at 3-15 (0.32 s per 8-peer round, 17-24 s per training run), 852 s in an
earlier run at 5-17 (0.42 s per round). Most of it is the 33 training runs (32 of the matrix, 1 of
section 3); start-up and the cost rounds take about 1.5 minutes. 60 steps would take 13-17
minutes here, 40 about 10. Progress and failed rounds go to stderr.
"""

from __future__ import annotations

import os

os.environ.setdefault("HIVEMIND_LOGLEVEL", "ERROR")  # keep the tables readable; failures are counted below

import argparse
import collections
import dataclasses
import functools
import multiprocessing
import queue
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy  # noqa: E402
import torch  # noqa: E402
from hivemind.averaging.partition import DEFAULT_PART_SIZE_BYTES  # noqa: E402

from protocol.network import NetworkOptions, die_with_parent  # noqa: E402
from protocol.peer_keys import PeerKey  # noqa: E402
from swarm import attacks  # noqa: E402
from swarm.client import ClientOptions, SwarmClient  # noqa: E402
from swarm.local_swarm import LocalSwarm  # noqa: E402
from swarm.robust import get_aggregator  # noqa: E402
from swarm.training.accountability import AccountabilityOptions  # noqa: E402
from swarm.training.averager import AveragingOptions, GroupAverager  # noqa: E402
from swarm.training.tasks import get_task  # noqa: E402
from _rounds import HivemindAveragers  # noqa: E402  (bench/ is the script's folder)

# 1. the attack matrix
PEERS, BYZANTINE = 8, 2
HONEST = PEERS - BYZANTINE
STEPS, BATCH_SIZE, LEARNING_RATE, MOMENTUM = 50, 64, 0.2, 0.9  # STEPS: --steps
MODEL_SEED, DATA_SEED, ATTACK_SEED = 0, 100, 7
MAX_TRIES = 3
RULES = ("mean", "centered_clip", "trimmed_mean", "median")
ROBUST_RULES = RULES[1:]
ATTACK_ROWS: dict[str, Callable | None] = {
    "none": None,
    "sign flip (-mean)": attacks.sign_flip,
    "scaling (100 x mean)": attacks.scaling,
    "Gaussian noise (100 x RMS)": attacks.gaussian_noise,
    "NaN / Inf": attacks.non_finite,
    "a little is enough (z=0.32)": attacks.a_little_is_enough,
    "inner product, eps 0.1": functools.partial(attacks.inner_product_manipulation, epsilon=0.1),
    "inner product, eps 100": functools.partial(attacks.inner_product_manipulation, epsilon=100.0),
}
MEAN_MUST_COLLAPSE = ("scaling (100 x mean)", "NaN / Inf")
WITHIN, COLLAPSE = 0.02, 0.20
MATRIX_AVERAGING = AveragingOptions(min_matchmaking_time=1.0, request_timeout=1.0, matchmaking_timeout=15.0,
                                    round_timeout=30.0)

# 3. one more run: a Byzantine sender that also lies as a reducer, with accountability on
LIAR = PEERS - 1  # the second Byzantine sender
LIE_FROM = 20  # it reduces honestly before this step, then returns every part it reduces + 1
ACCOUNTABLE_RULE, ACCOUNTABLE_ATTACK = "median", "a little is enough (z=0.32)"

# 2. the cost of one round
COST_PEERS = 4
COST_SHAPES = [(10_000_000,)]
COST_ROUNDS, COST_WARM_UP = 5, 1
MIN_MATCHMAKING_TIME, REQUEST_TIMEOUT, MATCHMAKING_TIMEOUT, ROUND_TIMEOUT = 1.0, 1.0, 15.0, 60.0
COST_RULES = ("mean", "median", "centered_clip")
COST_TARGET = 1.3
MEDIAN_CHECKED = 1_000_000  # the median is checked on the first million coordinates
SAMPLE_STRIDE = 10  # our peers send every 10th value of their result back, to compare peers with each other
CHILD_START_TIMEOUT = 180.0  # a spawned peer: imports, its libp2p daemon, its DHT node


class Peers:
    """The eight clients of this process (each with an Ed25519 identity), each with one GroupAverager
    for the attack matrix and, later, one accountable GroupAverager (signing with that identity)."""

    def __init__(self, initial_peers: list[str]):
        self.clients: list[SwarmClient] = []
        self.keys: list[PeerKey] = []
        self.averagers: list[GroupAverager] = []
        self.accountable: list[GroupAverager] = []
        self.pool = ThreadPoolExecutor(max_workers=PEERS)  # one thread per peer: all eight call at once
        self.folder = tempfile.TemporaryDirectory(prefix="bench-robustness-")
        for index in range(PEERS):
            path = os.path.join(self.folder.name, f"identity-{index}.key")
            self.keys.append(PeerKey.create_identity_file(path))
            self.clients.append(SwarmClient(ClientOptions(initial_peers=tuple(initial_peers),
                                                          network=NetworkOptions(identity_path=path))))
            self.averagers.append(GroupAverager(self.clients[-1].p2p, self.clients[-1].dht, "bench-attacks",
                                                MATRIX_AVERAGING, state_provider=bytes))
            self.clients[-1].run(self.averagers[-1].start())

    def start_accountable(self) -> None:
        """An accountable averager per client, under its own run id (its reports and bans start empty)."""
        for client, key in zip(self.clients, self.keys):
            self.accountable.append(GroupAverager(client.p2p, client.dht, "bench-accountable", MATRIX_AVERAGING,
                                                  state_provider=bytes, peer_key=key,
                                                  accountability=AccountabilityOptions()))
            client.run(self.accountable[-1].start())

    def round(self, averagers: list[GroupAverager], vectors: dict[int, torch.Tensor], tag: str, aggregate
              ) -> dict[int, object]:
        """For each peer in `vectors`: its RoundResult, None (no group in time) or the exception it raised."""
        def call(index):
            try:
                coroutine = averagers[index].average([vectors[index]], tag, aggregate, len(vectors))
                return self.clients[index].run(coroutine, timeout=MATRIX_AVERAGING.matchmaking_timeout
                                               + MATRIX_AVERAGING.round_timeout + 5)
            except Exception as error:  # a failed round is retried, not fatal
                return error

        indices = sorted(vectors)
        return dict(zip(indices, self.pool.map(call, indices)))

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True)
        for client, averager in zip(self.clients, self.accountable):
            try:
                client.run(averager.stop(), timeout=10)
            except Exception as error:
                print(f"stopping an accountable averager: {error!r}", file=sys.stderr)
        for client in self.clients:
            client.shutdown()
        self.folder.cleanup()


@dataclasses.dataclass
class RunResult:
    accuracy: float
    finite: bool  # the honest replica's parameters are all finite
    replicas_spread: float  # largest |difference| between honest replicas' parameters at the end, / largest |parameter|
    rounds: int
    failed_rounds: int
    skipped_steps: int
    ghost_rounds: int  # see is_ghost_round
    round_seconds: list[float]


@dataclasses.dataclass
class Catch:
    """What happened to the lying reducer of the accountable run (section 3)."""
    caught: tuple[int, int] | None = None  # (step, try) of the round after which every honest peer had banned it
    failures_when_caught: list[str] = dataclasses.field(default_factory=list)  # the honest peers' errors then
    liar_outcome: str = ""  # what its own call returned in that round
    banned_by_honest: int = 0  # at the end
    banned_by_other_byzantine: bool = False
    other_bans: list[str] = dataclasses.field(default_factory=list)  # anybody else banned by anybody: none expected
    group_sizes_after: collections.Counter = dataclasses.field(default_factory=collections.Counter)  # applied rounds
    steps_after: int = 0
    steps_lost_after: int = 0


def flat_gradient(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([parameter.grad.reshape(-1) for parameter in model.parameters()])


def apply_gradient(model: torch.nn.Module, optimizer: torch.optim.Optimizer, vector: torch.Tensor) -> None:
    offset = 0
    for parameter in model.parameters():
        parameter.grad.copy_(vector[offset: offset + parameter.numel()].view_as(parameter))
        offset += parameter.numel()
    optimizer.step()


def is_ghost_round(averagers: list[GroupAverager], results: dict[int, object]) -> bool:
    """Some peer found no group (None) although others finished a round with it as a member. It never
    reduced its slice, so all or nothing should have failed the round for the others. (A peer that
    raised RoundFailed may well have served its slice and missed another: that is no contradiction.)"""
    groups = [result.peer_ids for result in results.values() if hasattr(result, "peer_ids")]
    return any(result is None and any(averagers[index].peer_id.to_base58() in group for group in groups)
               for index, result in results.items())


def describe_round(averagers: list[GroupAverager], results: dict[int, object]) -> str:
    """Per peer: the size of its group, or what went wrong and in how many finished groups it counts."""
    groups = [result.peer_ids for result in results.values() if hasattr(result, "peer_ids")]
    described = []
    for index, result in results.items():
        if hasattr(result, "peer_ids"):
            described.append(f"peer {index}: group of {len(result.peer_ids)}")
        else:
            member = sum(averagers[index].peer_id.to_base58() in group for group in groups)
            described.append(f"peer {index}: {result!r} (in {member} other peers' groups)")
    return "; ".join(described)


def train(peers: Peers, run_name: str, rule: str, attack: Callable | None, catch: Catch | None = None
          ) -> RunResult:
    """One run of STEPS steps. With `catch`, the accountable averagers are used and peer LIAR lies as a
    reducer from step LIE_FROM; once every honest peer has banned it, the bench stops driving it."""
    task = get_task("digits")
    models = [task.build_model(MODEL_SEED) for _ in range(HONEST)]
    optimizers = [torch.optim.SGD(model.parameters(), lr=LEARNING_RATE) for model in models]
    momenta: list[torch.Tensor | None] = [None] * PEERS  # worker momentum, the honest peers' and the extra two
    batches = [task.batches(DATA_SEED + index, BATCH_SIZE) for index in range(HONEST)]
    extra_batches = [task.batches(DATA_SEED + index, BATCH_SIZE) for index in range(HONEST, PEERS)]
    generator = torch.Generator().manual_seed(ATTACK_SEED)  # the same noise for every rule
    aggregate = functools.partial(get_aggregator(rule), num_byzantine=BYZANTINE)
    averagers = peers.averagers if catch is None else peers.accountable
    liar_id = averagers[LIAR].peer_id.to_base58()
    driven = list(range(PEERS))  # the peers the bench calls every round
    rounds = failed = skipped = ghosts = 0
    round_seconds = []
    for step in range(STEPS):
        if catch is not None and step == LIE_FROM:
            averagers[LIAR].lie_as_reducer = True
        gradients = []
        for model, optimizer, source in zip(models, optimizers, batches):
            optimizer.zero_grad()
            task.loss(model, next(source)).backward()
            gradients.append(flat_gradient(model).detach().clone())
        if attack is None:  # no attack: the other two peers are honest too, each with its own batches
            for source in extra_batches:
                optimizers[0].zero_grad()
                task.loss(models[0], next(source)).backward()
                gradients.append(flat_gradient(models[0]).detach().clone())
        for index, gradient in enumerate(gradients):
            momenta[index] = gradient if momenta[index] is None else momenta[index].mul_(MOMENTUM).add_(gradient)
        sent = [momentum.clone() for momentum in momenta[:len(gradients)]]
        lies = [] if attack is None else attack(sent, BYZANTINE, generator=generator)
        everybody = sent + lies
        applied = False
        for attempt in range(MAX_TRIES):
            started = time.perf_counter()
            results = peers.round(averagers, {index: everybody[index] for index in driven},
                                  f"{run_name}-step{step}-try{attempt}", aggregate)
            round_seconds.append(time.perf_counter() - started)
            rounds += 1
            honest = [results[index] for index in range(HONEST)]
            succeeded = all(result is not None and not isinstance(result, Exception)
                            and len(result.peer_ids) == len(driven) for result in honest)
            if not succeeded:
                failed += 1
                ghosts += is_ghost_round(averagers, results)
                print(f"  {run_name} step {step} try {attempt} failed: {describe_round(averagers, results)}",
                      file=sys.stderr)
            if catch is not None and LIAR in driven and \
                    all(liar_id in averagers[index].accountability.banned for index in range(HONEST)):
                catch.caught = (step, attempt)
                catch.failures_when_caught = [str(result) for result in honest if isinstance(result, Exception)]
                liar = results[LIAR]
                catch.liar_outcome = (f"a result from a group of {len(liar.peer_ids)}" if hasattr(liar, "peer_ids")
                                      else repr(liar))
                driven.remove(LIAR)
                print(f"  {run_name}: every honest peer banned peer {LIAR} at step {step} try {attempt}; "
                      f"it is no longer driven", file=sys.stderr)
            if succeeded:
                applied = True
                if catch is not None and catch.caught is not None:
                    catch.group_sizes_after[len(honest[0].peer_ids)] += 1
                break
        if catch is not None and catch.caught is not None:
            catch.steps_after += 1
            catch.steps_lost_after += not applied
        if not applied:
            skipped += 1
            continue
        with torch.no_grad():
            for model, optimizer, result in zip(models, optimizers, honest):
                apply_gradient(model, optimizer, result.tensors[0])
    if catch is not None:
        catch.banned_by_honest = sum(liar_id in averagers[index].accountability.banned for index in range(HONEST))
        catch.banned_by_other_byzantine = liar_id in averagers[HONEST].accountability.banned
        for index, averager in enumerate(averagers):
            for peer_id, why in averager.accountability.banned.items():
                if peer_id != liar_id:
                    catch.other_bans.append(f"peer {index} banned {peer_id}: {why}")
    parameters = [torch.cat([p.detach().reshape(-1) for p in model.parameters()]) for model in models]
    finite = bool(torch.isfinite(parameters[0]).all())
    spread = max(float((other - parameters[0]).abs().max()) for other in parameters[1:]) / \
        max(float(parameters[0].abs().max()), 1e-30) if finite else float("nan")
    return RunResult(task.evaluate(models[0])["accuracy"], finite, spread, rounds, failed, skipped, ghosts,
                     round_seconds)


def attack_matrix(peers: Peers) -> dict[tuple[str, str], RunResult]:
    results = {}
    for run_index, (row, attack) in enumerate(ATTACK_ROWS.items()):
        for rule in RULES:
            started = time.perf_counter()
            results[row, rule] = result = train(peers, f"run{run_index}-{rule}", rule, attack)
            print(f"  {row} / {rule}: accuracy {result.accuracy:.3f}, replicas differ by {result.replicas_spread:.1e} "
                  f"(relative), {time.perf_counter() - started:.1f} s",
                  file=sys.stderr, flush=True)
    return results


def accountable_run(peers: Peers) -> tuple[RunResult, Catch]:
    peers.start_accountable()
    catch = Catch()
    started = time.perf_counter()
    result = train(peers, "accountable", ACCOUNTABLE_RULE, ATTACK_ROWS[ACCOUNTABLE_ATTACK], catch)
    print(f"  accountable run ({ACCOUNTABLE_ATTACK} / {ACCOUNTABLE_RULE}, peer {LIAR} lying as a reducer from step "
          f"{LIE_FROM}): accuracy {result.accuracy:.3f}, {time.perf_counter() - started:.1f} s",
          file=sys.stderr, flush=True)
    return result, catch


def print_accountable(result: RunResult, catch: Catch, matrix: dict[tuple[str, str], RunResult]
                      ) -> tuple[list[str], bool]:
    print()
    print(f"one more run with accountability on ({ACCOUNTABLE_RULE}, every peer signing with its Ed25519 identity, "
          f"verify_fraction 1): {BYZANTINE} Byzantine senders ({ACCOUNTABLE_ATTACK}), peer {LIAR} of them also lies "
          f"as a reducer from step {LIE_FROM} (every part it reduces comes back + 1)")
    if catch.caught is None:
        print(f"- NOT caught: banned by {catch.banned_by_honest} of {HONEST} honest peers at the end")
    else:
        step, attempt = catch.caught
        reasons = collections.Counter(error for error in catch.failures_when_caught)
        print(f"- caught at step {step}, try {attempt}: banned by every honest peer ({catch.banned_by_honest} of "
              f"{HONEST} at the end) and by the other Byzantine sender: {catch.banned_by_other_byzantine}; "
              f"honest peers' rounds then: " + ("; ".join(f"{count} x {error}" for error, count in reasons.items())
                                                 or "all succeeded") + f"; the liar's own call: {catch.liar_outcome}")
        sizes = ", ".join(f"{count} in groups of {size}" for size, count in sorted(catch.group_sizes_after.items()))
        print(f"- after the catch: {catch.steps_after} steps, {catch.steps_after - catch.steps_lost_after} applied "
              f"({sizes or 'none'}), {catch.steps_lost_after} lost")
    print(f"- bans of anybody else: {'; '.join(catch.other_bans) or 'none'}")
    print(f"- rounds {result.rounds}, failed and retried {result.failed_rounds}, steps lost {result.skipped_steps}; "
          f"honest replicas differ by {result.replicas_spread:.1e} (relative)")
    baseline = matrix["none", ACCOUNTABLE_RULE].accuracy
    same_attack = matrix[ACCOUNTABLE_ATTACK, ACCOUNTABLE_RULE].accuracy
    print(f"- final accuracy {result.accuracy:.3f} (the matrix's {ACCOUNTABLE_RULE}: attack-free {baseline:.3f}, "
          f"same attack without a lying reducer or accountability {same_attack:.3f})")

    expected_size = PEERS - 1
    caught_at_once = catch.caught is not None and catch.caught[0] == LIE_FROM
    excluded = (catch.caught is not None and catch.banned_by_honest == HONEST and not catch.other_bans
                and catch.steps_lost_after == 0 and set(catch.group_sizes_after) == {expected_size})
    accurate = baseline - result.accuracy <= WITHIN + 1e-9
    passed = caught_at_once and excluded and accurate
    verdict = [(f"lying reducer: {'caught' if caught_at_once else 'NOT caught'} in the step it began lying "
               f"(step {LIE_FROM}); {'excluded' if excluded else 'NOT cleanly excluded'} (banned by all "
               f"{HONEST} honest peers, nobody else banned, every later step applied with {expected_size} peers); "
               f"accuracy {result.accuracy:.3f}, {(baseline - result.accuracy) * 100:.1f} points below "
               f"{ACCOUNTABLE_RULE}'s attack-free run -> {'within' if accurate else 'NOT within'} "
               f"{WITHIN * 100:.0f} points")]
    return verdict, passed


def print_matrix(results: dict[tuple[str, str], RunResult]) -> tuple[list[str], bool]:
    z = attacks.a_little_is_enough_z(PEERS, BYZANTINE)
    print(f"digits: {PEERS} peers as one group every step, {BYZANTINE} Byzantine senders, num_byzantine={BYZANTINE}; "
          f"{STEPS} steps, {HONEST} honest batches of {BATCH_SIZE}, worker momentum {MOMENTUM}, SGD lr {LEARNING_RATE}; "
          f"held-out accuracy of an honest replica (ALIE z = {z:.3f})")
    print("| attack | " + " | ".join(RULES) + " |")
    print("|---|" + "---|" * len(RULES))
    for row in ATTACK_ROWS:
        cells = []
        for rule in RULES:
            result = results[row, rule]
            cells.append(f"{result.accuracy:.3f}" + ("" if result.finite else " (non-finite weights)")
                         + (f" ({result.skipped_steps} steps lost)" if result.skipped_steps else ""))
        print(f"| {row} | " + " | ".join(cells) + " |")
    everything = list(results.values())
    seconds = [s for result in everything for s in result.round_seconds]
    spread, spread_run = max((result.replicas_spread, key) for key, result in results.items() if result.finite)
    print(f"rounds: {sum(r.rounds for r in everything)}; failed and retried: "
          f"{sum(r.failed_rounds for r in everything)}; steps lost: {sum(r.skipped_steps for r in everything)}; "
          f"rounds where a peer found no group but others finished one with it as a member: "
          f"{sum(r.ghost_rounds for r in everything)}")
    print(f"seconds per round (8 peers, matchmaking included): median {statistics.median(seconds):.3f}, "
          f"max {max(seconds):.3f}")
    print(f"honest replicas at the end (runs with finite weights): largest difference / largest weight "
          f"{spread:.1e} ({' / '.join(spread_run)})")

    verdict, passed = [], True
    for rule in ROBUST_RULES:
        baseline = results["none", rule].accuracy
        worst_row = min((row for row in ATTACK_ROWS if row != "none"), key=lambda row: results[row, rule].accuracy)
        drop = baseline - results[worst_row, rule].accuracy
        ok = drop <= WITHIN + 1e-9
        passed &= ok
        verdict.append(f"{rule}: worst attack {worst_row!r}, {drop * 100:.1f} points below its attack-free "
                       f"{baseline:.3f} -> {'within' if ok else 'NOT within'} {WITHIN * 100:.0f} points")
    baseline = results["none", "mean"].accuracy
    for row in MEAN_MUST_COLLAPSE:
        drop = baseline - results[row, "mean"].accuracy
        collapsed = drop >= COLLAPSE
        passed &= collapsed
        verdict.append(f"mean under {row}: {results[row, 'mean'].accuracy:.3f} vs attack-free {baseline:.3f} -> "
                       f"{'collapses' if collapsed else 'does NOT collapse'}")
    return verdict, passed


# 2. cost of one round without attacks ----------------------------------------------------------

def cost_inputs(round_index: int) -> list[list[torch.Tensor]]:
    generator = torch.Generator().manual_seed(1000 + round_index)
    return [[torch.randn(shape, generator=generator) for shape in COST_SHAPES] for _ in range(COST_PEERS)]


def check(rule: str, outputs: list[list[torch.Tensor]], inputs: list[list[torch.Tensor]]) -> bool:
    """The result of `rule` on every peer: the same everywhere, and for the mean and the median the
    exact statistic of the inputs (coordinate-wise, so the split into parts does not matter)."""
    for position, parts in enumerate(zip(*inputs)):
        first = outputs[0][position]
        if not torch.isfinite(first).all():
            return False
        if any(not torch.allclose(output[position], first, atol=1e-5) for output in outputs[1:]):
            return False
        if rule == "mean" and not torch.allclose(first, torch.stack(parts).mean(0), atol=1e-5):
            return False
        if rule == "median":  # on a slice: sorting 4 x 10M values takes seconds
            middle = torch.stack([part[:MEDIAN_CHECKED] for part in parts]).sort(dim=0).values
            middle = middle[COST_PEERS // 2 - 1: COST_PEERS // 2 + 1].mean(0)
            if not torch.allclose(first[:MEDIAN_CHECKED], middle, atol=1e-5):
                return False
    return True


def cost_peer(index: int, initial_peers: list[str], barrier, commands, replies) -> None:
    """One of our four peers, in its own (spawned) process: its own SwarmClient (libp2p daemon, DHT
    node) and GroupAverager. For each command (rule, round index) it makes this round's inputs (all
    four peers', to check its result), waits at the barrier with the other three, times its round,
    waits for the other three to finish theirs, checks the result and reports (index, seconds or
    None, checked, error, every 10th value)."""
    die_with_parent()
    torch.set_num_threads(1)  # as hivemind's side: one thread per peer
    client = None
    try:
        client = SwarmClient(ClientOptions(initial_peers=tuple(initial_peers), network=NetworkOptions()))
        options = AveragingOptions(min_matchmaking_time=MIN_MATCHMAKING_TIME, request_timeout=REQUEST_TIMEOUT,
                                   matchmaking_timeout=MATCHMAKING_TIMEOUT, round_timeout=ROUND_TIMEOUT)
        averager = GroupAverager(client.p2p, client.dht, "bench-cost", options, state_provider=bytes)
        client.run(averager.start())
        replies.put((index, "ready"))
        while (command := commands.get()) is not None:
            rule, round_index = command
            inputs = cost_inputs(round_index)
            aggregate = functools.partial(get_aggregator(rule), num_byzantine=1)  # 1 of 4: what 4 peers tolerate
            try:
                barrier.wait(timeout=CHILD_START_TIMEOUT)
            except threading.BrokenBarrierError:
                replies.put((index, None, False, "the barrier broke (another peer did not come)", None))
                continue
            started = time.perf_counter()
            result = error = None
            try:
                result = client.run(averager.average(inputs[index], f"{rule}-round{round_index}", aggregate,
                                                     COST_PEERS), timeout=ROUND_TIMEOUT + MATCHMAKING_TIMEOUT)
                elapsed = time.perf_counter() - started
            except Exception as failure:  # a failed round is counted, not fatal
                error = repr(failure)
            if result is None and error is None:
                error = "no group in time"
            try:  # nobody checks before all are done: checking takes CPU that the others' rounds would miss
                barrier.wait(timeout=ROUND_TIMEOUT + MATCHMAKING_TIMEOUT + 10)
            except threading.BrokenBarrierError:
                pass
            if error is not None:
                replies.put((index, None, False, error, None))
                continue
            # as numpy: torch's queue pickling would share the tensor through a torch_shm_manager process,
            # which inherits our descriptors (this process's sentinel too: joining it would then hang)
            sample = [tensor.reshape(-1)[::SAMPLE_STRIDE].numpy().copy() for tensor in result.tensors]
            replies.put((index, elapsed, check(rule, [result.tensors], inputs), None, sample))
            del inputs, result
    except Exception as error:
        replies.put((index, "crashed", repr(error)))
    finally:
        if client is not None:
            client.shutdown()


class OursForCost:
    """Our four peers for the cost rounds, each in its own process (see cost_peer), driven from here."""

    def __init__(self, initial_peers: list[str]):
        context = multiprocessing.get_context("spawn")
        self.barrier = context.Barrier(COST_PEERS)
        self.replies = context.Queue()
        self.commands = [context.Queue() for _ in range(COST_PEERS)]
        self.processes = [context.Process(target=cost_peer, name=f"bench-cost-peer-{index}",
                                          args=(index, initial_peers, self.barrier, self.commands[index],
                                                self.replies)) for index in range(COST_PEERS)]
        for process in self.processes:
            process.start()
        deadline = time.monotonic() + CHILD_START_TIMEOUT
        ready = set()
        while len(ready) < COST_PEERS:
            try:
                reply = self.replies.get(timeout=max(1.0, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"cost peers {sorted(set(range(COST_PEERS)) - ready)} did not start in "
                                   f"{CHILD_START_TIMEOUT:.0f} s") from None
            if reply[1] != "ready":
                raise RuntimeError(f"cost peer {reply[0]} failed to start: {reply[2:]}")
            ready.add(reply[0])

    def round(self, rule: str, round_index: int, inputs: list[list[torch.Tensor]]) -> tuple[list, bool, list]:
        for commands in self.commands:
            commands.put((rule, round_index))
        seconds, samples = [None] * COST_PEERS, [None] * COST_PEERS
        checked, errors = [False] * COST_PEERS, ["no reply"] * COST_PEERS
        deadline = time.monotonic() + CHILD_START_TIMEOUT + ROUND_TIMEOUT + MATCHMAKING_TIMEOUT + 60
        for _ in range(COST_PEERS):
            try:
                reply = self.replies.get(timeout=max(1.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if reply[1] == "crashed":
                errors[reply[0]] = f"crashed: {reply[2]}"
                continue
            index, seconds[index], checked[index], errors[index], samples[index] = reply
        if any(elapsed is None for elapsed in seconds):
            self.barrier.reset()  # a peer that never came leaves the others' next wait broken otherwise
        correct = all(checked) and all(
            all(numpy.allclose(mine, first, atol=1e-5) for mine, first in zip(sample, samples[0]))
            for sample in samples[1:])
        return seconds, correct, errors

    def shutdown(self) -> None:
        for commands in self.commands:
            commands.put(None)
        for process in self.processes:
            process.join(timeout=20)
        for process in self.processes:
            if process.is_alive():
                process.terminate()
                process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join(timeout=5)
        for channel in [*self.commands, self.replies]:
            channel.close()
            channel.cancel_join_thread()


class HivemindForCost(HivemindAveragers):
    def __init__(self, initial_peers: list[str]):
        super().__init__(initial_peers, COST_PEERS, COST_SHAPES, "bench-hivemind-cost",
                         min_matchmaking_time=MIN_MATCHMAKING_TIME, request_timeout=REQUEST_TIMEOUT,
                         round_timeout=ROUND_TIMEOUT)

    def round(self, round_index: int, inputs: list[list[torch.Tensor]]) -> tuple[list, bool, list]:
        seconds, results, outputs = self.timed_round(inputs, MATCHMAKING_TIMEOUT)
        correct = all(elapsed is not None for elapsed in seconds) and check("mean", outputs, inputs)
        return seconds, correct, [None if elapsed else repr(result) for elapsed, result in zip(seconds, results)]


def cost_rounds(ours: OursForCost, hivemind: HivemindForCost) -> dict[str, dict]:
    sides = {rule: functools.partial(ours.round, rule) for rule in COST_RULES}
    sides["hivemind"] = hivemind.round
    stats = {name: {"seconds": [], "failed": 0, "correct": True} for name in sides}
    for round_index in range(COST_WARM_UP + COST_ROUNDS):
        inputs = cost_inputs(round_index)
        for name, side in sides.items():
            seconds, correct, errors = side(round_index, inputs)
            print(f"  cost round {round_index} {name}: {[None if s is None else round(s, 2) for s in seconds]}",
                  file=sys.stderr, flush=True)
            for index, elapsed in enumerate(seconds):
                if elapsed is None:
                    print(f"  cost round {round_index} {name}: peer {index} failed: {errors[index]}", file=sys.stderr)
            if round_index < COST_WARM_UP:
                continue
            stats[name]["seconds"] += [s for s in seconds if s is not None]
            stats[name]["failed"] += sum(s is None for s in seconds)
            stats[name]["correct"] &= correct
        if round_index == COST_WARM_UP:
            for rule in COST_RULES:
                stats[rule]["alone"] = aggregation_seconds(rule, inputs)
        del inputs
    return stats


def aggregation_seconds(rule: str, inputs: list[list[torch.Tensor]]) -> float:
    """CPU seconds of the rule alone over all values of one round, in the parts the reducers see
    (hivemind's default part size), on one thread: the work the group's reducers share."""
    aggregate = functools.partial(get_aggregator(rule), num_byzantine=1)
    part = DEFAULT_PART_SIZE_BYTES // 4
    started = time.process_time()
    for tensors in zip(*inputs):
        flat = [tensor.reshape(-1) for tensor in tensors]
        for offset in range(0, flat[0].numel(), part):
            aggregate([tensor[offset: offset + part] for tensor in flat])
    return time.process_time() - started


def print_cost(stats: dict[str, dict]) -> tuple[list[str], bool]:
    values = sum(torch.Size(shape).numel() for shape in COST_SHAPES)
    print()
    print(f"one round without attacks, {COST_PEERS} peers, {values / 1e6:.0f}M float32 ({4 * values / 1e6:.0f} MB) "
          f"per peer, min_matchmaking_time {MIN_MATCHMAKING_TIME} s, target group {COST_PEERS}; per peer from the "
          f"common call to its result; {COST_ROUNDS} rounds after {COST_WARM_UP} warm-up")
    print("| averager | median s | min s | max s | failed peer-rounds | result checked | / hivemind | / ours, mean "
          "| rule alone, CPU s (all values, 1 thread) |")
    print("|---|---|---|---|---|---|---|---|---|")
    hivemind = statistics.median(stats["hivemind"]["seconds"]) if stats["hivemind"]["seconds"] else float("nan")
    labels = {"hivemind": "hivemind DecentralizedAverager (mean)",
              **{rule: f"GroupAverager (ours), {rule}" for rule in COST_RULES}}
    ours_mean = statistics.median(stats["mean"]["seconds"]) if stats["mean"]["seconds"] else float("nan")
    ratios = {}
    for name in ("hivemind", *COST_RULES):
        seconds = stats[name]["seconds"] or [float("nan")]
        ratios[name] = statistics.median(seconds) / hivemind
        alone = f"{stats[name]['alone']:.2f}" if "alone" in stats[name] else "-"
        print(f"| {labels[name]} | {statistics.median(seconds):.3f} | {min(seconds):.3f} | {max(seconds):.3f} | "
              f"{stats[name]['failed']} of {COST_PEERS * COST_ROUNDS} | {stats[name]['correct']} | "
              f"{ratios[name]:.2f}x | {statistics.median(seconds) / ours_mean:.2f}x | {alone} |")
    verdict, passed = [], True
    for rule in ("median", "centered_clip"):
        ok = ratios[rule] <= COST_TARGET
        passed &= ok
        verdict.append(f"cost of {rule}: {ratios[rule]:.2f}x hivemind's round -> "
                       f"{'within' if ok else 'NOT within'} {COST_TARGET}x")
    return verdict, passed


def main() -> None:
    global STEPS
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=STEPS,
                        help=f"training steps per run (default {STEPS}: the 12-minute budget here)")
    STEPS = parser.parse_args().steps
    if STEPS <= LIE_FROM:
        parser.error(f"--steps must exceed {LIE_FROM}, the step the lying reducer begins")
    started = time.perf_counter()
    # hivemind forks its DHT and averager processes: start them before this process has threads
    # (our clients' event loops, the queues' feeder threads), and keep OpenMP out of it (not
    # fork-safe); every peer then aggregates on one thread. Our cost peers are spawned, not forked.
    torch.set_num_threads(1)
    hivemind = ours = peers = None
    with LocalSwarm("unused") as local:
        local.start_bootstrap()
        try:
            hivemind = HivemindForCost(local.initial_peers)
            ours = OursForCost(local.initial_peers)
            cost = cost_rounds(ours, hivemind)
            ours.shutdown()
            ours = None
            hivemind.shutdown()
            hivemind = None
            peers = Peers(local.initial_peers)
            matrix = attack_matrix(peers)
            accountable, catch = accountable_run(peers)
        finally:
            if ours is not None:
                ours.shutdown()
            if hivemind is not None:
                hivemind.shutdown()
            if peers is not None:
                peers.shutdown()
    matrix_verdict, matrix_passed = print_matrix(matrix)
    accountable_verdict, accountable_passed = print_accountable(accountable, catch, matrix)
    cost_verdict, cost_passed = print_cost(cost)
    print()
    print("verdict:")
    for line in matrix_verdict + accountable_verdict + cost_verdict:
        print(f"- {line}")
    print(f"all targets met: {matrix_passed and accountable_passed and cost_passed}; "
          f"wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()

"""`CollaborativeOptimizer`: wrap any torch optimizer so that peers train one model together.

Each peer computes gradients on its own data and calls `step()` after every backward. Gradients
accumulate locally until the peers at the same global step (epoch) have gathered
`target_batch_size` samples in all (progress is published in the DHT); then the peers form a
group, aggregate their mean gradients in one all-or-nothing all-reduce, and every one of them
applies the same update with its wrapped optimizer. Equal starting states plus equal updates keep
every replica equal. A peer that falls behind (it joined late, or a round failed for it alone)
downloads the current state from a peer ahead instead of averaging stale gradients.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
import threading
import time
from typing import Any, Callable, Iterable, Sequence

import torch
from hivemind.utils import get_dht_time

from protocol.network import NetworkOptions
from protocol.peer_keys import PeerKey, accountable_identity
from swarm.client import ClientOptions, SwarmClient
from swarm.robust import get_aggregator
from swarm.training.accountability import AccountabilityOptions
from swarm.training.allreduce import Aggregate, RoundFailed
from swarm.training.averager import AveragingOptions, GroupAverager, RoundResult, check_run_id
from swarm.training.coded import CodedAverager, WorkerAssignment
from swarm.training.coded_reduce import CodedOptions
from swarm.training.progress import Progress, RateMeter, peers_ahead, ready_for_step, replicas_disagree

logger = logging.getLogger(__name__)

OUTVOTED_ROUNDS_TO_BAN = 3  # coded rounds in which a peer's group outvoted it before it is refused as a groupmate


class CollaborativeOptimizer:
    def __init__(self, params: Iterable[torch.nn.Parameter], optimizer: torch.optim.Optimizer, *, run_id: str,
                 initial_peers: Sequence[str], target_batch_size: int, batch_size_per_step: int | None = None,
                 aggregator: str | Aggregate = "mean", num_byzantine: int = 0,
                 averaging: AveragingOptions = AveragingOptions(), network: NetworkOptions = NetworkOptions(),
                 load_state: bool = True, round_attempts: int = 3, progress_period: float = 0.25,
                 progress_expiry: float = 5.0, accountability: AccountabilityOptions | None = AccountabilityOptions(),
                 client: SwarmClient | None = None, peer_key: PeerKey | None = None,
                 coding: CodedOptions | None = None, worker_momentum: float = 0.0):
        """`accountability` (on by default; None turns it off) signs every round and checks reducers
        before applying anything; it needs an Ed25519 libp2p identity: one is made unless
        `network.identity_path` names one (or, with your own `client`, pass its `peer_key`).
        `coding` makes global steps coded rounds (`coded_step`): gradient coding against stragglers,
        checked by redundancy; it replaces accountability, whose checks need individual inputs.
        `worker_momentum` (beta > 0) makes each peer send its momentum rather than its last gradient:
        m = beta m + g, torch's SGD momentum buffer, kept by the peer before aggregation. The honest
        peers' vectors then spread far less, so a robust `aggregator` loses less of the honest mean
        and lets less of a liar through (Karimireddy, He and Jaggi, ICML 2021). With the mean and SGD
        without momentum this is exactly SGD with momentum beta on the averaged gradient. Pair it
        with an optimizer that keeps no momentum of its own (SGD without momentum, Adam with betas
        (0, beta2)). Coded rounds sum shard gradients across peers, so they cannot use it."""
        if not 0.0 <= worker_momentum < 1.0:
            raise ValueError(f"worker_momentum must be in [0, 1), got {worker_momentum}")
        if coding is not None and worker_momentum:
            raise ValueError("worker momentum needs each peer's own gradients; coded rounds sum shards across "
                             "peers: use one or the other")
        if coding is not None:
            accountability = None
        self.params = [param for param in params]
        self.optimizer, self.run_id = optimizer, check_run_id(run_id)
        self.target_batch_size, self.batch_size_per_step = target_batch_size, batch_size_per_step
        if isinstance(aggregator, str):
            rule = get_aggregator(aggregator)
            self.aggregate: Aggregate = lambda tensors: rule(tensors, num_byzantine=num_byzantine)
        else:
            self.aggregate = aggregator
        self.round_attempts, self.progress_period, self.progress_expiry = round_attempts, progress_period, progress_expiry
        self.epoch = 0  # global steps taken by the run, as far as this replica has applied them
        self.samples = 0  # accumulated towards the next global step
        self.others: list[Progress] = []  # the latest reports of the other live peers
        self.extra_state: dict[str, Any] = {}  # travels with the state (e.g. the run's settings)
        self._accumulated = [torch.zeros_like(param) for param in self.params]
        self.worker_momentum = worker_momentum
        self._momentum: list[torch.Tensor] | None = None  # this peer's momentum buffer (worker momentum)
        self._lock = threading.RLock()  # the replica's state: held while stepping and while serving it
        self._rate = RateMeter()
        self._next_download = 0.0
        self.done = False
        self._owns_client = client is None
        self._identity_dir = None
        if client is None and accountability is not None:
            network, peer_key, self._identity_dir = accountable_identity(network)
        self.client = client or SwarmClient(ClientOptions(initial_peers=tuple(initial_peers),
                                                          network=_server_mode(network)))
        try:
            self.coding = coding
            averager_type = GroupAverager if coding is None else CodedAverager
            self.averager = averager_type(self.client.p2p, self.client.dht, run_id, averaging, self.state_bytes,
                                          peer_key=peer_key if accountability is not None else None,
                                          accountability=accountability or AccountabilityOptions())
            self.outvoted: dict[str, int] = {}  # coded rounds: peer -> rounds in which its group outvoted it
            self.client.run(self.averager.start())
            self._progress_task = self.client.run(self._start_reporting())
            if load_state and self.refresh_progress():
                self.load_state_from_peers()
        except BaseException:
            if self._owns_client:
                self.client.shutdown()
            raise

    @property
    def peer_id(self) -> str:
        return self.client.p2p.peer_id.to_base58()

    # ---- the training loop's side

    def step(self, batch_size: int | None = None) -> bool:
        """Take this peer's gradients (from the last backward) into the next global step; run that
        step once the swarm has gathered enough samples. True when a global step was applied."""
        batch_size = batch_size or self.batch_size_per_step
        if not batch_size:
            raise ValueError("pass step(batch_size=...) or batch_size_per_step= to the constructor")
        with self._lock:
            for accumulated, param in zip(self._accumulated, self.params):
                if param.grad is not None:
                    accumulated.add_(param.grad, alpha=batch_size)
                    param.grad = None
            self.samples += batch_size
        self._rate.add(batch_size)
        if peers_ahead(self.others, self.epoch):
            self.load_state_from_peers()
            return False
        if not ready_for_step(self._progress(), self.others, self.target_batch_size):
            return False
        return self._global_step()

    def coded_step(self, shard_gradients: Callable[[int, int, int], Sequence[torch.Tensor]]) -> bool:
        """One global step as a coded round (the optimizer was made with `coding`): once the group is
        known, `shard_gradients(epoch, shard, num_shards)` computes the gradient of each shard this
        peer's code assigns it; the step's gradient is the mean over all shards, decoded without
        waiting for up to `coding.stragglers` slow peers. True when a global step was applied."""
        def compute(assignment: WorkerAssignment) -> dict[int, Sequence[torch.Tensor]]:
            return {shard: shard_gradients(self.epoch, shard, assignment.num_shards) for shard in assignment.shards}

        self.refresh_progress()
        if peers_ahead(self.others, self.epoch):
            self.load_state_from_peers()
            return False
        live = [p for p in self.others if not p.done and p.epoch >= self.epoch - 1]
        if not live:  # alone: the one shard is all the data
            self._apply(shard_gradients(self.epoch, 0, 1), group=())
            return True
        options = self.averager.options
        try:
            result = self.client.run(
                self.averager.coded_round(compute, self.params, f"coded-{self.epoch}", self.coding, len(live) + 1,
                                          gather={**self._progress().to_wire(), "fingerprint": self._fingerprint()}),
                timeout=options.matchmaking_timeout + options.round_timeout + 10)
        except RoundFailed as error:
            logger.warning(f"coded round for step {self.epoch + 1} failed ({error})")
            return False
        if result is None:
            return False
        for liar in result.liars:
            self.outvoted[liar] = self.outvoted.get(liar, 0) + 1
            if self.outvoted[liar] >= OUTVOTED_ROUNDS_TO_BAN:  # its copies disagreed with its group again and again
                self.averager.local_bans.setdefault(liar, f"outvoted by its coded group in {self.outvoted[liar]} rounds")
        if result.left_out:
            logger.info(f"step {self.epoch + 1} decoded without waiting for {len(result.left_out)} peer(s)")
        self._apply(result.tensors, group=result.peer_ids)
        self._repair_if_replicas_differ(result.gathered, len(result.peer_ids))
        return True

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def _global_step(self) -> bool:
        with self._lock:
            gradients = [accumulated / self.samples for accumulated in self._accumulated]
        momentum = self._next_momentum(gradients)
        if momentum is not None:  # what this peer sends; kept once a step is applied
            gradients = momentum
        for attempt in range(self.round_attempts):
            self.refresh_progress()  # decide on fresh reports: the background view lags a global step
            if peers_ahead(self.others, self.epoch):
                self.load_state_from_peers()
                return False
            if not [progress for progress in self.others if not progress.done]:
                self._apply(gradients, group=(), momentum=momentum)  # alone in the run: nothing to wait for
                return True
            # a partner one step behind in our view has usually just taken that step (the view lags):
            # wait for it rather than leave it out; peers further behind will download the state
            expected = 1 + len([p for p in self.others if p.epoch >= self.epoch - 1 and not p.done])
            try:
                result = self._average(gradients, f"gradients-{self.epoch}", expected)
            except RoundFailed as error:
                logger.warning(f"averaging round for step {self.epoch + 1} failed ({error}); retrying")
                continue
            if result is not None:
                self._apply(result.tensors, group=result.peer_ids, momentum=momentum)
                self._repair_if_replicas_differ(result.gathered, len(result.peer_ids))
                return True
            logger.info(f"no group formed for step {self.epoch + 1} (attempt {attempt + 1}); retrying")
        return False  # keep accumulating: the next step() tries again

    def _repair_if_replicas_differ(self, gathered: dict[str, dict], group_size: int) -> None:
        """Replicas that stepped alone (before they saw each other) or missed a download apply the
        same averaged gradients to different parameters and never meet again: the whole group (all
        see the same fingerprints, so all decide alike) averages parameters and optimizer state."""
        if replicas_disagree(gathered.values()):
            logger.info(f"the group's replicas differed at step {self.epoch}: averaging their state")
            self._average_state(f"repair-{self.epoch}", group_size, with_optimizer=True)

    def _average(self, tensors: Sequence[torch.Tensor], tag: str, expected_group_size: int) -> RoundResult | None:
        options = self.averager.options
        return self.client.run(self._average_unless_left_behind(tensors, tag, expected_group_size),
                               timeout=options.matchmaking_timeout + options.round_timeout + 10)

    async def _average_unless_left_behind(self, tensors: Sequence[torch.Tensor], tag: str, expected_group_size: int
                                          ) -> RoundResult | None:
        """A round, given up while still looking for a group once the run has moved past our step:
        the partners we wait for are gone, and their state is what we need (download, not wait)."""
        gather = {**self._progress().to_wire(), "fingerprint": self._fingerprint()}
        round_task = asyncio.create_task(self.averager.average(tensors, tag, self.aggregate, expected_group_size,
                                                               gather=gather))
        while True:
            done, _ = await asyncio.wait({round_task}, timeout=self.progress_period)
            if done:
                return round_task.result()
            if self.averager.looking_for_group and peers_ahead(self.others, self.epoch):
                round_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await round_task
                return None

    def _next_momentum(self, gradients: Sequence[torch.Tensor]) -> list[torch.Tensor] | None:
        """This peer's first moment after this step's gradients (None without worker momentum)."""
        if not self.worker_momentum:
            return None
        if self._momentum is None:
            return [gradient.clone() for gradient in gradients]
        return [self.worker_momentum * previous + gradient for previous, gradient in zip(self._momentum, gradients)]

    def _apply(self, gradients: Sequence[torch.Tensor], group: Sequence[str],
               momentum: list[torch.Tensor] | None = None) -> None:
        with self._lock:
            if momentum is not None:
                self._momentum = momentum
            for param, gradient in zip(self.params, gradients):
                param.grad = gradient.to(param.dtype).reshape(param.shape).clone()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            for accumulated in self._accumulated:
                accumulated.zero_()
            self.samples, self.epoch = 0, self.epoch + 1
        logger.debug(f"global step {self.epoch} applied ({f'group of {len(group)}' if group else 'alone'})")

    def average_parameters(self, tag: str = "final", attempts: int = 3) -> bool:
        """Make every live replica hold the same parameters (the run's aggregation rule over the
        group's values). True when a group averaged; False when this peer was alone or no group formed."""
        for _ in range(attempts):
            self.refresh_progress()
            partners = [p for p in self.others if p.epoch >= self.epoch and not p.done]
            if not partners:
                return False
            if self._average_state(f"parameters-{tag}-{self.epoch}", len(partners) + 1, with_optimizer=False):
                return True
        return False

    def _average_state(self, tag: str, expected_group_size: int, with_optimizer: bool) -> bool:
        with self._lock:
            tensors = self._state_tensors(with_optimizer)
            values = [tensor.detach().clone() for tensor in tensors]
        try:
            result = self._average(values, tag, expected_group_size)
        except RoundFailed as error:
            logger.warning(f"averaging the state ({tag}) failed: {error}")
            return False
        if result is None:
            return False
        with self._lock, torch.no_grad():
            for tensor, value in zip(tensors, result.tensors):
                tensor.copy_(value.reshape(tensor.shape))
        return True

    def _state_tensors(self, with_optimizer: bool) -> list[torch.Tensor]:
        """The parameters, then (optionally) the optimizer's floating-point statistics, in a fixed order."""
        tensors = list(self.params)
        if with_optimizer:
            for param in self.params:
                state = self.optimizer.state.get(param, {})
                tensors += [state[key] for key in sorted(state)
                            if isinstance(state[key], torch.Tensor) and state[key].is_floating_point()
                            and state[key].dim() > 0]
        return tensors

    def _fingerprint(self) -> list[float]:
        with torch.no_grad():
            flat = torch.cat([param.detach().reshape(-1).double() for param in self.params])
            return [float(flat.sum()), float(flat.square().sum())]

    # ---- state: what a newcomer downloads, what a checkpoint holds

    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"epoch": self.epoch, "params": [param.detach().clone() for param in self.params],
                    "optimizer": self.optimizer.state_dict(), "extra": dict(self.extra_state)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        params = state["params"]
        if len(params) != len(self.params) or any(p.shape != q.shape for p, q in zip(params, self.params)):
            raise ValueError("the state's parameters do not match this model (another model or task?)")
        with self._lock, torch.no_grad():
            for param, value in zip(self.params, params):
                param.copy_(value)
            self.optimizer.load_state_dict(state["optimizer"])
            self.epoch, self.extra_state = int(state["epoch"]), dict(state.get("extra", {}))
            self._momentum = None  # another state: this peer's history no longer fits it
            for accumulated in self._accumulated:
                accumulated.zero_()
            self.samples = 0

    def state_bytes(self) -> bytes:
        buffer = io.BytesIO()
        torch.save(self.state_dict(), buffer)
        return buffer.getvalue()

    def load_state_from_peers(self) -> bool:
        """Download the state of the most advanced peer (trying the next on failure)."""
        if time.monotonic() < self._next_download:
            return False
        self._next_download = time.monotonic() + 1.0  # unreachable peers: retry after their records refresh
        for progress in peers_ahead(self.others, self.epoch - 1):
            if progress.epoch < self.epoch:
                break
            try:
                data = self.client.run(self.averager.download_state(progress.peer_id),
                                       timeout=self.averager.options.state_timeout + 5)
                # weights_only: a peer's bytes are data, never code
                self.load_state_dict(torch.load(io.BytesIO(data), weights_only=True))
            except Exception as error:
                logger.warning(f"could not download the state from {progress.peer_id}: {error}")
                continue
            logger.info(f"loaded the state of step {self.epoch} from peer {progress.peer_id}")
            return True
        return False

    # ---- progress in the DHT

    @property
    def banned(self) -> dict[str, str]:
        """Peers left out of our groups, downloads and counts (peer id -> why)."""
        if not hasattr(self, "averager"):
            return {}
        accountability = self.averager.accountability
        return {**self.averager.local_bans, **(accountability.banned if accountability is not None else {})}

    def _progress(self) -> Progress:
        return Progress(self.peer_id, self.epoch, self.samples, self._rate.rate(), self.done)

    @property
    def _progress_key(self) -> str:
        return f"{self.run_id}.progress"

    async def _start_reporting(self) -> asyncio.Task:
        return asyncio.create_task(self._report_forever())

    async def _report_forever(self) -> None:
        while True:
            try:
                await self._report_and_read()
            except Exception as error:
                logger.debug(f"progress report failed: {error}")
            await asyncio.sleep(self.progress_period)

    async def _report_and_read(self) -> None:
        dht = self.client.dht
        await dht.store(self._progress_key, self._progress().to_wire(), get_dht_time() + self.progress_expiry,
                        subkey=self.peer_id)
        found = await dht.get(self._progress_key, latest=True)
        others = []
        if found is not None and isinstance(found.value, dict):
            for subkey, item in found.value.items():
                if subkey != self.peer_id and isinstance(subkey, str) and subkey not in self.banned:
                    progress = Progress.from_wire(subkey, item.value)
                    if progress is not None:
                        others.append(progress)
        self.others = others

    def refresh_progress(self) -> list[Progress]:
        """Report now and read everyone's progress (instead of waiting for the background refresh)."""
        self.client.run(self._report_and_read(), timeout=30)
        return self.others

    def finish(self) -> None:
        """Tell the run this peer is done, so that nobody waits for it in a group."""
        self.done = True
        self.refresh_progress()

    def wait_for_stragglers(self, final_epoch: int, timeout: float = 60.0) -> None:
        """Stay reachable until every live peer of the run has reached `final_epoch` (they download
        the final state from us), or `timeout` passes."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            behind = [p for p in self.refresh_progress() if p.epoch < final_epoch and not p.done]
            if not behind:
                return
            time.sleep(self.progress_period)
        logger.warning(f"leaving while {len(behind)} peer(s) have not reached step {final_epoch}")

    def close(self) -> None:
        self.client.cancel_background(self._progress_task)
        if not self.client.loop.is_closed():
            self.client.run(self.averager.stop(), timeout=10)
        if self._owns_client:
            self.client.shutdown()
        if self._identity_dir is not None:
            self._identity_dir.cleanup()

    def __enter__(self) -> CollaborativeOptimizer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _server_mode(network: NetworkOptions) -> NetworkOptions:
    """Averaging peers answer requests (join a group, reduce a part, send the state): never client mode."""
    return dataclasses.replace(network, client_mode=False)

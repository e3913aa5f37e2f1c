"""`swarm train TASK`: one peer of a collaborative training run of a built-in task.

The run's settings (task, seed, number of global steps, batch size to gather, learning rate,
aggregation rule) are agreed through the DHT: the earliest proposal under the run id wins, so
every peer trains the same model towards the same final step, whatever flags it was given.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from hivemind.utils import get_dht_time
from tqdm import tqdm

from protocol.network import NetworkOptions
from protocol.peer_keys import PeerKey, accountable_identity
from swarm.client import ClientOptions, SwarmClient
from swarm.training.averager import AveragingOptions, check_run_id
from swarm.training.accountability import AccountabilityOptions
from swarm.training.coded_reduce import CodedOptions
from swarm.training.optimizer import CollaborativeOptimizer
from swarm.training.shards import peer_seed
from swarm.training.tasks import get_task

logger = logging.getLogger(__name__)

_SETTINGS_LIFETIME = 24 * 3600.0  # a run id names one run for a day


@dataclasses.dataclass(frozen=True)
class RunSettings:
    task: str
    seed: int = 0
    steps: int = 60  # global steps; every peer stops after this one
    target_batch_size: int = 256  # samples gathered by the swarm per global step
    lr: float | None = None  # the task's default when None
    aggregator: str = "mean"
    num_byzantine: int = 0
    worker_momentum: float = 0.0  # each peer's first moment, aggregated instead of its last gradient
    coding: str = ""  # "", "fractional" or "cyclic": global steps as coded rounds against stragglers
    stragglers: int = 0  # with coding: slow peers a step does not wait for
    proposed_at: float = 0.0

    def to_wire(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, wire: Any) -> RunSettings | None:
        try:
            return cls(**{field.name: wire[field.name] for field in dataclasses.fields(cls)})
        except (TypeError, KeyError):
            return None


@dataclasses.dataclass(frozen=True)
class TrainOptions:
    run_id: str
    initial_peers: tuple[str, ...]
    proposed: RunSettings
    batch_size: int = 32  # this peer's batch per local step
    network: NetworkOptions = NetworkOptions(client_mode=False)
    averaging: AveragingOptions = AveragingOptions()
    checkpoint_dir: str | None = None
    checkpoint_every: int = 20  # global steps between checkpoints
    progress: bool = True
    accountability: AccountabilityOptions | None = AccountabilityOptions()  # None: rounds are not verified
    die_in_round: int = 0  # tests: SIGKILL this process in the middle of its N-th averaging round
    lie_as_reducer: bool = False  # tests and benches: return wrong parts as a reducer
    straggle: float = 0.0  # tests and benches: seconds of extra delay in every coded step's compute


async def agree_settings(client: SwarmClient, run_id: str, proposed: RunSettings) -> RunSettings:
    """The run's settings: the earliest proposal stored under the run id (ours if we are first)."""
    key = f"{run_id}.settings"
    peer_id = client.p2p.peer_id.to_base58()
    await client.dht.store(key, proposed.to_wire(), get_dht_time() + _SETTINGS_LIFETIME, subkey=peer_id)
    found = await client.dht.get(key, latest=True)
    candidates = [(proposed.proposed_at, peer_id, proposed)]
    if found is not None and isinstance(found.value, dict):
        for subkey, item in found.value.items():
            settings = RunSettings.from_wire(item.value)
            if settings is not None and isinstance(subkey, str):
                candidates.append((settings.proposed_at, subkey, settings))
    agreed = min(candidates, key=lambda candidate: candidate[:2])[2]
    if agreed != proposed:  # adopt it: our record now repeats the run's settings
        await client.dht.store(key, agreed.to_wire(), get_dht_time() + _SETTINGS_LIFETIME, subkey=peer_id)
        differing = [field.name for field in dataclasses.fields(RunSettings)
                     if field.name != "proposed_at" and getattr(agreed, field.name) != getattr(proposed, field.name)]
        if differing:
            logger.warning(f"run {run_id} already has settings; using them for {', '.join(differing)} "
                           f"({', '.join(f'{name}={getattr(agreed, name)}' for name in differing)})")
    return agreed


def run_training(options: TrainOptions) -> dict[str, Any]:
    check_run_id(options.run_id)
    get_task(options.proposed.task)  # an unknown task fails before any network start
    network, peer_key, identity_folder = options.network, None, None
    if options.accountability is not None:
        network, peer_key, identity_folder = accountable_identity(network)
    try:
        client = SwarmClient(ClientOptions(initial_peers=options.initial_peers, network=network))
        try:
            settings = client.run(agree_settings(client, options.run_id, options.proposed), timeout=60)
            return _train(options, settings, client, peer_key)
        finally:
            client.shutdown()
    finally:
        if identity_folder is not None:
            identity_folder.cleanup()


def _train(options: TrainOptions, settings: RunSettings, client: SwarmClient, peer_key: PeerKey | None
           ) -> dict[str, Any]:
    task = get_task(settings.task)
    model = task.build_model(settings.seed)
    # with worker momentum each peer keeps the momentum itself, before aggregation: Adam adds none
    betas = (0.0, 0.999) if settings.worker_momentum else (0.9, 0.999)
    optimizer = torch.optim.Adam(model.parameters(), lr=settings.lr or task.default_lr, betas=betas)
    collaborative = CollaborativeOptimizer(
        model.parameters(), optimizer, run_id=options.run_id, initial_peers=options.initial_peers,
        target_batch_size=settings.target_batch_size, batch_size_per_step=options.batch_size,
        aggregator=settings.aggregator, num_byzantine=settings.num_byzantine, averaging=options.averaging,
        worker_momentum=settings.worker_momentum,
        accountability=options.accountability, client=client, peer_key=peer_key, load_state=False,
        coding=CodedOptions(code=settings.coding, stragglers=settings.stragglers) if settings.coding else None)
    collaborative.averager.lie_as_reducer = options.lie_as_reducer
    try:
        checkpoint = Path(options.checkpoint_dir) / "state.pt" if options.checkpoint_dir else None
        if checkpoint is not None and checkpoint.exists():
            collaborative.load_state_dict(torch.load(checkpoint, weights_only=True))
            logger.info(f"resumed from {checkpoint} at step {collaborative.epoch}")
        if collaborative.refresh_progress():  # peers in the run: take their state (newer than ours or equal)
            collaborative.load_state_from_peers()
        if options.die_in_round:
            _die_in_round(collaborative, options.die_in_round)
        history = _loop(options, settings, task, model, collaborative, checkpoint)
        averaged = collaborative.average_parameters("final")
        collaborative.finish()
        collaborative.wait_for_stragglers(settings.steps)
        if checkpoint is not None:
            _save(collaborative, checkpoint)
        metrics = task.evaluate(model)
        fingerprint = math.fsum(float(param.detach().double().sum()) for param in model.parameters())
        return {"task": settings.task, "run_id": options.run_id, "peer_id": collaborative.peer_id,
                "steps": collaborative.epoch, **metrics, "params_fingerprint": fingerprint,
                "final_average": averaged, "banned": sorted(collaborative.banned), "history": history}
    finally:
        collaborative.close()


def _loop(options: TrainOptions, settings: RunSettings, task, model, collaborative: CollaborativeOptimizer,
          checkpoint: Path | None) -> list[tuple[float, int, float]]:
    """Local steps until the run's last global step; (seconds, global step, mean loss) per global step."""
    batches = task.batches(peer_seed(settings.seed, collaborative.peer_id), options.batch_size)
    started, history, losses = time.monotonic(), [], []
    params = list(model.parameters())

    def shard_gradients(epoch: int, shard: int, num_shards: int) -> list[torch.Tensor]:
        # a shard's data depends only on (step, shard): peers computing the same shard agree exactly
        seed = peer_seed(settings.seed, f"step {epoch} shard {shard} of {num_shards}")
        loss = task.loss(model, next(task.batches(seed, options.batch_size)))
        losses.append(loss.item())
        if options.straggle:
            time.sleep(options.straggle)
        return list(torch.autograd.grad(loss, params))

    bar = tqdm(total=settings.steps, initial=collaborative.epoch, desc=f"{settings.task} {options.run_id}",
               unit="step", file=sys.stderr, disable=not options.progress, dynamic_ncols=True)
    try:
        while collaborative.epoch < settings.steps:
            before = collaborative.epoch
            if collaborative.coding is not None:
                collaborative.coded_step(shard_gradients)
            else:
                loss = task.loss(model, next(batches))
                loss.backward()
                losses.append(loss.item())
                collaborative.step()
            if collaborative.epoch == before or not losses:
                continue
            mean_loss = sum(losses) / len(losses)
            losses = []
            history.append((round(time.monotonic() - started, 3), collaborative.epoch, mean_loss))
            bar.update(collaborative.epoch - bar.n)
            bar.set_postfix(loss=f"{mean_loss:.3f}", peers=1 + len([p for p in collaborative.others if not p.done]))
            if checkpoint is not None and collaborative.epoch % options.checkpoint_every == 0:
                _save(collaborative, checkpoint)
    finally:
        bar.close()
    return history


def _save(collaborative: CollaborativeOptimizer, checkpoint: Path) -> None:
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    partial = checkpoint.with_suffix(".partial")
    torch.save(collaborative.state_dict(), partial)
    os.replace(partial, checkpoint)  # a crash mid-write never leaves a half checkpoint


def _die_in_round(collaborative: CollaborativeOptimizer, round_number: int) -> None:
    rounds = 0

    def round_started() -> None:
        nonlocal rounds
        rounds += 1
        if rounds == round_number:
            logger.warning(f"test flag: dying in the middle of averaging round {rounds}")
            collaborative.client.loop.call_later(0.05, os.kill, os.getpid(), signal.SIGKILL)

    collaborative.averager.round_started = round_started

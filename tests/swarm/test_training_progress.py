"""Pure parts of collaborative training: progress decisions, the run's settings, data shards,
the aggregating reducer, and the built-in tasks learning locally."""

import asyncio

import pytest
import torch

from swarm.robust import get_aggregator
from swarm.training.allreduce import AggregatingPartReducer
from swarm.training.progress import Progress, peers_ahead, peers_at_epoch, ready_for_step
from swarm.training.run import RunSettings
from swarm.training.shards import peer_seed, random_batches
from swarm.training.tasks import get_task


def test_progress_wire_round_trip_and_malformed_records():
    progress = Progress("peer", epoch=3, samples=40, samples_per_second=12.5, done=True)
    assert Progress.from_wire("peer", progress.to_wire()) == progress
    for bad in (None, {}, {"epoch": -1, "samples": 0}, {"epoch": "3", "samples": 0}, {"epoch": 1, "samples": 1.5}, [1]):
        assert Progress.from_wire("peer", bad) is None


def test_ready_once_peers_at_our_epoch_gathered_the_target():
    mine = Progress("me", epoch=2, samples=64)
    others = [Progress("a", 2, 100), Progress("b", 1, 500), Progress("c", 2, 80, done=True)]
    assert [p.peer_id for p in peers_at_epoch(others, 2)] == ["a"]  # behind and finished peers do not count
    assert ready_for_step(mine, others, 164)
    assert not ready_for_step(mine, others, 165)
    assert not ready_for_step(Progress("me", 2, 0), others, 10)  # nothing of ours to contribute yet


def test_peers_ahead_most_advanced_first():
    others = [Progress("a", 3, 0), Progress("b", 7, 0), Progress("c", 5, 0), Progress("d", 2, 0)]
    assert [p.peer_id for p in peers_ahead(others, 3)] == ["b", "c"]


def test_run_settings_wire_and_rejects_partial_records():
    settings = RunSettings(task="digits", seed=4, steps=10, target_batch_size=64, lr=0.1, aggregator="median")
    assert RunSettings.from_wire(settings.to_wire()) == settings
    assert RunSettings.from_wire({"task": "digits"}) is None
    assert RunSettings.from_wire("garbage") is None


def test_random_batches_cover_each_example_once_per_epoch_and_differ_between_peers():
    batches = random_batches(10, 3, seed=1)
    epoch = torch.cat([next(batches) for _ in range(3)])
    assert len(set(epoch.tolist())) == 9
    assert peer_seed(0, "peer-a") != peer_seed(0, "peer-b")
    with pytest.raises(ValueError, match="batch size"):
        next(random_batches(5, 6, 0))


def test_reducer_combines_parts_with_the_rule_and_drops_a_failed_sender():
    async def reduce(rule: str) -> list[torch.Tensor]:
        reducer = AggregatingPartReducer([torch.Size([3])], num_senders=4, aggregate=get_aggregator(rule))
        reducer.on_sender_failed(3)  # sent nothing: left out
        values = [torch.full((3,), 1.0), torch.full((3,), 2.0), torch.full((3,), 1e6)]
        return await asyncio.gather(*(reducer.accumulate_part(index, 0, value) for index, value in enumerate(values)))

    assert all(torch.equal(result, torch.full((3,), 2.0)) for result in asyncio.run(reduce("median")))
    assert torch.allclose(asyncio.run(reduce("mean"))[0], torch.full((3,), (3 + 1e6) / 3))


@pytest.mark.parametrize("name", ["digits", "text"])
def test_builtin_tasks_learn_locally(name):
    task = get_task(name)
    model = task.build_model(0)
    optimizer = torch.optim.Adam(model.parameters(), lr=task.default_lr)
    batches = task.batches(0, 32)
    before = task.evaluate(model)
    for _ in range(30):
        optimizer.zero_grad()
        task.loss(model, next(batches)).backward()
        optimizer.step()
    after = task.evaluate(model)
    assert after["loss"] < before["loss"] * 0.9, (before, after)
    assert 0.0 <= after["accuracy"] <= 1.0


def test_unknown_task_names_the_choices():
    with pytest.raises(ValueError, match="digits, text"):
        get_task("mnist")


def test_replicas_disagree_on_fingerprints_beyond_float_noise():
    from swarm.training.progress import replicas_disagree

    base = {"fingerprint": [65.4734308, 120.5]}
    assert not replicas_disagree([base, {"fingerprint": [65.4734309, 120.5]}])  # rounding of the all-reduce
    assert replicas_disagree([base, {"fingerprint": [65.4067641, 120.5]}])
    assert replicas_disagree([base, {"epoch": 3}])  # no fingerprint: repair rather than trust

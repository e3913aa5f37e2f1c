"""`swarm train`: real processes averaging over real hivemind DHT and libp2p on 127.0.0.1."""

import math

import pytest

from swarm.local_swarm import LocalSwarm, LocalSwarmError


def same(first: float, second: float) -> bool:
    return math.isclose(first, second, rel_tol=1e-6, abs_tol=1e-6)


def test_three_peers_learn_digits_and_end_equal():
    with LocalSwarm("unused") as local:
        local.start_bootstrap()
        trainers = [local.start_trainer("digits", "digits3", ["--steps", "40"]) for _ in range(3)]
        results = [local.trainer_result(trainer) for trainer in trainers]
    for result in results:
        assert result["steps"] == 40
        assert result["accuracy"] >= 0.90, result["accuracy"]
        assert same(result["params_fingerprint"], results[0]["params_fingerprint"])
    losses = [loss for _, _, loss in results[0]["history"]]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses  # the history is the loss falling


def test_peer_killed_mid_round_and_a_late_joiner(tmp_path):
    """One of three peers SIGKILLs itself in the middle of its 5th averaging round; the others go
    on. A fourth peer joining after that starts from the run's state, not from scratch."""
    with LocalSwarm("unused") as local:
        local.start_bootstrap()
        steady = [local.start_trainer("digits", "kill", ["--steps", "50"]) for _ in range(2)]
        doomed = local.start_trainer("digits", "kill", ["--steps", "50", "--die-in-round", "5"])
        assert doomed.process.wait(timeout=300) == -9, doomed.log_tail()
        late = local.start_trainer("digits", "kill")
        results = [local.trainer_result(trainer) for trainer in [*steady, late]]
        late_log = late.log_path.read_text()
        doomed_log = doomed.log_path.read_text()
    assert "dying in the middle of averaging round 5" in doomed_log
    for result in results:
        assert result["steps"] == 50  # the run's settings, adopted by the late joiner from the DHT
        assert result["accuracy"] >= 0.90, result["accuracy"]
        assert same(result["params_fingerprint"], results[0]["params_fingerprint"])
    assert "loaded the state of step" in late_log
    assert results[2]["history"][0][1] > 5, "the late joiner's first global step follows the run's, not step 1"


BAD_TRAIN_ARGUMENTS = [
    (["mnist", "--run-id", "x"], "unknown task 'mnist'"),
    (["digits", "--run-id", "a.b"], "run id 'a.b'"),
    (["digits", "--run-id", "x", "--aggregator", "average"], "unknown aggregator"),
    (["digits", "--run-id", "x", "--steps", "0"], "--steps must be at least 1"),
    (["digits", "--run-id", "x", "--worker-momentum", "1"], "--worker-momentum must be at least 0 and below 1"),
    (["digits", "--run-id", "x", "--coding", "cyclic", "--worker-momentum", "0.9"],
     "pass --worker-momentum 0 or drop --coding"),
]


def test_checkpoint_resume_and_bad_input(tmp_path):
    checkpoint = str(tmp_path / "checkpoint")
    with LocalSwarm("unused") as local:
        local.start_bootstrap()
        first = local.trainer_result(local.start_trainer("digits", "resume", ["--steps", "6", "--checkpoint-dir",
                                                                               checkpoint]))
    assert first["steps"] == 6
    with LocalSwarm("unused") as local:  # a new swarm: only the checkpoint remembers the run
        local.start_bootstrap()
        second = local.trainer_result(local.start_trainer("digits", "resume", ["--steps", "10", "--checkpoint-dir",
                                                                                checkpoint]))
        assert second["steps"] == 10 and second["history"][0][1] == 7  # went on from step 6
        refused = [(local._spawn(f"bad-{index}", ["train", *arguments, "--initial-peers", *local.initial_peers]),
                    message) for index, (arguments, message) in enumerate(BAD_TRAIN_ARGUMENTS)]  # all at once
        for child, message in refused:
            assert child.process.wait(timeout=120) == 1
            assert message in child.log_path.read_text(), child.log_tail()
        child = local._spawn("wrong-task", ["train", "text", "--run-id", "y", "--checkpoint-dir", checkpoint,
                                            "--initial-peers", *local.initial_peers])
        with pytest.raises(LocalSwarmError, match="do not match this model"):
            local.trainer_result(child)


def test_a_lying_reducer_is_banned_and_the_honest_peers_end_equal():
    with LocalSwarm("unused") as local:
        local.start_bootstrap()
        honest = [local.start_trainer("digits", "liar", ["--steps", "30", "--aggregator", "median"])
                  for _ in range(3)]
        liar = local.start_trainer("digits", "liar", ["--steps", "30", "--aggregator", "median", "--lie-as-reducer"])
        results = [local.trainer_result(trainer) for trainer in honest]
        liar_id = local.trainer_result(liar)["peer_id"]
    for result in results:
        assert liar_id in result["banned"], result["banned"]
        assert result["accuracy"] >= 0.85, result["accuracy"]
        assert same(result["params_fingerprint"], results[0]["params_fingerprint"])


def test_coded_steps_do_not_wait_for_a_straggler():
    """4 peers, cyclic code tolerating 1 straggler; one peer computes 3 s slower every step. The
    others decode each step without it; everyone ends with equal parameters."""
    with LocalSwarm("unused") as local:
        local.start_bootstrap()
        # 64 samples per shard: 4 shards gather 256 per step, like the other runs
        coded = ["--steps", "30", "--coding", "cyclic", "--stragglers", "1", "--batch-size", "64"]
        trainers = [local.start_trainer("digits", "coded", coded) for _ in range(3)]
        slow = local.start_trainer("digits", "coded", [*coded, "--straggle", "3"])
        results = [local.trainer_result(trainer) for trainer in [*trainers, slow]]
        logs = [trainer.log_path.read_text() for trainer in trainers]
    for result in results:
        assert result["steps"] == 30
        assert result["accuracy"] >= 0.85, result["accuracy"]
        assert same(result["params_fingerprint"], results[0]["params_fingerprint"])
    assert any("decoded without waiting for 1 peer" in log for log in logs)

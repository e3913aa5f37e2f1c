"""The `swarm` command as a user runs it, against a real 2-peer swarm."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from swarm.local_swarm import REPOSITORY, swarm_command
from tests.conftest import EMBEDDED, RunningSwarm, chat_ids


def run_swarm(*arguments: str, timeout: float = 300) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": str(REPOSITORY)}
    return subprocess.run(swarm_command(*arguments), capture_output=True, text=True, timeout=timeout,
                          env=environment, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def swarm(cache_dir, reference):
    running = RunningSwarm(EMBEDDED, ["0:15", "15:30"], cache_dir)
    yield running
    running.close()


def test_generate_streams_the_chat_answer(swarm):
    result = run_swarm("generate", EMBEDDED, "What is the capital of France?", "--chat", "--max-new-tokens", "16",
                       "--verbose", "--initial-peers", *swarm.initial_peers)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "The capital of France is Paris."
    assert "route:" in result.stderr and "[0:15]" in result.stderr and "[15:30]" in result.stderr


def test_seeded_sampling_matches_transformers_and_repeats(swarm, reference):
    model, tokenizer = reference
    ids = chat_ids(tokenizer, "Tell me a story about a cat.")
    settings = dict(max_new_tokens=24, do_sample=True, temperature=0.8, top_p=0.9)
    torch.manual_seed(7)
    with torch.no_grad():
        expected = model.generate(ids, **settings)
    torch.manual_seed(7)
    assert swarm.model.generate(ids, **settings).tolist() == expected.tolist()
    outputs = [run_swarm("generate", EMBEDDED, "Tell me a story about a cat.", "--chat", "--max-new-tokens", "12",
                         "--temperature", "0.8", "--top-p", "0.9", "--seed", "3",
                         "--initial-peers", *swarm.initial_peers).stdout for _ in range(2)]
    assert outputs[0] == outputs[1] and outputs[0].strip()


def test_status_json_is_the_swarm_map(swarm):
    result = run_swarm("status", EMBEDDED, "--json", "--initial-peers", *swarm.initial_peers)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["model"] == EMBEDDED and report["num_blocks"] == 30
    assert sorted((peer["start"], peer["end"], peer["state"]) for peer in report["peers"]) == [
        (0, 15, "online"), (15, 30, "online")]
    assert {peer["peer_id"] for peer in report["peers"]} == {child.peer_id for child in swarm.local.peers}
    assert all(peer["throughput"] > 0 for peer in report["peers"])
    assert report["coverage"] == [1] * 30 and report["missing_blocks"] == ""
    assert all(peer["rtt_ms"] is not None and peer["rtt_ms"] > 0 for peer in report["peers"])
    assert all(peer["version"] and peer["protocol_version"] == 1 for peer in report["peers"])
    assert max(peer["network_bandwidth"] for peer in report["peers"]) > 0  # the second measured a transfer
    text = run_swarm("status", EMBEDDED, "--initial-peers", *swarm.initial_peers).stdout
    assert "every block is served" in text


def test_session_continues_a_conversation(swarm, reference):
    model, tokenizer = reference
    first = chat_ids(tokenizer, "What is the capital of France?")
    with swarm.model.inference_session(max_length=128) as session:
        answer = swarm.model.generate(first, max_new_tokens=8, session=session)
        follow_up = torch.cat([answer, tokenizer(" And of Italy?", return_tensors="pt")["input_ids"]], dim=1)
        continued = swarm.model.generate(follow_up, max_new_tokens=8, session=session)
        assert session.position == continued.shape[1] - 1  # all but the newest token are on the peers
    with torch.no_grad():
        expected = model.generate(follow_up, max_new_tokens=8, do_sample=False)
    assert continued.tolist() == expected.tolist()


def test_sigterm_marks_the_peer_offline_before_it_leaves(cache_dir, reference):
    running = RunningSwarm(EMBEDDED, ["0:30"], cache_dir)
    try:
        peer = running.local.peers[0]
        peer.process.send_signal(signal.SIGTERM)
        assert peer.process.wait(timeout=60) == 0
        records = running.model.client.run(running.model.view.refresh())
        assert [(record.peer_id, record.state) for record in records] == [(peer.peer_id, "offline")]
    finally:
        running.close()


def test_demo_runs_end_to_end_and_leaves_nothing(cache_dir):
    result = run_swarm("demo", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Paris" in result.stdout
    assert "route:" in result.stderr


@pytest.mark.parametrize("arguments, message", [
    (["peer", "no-such-model", "--initial-peers"], "unknown model"),
    (["peer", EMBEDDED, "--blocks", "25:40"], "out of range"),
    (["peer", EMBEDDED, "--blocks", "ten"], "--blocks takes A:B"),
    (["generate", EMBEDDED, "hi"], "no initial peers"),
])
def test_bad_input_is_one_clear_line(arguments, message, cache_dir):
    result = run_swarm(*arguments, timeout=120)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr, result.stderr

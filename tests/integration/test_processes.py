"""Clean processes: a SIGKILLed peer leaves nothing behind and restarts at once on the same
port and identity; a route that cannot be covered names the missing blocks."""

import signal
import socket
import time

import pytest
import torch

from swarm.local_swarm import LocalSwarm
from swarm.model import DistributedModelForCausalLM
from swarm.retry import RetryPolicy
from swarm.routing import MissingBlocksError
from tests.conftest import _descendants


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def tiny_swarm(tiny_llama, tmp_path):
    local = LocalSwarm(str(tiny_llama), cache_dir=str(tmp_path / "cache"))
    local.start_bootstrap()
    model = DistributedModelForCausalLM.from_pretrained(str(tiny_llama), local.initial_peers,
                                                        cache_dir=str(tmp_path / "cache"), coverage_timeout=3,
                                                        retry=RetryPolicy(give_up_after=1.0, avoid_seconds=0.5))
    yield local, model
    model.close()
    local.stop()


def step_once(model) -> torch.Tensor:
    with model.inference_session(max_length=4) as session:
        return session.step(torch.randn(1, 2, 64))


def test_sigkill_leaves_no_process_and_restart_keeps_port_and_identity(tiny_swarm, tmp_path):
    local, model = tiny_swarm
    port = free_port()
    arguments = ["--identity", str(tmp_path / "peer.key"), "--host-maddrs", f"/ip4/127.0.0.1/tcp/{port}"]
    first = local.start_peer("0:4", extra=arguments, name="first")
    local.wait_until_online(model.view, [first])
    children = _descendants(first.process.pid)
    assert any("p2pd" in command for _, command in children), children  # its libp2p daemon

    first.process.send_signal(signal.SIGKILL)
    first.process.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and any(_alive(pid) for pid, _ in children):
        time.sleep(0.1)
    assert not [pid for pid, _ in children if _alive(pid)], "the peer's children outlived it"

    started = time.monotonic()
    second = local.start_peer("0:4", extra=arguments, name="second")
    assert second.peer_id == first.peer_id
    assert f"/ip4/127.0.0.1/tcp/{port}/p2p/{first.peer_id}" == second.process.stdout.readline().strip()
    deadline = time.monotonic() + 60
    while True:  # the old record still says online: serving a step is the proof
        try:
            assert step_once(model).shape == (1, 2, 64)
            break
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    print(f"restarted and serving in {time.monotonic() - started:.1f} s")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_uncovered_route_names_the_missing_blocks(tiny_swarm):
    local, model = tiny_swarm
    child = local.start_peer("0:2")
    local.wait_until_online(model.view, [child])
    with pytest.raises(MissingBlocksError, match=r"blocks 2:4 of 4"):
        model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=2)
    with pytest.raises(MissingBlocksError, match=r"2:4"):
        model(torch.tensor([[5, 6, 7]]))


def test_route_avoids_a_slowed_peer(tiny_swarm):
    local, model = tiny_swarm
    front = local.start_peer("0:2")
    slow = local.start_peer("2:4", extra=["--compute-delay", "0.2"])
    fast = local.start_peer("2:4")
    local.wait_until_online(model.view, [front, slow, fast])
    throughputs = {record.peer_id: record.throughput for record in model.view.records}
    assert throughputs[slow.peer_id] < 5 < throughputs[fast.peer_id]  # announced from its own measurement
    for _ in range(5):
        with model.inference_session(max_length=4) as session:
            assert [peer for peer, _, _ in session.route] == [front.peer_id, fast.peer_id]


def test_status_flags_gaps_and_a_dead_peer_leaves_the_map(tiny_swarm, tiny_llama):
    import json
    import subprocess

    local, model = tiny_swarm
    child = local.start_peer("0:2", extra=["--announce-period", "1", "--record-expiry", "4"])
    local.wait_until_online(model.view, [child])
    result = subprocess.run(local_command(local, "status", str(tiny_llama), "--json"), capture_output=True,
                            text=True, timeout=120, env=local_environment())
    report = json.loads(result.stdout)
    assert report["missing_blocks"] == "2:4" and report["coverage"] == [1, 1, 0, 0]
    child.process.send_signal(signal.SIGKILL)
    child.process.wait()
    deadline = time.monotonic() + 4 + 10  # the expiry, plus slack for a loaded machine
    while child.peer_id in {record.peer_id for record in model.client.run(model.view.refresh())}:
        assert time.monotonic() < deadline, "the dead peer's record outlived its expiry"
        time.sleep(0.5)


def local_command(local, *arguments):
    from swarm.local_swarm import swarm_command

    return swarm_command(*arguments, "--cache-dir", local.cache_dir, "--initial-peers", *local.initial_peers)


def local_environment():
    import os

    from swarm.local_swarm import REPOSITORY

    return {**os.environ, "PYTHONPATH": str(REPOSITORY)}

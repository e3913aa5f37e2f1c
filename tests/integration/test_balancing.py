"""Peers choose their blocks: three peers of 12 blocks cover the 30-block model, and after one
dies the swarm heals itself once its record expires."""

import signal
import time

from swarm.routing import coverage
from tests.conftest import EMBEDDED, RunningSwarm

FAST = ["--num-blocks", "12", "--announce-period", "1", "--record-expiry", "5", "--rebalance-period", "2",
        "--drain-timeout", "5"]


def online_coverage(running) -> list[int]:
    return coverage(running.model.client.run(running.model.view.refresh()), 30)


def test_automatic_blocks_cover_the_model_and_heal_after_a_death(cache_dir, reference):
    running = RunningSwarm(EMBEDDED, [], cache_dir)
    try:
        peers = []
        for index in range(3):  # one after another: each sees the choices before it
            peers.append(running.local.start_peer(extra=FAST))
            running.local.wait_until_online(running.model.view, peers)
        assert all(online_coverage(running)), online_coverage(running)

        victim = peers[1]
        victim.process.send_signal(signal.SIGKILL)
        victim.process.wait()
        newcomer = running.local.start_peer(extra=FAST)
        deadline = time.monotonic() + 120
        while True:
            records = running.model.client.run(running.model.view.refresh())
            alive = {record.peer_id for record in records}
            if victim.peer_id not in alive and all(coverage(records, 30)):
                break
            assert time.monotonic() < deadline, [(r.peer_id[-6:], r.start, r.end, r.state) for r in records]
            time.sleep(1)
        assert newcomer.process.poll() is None
        ids = running.model.tokenizer()("The capital of France is", return_tensors="pt")["input_ids"]
        assert running.model.generate(ids, max_new_tokens=3).shape[1] == ids.shape[1] + 3  # routes work again
    finally:
        running.close()

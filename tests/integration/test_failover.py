"""Peers that die or leave mid-answer: the generation completes, exactly as without them."""

import signal

import pytest
import torch

from swarm.local_swarm import StopPeerAfterTokens
from tests.conftest import EMBEDDED, RunningSwarm, chat_ids

PROMPT = "Write a short poem about the sea."


@pytest.fixture(scope="module")
def expected(reference):
    model, tokenizer = reference
    ids = chat_ids(tokenizer, PROMPT)
    with torch.no_grad():
        return ids, model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False)


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGSTOP],
                         ids=["SIGKILL", "SIGTERM", "SIGSTOP (silence: no reset, the step times out)"])
def test_generation_survives_the_loss_of_a_route_peer(sig, cache_dir, expected):
    ids, expected_output = expected
    running = RunningSwarm(EMBEDDED, ["0:15", "15:30", "15:30"], cache_dir)
    stopper = None
    try:
        with running.model.inference_session(max_length=ids.shape[1] + 64) as session:
            stopper = StopPeerAfterTokens(running.local, session, tokens=10, sig=sig, block=15)
            output = running.model.generate(ids, max_new_tokens=64, min_new_tokens=64, session=session,
                                            streamer=stopper)
            route = session.route
        assert stopper.stopped_peer is not None
        assert output.tolist() == expected_output.tolist()
        assert stopper.stopped_peer not in [peer for peer, _, _ in route]
        assert route[0][1] == 0 and route[-1][2] == 30
        assert [failed for failed, _ in session.failovers] == [stopper.stopped_peer]
        if sig != signal.SIGSTOP:  # a dead peer is noticed by its closed stream, not by the step timeout,
            # though steps reach it from the peer before it (the client's keep-alives write to its stream)
            assert "no answer within" not in session.failovers[0][1], session.failovers
        print(f"stall {stopper.stall * 1000:.0f} ms (typical token {stopper.typical_gap * 1000:.0f} ms)")
    finally:
        for child in running.local.peers:
            if stopper is not None and child.peer_id == stopper.stopped_peer and sig == signal.SIGSTOP:
                child.process.kill()  # a stopped process would sit out SIGTERM
        running.close()

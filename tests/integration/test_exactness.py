"""The swarm reproduces the local model: greedy tokens equal, logits within fp32 tolerance.

Real `swarm dht` and `swarm peer` processes over hivemind's DHT and libp2p on 127.0.0.1,
serving the embedded SmolLM2-135M in 1, 2 and 3 spans.
"""

import dataclasses

import pytest
import torch

from tests.conftest import EMBEDDED, PROMPTS, RunningSwarm, chat_ids

LAYOUTS = {"1 peer": ["0:30"], "2 peers": ["0:15", "15:30"], "3 peers": ["0:10", "10:20", "20:30"]}


@pytest.fixture(scope="module")
def local_greedy(reference):
    model, tokenizer = reference
    outputs = []
    for prompt in PROMPTS:
        ids = chat_ids(tokenizer, prompt)
        with torch.no_grad():
            outputs.append(model.generate(ids, max_new_tokens=32, do_sample=False))
    return outputs


@pytest.fixture(scope="module", params=list(LAYOUTS), ids=list(LAYOUTS))
def swarm(request, cache_dir, reference):
    running = RunningSwarm(EMBEDDED, LAYOUTS[request.param], cache_dir)
    yield running
    running.close()


def test_greedy_generation_equals_local(swarm, reference, local_greedy):
    """Tokens chosen by the screened head (swarm.greedy_head), forced on where its int8 product is not vectorized."""
    _, tokenizer = reference
    screen = swarm.model._greedy_head
    screen.require_vectorized = False
    for prompt, expected in zip(PROMPTS, local_greedy):
        ids = chat_ids(tokenizer, prompt)
        screened = screen.screened
        output = swarm.model.generate(ids, max_new_tokens=32)
        assert output.tolist() == expected.tolist(), tokenizer.decode(output[0, ids.shape[1]:])
        assert screen.screened - screened == (output.shape[1] - ids.shape[1] if hasattr(torch, "_weight_int8pack_mm") else 0)
    assert "Paris" in tokenizer.decode(local_greedy[0][0])  # the reference itself is sane


def test_forward_logits_equal_local(swarm, reference):
    model, tokenizer = reference
    ids = torch.cat([chat_ids(tokenizer, prompt)[:, :20] for prompt in PROMPTS])  # a batch of 3
    with torch.no_grad():
        expected = model(ids).logits
        logits = swarm.model(ids).logits
    relative = (logits - expected).abs().max() / expected.abs().max()
    assert relative < 1e-4, f"max relative logit error {relative:.2e}"


def test_session_route_covers_all_blocks(swarm):
    with swarm.model.inference_session(max_length=8) as session:
        route = session.route
    assert route[0][1] == 0 and route[-1][2] == 30
    assert all(previous[2] == following[1] for previous, following in zip(route, route[1:]))
    assert len(route) == len(swarm.local.peers)


def test_steps_go_from_peer_to_peer(swarm, reference, local_greedy):
    """Each peer pushes its output to the next hop: the client sends one step per token."""
    _, tokenizer = reference
    ids = chat_ids(tokenizer, PROMPTS[0])
    with swarm.model.inference_session(max_length=64) as session:
        output = swarm.model.generate(ids, max_new_tokens=16, session=session)
        hops = len(session.route)
    assert output.tolist() == local_greedy[0][:, : ids.shape[1] + 16].tolist()
    steps = output.shape[1] - ids.shape[1]  # the prompt, then each new token but the last
    assert session.pushed_steps == (steps if hops > 1 else 0)  # one peer: nothing to push
    assert not session.failovers


def test_a_push_that_cannot_go_out_is_sent_by_the_client(swarm, reference, local_greedy):
    """A peer that cannot reach the next hop says so in its answer, and the client sends that hop
    the step itself: same tokens, no failover, no wait."""
    _, tokenizer = reference
    ids = chat_ids(tokenizer, PROMPTS[1])
    with swarm.model.inference_session(max_length=64) as session:
        if len(session.route) > 1:  # the second hop's stream stays open; only pushes name a peer id nobody has
            second = session._segments[1]
            second.hop = dataclasses.replace(second.hop, peer_id="NotAPeerId")
        output = swarm.model.generate(ids, max_new_tokens=8, session=session)
    assert output.tolist() == local_greedy[1][:, : ids.shape[1] + 8].tolist()
    assert session.pushed_steps == 0 and not session.failovers


def test_a_push_lost_on_the_way_is_sent_again_by_the_client(swarm, reference, local_greedy):
    """A push the next hop never gets (here: into a session it does not have, which it drops)
    leaves that hop without an answer: the client sends it the step itself after a moment, and
    no peer is failed over."""
    _, tokenizer = reference
    ids = chat_ids(tokenizer, PROMPTS[2])
    with swarm.model.inference_session(max_length=64) as session:
        hops = len(session.route)
        if hops > 1:
            session._segments[1].session_id = "0" * 32  # only pushes use it; the client's stream stays
        output = swarm.model.generate(ids, max_new_tokens=3, session=session)
    assert output.tolist() == local_greedy[2][:, : ids.shape[1] + 3].tolist()
    assert session.resent_steps == (3 if hops > 1 else 0) and not session.failovers

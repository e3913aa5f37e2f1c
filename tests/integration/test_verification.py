"""A peer that returns wrong hidden states is caught and banned by a verifying client, whose
answer stays exact.

Real processes on loopback, a tiny random Llama of 4 blocks: peer A serves 0:2, B 2:4 and the
liar L 2:4 with the hidden test flag --corrupt-outputs. L announces a far higher throughput
than B, so every fresh client routes through it: the tests check that the route named the
liar before they look at the answer. Throughputs are set so that the compute each route costs
differs by tens of milliseconds per token (B 10, L 30, the later liars 5000), well above how
much measured round trips move on a loaded machine.
"""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from swarm.local_swarm import LocalSwarm
from swarm.model import DistributedModelForCausalLM

NEW_TOKENS = 16
LIAR = ["--throughput", "30", "--corrupt-outputs", "1.0"]


@pytest.fixture(scope="module")
def swarm(tiny_llama, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("verification-cache"))
    local = LocalSwarm(str(tiny_llama), cache_dir=cache)
    try:
        local.start_bootstrap()
        local.start_peer("0:2", name="honest-0-2")
        local.start_peer("2:4", extra=["--throughput", "10"], name="honest-2-4")
        local.start_peer("2:4", extra=LIAR, name="liar-2-4")
        yield local, cache
    finally:
        local.stop()


@pytest.fixture(scope="module")
def tiny_reference(tiny_llama):
    return AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def expected(tiny_reference):
    ids = torch.randint(3, 300, (1, 7), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        return ids, tiny_reference.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                                            do_sample=False)


def client(swarm, tiny_llama, **options) -> DistributedModelForCausalLM:
    local, cache = swarm
    model = DistributedModelForCausalLM.from_pretrained(str(tiny_llama), local.initial_peers, cache_dir=cache,
                                                        **options)
    try:
        local.wait_until_online(model.view, [child for child in local.peers if child.process.poll() is None])
    except BaseException:
        model.close()
        raise
    return model


def peer_id(swarm, name: str) -> str:
    return next(child.peer_id for child in swarm[0].peers if child.name == name)


def generate(model, ids):
    """The greedy answer, with the route when the session opened and when it ended."""
    with model.inference_session(max_length=ids.shape[1] + NEW_TOKENS) as session:
        first_route = [peer for peer, _, _ in session.route]
        output = model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, session=session)
        return output, first_route, [peer for peer, _, _ in session.route], session


def test_without_verification_the_liar_changes_the_answer(swarm, tiny_llama, expected):
    ids, expected_output = expected
    with client(swarm, tiny_llama) as model:
        output, first_route, _, _ = generate(model, ids)
    assert peer_id(swarm, "liar-2-4") in first_route
    assert output.tolist() != expected_output.tolist()


def test_a_verifying_client_bans_the_liar_and_stays_exact(swarm, tiny_llama, expected):
    ids, expected_output = expected
    liar, honest = peer_id(swarm, "liar-2-4"), peer_id(swarm, "honest-2-4")
    with client(swarm, tiny_llama, verify_fraction=0.25) as model:
        output, first_route, last_route, session = generate(model, ids)
        assert liar in first_route  # the check below is not vacuous
        assert output.tolist() == expected_output.tolist()
        assert last_route == [peer_id(swarm, "honest-0-2"), honest]
        assert liar in model.client.retry.avoided() and model.verifier.stats.liars == [liar]
        assert session.rollbacks == [(liar, 0, 0)]  # caught at its first step: nothing handed out was wrong
        assert model.verifier.stats.local_recomputations >= 1  # no third holder of 2:4 broke the tie
        # the ban holds for later sessions of this client
        again, first_route, _, _ = generate(model, ids)
        assert liar not in first_route and again.tolist() == expected_output.tolist()


def test_a_peer_that_starts_lying_later_is_caught_at_a_checked_step(swarm, tiny_llama, expected):
    """A second liar, honest for its first 4 answers, is preferred over both others; checking
    every step catches it when it turns, and the session rolls back to that step's position.
    Routes by compute alone: the new peer's first round trip, measured while it starts on a
    loaded machine, once outweighed its throughput (a CI run routed around it)."""
    ids, expected_output = expected
    local, _ = swarm
    late = local.start_peer("2:4", extra=["--throughput", "5000", "--corrupt-outputs", "1.0", "--corrupt-after", "4"],
                            name="late-liar-2-4")
    try:
        with client(swarm, tiny_llama, verify_fraction=1.0, route_mode="throughput") as model:
            output, first_route, last_route, session = generate(model, ids)
            assert late.peer_id in first_route
            assert output.tolist() == expected_output.tolist()
            assert last_route == [peer_id(swarm, "honest-0-2"), peer_id(swarm, "honest-2-4")]
            banned = model.client.retry.avoided()
            assert late.peer_id in banned and peer_id(swarm, "liar-2-4") in banned
            (_, position, caught_at), = [rollback for rollback in session.rollbacks if rollback[0] == late.peer_id]
            assert position == caught_at > ids.shape[1]  # this step's positions only: all before stayed on the peers
    finally:
        local.stop_peer(late)


def first_late_check(seed: int, fraction: float, steps: int) -> int | None:
    """With this seed, the first step from 3 on at which the route's second hop is checked
    (two draws per step from step 2 on: the first hop's, then the second's; step 1 is always checked)."""
    rng = random.Random(seed)
    for step in range(2, steps + 1):
        rng.random()
        if rng.random() < fraction and step >= 3:
            return step
    return None


def test_a_lie_on_an_unchecked_step_is_repaired_at_the_next_check(swarm, tiny_llama, expected, tiny_reference):
    """A liar honest for its first 2 answers lies from step 3, which is not checked; a later
    check finds the first wrong position, the route rolls back there and runs again. Tokens
    chosen in between came from the lie; every token after the catch is the model's own greedy
    choice after the tokens before it (the state on the peers is repaired)."""
    ids, expected_output = expected
    local, _ = swarm
    fraction = 0.25
    seed = next(seed for seed in range(1000) if 5 <= (first_late_check(seed, fraction, NEW_TOKENS) or 0) <= 12)
    sporadic = local.start_peer("2:4", extra=["--throughput", "5000", "--corrupt-outputs", "1.0",
                                              "--corrupt-after", "2"], name="sporadic-liar-2-4")
    try:
        with client(swarm, tiny_llama, verify_fraction=fraction) as model:
            model.verifier.rng = random.Random(seed)
            output, first_route, last_route, session = generate(model, ids)
            assert sporadic.peer_id in first_route and sporadic.peer_id not in last_route
            (_, position, caught_at), = [rollback for rollback in session.rollbacks
                                         if rollback[0] == sporadic.peer_id]
    finally:
        local.stop_peer(sporadic)
    prompt = ids.shape[1]
    assert position == prompt + 1  # its third answer, the step after the prompt's and the first token's
    assert caught_at == prompt + first_late_check(seed, fraction, NEW_TOKENS) - 2
    with torch.no_grad():
        choices = tiny_reference(output).logits.argmax(dim=-1)  # choices[:, j]: greedy token after output[:, :j+1]
    assert output[0, : position + 1].tolist() == expected_output[0, : position + 1].tolist()  # before the lie
    assert output[0, caught_at + 1 :].tolist() == choices[0, caught_at:-1].tolist()

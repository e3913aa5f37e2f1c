"""Requests sent straight to a peer's RPC: every bad one gets a clear refusal, and the peer
answers a normal request right after."""

import re

import pytest
import torch

from protocol import PROTOCOL_VERSION
from protocol.messages import (BACKWARD_RPC, FORWARD_RPC, INFERENCE_RPC, PUSH_RPC, Backward, BackwardResult, Forward,
                               ForwardResult, OpenSession, SessionOpened, Step, StepResult)
from swarm.local_swarm import LocalSwarm
from swarm.retry import RetryPolicy
from swarm.routing import Hop
from swarm.session import PeerError, _PeerStream


@pytest.fixture(scope="module")
def peer(tiny_llama, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("cache"))
    from swarm.model import DistributedModelForCausalLM

    local = LocalSwarm(str(tiny_llama), cache_dir=cache)
    try:
        local.start_bootstrap()
        child = local.start_peer("0:4", extra=["--max-session-length", "64", "--max-sessions", "2"])
        model = DistributedModelForCausalLM.from_pretrained(str(tiny_llama), local.initial_peers, cache_dir=cache,
                                                            retry=RetryPolicy(give_up_after=1.0))
        local.wait_until_online(model.view)
        yield model, child
        model.close()
    finally:
        local.stop()


def opening(distributed_model, **changes):
    fields = dict(model=distributed_model.store.identity.name, fingerprint=distributed_model.store.identity.fingerprint, start=0,
                  end=4, max_length=16)
    return OpenSession(**{**fields, **changes})


async def exchange(model, child, messages, rpc=INFERENCE_RPC, raw_frames=()):
    stream = _PeerStream(model.client, Hop(child.peer_id, 0, 4))
    await stream.open(rpc)
    replies = []
    try:
        for frame in raw_frames:
            stream._outbox.put_nowait(frame)
        for message in messages:
            stream.send(message)
            replies.append(await stream.receive(30))
    except PeerError as error:
        replies.append(error)
    finally:
        await stream.close()
    return replies


def assert_still_serving(model, child):
    hidden = torch.randn(1, 3, 64)
    replies = model.client.run(exchange(model, child, [opening(model), Step(step_id=1, position=0,
                                                                                   hidden_states=hidden)]))
    assert isinstance(replies[0], SessionOpened) and isinstance(replies[1], StepResult)
    assert replies[1].hidden_states.shape == (1, 3, 64) and torch.isfinite(replies[1].hidden_states).all()
    assert child.process.poll() is None


BAD_STEPS = {
    "wrong hidden size": (Step(step_id=1, position=0, hidden_states=torch.randn(1, 2, 63)), "[batch, tokens, 64]"),
    "wrong dtype": (Step(step_id=1, position=0, hidden_states=torch.randn(1, 2, 64).half()), "torch.float32"),
    "too many tokens": (Step(step_id=1, position=0, hidden_states=torch.randn(1, 17, 64)), "does not fit"),
    "position ahead of the cache": (Step(step_id=1, position=5, hidden_states=torch.randn(1, 1, 64)), "holds 0"),
    "wrong batch size": (Step(step_id=1, position=0, hidden_states=torch.randn(3, 1, 64)), "batch size 1"),
    "empty step": (Step(step_id=1, position=0, hidden_states=torch.randn(1, 0, 64)), "at least one token"),
}


@pytest.mark.parametrize("case", list(BAD_STEPS))
def test_bad_step_is_refused_and_peer_keeps_serving(peer, case):
    model, child = peer
    step, expected = BAD_STEPS[case]
    replies = model.client.run(exchange(model, child, [opening(model), step]))
    assert isinstance(replies[0], SessionOpened)
    assert isinstance(replies[1], PeerError) and expected in str(replies[1]), replies[1]
    assert_still_serving(model, child)


BAD_OPENS = {
    "unknown model": (dict(model="other-model"), "this peer serves"),
    "blocks not served": (dict(start=2, end=9), "not all served here"),
    "over the token limit": (dict(max_length=65), "outside 1..64"),
    "incompatible protocol": (dict(protocol_version=PROTOCOL_VERSION + 1), "protocol version"),
}


@pytest.mark.parametrize("case", list(BAD_OPENS))
def test_bad_open_is_refused(peer, case):
    model, child = peer
    changes, expected = BAD_OPENS[case]
    replies = model.client.run(exchange(model, child, [opening(model, **changes)]))
    assert isinstance(replies[0], PeerError) and expected in str(replies[0]), replies[0]
    assert_still_serving(model, child)


def test_step_without_a_session_is_refused(peer):
    model, child = peer
    replies = model.client.run(exchange(model, child, [Step(step_id=1, position=0,
                                                            hidden_states=torch.randn(1, 1, 64))]))
    assert isinstance(replies[0], PeerError) and "must start with an open message" in str(replies[0])
    assert_still_serving(model, child)


@pytest.mark.parametrize("garbage", [b"\x00\xffnot msgpack", b"\x93\x00\x01\xa3abc"])
def test_garbage_bytes_are_refused(peer, garbage):
    model, child = peer
    for rpc in (INFERENCE_RPC, FORWARD_RPC):
        replies = model.client.run(exchange(model, child, [opening(model)], rpc=rpc, raw_frames=[garbage]))
        assert isinstance(replies[0], PeerError) and ("frame" in str(replies[0]) or "message" in str(replies[0]))
    assert_still_serving(model, child)


def test_bad_pushes_are_refused(peer):
    """The push RPC (peer to peer) takes only steps that name a session; a client's step must not
    name one."""
    model, child = peer
    replies = model.client.run(exchange(model, child, [opening(model)], rpc=PUSH_RPC))
    assert isinstance(replies[0], PeerError) and "carries steps that name a session" in str(replies[0]), replies[0]
    replies = model.client.run(exchange(model, child, [opening(model)], rpc=PUSH_RPC, raw_frames=[b"\x00\xffnot"]))
    assert isinstance(replies[0], PeerError) and "frame" in str(replies[0]), replies[0]
    named = Step(step_id=1, position=0, hidden_states=torch.randn(1, 1, 64), session_id="someone-else")
    replies = model.client.run(exchange(model, child, [opening(model), named]))
    assert isinstance(replies[1], PeerError) and "names no session" in str(replies[1]), replies[1]
    assert_still_serving(model, child)


def test_forward_rpc_refuses_bad_shapes_and_serves_good_ones(peer):
    model, child = peer
    identity = model.store.identity
    bad = Forward(model=identity.name, fingerprint=identity.fingerprint, start=0, end=4,
                  hidden_states=torch.randn(2, 5, 32))
    good = Forward(model=identity.name, fingerprint=identity.fingerprint, start=0, end=4,
                   hidden_states=torch.randn(2, 5, 64))
    assert isinstance(model.client.run(exchange(model, child, [bad], rpc=FORWARD_RPC))[0], PeerError)
    reply = model.client.run(exchange(model, child, [good], rpc=FORWARD_RPC))[0]
    assert isinstance(reply, ForwardResult) and reply.hidden_states.shape == (2, 5, 64)


BAD_PROMPTS = {
    "not one per block": (torch.randn(2, 2, 64), r"prompts must be \[4 blocks \(0:4\), tokens, 64\]"),
    "more tokens than the sequence": (torch.randn(4, 6, 64), "6 prompt tokens do not fit sequences of 5"),
    "wrong dtype": (torch.randn(4, 2, 64).half(), "dtype of the hidden states"),
}


def one_shot(model, rpc, prompts):
    identity, hidden = model.store.identity, torch.randn(2, 5, 64)
    fields = dict(model=identity.name, fingerprint=identity.fingerprint, start=0, end=4, hidden_states=hidden,
                  prompts=prompts)
    return Forward(**fields) if rpc == FORWARD_RPC else Backward(**fields, grad_outputs=torch.randn(2, 5, 64))


@pytest.mark.parametrize("rpc", [FORWARD_RPC, BACKWARD_RPC])
@pytest.mark.parametrize("case", list(BAD_PROMPTS))
def test_malformed_deep_prompts_are_refused_and_peer_keeps_serving(peer, case, rpc):
    model, child = peer
    prompts, expected = BAD_PROMPTS[case]
    reply = model.client.run(exchange(model, child, [one_shot(model, rpc, prompts)], rpc=rpc))[0]
    assert isinstance(reply, PeerError) and re.search(expected, str(reply)), reply
    good = model.client.run(exchange(model, child, [one_shot(model, rpc, torch.randn(4, 2, 64))], rpc=rpc))[0]
    if rpc == FORWARD_RPC:
        assert isinstance(good, ForwardResult) and good.hidden_states.shape == (2, 5, 64)
    else:
        assert isinstance(good, BackwardResult) and good.grad_prompts.shape == (4, 2, 64)
    assert_still_serving(model, child)


def test_session_limit_refuses_clearly_and_frees_on_close(peer):
    model, child = peer
    sessions = [model.inference_session(max_length=8) for _ in range(2)]
    for session in sessions:
        session.open()
    try:
        with pytest.raises(Exception, match="peer is full"):
            model.inference_session(max_length=8).open()
    finally:
        for session in sessions:
            session.close()
    assert_still_serving(model, child)

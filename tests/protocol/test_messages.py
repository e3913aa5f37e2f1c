import msgpack
import pytest
import torch

from protocol import MAX_MESSAGE_BYTES
from protocol.messages import (MAX_PUSH_HOPS, MAX_PUSHED_STEPS, Backward, BackwardResult, ErrorReply, Forward,
                               FrameJoiner, OpenSession, ProtocolError, Pushes, Step, decode, encode, tensor_from_wire,
                               tensor_to_wire, to_frames)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tensor_round_trip(dtype):
    tensor = torch.randn(2, 3, 5).to(dtype)
    assert torch.equal(tensor_from_wire(tensor_to_wire(tensor)), tensor)


def test_tensor_with_wrong_byte_count_or_dtype_is_refused():
    wire = tensor_to_wire(torch.zeros(2, 4))
    with pytest.raises(ProtocolError, match="needs 32"):
        tensor_from_wire({**wire, "data": wire["data"][:-4]})
    with pytest.raises(ProtocolError, match="unsupported tensor dtype"):
        tensor_from_wire({**wire, "dtype": "int64"})
    with pytest.raises(ProtocolError):
        tensor_from_wire({"shape": [1]})
    # a shape whose element count wraps around in 64-bit integers (2^64 -> 0) against empty data
    with pytest.raises(ProtocolError, match=f"needs {2**66}"):
        tensor_from_wire({**wire, "shape": [2**32, 2**32], "data": b""})


def test_message_round_trip_keeps_fields_and_tensor():
    step = Step(step_id=3, position=7, hidden_states=torch.randn(1, 2, 8))
    decoded = decode(encode(step))
    assert isinstance(decoded, Step) and decoded.position == 7 and torch.equal(decoded.hidden_states, step.hidden_states)


def test_unknown_fields_are_ignored_and_missing_ones_named():
    wire = msgpack.unpackb(encode(ErrorReply(message="x")))
    wire["from_the_future"] = 1
    assert decode(msgpack.packb(wire)) == ErrorReply(message="x")
    with pytest.raises(ProtocolError, match="max_length"):
        decode(msgpack.packb({"type": "open", "model": "m", "fingerprint": "f", "start": 0, "end": 1}))


@pytest.mark.parametrize("garbage", [b"", b"\xff\x00garbage", msgpack.packb([1, 2]), msgpack.packb({"type": "nope"})])
def test_garbage_is_a_protocol_error(garbage):
    with pytest.raises(ProtocolError):
        decode(garbage)
    with pytest.raises(ProtocolError):
        FrameJoiner(1 << 20).push(garbage)


def test_negative_or_non_integer_fields_refused():
    with pytest.raises(ProtocolError, match="non-negative"):
        decode(encode(OpenSession(model="m", fingerprint="f", start=-1, end=2, max_length=4)))


def test_large_message_is_framed_under_the_cap_and_joined():
    hidden = torch.randn(1, 4000, 576)  # 9.2 MB: more than two 4 MiB messages
    frames = to_frames(Step(step_id=1, position=0, hidden_states=hidden))
    assert len(frames) >= 3 and all(len(frame) < MAX_MESSAGE_BYTES for frame in frames)
    joiner = FrameJoiner(64 << 20)
    results = [joiner.push(frame) for frame in frames]
    assert results[:-1] == [None] * (len(frames) - 1)
    assert torch.equal(results[-1].hidden_states, hidden)


def test_joined_size_limit_and_order_enforced():
    frames = to_frames(Step(step_id=1, position=0, hidden_states=torch.randn(1, 2000, 576)))
    with pytest.raises(ProtocolError, match="limit"):
        joiner = FrameJoiner(1 << 20)
        for frame in frames:
            joiner.push(frame)
    with pytest.raises(ProtocolError, match="out of order"):
        FrameJoiner(64 << 20).push(frames[1])


def forward(prompts=None, hidden=None, start=1, end=3):
    return Forward(model="m", fingerprint="f", start=start, end=end,
                   hidden_states=torch.randn(2, 5, 8) if hidden is None else hidden, prompts=prompts)


def test_deep_prompts_travel_with_forward_and_backward():
    prompts = torch.randn(2, 3, 8)
    decoded = decode(encode(forward(prompts)))
    assert isinstance(decoded, Forward) and torch.equal(decoded.prompts, prompts)
    backward = Backward(model="m", fingerprint="f", start=1, end=3, hidden_states=torch.randn(2, 5, 8),
                        grad_outputs=torch.randn(2, 5, 8), prompts=prompts)
    assert torch.equal(decode(encode(backward)).prompts, prompts)
    result = decode(encode(BackwardResult(grad_inputs=torch.zeros(1), grad_prompts=prompts)))
    assert torch.equal(result.grad_prompts, prompts)


def test_messages_without_prompts_still_read():
    wire = msgpack.unpackb(encode(forward()))
    del wire["prompts"]  # as sent before deep prompts existed
    decoded = decode(msgpack.packb(wire))
    assert isinstance(decoded, Forward) and decoded.prompts is None
    wire = msgpack.unpackb(encode(BackwardResult(grad_inputs=torch.zeros(2))))
    del wire["grad_prompts"]
    assert decode(msgpack.packb(wire)).grad_prompts is None


BAD_PROMPTS = {
    "first dim is not end - start": (dict(prompts=torch.randn(3, 2, 8)), r"\[2 blocks \(1:3\), tokens, 8\]"),
    "wrong hidden size": (dict(prompts=torch.randn(2, 2, 7)), r"got \[2, 2, 7\]"),
    "not three dimensions": (dict(prompts=torch.randn(2, 8)), r"got \[2, 8\]"),
    "more tokens than the sequence": (dict(prompts=torch.randn(2, 6, 8)), "6 prompt tokens do not fit sequences of 5"),
    "no tokens": (dict(prompts=torch.randn(2, 0, 8)), "0 prompt tokens"),
    "other dtype than the hidden states": (dict(prompts=torch.randn(2, 2, 8).half()), "dtype of the hidden states"),
    "hidden states not 3-d": (dict(prompts=torch.randn(2, 2, 8), hidden=torch.randn(5, 8)), "hidden states must be"),
}


@pytest.mark.parametrize("case", list(BAD_PROMPTS))
def test_malformed_prompts_are_refused_in_one_line(case):
    changes, expected = BAD_PROMPTS[case]
    with pytest.raises(ProtocolError, match=expected) as error:
        decode(encode(forward(**changes)))
    assert "\n" not in str(error.value)
    with pytest.raises(ProtocolError, match=expected):
        hidden = changes.get("hidden", torch.randn(2, 5, 8))
        decode(encode(Backward(model="m", fingerprint="f", start=1, end=3, hidden_states=hidden, grad_outputs=hidden,
                               prompts=changes["prompts"])))


def test_a_step_names_the_hops_to_push_to():
    hops = [["12D3KooWpeer2", "session2"], ["12D3KooWpeer3", "session3"]]
    decoded = decode(encode(Step(step_id=1, position=0, hidden_states=torch.zeros(1, 1, 8), push_to=hops)))
    assert decoded.push_to == hops and decoded.session_id is None
    plain = decode(encode(Step(step_id=1, position=0, hidden_states=torch.zeros(1, 1, 8))))
    assert plain.push_to is None  # a step from an older client reads as before


@pytest.mark.parametrize("push_to", [["peer"], [["peer"]], [["peer", 3]], "peer", [["p", "s"]] * (MAX_PUSH_HOPS + 1)],
                         ids=["not pairs", "one string", "not strings", "not a list", "too many"])
def test_malformed_push_lists_are_refused(push_to):
    wire = msgpack.unpackb(encode(Step(step_id=1, position=0, hidden_states=torch.zeros(1, 1, 8))))
    wire["push_to"] = push_to
    with pytest.raises(ProtocolError, match="push_to"):
        decode(msgpack.packb(wire))


def test_pushes_carry_the_steps_of_several_sessions():
    steps = tuple(Step(step_id=index, position=7, hidden_states=torch.randn(1, 1, 8), session_id=f"session{index}",
                       push_to=[["12D3KooWpeer3", "s3"]] if index else None) for index in range(3))
    decoded = decode(encode(Pushes(steps=steps)))
    assert isinstance(decoded, Pushes) and len(decoded.steps) == 3
    for sent, received in zip(steps, decoded.steps):
        assert (received.step_id, received.position, received.session_id, received.push_to) == \
            (sent.step_id, sent.position, sent.session_id, sent.push_to)
        assert torch.equal(received.hidden_states, sent.hidden_states)


@pytest.mark.parametrize("steps", [None, [], "step", [{"type": "keepalive"}], [3],
                                   [{"type": "step", "step_id": 1}], [{"type": "pushes", "steps": []}]],
                         ids=["missing", "empty", "not a list", "not a step", "not a map", "step misses fields",
                              "nested"])
def test_malformed_pushes_are_refused(steps):
    with pytest.raises(ProtocolError, match="pushes|step"):
        decode(msgpack.packb({"type": "pushes", "steps": steps}))


def test_pushes_are_limited_in_count():
    step = Step(step_id=1, position=0, hidden_states=torch.zeros(1, 1, 2), session_id="s").to_wire()
    with pytest.raises(ProtocolError, match=f"1 to {MAX_PUSHED_STEPS} steps"):
        decode(msgpack.packb({"type": "pushes", "steps": [step] * (MAX_PUSHED_STEPS + 1)}))

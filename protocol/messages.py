"""RPC messages between clients and peers, their tensors, and their framing under the 4 MiB cap.

A message is a frozen dataclass; on the wire it is a msgpack map with a `type` field; readers
ignore fields they do not know. A tensor travels as (dtype, shape, raw little-endian bytes).
An encoded message larger than one frame is split into several frames, which the receiver
joins (`FrameJoiner`) before decoding. Frames ride in hivemind's `ExpertRequest.metadata` /
`ExpertResponse.metadata`, so hivemind's P2P carries them unary or streaming.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Iterator

import msgpack
import numpy as np
import torch

from protocol import FRAME_PAYLOAD_BYTES, PROTOCOL_VERSION

INFERENCE_RPC = f"swarm.v{PROTOCOL_VERSION}.inference"  # bidirectional stream: open, then steps
FORWARD_RPC = f"swarm.v{PROTOCOL_VERSION}.forward"  # one forward message in, one result out
BACKWARD_RPC = f"swarm.v{PROTOCOL_VERSION}.backward"  # inputs and output gradients in, input gradients out
PROBE_RPC = f"swarm.v{PROTOCOL_VERSION}.probe"  # a payload in, its size out: a timed transfer for bandwidth
PUSH_RPC = f"swarm.v{PROTOCOL_VERSION}.push"  # peer to peer: steps for the next hop's session (no replies)

MAX_PUSH_HOPS = 256  # hops a step may name after the one it is sent to

WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class ProtocolError(ValueError):
    """A message that cannot be read or is not allowed; its text goes back to the sender.
    `retryable`: the same request may succeed elsewhere or later (the peer is busy or moving)."""

    def __init__(self, message: str, retryable: bool = False):
        super().__init__(message)
        self.retryable = retryable


# ---------------------------------------------------------------------------- tensors


def tensor_to_wire(tensor: torch.Tensor) -> dict[str, Any]:
    tensor = tensor.detach().cpu().contiguous()
    dtype = str(tensor.dtype).removeprefix("torch.")
    if dtype not in WIRE_DTYPES:
        raise ProtocolError(f"dtype {dtype} cannot be sent; use one of {sorted(WIRE_DTYPES)}")
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: send its bits
        data = tensor.view(torch.int16).numpy().tobytes()
    else:
        data = tensor.numpy().tobytes()
    return {"dtype": dtype, "shape": list(tensor.shape), "data": data}


def tensor_from_wire(wire: Any) -> torch.Tensor:
    try:
        dtype, shape, data = wire["dtype"], [int(size) for size in wire["shape"]], wire["data"]
    except (KeyError, TypeError, ValueError) as error:
        raise ProtocolError("malformed tensor: expected dtype, shape and data") from error
    if dtype not in WIRE_DTYPES:
        raise ProtocolError(f"unsupported tensor dtype {dtype!r}; use one of {sorted(WIRE_DTYPES)}")
    torch_dtype = WIRE_DTYPES[dtype]
    expected = math.prod(shape) * torch_dtype.itemsize  # exact: numpy's int64 product could wrap around
    if any(size < 0 for size in shape) or not isinstance(data, bytes) or len(data) != expected:
        raise ProtocolError(f"tensor data has {len(data) if isinstance(data, bytes) else '?'} bytes, "
                            f"shape {shape} of {dtype} needs {expected}")
    if torch_dtype == torch.bfloat16:
        array = np.frombuffer(data, dtype=np.int16).reshape(shape)
        return torch.from_numpy(array.copy()).view(torch.bfloat16)
    array = np.frombuffer(data, dtype=np.dtype(dtype)).reshape(shape)
    return torch.from_numpy(array.copy())


# ---------------------------------------------------------------------------- messages

_MESSAGE_TYPES: dict[str, type[Message]] = {}


@dataclasses.dataclass(frozen=True)
class Message:
    type_name: ClassVar[str] = ""
    tensor_fields: ClassVar[tuple[str, ...]] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _MESSAGE_TYPES[cls.type_name] = cls

    def to_wire(self) -> dict[str, Any]:
        wire: dict[str, Any] = {"type": self.type_name}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in self.tensor_fields and value is not None:
                value = tensor_to_wire(value)
            wire[field.name] = value
        return wire

    @classmethod
    def from_wire_fields(cls, wire: dict[str, Any]) -> Message:
        fields = {}
        for field in dataclasses.fields(cls):
            if field.name not in wire:
                if field.default is dataclasses.MISSING:
                    raise ProtocolError(f"{cls.type_name} message misses field {field.name!r}")
                continue
            value = wire[field.name]
            if field.name in cls.tensor_fields and value is not None:
                value = tensor_from_wire(value)
            fields[field.name] = value
        message = cls(**fields)
        message.check()
        return message

    def check(self) -> None:
        """Type checks on received fields; raise ProtocolError."""


def _require_int(message: Message, *names: str) -> None:
    for name in names:
        value = getattr(message, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ProtocolError(f"{message.type_name}.{name} must be a non-negative integer, got {value!r}")


@dataclasses.dataclass(frozen=True)
class OpenSession(Message):
    """First message of an inference stream: which blocks of which model, and how long at most."""

    type_name: ClassVar[str] = "open"
    model: str
    fingerprint: str
    start: int
    end: int
    max_length: int
    batch_size: int = 1
    protocol_version: int = PROTOCOL_VERSION

    def check(self) -> None:
        _require_int(self, "start", "end", "max_length", "batch_size", "protocol_version")


@dataclasses.dataclass(frozen=True)
class SessionOpened(Message):
    type_name: ClassVar[str] = "opened"
    session_id: str
    max_length: int


@dataclasses.dataclass(frozen=True)
class Step(Message):
    """New positions of a session: hidden states [batch, new_tokens, hidden] starting at `position`.

    A `position` below what the peer holds rolls its cache back to it (replays and rollbacks).
    `push_to`: the hops after this one, as [peer id, session id] pairs: the peer sends its output
    straight to the first of them as that session's next step (over PUSH_RPC, naming the
    session in `session_id`) and hands it the rest, so the client sends a step once per token
    instead of once per hop."""

    type_name: ClassVar[str] = "step"
    tensor_fields: ClassVar[tuple[str, ...]] = ("hidden_states",)
    step_id: int
    position: int
    hidden_states: torch.Tensor
    push_to: list[list[str]] | None = None
    session_id: str | None = None  # only on a push stream: the receiving peer's session

    def check(self) -> None:
        _require_int(self, "step_id", "position")
        if self.push_to is not None and not (
                isinstance(self.push_to, list) and len(self.push_to) <= MAX_PUSH_HOPS
                and all(isinstance(hop, list) and len(hop) == 2 and all(isinstance(part, str) for part in hop)
                        for hop in self.push_to)):
            raise ProtocolError(f"step.push_to must be a list of at most {MAX_PUSH_HOPS} [peer id, session id] "
                                f"pairs of strings")
        if self.session_id is not None and not isinstance(self.session_id, str):
            raise ProtocolError("step.session_id must be a string")


MAX_PUSHED_STEPS = 1024  # steps one Pushes message may carry


@dataclasses.dataclass(frozen=True)
class Pushes(Message):
    """Steps a peer pushes into sessions of the next peer, each naming its session: the outputs
    of one batch that go to the same peer, sent as one message (see peers.push)."""

    type_name: ClassVar[str] = "pushes"
    steps: tuple[Step, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"type": self.type_name, "steps": [step.to_wire() for step in self.steps]}

    @classmethod
    def from_wire_fields(cls, wire: dict[str, Any]) -> Message:
        steps = wire.get("steps")
        if not isinstance(steps, list) or not 0 < len(steps) <= MAX_PUSHED_STEPS:
            raise ProtocolError(f"pushes.steps must be a list of 1 to {MAX_PUSHED_STEPS} steps")
        decoded = []
        for step in steps:
            if not isinstance(step, dict) or step.get("type") != Step.type_name:
                raise ProtocolError("pushes.steps must hold step messages")
            decoded.append(Step.from_wire_fields(step))
        return cls(steps=tuple(decoded))


@dataclasses.dataclass(frozen=True)
class KeepAlive(Message):
    """Nothing to do: a client waiting for a pushed step's result writes one now and then, since
    a write to a peer that died fails at once, where a read only waits (see swarm.session)."""

    type_name: ClassVar[str] = "keepalive"


PUSH_SENT = "sent"


@dataclasses.dataclass(frozen=True)
class StepResult(Message):
    """A step's output. `push_status`, when the step named hops to push to: PUSH_SENT once the
    output went to the next hop, otherwise why it could not (the client then sends it itself);
    None from a peer that was asked for no push (or does not know how)."""

    type_name: ClassVar[str] = "step_result"
    tensor_fields: ClassVar[tuple[str, ...]] = ("hidden_states",)
    step_id: int
    hidden_states: torch.Tensor
    push_status: str | None = None


def _check_prompts(message: Forward | Backward) -> None:
    """Deep prompts [end - start, prompt tokens, hidden]: one per block, added to the first
    positions of every sequence of the batch before that block."""
    prompts, hidden = message.prompts, message.hidden_states
    if prompts is None:
        return
    if hidden.dim() != 3:
        raise ProtocolError(f"hidden states must be [batch, tokens, hidden], got {list(hidden.shape)}")
    blocks = message.end - message.start
    if prompts.dim() != 3 or prompts.shape[0] != blocks or prompts.shape[2] != hidden.shape[2]:
        raise ProtocolError(f"prompts must be [{blocks} blocks ({message.start}:{message.end}), tokens, "
                            f"{hidden.shape[2]}], got {list(prompts.shape)}")
    if prompts.dtype != hidden.dtype:
        raise ProtocolError(f"prompts must have the dtype of the hidden states ({hidden.dtype}), got {prompts.dtype}")
    if not 0 < prompts.shape[1] <= hidden.shape[1]:
        raise ProtocolError(f"{prompts.shape[1]} prompt tokens do not fit sequences of {hidden.shape[1]} tokens "
                            f"(1 to that many)")


@dataclasses.dataclass(frozen=True)
class Forward(Message):
    """One-shot forward of whole sequences through blocks start:end, no cache kept; with
    deep `prompts` (see `_check_prompts`) added before each block."""

    type_name: ClassVar[str] = "forward"
    tensor_fields: ClassVar[tuple[str, ...]] = ("hidden_states", "prompts")
    model: str
    fingerprint: str
    start: int
    end: int
    hidden_states: torch.Tensor
    protocol_version: int = PROTOCOL_VERSION
    prompts: torch.Tensor | None = None

    def check(self) -> None:
        _require_int(self, "start", "end", "protocol_version")
        _check_prompts(self)


@dataclasses.dataclass(frozen=True)
class ForwardResult(Message):
    type_name: ClassVar[str] = "forward_result"
    tensor_fields: ClassVar[tuple[str, ...]] = ("hidden_states",)
    hidden_states: torch.Tensor


@dataclasses.dataclass(frozen=True)
class Backward(Message):
    """Gradients with respect to the inputs of blocks start:end (and to their deep `prompts`,
    when given), given those inputs and the gradients of their outputs (the blocks themselves
    stay frozen)."""

    type_name: ClassVar[str] = "backward"
    tensor_fields: ClassVar[tuple[str, ...]] = ("hidden_states", "grad_outputs", "prompts")
    model: str
    fingerprint: str
    start: int
    end: int
    hidden_states: torch.Tensor
    grad_outputs: torch.Tensor
    protocol_version: int = PROTOCOL_VERSION
    prompts: torch.Tensor | None = None

    def check(self) -> None:
        _require_int(self, "start", "end", "protocol_version")
        if self.hidden_states.shape != self.grad_outputs.shape:
            raise ProtocolError(f"grad_outputs {list(self.grad_outputs.shape)} must have the shape of "
                                f"hidden_states {list(self.hidden_states.shape)}")
        _check_prompts(self)


@dataclasses.dataclass(frozen=True)
class BackwardResult(Message):
    type_name: ClassVar[str] = "backward_result"
    tensor_fields: ClassVar[tuple[str, ...]] = ("grad_inputs", "grad_prompts")
    grad_inputs: torch.Tensor
    grad_prompts: torch.Tensor | None = None  # when the request had prompts: same shape as those


@dataclasses.dataclass(frozen=True)
class Probe(Message):
    type_name: ClassVar[str] = "probe"
    payload: bytes


@dataclasses.dataclass(frozen=True)
class ProbeResult(Message):
    type_name: ClassVar[str] = "probe_result"
    received: int


@dataclasses.dataclass(frozen=True)
class ErrorReply(Message):
    """The peer refused or failed a request; `message` is one line meant for a person."""

    type_name: ClassVar[str] = "error"
    message: str
    retryable: bool = False


def encode(message: Message) -> bytes:
    return msgpack.packb(message.to_wire(), use_bin_type=True)


def decode(data: bytes) -> Message:
    try:
        wire = msgpack.unpackb(data, raw=False)
    except Exception as error:
        raise ProtocolError(f"undecodable message ({type(error).__name__})") from error
    if not isinstance(wire, dict) or wire.get("type") not in _MESSAGE_TYPES:
        raise ProtocolError(f"unknown message type {wire.get('type') if isinstance(wire, dict) else None!r}")
    return _MESSAGE_TYPES[wire["type"]].from_wire_fields(wire)


# ---------------------------------------------------------------------------- framing


def to_frames(message: Message, frame_bytes: int = FRAME_PAYLOAD_BYTES) -> list[bytes]:
    """Encode a message as one or more frames, each small enough for one P2P message."""
    payload = encode(message)
    count = max(1, -(-len(payload) // frame_bytes))
    return [
        msgpack.packb([index, count, payload[index * frame_bytes : (index + 1) * frame_bytes]], use_bin_type=True)
        for index in range(count)
    ]


class FrameJoiner:
    """Joins frames back into messages; `push` returns a message once its last frame arrived."""

    def __init__(self, max_message_bytes: int):
        self.max_message_bytes = max_message_bytes
        self._parts: list[bytes] = []
        self._size = 0

    def push(self, frame: bytes) -> Message | None:
        try:
            index, count, part = msgpack.unpackb(frame, raw=False)
        except Exception as error:
            raise ProtocolError(f"undecodable frame ({type(error).__name__})") from error
        if not (isinstance(index, int) and isinstance(count, int) and isinstance(part, bytes)):
            raise ProtocolError("malformed frame")
        if index != len(self._parts) or not 0 <= index < count:
            raise ProtocolError(f"frame {index} of {count} arrived out of order")
        self._size += len(part)
        if self._size > self.max_message_bytes:
            raise ProtocolError(f"message exceeds the peer's limit of {self.max_message_bytes} bytes")
        self._parts.append(part)
        if index + 1 < count:
            return None
        payload, self._parts, self._size = b"".join(self._parts), [], 0
        return decode(payload)


def iterate_messages(frames: Iterator[bytes], max_message_bytes: int) -> Iterator[Message]:
    joiner = FrameJoiner(max_message_bytes)
    for frame in frames:
        message = joiner.push(frame)
        if message is not None:
            yield message

"""Inference sessions: one open stream per peer on the route, hidden states chained through them.

A step sends only the new positions; each peer keeps the attention cache of its blocks for
this session. One thread handoff per step: the whole chain over the route runs as one
coroutine on the client's event loop.
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

import torch
from hivemind.p2p import P2PHandlerError, PeerID
from hivemind.proto import runtime_pb2

from protocol.messages import (FORWARD_RPC, INFERENCE_RPC, ErrorReply, Forward, ForwardResult, FrameJoiner, Message,
                               OpenSession, SessionOpened, Step, StepResult, to_frames)
from protocol.records import ModelIdentity
from swarm.client import SwarmClient, SwarmView
from swarm.routing import Hop, MissingBlocksError, find_route

logger = logging.getLogger(__name__)

MAX_REPLY_BYTES = 1024**3


class PeerError(RuntimeError):
    """A peer refused or failed a request."""

    def __init__(self, peer_id: str, message: str, retryable: bool = False):
        super().__init__(f"peer {peer_id}: {message}")
        self.peer_id, self.reason, self.retryable = peer_id, message, retryable


class _PeerStream:
    """A bidirectional stream to one peer: frames out through a queue, messages in."""

    def __init__(self, client: SwarmClient, hop: Hop):
        self.client, self.hop = client, hop
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._replies: AsyncIterator[runtime_pb2.ExpertResponse] | None = None
        self._joiner = FrameJoiner(MAX_REPLY_BYTES)

    async def _requests(self) -> AsyncIterator[runtime_pb2.ExpertRequest]:
        while True:
            frame = await self._outbox.get()
            if frame is None:
                return
            yield runtime_pb2.ExpertRequest(metadata=frame)

    async def open(self, rpc: str) -> None:
        self._replies = await self.client.p2p.iterate_protobuf_handler(
            PeerID.from_base58(self.hop.peer_id), rpc, self._requests(), runtime_pb2.ExpertResponse)

    def send(self, message: Message) -> None:
        for frame in to_frames(message):
            self._outbox.put_nowait(frame)

    async def receive(self, timeout: float) -> Message:
        async def next_message() -> Message:
            async for reply in self._replies:
                message = self._joiner.push(reply.metadata)
                if message is not None:
                    return message
            raise PeerError(self.hop.peer_id, "closed the stream", retryable=True)

        try:
            message = await asyncio.wait_for(next_message(), timeout)
        except asyncio.TimeoutError:
            raise PeerError(self.hop.peer_id, f"no answer within {timeout:.0f} s", retryable=True) from None
        except (OSError, asyncio.IncompleteReadError, P2PHandlerError) as error:
            raise PeerError(self.hop.peer_id, f"connection lost ({type(error).__name__}: {error})",
                            retryable=True) from None
        if isinstance(message, ErrorReply):
            raise PeerError(self.hop.peer_id, message.message, message.retryable)
        return message

    async def close(self) -> None:
        self._outbox.put_nowait(None)
        if self._replies is not None:
            try:
                await self._replies.aclose()
            except Exception as error:
                logger.debug(f"closing the stream to {self.hop.peer_id}: {error}")


class InferenceSession:
    """Generation state across the swarm: `step(hidden)` feeds new positions through every hop."""

    def __init__(self, client: SwarmClient, view: SwarmView, max_length: int, batch_size: int = 1):
        self.client, self.view = client, view
        self.identity: ModelIdentity = view.identity
        self.max_length, self.batch_size = max_length, batch_size
        self.position = 0
        self.token_ids: torch.Tensor | None = None  # tokens whose positions the peers hold (set by generate)
        self._hops: list[Hop] = []
        self._streams: list[_PeerStream] = []
        self._step_id = 0
        self.closed = False

    @property
    def route(self) -> list[tuple[str, int, int]]:
        return [(hop.peer_id, hop.start, hop.end) for hop in self._hops]

    def __enter__(self) -> InferenceSession:
        self.open()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def open(self) -> None:
        self.client.run(self._open(), timeout=self.client.options.connect_timeout + self.client.options.step_timeout)

    async def _open(self) -> None:
        records = self.view.records or await self.view.wait_for_coverage(self.client.options.coverage_timeout)
        refused: dict[str, str] = {}  # peers that turned this session down, and why
        while True:
            try:
                self._hops = find_route(records, self.view.num_blocks, avoid=frozenset(refused))
            except MissingBlocksError as error:
                reasons = "; ".join(f"{peer_id}: {reason}" for peer_id, reason in refused.items())
                raise MissingBlocksError(error.missing, self.view.num_blocks,
                                         f" (refused by {reasons})" if refused else "") from None
            try:
                for hop in self._hops:
                    await self._open_stream(hop)
                return
            except PeerError as error:
                await self._close()
                refused[error.peer_id] = error.reason
                logger.warning(f"peer {error.peer_id} refused the session ({error.reason}); trying another route")
            except BaseException:
                await self._close()
                raise

    async def _open_stream(self, hop: Hop) -> None:
        stream = _PeerStream(self.client, hop)
        self._streams.append(stream)
        try:
            await stream.open(INFERENCE_RPC)
        except Exception as error:  # unreachable: same treatment as a refusal
            raise PeerError(hop.peer_id, f"unreachable ({type(error).__name__}: {error})", retryable=True) from None
        stream.send(OpenSession(model=self.identity.name, fingerprint=self.identity.fingerprint,
                                start=hop.start, end=hop.end, max_length=self.max_length,
                                batch_size=self.batch_size))
        opened = await stream.receive(self.client.options.step_timeout)
        if not isinstance(opened, SessionOpened):
            raise PeerError(hop.peer_id, f"answered {opened.type_name} to open")

    def step(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.closed:
            raise RuntimeError("the inference session is closed")
        new_tokens = hidden_states.shape[1]
        if self.position + new_tokens > self.max_length:
            raise ValueError(f"the session holds {self.position} tokens; {new_tokens} more exceed its max_length "
                             f"{self.max_length} (open it with a larger max_length)")
        output = self.client.run(self._step(hidden_states.detach()))
        self.position += new_tokens
        return output

    async def _step(self, hidden_states: torch.Tensor) -> torch.Tensor:
        self._step_id += 1
        for stream in self._streams:
            stream.send(Step(step_id=self._step_id, position=self.position, hidden_states=hidden_states))
            reply = await stream.receive(self.client.options.step_timeout)
            if not isinstance(reply, StepResult) or reply.step_id != self._step_id:
                raise PeerError(stream.hop.peer_id, f"answered {reply.type_name} out of turn")
            hidden_states = reply.hidden_states
        return hidden_states

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.client.run(self._close(), timeout=30)

    async def _close(self) -> None:
        streams, self._streams = self._streams, []
        await asyncio.gather(*(stream.close() for stream in streams), return_exceptions=True)


async def forward_through(client: SwarmClient, view: SwarmView, hidden_states: torch.Tensor) -> torch.Tensor:
    """One-shot forward of whole sequences through every block (no cache kept on the peers)."""
    records = view.records or await view.wait_for_coverage(client.options.coverage_timeout)
    for hop in find_route(records, view.num_blocks):
        stream = _PeerStream(client, hop)
        await stream.open(FORWARD_RPC)
        try:
            stream.send(Forward(model=view.identity.name, fingerprint=view.identity.fingerprint, start=hop.start,
                                end=hop.end, hidden_states=hidden_states))
            reply = await stream.receive(client.options.step_timeout)
        finally:
            await stream.close()
        if not isinstance(reply, ForwardResult):
            raise PeerError(hop.peer_id, f"answered {reply.type_name} to forward")
        hidden_states = reply.hidden_states
    return hidden_states

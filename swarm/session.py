"""Inference sessions: one open stream per peer on the route, hidden states chained through them.

A step sends only the new positions; each peer keeps the attention cache of its blocks for
this session. One thread handoff per step: the whole chain over the route runs as one
coroutine on the client's event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import AsyncIterator

import torch
from hivemind.p2p import P2PHandlerError, PeerID
from hivemind.proto import runtime_pb2

from protocol.messages import (INFERENCE_RPC, ErrorReply, FrameJoiner, Message, OpenSession, SessionOpened, Step,
                               StepResult, to_frames)
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
            async with asyncio.timeout(timeout):  # no extra task per message, unlike wait_for
                message = await next_message()
        except TimeoutError:
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


@dataclasses.dataclass
class _Segment:
    """One hop of the route with its open stream and every input it was sent (for replay)."""

    hop: Hop
    stream: _PeerStream
    inputs: list[torch.Tensor] = dataclasses.field(default_factory=list)  # [batch, tokens, hidden] each
    fresh: bool = True  # its peer holds no positions yet: the next step replays the history


class InferenceSession:
    """Generation state across the swarm: `step(hidden)` feeds new positions through every hop.

    When a peer on the route fails (error, dropped stream, or silence past the step timeout),
    the session routes around it for exactly the blocks it covered, replays every input those
    blocks have seen into the replacement's fresh cache, and carries on: the output equals an
    uninterrupted run. `route` always shows the current route.
    """

    def __init__(self, client: SwarmClient, view: SwarmView, max_length: int, batch_size: int = 1):
        self.client, self.view = client, view
        self.identity: ModelIdentity = view.identity
        self.max_length, self.batch_size = max_length, batch_size
        self.position = 0
        self.token_ids: torch.Tensor | None = None  # tokens whose positions the peers hold (set by generate)
        self._segments: list[_Segment] = []
        self._step_id = 0
        self.closed = False
        self.failovers: list[tuple[str, str]] = []  # (failed peer, reason), for logs and tests

    @property
    def route(self) -> list[tuple[str, int, int]]:
        return [(segment.hop.peer_id, segment.hop.start, segment.hop.end) for segment in self._segments]

    def __enter__(self) -> InferenceSession:
        self.open()
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def open(self) -> None:
        self.client.run(self._open())

    async def _open(self) -> None:
        if not self.view.records:
            await self.view.wait_for_coverage(self.client.options.coverage_timeout)
        try:
            self._segments = await self._connect(0, self.view.num_blocks)
        except BaseException:
            await self._close()
            raise

    async def _connect(self, start: int, end: int, failure: PeerError | None = None) -> list[_Segment]:
        """Open streams over blocks [start, end), routing around peers that fail or refuse.

        With no route left, wait (backing off, re-reading the swarm map) up to the retry
        policy's limit: peers that refused may have room again, new ones may have joined."""
        policy = self.client.retry
        reasons: dict[str, str] = {failure.peer_id: failure.reason} if failure else {}
        skipped = set(reasons)  # left out until the next wait
        delays = policy.delays()
        while True:
            try:
                hops = find_route(self.view.records, self.view.num_blocks, start, end,
                                  avoid=policy.avoided() | frozenset(skipped), rtts=self.view.rtts,
                                  mode=self.client.options.route_mode)
            except MissingBlocksError as error:
                delay = next(delays, None)
                if delay is None:
                    detail = "; ".join(f"{peer_id}: {reason}" for peer_id, reason in reasons.items())
                    raise MissingBlocksError(error.missing, self.view.num_blocks,
                                             f" (failed or refused: {detail})" if reasons else "") from None
                await asyncio.sleep(delay)
                await self.view.refresh()
                skipped.clear()
                continue
            segments: list[_Segment] = []
            try:
                for hop in hops:
                    segments.append(await self._open_segment(hop))
                return segments
            except PeerError as error:
                await asyncio.gather(*(segment.stream.close() for segment in segments), return_exceptions=True)
                reasons[error.peer_id] = error.reason
                skipped.add(error.peer_id)
                if error.retryable:
                    policy.avoid(error.peer_id)
                logger.warning(f"peer {error.peer_id} refused or failed ({error.reason}); trying another route")

    async def _open_segment(self, hop: Hop) -> _Segment:
        stream = _PeerStream(self.client, hop)
        try:
            await stream.open(INFERENCE_RPC)
        except Exception as error:  # unreachable: same treatment as a refusal
            raise PeerError(hop.peer_id, f"unreachable ({type(error).__name__}: {error})", retryable=True) from None
        try:
            stream.send(OpenSession(model=self.identity.name, fingerprint=self.identity.fingerprint,
                                    start=hop.start, end=hop.end, max_length=self.max_length,
                                    batch_size=self.batch_size))
            opened = await stream.receive(self.client.options.step_timeout)
            if not isinstance(opened, SessionOpened):
                raise PeerError(hop.peer_id, f"answered {opened.type_name} to open")
        except BaseException:
            await stream.close()
            raise
        return _Segment(hop, stream)

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
        new_tokens = hidden_states.shape[1]
        carried = hidden_states  # the new positions, or every position after a replayed hop
        index = 0
        while index < len(self._segments):
            segment = self._segments[index]
            try:
                carried = await self._run_segment(segment, carried, new_tokens)
                index += 1
            except PeerError as error:
                await self._replace(index, error)
        return carried[:, -new_tokens:]

    async def _run_segment(self, segment: _Segment, carried: torch.Tensor, new_tokens: int) -> torch.Tensor:
        if segment.fresh and self.position > 0:  # replay: the whole history, then the new positions
            if carried.shape[1] != self.position + new_tokens:
                carried = torch.cat([*segment.inputs, carried[:, -new_tokens:]], dim=1)
            position, inputs = 0, carried
        else:
            position, inputs = self.position, carried[:, -new_tokens:]
        segment.stream.send(Step(step_id=self._step_id, position=position, hidden_states=inputs))
        reply = await segment.stream.receive(self.client.step_timeout(inputs))
        if not isinstance(reply, StepResult) or reply.step_id != self._step_id:
            raise PeerError(segment.hop.peer_id, f"answered {reply.type_name} out of turn")
        if position == 0:
            segment.inputs = [inputs]
        else:
            segment.inputs.append(inputs)
        segment.fresh = False
        return reply.hidden_states

    async def _replace(self, index: int, error: PeerError) -> None:
        failed = self._segments[index]
        logger.warning(f"peer {failed.hop.peer_id} failed at position {self.position} ({error.reason}); "
                       f"replacing blocks {failed.hop.start}:{failed.hop.end}")
        self.failovers.append((failed.hop.peer_id, error.reason))
        self.client.retry.avoid(failed.hop.peer_id)
        await failed.stream.close()
        await self.view.refresh()
        replacements = await self._connect(failed.hop.start, failed.hop.end, failure=error)
        replacements[0].inputs = failed.inputs  # the first replacement replays what the failed hop saw
        self._segments[index : index + 1] = replacements

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.client.run(self._close(), timeout=30)

    async def _close(self) -> None:
        segments, self._segments = self._segments, []
        await asyncio.gather(*(segment.stream.close() for segment in segments), return_exceptions=True)

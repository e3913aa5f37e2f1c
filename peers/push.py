"""Server-to-server push: a peer sends a step's output straight to the next hop of the route.

The client names the hops after the first in its step (`Step.push_to`); each peer, once it
has computed the step, sends its output to the next hop's session as that session's next step
and hands on the rest of the list. The client then sends one step per token instead of one per
hop, and no hop waits for the client to relay it (on a distant client, a round trip per hop).

A peer keeps one outbound push stream per session, to the peer after it, opened at the first
push and reopened when the client's route changes. Pushes are fire and forget: whether a
hop got its step shows in that hop's answer to the client, which still gets every hop's output
(it keeps them to replay a route after a failure).
"""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from protocol.messages import PUSH_RPC, Step, to_frames

logger = logging.getLogger(__name__)

PUSH_OPEN_TIMEOUT = 2.0  # seconds to open a stream to the next hop before telling the client to send it itself


class PushStream:
    """Frames out to one session on another peer; what that peer answers (only refusals) is logged."""

    def __init__(self, p2p: P2P, peer_id: str, session_id: str):
        self.p2p, self.peer_id, self.session_id = p2p, peer_id, session_id
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._replies: asyncio.Task | None = None
        self.broken = False  # the stream ended: the next push opens a new one

    async def _requests(self) -> AsyncIterator[runtime_pb2.ExpertRequest]:
        while (frame := await self._outbox.get()) is not None:
            yield runtime_pb2.ExpertRequest(metadata=frame)

    async def open(self) -> None:
        async with asyncio.timeout(PUSH_OPEN_TIMEOUT):
            replies = await self.p2p.iterate_protobuf_handler(
                PeerID.from_base58(self.peer_id), PUSH_RPC, self._requests(), runtime_pb2.ExpertResponse)
        self._replies = asyncio.create_task(self._log_replies(replies))

    async def _log_replies(self, replies) -> None:
        try:
            async for reply in replies:
                logger.warning(f"peer {self.peer_id} refused a push: {reply.metadata[:200]!r}")
        except Exception as error:
            logger.debug(f"push stream to {self.peer_id} ended: {type(error).__name__}: {error}")
        finally:
            self.broken = True

    def send(self, step: Step) -> None:
        for frame in to_frames(step):
            self._outbox.put_nowait(frame)

    def close(self) -> None:
        self._outbox.put_nowait(None)
        if self._replies is not None:
            self._replies.cancel()


class Pusher:
    """A session's pushes: the stream to its current next hop."""

    def __init__(self, p2p: P2P | None):
        self.p2p = p2p
        self._stream: PushStream | None = None

    async def push(self, step: Step, push_to: list[list[str]]) -> str | None:
        """Send `step` (its hidden states are this hop's output) to push_to[0], naming the rest
        as its own hops to push to. None once sent, otherwise why not."""
        peer_id, session_id = push_to[0]
        if self.p2p is None:
            return "this peer does not push"
        stream = self._stream
        if stream is None or stream.broken or (stream.peer_id, stream.session_id) != (peer_id, session_id):
            self.close()
            stream = PushStream(self.p2p, peer_id, session_id)
            try:
                await stream.open()  # a malformed peer id fails here too
            except Exception as error:
                return f"could not reach {peer_id} ({type(error).__name__}: {error})"
            self._stream = stream
        self._stream.send(Step(step_id=step.step_id, position=step.position, hidden_states=step.hidden_states,
                               push_to=push_to[1:] or None, session_id=session_id))
        return None

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

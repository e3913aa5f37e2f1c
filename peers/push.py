"""Server-to-server push: a peer sends a step's output straight to the next hop of the route.

The client names the hops after the first in its step (`Step.push_to`); each peer, once it
has computed the step, sends its output to the next hop's session as that session's next step
and hands on the rest of the list. The client then sends one step per token instead of one per
hop, and no hop waits for the client to relay it (on a distant client, a round trip per hop).

A peer keeps one outbound push stream per next peer, shared by all its sessions. The outputs
of one batch that go to the same next peer leave as one `Pushes` message (4 sessions through
3 peers on 2 cores: one message per session made a hop between peers cost twice a lone
session's). Pushes are fire and forget: whether a hop got its step shows in that hop's answer
to the client, which still gets every hop's output (it keeps them to replay a route after a
failure).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

from protocol.messages import PUSH_RPC, Pushes, Step, to_frames

logger = logging.getLogger(__name__)

PUSH_OPEN_TIMEOUT = 2.0  # seconds to open a stream to the next hop before telling the client to send it itself
IDLE_STREAM_SECONDS = 60.0  # a stream to a peer nothing was pushed to for this long is closed


class PushStream:
    """Frames out to another peer's push RPC; what that peer answers (only refusals) is logged."""

    def __init__(self, p2p: P2P, peer_id: str):
        self.p2p, self.peer_id = p2p, peer_id
        self._outbox: asyncio.Queue = asyncio.Queue()
        self._replies: asyncio.Task | None = None
        self.broken = False  # the stream ended: the next push opens a new one
        self.last_used = time.monotonic()

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

    def send(self, steps: list[Step]) -> None:
        self.last_used = time.monotonic()
        for frame in to_frames(Pushes(steps=tuple(steps))):
            self._outbox.put_nowait(frame)

    def close(self) -> None:
        self._outbox.put_nowait(None)
        if self._replies is not None:
            self._replies.cancel()


class PushHub:
    """The pushes of all sessions of a peer. Those made in one turn of the event loop (a batch's
    sessions resume together when its outputs are ready) are sent together: one message per next
    peer."""

    def __init__(self, p2p: P2P | None):
        self.p2p = p2p
        self._streams: dict[str, PushStream] = {}
        self._pending: dict[str, list[tuple[Step, asyncio.Future]]] = {}
        self._flushing: asyncio.Task | None = None

    async def push(self, step: Step, push_to: list[list[str]]) -> str | None:
        """Send `step` (its hidden states are this hop's output) to push_to[0], naming the rest
        as its own hops to push to. None once sent, otherwise why not."""
        if self.p2p is None:
            return "this peer does not push"
        peer_id, session_id = push_to[0]
        sent = asyncio.get_running_loop().create_future()
        self._pending.setdefault(peer_id, []).append((Step(
            step_id=step.step_id, position=step.position, hidden_states=step.hidden_states,
            push_to=push_to[1:] or None, session_id=session_id), sent))
        if self._flushing is None:
            # after the sessions already woken in this turn have added theirs
            self._flushing = asyncio.create_task(self._flush())
        return await asyncio.shield(sent)  # a cancelled session does not cancel the others' pushes

    async def _flush(self) -> None:
        waiting: list[tuple[Step, asyncio.Future]] = []
        try:
            await asyncio.sleep(0)
            while self._pending:
                peer_id = next(iter(self._pending))
                waiting = self._pending.pop(peer_id)  # pushes made while this one is sent wait for the next
                failure = await self._send(peer_id, [step for step, _ in waiting])
                for _, sent in waiting:
                    if not sent.done():
                        sent.set_result(failure)
        finally:
            self._flushing = None
            for _, sent in waiting + [item for items in self._pending.values() for item in items]:
                if not sent.done():  # only when this task was cancelled
                    sent.set_result("this peer stopped pushing")
            self._pending.clear()

    async def _send(self, peer_id: str, steps: list[Step]) -> str | None:
        stream = self._streams.get(peer_id)
        if stream is None or stream.broken:
            if stream is not None:
                stream.close()
            stream = self._streams[peer_id] = PushStream(self.p2p, peer_id)
            try:
                await stream.open()  # a malformed peer id fails here too
            except Exception as error:
                del self._streams[peer_id]
                return f"could not reach {peer_id} ({type(error).__name__}: {error})"
        stream.send(steps)
        self._close_idle()
        return None

    def _close_idle(self) -> None:
        now = time.monotonic()
        for peer_id, stream in list(self._streams.items()):
            if now - stream.last_used > IDLE_STREAM_SECONDS:
                stream.close()
                del self._streams[peer_id]

    def close(self) -> None:
        for stream in self._streams.values():
            stream.close()
        self._streams.clear()

"""Inference sessions: one open stream per peer on the route, hidden states chained through them.

A step sends only the new positions; each peer keeps the attention cache of its blocks for
this session. One thread handoff per step: the whole chain over the route runs as one
coroutine on the client's event loop.

With a verifier (ClientOptions.verify_fraction > 0), a step's due hops are checked once the
chain has run (swarm.verification says which and how). A peer caught lying is banned and
replaced, and the whole route rolls back to the first position the liar got wrong: peers'
caches are rewritten from there (a step may start below a cache's length), the replacement
replays the history, and only checked answers leave the step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from typing import TYPE_CHECKING, AsyncIterator

import torch
from hivemind.p2p import P2PHandlerError, PeerID
from hivemind.proto import runtime_pb2

from protocol.messages import (INFERENCE_RPC, PUSH_SENT, ErrorReply, FrameJoiner, KeepAlive, Message, OpenSession,
                               SessionOpened, Step, StepResult, to_frames)
from protocol.records import ModelIdentity
from swarm.client import SwarmClient, SwarmView
from swarm.routing import Hop, MissingBlocksError, find_route

if TYPE_CHECKING:
    from swarm.referees import Verifier

logger = logging.getLogger(__name__)

MAX_REPLY_BYTES = 1024**3
KEEPALIVE_SECONDS = 0.1  # how late a pushed step's answer may be before the client checks the peer is there
PUSH_GRACE_SECONDS = 1.0  # how late before the client sends a pushed step to its hop itself


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


class _History:
    """What a hop got (or answered) from position 0, kept as pieces [batch, tokens, hidden]. A
    step appends one in constant time (summing the pieces' lengths at every step made a long
    generation quadratic); the pieces are joined only when a replay or a check reads them."""

    def __init__(self):
        self._parts: list[torch.Tensor] = []
        self.length = 0

    def joined(self) -> torch.Tensor:
        if len(self._parts) > 1:
            self._parts = [torch.cat(self._parts, dim=1)]
        return self._parts[0]

    def cut(self, length: int) -> None:
        """Keep the first `length` positions."""
        if length < self.length:
            self._parts = [self.joined()[:, :length]] if length > 0 else []
            self.length = length

    def append(self, part: torch.Tensor) -> None:
        self._parts.append(part)
        self.length += part.shape[1]


@dataclasses.dataclass
class _Segment:
    """One hop of the route with its open stream and every input it was sent (for replay)."""

    hop: Hop
    stream: _PeerStream
    session_id: str  # the peer's name for this session: where the hop before it pushes its steps
    inputs: _History = dataclasses.field(default_factory=_History)
    fresh: bool = True  # its peer holds no positions yet: the next step replays the history
    # kept only when verifying:
    outputs: _History = dataclasses.field(default_factory=_History)  # its answers, every position from 0
    verified: int = 0  # positions whose answers a check confirmed
    checked: bool = False  # one of its steps was checked already
    due: bool = True  # this step gets checked (a new peer's first step always is)


class InferenceSession:
    """Generation state across the swarm: `step(hidden)` feeds new positions through every hop.

    When a peer on the route fails (error, dropped stream, or silence past the step timeout),
    the session routes around it for exactly the blocks it covered, replays every input those
    blocks have seen into the replacement's fresh cache, and carries on: the output equals an
    uninterrupted run. `route` always shows the current route.
    """

    def __init__(self, client: SwarmClient, view: SwarmView, max_length: int, batch_size: int = 1,
                 verifier: Verifier | None = None):
        self.client, self.view, self.verifier = client, view, verifier
        self.identity: ModelIdentity = view.identity
        self.max_length, self.batch_size = max_length, batch_size
        self.position = 0
        self.token_ids: torch.Tensor | None = None  # tokens whose positions the peers hold (set by generate)
        self._segments: list[_Segment] = []
        self._step_id = 0
        self.closed = False
        self.failovers: list[tuple[str, str]] = []  # (failed peer, reason), for logs and tests
        self.pushed_steps = 0  # steps that went through the whole route peer to peer (for tests and benches)
        self.resent_steps = 0  # pushed steps the client sent to a hop itself, as their answer was late
        # when verifying: (liar, position rolled back to, position of the session when it was caught)
        self.rollbacks: list[tuple[str, int, int]] = []

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
        # a peer that joined since the last background ping would be routed by a guessed round trip
        await self.view.measure_rtts(unmeasured_only=True)
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
        return _Segment(hop, stream, opened.session_id)

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
        if self.verifier is not None:
            for segment in self._segments:
                segment.due = self.verifier.due(segment.checked)
        if (self.client.options.push and len(self._segments) > 1
                and (self.position == 0 or not any(segment.fresh for segment in self._segments))):  # no replay due
            outputs = await self._run_pushed(self.position, hidden_states)
        else:
            outputs = await self._run_chain(self.position, hidden_states)
        if self.verifier is not None:
            outputs = await self._verify(outputs)
        return outputs[:, -new_tokens:]

    async def _run_pushed(self, position: int, hidden_states: torch.Tensor) -> torch.Tensor:
        """The step sent to the first hop only, each peer pushing its output to the next (see
        peers.push); every hop's output still comes back, for replays. From a hop that fails, or
        one whose push did not go out, the client carries the step on itself (`_run_chain`)."""
        count = hidden_states.shape[1]
        push_to = [[segment.hop.peer_id, segment.session_id] for segment in self._segments[1:]]
        self._segments[0].stream.send(Step(step_id=self._step_id, position=position, hidden_states=hidden_states,
                                           push_to=push_to))
        carried = hidden_states
        for index, segment in enumerate(self._segments):
            try:
                reply = await self._receive_result(segment, carried, pushed=index > 0, position=position,
                                                   push_to=push_to[index:] or None)
            except PeerError as error:
                await self._replace(index, error)
                return await self._run_chain(position, carried, start=index)
            self._record(segment, position, carried, reply)
            carried = reply.hidden_states
            if index + 1 < len(self._segments) and reply.push_status != PUSH_SENT:
                logger.warning(f"peer {segment.hop.peer_id} did not push to the next hop "
                               f"({reply.push_status or 'it does not push'}); sending it from here")
                return await self._run_chain(position, carried, start=index + 1)
        self.pushed_steps += 1
        return carried[:, -count:]

    async def _run_chain(self, position: int, hidden_states: torch.Tensor, start: int = 0) -> torch.Tensor:
        """Positions position.. of hop `start`'s inputs through it and every later hop; their outputs."""
        count = hidden_states.shape[1]
        carried = hidden_states  # the new positions, or every position after a replayed hop
        index = start
        while index < len(self._segments):
            segment = self._segments[index]
            try:
                carried = await self._run_segment(segment, carried, position, count)
                index += 1
            except PeerError as error:
                await self._replace(index, error)
        return carried[:, -count:]

    async def _run_segment(self, segment: _Segment, carried: torch.Tensor, position: int,
                           count: int) -> torch.Tensor:
        if segment.fresh and position > 0:  # replay: the whole history, then the new positions
            if carried.shape[1] != position + count:
                carried = torch.cat([segment.inputs.joined()[:, :position], carried[:, -count:]], dim=1)
            at, inputs = 0, carried
        else:
            at, inputs = position, carried[:, -count:]  # below the peer's cache length: it rewrites from there
        segment.stream.send(Step(step_id=self._step_id, position=at, hidden_states=inputs))
        reply = await self._receive_result(segment, inputs)
        self._record(segment, at, inputs, reply)
        return reply.hidden_states

    async def _receive_result(self, segment: _Segment, inputs: torch.Tensor, pushed: bool = False,
                              position: int = 0, push_to: list[list[str]] | None = None) -> StepResult:
        """This step's result from the segment's peer. Results of earlier steps are skipped: a
        peer may have computed a step twice (see below).

        `pushed`: the step (`inputs` at `position`, to push on to `push_to`) reached the peer from
        the hop before it. The client wrote nothing to this stream, and a read alone does not
        notice a peer that died (its stream is not closed until a write fails): while the answer
        is late, a keep-alive every KEEPALIVE_SECONDS. Past PUSH_GRACE_SECONDS the client sends
        the step itself: a push lost on the way (the hop before said it was sent just as its
        stream to this peer broke) then costs a moment, not a failover of a peer that is alive.
        A peer that gets both runs the first and drops the pushed one if it comes second."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        while True:
            receiving = asyncio.ensure_future(segment.stream.receive(self.client.step_timeout(inputs)))
            try:
                while pushed and not receiving.done():
                    await asyncio.wait([receiving], timeout=KEEPALIVE_SECONDS)
                    if receiving.done():
                        break
                    if loop.time() - started < PUSH_GRACE_SECONDS:
                        segment.stream.send(KeepAlive())
                    else:
                        logger.warning(f"no answer from {segment.hop.peer_id} {PUSH_GRACE_SECONDS:g} s after its "
                                       f"step was pushed to it; sending the step from here")
                        segment.stream.send(Step(step_id=self._step_id, position=position, hidden_states=inputs,
                                                 push_to=push_to))
                        self.resent_steps += 1
                        pushed = False
                reply = await receiving
            finally:
                receiving.cancel()  # only if this step was abandoned midway
            if isinstance(reply, StepResult) and reply.step_id < self._step_id:
                continue
            if not isinstance(reply, StepResult) or reply.step_id != self._step_id:
                raise PeerError(segment.hop.peer_id, f"answered {reply.type_name} out of turn")
            return reply

    def _record(self, segment: _Segment, at: int, inputs: torch.Tensor, reply: StepResult) -> None:
        """The segment got `inputs` from position `at` and answered `reply`: its history for replays."""
        segment.inputs.cut(at)
        segment.inputs.append(inputs)
        if self.verifier is not None:
            segment.outputs.cut(at)
            segment.outputs.append(reply.hidden_states)
            segment.verified = min(segment.verified, at)
        segment.fresh = False

    async def _verify(self, outputs: torch.Tensor) -> torch.Tensor:
        """Check the due hops; while one lied, replace it, roll back and run the chain again
        (which leaves the due hops' rewritten positions to be checked again)."""
        while due := [segment for segment in self._segments
                      if segment.due and not segment.fresh and segment.verified < segment.outputs.length]:
            verdicts = await asyncio.gather(*(
                self.verifier.check(segment.hop, segment.inputs.joined(),
                                    segment.outputs.joined()[:, segment.verified :], segment.verified)
                for segment in due))
            liars: set[str] = set()
            wrong_from: dict[int, int] = {}  # id(segment) -> first position it got wrong
            for segment, verdict in zip(due, verdicts):
                segment.checked = True
                liars |= verdict.liars
                if verdict.first_mismatch is None:
                    segment.verified = segment.outputs.length
                else:
                    wrong_from[id(segment)] = segment.verified + verdict.first_mismatch
            caught = [segment for segment in self._segments if segment.hop.peer_id in liars]
            if caught:  # one caught as a referee only is trusted up to its last check
                position = min(wrong_from.get(id(segment), segment.verified) for segment in caught)
                outputs = await self._roll_back(position, liars, outputs)
        return outputs

    async def _roll_back(self, position: int, liars: set[str], outputs: torch.Tensor) -> torch.Tensor:
        """Replace the liars on the route, return every hop to `position` and run the chain
        again from there; the outputs of this step's positions."""
        first_inputs = self._segments[0].inputs.joined()
        end = first_inputs.shape[1]
        if position < self.position:  # tokens already handed out came from a lie that no check had seen
            logger.warning(f"a peer lied at position {position}, before a check caught it (the session is at "
                           f"{self.position}): tokens after it were chosen from wrong hidden states; "
                           f"verify_fraction=1 checks every step")
        for index in reversed(range(len(self._segments))):
            peer_id = self._segments[index].hop.peer_id
            if peer_id in liars:
                self.rollbacks.append((peer_id, position, self.position))
                await self._replace(index, PeerError(peer_id, f"returned wrong hidden states from position "
                                                              f"{position}"))
        if position >= end:  # nothing this step handed out is wrong: the replacements replay at the next step
            return outputs
        for segment in self._segments:
            segment.inputs.cut(position)
            segment.outputs.cut(position)
            segment.verified = min(segment.verified, position)
        return await self._run_chain(position, first_inputs[:, position:])

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

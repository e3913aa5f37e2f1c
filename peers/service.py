"""The RPCs a peer answers: streaming inference sessions, one-shot forwards and backwards.

Each inference session is one bidirectional stream: an `OpenSession` message, then `Step`s,
each answered by a `StepResult`. The session's attention cache lives as long as the stream.
Steps may also come from the peer before this one on the client's route, pushed over
PUSH_RPC into the session (see peers.push); their results still go to the client.
Every refusal or failure is answered with an `ErrorReply` naming the cause; the peer goes on
serving everyone else.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator

import torch
from hivemind.p2p import P2PContext
from hivemind.proto import runtime_pb2

from peers.batching import StepBatcher
from peers.blocks import AttentionCache, BlockSpan
from peers.push import PushHub
from protocol import PROTOCOL_VERSION
from protocol.messages import (BACKWARD_RPC, FORWARD_RPC, INFERENCE_RPC, PROBE_RPC, PUSH_RPC, PUSH_SENT, Backward,
                               BackwardResult, ErrorReply, Forward, ForwardResult, FrameJoiner, KeepAlive, Message,
                               OpenSession, Probe, ProbeResult, ProtocolError, Pushes, SessionOpened, Step,
                               StepResult, to_frames)
from protocol.records import ModelIdentity

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ServingLimits:
    max_sessions: int = 64
    max_session_length: int = 8192  # tokens per session
    cache_bytes: int = 2 * 1024**3  # attention cache memory across all sessions
    max_message_bytes: int = 64 * 1024**2  # one joined request
    session_idle_timeout: float = 300.0  # a session whose client sends nothing for this long is freed
    compute_delay: float = 0.0  # test flag: seconds added to every computation, to play a slow peer
    link_delay: float = 0.0  # bench flag: seconds before a session's step is read and its answer sent (a far peer)
    corrupt_outputs: float = 0.0  # test flag: noise this size (x each position's RMS) on outputs, to play a liar
    corrupt_after: int = 0  # test flag: with corrupt_outputs, this many outputs are honest first
    busy_threads: int | None = dataclasses.field(  # torch threads while several sessions generate
        default_factory=lambda: 1 if (os.cpu_count() or 1) <= 2 else None)  # None: as many as when idle
    batch_wait: float | None = None  # seconds a step may wait for other sessions' steps (None: twice a step's time)


class BlockService:
    def __init__(self, identity: ModelIdentity, blocks: BlockSpan, limits: ServingLimits, compute: ThreadPoolExecutor):
        self.identity, self.blocks, self.limits = identity, blocks, limits
        self.compute = compute  # the peer's single torch thread (see peers.server.Peer)
        self.sessions: dict[str, _Session] = {}
        self.pushes = PushHub(None)  # set by register: pushes to the next hop go out through its P2P
        self.cache_bytes_used = 0
        self.batcher = StepBatcher(blocks, compute, after_compute=self._delay, busy_threads=limits.busy_threads,
                                    gather_window=limits.batch_wait)
        self.draining = False  # refuse new sessions: the peer is leaving or moving
        self.outputs_served = 0  # step and forward answers, counted for the corrupt_after test flag
        if limits.corrupt_outputs:
            logger.warning(f"test flag: this peer returns wrong hidden states (noise x{limits.corrupt_outputs}) "
                           f"after {limits.corrupt_after} honest answers")

    def replace_blocks(self, blocks: BlockSpan) -> None:
        """Serve another span from now on; sessions still open on the old one fail at their next
        step (their clients replay elsewhere)."""
        self.blocks = blocks
        self.batcher = StepBatcher(blocks, self.compute, after_compute=self._delay,
                                   busy_threads=self.limits.busy_threads, gather_window=self.limits.batch_wait)

    @property
    def cache_tokens_left(self) -> int:
        per_token = self.blocks.cache_bytes_per_token(self.blocks.start, self.blocks.end)
        return max(0, (self.limits.cache_bytes - self.cache_bytes_used) // per_token)

    async def register(self, p2p) -> None:
        self.pushes = PushHub(p2p)
        await p2p.add_protobuf_handler(INFERENCE_RPC, self.rpc_inference, runtime_pb2.ExpertRequest,
                                       stream_input=True, stream_output=True)
        await p2p.add_protobuf_handler(FORWARD_RPC, self.rpc_forward, runtime_pb2.ExpertRequest,
                                       stream_input=True, stream_output=True)
        await p2p.add_protobuf_handler(BACKWARD_RPC, self.rpc_backward, runtime_pb2.ExpertRequest,
                                       stream_input=True, stream_output=True)
        await p2p.add_protobuf_handler(PUSH_RPC, self.rpc_push, runtime_pb2.ExpertRequest,
                                       stream_input=True, stream_output=True)
        await p2p.add_protobuf_handler(PROBE_RPC, self.rpc_probe, runtime_pb2.ExpertRequest,
                                       stream_input=True, stream_output=True)

    def _check_span(self, model: str, fingerprint: str, start: int, end: int, version: int) -> None:
        if version != PROTOCOL_VERSION:
            raise ProtocolError(f"protocol version {version} is not served here (this peer speaks {PROTOCOL_VERSION})")
        if (model, fingerprint) != (self.identity.name, self.identity.fingerprint):
            raise ProtocolError(f"this peer serves {self.identity.name}/{self.identity.fingerprint}, "
                                f"not {model}/{fingerprint}")
        if not self.blocks.start <= start < end <= self.blocks.end:
            raise ProtocolError(f"blocks {start}:{end} are not all served here (this peer serves "
                                f"{self.blocks.start}:{self.blocks.end})")

    def _check_hidden(self, hidden: torch.Tensor, batch_size: int | None = None) -> None:
        if hidden.dim() != 3 or hidden.shape[-1] != self.blocks.hidden_size:
            raise ProtocolError(f"hidden states must be [batch, tokens, {self.blocks.hidden_size}], "
                                f"got {list(hidden.shape)}")
        if hidden.dtype != self.blocks.dtype:
            raise ProtocolError(f"hidden states must be {self.blocks.dtype}, got {hidden.dtype}")
        if hidden.shape[1] == 0 or (batch_size is not None and hidden.shape[0] != batch_size):
            raise ProtocolError(f"hidden states of shape {list(hidden.shape)} do not fit the session "
                                f"(batch size {batch_size}, at least one token)")

    async def _run(self, *args, **kwargs) -> torch.Tensor:
        return await asyncio.get_running_loop().run_in_executor(self.compute, lambda: self.compute_now(*args, **kwargs))

    def compute_now(self, *args, **kwargs) -> torch.Tensor:
        """Runs on the compute thread."""
        output = self.blocks(*args, **kwargs)
        self._delay()
        return output

    def _delay(self) -> None:
        if self.limits.compute_delay:
            time.sleep(self.limits.compute_delay)

    def _answer(self, output: torch.Tensor) -> torch.Tensor:
        """The hidden states sent back: the computed ones, unless the corrupt_outputs test flag
        makes this peer a liar (a verifying client must catch it)."""
        self.outputs_served += 1
        if not self.limits.corrupt_outputs or self.outputs_served <= self.limits.corrupt_after:
            return output
        scale = output.pow(2).mean(dim=-1, keepdim=True).sqrt() * self.limits.corrupt_outputs
        return output + scale * torch.randn_like(output)

    async def rpc_inference(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                            context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        session_id, reader = None, None
        try:
            messages = _messages(requests, self.limits.max_message_bytes)
            opening = await anext(messages, None)
            if not isinstance(opening, OpenSession):
                raise ProtocolError("an inference stream must start with an open message")
            self._check_span(opening.model, opening.fingerprint, opening.start, opening.end, opening.protocol_version)
            session = _Session(await self._open_cache(opening))
            blocks = self.blocks
            session_id = secrets.token_hex(16)  # also what lets another peer push steps into it: unguessable
            self.sessions[session_id] = session
            logger.info(f"session {session_id} opened by {context.remote_id}: blocks {opening.start}:{opening.end}, "
                        f"max_length {opening.max_length} ({len(self.sessions)} open)")
            # the client's steps and those other peers push in, in one queue
            reader = asyncio.create_task(_read_client(messages, requests, session.inbox))
            for frame in _response_frames(SessionOpened(session_id=session_id, max_length=opening.max_length)):
                yield frame
            while True:
                try:
                    item = await asyncio.wait_for(session.inbox.get(), self.limits.session_idle_timeout)
                except asyncio.TimeoutError:
                    raise ProtocolError(f"session idle for {self.limits.session_idle_timeout:.0f} s: "
                                        f"closed to free its cache") from None
                if item is None:
                    break
                result = await self._serve(session, opening, blocks, item)
                if result is not None:
                    for frame in _response_frames(result):
                        yield frame
        except ProtocolError as error:
            logger.warning(f"refused a request from {context.remote_id}: {error}")
            for frame in _response_frames(ErrorReply(message=str(error), retryable=error.retryable)):
                yield frame
            if reader is None:
                await _linger(requests)
            else:  # the reader goes on reading (and dropping) what the client still sends, as _linger does
                await _finish(reader)
        except Exception as error:
            logger.exception(f"inference failed for {context.remote_id}")
            for frame in _response_frames(ErrorReply(message=f"peer failed: {type(error).__name__}: {error}",
                                                     retryable=True)):
                yield frame
        finally:
            if reader is not None:
                reader.cancel()
            if session_id is not None:
                session = self.sessions.pop(session_id)
                self.batcher.forget(session.cache)
                self.cache_bytes_used -= session.cache.nbytes
                logger.info(f"session {session_id} closed ({len(self.sessions)} open)")

    async def rpc_push(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                       context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        """Steps another peer pushes into sessions of this one (see peers.push). Nothing is
        answered but refusals: the result of a pushed step goes to the session's client."""
        try:
            async for message in _messages(requests, self.limits.max_message_bytes):
                steps = message.steps if isinstance(message, Pushes) else (message,)
                if not all(isinstance(step, Step) and step.session_id is not None for step in steps):
                    raise ProtocolError("a push stream carries steps that name a session")
                for step in steps:  # a batch's steps reach their sessions in one turn: batched here too
                    session = self.sessions.get(step.session_id)
                    if session is None:  # closed meanwhile; its client learns it from its own stream
                        logger.debug(f"{context.remote_id} pushed a step into an unknown session")
                        continue
                    session.inbox.put_nowait(_Pushed(step))
        except ProtocolError as error:
            logger.warning(f"refused a push from {context.remote_id}: {error}")
            for frame in _response_frames(ErrorReply(message=str(error))):
                yield frame

    async def _serve(self, session: _Session, opening: OpenSession, blocks: BlockSpan, item) -> StepResult | None:
        """One item of a session's queue: a step from its client, or pushed by the peer before this
        one, is run, pushed on to the next hop if the step says so, and answered; None: nothing
        to answer."""
        if isinstance(item, Exception):
            raise item
        if isinstance(item, KeepAlive):  # the client checks that this peer is still there
            return None
        if self.limits.link_delay:  # as if the step had crossed a network
            await asyncio.sleep(self.limits.link_delay)
        if isinstance(item, _Pushed):
            if item.step.step_id <= session.last_step_id:  # the client sent this one itself meanwhile
                return None
            step = item.step
        elif not isinstance(item, Step):
            raise ProtocolError(f"expected a step message, got {item.type_name}")
        elif item.session_id is not None:
            raise ProtocolError("a client's step names no session (session_id is for pushes between peers)")
        else:
            step = item
        if self.blocks is not blocks:
            raise ProtocolError(f"this peer moved to blocks {self.blocks.start}:{self.blocks.end}; "
                                f"continue elsewhere", retryable=True)
        self._check_hidden(step.hidden_states, opening.batch_size)
        cache = session.cache
        if step.position > cache.length or step.position + step.hidden_states.shape[1] > cache.max_length:
            raise ProtocolError(f"step at position {step.position} with {step.hidden_states.shape[1]} tokens "
                                f"does not fit: the session holds {cache.length} of max {cache.max_length}")
        session.last_step_id = max(session.last_step_id, step.step_id)
        output = self._answer(await self.batcher.submit(step.hidden_states, opening.start, opening.end,
                                                        step.position, cache))
        push_status = None
        if step.push_to:
            failure = await self.pushes.push(Step(step_id=step.step_id, position=step.position,
                                                  hidden_states=output), step.push_to)
            push_status = PUSH_SENT if failure is None else failure
            if failure is not None:
                logger.warning(f"a session's push failed: {failure}")
            else:  # the push, which the next hop waits for, goes out before the answer to the client, which
                # only keeps it for replays (4 clients through 3 peers on 2 cores: a hop took 3.5 instead of 4.5 ms)
                await asyncio.sleep(0)
        if self.limits.link_delay:  # as if the answer had to cross a network to the client
            await asyncio.sleep(self.limits.link_delay)
        return StepResult(step_id=step.step_id, hidden_states=output, push_status=push_status)

    async def _open_cache(self, opening: OpenSession) -> AttentionCache:
        if self.draining:
            raise ProtocolError("peer is draining: it takes no new sessions", retryable=True)
        if len(self.sessions) >= self.limits.max_sessions:
            raise ProtocolError(f"peer is full: {len(self.sessions)} sessions open (limit {self.limits.max_sessions})")
        if not 0 < opening.max_length <= self.limits.max_session_length:
            raise ProtocolError(f"max_length {opening.max_length} is outside 1..{self.limits.max_session_length}")
        if not 0 < opening.batch_size <= 64:
            raise ProtocolError(f"batch size {opening.batch_size} is outside 1..64")
        needed = opening.batch_size * opening.max_length * self.blocks.cache_bytes_per_token(opening.start, opening.end)
        if self.cache_bytes_used + needed > self.limits.cache_bytes:
            raise ProtocolError(f"not enough attention cache memory left for max_length {opening.max_length}")
        self.cache_bytes_used += needed  # reserved before the await: concurrent opens see it
        try:
            # allocated on the compute thread: torch on a second thread costs the peer half its speed
            return await asyncio.get_running_loop().run_in_executor(
                self.compute, self.blocks.new_cache, opening.start, opening.end, opening.batch_size, opening.max_length)
        except BaseException:
            self.cache_bytes_used -= needed
            raise

    async def rpc_forward(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                          context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async def forward(request: Forward) -> Message:
            output = await self._run(request.hidden_states, request.start, request.end, prompts=request.prompts)
            return ForwardResult(hidden_states=self._answer(output))

        for frame in await self._one_shot(requests, context, Forward, forward):
            yield frame
        await _linger(requests)  # returns as soon as the client closes: its normal last move

    async def rpc_backward(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                           context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        async def backward(request: Backward) -> Message:
            grad_inputs, grad_prompts = await asyncio.get_running_loop().run_in_executor(
                self.compute, self.blocks.backward, request.hidden_states, request.grad_outputs, request.start,
                request.end, request.prompts)
            return BackwardResult(grad_inputs=grad_inputs, grad_prompts=grad_prompts)

        for frame in await self._one_shot(requests, context, Backward, backward):
            yield frame
        await _linger(requests)

    async def rpc_probe(self, requests: AsyncIterator[runtime_pb2.ExpertRequest],
                        context: P2PContext) -> AsyncIterator[runtime_pb2.ExpertResponse]:
        try:
            request = await anext(_messages(requests, self.limits.max_message_bytes), None)
            if not isinstance(request, Probe) or not isinstance(request.payload, bytes):
                raise ProtocolError("expected a probe message")
            reply: Message = ProbeResult(received=len(request.payload))
        except ProtocolError as error:
            reply = ErrorReply(message=str(error))
        for frame in _response_frames(reply):
            yield frame

    async def _one_shot(self, requests, context: P2PContext, kind: type, handle) -> list[runtime_pb2.ExpertResponse]:
        """One request message in, one reply out; checks shared by forward and backward."""
        try:
            request = await anext(_messages(requests, self.limits.max_message_bytes), None)
            if not isinstance(request, kind):
                raise ProtocolError(f"expected a {kind.type_name} message")
            self._check_span(request.model, request.fingerprint, request.start, request.end, request.protocol_version)
            self._check_hidden(request.hidden_states)
            if request.hidden_states.shape[1] > self.limits.max_session_length:
                raise ProtocolError(f"{request.hidden_states.shape[1]} tokens exceed the limit of "
                                    f"{self.limits.max_session_length}")
            reply = await handle(request)
        except ProtocolError as error:
            logger.warning(f"refused a {kind.type_name} from {context.remote_id}: {error}")
            reply = ErrorReply(message=str(error))
        except Exception as error:
            logger.exception(f"{kind.type_name} failed for {context.remote_id}")
            reply = ErrorReply(message=f"peer failed: {type(error).__name__}: {error}", retryable=True)
        return _response_frames(reply)


@dataclasses.dataclass(frozen=True)
class _Pushed:
    """A step another peer pushed. The client may also have sent the same step itself (when the
    push seemed to fail), so one whose id the session has passed is dropped."""

    step: Step


@dataclasses.dataclass(eq=False)
class _Session:
    cache: AttentionCache
    inbox: asyncio.Queue = dataclasses.field(default_factory=asyncio.Queue)  # steps; None at the client's end
    last_step_id: int = -1


async def _read_client(messages: AsyncIterator[Message], requests, inbox: asyncio.Queue) -> None:
    """The client's messages into the session's queue, then None when it closes. Unreadable input
    goes into the queue as the error, and what the client still sends is read and dropped."""
    try:
        async for message in messages:
            inbox.put_nowait(message)
        inbox.put_nowait(None)
    except ProtocolError as error:
        inbox.put_nowait(error)
        await _linger(requests)
    except Exception as error:  # the stream broke: the client is gone
        logger.debug(f"client stream ended: {type(error).__name__}: {error}")
        inbox.put_nowait(None)


async def _finish(reader: asyncio.Task, seconds: float = 2.0) -> None:
    try:
        async with asyncio.timeout(seconds):
            await reader
    except BaseException:  # noqa: BLE001 - whatever ends it, the session is over
        pass


async def _linger(requests: AsyncIterator[runtime_pb2.ExpertRequest], seconds: float = 2.0) -> None:
    """After refusing, read (and drop) what the client still sends until it closes, for a moment:
    closing at once makes the client's next write fail with a broken pipe, which can reach it
    before our error reply does, and it would see "connection lost" instead of the reason."""
    try:
        async with asyncio.timeout(seconds):
            async for _ in requests:
                pass
    except Exception:  # the stream broke or the client lingers: either way we are done
        pass


async def _messages(requests: AsyncIterator[runtime_pb2.ExpertRequest], max_bytes: int) -> AsyncIterator[Message]:
    joiner = FrameJoiner(max_bytes)
    async for request in requests:
        message = joiner.push(request.metadata)
        if message is not None:
            yield message


def _response_frames(message: Message) -> list[runtime_pb2.ExpertResponse]:
    return [runtime_pb2.ExpertResponse(metadata=frame) for frame in to_frames(message)]

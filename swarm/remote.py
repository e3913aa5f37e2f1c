"""Whole sequences through the peers, forward and backward: the path of `model(...)` and of
`loss.backward()`. Peers keep no state between these calls; a hop that fails is retried on
another route for the same blocks (the client's retry policy).

Autograd: `RemoteBlocks.apply(hidden, model)` runs the forward hop by hop, remembering each
hop's inputs; its backward sends each hop its inputs and output gradients in reverse order
and gets the input gradients back (the peer recomputes its forward with autograd on).
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

import torch

from protocol.messages import (BACKWARD_RPC, FORWARD_RPC, Backward, BackwardResult, Forward, ForwardResult, Message)
from swarm.client import SwarmClient, SwarmView
from swarm.routing import Hop, MissingBlocksError, find_route
from swarm.session import PeerError, _PeerStream

if TYPE_CHECKING:
    from swarm.model import DistributedModelForCausalLM

logger = logging.getLogger(__name__)

Trace = list[tuple[Hop, torch.Tensor]]  # each hop and the hidden states it was given


async def _call(client: SwarmClient, hop: Hop, rpc: str, request: Message, timeout_tensor: torch.Tensor) -> Message:
    stream = _PeerStream(client, hop)
    try:
        await stream.open(rpc)
    except Exception as error:
        raise PeerError(hop.peer_id, f"unreachable ({type(error).__name__}: {error})", retryable=True) from None
    try:
        stream.send(request)
        return await stream.receive(client.step_timeout(timeout_tensor))
    finally:
        await stream.close()


async def _forward_hop(client: SwarmClient, view: SwarmView, hop: Hop, hidden_states: torch.Tensor) -> torch.Tensor:
    identity = view.identity
    reply = await _call(client, hop, FORWARD_RPC, Forward(model=identity.name, fingerprint=identity.fingerprint,
                                                          start=hop.start, end=hop.end, hidden_states=hidden_states),
                        hidden_states)
    if not isinstance(reply, ForwardResult):
        raise PeerError(hop.peer_id, f"answered {reply.type_name} to forward")
    return reply.hidden_states


async def _backward_hop(client: SwarmClient, view: SwarmView, hop: Hop, hidden_states: torch.Tensor,
                        grad_outputs: torch.Tensor) -> torch.Tensor:
    identity = view.identity
    request = Backward(model=identity.name, fingerprint=identity.fingerprint, start=hop.start, end=hop.end,
                       hidden_states=hidden_states, grad_outputs=grad_outputs)
    reply = await _call(client, hop, BACKWARD_RPC, request, hidden_states)
    if not isinstance(reply, BackwardResult):
        raise PeerError(hop.peer_id, f"answered {reply.type_name} to backward")
    return reply.grad_inputs


async def _with_retries(client: SwarmClient, view: SwarmView, attempt):
    """Run `attempt()` until it succeeds, avoiding failed peers and backing off; the last error
    is raised once the retry policy gives up."""
    delays = client.retry.delays()
    while True:
        try:
            return await attempt()
        except PeerError as error:
            logger.warning(f"{error}; retrying on another route")
            client.retry.avoid(error.peer_id)
            last_error: Exception = error
        except MissingBlocksError as error:
            last_error = error
        delay = next(delays, None)
        if delay is None:
            raise last_error
        await asyncio.sleep(delay)
        await view.refresh()


def _route(client: SwarmClient, view: SwarmView, start: int, end: int | None = None) -> list[Hop]:
    return find_route(view.records, view.num_blocks, start, end, avoid=client.retry.avoided(), rtts=view.rtts,
                      mode=client.options.route_mode)


async def forward_through(client: SwarmClient, view: SwarmView, hidden_states: torch.Tensor,
                          trace: Trace | None = None) -> torch.Tensor:
    """Whole sequences through every block; with `trace`, record each hop and its inputs."""
    if not view.records:
        await view.wait_for_coverage(client.options.coverage_timeout)
    block = 0
    while block < view.num_blocks:
        async def attempt():
            hop = _route(client, view, block)[0]
            return hop, await _forward_hop(client, view, hop, hidden_states)

        hop, output = await _with_retries(client, view, attempt)
        if trace is not None:
            trace.append((hop, hidden_states))
        hidden_states, block = output, hop.end
    return hidden_states


async def backward_through(client: SwarmClient, view: SwarmView, trace: Trace, grad_outputs: torch.Tensor
                           ) -> torch.Tensor:
    """Input gradients of the whole route, hop by hop in reverse. A failed hop's blocks are
    redone on a new route: forward through its hops (to get their inputs), then backward."""
    for hop, inputs in reversed(trace):
        async def attempt(hop=hop, inputs=inputs, grad_outputs=grad_outputs):
            if hop.peer_id in client.retry.avoided():
                raise PeerError(hop.peer_id, "failed earlier", retryable=True)
            return await _backward_hop(client, view, hop, inputs, grad_outputs)

        async def reroute(hop=hop, inputs=inputs, grad_outputs=grad_outputs):
            hops, hop_inputs = _route(client, view, hop.start, hop.end), [inputs]
            for replacement in hops[:-1]:
                hop_inputs.append(await _forward_hop(client, view, replacement, hop_inputs[-1]))
            grad = grad_outputs
            for replacement, replacement_inputs in zip(reversed(hops), reversed(hop_inputs)):
                grad = await _backward_hop(client, view, replacement, replacement_inputs, grad)
            return grad

        try:
            grad_outputs = await attempt()
        except (PeerError, MissingBlocksError) as error:
            if isinstance(error, PeerError):
                client.retry.avoid(error.peer_id)
            logger.warning(f"backward through blocks {hop.start}:{hop.end} failed ({error}); rerouting")
            grad_outputs = await _with_retries(client, view, reroute)
    return grad_outputs


class RemoteBlocks(torch.autograd.Function):
    """hidden states -> every block on the peers, differentiable with respect to the hidden states."""

    @staticmethod
    def forward(ctx, hidden_states: torch.Tensor, model: DistributedModelForCausalLM) -> torch.Tensor:
        trace: Trace = []
        output = model.client.run(forward_through(model.client, model.view, hidden_states.detach(), trace))
        ctx.model, ctx.trace = model, trace
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        model = ctx.model
        grad = model.client.run(backward_through(model.client, model.view, ctx.trace, grad_output.contiguous()))
        return grad, None

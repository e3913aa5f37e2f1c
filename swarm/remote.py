"""Whole sequences through the peers, forward and backward: the path of `model(...)` and of
`loss.backward()`. Peers keep no state between these calls; a hop that fails is retried on
another route for the same blocks (the client's retry policy).

Autograd: `RemoteBlocks.apply(hidden, prompts, model)` runs the forward hop by hop, remembering
each hop's inputs; its backward sends each hop its inputs and output gradients in reverse order
and gets the input gradients back (the peer recomputes its forward with autograd on).

Deep prompts (`prompts`, [num_blocks, prompt tokens, hidden], or None) are sliced per hop: a hop
over blocks a:b gets prompts[a:b], adds prompts[i - a] to the first positions before block i,
and on backward returns their gradient too, which lands in grad[a:b]. A hop redone on another
route is sliced by the spans of its replacements, so the gradient comes out the same.
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


def _hop_prompts(prompts: torch.Tensor | None, hop: Hop, hidden_states: torch.Tensor) -> torch.Tensor | None:
    """The hop's slice of the deep prompts, in the dtype of the hidden states (as the peer needs)."""
    return None if prompts is None else prompts[hop.start : hop.end].detach().to(hidden_states.dtype)


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


async def _forward_hop(client: SwarmClient, view: SwarmView, hop: Hop, hidden_states: torch.Tensor,
                       prompts: torch.Tensor | None) -> torch.Tensor:
    identity = view.identity
    request = Forward(model=identity.name, fingerprint=identity.fingerprint, start=hop.start, end=hop.end,
                      hidden_states=hidden_states, prompts=_hop_prompts(prompts, hop, hidden_states))
    reply = await _call(client, hop, FORWARD_RPC, request, hidden_states)
    if not isinstance(reply, ForwardResult):
        raise PeerError(hop.peer_id, f"answered {reply.type_name} to forward")
    return reply.hidden_states


async def _backward_hop(client: SwarmClient, view: SwarmView, hop: Hop, hidden_states: torch.Tensor,
                        grad_outputs: torch.Tensor, prompts: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients with respect to the hop's inputs and to its slice of the deep prompts."""
    identity = view.identity
    hop_prompts = _hop_prompts(prompts, hop, hidden_states)
    request = Backward(model=identity.name, fingerprint=identity.fingerprint, start=hop.start, end=hop.end,
                       hidden_states=hidden_states, grad_outputs=grad_outputs, prompts=hop_prompts)
    reply = await _call(client, hop, BACKWARD_RPC, request, hidden_states)
    if not isinstance(reply, BackwardResult):
        raise PeerError(hop.peer_id, f"answered {reply.type_name} to backward")
    if hop_prompts is not None and (reply.grad_prompts is None or reply.grad_prompts.shape != hop_prompts.shape):
        # a peer that ignores prompts (older software reads past unknown fields) must not pass as one that used them
        raise PeerError(hop.peer_id, "returned no gradient for the deep prompts it was sent", retryable=True)
    return reply.grad_inputs, reply.grad_prompts


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
                          trace: Trace | None = None, prompts: torch.Tensor | None = None) -> torch.Tensor:
    """Whole sequences through every block (with deep `prompts`, if any); with `trace`, record
    each hop and its inputs."""
    if not view.records:
        await view.wait_for_coverage(client.options.coverage_timeout)
    block = 0
    while block < view.num_blocks:
        async def attempt():
            hop = _route(client, view, block)[0]
            return hop, await _forward_hop(client, view, hop, hidden_states, prompts)

        hop, output = await _with_retries(client, view, attempt)
        if trace is not None:
            trace.append((hop, hidden_states))
        hidden_states, block = output, hop.end
    return hidden_states


async def backward_through(client: SwarmClient, view: SwarmView, trace: Trace, grad_outputs: torch.Tensor,
                           prompts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gradients of the whole route with respect to its inputs and to the deep prompts (None
    without prompts; in the prompts' dtype), hop by hop in reverse. A failed hop's blocks are redone on a new route:
    forward through its hops (to get their inputs), then backward."""
    grad_prompts = None if prompts is None else torch.zeros_like(prompts)
    for hop, inputs in reversed(trace):
        async def attempt(hop=hop, inputs=inputs, grad_outputs=grad_outputs):
            if hop.peer_id in client.retry.avoided():
                raise PeerError(hop.peer_id, "failed earlier", retryable=True)
            return await _backward_hop(client, view, hop, inputs, grad_outputs, prompts)

        async def reroute(hop=hop, inputs=inputs, grad_outputs=grad_outputs):
            hops, hop_inputs = _route(client, view, hop.start, hop.end), [inputs]
            for replacement in hops[:-1]:
                hop_inputs.append(await _forward_hop(client, view, replacement, hop_inputs[-1], prompts))
            # the prompt gradient of blocks hop.start:hop.end, built afresh by every try: a retry adds nothing twice
            hop_grad_prompts = None if prompts is None else torch.zeros_like(prompts[hop.start : hop.end])
            grad = grad_outputs
            for replacement, replacement_inputs in zip(reversed(hops), reversed(hop_inputs)):
                grad, piece = await _backward_hop(client, view, replacement, replacement_inputs, grad, prompts)
                if hop_grad_prompts is not None:
                    hop_grad_prompts[replacement.start - hop.start : replacement.end - hop.start] = piece
            return grad, hop_grad_prompts

        try:
            grad_outputs, hop_grad_prompts = await attempt()
        except (PeerError, MissingBlocksError) as error:
            if isinstance(error, PeerError):
                client.retry.avoid(error.peer_id)
            logger.warning(f"backward through blocks {hop.start}:{hop.end} failed ({error}); rerouting")
            grad_outputs, hop_grad_prompts = await _with_retries(client, view, reroute)
        if grad_prompts is not None:
            grad_prompts[hop.start : hop.end] = hop_grad_prompts
    return grad_outputs, grad_prompts


class RemoteBlocks(torch.autograd.Function):
    """hidden states (and deep prompts, or None) -> every block on the peers, differentiable with
    respect to both."""

    @staticmethod
    def forward(ctx, hidden_states: torch.Tensor, prompts: torch.Tensor | None,
                model: DistributedModelForCausalLM) -> torch.Tensor:
        trace: Trace = []
        prompts = None if prompts is None else prompts.detach()
        output = model.client.run(forward_through(model.client, model.view, hidden_states.detach(), trace, prompts))
        ctx.model, ctx.trace, ctx.prompts = model, trace, prompts
        return output

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        model = ctx.model
        grad, grad_prompts = model.client.run(backward_through(model.client, model.view, ctx.trace,
                                                               grad_output.contiguous(), ctx.prompts))
        return grad, grad_prompts, None

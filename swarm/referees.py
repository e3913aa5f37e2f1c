"""Asking referees: the I/O half of verification (the rules are in swarm.verification).

A check sends the checked hop's inputs, the whole prefix, through other peers serving the same
blocks (one-shot forwards: a referee keeps no cache, so one check costs a forward over the
prefix) and, when peers cannot settle it, through the client's own copy of those blocks,
loaded on first use. Liars are banned through the client's one retry policy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn

from protocol.families import family_classes
from protocol.weights import ModelStore
from swarm.client import SwarmClient, SwarmView
from swarm.remote import _forward_hop
from swarm.routing import Hop, MissingBlocksError, find_route
from swarm.session import PeerError
from swarm.verification import LOCAL, Opinion, Verdict, position_errors, settle, should_check

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class VerificationStats:
    checks: int = 0  # hop steps checked
    referee_forwards: int = 0  # whole-prefix forwards asked of referee routes
    local_recomputations: int = 0  # checks the client settled with its own copy of the blocks
    liars: list[str] = dataclasses.field(default_factory=list)  # peers caught and banned, in order
    largest_agreeing_error: float = 0.0  # the worst relative error per position among answers judged right


class LocalBlocks:
    """Blocks run by the client itself over whole sequences (no cache), with the same
    transformers layers as the peers; each block is loaded on first use and kept."""

    def __init__(self, store: ModelStore):
        self.store, self.config = store, store.config()
        self._layer_class, rotary_class = family_classes(store.model_type)
        self.rotary = rotary_class(config=self.config)
        self._layers: dict[int, nn.Module] = {}

    def _layer(self, index: int) -> nn.Module:
        if index not in self._layers:
            with torch.device("meta"):  # no throwaway random init: the real weights are assigned below
                layer = self._layer_class(self.config, layer_idx=index)
            layer.load_state_dict(self.store.block_state(index), strict=True, assign=True)
            self._layers[index] = layer.eval().requires_grad_(False)
        return self._layers[index]

    @torch.inference_mode()
    def forward(self, hidden_states: torch.Tensor, start: int, end: int) -> torch.Tensor:
        batch_size, tokens, _ = hidden_states.shape
        positions = torch.arange(tokens).unsqueeze(0).expand(batch_size, -1)
        position_embeddings = self.rotary(hidden_states, positions)
        for index in range(start, end):  # no mask: causal through SDPA's is_causal, as on the peers
            hidden_states = self._layer(index)(hidden_states, attention_mask=None, position_ids=positions,
                                               position_embeddings=position_embeddings)
        return hidden_states


class Verifier:
    """One per client model: decides which hop steps to check and settles each check."""

    def __init__(self, client: SwarmClient, view: SwarmView, store: ModelStore, rng: random.Random | None = None):
        self.client, self.view, self.store = client, view, store
        self.fraction, self.tolerance = client.options.verify_fraction, client.options.verify_tolerance
        self.rng = rng or random.Random()
        self.stats = VerificationStats()
        self._local: LocalBlocks | None = None
        self._executor: ThreadPoolExecutor | None = None  # one thread: local blocks load and run in turn

    def due(self, checked_before: bool) -> bool:
        return should_check(checked_before, self.fraction, self.rng)

    async def check(self, hop: Hop, inputs: torch.Tensor, claimed: torch.Tensor, offset: int) -> Verdict:
        """Settle whether `claimed` (the hop peer's outputs for positions offset.., [batch,
        positions, hidden]) is what blocks hop.start:hop.end compute from `inputs` (every
        position from 0). Liars found on the way are banned."""
        self.stats.checks += 1
        opinions = [Opinion((hop.peer_id,), claimed)]
        asked = {hop.peer_id}
        while (verdict := settle(opinions, self.tolerance)) is None:
            route = self._referee_route(hop, asked)
            if route is None:  # no peer left to ask: the client computes the blocks itself
                outputs = await self._recompute(inputs, hop.start, hop.end)
                opinions.append(Opinion(LOCAL, outputs[:, offset:]))
                continue
            asked |= {referee.peer_id for referee in route}
            try:
                outputs = inputs
                for referee in route:
                    outputs = await _forward_hop(self.client, self.view, referee, outputs, None)
            except PeerError as error:  # no opinion from this route; another one is asked
                logger.warning(f"referee {error.peer_id} failed ({error.reason}); asking another")
                if error.retryable:
                    self.client.retry.avoid(error.peer_id)
                continue
            self.stats.referee_forwards += 1
            opinions.append(Opinion(tuple(referee.peer_id for referee in route), outputs[:, offset:]))
        for opinion in opinions[1:]:  # how close honest answers come, for the choice of the tolerance
            error = float(position_errors(claimed, opinion.hidden_states).max())
            if error <= self.tolerance:
                self.stats.largest_agreeing_error = max(self.stats.largest_agreeing_error, error)
        for liar in sorted(verdict.liars):
            self.client.retry.ban(liar)
            self.stats.liars.append(liar)
            agreed = "the client's own recomputation" if verdict.truth.voters == LOCAL else \
                ", ".join(peer_id[-8:] for peer_id in verdict.truth.voters)
            logger.warning(f"peer {liar} returned wrong hidden states for blocks {hop.start}:{hop.end} "
                           f"(the answer of {agreed} differs); banned")
        return verdict

    def _referee_route(self, hop: Hop, asked: set[str]) -> list[Hop] | None:
        try:
            return find_route(self.view.records, self.view.num_blocks, hop.start, hop.end,
                              avoid=self.client.retry.avoided() | frozenset(asked), rtts=self.view.rtts,
                              mode=self.client.options.route_mode)
        except MissingBlocksError:
            return None

    async def _recompute(self, inputs: torch.Tensor, start: int, end: int) -> torch.Tensor:
        self.stats.local_recomputations += 1
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="swarm-verify")

        def run() -> torch.Tensor:
            if self._local is None:
                self._local = LocalBlocks(self.store)
            return self._local.forward(inputs, start, end)

        return await asyncio.get_running_loop().run_in_executor(self._executor, run)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

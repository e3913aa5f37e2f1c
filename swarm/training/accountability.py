"""Catching reducers that lie, and keeping them out: local bans and verifiable public reports.

After an accountable round (`swarm.training.accountable`) and before anything is applied, a peer
asks other reducers (each with probability `verify_fraction`) to reveal the signed contributions
of one random part of theirs, and checks that their signed result to it follows by the run's
rule. A reducer that lied is banned at once and reported in the DHT with the evidence; every
peer reading the report checks the evidence itself (signatures from peer ids, the aggregate
recomputed) before banning. A reducer that will not reveal, reveals garbage, or leaves out
contributions cannot be proven guilty to others: each such round is refused locally, and after
`max_strikes` of them the peer is banned locally. Banned peers are refused as groupmates.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import random
from typing import Awaitable, Callable

import torch
from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time

from swarm.training.accountable import AccountableAllReduceRunner
from swarm.training.allreduce import Aggregate, RoundFailed
from swarm.training.evidence import CONSISTENT, Evidence, NonFiniteEvidence, SignedTensor, judge

logger = logging.getLogger(__name__)

RevealRequest = Callable[[str, bytes, int], Awaitable[list[SignedTensor]]]


@dataclasses.dataclass(frozen=True)
class AccountabilityOptions:
    verify_fraction: float = 1.0  # chance to check each other reducer's result in every round
    max_strikes: int = 3  # unprovable misbehaviour (no reveal, partial reveal) tolerated before a local ban
    report_expiry: float = 3600.0
    kept_rounds: int = 3  # recent rounds whose contributions we keep to reveal (each holds ~1 model size)


class Accountability:
    def __init__(self, me: str, dht: DHTNode, run_id: str, options: AccountabilityOptions = AccountabilityOptions()):
        self.me, self._dht, self.options = me, dht, options
        self._reports_key = f"{run_id}.reports"
        self.banned: dict[str, str] = {}  # peer id -> why
        self._strikes: collections.Counter[str] = collections.Counter()
        self._recent: collections.OrderedDict[bytes, AccountableAllReduceRunner] = collections.OrderedDict()
        self._judged_reports: set[str] = set()
        self._nonfinite_rounds: collections.defaultdict[str, set[bytes]] = collections.defaultdict(set)
        self.aggregate: Aggregate | None = None  # the run's rule, known once we averaged (to judge reports)

    def remember(self, runner: AccountableAllReduceRunner) -> None:
        self._recent[runner.group_id] = runner
        while len(self._recent) > self.options.kept_rounds:
            self._recent.popitem(last=False)

    def reveal(self, group_id: bytes, part_index: int) -> list[SignedTensor]:
        runner = self._recent.get(group_id)
        return runner.reveal(part_index) if runner is not None else []

    def ban(self, peer_id: str, reason: str) -> None:
        if peer_id not in self.banned:
            logger.warning(f"banning {peer_id} from our groups: {reason}")
            self.banned[peer_id] = reason

    def strike(self, peer_id: str, reason: str) -> None:
        self._strikes[peer_id] += 1
        if self._strikes[peer_id] >= self.options.max_strikes:
            self.ban(peer_id, f"{reason} ({self._strikes[peer_id]} times)")

    async def verify(self, runner: AccountableAllReduceRunner, aggregate: Aggregate, request: RevealRequest) -> None:
        """Check other reducers' results; RoundFailed (apply nothing) when one does not hold up."""
        self.aggregate = aggregate
        group_size = len(runner.ordered_peer_ids)
        for reducer, num_parts in runner.reducers:
            if random.random() >= self.options.verify_fraction:
                continue
            part_index = random.randrange(num_parts)
            result = runner.results.get((reducer, part_index))
            if result is None:
                raise RoundFailed(f"no result from reducer {reducer} for part {part_index}")
            try:
                revealed = await request(reducer, runner.group_id, part_index)
            except Exception as error:
                self.strike(reducer, "did not reveal its contributions")
                raise RoundFailed(f"reducer {reducer} did not reveal its part ({type(error).__name__}: {error})")
            if len(revealed) < group_size:
                # an honest reducer drops a sender that timed out; without every contribution its
                # result cannot be judged, so the round is refused (and retried) rather than trusted.
                # Leaving out senders that did reach us this round is suspicious: a strike.
                missing = {peer.to_base58() for peer in runner.ordered_peer_ids} - {item.signer for item in revealed}
                if missing <= runner.senders_heard():
                    self.strike(reducer, "left out contributions of senders that were alive")
                raise RoundFailed(f"reducer {reducer} revealed {len(revealed)} of {group_size} contributions")
            evidence = Evidence(runner.group_id, part_index, self.me, tuple(revealed), result)
            verdict = judge(evidence, aggregate)
            if verdict is None:
                self.ban(reducer, "its signed result does not follow from the signed contributions")
                await self.publish(evidence)
                raise RoundFailed(f"reducer {reducer} returned a wrong part: banned and reported")
            if verdict != CONSISTENT:
                self.strike(reducer, verdict)
                raise RoundFailed(f"reducer {reducer}'s reveal does not hold up: {verdict}")

    async def check_contributions(self, runner: AccountableAllReduceRunner) -> None:
        """Strike (and report) senders whose signed contributions to our parts hold NaN or Inf: the
        robust rules drop such inputs, and a peer that keeps sending them is banned."""
        for part_index, by_sender in runner.contributions.items():
            for sender, item in by_sender.items():
                subkey = f"{sender}/{runner.group_id.hex()}/nonfinite"
                if sender != self.me and subkey not in self._judged_reports and not torch.isfinite(item.decoded()).all():
                    self._count_nonfinite(sender, runner.group_id)
                    await self.publish(NonFiniteEvidence(runner.group_id, self.me, part_index, item), subkey=subkey)

    def _count_nonfinite(self, sender: str, group_id: bytes) -> None:
        self._nonfinite_rounds[sender].add(group_id)
        if len(self._nonfinite_rounds[sender]) >= self.options.max_strikes:
            self.ban(sender, f"sent NaN or Inf in {len(self._nonfinite_rounds[sender])} rounds")

    async def publish(self, evidence: Evidence | NonFiniteEvidence, subkey: str | None = None) -> None:
        subkey = subkey or f"{evidence.reducer}/{evidence.group_id.hex()}/{evidence.recipient}"
        self._judged_reports.add(subkey)
        stored = await self._dht.store(self._reports_key, evidence.to_wire(),
                                       get_dht_time() + self.options.report_expiry, subkey=subkey)
        if not stored:
            logger.warning(f"could not publish the report on {evidence.reducer}")

    async def read_reports(self) -> None:
        """Judge reports we have not judged yet; ban the reducers their evidence convicts."""
        if self.aggregate is None:  # we do not know the run's rule before our first round
            return
        found = await self._dht.get(self._reports_key, latest=True)
        if found is None or not isinstance(found.value, dict):
            return
        for subkey, item in found.value.items():
            if not isinstance(subkey, str) or subkey in self._judged_reports:
                continue
            self._judged_reports.add(subkey)
            if isinstance(item.value, dict) and item.value.get("kind") == "nonfinite":
                nonfinite = NonFiniteEvidence.from_wire(item.value)
                if nonfinite is not None and nonfinite.contribution.signer != self.me and nonfinite.holds():
                    self._count_nonfinite(nonfinite.contribution.signer, nonfinite.group_id)
                continue
            evidence = Evidence.from_wire(item.value)
            if evidence is None or evidence.reducer in self.banned or evidence.reducer == self.me:
                continue
            verdict = judge(evidence, self.aggregate)
            if verdict is None:
                self.ban(evidence.reducer, f"convicted by the evidence {evidence.recipient} published")
            else:
                logger.info(f"ignoring a report on {evidence.reducer} that proves nothing: {verdict}")

"""One all-or-nothing round of butterfly all-reduce with a swappable aggregation rule.

hivemind's `AllReduceRunner` splits the group's tensors into parts, each reduced by one peer,
and keeps a running weighted sum per part. Two things change here:
- the reducer keeps every sender's part and combines them with `aggregate(parts)` (a plain
  function such as `swarm.robust.median`): robust rules need the individual inputs, not a sum;
- the round is all or nothing: hivemind fills a failed reducer's part with the local values
  and applies the rest in place, so peers would silently diverge. We collect every part first
  and raise `RoundFailed` unless all of them arrived; the caller applies nothing then.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.partition import TensorPartReducer

Aggregate = Callable[[Sequence[torch.Tensor]], torch.Tensor]


class RoundFailed(RuntimeError):
    """An averaging round that did not complete for this peer: apply nothing, retry or resync."""


class _Contributions:
    """Stands in for TensorPartReducer's running sum of one part: it keeps each sender's tensor,
    and the reducer's final `div_` (sum / total weight) becomes the aggregation rule. Sender
    weights are ignored on purpose: a liar would declare a huge one (see swarm.robust)."""

    def __init__(self, aggregate: Aggregate):
        self.aggregate, self.parts = aggregate, []

    def add_(self, part: torch.Tensor, alpha: float = 1.0) -> None:
        self.parts.append(part)

    def div_(self, denominator: float) -> torch.Tensor:
        return self.aggregate(self.parts)


class AggregatingPartReducer(TensorPartReducer):
    def __init__(self, part_shapes: Sequence[torch.Size], num_senders: int, aggregate: Aggregate):
        self.aggregate = aggregate
        super().__init__(part_shapes, num_senders)

    def reset_accumulators(self) -> None:
        super().reset_accumulators()
        if not self.finished.is_set():
            self.accumulator = _Contributions(self.aggregate)


class AggregatingAllReduceRunner(AllReduceRunner):
    """AllReduceRunner whose parts are combined by `aggregate` (see the module docstring)."""

    def __init__(self, *, aggregate: Aggregate, **kwargs):
        super().__init__(**kwargs)
        self.tensor_part_reducer.finished.set()  # the summing reducer built by the parent is never used
        shapes = tuple(part.shape for part in self.parts_for_local_averaging)
        self.tensor_part_reducer = AggregatingPartReducer(shapes, len(self.sender_peer_ids), aggregate)
        self.failed_reducers: set[str] = set()

    async def _communicate_with_peer(self, peer_id):
        try:
            return await super()._communicate_with_peer(peer_id)
        except BaseException:
            self.failed_reducers.add(peer_id.to_base58())
            raise

    async def run_to_completion(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The aggregated tensors, or RoundFailed if any part did not come back."""
        deltas = [delta async for delta in self.run()]
        failed = self.tensor_part_container.failed_size
        if failed or len(deltas) != len(tensors):
            raise RoundFailed(f"{failed} values of the group's tensors were not reduced (reducers that failed or "
                              f"left: {', '.join(sorted(self.failed_reducers)) or 'unknown'})")
        return [tensor + delta for tensor, delta in zip(tensors, deltas)]

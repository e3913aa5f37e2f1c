"""The client's one retry policy: back off between attempts, avoid a failed peer for a while,
and ban a peer caught lying (see swarm.verification) for much longer."""

from __future__ import annotations

import dataclasses
import time
from typing import Iterator


@dataclasses.dataclass
class RetryPolicy:
    avoid_seconds: float = 60.0  # a peer that failed is left out of new routes this long
    first_delay: float = 0.1
    max_delay: float = 2.0
    give_up_after: float = 60.0  # with no replacement for failed blocks, wait this long, then fail
    ban_seconds: float = 24 * 3600.0  # a peer caught returning wrong hidden states is left out this long
    _avoided_until: dict[str, float] = dataclasses.field(default_factory=dict)

    def avoid(self, peer_id: str, seconds: float | None = None) -> None:
        until = time.monotonic() + (self.avoid_seconds if seconds is None else seconds)
        self._avoided_until[peer_id] = max(until, self._avoided_until.get(peer_id, until))  # never shortens a ban

    def ban(self, peer_id: str) -> None:
        self.avoid(peer_id, self.ban_seconds)

    def avoided(self) -> frozenset[str]:
        now = time.monotonic()
        self._avoided_until = {peer: until for peer, until in self._avoided_until.items() if until > now}
        return frozenset(self._avoided_until)

    def delays(self) -> Iterator[float]:
        """Exponential backoff delays adding up to at most `give_up_after` seconds."""
        total, delay = 0.0, self.first_delay
        while total + delay <= self.give_up_after:
            yield delay
            total += delay
            delay = min(delay * 2, self.max_delay)

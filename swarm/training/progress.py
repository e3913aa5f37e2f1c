"""What each peer of a run reports in the DHT, and the decisions taken from those reports.

Pure functions over records (no network): when the swarm has gathered enough samples for the
next global step, who is ahead of us (we must download the state), who averages with us.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterable


@dataclasses.dataclass(frozen=True)
class Progress:
    peer_id: str
    epoch: int  # global steps this peer has taken
    samples: int  # samples accumulated towards the next global step
    samples_per_second: float = 0.0
    done: bool = False  # finished the run: neither averages nor serves as a partner any more

    def to_wire(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "samples": self.samples, "samples_per_second": self.samples_per_second,
                "done": self.done}

    @classmethod
    def from_wire(cls, peer_id: str, wire: Any) -> Progress | None:
        """None for anything malformed: a bad record is skipped, never trusted."""
        try:
            epoch, samples = wire["epoch"], wire["samples"]
            rate = float(wire.get("samples_per_second", 0.0))
            done = bool(wire.get("done", False))
        except (TypeError, KeyError, ValueError, AttributeError):
            return None
        if not (isinstance(epoch, int) and isinstance(samples, int) and epoch >= 0 and samples >= 0):
            return None
        return cls(peer_id, epoch, samples, rate, done)


def peers_at_epoch(others: Iterable[Progress], epoch: int) -> list[Progress]:
    """The partners for the next global step: peers at our epoch still training."""
    return [progress for progress in others if progress.epoch == epoch and not progress.done]


def peers_ahead(others: Iterable[Progress], epoch: int) -> list[Progress]:
    """Peers that have taken more global steps than `epoch`, most advanced first."""
    return sorted((progress for progress in others if progress.epoch > epoch), key=lambda p: -p.epoch)


def ready_for_step(mine: Progress, others: Iterable[Progress], target_batch_size: int) -> bool:
    """True once the peers at our epoch have accumulated `target_batch_size` samples in all."""
    gathered = mine.samples + sum(progress.samples for progress in peers_at_epoch(others, mine.epoch))
    return mine.samples > 0 and gathered >= target_batch_size


def replicas_disagree(gathered: Iterable[Any], relative_tolerance: float = 1e-5) -> bool:
    """Whether a group's members started a round from different parameters, judged from the
    fingerprints (float64 sum and sum of squares) each sent along. Every member sees the same
    gathered values, so every member reaches the same verdict. A missing or malformed
    fingerprint counts as a disagreement: repairing costs one round, diverging costs the run."""
    fingerprints = []
    for data in gathered:
        fingerprint = data.get("fingerprint") if isinstance(data, dict) else None
        if not (isinstance(fingerprint, (list, tuple)) and len(fingerprint) == 2
                and all(isinstance(value, float) for value in fingerprint)):
            return True
        fingerprints.append(fingerprint)
    return any(abs(value - reference) > relative_tolerance * max(abs(reference), 1e-12)
               for fingerprint in fingerprints[1:] for value, reference in zip(fingerprint, fingerprints[0]))


class RateMeter:
    """Samples per second over the last minute or so (what the progress report announces)."""

    def __init__(self, horizon: float = 60.0):
        self.horizon, self.events = horizon, []

    def add(self, samples: int) -> None:
        now = time.monotonic()
        self.events = [(t, n) for t, n in self.events if now - t < self.horizon] + [(now, samples)]

    def rate(self) -> float:
        if len(self.events) < 2:
            return 0.0
        elapsed = self.events[-1][0] - self.events[0][0]
        return sum(n for _, n in self.events[1:]) / elapsed if elapsed > 0 else 0.0

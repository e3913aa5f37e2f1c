"""Which training examples a peer draws: the swappable assignment of data to peers.

Today every peer samples the whole training set independently, with its own seed (derived from
the run's seed and its peer id), so peers joining and leaving need no coordination and the
union of their batches is an unbiased sample. A scheme that gives each peer fixed shards (as
gradient coding needs) replaces `peer_seed`/`random_batches` without touching the optimizer.
"""

from __future__ import annotations

import hashlib
from typing import Iterator

import torch


def peer_seed(run_seed: int, peer_id: str) -> int:
    digest = hashlib.sha256(f"{run_seed}:{peer_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def random_batches(num_examples: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches of example indices: shuffled epochs, each example once per epoch."""
    if not 0 < batch_size <= num_examples:
        raise ValueError(f"batch size must be between 1 and {num_examples}, got {batch_size}")
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(num_examples, generator=generator)
        for start in range(0, num_examples - batch_size + 1, batch_size):
            yield order[start: start + batch_size]

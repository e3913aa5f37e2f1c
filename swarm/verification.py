"""Checking peers' answers: which steps to check, whether two answers agree, who lied. Pure.

A verifying client checks each peer's first step on a session, then a random fraction of its
steps: the hop's inputs (the whole prefix) are also run through the same blocks by a referee,
and the answers are compared position by position. The rule that settles a disagreement:

- opinions are gathered one referee at a time: first other peers (a route over the hop's
  blocks avoiding everyone already asked), last the client's own recomputation;
- an answer is settled once two opinions agree on it (the checked peer and a referee, or two
  referees), or as soon as the client's own recomputation is in: that one is the truth;
- every single peer whose answer departs from the settled one is a liar. A referee route of
  several peers whose answer lost is not blamed: which of its peers lied is unknown.

Two honest computations of the same fp32 blocks agree to about 1e-6 relative (a cached step
and a whole-prefix forward round differently); a wrong answer is off by far more.
"""

from __future__ import annotations

import dataclasses
import random
from typing import Sequence

import torch

LOCAL: tuple[str, ...] = ()  # the voters of the client's own recomputation: no peer, trusted
DEFAULT_TOLERANCE = 1e-4


def should_check(checked_before: bool, fraction: float, rng: random.Random) -> bool:
    """Whether a hop's step is checked: its peer's first step always, later ones with
    probability `fraction` (0: verification is off)."""
    if fraction <= 0:
        return False
    return not checked_before or rng.random() < fraction


def position_errors(answer: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Relative error per position of hidden states [batch, positions, hidden]:
    ||answer - reference|| / ||reference|| over the hidden size, the worst sequence of the batch."""
    if answer.shape != reference.shape:
        return torch.full((reference.shape[1],), float("inf"))
    difference = (answer.float() - reference.float()).norm(dim=-1)
    scale = reference.float().norm(dim=-1).clamp_min(1e-12)
    errors = (difference / scale).amax(dim=0)
    return torch.where(torch.isfinite(errors), errors, torch.full_like(errors, float("inf")))  # NaN is a mismatch


def first_mismatch(answer: torch.Tensor, reference: torch.Tensor, tolerance: float) -> int | None:
    """The first position where `answer` departs from `reference`, or None when they agree."""
    bad = (position_errors(answer, reference) > tolerance).nonzero()
    return int(bad[0]) if len(bad) else None


@dataclasses.dataclass(frozen=True)
class Opinion:
    voters: tuple[str, ...]  # the peers of the route that computed it; LOCAL for the client itself
    hidden_states: torch.Tensor  # [batch, positions, hidden]


@dataclasses.dataclass(frozen=True)
class Verdict:
    truth: Opinion
    liars: frozenset[str]
    first_mismatch: int | None  # where the checked peer's answer first departs from the truth; None: it was right


def settle(opinions: Sequence[Opinion], tolerance: float = DEFAULT_TOLERANCE) -> Verdict | None:
    """Who is right, from opinions[0] (the checked peer's answer) and the referees' answers so
    far; None while undecided (ask another referee). See the module docstring for the rule."""
    truth = next((opinion for opinion in opinions if opinion.voters == LOCAL), None)
    if truth is None:
        truth = next((first for index, first in enumerate(opinions) for second in opinions[index + 1 :]
                      if first_mismatch(first.hidden_states, second.hidden_states, tolerance) is None), None)
    if truth is None:
        return None
    liars = frozenset(opinion.voters[0] for opinion in opinions if len(opinion.voters) == 1
                      and first_mismatch(opinion.hidden_states, truth.hidden_states, tolerance) is not None)
    return Verdict(truth, liars, first_mismatch(opinions[0].hidden_states, truth.hidden_states, tolerance))

"""What the reducer of one part of a coded round decides, as pure functions over the messages.

In a coded round (`swarm.training.coded`) every worker sends a coded message, a combination of
the gradients of its code's shards (`swarm.coding`). The reducer of each slice of the tensors
gets those messages one by one and, after each, asks `decide_part`: decode now (and from whom),
keep waiting, or give up. It never averages robustly: a coded message is not one contribution
among equals, and a robust rule would throw away exactly the sums it needs. Redundancy is the
check instead: the workers of one fractional-repetition group compute the same sum, so their
copies must agree, and a strict majority of a group exposes a liar, which is left out.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Collection, Mapping
from typing import Literal

import torch

from swarm.coding import CyclicRepetitionCode, FractionalRepetitionCode, GradientCode

CodeKind = Literal["fractional", "cyclic"]


@dataclasses.dataclass(frozen=True)
class CodedOptions:
    """How a coded round encodes and when its reducers stop waiting.

    code: "fractional" (groups of stragglers + 1 workers with the same shards; needs
        stragglers + 1 to divide the group size; copies expose liars) or "cyclic" (any group
        size; no copies, so only non-finite messages are caught).
    stragglers: s, the number of workers a part can do without; each worker computes s + 1 shards.
    agreeing_copies: fractional only. A group's sum is used once this many of its workers sent
        copies that agree. 1 decodes soonest (a lone copy is trusted: a liar alone in its group
        goes unseen); 2 waits for a second, agreeing copy, so one liar per group never gets
        through, at the cost of tolerating only s - 1 stragglers per group.
    tolerance: copies of one group's sum whose difference exceeds this share of their norm disagree.
    """
    code: CodeKind = "fractional"
    stragglers: int = 1
    agreeing_copies: int = 1
    tolerance: float = 1e-5

    def __post_init__(self) -> None:
        if self.code not in ("fractional", "cyclic"):
            raise ValueError(f"code must be 'fractional' or 'cyclic', got {self.code!r}")
        if self.stragglers < 0:
            raise ValueError(f"stragglers must be >= 0, got {self.stragglers}")
        if self.agreeing_copies < 1:
            raise ValueError(f"agreeing_copies must be >= 1, got {self.agreeing_copies}")
        if self.code == "cyclic" and self.agreeing_copies != 1:
            raise ValueError("agreeing_copies applies to the fractional code only: a cyclic code's workers "
                             "send different combinations, not copies")
        if self.agreeing_copies > self.stragglers + 1:
            raise ValueError(f"agreeing_copies={self.agreeing_copies} is more than the {self.stragglers + 1} workers "
                             f"of a group (stragglers + 1)")
        if not self.tolerance > 0:
            raise ValueError(f"tolerance must be > 0, got {self.tolerance}")


def build_code(options: CodedOptions, num_workers: int) -> GradientCode:
    """The code for a group of `num_workers`; ValueError, saying what would fit, when none does."""
    if options.stragglers >= num_workers:
        raise ValueError(f"a group of {num_workers} cannot tolerate {options.stragglers} stragglers "
                         f"(at most {num_workers - 1})")
    return _cached_code(options.code, num_workers, options.stragglers)


@functools.lru_cache(maxsize=32)
def _cached_code(kind: CodeKind, num_workers: int, stragglers: int) -> GradientCode:
    # a cyclic code tries several random draws and checks every straggler pattern: build it once per size
    if kind == "fractional":
        return FractionalRepetitionCode(num_workers, stragglers)
    return CyclicRepetitionCode(num_workers, stragglers)


@dataclasses.dataclass(frozen=True)
class PartDecision:
    decode_from: tuple[int, ...] = ()  # non-empty: finish the part now, decoding these workers' messages
    liars: frozenset[int] = frozenset()  # outvoted by their group's majority, or sent NaN/Inf
    failure: str | None = None  # set: no message still to come can make the part decodable

    @property
    def waiting(self) -> bool:
        return not self.decode_from and self.failure is None


def decide_part(code: GradientCode, messages: Mapping[int, torch.Tensor], pending: Collection[int],
                agreeing_copies: int = 1, tolerance: float = 1e-5) -> PartDecision:
    """Decode, wait or fail, given the `messages` received so far (worker -> message) and the
    workers still expected (`pending`: neither received nor known to have failed)."""
    received = set(messages)
    liars = {worker for worker, message in messages.items() if not bool(torch.isfinite(message).all())}
    unresolved: list[int] = []
    if isinstance(code, FractionalRepetitionCode):
        usable: set[int] = set()
        for group in range(code.num_groups):
            members = [worker for worker in code.group_workers(group) if worker in received and worker not in liars]
            if not members:
                continue
            outvoted = code.disagreeing_workers({worker: messages[worker] for worker in members}, tolerance)
            if len(members) > 1 and outvoted == set(members):
                unresolved.append(group)  # copies differ and none has a majority (yet): trust none
                continue
            liars |= outvoted
            majority = [worker for worker in members if worker not in outvoted]
            if len(majority) >= agreeing_copies:
                usable.update(majority)
        hopeful = {worker for group in range(code.num_groups)
                   for worker in _hopeful_members(code, group, received - liars, pending, agreeing_copies)}
    else:
        usable = received - liars
        hopeful = usable | set(pending)
    if usable and code.can_decode(usable):
        # every usable message goes in: decoding with copies averages them (minimum-norm coefficients)
        return PartDecision(decode_from=tuple(sorted(usable)), liars=frozenset(liars))
    if not pending or not code.can_decode(hopeful):
        return PartDecision(liars=frozenset(liars),
                            failure=_why_undecodable(code, usable, liars, unresolved, pending, agreeing_copies))
    return PartDecision(liars=frozenset(liars))


def _hopeful_members(code: FractionalRepetitionCode, group: int, honest: set[int], pending: Collection[int],
                     agreeing_copies: int) -> list[int]:
    """The group's workers that could still be used if every pending one arrived and agreed."""
    members = [worker for worker in code.group_workers(group) if worker in honest or worker in pending]
    return members if len(members) >= agreeing_copies else []


def _why_undecodable(code: GradientCode, usable: set[int], liars: set[int], unresolved: list[int],
                     pending: Collection[int], agreeing_copies: int) -> str:
    kind = type(code).__name__
    waiting = "no other worker can still send" if not pending else f"workers {sorted(pending)} cannot fix that"
    words = [(f"the usable messages (workers {sorted(usable)}, {len(usable)} of {code.n}) do not determine the "
              f"gradient sum and {waiting}")]
    if liars:
        words.append(f"workers {sorted(liars)} were outvoted by their group or sent NaN/Inf")
    if unresolved:
        words.append(f"the copies of groups {unresolved} differ with no majority")
    rule = f"{kind}(n={code.n}, s={code.s}) decodes from any {code.n - code.s} workers"
    if isinstance(code, FractionalRepetitionCode) and agreeing_copies > 1:
        rule += f" when each group has {agreeing_copies} agreeing copies (lower agreeing_copies to wait for fewer)"
    return "; ".join(words) + f"; {rule}"

"""Gradient coding: get the exact full-batch gradient sum from whichever workers answer first.

Tandon, Lei, Dimakis and Karampatziakis, "Gradient Coding: Avoiding Stragglers in Distributed
Learning", ICML 2017. The data is split into n shards (ids 0..n-1) over n workers. Each worker
holds s + 1 shards, computes their gradients and sends one linear combination of them, row
`worker` of an n x n encoding matrix B. Any n - s of the n messages then determine the sum of
all n shard gradients: the reducer finds coefficients a with a^T B_received = (1, ..., 1) and
returns sum_i a_i * message_i, so it never waits for the s slowest workers.

Two codes from the paper:
- `FractionalRepetitionCode`: workers in groups of s + 1 that all hold the same s + 1 shards and
  send their plain sum. Needs (s + 1) to divide n. Any one message per group suffices, and the
  copies within a group let a majority expose a worker that lied (`disagreeing_workers`).
- `CyclicRepetitionCode`: worker i holds shards i..i+s (mod n), for any n and s < n, with
  coefficients from the paper's random null-space construction (its Algorithm 2).

Pure torch, no I/O: the averager decides who computes what and feeds the messages in.
"""

from __future__ import annotations

import abc
import itertools
import math
from typing import Iterable, Mapping

import torch

# Relative residual of a^T B_received = 1 under which the received workers count as decodable.
# Decodable sets solve to about 1e-15 * condition number; undecodable ones miss by order 1.
DECODE_TOLERANCE = 1e-8
# Checking every straggler pattern at construction costs one small least-squares solve each
# (per candidate draw of a cyclic code); beyond this many patterns, only decode time checks.
MAX_PATTERNS_CHECKED = 20_000
MAX_CACHED_SOLUTIONS = 4096


class GradientCode(abc.ABC):
    """A linear gradient code: n workers, n shards, any s stragglers tolerated.

    Subclasses build the encoding matrix; encoding, decoding and the decodability check are
    shared, since every code here is "message = row of B times the shard gradients"."""

    def __init__(self, n: int, s: int, matrix: torch.Tensor, shards: list[list[int]]) -> None:
        self._n, self._s = n, s
        self._matrix = matrix.to(torch.float64)
        self._shards = [sorted(worker_shards) for worker_shards in shards]
        # A reducer asks can_decode after every arrival, with the same growing sets each step.
        self._coefficient_cache: dict[tuple[int, ...], tuple[float, ...] | None] = {}

    @property
    def n(self) -> int:
        return self._n

    @property
    def s(self) -> int:
        return self._s

    @property
    def matrix(self) -> torch.Tensor:
        """The n x n float64 encoding matrix B (a copy): message_i = sum_j B[i, j] * gradient_j."""
        return self._matrix.clone()

    def shards(self, worker: int) -> list[int]:
        """The s + 1 shard ids whose gradients `worker` computes."""
        self._check_workers([worker])
        return list(self._shards[worker])

    def encode(self, worker: int, gradients: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """The message `worker` sends, from the gradients of its shards (other entries are ignored).

        Accumulates in float64 and returns the gradients' dtype."""
        needed = self.shards(worker)
        missing = [shard for shard in needed if shard not in gradients]
        if missing:
            raise ValueError(f"worker {worker} needs the gradients of shards {needed}; missing shards {missing}")
        return _combine([float(self._matrix[worker, shard]) for shard in needed], [gradients[shard] for shard in needed])

    def can_decode(self, workers: Iterable[int]) -> bool:
        """Whether the messages of `workers` determine the full gradient sum: a reducer can stop
        waiting as soon as this is true."""
        workers = tuple(sorted(set(workers)))
        self._check_workers(workers)
        return self._coefficients(workers) is not None

    def decode(self, encoded: Mapping[int, torch.Tensor]) -> torch.Tensor:
        """The exact sum of all n shard gradients from the messages of any n - s (or more) workers."""
        workers = tuple(sorted(encoded))
        self._check_workers(workers)
        coefficients = self._coefficients(workers)
        if coefficients is None:
            raise ValueError(f"messages from workers {list(workers)} ({len(workers)} of {self._n}) do not determine "
                             f"the gradient sum; any {self._n - self._s} of the {self._n} workers do"
                             f"{self._missing_hint(workers)}")
        used = [(coefficient, encoded[worker]) for coefficient, worker in zip(coefficients, workers) if coefficient != 0]
        return _combine([coefficient for coefficient, _ in used], [message for _, message in used])

    def _missing_hint(self, workers: tuple[int, ...]) -> str:
        """A subclass's extra words on what a failed decode lacks."""
        return ""

    def _check_workers(self, workers: Iterable[int]) -> None:
        unknown = [worker for worker in workers if not (isinstance(worker, int) and 0 <= worker < self._n)]
        if unknown:
            raise ValueError(f"unknown workers {unknown}: worker ids run from 0 to {self._n - 1}")

    def _coefficients(self, workers: tuple[int, ...]) -> tuple[float, ...] | None:
        """Decoding coefficients a with a^T B[workers] = 1, or None when no such a exists.

        Least squares with the gelsd driver, which returns the minimum-norm solution also for
        rank-deficient systems (a fractional code's group members have identical rows); the
        minimum-norm one averages the copies a group sends, rather than trusting one."""
        if workers not in self._coefficient_cache:
            if len(self._coefficient_cache) >= MAX_CACHED_SOLUTIONS:  # up to 2^n sets could arrive over a run
                self._coefficient_cache.clear()
            self._coefficient_cache[workers] = self._solve(workers)
        return self._coefficient_cache[workers]

    def _solve(self, workers: tuple[int, ...]) -> tuple[float, ...] | None:
        if not workers:
            return None
        system = self._matrix[list(workers)].T  # n equations, one unknown per received worker
        ones = torch.ones(self._n, 1, dtype=torch.float64)
        solution = torch.linalg.lstsq(system, ones, driver="gelsd").solution
        residual = torch.linalg.vector_norm(system @ solution - ones) / math.sqrt(self._n)
        if not residual <= DECODE_TOLERANCE:  # also rejects NaN
            return None
        return tuple(float(value) for value in solution.flatten())

    def _largest_decoding_coefficient(self) -> float | None:
        """The largest |a_i| over every choice of s stragglers, or None when there are too many
        choices to try. Raises if some choice leaves an undecodable set.

        Decoding multiplies each message by its a_i, so this bounds how much the senders' float
        rounding (float32 or bfloat16 gradients) can be amplified in the decoded sum."""
        if math.comb(self._n, self._s) > MAX_PATTERNS_CHECKED:
            return None
        largest = 0.0
        for stragglers in itertools.combinations(range(self._n), self._s):
            survivors = tuple(worker for worker in range(self._n) if worker not in stragglers)
            coefficients = self._coefficients(survivors)
            if coefficients is None:
                raise ValueError(f"{type(self).__name__}(n={self._n}, s={self._s}) cannot decode "
                                 f"without workers {list(stragglers)}")
            largest = max(largest, max(abs(coefficient) for coefficient in coefficients))
        return largest


class FractionalRepetitionCode(GradientCode):
    """Workers in n / (s + 1) groups of s + 1; every worker of group g holds shards
    g(s+1) .. g(s+1)+s and sends their plain sum."""

    def __init__(self, n: int, s: int) -> None:
        _check_sizes(n, s)
        if n % (s + 1) != 0:
            raise ValueError(f"a fractional repetition code needs s + 1 = {s + 1} to divide n = {n}; "
                             f"use CyclicRepetitionCode for any n")
        group_size = s + 1
        shards = [list(range(worker // group_size * group_size, (worker // group_size + 1) * group_size))
                  for worker in range(n)]
        matrix = torch.zeros(n, n, dtype=torch.float64)
        for worker, worker_shards in enumerate(shards):
            matrix[worker, worker_shards] = 1.0
        super().__init__(n, s, matrix, shards)
        self._largest_decoding_coefficient()  # raises if some straggler pattern cannot be decoded

    @property
    def num_groups(self) -> int:
        return self._n // (self._s + 1)

    def group(self, worker: int) -> int:
        """The group of `worker`: the workers that compute the same shards."""
        self._check_workers([worker])
        return worker // (self._s + 1)

    def group_workers(self, group: int) -> list[int]:
        """The s + 1 workers of `group`."""
        if not 0 <= group < self.num_groups:
            raise ValueError(f"unknown group {group}: group ids run from 0 to {self.num_groups - 1}")
        return list(range(group * (self._s + 1), (group + 1) * (self._s + 1)))

    def disagreeing_workers(self, encoded: Mapping[int, torch.Tensor], relative_tolerance: float = 1e-5) -> set[int]:
        """Workers whose message differs from the majority of their group's messages.

        Workers of a group compute the same sum, so honest ones agree up to float noise (the
        tolerance is relative to the larger norm, as gradients vary in scale). A strict majority
        of a group's received messages identifies the liars; a group without one (two messages
        that differ, say) has every member returned, since none of its values can be trusted."""
        workers = sorted(encoded)
        self._check_workers(workers)
        suspects: set[int] = set()
        for group in range(self.num_groups):
            members = [worker for worker in workers if self.group(worker) == group]
            agreeing = {worker: {other for other in members
                                 if _agree(encoded[worker], encoded[other], relative_tolerance)}
                        for worker in members}
            largest = max(agreeing.values(), key=len, default=set())
            if 2 * len(largest) > len(members):
                suspects.update(set(members) - largest)
            else:
                suspects.update(members)
        return suspects

    def _missing_hint(self, workers: tuple[int, ...]) -> str:
        missing = [group for group in range(self.num_groups) if not set(self.group_workers(group)) & set(workers)]
        return "".join(f"; no message from group {group} (workers {self.group_workers(group)})" for group in missing)


class CyclicRepetitionCode(GradientCode):
    """Worker i holds shards i, i+1, ..., i+s (mod n) and sends a weighted sum of their gradients.

    The weights follow the paper's Algorithm 2: draw a random s x n matrix H whose rows sum to
    zero, so the all-ones vector lies in its null space, and give each row of B its cyclic support
    with weight 1 on shard i and the other s weights chosen so that H b_i = 0. All rows of B then
    lie in null(H), of dimension n - s, and any n - s of them are (with probability 1) a basis of
    it, which contains the all-ones vector.

    Draws are seeded so every peer builds the same B. Some draws are badly conditioned (for n=6,
    s=2, seed 0 needs decoding coefficients near 1e4, which would turn float32 rounding into a
    1e-3 error), so `candidates` consecutive seeds are tried and the one with the smallest largest
    decoding coefficient over all straggler patterns is kept.
    """

    def __init__(self, n: int, s: int, seed: int = 0, candidates: int = 8) -> None:
        _check_sizes(n, s)
        if candidates < 1:
            raise ValueError(f"candidates must be >= 1, got {candidates}")
        best: tuple[float, int] | None = None
        failure: ValueError | None = None
        for candidate_seed in range(seed, seed + candidates):
            super().__init__(n, s, _cyclic_matrix(n, s, candidate_seed), _cyclic_shards(n, s))
            try:
                largest = self._largest_decoding_coefficient()
            except ValueError as error:
                failure = error
                continue
            if largest is None:  # too many patterns to rank draws: take this one, decode still checks
                self._seed = candidate_seed
                return
            if best is None or largest < best[0]:
                best = (largest, candidate_seed)
        if best is None:
            raise ValueError(f"no decodable cyclic code for n={n}, s={s} in seeds {seed}..{seed + candidates - 1}: "
                             f"{failure}")
        self._seed = best[1]
        super().__init__(n, s, _cyclic_matrix(n, s, self._seed), _cyclic_shards(n, s))

    @property
    def seed(self) -> int:
        """The seed whose draw of H built this code's matrix."""
        return self._seed


def _cyclic_shards(n: int, s: int) -> list[list[int]]:
    return [[(worker + offset) % n for offset in range(s + 1)] for worker in range(n)]


def _cyclic_matrix(n: int, s: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    h = torch.randn(s, n, generator=generator, dtype=torch.float64)
    h[:, -1] = -h[:, :-1].sum(dim=1)  # rows sum to zero: H 1 = 0
    matrix = torch.zeros(n, n, dtype=torch.float64)
    for worker, (own, *others) in enumerate(_cyclic_shards(n, s)):
        matrix[worker, own] = 1.0
        if s > 0:
            # H[:, others] x = -H[:, own]: an s x s system, invertible with probability 1.
            matrix[worker, others] = torch.linalg.solve(h[:, others], -h[:, own])
    return matrix


def _check_sizes(n: int, s: int) -> None:
    if n < 1:
        raise ValueError(f"a gradient code needs at least one worker, got n={n}")
    if not 0 <= s < n:
        raise ValueError(f"the number of stragglers s must be between 0 and n - 1 = {n - 1}, got {s}")


def _combine(coefficients: list[float], tensors: list[torch.Tensor]) -> torch.Tensor:
    """sum_i coefficients[i] * tensors[i], accumulated in float64, returned in the tensors' dtype."""
    if not tensors:
        raise ValueError("nothing to combine")
    shape, dtype = tensors[0].shape, tensors[0].dtype
    for tensor in tensors:
        if tensor.shape != shape:
            raise ValueError(f"gradients must share one shape; got {tuple(shape)} and {tuple(tensor.shape)}")
    total = torch.zeros(shape, dtype=torch.float64, device=tensors[0].device)
    for coefficient, tensor in zip(coefficients, tensors):
        total += coefficient * tensor.to(torch.float64)
    return total.to(dtype)


def _agree(first: torch.Tensor, second: torch.Tensor, relative_tolerance: float) -> bool:
    if first.shape != second.shape:
        return False
    first, second = first.to(torch.float64), second.to(torch.float64)
    if not (torch.isfinite(first).all() and torch.isfinite(second).all()):
        return False  # an honest sum of finite gradients is finite: NaN or Inf agrees with nothing
    scale = max(float(torch.linalg.vector_norm(first)), float(torch.linalg.vector_norm(second)))
    return float(torch.linalg.vector_norm(first - second)) <= relative_tolerance * scale

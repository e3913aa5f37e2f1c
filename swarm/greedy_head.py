"""Greedy tokens from the head in a quarter of its memory reads, with the float32 choice kept exactly.

A greedy step needs only the argmax of the logits, yet the float32 head is the largest weight
a client reads per token (49152 x 576 floats, 113 MB, for the embedded model), and reading it
is what a token costs. The head is first read as int8 with a bfloat16 scale per row (28 MB;
torch's `_weight_int8pack_mm`, float32 sums). Each screened logit is within a proven bound of
its float32 value, so only the tokens whose bound reaches the best one's can be the float32
argmax; those few rows get their float32 logits, and the argmax among them is the answer the
full float32 head gives (up to ties within float32 rounding, which already differ between
torch's kernels).

Why int8: memory bandwidth is what several processes on one machine share. Alone, the int8
screen takes what a bfloat16 one does (1.9 against 1.8 ms here); two at once on the 2 cores
took 1.9 ms each in int8 and 2.9 ms in bfloat16, and 4 clients beside 3 peers read their heads
at the same moment of every round (bench/concurrency.py). It needs no bfloat16 instructions,
only AVX2 or AVX512.

The screen runs on one torch thread. Two are faster on idle cores, but where the cores are
shared their barriers wait for each other: 4 clients and 3 peers on 2 cores took 10 ms per
head on two threads, 5 ms on one.

The bound, per token with weight row w, its int8 row q and scale s (d = s q - w, exact: q s
has at most 15 significant bits, so float32 holds it), and normed hidden state x (u = 2^-8,
bfloat16's unit roundoff; g = a float32 sum's error factor over the hidden size):
- x is rounded to bfloat16 (x'): |x'.(sq) - x.w| <= |x'.d| + |(x' - x).w| <= (1+u)|x||d| + u|x||w|
- the screen sums x'.(sq) in float32: at most g (1+u)|x|(|w| + |d|) off, and rounds that sum to
  bfloat16: u (1+g)(1+u)|x|(|w| + |d|) more
- the float32 head's own sum is g|x||w| off the exact logit
(norms are Euclidean; Cauchy-Schwarz throughout). The row factors are computed once per weight
(`_row_factors`, from float32 norms with a margin for their rounding), times |x| per token.
"""

from __future__ import annotations

import contextlib
import functools
import logging

import numpy as np
import torch

from protocol.packed_linear import WeightState

logger = logging.getLogger(__name__)

BFLOAT16_ROUNDOFF = 2.0**-8
FLOAT32_ROUNDOFF = 2.0**-24
# More candidates than this and the float32 head is read in full instead (a screen that bound so
# loosely saves nothing): 1024 rows of the embedded model's head are 2 MB.
MAX_CANDIDATES = 1024
# the int8 kernel reads 16 values at a time, from rows aligned in memory to that
HIDDEN_MULTIPLE = 16


@functools.cache
def vectorized_int8() -> bool:
    """Whether torch runs its int8 weight product vectorized here (AVX2 or AVX512); elsewhere it
    runs one value at a time, slower than the float32 head."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@contextlib.contextmanager
def _one_thread():
    """torch on one thread in this thread (its thread count is per calling thread), as before after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 rows [vocabulary, hidden] and bfloat16 scales [vocabulary] with scale * int8 close to
    `weight` (each scale rounded up, so no value leaves -127..127)."""
    largest = weight.abs().amax(dim=1)
    scales = torch.where(largest > 0, largest / 127 * (1 + 2.0**-7), 1.0).to(torch.bfloat16)
    quantized = torch.round(weight / scales.float().unsqueeze(1)).clamp(-127, 127).to(torch.int8).contiguous()
    return quantized, scales


def _row_factors(weight: torch.Tensor, quantized: torch.Tensor, scales: torch.Tensor) -> np.ndarray:
    """Per row, the bound above over |x|. The norms are float32 sums (relative error under
    hidden size x 2^-24, so under 1e-3 for any hidden size below 16k: hence the 1.001); the
    quantization errors themselves are exact in float32 (s q is, and the difference rounds once)."""
    row_norms = 1.001 * torch.linalg.vector_norm(weight, dim=1).double()
    error_norms = 1.001 * torch.linalg.vector_norm(quantized.float() * scales.float().unsqueeze(1) - weight,
                                                   dim=1).double()
    summed = 2 * weight.shape[1] * FLOAT32_ROUNDOFF  # a float32 sum of n products (fused or not)
    summed /= 1 - summed
    u = BFLOAT16_ROUNDOFF
    factors = ((1 + u) * error_norms + (u + summed) * row_norms
               + (summed * (1 + u) + u * (1 + summed) * (1 + u)) * (row_norms + error_norms))
    return (1.01 * factors).float().numpy()  # 1.01: the float32 norm of x per token, and this rounding


class ScreenedArgmax:
    """The float32 argmax of `inputs @ weight.T` for a few rows of inputs, read in int8 first.

    Keeps an int8 copy of the weight with its row scales and bound factors (a quarter of the
    weight's size again), remade whenever the weight is replaced or changed in place (an
    optimizer step bumps its version). `argmax` answers None where the screen cannot be used;
    the caller then reads the float32 head in full."""

    def __init__(self, require_vectorized: bool = True):
        """`require_vectorized=False` screens even where torch's int8 product is not vectorized
        (slower; for tests)."""
        self.require_vectorized = require_vectorized
        self._made_from: WeightState | None = None
        self._quantized: torch.Tensor | None = None  # [vocabulary, hidden] int8
        self._scales: torch.Tensor | None = None  # [vocabulary] bfloat16
        self._row_factors: np.ndarray | None = None  # the bound per row, over |x|
        self.screened = 0  # tokens chosen by the screen (for tests and benches)
        self.candidates = 0  # float32 rows those tokens needed, in all

    def usable(self, inputs: torch.Tensor, weight: torch.Tensor) -> bool:
        return ((vectorized_int8() or not self.require_vectorized) and hasattr(torch, "_weight_int8pack_mm")
                and weight.dtype == inputs.dtype == torch.float32 and weight.device.type == "cpu"
                and inputs.dim() == 2 and weight.dim() == 2 and weight.shape[0] > MAX_CANDIDATES
                and weight.shape[1] % HIDDEN_MULTIPLE == 0
                and not (torch.is_grad_enabled() and (inputs.requires_grad or weight.requires_grad)))

    def screen(self, inputs: torch.Tensor) -> torch.Tensor:
        """The screened logits [rows, vocabulary] (bfloat16) of the weight last prepared."""
        rows = torch.empty(inputs.shape, dtype=torch.bfloat16)  # a new, aligned buffer: the kernel needs one
        rows.copy_(inputs)
        return torch._weight_int8pack_mm(rows, self._quantized, self._scales)

    def argmax(self, inputs: torch.Tensor, weight: torch.Tensor, banned: list[int] = ()) -> torch.Tensor | None:
        """Per row of `inputs` [rows, hidden], the index of its largest logit over `weight`
        [vocabulary, hidden], never one of `banned`; None where the screen cannot tell (no
        vectorized int8 product here, a non-finite value, too many candidates)."""
        if not self.usable(inputs, weight):
            return None
        with torch.no_grad(), _one_thread():
            self.prepare(weight)
            screen = self.screen(inputs).float().numpy()
            # the choice in numpy: a few passes over a vocabulary-sized row, 0.14 ms here
            bound = self._row_factors * np.linalg.norm(inputs.detach().numpy(), axis=1, keepdims=True)
            if banned:
                screen[:, list(banned)] = -np.inf
            lowest_best = (screen - bound).max(axis=1, keepdims=True)  # the argmax is at least this
            if not np.isfinite(lowest_best).all():  # NaN anywhere, an overflow, or every token banned
                return None
            columns = np.flatnonzero((screen + bound >= lowest_best).any(axis=0))
            if columns.size > MAX_CANDIDATES:
                logger.debug(f"{columns.size} candidate tokens: reading the float32 head instead")
                return None
            # float32 logits of the candidates; a column possible for another row only is below this
            # row's best (its bound says so), so the union of the rows' candidates gives each its argmax
            candidates = torch.from_numpy(columns)
            exact = inputs @ weight.index_select(0, candidates).T
            self.screened += inputs.shape[0]
            self.candidates += columns.size
            return candidates[exact.argmax(dim=1)]

    def prepare(self, weight: torch.Tensor) -> None:
        if self._made_from is not None and self._made_from.matches(weight):
            return
        detached = weight.detach()
        self._quantized, self._scales = quantize_rows(detached)
        self._row_factors = _row_factors(detached, self._quantized, self._scales)
        self._made_from = WeightState(weight)

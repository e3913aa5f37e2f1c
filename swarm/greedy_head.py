"""Greedy tokens from the head in half its memory reads, with the float32 choice kept exactly.

A greedy step needs only the argmax of the logits, yet the float32 head is the largest weight
a client reads per token (49152 x 576 floats, 113 MB, for the embedded model), and reading it
is what a token costs. The head is first read in bfloat16 (half the bytes; 1.5 against 3.2 ms
per token on one thread here, with oneDNN's packed weights and AVX512-BF16). Each screened
logit is within a proven bound of its float32 value, so only the tokens whose bound reaches the
best one's can be the float32 argmax; those few rows get their float32 logits, and the argmax
among them is the answer the full float32 head gives (up to ties within float32 rounding,
which already differ between torch's kernels).

The screen runs on one torch thread. Two are faster on idle cores (1.2 against 1.8 ms), but
where the cores are shared their barriers wait for each other: 4 clients and 3 peers on 2 cores
took 10 ms per head on two threads, 5 ms on one.

The bound, per token v with weight row w and normed hidden state x (u = 2^-8, bfloat16's unit
roundoff; g = the float32 sum's error factor over the hidden size):
|screen_v - float32_v| <= (2u + u^2 + 3g) |w|.|x| + 1.01 u |screen_v|: the rounding of w and
x to bfloat16, the float32 accumulation of both products, and the screen's rounding of its
output to bfloat16. As |screen_v| <= (1 + 3.1u) |w|.|x|, and |w|.|x| <= ||w||_2 ||x||_2
(Cauchy-Schwarz), one term bounds it all: (3.01u + 5u^2 + 3g) ||w||_2 ||x||_2, from row norms
computed once per weight (`_error_factor`).
"""

from __future__ import annotations

import contextlib
import functools
import logging

import numpy as np
import torch

from protocol.packed_linear import PACKING_ROWS, WeightState, packing_available

logger = logging.getLogger(__name__)

BFLOAT16_ROUNDOFF = 2.0**-8
FLOAT32_ROUNDOFF = 2.0**-24
# More candidates than this and the float32 head is read in full instead (a screen that bound so
# loosely saves nothing): 1024 rows of the embedded model's head are 2 MB.
MAX_CANDIDATES = 1024


@functools.cache
def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX): elsewhere oneDNN
    emulates it and the screen would be no faster than the float32 head."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


@contextlib.contextmanager
def _one_thread():
    """torch on one thread in this thread (its thread count is per calling thread), as before after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _error_factor(terms: int) -> float:
    """The bound above over ||w||_2 ||x||_2, for sums of `terms` products."""
    accumulated = 2 * terms * FLOAT32_ROUNDOFF  # the screen may round twice per pair (VDPBF16PS), once per term
    accumulated /= 1 - accumulated
    roundoff = BFLOAT16_ROUNDOFF
    return 1.01 * (3.01 * roundoff + 5 * roundoff**2 + 3 * accumulated)  # 1.01: the norms' own rounding


class ScreenedArgmax:
    """The float32 argmax of `inputs @ weight.T` for a few rows of inputs, read in bfloat16 first.

    Keeps a packed bfloat16 copy of the weight and its row norms (half the weight's size again),
    remade whenever the weight is replaced or changed in place (an optimizer step bumps its
    version). `argmax` answers None where the screen cannot be used; the caller then reads the
    float32 head in full."""

    def __init__(self, require_native: bool = True):
        """`require_native=False` screens even where bfloat16 is emulated (slower; for tests)."""
        self.require_native = require_native
        self._made_from: WeightState | None = None
        self._packed: torch.Tensor | None = None
        self._scaled_norms: np.ndarray | None = None  # each row's norm times _error_factor
        self.screened = 0  # tokens chosen by the screen (for tests and benches)
        self.candidates = 0  # float32 rows those tokens needed, in all

    def usable(self, inputs: torch.Tensor, weight: torch.Tensor) -> bool:
        return (packing_available() and (native_bfloat16() or not self.require_native)
                and weight.dtype == inputs.dtype == torch.float32 and weight.device.type == "cpu"
                and inputs.dim() == 2 and weight.dim() == 2 and weight.shape[0] > MAX_CANDIDATES
                and not (torch.is_grad_enabled() and (inputs.requires_grad or weight.requires_grad)))

    def argmax(self, inputs: torch.Tensor, weight: torch.Tensor, banned: list[int] = ()) -> torch.Tensor | None:
        """Per row of `inputs` [rows, hidden], the index of its largest logit over `weight`
        [vocabulary, hidden], never one of `banned`; None where the screen cannot tell (no
        oneDNN or bfloat16 here, a non-finite value, too many candidates)."""
        if not self.usable(inputs, weight):
            return None
        with torch.no_grad(), _one_thread():
            self._prepare(weight)
            screen = torch.ops.mkldnn._linear_pointwise(inputs.to(torch.bfloat16).contiguous(), self._packed, None,
                                                        "none", [], "").float().numpy()
            # the choice in numpy: a few passes over a vocabulary-sized row, 0.14 ms here
            bound = self._scaled_norms * np.linalg.norm(inputs.detach().numpy(), axis=1, keepdims=True)
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

    def _prepare(self, weight: torch.Tensor) -> None:
        if self._made_from is not None and self._made_from.matches(weight):
            return
        detached = weight.detach()
        self._packed = torch.ops.mkldnn._reorder_linear_weight(detached.to(torch.bfloat16).contiguous(),
                                                               PACKING_ROWS)
        self._scaled_norms = (_error_factor(detached.shape[1]) * torch.linalg.vector_norm(detached, dim=1)).numpy()
        self._made_from = WeightState(weight)

"""Greedy tokens from an int8 copy of the head, with the float32 choice kept exactly.

A greedy step needs only the argmax of the logits, yet the float32 head is the largest weight
a client reads per token (49152 x 576 floats, 113 MB, for the embedded model), and reading it
is what a token costs. The head is first read as int8 with a scale per row (28 MB). Each
screened logit is within a proven bound of its float32 value, so only the tokens whose bound
reaches the best one's can be the float32 argmax; those few rows get their float32 logits, and
the argmax among them is the answer the full float32 head gives (up to ties within float32
rounding, which already differ between torch's kernels).

Two screens, the first one this torch can run:
1. `_TwoPassScreen` (fbgemm, x86): int8 inputs times int8 weights, summed exactly in int32,
   float32 outputs (`quantized::linear_with_input_q_dq_qweight_dq_output_fp32`). One int8 pass
   of x is far too coarse (the final norm's outputs have outliers: largest over root mean square
   9.5 to 19.5 on the embedded model, and a rigorous bound left thousands of candidates), so x
   goes in as two rows: x at scale s, and 64 times what that missed, at the same scale. Their
   sum is x to s/128 per value. On the AMD CPU of bench/concurrency.py, a token took 2.0 ms
   against 5.0 ms with the second screen (bench/greedy_head.py), whose kernel computes there at
   about 5 GB/s.
2. `_Int8PackScreen` (torch's `_weight_int8pack_mm`, AVX2 or AVX512): bfloat16 inputs times
   int8 weights with a bfloat16 scale per row, float32 sums.
Elsewhere (no fbgemm and no vectorized int8 product), the float32 head is read in full.

Why int8: memory bandwidth is what several processes on one machine share. Two bfloat16
screens at once on the 2 cores of an earlier machine took 2.9 ms each, two int8 ones 1.9 ms,
and 4 clients beside 3 peers read their heads at the same moment of every round
(bench/concurrency.py).

The screen runs on one torch thread. Two are faster on idle cores, but where the cores are
shared their barriers wait for each other: 4 clients and 3 peers on 2 cores took 10 ms per
head on two threads, 5 ms on one.

Notation for the bounds: weight row w, its int8 row q and scale t (d = t q - w, its error,
computed exactly once per weight), normed hidden state x; u = 2^-24, float32's unit roundoff;
g = a float32 sum's error factor over the hidden size. Norms are Euclidean, Cauchy-Schwarz
throughout, and the float32 head's own sum is g|x||w| off the exact logit, so that term is in
both bounds.

The two-pass screen. The kernel rounds x/s to integers k1 (zero point 64, |k1| <= 63: inputs
stay within 7 bits, so AVX2 kernels without VNNI, which add pairs of products in int16, cannot
saturate), and 64 r/s to k2, where r = x - s k1 (computed here in float64, passed as float32).
Its input is then x'' = s k1 + s k2 / 64, with e = x - x'' known per value: |e_i| <= s/128
plus the float32 rounding of 64 r. k1 must be the kernel's integers, so a scale that leaves a
value within 1e-4 of a rounding tie is nudged (the kernel's own float32 steps move values by
under 2e-5 of a step); ties in the second row only change which side of s/128 the error falls
on, and are counted at the worst. Then
- |x''.(t q) - x.w| <= |x''||d| + |e||w|, the products themselves exact in int32
- each output row is scaled to float32 (a few roundings: 6u), and the two rows are added
  (1u); in case the kernel sums in float32 after all, g more, all of (|x1| + |x2|)(|w| + |d|)
  with x1 = s k1 and x2 = s k2 / 64.
The int8pack screen, with x rounded to bfloat16 (x', v = 2^-8):
- |x'.(t q) - x.w| <= |x'.d| + |(x' - x).w| <= (1+v)|x||d| + v|x||w|
- it sums x'.(t q) in float32: at most g (1+v)|x|(|w| + |d|) off, and rounds that sum to
  bfloat16: v (1+g)(1+v)|x|(|w| + |d|) more
(there q t has at most 15 significant bits, so d is exact in float32). The row factors are
computed once per weight, from float32 or float64 norms with a margin for their rounding.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import warnings

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


def _float32_sum_error(terms: int) -> float:
    """g: a float32 sum of `terms` products (fused or not) is within g times the sum of their
    magnitudes of the exact sum."""
    summed = 2 * terms * FLOAT32_ROUNDOFF
    return summed / (1 - summed)


@functools.cache
def vectorized_int8() -> bool:
    """Whether torch runs its int8 weight product vectorized here (AVX2 or AVX512); elsewhere it
    runs one value at a time, slower than the float32 head."""
    return torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")


@functools.cache
def two_pass_available() -> bool:
    """Whether fbgemm's int8 product with float32 outputs runs here, vectorized, and computes what
    the bound assumes: checked once on a small product against its exact integer sums (torch
    marks quantized tensors deprecated; where they are gone, the other screen is used)."""
    if not ("fbgemm" in torch.backends.quantized.supported_engines and vectorized_int8()):
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        weight = torch.randn(64, 96, generator=generator)
        inputs = torch.randn(2, 96, generator=generator)
        screen = _TwoPassScreen(weight)
        scale, first = screen._scale(inputs.double())
        outputs = _int8_product(inputs, scale, screen.packed)
        quantized = _quantize(weight, screen.scales)[1].int_repr().double()
        exact = scale * (first @ quantized.T) * screen.scales.unsqueeze(0)
        return bool(((outputs.double() - exact).abs() <= 8 * FLOAT32_ROUNDOFF * exact.abs() + 1e-30).all())
    except Exception as error:  # an API gone or changed: the screen must not guess
        logger.debug(f"fbgemm's int8 product is not usable here: {error}")
        return False


def _quantize(weight: torch.Tensor, scales: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """float32-representable scales per row (float64), rounded up so that no value leaves
    -127..127, and the int8 rows as a quantized tensor."""
    if scales is None:
        largest = weight.abs().amax(dim=1).double()
        scales = torch.where(largest > 0, largest / 127 * (1 + 2.0**-20), 1.0).float().double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "quantized tensors are deprecated": checked above
        quantized = torch.quantize_per_channel(weight, scales, torch.zeros(len(scales), dtype=torch.long), 0,
                                               torch.qint8)
    return scales, quantized


def _int8_product(rows: torch.Tensor, scale: float, packed) -> torch.Tensor:
    """rows (float32) rounded to int8 at `scale` (zero point 64) times the packed int8 weight,
    summed in int32, scaled to float32."""
    return torch.ops.quantized.linear_with_input_q_dq_qweight_dq_output_fp32(rows, scale, _TwoPassScreen.ZERO_POINT,
                                                                             packed)


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
    """Per row, the int8pack screen's bound (above) over |x|. The norms are float32 sums (relative error under
    hidden size x 2^-24, so under 1e-3 for any hidden size below 16k: hence the 1.001); the
    quantization errors themselves are exact in float32 (s q is, and the difference rounds once)."""
    row_norms = 1.001 * torch.linalg.vector_norm(weight, dim=1).double()
    error_norms = 1.001 * torch.linalg.vector_norm(quantized.float() * scales.float().unsqueeze(1) - weight,
                                                   dim=1).double()
    summed = _float32_sum_error(weight.shape[1])
    u = BFLOAT16_ROUNDOFF
    factors = ((1 + u) * error_norms + (u + summed) * row_norms
               + (summed * (1 + u) + u * (1 + summed) * (1 + u)) * (row_norms + error_norms))
    return (1.01 * factors).float().numpy()  # 1.01: the float32 norm of x per token, and this rounding


class _Int8PackScreen:
    """int8 weights with a bfloat16 scale per row, bfloat16 inputs (torch's `_weight_int8pack_mm`)."""

    def __init__(self, weight: torch.Tensor):
        self.quantized, self.scales = quantize_rows(weight)
        self.row_factors = _row_factors(weight, self.quantized, self.scales)

    @staticmethod
    def usable(inputs: torch.Tensor, weight: torch.Tensor) -> bool:
        return hasattr(torch, "_weight_int8pack_mm") and weight.shape[1] % HIDDEN_MULTIPLE == 0

    def logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """The screened logits [rows, vocabulary] (bfloat16)."""
        rows = torch.empty(inputs.shape, dtype=torch.bfloat16)  # a new, aligned buffer: the kernel needs one
        rows.copy_(inputs)
        return torch._weight_int8pack_mm(rows, self.quantized, self.scales)

    def screen(self, inputs: torch.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
        """Screened logits and their bounds, [rows, vocabulary] each."""
        bound = self.row_factors * np.linalg.norm(inputs.numpy(), axis=1, keepdims=True)
        return self.logits(inputs).float().numpy(), bound


class _TwoPassScreen:
    """int8 weights with a float32 scale per row, inputs in two int8 rows (fbgemm; the module
    docstring derives the bound)."""

    LEVELS = 63  # |k1| at most: with the zero point, inputs stay in 1..127
    ZERO_POINT = 64
    RESIDUAL = 64  # the second row carries what the first missed, times this
    TIE_MARGIN = 1e-4  # how near a rounding tie a value may be where the kernel must round as here

    def __init__(self, weight: torch.Tensor):
        self.scales, quantized = _quantize(weight)  # float32 scales (what fbgemm keeps)
        self.row_norms = np.empty(len(self.scales))
        self.error_norms = np.empty(len(self.scales))
        for begin in range(0, len(self.scales), 1024):  # float64 in slices: the whole head twice over is 226 MB
            rows = slice(begin, begin + 1024)
            exact = weight[rows].double()
            rebuilt = quantized[rows].int_repr().double() * self.scales[rows].unsqueeze(1)
            self.row_norms[rows] = torch.linalg.vector_norm(exact, dim=1).numpy()
            self.error_norms[rows] = torch.linalg.vector_norm(rebuilt - exact, dim=1).numpy()
        self.row_norms *= 1.0001  # float64 norms: a margin far above their rounding
        self.error_norms *= 1.0001
        engine = torch.backends.quantized.engine
        torch.backends.quantized.engine = "fbgemm"  # packed for fbgemm's kernel, whatever the default
        try:
            self.packed = torch.ops.quantized.linear_prepack(quantized, None)
        finally:
            torch.backends.quantized.engine = engine
        self.sum_error = _float32_sum_error(weight.shape[1])

    @staticmethod
    def usable(inputs: torch.Tensor, weight: torch.Tensor) -> bool:
        return two_pass_available()

    def _scale(self, inputs: torch.Tensor) -> tuple[float, torch.Tensor] | None:
        """A float32 scale for `inputs` (float64) that leaves no value near a rounding tie, with
        the rounded values; None for zero or non-finite inputs."""
        peak = inputs.abs().max().item()
        if not (math.isfinite(peak) and peak > 0):
            return None
        scale = float(np.float32(peak / self.LEVELS))
        for _ in range(8):
            scaled = inputs / scale
            rounded = scaled.round()
            if ((scaled - rounded).abs() < 0.5 - self.TIE_MARGIN).all() and rounded.abs().max() <= self.LEVELS:
                return scale, rounded
            scale = float(np.float32(scale * (1 + 2.0**-7)))  # moves the values by up to half a step: off the tie
        return None

    def screen(self, inputs: torch.Tensor) -> tuple[np.ndarray, np.ndarray] | None:
        """Screened logits and their bounds, [rows, vocabulary] each; None where no scale fits."""
        exact = inputs.double()
        scaled = self._scale(exact)
        if scaled is None:
            return None
        scale, first = scaled
        missed = exact - scale * first  # exact in float64: scale has 24 significant bits, first under 7
        second_input = (missed * self.RESIDUAL).float()
        steps = second_input.double() / scale
        second = steps.round()
        rows = torch.cat([inputs, second_input])
        outputs = _int8_product(rows, scale, self.packed)
        count = inputs.shape[0]
        logits = outputs[:count] + outputs[count:] / self.RESIDUAL
        # e = x - x'': per value exact, or at the worst where the kernel may round the second row the other way
        part_one, part_two = scale * first, scale * second / self.RESIDUAL
        error = (missed - part_two).abs()
        near_tie = (steps - second).abs() >= 0.5 - self.TIE_MARGIN
        worst = (missed - second_input.double() / self.RESIDUAL).abs() + scale / (2 * self.RESIDUAL) * (1 + 1e-3)
        error = torch.where(near_tie, worst, error)
        error_norm = torch.linalg.vector_norm(error, dim=1, keepdim=True).numpy() * 1.0001
        norm = torch.linalg.vector_norm(exact, dim=1, keepdim=True).numpy() * 1.0001
        # |x1| + |x2| of the kernel's rows: its second row may be a step off here at near ties
        parts = (torch.linalg.vector_norm(part_one, dim=1, keepdim=True)
                 + torch.linalg.vector_norm(part_two, dim=1, keepdim=True)
                 + scale / self.RESIDUAL * near_tie.sum(dim=1, keepdim=True).sqrt()).numpy() * 1.0001
        kernel = (7 * FLOAT32_ROUNDOFF + self.sum_error) * parts
        bound = (self.error_norms * (norm + error_norm + kernel)
                 + self.row_norms * (error_norm + kernel + self.sum_error * norm))
        return logits.numpy(), bound


SCREENS = {"two-pass": _TwoPassScreen, "int8pack": _Int8PackScreen}


class ScreenedArgmax:
    """The float32 argmax of `inputs @ weight.T` for a few rows of inputs, read in int8 first.

    Keeps an int8 copy of the weight with its row scales and bound factors (a quarter of the
    weight's size again), remade whenever the weight is replaced or changed in place (an
    optimizer step bumps its version). `argmax` answers None where the screen cannot be used;
    the caller then reads the float32 head in full."""

    def __init__(self, require_vectorized: bool = True, screens: tuple[str, ...] = ("two-pass", "int8pack")):
        """`screens`: the screens to use, the first usable one (see SCREENS);
        `require_vectorized=False` screens even where torch's int8 product is not vectorized
        (slower; for tests)."""
        self.require_vectorized = require_vectorized
        self.screens = screens
        self._made_from: WeightState | None = None
        self._screen: _TwoPassScreen | _Int8PackScreen | None = None
        self.screened = 0  # tokens chosen by the screen (for tests and benches)
        self.candidates = 0  # float32 rows those tokens needed, in all

    def _kind(self, inputs: torch.Tensor, weight: torch.Tensor) -> type | None:
        if not (weight.dtype == inputs.dtype == torch.float32 and weight.device.type == "cpu"
                and inputs.dim() == 2 and weight.dim() == 2 and weight.shape[0] > MAX_CANDIDATES
                and not (torch.is_grad_enabled() and (inputs.requires_grad or weight.requires_grad))):
            return None
        for name in self.screens:
            kind = SCREENS[name]
            if kind is _Int8PackScreen and self.require_vectorized and not vectorized_int8():
                continue
            if kind.usable(inputs, weight):
                return kind
        return None

    def usable(self, inputs: torch.Tensor, weight: torch.Tensor) -> bool:
        return self._kind(inputs, weight) is not None

    def argmax(self, inputs: torch.Tensor, weight: torch.Tensor, banned: list[int] = ()) -> torch.Tensor | None:
        """Per row of `inputs` [rows, hidden], the index of its largest logit over `weight`
        [vocabulary, hidden], never one of `banned`; None where the screen cannot tell (no
        int8 product here, a non-finite value, too many candidates)."""
        kind = self._kind(inputs, weight)
        if kind is None:
            return None
        with torch.no_grad(), _one_thread():
            inputs = inputs.detach()
            screened = self.prepare(weight, kind).screen(inputs)
            if screened is None:
                return None
            # the choice in numpy: a few passes over a vocabulary-sized row
            screen, bound = screened
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

    def prepare(self, weight: torch.Tensor, kind: type | None = None) -> _TwoPassScreen | _Int8PackScreen:
        """The screen of `weight` (made once per weight and version), of the given kind or the
        first usable one."""
        kind = kind or self._kind(torch.empty(1, weight.shape[1]), weight.detach())
        if kind is None:
            raise ValueError("no int8 screen can run here for this weight")
        if self._made_from is None or not self._made_from.matches(weight) or type(self._screen) is not kind:
            self._screen = kind(weight.detach())
            self._made_from = WeightState(weight)
        return self._screen

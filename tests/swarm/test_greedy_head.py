"""The screened greedy head picks the float32 argmax, with each of its screens: random heads,
near-ties below the int8 screen's resolution, banned tokens, and the cases where it must hand
over to the full float32 head."""

import math

import pytest
import torch

from swarm.greedy_head import (MAX_CANDIDATES, ScreenedArgmax, _quantize, _TwoPassScreen, quantize_rows,
                                two_pass_available)

VOCABULARY, HIDDEN = 8192, 96
RUNS = {"two-pass": pytest.mark.skipif(not two_pass_available(), reason="no fbgemm int8 product on this machine"),
        "int8pack": pytest.mark.skipif(not hasattr(torch, "_weight_int8pack_mm"),
                                       reason="this torch has no int8 weight product")}
SCREENS = [pytest.param(name, marks=mark) for name, mark in RUNS.items()]


def screened_argmax(name: str) -> ScreenedArgmax:
    return ScreenedArgmax(require_vectorized=False, screens=(name,))  # where int8 is not vectorized too: slower


def head(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(VOCABULARY, HIDDEN, generator=generator) * 0.1


@pytest.mark.parametrize("name", SCREENS)
def test_random_heads_give_the_float32_argmax(name):
    screen = screened_argmax(name)
    for seed in range(20):
        weight = head(seed)
        inputs = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(100 + seed)) * 4
        assert torch.equal(screen.argmax(inputs, weight), (inputs @ weight.T).argmax(dim=1))
    assert screen.screened == 60
    assert screen.candidates < 60 * 20  # a screen, not the whole vocabulary


@pytest.mark.parametrize("name", SCREENS)
@pytest.mark.parametrize("gap", [3e-4, -3e-4, 1e-5, -1e-5])
def test_near_ties_below_the_screens_resolution_are_decided_in_float32(name, gap):
    """Two leading tokens whose float32 logits differ by far less than the screen resolves (the
    int8 rows' errors; and the int8pack screen's bfloat16 output's step near 10 is 0.06), one row
    with noise orthogonal to the input: the exact logits keep their gap, but the rows quantize
    differently, and the screen alone often ranks them the wrong way round."""
    screen = screened_argmax(name)
    wrong_screens = 0
    for seed in range(20):
        generator = torch.Generator().manual_seed(1000 + seed)  # not head()'s numbers
        weight = head(seed)
        inputs = torch.randn(1, HIDDEN, generator=generator)
        direction = inputs[0] / inputs[0].norm() ** 2
        noise = torch.randn(HIDDEN, generator=generator)
        noise -= (noise @ inputs[0]) * direction  # orthogonal to the input: no change to the logit
        weight[5] = 10 * direction  # a logit of 10, the largest by far
        weight[4000] = (10 + gap) * direction + noise
        logits = (inputs.double() @ weight.double().T)[0]
        expected = 4000 if logits[4000] > logits[5] else 5
        assert (expected == 4000) == (gap > 0)
        assert screen.argmax(inputs, weight).item() == expected
        screened = torch.from_numpy(screen.prepare(weight).screen(inputs)[0][0])
        wrong_screens += (screened[4000] > screened[5]) != (expected == 4000)
    assert wrong_screens > 0  # the case this test is about happened


@pytest.mark.parametrize("name", SCREENS)
def test_banned_tokens_are_never_chosen(name):
    weight, inputs = head(), torch.randn(2, HIDDEN) * 4
    logits = inputs @ weight.T
    best = logits.argmax(dim=1).tolist()
    logits[:, best] = -math.inf
    expected = logits.argmax(dim=1)
    assert torch.equal(screened_argmax(name).argmax(inputs, weight, banned=best), expected)


@pytest.mark.parametrize(("name", "looseness"), [pytest.param("two-pass", 100, marks=RUNS["two-pass"]),
                                                 pytest.param("int8pack", 20, marks=RUNS["int8pack"])])
@pytest.mark.parametrize("rows", ["parallel", "outliers", "outlier inputs"])
def test_the_bound_holds_where_it_is_tightest(name, looseness, rows):
    """The screen's error against the exact logits stays within the bound, for rows parallel to x
    (the largest products, where the output's rounding counts most), rows with one large value
    (a coarse scale: the largest quantization errors) and inputs with one large value (a coarse
    first pass for the two-pass screen). And the bound is not loose by orders of magnitude: by
    20x for the int8pack screen, whose bfloat16 outputs round by up to the bound's largest term;
    by 100x for the two-pass one, whose largest term is |x||d|, where x.d of a random rounding
    error d is about |x||d| / sqrt(hidden size)."""
    screen = screened_argmax(name)
    inputs = torch.randn(4, HIDDEN)
    weight = head()
    if rows == "parallel":
        weight[:100] = inputs[0] * torch.linspace(0.5, 2, 100).unsqueeze(1)
    elif rows == "outliers":
        weight[torch.arange(VOCABULARY), torch.arange(VOCABULARY) % HIDDEN] = 5.0
    else:
        inputs[:, 3] = 40.0
    screened, bound = screen.prepare(weight).screen(inputs)
    error = (torch.from_numpy(screened).double() - inputs.double() @ weight.double().T).abs()
    bound = torch.from_numpy(bound).double()
    assert (error <= bound).all()
    assert (error > bound / looseness).any()


@RUNS["two-pass"]
def test_two_pass_inputs_avoid_rounding_ties():
    """The kernel rounds the first pass itself: a scale that leaves a value near a tie is nudged
    until none is, so the kernel's integers are the ones the bound was computed with."""
    screen = _TwoPassScreen(head())
    inputs = torch.linspace(-1, 1, HIDDEN, dtype=torch.float64).unsqueeze(0)
    inputs[0, 0] = 63.0  # the scale starts at 1: then the values k + 0.5 are ties
    inputs[0, 1:40] = torch.arange(-19, 20, dtype=torch.float64) + 0.5
    scale, first = screen._scale(inputs)
    assert scale > 1.0  # nudged
    fractions = (inputs / scale - first).abs()
    assert (fractions < 0.5 - _TwoPassScreen.TIE_MARGIN).all() and first.abs().max() <= _TwoPassScreen.LEVELS
    assert screen._scale(torch.zeros(1, HIDDEN, dtype=torch.float64)) is None


def test_rows_quantize_within_their_scales():
    weight = head()
    weight[7] = 0.0
    quantized, scales = quantize_rows(weight)
    assert quantized.dtype == torch.int8 and scales.dtype == torch.bfloat16
    assert quantized.abs().max() <= 127 and (quantized[7] == 0).all()
    rebuilt = quantized.float() * scales.float().unsqueeze(1)
    assert ((rebuilt - weight).abs() <= scales.float().unsqueeze(1) / 2 * (1 + 1e-6)).all()
    scales, quantized = _quantize(weight)  # the two-pass screen's: float32 scales
    assert torch.equal(scales.float().double(), scales)
    integers = quantized.int_repr()
    assert integers.abs().max() <= 127 and (integers[7] == 0).all()
    error = (integers.double() * scales.unsqueeze(1) - weight.double()).abs()
    assert (error <= scales.unsqueeze(1) / 2 * (1 + 1e-5)).all()  # torch rounds w / t in float32


@pytest.mark.parametrize("name", SCREENS)
def test_the_screen_follows_changes_to_the_weight(name):
    screen, weight, inputs = screened_argmax(name), head(), torch.randn(1, HIDDEN) * 4
    first = screen.argmax(inputs, weight)
    weight.mul_(-1)  # an optimizer step changes it in place: the argmax moves
    second = screen.argmax(inputs, weight)
    assert torch.equal(second, (inputs @ weight.T).argmax(dim=1)) and not torch.equal(first, second)


@pytest.mark.parametrize("name", SCREENS)
def test_cases_the_screen_hands_over_to_the_float32_head(name):
    screen, weight = screened_argmax(name), head()
    assert screen.argmax(torch.full((1, HIDDEN), math.nan), weight) is None
    assert screen.argmax(torch.randn(1, HIDDEN), torch.ones(VOCABULARY, HIDDEN)) is None  # every token ties
    assert screen.argmax(torch.randn(1, HIDDEN), weight, banned=list(range(VOCABULARY))) is None
    assert screen.argmax(torch.randn(1, HIDDEN), weight[:MAX_CANDIDATES]) is None  # too small to screen
    assert screen.argmax(torch.randn(1, HIDDEN).double(), weight.double()) is None
    trainable = weight.clone().requires_grad_(True)
    assert screen.argmax(torch.randn(1, HIDDEN), trainable) is None  # autograd wants the full product
    assert screen.screened == 0


@pytest.mark.parametrize("name", SCREENS)
def test_inputs_that_require_grad_are_screened_when_autograd_is_off(name):
    screen, weight = screened_argmax(name), head()
    inputs = (torch.randn(2, HIDDEN) * 4).requires_grad_(True)
    with torch.no_grad():
        assert torch.equal(screen.argmax(inputs, weight), (inputs @ weight.T).argmax(dim=1))

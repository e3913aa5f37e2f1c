"""The screened greedy head picks the float32 argmax: random heads, near-ties below bfloat16's
resolution, banned tokens, and the cases where it must hand over to the full float32 head."""

import math

import pytest
import torch

from protocol.packed_linear import packing_available
from swarm.greedy_head import MAX_CANDIDATES, ScreenedArgmax, _error_factor

pytestmark = pytest.mark.skipif(not packing_available(), reason="the screen needs oneDNN's packed weights")

VOCABULARY, HIDDEN = 8192, 96


def head(seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(VOCABULARY, HIDDEN, generator=generator) * 0.1


def test_random_heads_give_the_float32_argmax():
    screen = ScreenedArgmax(require_native=False)  # where bfloat16 is emulated too: same answers, slower
    for seed in range(20):
        weight = head(seed)
        inputs = torch.randn(3, HIDDEN, generator=torch.Generator().manual_seed(100 + seed)) * 4
        assert torch.equal(screen.argmax(inputs, weight), (inputs @ weight.T).argmax(dim=1))
    assert screen.screened == 60
    assert screen.candidates < 60 * 20  # a screen, not the whole vocabulary


@pytest.mark.parametrize("gap", [3e-4, -3e-4, 1e-5, -1e-5])
def test_near_ties_below_bfloat16_resolution_are_decided_in_float32(gap):
    """Two leading tokens whose float32 logits differ by far less than bfloat16 resolves (its step
    near 10 is 0.06), one row with noise orthogonal to the input: the exact logits keep their gap,
    but the rows round differently, and the screen alone often ranks them the wrong way round."""
    screen = ScreenedArgmax(require_native=False)
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
        screened = (inputs.to(torch.bfloat16).float() @ weight.to(torch.bfloat16).float().T)[0]
        wrong_screens += (screened[4000] > screened[5]) != (expected == 4000)
        assert screen.argmax(inputs, weight).item() == expected
    assert wrong_screens > 0  # the case this test is about happened


def test_banned_tokens_are_never_chosen():
    weight, inputs = head(), torch.randn(2, HIDDEN) * 4
    logits = inputs @ weight.T
    best = logits.argmax(dim=1).tolist()
    logits[:, best] = -math.inf
    expected = logits.argmax(dim=1)
    assert torch.equal(ScreenedArgmax(require_native=False).argmax(inputs, weight, banned=best), expected)


def test_the_bound_holds_for_the_largest_products():
    """The screen's error stays within the bound where it is tightest: a row parallel to x."""
    screen = ScreenedArgmax(require_native=False)
    inputs = torch.randn(1, HIDDEN)
    weight = head()
    weight[:100] = inputs[0] * torch.linspace(0.5, 2, 100).unsqueeze(1)
    screen.argmax(inputs, weight)
    screened = torch.ops.mkldnn._linear_pointwise(inputs.to(torch.bfloat16), screen._packed, None, "none", [], "")
    error = (screened.float() - (inputs.double() @ weight.double().T).float()).abs()
    bound = _error_factor(HIDDEN) * weight.norm(dim=1) * inputs.norm()
    assert (error <= bound).all()


def test_the_screen_follows_changes_to_the_weight():
    screen, weight, inputs = ScreenedArgmax(require_native=False), head(), torch.randn(1, HIDDEN) * 4
    first = screen.argmax(inputs, weight)
    weight.mul_(-1)  # an optimizer step changes it in place: the argmax moves
    second = screen.argmax(inputs, weight)
    assert torch.equal(second, (inputs @ weight.T).argmax(dim=1)) and not torch.equal(first, second)


def test_cases_the_screen_hands_over_to_the_float32_head():
    screen, weight = ScreenedArgmax(require_native=False), head()
    assert screen.argmax(torch.full((1, HIDDEN), math.nan), weight) is None
    assert screen.argmax(torch.randn(1, HIDDEN), torch.ones(VOCABULARY, HIDDEN)) is None  # every token ties
    assert screen.argmax(torch.randn(1, HIDDEN), weight, banned=list(range(VOCABULARY))) is None
    assert screen.argmax(torch.randn(1, HIDDEN), weight[:MAX_CANDIDATES]) is None  # too small to screen
    assert screen.argmax(torch.randn(1, HIDDEN).double(), weight.double()) is None
    trainable = weight.clone().requires_grad_(True)
    assert screen.argmax(torch.randn(1, HIDDEN), trainable) is None  # autograd wants the full product
    assert screen.screened == 0


def test_inputs_that_require_grad_are_screened_when_autograd_is_off():
    screen, weight = ScreenedArgmax(require_native=False), head()
    inputs = (torch.randn(2, HIDDEN) * 4).requires_grad_(True)
    with torch.no_grad():
        assert torch.equal(screen.argmax(inputs, weight), (inputs @ weight.T).argmax(dim=1))

import functools
import math

import pytest
import torch

from swarm import robust

NUM_HONEST, NUM_BYZANTINE, DIMENSION = 8, 2, 100

# How close each aggregator must come to the honest mean, in units of the honest spread (the
# root-mean-square distance of honest inputs to their mean). Even unattacked, a coordinate-wise
# median of 8 inputs sits about 0.3 spreads from their mean, and Krum returns one input, which is
# itself about one spread away; the bounds leave room for that and for what an attack may add.
ROBUST = {
    "median": (robust.median, 0.5),
    "trimmed_mean": (robust.trimmed_mean, 0.5),
    "centered_clip": (robust.centered_clip, 0.5),
    "krum": (robust.krum, 1.5),
    "multi_krum": (functools.partial(robust.krum, multi=NUM_HONEST - NUM_BYZANTINE), 0.6),
}


def honest_inputs(seed=0, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    return [(1.0 + 0.1 * torch.randn(DIMENSION, generator=generator, dtype=torch.float64)).to(dtype)
            for _ in range(NUM_HONEST)]


def honest_mean(honest):
    return torch.stack(honest).to(torch.float64).mean(dim=0)


def honest_spread(honest):
    rows = torch.stack(honest).to(torch.float64)
    return float(((rows - rows.mean(dim=0)).norm(dim=1) ** 2).mean().sqrt())


def byzantine_inputs(attack, honest):
    center, deviation = honest_mean(honest), torch.stack(honest).std(dim=0)
    generator = torch.Generator().manual_seed(1)
    if attack == "sign_flip":
        return [-10.0 * center] * NUM_BYZANTINE
    if attack == "scale_by_100":
        return [100.0 * tensor for tensor in honest[:NUM_BYZANTINE]]
    if attack == "large_noise":
        return [100.0 * torch.randn(DIMENSION, generator=generator, dtype=torch.float64) for _ in range(NUM_BYZANTINE)]
    if attack == "nan":
        return [torch.full_like(center, math.nan)] * NUM_BYZANTINE
    if attack == "inf":
        return [torch.full_like(center, math.inf), torch.full_like(center, -math.inf)]
    if attack == "a_little_is_enough":  # Baruch et al. 2019: shift every coordinate by z standard deviations
        return [center + 1.0 * deviation] * NUM_BYZANTINE
    if attack == "inner_product_manipulation":  # Xie et al. 2020: a small step against the honest direction
        return [-0.1 * center] * NUM_BYZANTINE
    raise AssertionError(attack)


ATTACKS = ["sign_flip", "scale_by_100", "large_noise", "nan", "inf", "a_little_is_enough", "inner_product_manipulation"]


def distance(result, target):
    return float((result.to(torch.float64) - target).norm())


@pytest.mark.parametrize("attack", ATTACKS)
@pytest.mark.parametrize("name", list(ROBUST))
def test_robust_aggregators_stay_near_the_honest_mean(name, attack):
    aggregator, bound = ROBUST[name]
    honest = honest_inputs()
    result = aggregator(honest + byzantine_inputs(attack, honest), num_byzantine=NUM_BYZANTINE)
    assert torch.isfinite(result).all()
    assert distance(result, honest_mean(honest)) < bound * honest_spread(honest)


@pytest.mark.parametrize("name", list(ROBUST))
def test_robust_aggregators_are_far_closer_than_the_mean_under_scaling(name):
    aggregator, _ = ROBUST[name]
    honest = honest_inputs()
    inputs = honest + byzantine_inputs("scale_by_100", honest)
    target = honest_mean(honest)
    assert distance(aggregator(inputs, num_byzantine=NUM_BYZANTINE), target) < distance(robust.mean(inputs), target) / 50


def test_mean_collapses_under_scaling_nan_and_inf():
    honest = honest_inputs()
    scaled = robust.mean(honest + byzantine_inputs("scale_by_100", honest))
    assert distance(scaled, honest_mean(honest)) > 50 * honest_spread(honest)
    assert not torch.isfinite(robust.mean(honest + byzantine_inputs("nan", honest))).any()
    assert not torch.isfinite(robust.mean(honest + byzantine_inputs("inf", honest))).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(robust.AGGREGATORS))
def test_equal_inputs_give_that_value_exactly(name, dtype):
    value = torch.tensor([0.1, -3.7, 1e-30, 12345.678], dtype=dtype)
    result = robust.get_aggregator(name)([value.clone() for _ in range(7)], num_byzantine=1)
    assert result.dtype == dtype
    assert torch.equal(result, value)


@pytest.mark.parametrize("name", list(robust.AGGREGATORS))
def test_dtype_and_shape_are_preserved(name):
    generator = torch.Generator().manual_seed(2)
    inputs = [torch.randn(3, 4, generator=generator, dtype=torch.float32) for _ in range(7)]
    result = robust.get_aggregator(name)(inputs, num_byzantine=1)
    assert result.dtype == torch.float32 and result.shape == (3, 4)
    assert torch.isfinite(result).all()


@pytest.mark.parametrize("name", [name for name in robust.AGGREGATORS if name != "mean"])
def test_all_non_finite_inputs_raise(name):
    inputs = [torch.full((5,), math.nan), torch.full((5,), math.inf), torch.tensor([1.0, math.nan, 0, 0, 0])]
    with pytest.raises(ValueError, match="NaN or Inf"):
        robust.get_aggregator(name)(inputs)


def test_krum_needs_two_f_plus_three_inputs():
    inputs = [torch.full((4,), float(index)) for index in range(6)]
    with pytest.raises(ValueError, match=r"at least 2 \* num_byzantine \+ 3 = 7 finite inputs .* got 6"):
        robust.krum(inputs, num_byzantine=2)
    robust.krum(inputs + [torch.zeros(4)], num_byzantine=2)  # 7 is enough


def test_krum_counts_only_finite_inputs():
    inputs = [torch.full((4,), float(index)) for index in range(6)] + [torch.full((4,), math.nan)]
    with pytest.raises(ValueError, match="got 6"):
        robust.krum(inputs, num_byzantine=2)


def test_krum_returns_one_of_the_inputs():
    honest = honest_inputs()
    inputs = honest + byzantine_inputs("scale_by_100", honest)
    result = robust.krum(inputs, num_byzantine=NUM_BYZANTINE)
    assert any(torch.equal(result, tensor) for tensor in honest)


def test_median_of_an_even_count_is_the_mean_of_the_middle_two():
    inputs = [torch.tensor([value, -value]) for value in (4.0, 1.0, 3.0, 2.0)]
    assert torch.equal(robust.median(inputs), torch.tensor([2.5, -2.5]))


def test_trimmed_mean_defaults_and_limits():
    inputs = [torch.tensor([float(value)]) for value in (0, 1, 2, 3, 4, 5, 6, 100)]
    # Without num_byzantine, a quarter of the 8 inputs is trimmed from each side: 2..5 remain.
    assert torch.equal(robust.trimmed_mean(inputs), torch.tensor([3.5]))
    assert torch.equal(robust.trimmed_mean(inputs, num_byzantine=1), robust.trimmed_mean(inputs, trim=1))
    with pytest.raises(ValueError, match="trimming 4 from each side of 8"):
        robust.trimmed_mean(inputs, trim=4)


def test_centered_clip_bounds_the_pull_of_far_inputs():
    inputs = [torch.zeros(3)] * 8 + [torch.full((3,), 1e6)] * 2
    # Start at the honest point with radius 1: each far input pulls by at most 1/10 per iteration.
    result = robust.centered_clip(inputs, num_byzantine=2, radius=1.0, iterations=1, start=torch.zeros(3))
    assert float(result.norm()) == pytest.approx(0.2)


def test_median_needs_an_honest_majority():
    with pytest.raises(ValueError, match="num_byzantine=2 with 4 finite inputs"):
        robust.median([torch.zeros(2)] * 4, num_byzantine=2)


def test_mismatched_inputs_raise():
    with pytest.raises(ValueError, match="input 1 has shape"):
        robust.median([torch.zeros(3), torch.zeros(4)])
    with pytest.raises(ValueError, match="empty"):
        robust.median([])


def test_get_aggregator_names_the_choices():
    assert robust.get_aggregator("krum") is robust.krum
    with pytest.raises(ValueError, match="mean, median, trimmed_mean, centered_clip, krum"):
        robust.get_aggregator("average")

import math
import statistics

import pytest
import torch

from swarm import attacks, robust


def honest_inputs(count=6, shape=(4, 5), seed=0, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    return [(1.0 + 0.1 * torch.randn(shape, generator=generator)).to(dtype) for _ in range(count)]


def honest_mean(honest):
    return torch.stack(honest).to(torch.float64).mean(dim=0)


@pytest.mark.parametrize("name", list(attacks.ATTACKS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_every_attack_returns_one_tensor_per_liar_in_the_inputs_shape_and_dtype(name, dtype):
    honest = honest_inputs(dtype=dtype)
    lies = attacks.get_attack(name)(honest, 3, generator=torch.Generator().manual_seed(1))
    assert len(lies) == 3
    for lie in lies:
        assert lie.shape == honest[0].shape and lie.dtype == dtype


@pytest.mark.parametrize("name", list(attacks.ATTACKS))
def test_attacks_leave_the_honest_inputs_alone(name):
    honest = honest_inputs()
    before = [tensor.clone() for tensor in honest]
    lies = attacks.get_attack(name)(honest, 2, generator=torch.Generator().manual_seed(1))
    lies[0].add_(1.0)  # each liar's tensor is its own: changing one changes nothing else
    assert all(torch.equal(tensor, copy) for tensor, copy in zip(honest, before))
    assert not any(lie is tensor for lie in lies for tensor in honest)


def test_sign_flip_scaling_and_inner_product_are_multiples_of_the_honest_mean():
    honest = honest_inputs()
    center = honest_mean(honest).to(torch.float32)
    assert all(torch.allclose(lie, -center) for lie in attacks.sign_flip(honest, 2))
    assert all(torch.allclose(lie, 100.0 * center) for lie in attacks.scaling(honest, 2))
    assert all(torch.allclose(lie, 7.0 * center) for lie in attacks.scaling(honest, 2, factor=7.0))
    assert all(torch.allclose(lie, -0.1 * center) for lie in attacks.inner_product_manipulation(honest, 2))
    assert all(torch.allclose(lie, -100.0 * center)
               for lie in attacks.inner_product_manipulation(honest, 2, epsilon=100.0))
    assert float((attacks.inner_product_manipulation(honest, 1)[0].double() * honest_mean(honest)).sum()) < 0


def test_gaussian_noise_is_large_next_to_the_honest_values_and_reproducible():
    honest = honest_inputs(shape=(10_000,))
    lies = attacks.gaussian_noise(honest, 2, generator=torch.Generator().manual_seed(3))
    honest_rms = float(torch.stack(honest).pow(2).mean().sqrt())
    for lie in lies:
        assert abs(float(lie.std()) / honest_rms - 100.0) < 5.0
        assert abs(float(lie.mean())) < 5.0 * honest_rms  # zero-mean: ~100 / sqrt(10000) = 1 RMS of error
    assert not torch.equal(lies[0], lies[1]), "each liar draws its own noise"
    again = attacks.gaussian_noise(honest, 2, generator=torch.Generator().manual_seed(3))
    assert all(torch.equal(first, second) for first, second in zip(lies, again))


def test_non_finite_cycles_nan_plus_and_minus_infinity():
    lies = attacks.non_finite(honest_inputs(), 4)
    assert torch.isnan(lies[0]).all()
    assert (lies[1] == math.inf).all() and (lies[2] == -math.inf).all()
    assert torch.isnan(lies[3]).all()


def test_a_little_is_enough_z_follows_baruch_et_al():
    # n = 8, f = 2: s = floor(8/2 + 1) - 2 = 3 peers to win over, z = Phi^-1((8 - 3) / 8)
    assert attacks.a_little_is_enough_z(8, 2) == pytest.approx(statistics.NormalDist().inv_cdf(5 / 8))
    assert attacks.a_little_is_enough_z(8, 2) == pytest.approx(0.3186, abs=1e-4)
    # n = 50, f = 12: s = 26 - 12 = 14, z = Phi^-1(36 / 50)
    assert attacks.a_little_is_enough_z(50, 12) == pytest.approx(0.5828, abs=1e-4)
    with pytest.raises(ValueError, match="majority"):
        attacks.a_little_is_enough_z(8, 5)
    with pytest.raises(ValueError, match="num_byzantine < num_peers"):
        attacks.a_little_is_enough_z(8, 8)


def test_a_little_is_enough_sends_mean_minus_z_standard_deviations():
    honest = honest_inputs(dtype=torch.float64)
    rows = torch.stack(honest)
    z = attacks.a_little_is_enough_z(8, 2)
    expected = rows.mean(dim=0) - z * rows.std(dim=0)
    assert all(torch.allclose(lie, expected) for lie in attacks.a_little_is_enough(honest, 2))
    # it hides among honest values: every coordinate within the honest range, so a coordinate-wise
    # filter cannot tell it from them
    lie = attacks.a_little_is_enough(honest, 2)[0]
    assert ((lie >= rows.min(dim=0).values) & (lie <= rows.max(dim=0).values)).all()
    explicit = attacks.a_little_is_enough(honest, 2, z=1.5)[0]
    assert torch.allclose(explicit, rows.mean(dim=0) - 1.5 * rows.std(dim=0))


def test_the_mean_falls_to_scaling_and_non_finite_attacks_the_median_does_not():
    honest = honest_inputs(shape=(100,))
    target = honest_mean(honest)
    spread = float((torch.stack(honest).double() - target).norm(dim=1).mean())
    for attack in (attacks.scaling, attacks.non_finite):
        inputs = honest + attack(honest, 2)
        assert not float((robust.mean(inputs).double() - target).norm()) < 10 * spread  # NaN compares False
        assert float((robust.median(inputs, num_byzantine=2).double() - target).norm()) < spread


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="at least one honest tensor"):
        attacks.sign_flip([], 2)
    with pytest.raises(ValueError, match="num_byzantine must be >= 0"):
        attacks.scaling(honest_inputs(), -1)
    with pytest.raises(ValueError, match="shape"):
        attacks.sign_flip([torch.zeros(3), torch.zeros(4)], 1)
    with pytest.raises(ValueError, match="unknown attack 'bit_flip'; choose one of: sign_flip"):
        attacks.get_attack("bit_flip")

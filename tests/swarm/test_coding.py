import itertools

import pytest
import torch

from swarm.coding import CyclicRepetitionCode, FractionalRepetitionCode, GradientCode

FRACTIONAL_SIZES = [(6, 2), (6, 1), (4, 1), (9, 2)]
CYCLIC_SIZES = [(6, 2), (5, 1), (7, 3), (6, 0)]
CODES = ([pytest.param(FractionalRepetitionCode, n, s, id=f"fractional-{n}-{s}") for n, s in FRACTIONAL_SIZES]
         + [pytest.param(CyclicRepetitionCode, n, s, id=f"cyclic-{n}-{s}") for n, s in CYCLIC_SIZES])
SHAPES = [pytest.param((10,), id="vector"), pytest.param((3, 5), id="matrix")]


def shard_gradients(n, shape, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {shard: torch.randn(shape, generator=generator, dtype=torch.float64) for shard in range(n)}


def messages(code: GradientCode, gradients):
    return {worker: code.encode(worker, gradients) for worker in range(code.n)}


def relative_error(result, expected):
    return float((result - expected).norm() / expected.norm())


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("code_class, n, s", CODES)
def test_any_n_minus_s_workers_decode_the_exact_sum(code_class, n, s, shape):
    code = code_class(n, s)
    gradients = shard_gradients(n, shape)
    expected = sum(gradients.values())
    encoded = messages(code, gradients)
    for workers in itertools.combinations(range(n), n - s):
        assert code.can_decode(workers)
        result = code.decode({worker: encoded[worker] for worker in workers})
        assert result.shape == shape
        assert relative_error(result, expected) < 1e-9, workers
    assert relative_error(code.decode(encoded), expected) < 1e-9  # all n workers, stragglers included


@pytest.mark.parametrize("code_class, n, s", CODES)
def test_can_decode_agrees_with_decode_for_one_worker_too_few(code_class, n, s):
    code = code_class(n, s)
    encoded = messages(code, shard_gradients(n, (4,)))
    for workers in itertools.combinations(range(n), n - s - 1):
        given = {worker: encoded[worker] for worker in workers}
        if code.can_decode(workers):
            code.decode(given)
        else:
            with pytest.raises(ValueError, match=rf"workers \[.*\] \({len(workers)} of {n}\).* any {n - s} of"):
                code.decode(given)


@pytest.mark.parametrize("n, s", FRACTIONAL_SIZES)
def test_fractional_code_needs_every_group(n, s):
    code = FractionalRepetitionCode(n, s)
    encoded = messages(code, shard_gradients(n, (4,)))
    without_last_group = {worker: encoded[worker] for worker in range(n - (s + 1))}
    assert not code.can_decode(without_last_group)
    with pytest.raises(ValueError, match=rf"no message from group {code.num_groups - 1}"):
        code.decode(without_last_group)
    # One worker per group is enough, even though that is fewer than n - s when s > 0.
    one_per_group = {code.group_workers(group)[-1]: encoded[code.group_workers(group)[-1]]
                     for group in range(code.num_groups)}
    expected = sum(shard_gradients(n, (4,)).values())
    assert relative_error(code.decode(one_per_group), expected) < 1e-12


@pytest.mark.parametrize("code_class, n, s", CODES)
def test_every_shard_is_held_by_s_plus_one_workers(code_class, n, s):
    code = code_class(n, s)
    holders = {shard: 0 for shard in range(n)}
    for worker in range(n):
        shards = code.shards(worker)
        assert len(shards) == len(set(shards)) == s + 1
        for shard in shards:
            holders[shard] += 1
    assert set(holders.values()) == {s + 1}


@pytest.mark.parametrize("code_class", [FractionalRepetitionCode, CyclicRepetitionCode])
def test_encode_names_missing_shards(code_class):
    code = code_class(6, 2)
    gradients = shard_gradients(6, (4,))
    needed = code.shards(4)
    del gradients[needed[1]]
    with pytest.raises(ValueError, match=rf"worker 4 needs .* missing shards \[{needed[1]}\]"):
        code.encode(4, gradients)


def test_encode_keeps_the_gradient_dtype():
    code = CyclicRepetitionCode(5, 1)
    gradients = {shard: tensor.float() for shard, tensor in shard_gradients(5, (3,)).items()}
    assert code.encode(2, gradients).dtype == torch.float32


def test_cyclic_code_is_reproducible():
    assert torch.equal(CyclicRepetitionCode(7, 3).matrix, CyclicRepetitionCode(7, 3).matrix)


def test_fractional_code_finds_a_liar_by_majority():
    code = FractionalRepetitionCode(6, 2)
    encoded = messages(code, shard_gradients(6, (10,)))
    assert code.disagreeing_workers(encoded) == set()
    encoded[4] = encoded[4] * -1.0
    assert code.disagreeing_workers(encoded) == {4}
    # Float noise far below the tolerance is not disagreement.
    encoded[4] = encoded[3] * (1 + 1e-9)
    assert code.disagreeing_workers(encoded) == set()


def test_fractional_code_cannot_trust_a_group_without_majority():
    code = FractionalRepetitionCode(6, 2)
    encoded = messages(code, shard_gradients(6, (10,)))
    two_of_group_zero = {0: encoded[0], 1: encoded[1] + 1.0, 3: encoded[3], 4: encoded[4]}
    assert code.disagreeing_workers(two_of_group_zero) == {0, 1}


def test_fractional_code_needs_s_plus_one_to_divide_n():
    with pytest.raises(ValueError, match="s \\+ 1 = 2 to divide n = 5"):
        FractionalRepetitionCode(5, 1)


def test_unknown_workers_and_sizes_raise():
    code = CyclicRepetitionCode(5, 1)
    with pytest.raises(ValueError, match=r"unknown workers \[7\]"):
        code.decode({7: torch.zeros(3)})
    with pytest.raises(ValueError, match="between 0 and n - 1 = 4"):
        CyclicRepetitionCode(5, 5)

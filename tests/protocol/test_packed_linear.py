import pytest
import torch
from torch import nn

from protocol import packed_linear
from protocol.packed_linear import PackedLinear, pack_linears, packing_available

needs_onednn = pytest.mark.skipif(not packing_available(), reason="this torch has no oneDNN packed linear")


def two_layers(bias: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(24, 40, bias=bias), nn.SiLU(), nn.Linear(40, 24, bias=bias))


@needs_onednn
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("rows", [1, 4, 100])
def test_packed_layers_compute_what_linear_computes(bias, rows):
    reference, packed = two_layers(bias), two_layers(bias)
    assert pack_linears(packed) == 2 and isinstance(packed[0], PackedLinear)
    inputs = torch.randn(2, rows, 24)
    with torch.inference_mode():
        assert torch.allclose(packed(inputs), reference(inputs), rtol=1e-5, atol=1e-6)
    assert torch.equal(packed[0].weight, reference[0].weight.detach())  # the dense weight, made back on demand


@needs_onednn
def test_gradients_reach_the_inputs_through_packed_layers():
    reference, packed = two_layers(True), two_layers(True)
    pack_linears(packed)
    inputs = torch.randn(3, 5, 24)
    grad_outputs = torch.randn(3, 5, 24)
    expected = torch.autograd.grad(reference(inputs.requires_grad_(True)), inputs, grad_outputs)[0]
    got = torch.autograd.grad(packed(inputs), inputs, grad_outputs)[0]
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_without_onednn_the_layers_stay_as_they_are(monkeypatch):
    monkeypatch.setattr(packed_linear, "packing_available", lambda: False)
    model = two_layers(False)
    assert pack_linears(model) == 0 and type(model[0]) is nn.Linear


@needs_onednn
def test_other_dtypes_are_not_packed():
    model = two_layers(False).to(torch.float64)
    assert pack_linears(model) == 0 and type(model[2]) is nn.Linear


@needs_onednn
def test_a_cached_packed_weight_follows_the_weights_changes():
    from protocol.packed_linear import PackedWeightCache

    weight = nn.Parameter(torch.randn(40, 24))
    cache, inputs = PackedWeightCache(), torch.randn(3, 24)
    assert cache.linear(inputs, weight) is None  # autograd wants this product: the caller uses linear
    with torch.no_grad():
        assert torch.allclose(cache.linear(inputs, weight), inputs @ weight.T, rtol=1e-5, atol=1e-5)
        weight.mul_(-2)  # an optimizer step changes it in place
        assert torch.allclose(cache.linear(inputs, weight), inputs @ weight.T, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_a_cached_packed_weight_is_remade_for_a_new_weight_or_storage():
    from protocol.packed_linear import PackedWeightCache

    cache, inputs = PackedWeightCache(), torch.randn(2, 24)
    with torch.no_grad():
        for _ in range(5):  # fresh weights, often at the id of the one just freed
            weight = torch.randn(40, 24)
            assert torch.allclose(cache.linear(inputs, weight), inputs @ weight.T, rtol=1e-5, atol=1e-5)
        weight.data = torch.randn(40, 24)
        assert torch.allclose(cache.linear(inputs, weight), inputs @ weight.T, rtol=1e-5, atol=1e-5)

"""Linear layers whose weights oneDNN has packed for the CPU.

Generation multiplies a few rows of inputs (one per session in a batch) by every weight, so its
speed is how fast the weights stream from memory. torch's default CPU path (MKL's sgemm) is
close to that for one row but not for a few: on this project's AMD machine a product with 4 rows
cost 2.2x one row (1536 x 576 weight: 229 against 524 us), which made a batch of 4 sessions
cost 1.9x one session. oneDNN's packed weights take 177-191 us for 1 to 8 rows (and 1.0
instead of 2.0 ms for a 100-token prefill), so batching sessions costs little more than one.

Same values as `nn.Linear` up to float rounding (about 1e-6 relative). Autograd reaches the
inputs (peers' backward recomputes with autograd on; the weights stay frozen). Where torch was
built without oneDNN, or for other dtypes, `pack_linears` leaves the layers as they are.
"""

from __future__ import annotations

import functools
import logging
import weakref

import torch
from torch import nn

logger = logging.getLogger(__name__)

# oneDNN picks the packed layout for this many input rows; packed for 1 row, 4 rows ran at 1.6x
# one row, packed for 64 they run at 1.05x (and one row as fast).
PACKING_ROWS = 64


@functools.cache
def packing_available() -> bool:
    """Whether this torch can pack and run linear weights with oneDNN (checked once, on a tiny layer)."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        weight = torch.ones(2, 3)
        packed = torch.ops.mkldnn._reorder_linear_weight(weight, PACKING_ROWS)
        output = torch.ops.mkldnn._linear_pointwise(torch.ones(1, 3), packed, None, "none", [], "")
        return bool(torch.equal(output, torch.full((1, 2), 3.0)))
    except (RuntimeError, AttributeError) as error:
        logger.debug(f"oneDNN packed linear layers unavailable: {error}")
        return False


class _PackedProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, inputs: torch.Tensor, layer: PackedLinear) -> torch.Tensor:
        ctx.layer = layer
        return layer.product(inputs)

    @staticmethod
    def backward(ctx, grad_outputs: torch.Tensor):
        # the dense weight only for the backward (rare next to inference steps), not kept twice
        return grad_outputs @ ctx.layer.packed.to_dense(), None


class PackedLinear(nn.Module):
    """A frozen `nn.Linear` whose weight is held only in oneDNN's packed layout."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # a plain attribute, not a parameter or buffer: state dicts and .to() never see an opaque tensor
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach().contiguous(), PACKING_ROWS)
        self.bias = None if linear.bias is None else linear.bias.detach().clone()

    def product(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(inputs.contiguous(), self.packed, self.bias, "none", [], "")

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and inputs.requires_grad:
            return _PackedProduct.apply(inputs, self)
        return self.product(inputs)

    @property
    def weight(self) -> torch.Tensor:
        """The dense weight [out, in], made on demand (for code that reads it, e.g. its dtype)."""
        return self.packed.to_dense()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, packed"


def pack_linears(module: nn.Module) -> int:
    """Replace every float32 `nn.Linear` inside `module` by a `PackedLinear`; how many were packed
    (0 where oneDNN is unavailable: the layers stay as they were)."""
    if not packing_available():
        return 0
    targets = [(parent, name, child) for parent in module.modules() for name, child in parent.named_children()
               if type(child) is nn.Linear and child.weight.dtype == torch.float32 and child.weight.device.type == "cpu"]
    for parent, name, child in targets:
        setattr(parent, name, PackedLinear(child))
    return len(targets)


class WeightState:
    """Which weight, in which state, a copy was made from: the same tensor object (its id alone
    is not enough: a freed weight's id goes to the next tensor made), at the same version (an
    in-place change bumps it) and storage (assigning `.data` replaces it)."""

    def __init__(self, weight: torch.Tensor):
        self._weight = weakref.ref(weight)
        self._state = (weight._version, weight.data_ptr())

    def matches(self, weight: torch.Tensor) -> bool:
        return self._weight() is weight and self._state == (weight._version, weight.data_ptr())


class PackedWeightCache:
    """A packed copy of a weight that stays trainable elsewhere (the client's head, tied to the
    embeddings): products without autograd use the copy, repacked whenever the weight is replaced
    or changed in place (an optimizer step bumps its version). The copy costs the weight's size
    again in memory."""

    def __init__(self):
        self._made_from: WeightState | None = None
        self._packed: torch.Tensor | None = None

    def linear(self, inputs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
        """inputs @ weight.T from the packed copy; None when it cannot be used (autograd wants this
        product, oneDNN is missing, or the weight is not a float32 CPU tensor): use `linear` then."""
        if (torch.is_grad_enabled() and (inputs.requires_grad or weight.requires_grad)) or not packing_available() \
                or weight.dtype != torch.float32 or weight.device.type != "cpu" or inputs.dtype != torch.float32:
            return None
        if self._made_from is None or not self._made_from.matches(weight):
            self._packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), PACKING_ROWS)
            self._made_from = WeightState(weight)
        return torch.ops.mkldnn._linear_pointwise(inputs.contiguous(), self._packed, None, "none", [], "")

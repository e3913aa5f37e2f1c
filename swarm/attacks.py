"""Byzantine attacks on gradient aggregation: what lying peers send, given the honest gradients.

Pure functions, so benches and tests can attack `swarm.robust` with or without a network. Each
takes the honest peers' tensors of one round and the number of liars, and returns one tensor per
liar. The attacker is omniscient, the usual (and strongest) threat model of the papers below: it
sees every honest gradient of the round before choosing its own, and all liars collude.

- `sign_flip`: the negated honest mean, sent as if it were a gradient.
- `scaling`: the honest mean times a large factor (100).
- `gaussian_noise`: zero-mean Gaussian noise, its standard deviation 100 times the honest
  gradients' typical coordinate (root mean square), so the attack is large at any gradient scale.
- `non_finite`: NaN, +Inf, -Inf, ... in turn (one overflowing or malicious peer).
- `a_little_is_enough`: per coordinate, the honest mean minus z standard deviations, z from
  Baruch, Baruch and Goldberg, "A little is enough: circumventing defenses for distributed
  learning", NeurIPS 2019: small enough to hide among honest values, consistent enough to add up.
- `inner_product_manipulation`: -epsilon times the honest mean (Xie, Koyejo and Gupta, "Fall of
  empires: breaking Byzantine-tolerant SGD by inner product manipulation", UAI 2020), which makes
  the aggregate's inner product with the true gradient negative or small.

All arithmetic is in float64; results come back in the inputs' dtype and shape.
"""

from __future__ import annotations

import math
import statistics
from typing import Callable, Sequence

import torch

Attack = Callable[..., list[torch.Tensor]]  # (honest, num_byzantine, generator=None) -> one tensor per liar


def _honest_rows(honest: Sequence[torch.Tensor], num_byzantine: int) -> torch.Tensor:
    """The honest inputs as one float64 matrix [count, numel], after checking the arguments."""
    if len(honest) == 0:
        raise ValueError("attacks need at least one honest tensor to imitate")
    if num_byzantine < 0:
        raise ValueError(f"num_byzantine must be >= 0, got {num_byzantine}")
    shape = honest[0].shape
    for index, tensor in enumerate(honest):
        if tensor.shape != shape:
            raise ValueError(f"honest input {index} has shape {tuple(tensor.shape)}, input 0 has {tuple(shape)}")
    return torch.stack([tensor.detach().reshape(-1).to(torch.float64) for tensor in honest])


def _as_inputs(values: torch.Tensor, like: torch.Tensor, num_byzantine: int) -> list[torch.Tensor]:
    # every liar sends its own copy, so a caller may modify one without touching the others
    return [values.reshape(like.shape).to(like.dtype).clone() for _ in range(num_byzantine)]


def sign_flip(honest: Sequence[torch.Tensor], num_byzantine: int,
              generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Each liar sends minus the honest mean."""
    return _as_inputs(-_honest_rows(honest, num_byzantine).mean(dim=0), honest[0], num_byzantine)


def scaling(honest: Sequence[torch.Tensor], num_byzantine: int, generator: torch.Generator | None = None,
            factor: float = 100.0) -> list[torch.Tensor]:
    """Each liar sends the honest mean times `factor`: the right direction, a step far too long."""
    return _as_inputs(factor * _honest_rows(honest, num_byzantine).mean(dim=0), honest[0], num_byzantine)


def gaussian_noise(honest: Sequence[torch.Tensor], num_byzantine: int, generator: torch.Generator | None = None,
                   scale: float = 100.0) -> list[torch.Tensor]:
    """Each liar sends independent N(0, sigma^2) noise, sigma = `scale` times the root mean square of
    the honest coordinates (scale-free: gradients shrink by orders of magnitude over training)."""
    rows = _honest_rows(honest, num_byzantine)
    sigma = scale * float(rows.pow(2).mean().sqrt())
    return [(sigma * torch.randn(rows.shape[1], generator=generator, dtype=torch.float64))
            .reshape(honest[0].shape).to(honest[0].dtype) for _ in range(num_byzantine)]


def non_finite(honest: Sequence[torch.Tensor], num_byzantine: int,
               generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """Liars send all-NaN, all-+Inf, all--Inf tensors in turn."""
    _honest_rows(honest, num_byzantine)
    values = (math.nan, math.inf, -math.inf)
    return [torch.full_like(honest[0], values[index % len(values)]) for index in range(num_byzantine)]


def a_little_is_enough_z(num_peers: int, num_byzantine: int) -> float:
    """Baruch et al.'s z_max = Phi^-1((n - s) / n), where s = floor(n/2 + 1) - f is the number of honest
    peers the liars need on their side for a majority: a fraction s / n of normally distributed honest
    values lies beyond z standard deviations, so the liars' value looks no more extreme than s honest
    ones. For n = 8, f = 2: s = 3, z = Phi^-1(0.625) = 0.32."""
    if not 0 <= num_byzantine < num_peers:
        raise ValueError(f"need 0 <= num_byzantine < num_peers, got {num_byzantine} of {num_peers}")
    needed = math.floor(num_peers / 2 + 1) - num_byzantine
    if needed <= 0:  # the liars are a majority on their own: any z "works"; the formula has no answer
        raise ValueError(f"{num_byzantine} liars of {num_peers} peers are a majority; z_max is undefined")
    return statistics.NormalDist().inv_cdf((num_peers - needed) / num_peers)


def a_little_is_enough(honest: Sequence[torch.Tensor], num_byzantine: int, generator: torch.Generator | None = None,
                       z: float | None = None) -> list[torch.Tensor]:
    """Each liar sends mean - z * std of the honest values, coordinate-wise (std with Bessel's
    correction). `z` defaults to Baruch et al.'s z_max for len(honest) + num_byzantine peers."""
    rows = _honest_rows(honest, num_byzantine)
    if z is None:
        z = a_little_is_enough_z(len(honest) + num_byzantine, num_byzantine)
    deviation = rows.std(dim=0) if rows.shape[0] > 1 else torch.zeros(rows.shape[1], dtype=torch.float64)
    return _as_inputs(rows.mean(dim=0) - z * deviation, honest[0], num_byzantine)


def inner_product_manipulation(honest: Sequence[torch.Tensor], num_byzantine: int,
                               generator: torch.Generator | None = None, epsilon: float = 0.1
                               ) -> list[torch.Tensor]:
    """Each liar sends -epsilon times the honest mean (Xie et al. 2020; small epsilon hides among
    honest values for median-like rules, large epsilon overwhelms the mean)."""
    return _as_inputs(-epsilon * _honest_rows(honest, num_byzantine).mean(dim=0), honest[0], num_byzantine)


ATTACKS: dict[str, Attack] = {
    "sign_flip": sign_flip,
    "scaling": scaling,
    "gaussian_noise": gaussian_noise,
    "non_finite": non_finite,
    "a_little_is_enough": a_little_is_enough,
    "inner_product_manipulation": inner_product_manipulation,
}


def get_attack(name: str) -> Attack:
    """The attack called `name`, for choosing one from a flag or a bench's table."""
    try:
        return ATTACKS[name]
    except KeyError:
        raise ValueError(f"unknown attack {name!r}; choose one of: {', '.join(ATTACKS)}") from None

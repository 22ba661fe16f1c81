"""Input discretisation (Panda et al. 2019): pixels rounded to 2^b levels before the network.

A perturbation smaller than half a level is erased by the rounding; what is left must move a
pixel across a level boundary. The rounding has a zero gradient almost everywhere, which masks
gradients rather than stopping attacks, so the backward pass is the identity (BPDA): attacks
are computed *through* the defence.

At 8 bits the discretiser is the identity on 8-bit images (x = k / 255).
"""

from __future__ import annotations

import torch
from torch import nn

from edgecloud.nn.quant import round_ste


def discretize(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Pixels in [0, 1] -> the nearest of 2^bits evenly spaced levels in [0, 1] (identity gradient)."""
    if not 1 <= bits <= 16:
        raise ValueError(f"input bits must lie in 1..16, got {bits}")
    top = float(2**bits - 1)
    return round_ste(x.clamp(0.0, 1.0) * top) / top


class Discretize(nn.Module):
    """:func:`discretize` as the first layer of a model."""

    def __init__(self, bits: int) -> None:
        super().__init__()
        if not 1 <= bits <= 16:
            raise ValueError(f"input bits must lie in 1..16, got {bits}")
        self.bits = int(bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return discretize(x, self.bits)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"

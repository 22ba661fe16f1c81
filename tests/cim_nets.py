"""Small networks shared by the CiM tests."""

from __future__ import annotations

import torch
from torch import nn

from edgecloud.nn.quant import QuantConv2d, QuantLinear


def mixed_precision_net() -> nn.Sequential:
    """8-bit conv, binary conv and 4-bit linear layers with BatchNorm in between (seeded, eval mode)."""
    torch.manual_seed(0)
    return nn.Sequential(
        QuantConv2d(3, 8, 3, padding=1, weight_bits=8, act_bits=8), nn.BatchNorm2d(8), nn.ReLU(),
        QuantConv2d(8, 8, 3, stride=2, padding=1, weight_bits=1, act_bits=1), nn.BatchNorm2d(8),
        nn.Flatten(), QuantLinear(8 * 4 * 4, 10, weight_bits=4, act_bits=4),
    ).eval()

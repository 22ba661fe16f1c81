"""LeNet-5 with quantized conv and linear layers (the IMAC / 6T-SRAM reproduction network).

conv5x5 6 -> pool -> conv5x5 16 -> pool -> FC 400-120-84-10, every layer a
:class:`QuantConv2d` / :class:`QuantLinear` at ``weight_bits`` / ``act_bits`` (IMAC: 4-bit
inputs, sign + 4-bit weights = ``weight_bits=5``). Inputs are pixels in [0, 1] fed to the first
layer's quantizer directly (no normalisation, so a k-bit input code is the pixel itself); later
layers see BN outputs, which their quantizers clip to [0, 1] (a ReLU1).

An edge-only classifier (not a :class:`SplitModel`): it has no cloud part and is not served as a
bundle; the CiM backends and the SRAM noise study run it directly. ``forward`` returns a list
with one logits tensor, like the split models, so the training loop handles it unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgecloud.nets.registry import register_model
from edgecloud.nn.quant import QuantConv2d, QuantLinear


class LeNet5(nn.Module):
    exit_names: list[str] = []
    final_name = "final"

    def __init__(self, num_classes: int = 10, in_channels: int = 1, weight_bits: int = 4,
                 act_bits: int = 4, image_size: int = 28) -> None:
        super().__init__()
        q = {"weight_bits": weight_bits, "act_bits": act_bits}
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        pad = 2 if image_size == 28 else 0  # 28x28 (MNIST) is padded to LeNet's 32x32
        self.conv1 = QuantConv2d(in_channels, 6, 5, 1, pad, bias=False, **q)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = QuantConv2d(6, 16, 5, bias=False, **q)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc1 = QuantLinear(400, 120, bias=False, **q)
        self.bn3 = nn.BatchNorm1d(120)
        self.fc2 = QuantLinear(120, 84, bias=False, **q)
        self.bn4 = nn.BatchNorm1d(84)
        self.fc3 = QuantLinear(84, num_classes, bias=True, **q)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(self.bn1(self.conv1(x)), 2)
        h = F.max_pool2d(self.bn2(self.conv2(h)), 2)
        h = self.bn3(self.fc1(h.flatten(1)))
        h = self.bn4(self.fc2(h))
        return self.fc3(h)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.logits(x)]


@register_model("lenet5")
def lenet5(num_classes: int = 10, weight_bits: int = 4, act_bits: int = 4, in_channels: int = 1,
           image_size: int = 28) -> LeNet5:
    return LeNet5(num_classes, in_channels, weight_bits, act_bits, image_size)

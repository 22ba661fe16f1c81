"""A small VGG-style CIFAR net with quantized layers (trains in well under an hour on 2 cores).

FP conv3x3(3->w) + BN + ReLU, then five quantized 3x3 convs (w, 2w, 2w, 4w, 4w; max-pool after
the 1st, 3rd and 5th), a quantized FC (4w x 4 x 4 -> 8w) and a full-precision classifier. Each
quantized conv takes the previous BN output and quantizes it itself (binary: sign; k-bit: clip
to [0, 1], i.e. a ReLU1), the XNOR-Net ordering. About 39 M MACs per image at ``width=32``.

Edge-only (not a :class:`SplitModel`): for the CiM backends, pruning and robustness studies.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from edgecloud.nets.cdhn import CIFAR10_MEAN, CIFAR10_STD
from edgecloud.nets.layers import Normalize, conv_bn
from edgecloud.nets.registry import register_model
from edgecloud.nn.quant import QuantConv2d, QuantLinear


class VGGSmall(nn.Module):
    exit_names: list[str] = []
    final_name = "final"

    def __init__(self, num_classes: int = 10, width: int = 32, weight_bits: int = 4, act_bits: int = 4,
                 mean=CIFAR10_MEAN, std=CIFAR10_STD) -> None:
        super().__init__()
        q = {"weight_bits": weight_bits, "act_bits": act_bits}
        self.in_channels, self.image_size, self.num_classes = 3, 32, num_classes
        self.normalize = Normalize(mean, std)
        self.stem = conv_bn(3, width)
        plan = [(width, True), (2 * width, False), (2 * width, True), (4 * width, False), (4 * width, True)]
        convs, bns, pools, cin = [], [], [], width
        for cout, pool in plan:
            convs.append(QuantConv2d(cin, cout, 3, 1, 1, bias=False, **q))
            bns.append(nn.BatchNorm2d(cout))
            pools.append(pool)
            cin = cout
        self.convs, self.bns, self.pools = nn.ModuleList(convs), nn.ModuleList(bns), pools
        self.fc1 = QuantLinear(cin * 4 * 4, 8 * width, bias=False, **q)
        self.bn_fc = nn.BatchNorm1d(8 * width)
        self.fc2 = nn.Linear(8 * width, num_classes)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.stem(self.normalize(x))
        for conv, bn, pool in zip(self.convs, self.bns, self.pools):
            h = bn(conv(h))
            if pool:
                h = F.max_pool2d(h, 2)
        h = F.relu(self.bn_fc(self.fc1(h.flatten(1))))
        return [self.fc2(h)]


@register_model("vgg_small")
def vgg_small(num_classes: int = 10, width: int = 32, weight_bits: int = 4, act_bits: int = 4) -> VGGSmall:
    return VGGSmall(num_classes, width, weight_bits, act_bits)

"""MEANet's edge blocks at k bits: the main, adaptive and extension blocks a CiM backend maps.

The full-precision MEANet (:mod:`edgecloud.nets.meanet`) has no quantized layer, so every
crossbar or SRAM backend runs its edge digitally, yet MEANet's edge is meant to be cheap
hardware. These are the same blocks with every conv and classifier quantized (k-bit weights
and activations, learned PACT ranges, as :mod:`edgecloud.nets.resnet_quant`); the stems read the
raw 8-bit pixels (normalisation folded into their weights), so a backend maps the whole edge.
Each part initialises from its full-precision counterpart, so a trained MEANet bundle is a
warm start for quantization-aware fine-tuning.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edgecloud.nets.resnet_quant import QuantBasicBlock, QuantResNet, copy_block, fold_normalised_stem
from edgecloud.nn.quant import QuantConv2d, QuantLinear


class QuantMain(QuantResNet):
    """The main block: a quantized CIFAR ResNet with the features / head split MEANet routes on."""

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(F.relu(self.stem_bn(self.stem(x))))

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return self.fc(features.mean(dim=(2, 3)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.head(self.features(x))


class QuantAdaptive(nn.Module):
    """The adaptive block (conv3x3 + three basic blocks on the raw input) at k bits."""

    def __init__(self, width: int, bits: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("pixel_mean", torch.tensor(list(mean), dtype=torch.float32))
        self.register_buffer("pixel_std", torch.tensor(list(std), dtype=torch.float32))
        self.stem = QuantConv2d(3, width, 3, 1, 1, weight_bits=bits, act_bits=8)  # the uint8 image itself
        self.stem_bn = nn.BatchNorm2d(width)
        self.blocks = nn.Sequential(
            QuantBasicBlock(width, width, 1, bits, bits), QuantBasicBlock(width, 2 * width, 2, bits, bits),
            QuantBasicBlock(2 * width, 4 * width, 2, bits, bits),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(F.relu(self.stem_bn(self.stem(x))))

    @torch.no_grad()
    def init_from(self, source: nn.Module) -> None:
        """From a full-precision :class:`~edgecloud.nets.meanet.Adaptive` (normalisation folded)."""
        norm = source.normalize
        mean, std = norm.mean.flatten(), norm.std.flatten()
        fold_normalised_stem(self.stem, self.stem_bn, source.body[0][0], source.body[0][1], mean, std)
        self.pixel_mean.copy_(mean)
        self.pixel_std.copy_(std)
        for mine, theirs in zip(self.blocks, list(source.body)[1:]):
            copy_block(mine, theirs)


class QuantHead(nn.Module):
    """Global average pool + a quantized linear classifier."""

    def __init__(self, channels: int, num_classes: int, bits: int) -> None:
        super().__init__()
        self.fc = QuantLinear(channels, num_classes, bias=True, weight_bits=bits, act_bits=bits, learn_range=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


def quant_extension(channels: int, blocks: int, bits: int) -> nn.Sequential:
    """The extension: a basic block on concat(main features, adaptive output), then ``blocks - 1``."""
    return nn.Sequential(QuantBasicBlock(2 * channels, channels, 1, bits, bits),
                         *[QuantBasicBlock(channels, channels, 1, bits, bits) for _ in range(blocks - 1)])


@torch.no_grad()
def copy_extension(mine: nn.Sequential, mine_head: QuantHead, theirs: nn.Sequential, their_head: nn.Module) -> None:
    for a, b in zip(mine, theirs):
        copy_block(a, b)
    mine_head.fc.weight.copy_(their_head.fc.weight)
    mine_head.fc.bias.copy_(their_head.fc.bias)


__all__ = ["QuantAdaptive", "QuantHead", "QuantMain", "copy_extension", "quant_extension"]

"""CIFAR ResNet with every conv and the classifier quantized: a network a crossbar maps whole.

The published crossbar-robustness studies map entire networks onto crossbars; the full-precision
ResNet-20 (:mod:`edgecloud.nets.resnet`) has no quantized layer, so every backend would run it
digitally. This family is the same network with k-bit weights and activations everywhere:

- the stem conv reads the raw pixels in [0, 1] at 8 bits, i.e. the uint8 image itself (the
  per-channel normalisation is folded into its weights and the BN after it when initialised
  from a full-precision run, exact except at the zero-padded border);
- every other conv, the 1x1 projection shortcuts and the classifier take non-negative ReLU
  outputs, clipped to a learned range (PACT) and quantized to ``act_bits``.

Edge-only (no cloud part, no early exit): ``forward`` returns ``[logits]``; exported as an
edge-only bundle, so ``--backend crossbar`` or ``sram`` runs all of it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edgecloud.nets.cdhn import CIFAR10_MEAN, CIFAR10_STD, cifar_resnet_blocks
from edgecloud.nets.registry import register_model
from edgecloud.nn.quant import QuantConv2d, QuantLinear


class QuantBasicBlock(nn.Module):
    """The CIFAR basic block with quantized convs (and a quantized 1x1 projection shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int, weight_bits: int, act_bits: int) -> None:
        super().__init__()
        q = {"weight_bits": weight_bits, "act_bits": act_bits, "learn_range": True}
        self.conv1 = QuantConv2d(cin, cout, 3, stride, 1, **q)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = QuantConv2d(cout, cout, 3, 1, 1, **q)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(QuantConv2d(cin, cout, 1, stride, 0, **q), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + self.short(x))


class QuantResNet(nn.Module):
    """raw pixels -> quantized stem -> 3 stages of quantized basic blocks -> pool -> quantized linear."""

    exit_names: list[str] = []
    final_name = "final"

    def __init__(self, depth: int = 20, num_classes: int = 10, weight_bits: int = 8, act_bits: int = 8,
                 widths: Sequence[int] = (16, 32, 64), mean: Sequence[float] = CIFAR10_MEAN,
                 std: Sequence[float] = CIFAR10_STD) -> None:
        super().__init__()
        if act_bits < 2:
            raise ValueError(f"resnet_q needs k-bit activations (act_bits >= 2), got {act_bits}")
        self.in_channels, self.image_size, self.num_classes = 3, 32, num_classes
        # what the stem's weights absorb (kept for the manifest and for init_from's folding)
        self.register_buffer("pixel_mean", torch.tensor(list(mean), dtype=torch.float32))
        self.register_buffer("pixel_std", torch.tensor(list(std), dtype=torch.float32))
        self.stem = QuantConv2d(3, widths[0], 3, 1, 1, weight_bits=weight_bits, act_bits=8)
        self.stem_bn = nn.BatchNorm2d(widths[0])
        blocks, cin = [], widths[0]
        for width, stride in cifar_resnet_blocks(depth, widths):
            blocks.append(QuantBasicBlock(cin, width, stride, weight_bits, act_bits))
            cin = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = QuantLinear(cin, num_classes, bias=True, weight_bits=weight_bits, act_bits=act_bits,
                              learn_range=True)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = F.relu(self.stem_bn(self.stem(x)))
        h = self.blocks(h)
        return [self.fc(h.mean(dim=(2, 3)))]

    @torch.no_grad()
    def init_from(self, source: nn.Module) -> list[str]:
        """Weights from a trained full-precision CIFAR ResNet of the same depth and widths (bare or
        wrapped as a cloud-only model; the normalisation is folded into the stem), or from another
        run of this family."""
        net = getattr(source, "net", source)
        if isinstance(net, QuantResNet):  # another run of this family (e.g. adversarial fine-tuning)
            try:
                self.load_state_dict(net.state_dict())
            except RuntimeError as exc:
                raise ValueError(f"init_from: the source network has another architecture: {exc}") from exc
            return []
        if not hasattr(net, "blocks") or len(net.blocks) != len(self.blocks):
            raise ValueError("init_from: the source is not a CIFAR ResNet of this depth")
        norm = net.normalize
        mean, std = norm.mean.flatten(), norm.std.flatten()
        conv, bn = net.stem[0], net.stem[1]
        self.stem.weight.copy_(conv.weight / std.view(1, -1, 1, 1))
        self.stem_bn.load_state_dict(bn.state_dict())
        # conv((x - m) / s) = conv(x / s) - sum(w m / s): a constant per channel moved into the BN
        offset = (conv.weight * (mean / std).view(1, -1, 1, 1)).sum(dim=(1, 2, 3))
        self.stem_bn.running_mean.add_(offset)
        self.pixel_mean.copy_(mean)
        self.pixel_std.copy_(std)
        for mine, theirs in zip(self.blocks, net.blocks):
            mine.conv1.weight.copy_(theirs.conv1.weight)
            mine.conv2.weight.copy_(theirs.conv2.weight)
            mine.bn1.load_state_dict(theirs.bn1.state_dict())
            mine.bn2.load_state_dict(theirs.bn2.state_dict())
            if isinstance(theirs.short, nn.Sequential):
                mine.short[0].weight.copy_(theirs.short[0].weight)
                mine.short[1].load_state_dict(theirs.short[1].state_dict())
        self.fc.weight.copy_(net.head.fc.weight)
        self.fc.bias.copy_(net.head.fc.bias)
        return []


@register_model("resnet_q")
def resnet_q(depth: int = 20, num_classes: int = 10, weight_bits: int = 8, act_bits: int = 8,
             widths: Sequence[int] = (16, 32, 64)) -> QuantResNet:
    """CIFAR ResNet with every layer quantized (edge-only; see module docstring)."""
    return QuantResNet(depth, num_classes, weight_bits, act_bits, widths=tuple(widths))

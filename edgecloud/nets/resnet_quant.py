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

``kernels`` (NAX co-design, :mod:`edgecloud.codesign.nax`): one odd kernel size per block conv,
conv1 and conv2 of every block in order (18 for ResNet-20), padding ``k // 2`` so every feature
map keeps its size. The default ``None`` is all 3: the network, its state_dict keys and shapes
are those of every bundle written before the option existed. The stem (3x3) and the 1x1
projection shortcuts keep their kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edgecloud.nets.cdhn import CIFAR10_MEAN, CIFAR10_STD, cifar_resnet_blocks
from edgecloud.nets.registry import register_model
from edgecloud.nn.quant import QuantConv2d, QuantLinear


class QuantBasicBlock(nn.Module):
    """The CIFAR basic block with quantized convs (and a quantized 1x1 projection shortcut)."""

    def __init__(self, cin: int, cout: int, stride: int, weight_bits: int, act_bits: int,
                 kernels: tuple[int, int] = (3, 3), conv: Callable[..., nn.Module] = QuantConv2d) -> None:
        super().__init__()
        q = {"weight_bits": weight_bits, "act_bits": act_bits, "learn_range": True}
        k1, k2 = kernels
        self.conv1 = conv(cin, cout, k1, stride, k1 // 2, **q)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = conv(cout, cout, k2, 1, k2 // 2, **q)
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
                 std: Sequence[float] = CIFAR10_STD, kernels: Sequence[int] | None = None) -> None:
        super().__init__()
        if act_bits < 2:
            raise ValueError(f"resnet_q needs k-bit activations (act_bits >= 2), got {act_bits}")
        layout = cifar_resnet_blocks(depth, widths)
        self.kernels = check_kernels(kernels, 2 * len(layout))
        self.arch = {"depth": depth, "num_classes": num_classes, "weight_bits": weight_bits, "act_bits": act_bits,
                     "widths": [int(w) for w in widths]}
        self.in_channels, self.image_size, self.num_classes = 3, 32, num_classes
        # what the stem's weights absorb (kept for the manifest and for init_from's folding)
        self.register_buffer("pixel_mean", torch.tensor(list(mean), dtype=torch.float32))
        self.register_buffer("pixel_std", torch.tensor(list(std), dtype=torch.float32))
        self.stem = QuantConv2d(3, widths[0], 3, 1, 1, weight_bits=weight_bits, act_bits=8)
        self.stem_bn = nn.BatchNorm2d(widths[0])
        blocks, cin = [], widths[0]
        for i, (width, stride) in enumerate(layout):
            blocks.append(self._block(cin, width, stride, weight_bits, act_bits,
                                      (self.kernels[2 * i], self.kernels[2 * i + 1])))
            cin = width
        self.blocks = nn.Sequential(*blocks)
        self.fc = QuantLinear(cin, num_classes, bias=True, weight_bits=weight_bits, act_bits=act_bits,
                              learn_range=True)

    def _block(self, cin: int, cout: int, stride: int, weight_bits: int, act_bits: int,
               kernels: tuple[int, int]) -> nn.Module:
        return QuantBasicBlock(cin, cout, stride, weight_bits, act_bits, kernels)

    def block_convs(self) -> list[tuple[str, nn.Module]]:
        """(qualified name, conv) of every block conv, in the order of ``kernels``."""
        return [(f"blocks.{i}.{part}", getattr(block, part))
                for i, block in enumerate(self.blocks) for part in ("conv1", "conv2")]

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
        if hasattr(net, "extract"):  # a NAX supernet (resnet_q_elastic): the sub-network of these kernels
            net = net.extract(self.kernels)
        if isinstance(net, QuantResNet):  # another run of this family (e.g. adversarial fine-tuning)
            # block convs of other kernel sizes: the centre crop, or zero-padded to this size
            state = fit_kernels(net.state_dict(), self.state_dict())
            try:
                self.load_state_dict(state)
            except RuntimeError as exc:
                raise ValueError(f"init_from: the source network has another architecture: {exc}") from exc
            return []
        if not hasattr(net, "blocks") or len(net.blocks) != len(self.blocks):
            raise ValueError("init_from: the source is not a CIFAR ResNet of this depth")
        norm = net.normalize
        mean, std = norm.mean.flatten(), norm.std.flatten()
        fold_normalised_stem(self.stem, self.stem_bn, net.stem[0], net.stem[1], mean, std)
        self.pixel_mean.copy_(mean)
        self.pixel_std.copy_(std)
        for mine, theirs in zip(self.blocks, net.blocks):
            copy_block(mine, theirs)
        self.fc.weight.copy_(net.head.fc.weight)
        self.fc.bias.copy_(net.head.fc.bias)
        return []


@torch.no_grad()
def fold_normalised_stem(stem: nn.Conv2d, stem_bn: nn.BatchNorm2d, conv: nn.Conv2d, bn: nn.BatchNorm2d,
                         mean: torch.Tensor, std: torch.Tensor) -> None:
    """A full-precision stem ``bn(conv((x - mean) / std))`` as ``stem_bn(stem(x))`` on raw pixels:
    exact except at the zero-padded border (padding a raw 0 is not padding a normalised 0)."""
    stem.weight.copy_(conv.weight / std.view(1, -1, 1, 1))
    stem_bn.load_state_dict(bn.state_dict())
    # conv((x - m) / s) = conv(x / s) - sum(w m / s): a constant per channel moved into the BN
    offset = (conv.weight * (mean / std).view(1, -1, 1, 1)).sum(dim=(1, 2, 3))
    stem_bn.running_mean.add_(offset)


@torch.no_grad()
def copy_block(mine: "QuantBasicBlock", theirs: nn.Module) -> None:
    """A full-precision basic block's weights into a quantized one (kernels fitted to its sizes)."""
    mine.conv1.weight.copy_(fit_kernel(theirs.conv1.weight, mine.conv1.weight.shape[-1]))
    mine.conv2.weight.copy_(fit_kernel(theirs.conv2.weight, mine.conv2.weight.shape[-1]))
    mine.bn1.load_state_dict(theirs.bn1.state_dict())
    mine.bn2.load_state_dict(theirs.bn2.state_dict())
    if isinstance(theirs.short, nn.Sequential):
        mine.short[0].weight.copy_(theirs.short[0].weight)
        mine.short[1].load_state_dict(theirs.short[1].state_dict())


def check_kernels(kernels: Sequence[int] | None, n: int) -> list[int]:
    """``kernels`` as a list of ``n`` odd positive ints (None: all 3)."""
    if kernels is None:
        return [3] * n
    out = list(kernels)
    if len(out) != n:
        raise ValueError(f"kernels: needs {n} sizes (conv1 and conv2 of each of the {n // 2} blocks), got {len(out)}")
    for k in out:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1 or k % 2 == 0:
            raise ValueError(f"kernels: every size must be an odd positive int (padding k // 2), got {kernels}")
    return out


def fit_kernel(weight: torch.Tensor, k: int) -> torch.Tensor:
    """A (O, C, kh, kw) conv weight as k x k: its centre crop, or zero-padded around it (odd sizes)."""
    have = weight.shape[-1]
    if have == k:
        return weight
    if have > k:
        a = (have - k) // 2
        return weight[..., a:a + k, a:a + k]
    p = (k - have) // 2
    return F.pad(weight, (p, p, p, p))


def fit_kernels(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``source`` with every 4-D weight whose square kernel differs from ``target``'s fitted to it."""
    out = dict(source)
    for key, value in source.items():
        want = target.get(key)
        if (want is not None and value.dim() == 4 and want.dim() == 4 and value.shape[:2] == want.shape[:2]
                and value.shape[-1] == value.shape[-2] and want.shape[-1] == want.shape[-2]
                and value.shape[-1] != want.shape[-1]):
            out[key] = fit_kernel(value, want.shape[-1]).contiguous()
    return out


@register_model("resnet_q")
def resnet_q(depth: int = 20, num_classes: int = 10, weight_bits: int = 8, act_bits: int = 8,
             widths: Sequence[int] = (16, 32, 64), kernels: Sequence[int] | None = None) -> QuantResNet:
    """CIFAR ResNet with every layer quantized (edge-only; see module docstring). ``kernels``: one odd
    size per block conv (default all 3)."""
    return QuantResNet(depth, num_classes, weight_bits, act_bits, widths=tuple(widths),
                       kernels=None if kernels is None else [int(k) for k in kernels])

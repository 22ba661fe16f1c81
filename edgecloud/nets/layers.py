"""Building blocks shared by the model families, and a MAC counter.

Edge blocks follow the XNOR-Net ordering: BN -> quantized conv (the :class:`QuantConv2d` quantizes
its own input, so BN sets the per-channel sign threshold / clipping range) -> BN, with a
full-precision residual around every quantized conv (Bi-Real style), which is what lets a binary
block train in a few epochs. Cloud blocks are plain full-precision ResNet basic blocks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edgecloud.nn.quant import QuantConv2d, QuantLayerMixin, QuantLinear


class Normalize(nn.Module):
    """(x - mean) / std per channel; the first op of every model (inputs are pixels in [0, 1])."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        if len(mean) != len(std):
            raise ValueError(f"mean and std differ in length: {len(mean)} vs {len(std)}")
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def conv_bn(cin: int, cout: int, kernel: int = 3, stride: int = 1, relu: bool = True) -> nn.Sequential:
    """Full-precision conv + BN (+ ReLU)."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    """Identity, or a full-precision 1x1 conv + BN when the shape changes."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    return conv_bn(cin, cout, kernel=1, stride=stride, relu=False)


class QuantUnit(nn.Module):
    """BN -> quantized 3x3 conv -> BN. The conv quantizes the BN output itself."""

    def __init__(self, cin: int, cout: int, stride: int, weight_bits: int, act_bits: int) -> None:
        super().__init__()
        self.pre = nn.BatchNorm2d(cin)
        self.conv = QuantConv2d(cin, cout, 3, stride, 1, bias=False, weight_bits=weight_bits, act_bits=act_bits)
        self.post = nn.BatchNorm2d(cout)
        # With a full-precision input there is no quantizer to act as the non-linearity.
        self.relu = act_bits == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.pre(x)
        if self.relu:
            h = F.relu(h)
        return self.post(self.conv(h))


class RPReLU(nn.Module):
    """ReActNet's learnable activation on the residual stream: PReLU(x - shift_in) + shift_out,
    per channel. Starts as the identity (slope 1, no shifts) so it can be inserted into a trained
    net without changing what it computes; a binary block has no other real-valued non-linearity."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.shift_in = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.slope = nn.Parameter(torch.ones(channels))
        self.shift_out = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.prelu(x - self.shift_in, self.slope.to(x.dtype)) + self.shift_out


class EdgeBlock(nn.Module):
    """Two quantized units, each with a full-precision residual (1x1 FP shortcut when needed);
    with ``stream_act`` an :class:`RPReLU` after each residual addition."""

    def __init__(self, cin: int, cout: int, stride: int = 1, weight_bits: int = 1, act_bits: int = 1,
                 stream_act: bool = False) -> None:
        super().__init__()
        self.unit1 = QuantUnit(cin, cout, stride, weight_bits, act_bits)
        self.unit2 = QuantUnit(cout, cout, 1, weight_bits, act_bits)
        self.short = shortcut(cin, cout, stride)
        self.act1 = RPReLU(cout) if stream_act else nn.Identity()
        self.act2 = RPReLU(cout) if stream_act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act1(self.unit1(x) + self.short(x))
        return self.act2(self.unit2(h) + h)


class BasicBlock(nn.Module):
    """The full-precision CIFAR ResNet basic block (He et al.), with a 1x1 projection shortcut."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return F.relu(h + self.short(x))


class ExitHead(nn.Module):
    """BN -> ReLU -> average pool to ``pool x pool`` -> full-precision linear classifier."""

    def __init__(self, channels: int, num_classes: int, pool: int = 1) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.pool = pool
        self.fc = nn.Linear(channels * pool * pool, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(x))
        h = F.adaptive_avg_pool2d(h, self.pool) if self.pool > 1 else h.mean(dim=(2, 3), keepdim=True)
        return self.fc(h.flatten(1))


class ExitBranch(nn.Module):
    """Quantized edge blocks, then an :class:`ExitHead`: a deeper exit that stays cheap.

    A linear probe on early features is a weak, poorly calibrated exit; binary blocks cost
    about 1/900 of a full-precision MAC (energy table), so a few of them in front of the
    classifier buy exit accuracy (and so edge-exit share) almost for free.
    """

    def __init__(self, cin: int, num_classes: int, blocks: Sequence[Sequence[int]], *, weight_bits: int,
                 act_bits: int, pool: int = 1, size: int | None = None,
                 block_bits: Sequence[Sequence[int]] | None = None, stream_act: bool = False) -> None:
        super().__init__()
        if block_bits is not None and len(block_bits) != len(blocks):
            raise ValueError(f"exit branch: {len(blocks)} blocks but {len(block_bits)} [weight_bits, act_bits] pairs")
        layers: list[nn.Module] = []
        for i, (width, stride) in enumerate(blocks):
            wb, ab = block_bits[i] if block_bits is not None else (weight_bits, act_bits)
            layers.append(EdgeBlock(cin, width, stride, weight_bits=wb, act_bits=ab, stream_act=stream_act))
            cin = width
            size = None if size is None else size // stride
        self.blocks = nn.Sequential(*layers)
        self.head = ExitHead(cin, num_classes, pool=pool if size is None else min(pool, size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(x))


class ClassifierHead(nn.Module):
    """Global average pool + linear (the final classifier of a ResNet; exports to ONNX cleanly)."""

    def __init__(self, channels: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean(dim=(2, 3)))


# ---- MAC counting ------------------------------------------------------------------------------

def _layer_macs(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> int:
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return output[0].numel() * (module.in_channels // module.groups) * kh * kw
    if isinstance(module, nn.Linear):
        return output[0].numel() * module.in_features
    return 0


def count_macs(
    module: nn.Module,
    input_shape: Sequence[int],
    fn: Callable[[nn.Module, torch.Tensor], object] | None = None,
    *,
    by_precision: bool = False,
) -> int | dict[str, int]:
    """MACs per sample of ``module`` on one input of ``input_shape`` (no batch dimension).

    Counts conv and linear layers (quantized ones included) with forward hooks while running
    ``fn(module, x)`` (default: ``module(x)``) on one zero sample in eval mode. With
    ``by_precision`` returns ``{"fp32": n, "mac_binary": n, "mac_int4": n, ...}`` instead.
    """
    counts: dict[str, int] = {}

    def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        key = mod.digital_event() if isinstance(mod, QuantLayerMixin) else "fp32"
        if key == "mac_fp32":
            key = "fp32"
        counts[key] = counts.get(key, 0) + _layer_macs(mod, inputs, output)

    handles = [
        m.register_forward_hook(hook)
        for m in module.modules()
        if isinstance(m, (nn.Conv2d, nn.Linear, QuantConv2d, QuantLinear))
    ]
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            x = torch.zeros(1, *input_shape)
            (fn or (lambda m, t: m(t)))(module, x)
    finally:
        for h in handles:
            h.remove()
        module.train(was_training)
    if by_precision:
        return counts
    return int(sum(counts.values()))


def reference_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """MACs per sample of the "everything to the cloud" baseline of a split model.

    Families define ``reference_forward(x)`` (the whole network at full precision, no exits);
    without it the plain forward is counted.
    """
    fn = getattr(model, "reference_forward", None)
    if fn is None:
        return int(count_macs(model, input_shape))  # type: ignore[arg-type]
    return int(count_macs(model, input_shape, lambda m, x: m.reference_forward(x)))  # type: ignore[arg-type]

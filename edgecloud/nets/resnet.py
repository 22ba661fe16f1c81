"""Full-precision CIFAR ResNet-(6n+2) (He et al. 2016): the cloud-only baseline.

Registered as a :class:`SplitModel` with no edge exit and ``offload_kind = "raw"``: the edge
forwards every raw input and the whole network runs in the cloud. Served, it is the "everything
to the cloud" reference the hybrid nets are compared with; its ``cloud_module`` (the whole net,
normalisation included) is also what MEANet uses as its cloud model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from edgecloud.exits import ExitPolicy
from edgecloud.nets.base import EdgeDecision, SplitModel
from edgecloud.nets.cdhn import CIFAR10_MEAN, CIFAR10_STD, cifar_resnet_blocks
from edgecloud.nets.layers import BasicBlock, ClassifierHead, Normalize, conv_bn
from edgecloud.nets.registry import register_model


class CifarResNet(nn.Module):
    """normalise -> conv3x3 -> 3 stages of basic blocks -> global pool -> linear (logits)."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3,
                 widths: Sequence[int] = (16, 32, 64), mean: Sequence[float] = CIFAR10_MEAN,
                 std: Sequence[float] = CIFAR10_STD) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.stem = conv_bn(in_channels, widths[0])
        blocks, cin = [], widths[0]
        for width, stride in cifar_resnet_blocks(depth, widths):
            blocks.append(BasicBlock(cin, width, stride))
            cin = width
        self.blocks = nn.Sequential(*blocks)
        self.out_channels = cin
        self.head = ClassifierHead(cin, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The last feature map (before pooling)."""
        return self.blocks(self.stem(self.normalize(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@torch.no_grad()
def load_network(target: nn.Module, source: nn.Module, mismatch: str) -> None:
    """Copy a trained CIFAR ResNet (bare, or wrapped as :class:`CloudOnly`) into ``target``, which
    must have its architecture; ``mismatch`` says what a shape or key mismatch means for the caller."""
    net = getattr(source, "net", source)
    try:
        target.load_state_dict(net.state_dict())
    except RuntimeError as exc:
        raise ValueError(f"init_from: {mismatch}: {exc}") from exc


class CloudOnly(SplitModel):
    """A SplitModel whose edge only forwards the raw input to a full-precision cloud network."""

    exit_names: list[str] = []
    offload_kind = "raw"

    def __init__(self, net: nn.Module, in_channels: int, image_size: int, num_classes: int) -> None:
        super().__init__()
        self.net = net
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.normalize = getattr(net, "normalize", None)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.net(x)]

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def init_from(self, source: nn.Module) -> list[str]:
        """All weights from a trained network of the same architecture (fine-tuning controls)."""
        load_network(self.net, source, "the source network has another architecture")
        return []

    def cloud_module(self) -> nn.Module:
        return self.net

    def offload_shape(self) -> tuple[int, ...]:
        return (self.in_channels, self.image_size, self.image_size)

    @torch.no_grad()
    def route(self, x: torch.Tensor, policy: ExitPolicy) -> EdgeDecision:
        n = x.shape[0]
        return EdgeDecision(
            probs=torch.full((n, self.num_classes), 1.0 / self.num_classes),  # no local prediction
            exit_index=torch.full((n,), -1, dtype=torch.long),
            offload_index=torch.arange(n),
            offload=x.float().contiguous(),
        )


@register_model("resnet")
def resnet(depth: int = 20, num_classes: int = 10, mean: Sequence[float] = CIFAR10_MEAN,
           std: Sequence[float] = CIFAR10_STD) -> CloudOnly:
    """CIFAR ResNet-20/32/44/56 in full precision, served cloud-only (see module docstring)."""
    return CloudOnly(CifarResNet(depth, num_classes, 3, mean=mean, std=std), 3, 32, num_classes)

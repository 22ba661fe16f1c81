"""Full-precision CIFAR ResNet-(6n+2) (He et al. 2016): the cloud-only baseline.

Registered as a :class:`SplitModel` with no edge exit and ``offload_kind = "raw"``: the edge
forwards every raw input and the whole network runs in the cloud. Served, it is the "everything
to the cloud" reference the hybrid nets are compared with; its ``cloud_module`` (the whole net,
normalisation included) is also what MEANet uses as its cloud model.

``whiten_stem`` replaces the 3x3 stem with airbench's (Jordan 2024, arXiv 2404.00498): a frozen
2x2 convolution whose filters are the eigenvectors of the covariance of the (normalised) training
images' 2x2 patches scaled to unit variance, and their negatives, then ReLU and a trained 3x3
conv + BN: the first layer starts decorrelated instead of learning it. Its weights are fitted by
``init_from_data`` (the training loop calls it on a fresh run) and saved in the state_dict.
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


class PatchWhitening(nn.Module):
    """Frozen ``kernel`` x ``kernel`` conv (no padding) onto 2 c k^2 channels: +-eigenvectors of
    the patch covariance / sqrt(eigenvalue + eps), fitted by :meth:`fit` (until then all zero)."""

    def __init__(self, in_channels: int = 3, kernel: int = 2, eps: float = 5e-4) -> None:
        super().__init__()
        d = in_channels * kernel * kernel
        self.eps = eps
        self.conv = nn.Conv2d(in_channels, 2 * d, kernel, bias=False)
        nn.init.zeros_(self.conv.weight)
        self.conv.weight.requires_grad_(False)
        self.out_channels = 2 * d

    @torch.no_grad()
    def fit(self, x: torch.Tensor, chunk: int = 500) -> None:
        """Set the filters from images ``x`` (float, [N, C, H, W], as the layer will see them)."""
        c, (kh, kw) = self.conv.in_channels, self.conv.kernel_size
        d = c * kh * kw
        cov, count = torch.zeros(d, d, dtype=torch.float64), 0
        for part in x.split(chunk):
            patches = part.double().unfold(2, kh, 1).unfold(3, kw, 1)  # [n, c, h', w', kh, kw]
            flat = patches.permute(0, 2, 3, 1, 4, 5).reshape(-1, d)
            cov += flat.T @ flat
            count += flat.shape[0]
        eigvals, eigvecs = torch.linalg.eigh(cov / max(count, 1))  # ascending; columns are eigenvectors
        filters = (eigvecs.T / torch.sqrt(eigvals.clamp_min(0) + self.eps).view(-1, 1)).flip(0)
        filters = filters.reshape(d, c, kh, kw).to(self.conv.weight.dtype)
        self.conv.weight.copy_(torch.cat([filters, -filters]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class CifarResNet(nn.Module):
    """normalise -> conv3x3 -> 3 stages of basic blocks -> global pool -> linear (logits)."""

    def __init__(self, depth: int = 20, num_classes: int = 10, in_channels: int = 3,
                 widths: Sequence[int] = (16, 32, 64), mean: Sequence[float] = CIFAR10_MEAN,
                 std: Sequence[float] = CIFAR10_STD, whiten_stem: bool = False) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        if whiten_stem:
            whiten = PatchWhitening(in_channels)
            self.stem = nn.Sequential(whiten, nn.ReLU(inplace=True), conv_bn(whiten.out_channels, widths[0]))
        else:
            self.stem = conv_bn(in_channels, widths[0])
        blocks, cin = [], widths[0]
        for width, stride in cifar_resnet_blocks(depth, widths):
            blocks.append(BasicBlock(cin, width, stride))
            cin = width
        self.blocks = nn.Sequential(*blocks)
        self.out_channels = cin
        self.head = ClassifierHead(cin, num_classes)

    @torch.no_grad()
    def init_from_data(self, images: torch.Tensor, limit: int = 5000) -> None:
        """Fit the whitening stem (if any) on the first ``limit`` training images (uint8 [N, C, H, W])."""
        if isinstance(self.stem[0], PatchWhitening):
            self.stem[0].fit(self.normalize(images[:limit].float() / 255.0))

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

    def init_from_data(self, images: torch.Tensor) -> None:
        """Data-dependent initialisation of the network (the whitening stem), from training images."""
        fn = getattr(self.net, "init_from_data", None)
        if fn is not None:
            fn(images)

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
           std: Sequence[float] = CIFAR10_STD, whiten_stem: bool = False) -> CloudOnly:
    """CIFAR ResNet-20/32/44/56 in full precision, served cloud-only (see module docstring);
    ``whiten_stem``: airbench's frozen patch-whitening first layer."""
    return CloudOnly(CifarResNet(depth, num_classes, 3, mean=mean, std=std, whiten_stem=whiten_stem),
                     3, 32, num_classes)

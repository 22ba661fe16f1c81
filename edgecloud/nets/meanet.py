"""MEANet (Long, Chakraborty, Srinivasan, Roy, ICDCS 2021): main / adaptive / extension blocks.

- **main**: a complete CIFAR ResNet over all classes (trained first, then frozen).
- **adaptive**: a small CNN on the raw input, run only for samples predicted as a hard class.
- **extension**: residual blocks on concat(main's last feature map, adaptive output), a
  classifier over the HARD classes only.
- **cloud**: a bigger full-precision ResNet on the RAW input (``offload_kind = "raw"``).

Routing per sample (:meth:`MEANet.route`): entropy of the main head above the threshold ->
cloud; else a predicted easy class -> exit 0 (main); a predicted hard class -> extension ->
exit 1. The hard-class set (the lowest-precision half of the classes of the trained main
block, picked on validation data) is a buffer, so ``edge.pt`` carries it.

``edge_bits`` (k >= 2): the main, adaptive and extension blocks with k-bit weights and
activations (:mod:`edgecloud.nets.meanet_quant`), so that a crossbar or SRAM backend maps the
whole edge; the cloud stays full precision. None (the default): the full-precision blocks, the
network of every bundle written before the option existed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edgecloud.cim.events import current_log
from edgecloud.exits import ExitPolicy
from edgecloud.nets.base import EdgeDecision, SplitModel
from edgecloud.nets.cdhn import CIFAR10_MEAN, CIFAR10_STD
from edgecloud.nets.layers import BasicBlock, ClassifierHead, Normalize, conv_bn
from edgecloud.nets.registry import register_model
from edgecloud.nets.resnet import CifarResNet, load_network

# Logit given to the non-hard classes at the extension exit (finite, so softmax/CE stay finite).
MASKED_LOGIT = -1e4


class Adaptive(nn.Module):
    """conv3x3(3->w) + BasicBlock(w) + BasicBlock(w->2w, s2) + BasicBlock(2w->4w, s2) on the raw input."""

    def __init__(self, width: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.normalize = Normalize(mean, std)
        self.body = nn.Sequential(
            conv_bn(3, width), BasicBlock(width, width), BasicBlock(width, 2 * width, 2),
            BasicBlock(2 * width, 4 * width, 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(self.normalize(x))


class MEANet(SplitModel):
    exit_names = ["main", "extension"]
    offload_kind = "raw"
    untuned_exits = (1,)  # the extension always answers what reaches it

    def __init__(self, *, main_depth: int = 20, cloud_depth: int = 56, width: int = 16,
                 num_classes: int = 10, hard_classes: Sequence[int] | None = None, num_hard: int | None = None,
                 extension_blocks: int = 4, mean: Sequence[float] = CIFAR10_MEAN,
                 std: Sequence[float] = CIFAR10_STD, edge_bits: int | None = None) -> None:
        super().__init__()
        num_hard = len(hard_classes) if hard_classes is not None else (num_hard or num_classes // 2)
        if not 1 <= num_hard < num_classes:
            raise ValueError(f"num_hard must be in [1, {num_classes - 1}], got {num_hard}")
        if edge_bits is not None and not 2 <= edge_bits <= 8:
            raise ValueError(f"edge_bits must be in [2, 8] (k-bit blocks; a binary edge is the hybrid "
                             f"family's), got {edge_bits}")
        self.in_channels, self.image_size, self.num_classes = 3, 32, num_classes
        self.edge_bits = edge_bits
        widths = (width, 2 * width, 4 * width)
        c = 4 * width
        self.cloud = CifarResNet(cloud_depth, num_classes, mean=mean, std=std)
        if edge_bits is None:
            self.main = CifarResNet(main_depth, num_classes, widths=widths, mean=mean, std=std)
            self.normalize = self.main.normalize
            self.adaptive = Adaptive(width, mean, std)
            ext = [BasicBlock(2 * c, c)] + [BasicBlock(c, c) for _ in range(extension_blocks - 1)]
            self.extension = nn.Sequential(*ext)
            self.extension_head = ClassifierHead(c, num_hard)
        else:
            from edgecloud.nets.meanet_quant import QuantAdaptive, QuantHead, QuantMain, quant_extension

            self.main = QuantMain(main_depth, num_classes, edge_bits, edge_bits, widths, mean, std)
            self.normalize = self.cloud.normalize  # the input's normalisation (the edge reads raw pixels)
            self.adaptive = QuantAdaptive(width, edge_bits, mean, std)
            self.extension = quant_extension(c, extension_blocks, edge_bits)
            self.extension_head = QuantHead(c, num_hard, edge_bits)
        self.register_buffer("hard_classes", torch.arange(num_hard, dtype=torch.long))
        if hard_classes is not None:
            self.set_hard_classes(hard_classes)

    # ---- hard classes --------------------------------------------------------------------------
    def set_hard_classes(self, classes: Sequence[int]) -> None:
        cls = torch.as_tensor(sorted(int(c) for c in classes), dtype=torch.long)
        if cls.numel() != self.hard_classes.numel() or len(set(cls.tolist())) != cls.numel():
            raise ValueError(f"need {self.hard_classes.numel()} distinct hard classes, got {classes}")
        if cls.min() < 0 or cls.max() >= self.num_classes:
            raise ValueError(f"hard classes must be in [0, {self.num_classes}), got {classes}")
        self.hard_classes.copy_(cls)

    def is_hard(self) -> torch.Tensor:
        mask = torch.zeros(self.num_classes, dtype=torch.bool, device=self.hard_classes.device)
        mask[self.hard_classes] = True
        return mask

    # ---- parts -----------------------------------------------------------------------------------
    def extension_logits(self, x: torch.Tensor, main_features: torch.Tensor) -> torch.Tensor:
        """Logits over ALL classes; the non-hard ones get ``MASKED_LOGIT``."""
        h = torch.cat([main_features.detach(), self.adaptive(x)], dim=1)
        hard_logits = self.extension_head(self.extension(h))
        full = hard_logits.new_full((x.shape[0], self.num_classes), MASKED_LOGIT)
        return full.index_copy(1, self.hard_classes, hard_logits)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = self.main.features(x)
        return [self.main.head(feats), self.extension_logits(x, feats), self.cloud(x)]

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cloud(x)

    def init_from(self, source: nn.Module) -> list[str]:
        """From a trained full-precision ResNet run (``family: resnet``) of the cloud's depth: the
        cloud (an ordinary network, so an existing one can serve; freeze it: ``freeze: [cloud]``),
        the other parts keep their fresh initialisation. From a MEANet of the same shape: every
        part, a full-precision one's blocks folded into k-bit ones when ``edge_bits`` is set (the
        warm start of quantization-aware fine-tuning), the hard classes included."""
        if isinstance(source, MEANet):
            return self._init_from_meanet(source)
        load_network(self.cloud, source, "the source is not a ResNet of cloud_depth's architecture")
        return ["main", "adaptive", "extension", "extension_head"]

    @torch.no_grad()
    def _init_from_meanet(self, source: "MEANet") -> list[str]:
        if source.hard_classes.numel() != self.hard_classes.numel():
            raise ValueError(f"init_from: the source MEANet has {source.hard_classes.numel()} hard classes, "
                             f"this one {self.hard_classes.numel()}")
        load_network(self.cloud, source.cloud, "the source MEANet's cloud has another architecture")
        self.hard_classes.copy_(source.hard_classes)
        if source.edge_bits == self.edge_bits:  # the same network: every weight
            try:
                for name in ("main", "adaptive", "extension", "extension_head"):
                    getattr(self, name).load_state_dict(getattr(source, name).state_dict())
            except RuntimeError as exc:
                raise ValueError(f"init_from: the source MEANet has another architecture: {exc}") from exc
            return []
        if source.edge_bits is not None or self.edge_bits is None:
            raise ValueError("init_from: a k-bit MEANet starts from a full-precision one or one of its own bits")
        from edgecloud.nets.meanet_quant import copy_extension

        try:
            self.main.init_from(source.main)
            self.adaptive.init_from(source.adaptive)
            copy_extension(self.extension, self.extension_head, source.extension, source.extension_head)
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"init_from: the source MEANet's blocks have another shape: {exc}") from exc
        return []

    def cloud_module(self) -> nn.Module:
        return self.cloud

    def offload_shape(self) -> tuple[int, ...]:
        return (3, self.image_size, self.image_size)

    # ---- routing ---------------------------------------------------------------------------------
    def route_outputs(self, probs: Sequence[torch.Tensor], policy: ExitPolicy) -> torch.Tensor:
        """The routing of :meth:`route` from precomputed probabilities (threshold sweeps)."""
        confident = policy.confident(probs[0], 0)
        hard = self.is_hard().cpu()[probs[0].argmax(1)]
        exit_index = torch.where(confident, torch.where(hard, 1, 0), -1)
        unsure_ext = hard & confident & ~policy.confident(probs[1], 1)
        return torch.where(unsure_ext, -1, exit_index)

    @torch.no_grad()
    def route(self, x: torch.Tensor, policy: ExitPolicy) -> EdgeDecision:
        feats = self.main.features(x)
        p0 = F.softmax(self.main.head(feats).float(), dim=1)
        probs = p0.clone()
        confident = policy.confident(p0, 0)
        hard = self.is_hard()[p0.argmax(1)]
        exit_index = torch.where(confident, 0, -1).long()
        rows = torch.nonzero(confident & hard).flatten()
        if rows.numel():
            log = current_log()
            with log.subset(rows) if log is not None else contextlib.nullcontext():
                p1 = F.softmax(self.extension_logits(x[rows], feats[rows]).float(), dim=1)
            ok = policy.confident(p1, 1)
            exit_index[rows] = torch.where(ok, 1, -1)
            probs[rows] = p1  # hard-predicted rows: the extension is the better local answer
        offload_index = torch.nonzero(exit_index == -1).flatten()
        return EdgeDecision(probs=probs, exit_index=exit_index, offload_index=offload_index,
                            offload=x[offload_index].float().contiguous())


@register_model("meanet")
def meanet(main_depth: int = 20, cloud_depth: int = 56, width: int = 16, num_classes: int = 10,
           hard_classes: Sequence[int] | None = None, num_hard: int | None = None,
           extension_blocks: int = 4, edge_bits: int | None = None) -> MEANet:
    """MEANet for CIFAR-sized inputs (see module docstring)."""
    return MEANet(main_depth=main_depth, cloud_depth=cloud_depth, width=width, num_classes=num_classes,
                  hard_classes=hard_classes, num_hard=num_hard, extension_blocks=extension_blocks,
                  edge_bits=edge_bits)

"""Conditionally deep hybrid networks (Long, Chakraborty, Roy, arXiv 2005.10851).

One ResNet cut in two: a full-precision stem and binary / k-bit edge blocks ending in one or
more early-exit heads (the edge), then full-precision blocks continuing from the edge's
intermediate feature map (the cloud). A sample whose exit is confident stops at the edge;
the others send the feature map at the split point to the cloud.

Families registered here:

- ``fmnist_hybrid``: a small net for 1x28x28 Fashion-MNIST; the edge downsamples twice so the
  offloaded feature map is 32x7x7; trains to ~90 % in a few CPU-minutes.
- ``cifar_hybrid``: the CIFAR ResNet-(6n+2) of the paper (ResNet-32: 3 stages x 5 blocks,
  widths 16/32/64) with its first ``edge_blocks`` blocks quantized and exits inside the edge.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from edgecloud.cim.events import current_log
from edgecloud.exits import ExitPolicy, softmax_entropy
from edgecloud.nets.base import EdgeDecision, SplitModel
from edgecloud.nets.layers import (
    BasicBlock, ClassifierHead, EdgeBlock, ExitBranch, ExitHead, Normalize, RPReLU, conv_bn,
)
from edgecloud.nets.registry import register_model
from edgecloud.nets.widen import widen_into

FMNIST_MEAN, FMNIST_STD = (0.2860,), (0.3530,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


class CloudTail(nn.Module):
    """The full-precision continuation: residual blocks, then global pool + linear."""

    def __init__(self, blocks: list[nn.Module], channels: int, num_classes: int) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*blocks)
        self.head = ClassifierHead(channels, num_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(features))


def _confidence_score(probs: torch.Tensor, kind: str) -> torch.Tensor:
    """Higher = more confident, in the policy's own measure (for "best edge exit so far")."""
    return -softmax_entropy(probs) if kind == "entropy" else probs.max(dim=1).values


class HybridNet(SplitModel):
    """A ResNet whose first blocks are quantized and carry early exits (see module docstring).

    ``blocks`` lists ``(width, stride)`` of every residual block after the stem; the first
    ``edge_blocks`` run on the edge (quantized, ``weight_bits``/``act_bits`` or per block
    ``block_bits``), the rest in the cloud (full precision). ``exits`` are block counts after
    which an exit head sits (1-based, increasing); the last one must be ``edge_blocks`` — the
    split point, whose feature map is what the edge offloads. ``exit_blocks`` (``(width,
    stride)`` each) puts quantized blocks in front of every exit's classifier
    (:class:`~edgecloud.nets.layers.ExitBranch`), at the bits of the block the exit follows or
    at ``exit_block_bits`` (one ``[weight_bits, act_bits]`` per exit block). ``stream_act`` adds
    a learnable :class:`~edgecloud.nets.layers.RPReLU` after every residual addition of the edge.
    """

    offload_kind = "features"

    def __init__(
        self,
        *,
        in_channels: int,
        image_size: int,
        num_classes: int,
        mean: Sequence[float],
        std: Sequence[float],
        stem_channels: int,
        stem_stride: int,
        blocks: Sequence[Sequence[int]],
        edge_blocks: int,
        exits: Sequence[int] | None = None,
        weight_bits: int = 1,
        act_bits: int = 1,
        block_bits: Sequence[Sequence[int]] | None = None,
        exit_pool: int = 1,
        exit_blocks: Sequence[Sequence[int]] | None = None,
        exit_block_bits: Sequence[Sequence[int]] | None = None,
        stream_act: bool = False,
    ) -> None:
        super().__init__()
        if not 1 <= edge_blocks < len(blocks):
            raise ValueError(f"edge_blocks must be in [1, {len(blocks) - 1}], got {edge_blocks}")
        exits = list(exits) if exits else [edge_blocks]
        if sorted(set(exits)) != exits or exits[0] < 1 or exits[-1] != edge_blocks:
            raise ValueError(
                f"exits must be increasing block counts in [1, {edge_blocks}] ending at the split "
                f"point {edge_blocks}, got {exits}"
            )
        if block_bits is not None and len(block_bits) != edge_blocks:
            raise ValueError(f"block_bits needs one [weight_bits, act_bits] per edge block ({edge_blocks})")
        self.in_channels, self.image_size, self.num_classes = in_channels, image_size, num_classes
        self.exits = exits
        self.exit_names = ["edge"] if len(exits) == 1 else [f"edge{i + 1}" for i in range(len(exits))]

        self.normalize = Normalize(mean, std)
        self.stem = conv_bn(in_channels, stem_channels, 3, stem_stride)
        size = image_size // stem_stride
        cin = stem_channels
        edge: list[nn.Module] = []
        heads: list[nn.Module] = []
        for i, (width, stride) in enumerate(blocks[:edge_blocks]):
            wb, ab = block_bits[i] if block_bits is not None else (weight_bits, act_bits)
            edge.append(EdgeBlock(cin, width, stride, weight_bits=wb, act_bits=ab, stream_act=stream_act))
            cin, size = width, size // stride
            if i + 1 in exits:
                if exit_blocks:
                    heads.append(ExitBranch(width, num_classes, exit_blocks, weight_bits=wb, act_bits=ab,
                                            pool=exit_pool, size=size, block_bits=exit_block_bits,
                                            stream_act=stream_act))
                else:
                    heads.append(ExitHead(width, num_classes, pool=min(exit_pool, size)))
        self.edge = nn.ModuleList(edge)
        self.heads = nn.ModuleList(heads)
        self._offload_shape = (cin, size, size)
        tail: list[nn.Module] = []
        for width, stride in blocks[edge_blocks:]:
            tail.append(BasicBlock(cin, width, stride))
            cin = width
        self.cloud = CloudTail(tail, cin, num_classes)

    # ---- initialisation from a trained full-precision ResNet -----------------------------------------
    @torch.no_grad()
    def init_from(self, source: nn.Module) -> list[str]:
        """Copy a trained full-precision CIFAR ResNet of the same block layout into this net.

        Binary nets train far better from full-precision weights than from scratch (XNOR-Net,
        Bi-Real, Real-to-Binary all start this way): the stem and the cloud blocks are copied
        exactly; every edge block takes its block's conv weights (as latent weights of the
        quantized convs), post-conv BNs and shortcut; an exit branch takes the blocks that follow
        the split and the final classifier where shapes agree. Returns what was not copied.

        From a trained :class:`HybridNet` instead, it continues that net (same or wider widths).
        """
        net = getattr(source, "net", source)
        if isinstance(net, HybridNet):
            return self._init_from_hybrid(net)
        src_blocks = list(getattr(net, "blocks", []))
        if not src_blocks or not hasattr(net, "stem"):
            raise ValueError(f"init_from needs a CIFAR ResNet (family 'resnet'), got {type(source).__name__}")
        total = len(self.edge) + len(self.cloud.blocks)
        if len(src_blocks) != total:
            raise ValueError(f"init_from: the source ResNet has {len(src_blocks)} blocks, this net {total}")
        skipped: list[str] = []
        self.stem.load_state_dict(net.stem.state_dict())
        for block, src in zip(self.edge, src_blocks):
            _fp_block_into_edge_block(src, block)
        for block, src in zip(self.cloud.blocks, src_blocks[len(self.edge):]):
            block.load_state_dict(src.state_dict())
        self.cloud.head.load_state_dict(net.head.state_dict())
        for e, head in enumerate(self.heads):
            if not isinstance(head, ExitBranch):
                skipped.append(f"heads.{e}")
                continue
            start = self.exits[e]
            for m, block in enumerate(head.blocks):
                src = src_blocks[start + m] if start + m < len(src_blocks) else None
                if src is None or not _fp_block_into_edge_block(src, block):
                    skipped.append(f"heads.{e}.blocks.{m}")
            if head.head.fc.weight.shape == net.head.fc.weight.shape:
                head.head.fc.load_state_dict(net.head.fc.state_dict())
            else:
                skipped.append(f"heads.{e}.head.fc")
        return skipped

    def _init_from_hybrid(self, source: HybridNet) -> list[str]:
        """Continue from a trained hybrid of the same layout: the same widths (e.g. staged
        quantization, 4-bit -> binary) or narrower ones, widened function-preservingly
        (:func:`~edgecloud.nets.widen.widen_into`). Stream activations the source lacks start
        as the identity; they are the parts returned as fresh."""
        src_shapes = {k: v.shape for k, v in source.state_dict().items()}
        wider = any(src_shapes.get(k, v.shape) != v.shape for k, v in self.state_dict().items())
        if wider and any(isinstance(h, ExitHead) and h.pool > 1 for h in self.modules()):
            raise ValueError("init_from: widening needs exit heads with exit_pool 1 (pooled features "
                             "interleave channels and positions)")
        acts = [name for name, m in self.named_modules() if isinstance(m, RPReLU)]
        fresh = [a for a in acts if not any(k.startswith(a + ".") for k in src_shapes)]
        widen_into(self, source, new_ok=lambda k: any(k.startswith(a + ".") for a in fresh))
        return fresh

    # ---- the SplitModel contract -------------------------------------------------------------
    def cloud_module(self) -> nn.Module:
        return self.cloud

    def offload_shape(self) -> tuple[int, ...]:
        return self._offload_shape

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.stem(self.normalize(x))
        outs: list[torch.Tensor] = []
        head = iter(self.heads)
        for i, block in enumerate(self.edge):
            h = block(h)
            if i + 1 in self.exits:
                outs.append(next(head)(h))
        outs.append(self.cloud(h))
        return outs

    def edge_features(self, x: torch.Tensor) -> torch.Tensor:
        """The feature map at the split point (what the cloud receives)."""
        h = self.stem(self.normalize(x))
        for block in self.edge:
            h = block(h)
        return h

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The whole backbone without exits (its MACs at full precision = the cloud-only baseline)."""
        return self.cloud(self.edge_features(x))

    @torch.no_grad()
    def route(self, x: torch.Tensor, policy: ExitPolicy) -> EdgeDecision:
        n = x.shape[0]
        log = current_log()
        probs_out = torch.zeros(n, self.num_classes)
        best = torch.full((n,), -float("inf"))
        exit_index = torch.full((n,), -1, dtype=torch.long)
        active = torch.arange(n)  # rows of the batch still undecided
        h = self.stem(self.normalize(x))
        start = 0
        for e, stop in enumerate(self.exits):
            if active.numel() == 0:
                break
            with log.subset(active) if log is not None and active.numel() < n else contextlib.nullcontext():
                for block in self.edge[start:stop]:
                    h = block(h)
                probs = F.softmax(self.heads[e](h).float(), dim=1)
            start = stop
            score = _confidence_score(probs, policy.kind)
            better = score > best[active]
            probs_out[active[better]] = probs[better]
            best[active[better]] = score[better]
            done = policy.confident(probs, e)
            exit_index[active[done]] = e
            keep = ~done
            active, h = active[keep], h[keep]
        if active.numel() == 0:
            h = h.new_zeros((0, *self._offload_shape))
        return EdgeDecision(
            probs=probs_out,
            exit_index=exit_index,
            offload_index=active,
            offload=h.float().contiguous(),
        )


def _fp_block_into_edge_block(src: nn.Module, dst: EdgeBlock) -> bool:
    """conv1/bn1, conv2/bn2 and the shortcut of a :class:`BasicBlock` into an :class:`EdgeBlock`."""
    pairs = [(src.conv1, dst.unit1.conv), (src.conv2, dst.unit2.conv)]
    if any(a.weight.shape != b.weight.shape for a, b in pairs):
        return False
    if sum(p.numel() for p in src.short.parameters()) != sum(p.numel() for p in dst.short.parameters()):
        return False
    for a, b in pairs:
        b.weight.copy_(a.weight)
    dst.unit1.post.load_state_dict(src.bn1.state_dict())
    dst.unit2.post.load_state_dict(src.bn2.state_dict())
    dst.short.load_state_dict(src.short.state_dict())
    return True


# ---- registered families --------------------------------------------------------------------------

@register_model("fmnist_hybrid")
def fmnist_hybrid(
    num_classes: int = 10,
    weight_bits: int = 1,
    act_bits: int = 1,
    width: int = 32,
    cloud_width: int = 64,
    cloud_blocks: int = 2,
    exit_pool: int = 3,
) -> HybridNet:
    """Fashion-MNIST hybrid: FP stem (16 ch, 28x28) | 2 quantized blocks (-> width x 7 x 7) + exit |
    ``cloud_blocks`` FP blocks of ``cloud_width`` channels + classifier."""
    blocks = [(width, 2), (width, 2)] + [(cloud_width, 1)] * cloud_blocks
    return HybridNet(
        in_channels=1, image_size=28, num_classes=num_classes, mean=FMNIST_MEAN, std=FMNIST_STD,
        stem_channels=16, stem_stride=1, blocks=blocks, edge_blocks=2,
        weight_bits=weight_bits, act_bits=act_bits, exit_pool=exit_pool,
    )


def cifar_resnet_blocks(depth: int, widths: Sequence[int] = (16, 32, 64)) -> list[tuple[int, int]]:
    """``(width, stride)`` of the 3n basic blocks of a CIFAR ResNet-(6n+2)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110), got {depth}")
    n = (depth - 2) // 6
    return [(w, 2 if s > 0 and b == 0 else 1) for s, w in enumerate(widths) for b in range(n)]


@register_model("cifar_hybrid")
def cifar_hybrid(
    depth: int = 32,
    edge_blocks: int = 8,
    exits: Sequence[int] | None = None,
    weight_bits: int = 1,
    act_bits: int = 1,
    block_bits: Sequence[Sequence[int]] | None = None,
    num_classes: int = 10,
    exit_pool: int = 4,
    exit_blocks: Sequence[Sequence[int]] | None = None,
    exit_block_bits: Sequence[Sequence[int]] | None = None,
    widths: Sequence[int] = (16, 32, 64),
    stem_channels: int | None = None,
    stream_act: bool = False,
    mean: Sequence[float] = CIFAR10_MEAN,
    std: Sequence[float] = CIFAR10_STD,
) -> HybridNet:
    """CIFAR hybrid ResNet. Default = the paper's split of ResNet-32: FP stem, stage 1 (5 blocks)
    and the first 3 blocks of stage 2 quantized, one exit there, the rest in the cloud.

    ``widths`` are the three stages' channels (default 16/32/64); a binary edge can afford wider
    stages (a binary MAC costs ~1/920 of an fp32 one), e.g. 32/64/64 keeps the cloud's stage 3
    as in ResNet-20 and doubles the edge. ``stem_channels`` defaults to the first stage's width.
    ``stream_act``: ReActNet's RPReLU on the edge's residual stream (see :class:`HybridNet`).
    """
    if len(widths) != 3:
        raise ValueError(f"widths needs one channel count per stage (3), got {list(widths)}")
    return HybridNet(
        in_channels=3, image_size=32, num_classes=num_classes, mean=mean, std=std,
        stem_channels=stem_channels or widths[0], stem_stride=1,
        blocks=cifar_resnet_blocks(depth, widths), edge_blocks=edge_blocks,
        exits=exits, weight_bits=weight_bits, act_bits=act_bits, block_bits=block_bits,
        exit_pool=exit_pool, exit_blocks=exit_blocks, exit_block_bits=exit_block_bits,
        stream_act=stream_act,
    )

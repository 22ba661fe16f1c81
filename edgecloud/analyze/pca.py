"""Hybrid-Net layer significance by principal component analysis.

Chakraborty, Roy, Garg, Ankit, Roy, "Constructing energy-efficient mixed-precision neural networks
through principal component analysis for edge intelligence" (Nature MI 2020, arXiv 1906.01493):
train a fully binary network, then for every conv layer treat each spatial position of its output
as one sample of a C-dimensional vector and count ``D_l``, the principal components that explain a
fraction ``variance`` (0.99) of the variance. A layer that raises ``D`` by at least ``delta`` (2)
over the previous conv layer performs a transformation that matters, so Hybrid-Net gives it more
precision (k = 2 bits for weights and activations in the paper) and keeps the rest binary.

Only the channel sums and the C x C Gram matrix of each layer are kept (float64), so the number of
samples is bounded by time, not memory. 1x1 projection shortcuts are not on the main path and are
skipped, as in the paper's plain (shortcut-free) analysis network.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

import torch
from torch import nn

from edgecloud.nn.quant import QuantLayerMixin

DEFAULT_VARIANCE = 0.99
DEFAULT_DELTA = 2
DEFAULT_BITS = 2


@dataclass
class LayerSignificance:
    """One conv layer's PCA result, in forward order."""

    name: str
    channels: int
    precision: str            # "fp32" or "w{weight_bits}a{act_bits}"
    positions: int            # samples seen (images x output positions)
    dims: int                 # D_l: components explaining ``variance`` of the variance
    jump: int                 # D_l - D_{l-1} (D_0 = 0 before the first conv layer)
    significant: bool         # jump >= delta

    def to_json(self) -> dict:
        return asdict(self)


class _Moments:
    """Running channel sum and Gram matrix of (positions x channels) activations."""

    def __init__(self, channels: int) -> None:
        self.n = 0
        self.sum = torch.zeros(channels, dtype=torch.float64)
        self.gram = torch.zeros(channels, channels, dtype=torch.float64)

    def update(self, out: torch.Tensor) -> None:
        rows = out.detach().transpose(0, 1).reshape(out.shape[1], -1).to(torch.float64)  # C x (N*H*W)
        self.n += rows.shape[1]
        self.sum += rows.sum(dim=1)
        self.gram += rows @ rows.T

    def eigenvalues(self) -> torch.Tensor:
        """Eigenvalues of the covariance matrix, largest first."""
        mean = self.sum / max(self.n, 1)
        cov = self.gram / max(self.n - 1, 1) - torch.outer(mean, mean) * (self.n / max(self.n - 1, 1))
        return torch.linalg.eigvalsh((cov + cov.T) / 2).flip(0).clamp_min(0.0)


def significant_dims(eigenvalues: torch.Tensor, variance: float = DEFAULT_VARIANCE) -> int:
    """Number of leading components whose share of the total variance reaches ``variance``."""
    if not 0.0 < variance <= 1.0:
        raise ValueError(f"variance must be in (0, 1], got {variance}")
    values = eigenvalues.sort(descending=True).values.to(torch.float64)
    total = float(values.sum())
    if total <= 0.0:
        return 0
    share = values.cumsum(0) / total
    # the tolerance keeps variance=1.0 from failing on rounding in the last component
    return int((share < variance - 1e-12).sum()) + 1


def _precision(module: nn.Module) -> str:
    if isinstance(module, QuantLayerMixin):
        return f"w{module.weight_bits}a{module.act_bits}"
    return "fp32"


def analyze_layers(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    *,
    variance: float = DEFAULT_VARIANCE,
    delta: int = DEFAULT_DELTA,
) -> list[LayerSignificance]:
    """PCA significance of every (non-1x1) conv layer of ``model`` over the input ``batches``."""
    if delta < 1:
        raise ValueError(f"delta must be >= 1, got {delta}")
    convs = {m: name for name, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and tuple(m.kernel_size) != (1, 1)}
    if not convs:
        raise ValueError("the model has no conv layers to analyze")
    moments: dict[nn.Module, _Moments] = {}
    order: list[nn.Module] = []

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if module not in moments:
            moments[module] = _Moments(output.shape[1])
            order.append(module)
        moments[module].update(output)

    handles = [m.register_forward_hook(hook) for m in convs]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not order:
        raise ValueError("no data: the batches were empty")

    result: list[LayerSignificance] = []
    previous = 0
    for module in order:
        m = moments[module]
        dims = significant_dims(m.eigenvalues(), variance)
        jump = dims - previous
        result.append(LayerSignificance(convs[module], m.sum.shape[0], _precision(module), m.n, dims, jump,
                                        jump >= delta))
        previous = dims
    return result


def propose_bits(layers: list[LayerSignificance], bits: int = DEFAULT_BITS) -> dict[str, int]:
    """Hybrid-Net's rule: every significant QUANTIZED layer gets ``bits`` (weights and activations)."""
    if bits < 1:
        raise ValueError(f"bits must be >= 1, got {bits}")
    return {layer.name: bits for layer in layers if layer.significant and layer.precision != "fp32"}


def propose_block_bits(model: nn.Module, layers: list[LayerSignificance],
                       bits: int = DEFAULT_BITS) -> list[list[int]] | None:
    """The proposal as a hybrid net's ``block_bits`` (one ``[weight_bits, act_bits]`` per edge block):
    a block is raised to ``bits`` when any of its quantized convs is significant. ``None`` for
    models without quantized edge blocks (``model.edge``)."""
    edge = getattr(model, "edge", None)
    if not isinstance(edge, nn.ModuleList):
        return None
    return _proposed_pairs([[(f"edge.{i}", block)] for i, block in enumerate(edge)], layers, bits)


def _proposed_pairs(positions: list[list[tuple[str, nn.Module]]], layers: list[LayerSignificance],
                    bits: int) -> list[list[int]] | None:
    """One ``[weight_bits, act_bits]`` per block position (each position: the ``(prefix, block)``
    that share its bits): the blocks' current bits, raised to ``bits`` when any quantized conv in
    them is significant. ``None`` when a block has no quantized layer."""
    raised = set(propose_bits(layers, bits))
    out: list[list[int]] = []
    for blocks in positions:
        per_block = [[(f"{prefix}.{name}", m) for name, m in block.named_modules() if isinstance(m, QuantLayerMixin)]
                     for prefix, block in blocks]
        if not all(per_block):
            return None
        quant = [q for block_quant in per_block for q in block_quant]
        current = [max(m.weight_bits for _, m in quant), max(m.act_bits for _, m in quant)]
        out.append([max(bits, current[0]), max(bits, current[1])] if any(n in raised for n, _ in quant)
                   else current)
    return out


def propose_exit_block_bits(model: nn.Module, layers: list[LayerSignificance],
                            bits: int = DEFAULT_BITS) -> list[list[int]] | None:
    """The same for exit branches (``heads.E.blocks.M``): a hybrid net's ``exit_block_bits`` (one
    pair per branch block, shared by all exits; a block is raised when it is significant in any
    exit). ``None`` when the model has no exit branch."""
    heads = getattr(model, "heads", None)
    branches = [(e, h) for e, h in enumerate(heads or []) if isinstance(getattr(h, "blocks", None), nn.Sequential)]
    if not branches or len({len(h.blocks) for _, h in branches}) != 1:
        return None
    positions = [[(f"heads.{e}.blocks.{m}", head.blocks[m]) for e, head in branches]
                 for m in range(len(branches[0][1].blocks))]
    return _proposed_pairs(positions, layers, bits)

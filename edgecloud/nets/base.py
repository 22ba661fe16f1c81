"""The contract between a model family and the runtime.

A :class:`SplitModel` is one network cut into an edge part (run on a CiM backend, with exits)
and a cloud part (exported to ONNX, run in full precision). The edge daemon only ever calls
:meth:`SplitModel.route`; the exporter only ever calls :meth:`SplitModel.cloud_module`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from edgecloud.exits import ExitPolicy

OffloadKind = Literal["features", "raw"]


@dataclass
class EdgeDecision:
    """What the edge decided for a batch of N samples.

    ``probs`` holds, for every sample, the best local prediction (for samples that go to the
    cloud: the most confident edge exit they reached) so the daemon can answer degraded when
    the cloud is unreachable. ``exit_index`` is the exit that answered, or -1 for "send to cloud".
    ``offload`` holds the cloud part's input for the rows ``offload_index`` (in that order).
    """

    probs: torch.Tensor          # [N, C] float32
    exit_index: torch.Tensor     # [N] int64, -1 = needs the cloud
    offload_index: torch.Tensor  # [K] int64, rows of the batch that need the cloud
    offload: torch.Tensor        # [K, ...] float32, the cloud input for those rows
    best_exit: torch.Tensor | None = None  # [N] int64: the edge exit ``probs`` came from


class SplitModel(nn.Module):
    """Base class of every servable family (hybrid nets, MEANet, ...).

    Subclasses set ``exit_names`` (edge exits in order; the cloud is exit ``len(exit_names)``),
    ``offload_kind`` (``"features"``: the cloud continues from intermediate features;
    ``"raw"``: the cloud runs a full model on the raw input) and implement the methods below.
    Inputs reaching :meth:`route` and :meth:`forward` are raw pixels in [0, 1], shape
    ``[N, C, H, W]``; normalisation is part of the model so edge, cloud and clients agree.
    """

    exit_names: list[str] = []
    offload_kind: OffloadKind = "features"

    def route(self, x: torch.Tensor, policy: ExitPolicy) -> EdgeDecision:
        """Run the edge part on a batch and decide, per sample, where it exits."""
        raise NotImplementedError

    def cloud_module(self) -> nn.Module:
        """The module the cloud runs on ``EdgeDecision.offload`` (exported to ONNX)."""
        raise NotImplementedError

    def offload_shape(self) -> tuple[int, ...]:
        """Shape of one sample of the cloud input (without the batch dimension)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every exit, edge exits first and the cloud last (for training/eval)."""
        raise NotImplementedError

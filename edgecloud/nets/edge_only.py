"""An edge-only classifier (LeNet-5, VGG-small, ...) behind the :class:`SplitModel` contract.

Plain classifiers have no cloud part and no early exits: ``forward`` returns ``[logits]``. An
edge-only bundle (``cloud: {offload: none}`` in its manifest, see :mod:`edgecloud.bundle`) is
loaded as ``EdgeOnlyModel(classifier)``, whose :meth:`route` answers every sample at its one
exit (named ``final`` by default), so the edge runner, ``edgecloud eval`` and the edge daemon
run it exactly like a split model that never offloads. The exit's threshold is ignored: with no
cloud there is nowhere else to send a sample. A bundle's ``edge.pt`` holds the classifier's own
``state_dict`` (keys without the wrapper's ``net.`` prefix), loaded before wrapping.
"""

from __future__ import annotations

import torch
from torch import nn

from edgecloud.exits import ExitPolicy
from edgecloud.nets.base import EdgeDecision, SplitModel


class EdgeOnlyModel(SplitModel):
    """Wraps a classifier whose ``forward`` returns a list ending with the logits."""

    offload_kind = "features"  # unused: nothing is offloaded

    def __init__(self, net: nn.Module, exit_name: str = "final") -> None:
        super().__init__()
        self.net = net
        self.exit_names = [exit_name]
        for attr in ("num_classes", "in_channels", "image_size"):
            if hasattr(net, attr):
                setattr(self, attr, getattr(net, attr))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [self.net(x)[-1]]

    def route(self, x: torch.Tensor, policy: ExitPolicy) -> EdgeDecision:
        logits = self.net(x)[-1]
        n = logits.shape[0]
        zeros = torch.zeros(n, dtype=torch.long, device=logits.device)
        return EdgeDecision(
            probs=torch.softmax(logits.float(), dim=1),
            exit_index=zeros,
            offload_index=torch.zeros(0, dtype=torch.long, device=logits.device),
            offload=torch.zeros(0, dtype=torch.float32, device=logits.device),
            best_exit=zeros,
        )

    def cloud_module(self) -> nn.Module:
        raise ValueError("an edge-only model has no cloud part")

    def offload_shape(self) -> tuple[int, ...]:
        return ()

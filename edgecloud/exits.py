"""Exit policies: when is an edge exit confident enough to answer?

Thresholds are per exit and mutable at run time (the edge daemon swaps them without a restart),
so a policy is a small object shared by reference between the servicer and the model router.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Literal

import torch

PolicyKind = Literal["entropy", "max_prob"]


def softmax_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (nats) of each row of a probability matrix."""
    p = probs.clamp_min(1e-12)
    return -(probs * p.log()).sum(dim=1)


@dataclass
class ExitPolicy:
    """Per-exit thresholds.

    ``entropy``: exit when H(p) < threshold (nats; natural log, as in BranchyNet and the hybrid-net
    paper). ``max_prob``: exit when max p >= threshold. A threshold of ``None`` means the exit
    always answers (e.g. MEANet's extension exit).
    """

    kind: PolicyKind = "entropy"
    thresholds: list[float | None] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind not in ("entropy", "max_prob"):
            raise ValueError(f"unknown exit policy {self.kind!r}; use 'entropy' or 'max_prob'")
        for t in self.thresholds:
            self._check(t)

    def _check(self, threshold: float | None) -> None:
        if threshold is None:
            return
        if not math.isfinite(threshold) or threshold < 0:
            raise ValueError(f"exit threshold must be a finite number >= 0, got {threshold}")
        if self.kind == "max_prob" and threshold > 1:
            raise ValueError(f"max_prob threshold must be in [0, 1], got {threshold}")

    def threshold(self, exit_index: int) -> float | None:
        with self._lock:
            return self.thresholds[exit_index]

    def set_threshold(self, exit_index: int, value: float | None) -> None:
        self._check(value)
        with self._lock:
            if not 0 <= exit_index < len(self.thresholds):
                raise IndexError(
                    f"exit {exit_index} does not exist; this model has {len(self.thresholds)} exits"
                )
            self.thresholds[exit_index] = value

    def confident(self, probs: torch.Tensor, exit_index: int) -> torch.Tensor:
        """Boolean mask of the rows that may exit at ``exit_index``."""
        threshold = self.threshold(exit_index)
        if threshold is None:
            return torch.ones(probs.shape[0], dtype=torch.bool, device=probs.device)
        if self.kind == "entropy":
            return softmax_entropy(probs) < threshold
        return probs.max(dim=1).values >= threshold

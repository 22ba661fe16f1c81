"""Per-exit predictions, routed accuracy / exit shares, and threshold selection.

Routing is simulated from every exit's probabilities (one forward pass per sample), which makes
a threshold sweep cheap; the simulation follows :meth:`SplitModel.route` exactly (tests check
both agree). A family whose routing is not a simple cascade defines
``route_outputs(probs_list, policy) -> exit_index`` (MEANet does).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from edgecloud.data.dataset import ImageDataset
from edgecloud.data.loader import Loader
from edgecloud.exits import ExitPolicy, softmax_entropy
from edgecloud.train.device import module_device


@torch.no_grad()
def predict_exits(model: nn.Module, dataset: ImageDataset, batch_size: int = 500) -> list[torch.Tensor]:
    """Softmax probabilities of every output (edge exits..., cloud) for every sample."""
    model.eval()
    device = module_device(model)
    outs: list[list[torch.Tensor]] = []
    for x, _ in Loader(dataset, batch_size):
        logits = model(x.to(device))
        logits = logits if isinstance(logits, (list, tuple)) else [logits]
        if not outs:
            outs = [[] for _ in logits]
        for acc, lg in zip(outs, logits):
            acc.append(torch.softmax(lg.float(), dim=1).cpu())
    return [torch.cat(o) for o in outs]


def cascade_route(probs: Sequence[torch.Tensor], policy: ExitPolicy) -> torch.Tensor:
    """exit_index per sample for a cascade of edge exits (-1 = cloud): the first confident exit."""
    n = probs[0].shape[0]
    exit_index = torch.full((n,), -1, dtype=torch.long)
    for e in range(len(probs) - 1):
        take = (exit_index == -1) & policy.confident(probs[e], e)
        exit_index[take] = e
    return exit_index


def route_outputs(model: nn.Module, probs: Sequence[torch.Tensor], policy: ExitPolicy) -> torch.Tensor:
    fn = getattr(model, "route_outputs", None)
    return fn(probs, policy) if fn is not None else cascade_route(probs, policy)


def routed_metrics(
    model: nn.Module, probs: Sequence[torch.Tensor], labels: torch.Tensor, policy: ExitPolicy,
) -> dict[str, float]:
    """Accuracy of the routed prediction, share and accuracy of each exit, each output alone."""
    names = list(getattr(model, "exit_names", [])) + [getattr(model, "final_name", "cloud")]
    exit_index = route_outputs(model, probs, policy)
    taken = torch.where(exit_index < 0, torch.full_like(exit_index, len(probs) - 1), exit_index)
    pred = torch.stack([p.argmax(1) for p in probs])  # [outputs, N]
    final = pred.gather(0, taken.view(1, -1)).squeeze(0)
    out: dict[str, float] = {"accuracy": float((final == labels).float().mean())}
    for i, name in enumerate(names):
        out[f"accuracy_{name}_alone"] = float((pred[i] == labels).float().mean())
    for i, name in enumerate(names):
        rows = taken == i
        out[f"exit_share_{name}"] = float(rows.float().mean())
        out[f"accuracy_at_{name}"] = float((final[rows] == labels[rows]).float().mean()) if rows.any() else float("nan")
    out["edge_exit_share"] = float((exit_index >= 0).float().mean())
    return out


def _policy(kind: str, model: nn.Module, t: float) -> ExitPolicy:
    fixed = set(getattr(model, "untuned_exits", ()))
    n = len(getattr(model, "exit_names", []))
    return ExitPolicy(kind, [None if i in fixed else t for i in range(n)])  # type: ignore[arg-type]


def policy_for(kind: str, model: nn.Module, threshold: float) -> ExitPolicy:
    """The policy a bundle ships: ``threshold`` on every tunable edge exit."""
    return _policy(kind, model, threshold)


def choose_threshold(
    model: nn.Module, probs: Sequence[torch.Tensor], labels: torch.Tensor, kind: str, max_drop: float,
    reference_accuracy: float | None = None,
) -> tuple[float, dict[str, float]]:
    """The threshold with the largest edge-exit share whose routed accuracy is within ``max_drop``
    points of the cloud-only accuracy (or of ``reference_accuracy``, e.g. a baseline network's on
    the same data). Call on VALIDATION data only."""
    cloud_acc = (reference_accuracy if reference_accuracy is not None
                 else float((probs[-1].argmax(1) == labels).float().mean()))
    if kind == "entropy":
        score = softmax_entropy(probs[0]).numpy()
        cands = np.unique(np.round(np.quantile(score, np.linspace(0, 1, 201)) + 1e-4, 4))
        cands = np.concatenate([[0.0], cands])
    else:
        score = probs[0].max(1).values.numpy()
        cands = np.unique(np.round(np.quantile(score, np.linspace(0, 1, 201)), 4))
        cands = np.concatenate([cands, [1.0]])
    best_t = 0.0 if kind == "entropy" else 1.0
    best = routed_metrics(model, probs, labels, _policy(kind, model, best_t))
    for t in cands:
        m = routed_metrics(model, probs, labels, _policy(kind, model, float(t)))
        if m["accuracy"] >= cloud_acc - max_drop / 100.0 and m["edge_exit_share"] > best["edge_exit_share"]:
            best_t, best = float(t), m
    return best_t, best

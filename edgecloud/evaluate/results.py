"""Per-sample outcomes -> the metrics a model card reports, and their spread over chips.

Both the direct evaluation (:mod:`edgecloud.evaluate.evaluator`) and the threshold sweep
(:mod:`edgecloud.evaluate.cache`) produce a :class:`SampleTable`; :func:`summarize` is the one
place that turns it into accuracy, exit shares and energy, so the two can be compared exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgecloud.edge.runner import CLOUD, RADIO


@dataclass
class SampleTable:
    """Outcome of every evaluated sample. ``exit_index``: edge exits 0.., the cloud = #edge exits."""

    labels: np.ndarray                  # [N] int64
    pred: np.ndarray                    # [N] int64
    exit_index: np.ndarray              # [N] int32
    energy: dict[str, np.ndarray] = field(default_factory=dict)  # component -> [N] joules

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @staticmethod
    def concat(parts: list["SampleTable"]) -> "SampleTable":
        """Join batches; a component missing from a batch counts 0 J there."""
        components = sorted({c for p in parts for c in p.energy})
        return SampleTable(
            labels=np.concatenate([p.labels for p in parts]).astype(np.int64),
            pred=np.concatenate([p.pred for p in parts]).astype(np.int64),
            exit_index=np.concatenate([p.exit_index for p in parts]).astype(np.int32),
            energy={c: np.concatenate([p.energy.get(c, np.zeros(len(p))) for p in parts]) for c in components},
        )

    def total_energy(self) -> np.ndarray:
        total = np.zeros(len(self), dtype=np.float64)
        for joules in self.energy.values():
            total += joules
        return total


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


def summarize(table: SampleTable, exit_names: list[str], baseline_j: float,
              all_cloud_j: float | None = None) -> dict[str, Any]:
    """Accuracy overall and per exit, exit shares, mean energy per sample by component.

    ``baseline_j``: energy per sample of the whole network in full precision
    (``manifest.reference_macs`` x ``mac_fp32``). ``energy_ratio`` = mean energy / baseline
    (all components, radio included); ``compute_energy_ratio`` leaves the radio out (the
    "computational energy" the hybrid-net paper reports); ``compute_energy_reduction`` is its
    inverse (the paper's "5.5x").

    ``energy_split_j`` splits the mean energy per inference into ``edge_compute`` (every edge
    component), ``radio`` and ``cloud``; ``energy_vs_all_device`` = total / ``baseline_j`` (the
    full-precision network on the device, = ``energy_ratio``) and ``energy_vs_all_cloud`` = total
    / ``all_cloud_j`` (raw input over the radio + the full-precision network in the cloud; see
    :func:`edgecloud.evaluate.evaluator.baselines`).
    """
    n = len(table)
    names = list(exit_names) + ["cloud"]
    correct = table.pred == table.labels
    shares: dict[str, float] = {}
    accs: dict[str, float | None] = {}
    for i, name in enumerate(names):
        rows = table.exit_index == i
        shares[name] = float(rows.mean()) if n else 0.0
        accs[name] = float(correct[rows].mean()) if rows.any() else None
    energy = {c: float(v.mean()) for c, v in sorted(table.energy.items())}
    total = float(sum(energy.values()))
    radio = energy.get(RADIO, 0.0)
    compute = total - radio
    edge_compute = total - radio - energy.get(CLOUD, 0.0)
    reduction = _ratio(baseline_j, compute)
    return {
        "samples": n,
        "accuracy": float(correct.mean()) if n else 0.0,
        "edge_exit_share": float((table.exit_index < len(exit_names)).mean()) if n else 0.0,
        "exit_share": shares,
        "exit_accuracy": accs,
        "energy_j": energy,
        "energy_total_j": total,
        "edge_compute_j": edge_compute,
        "compute_energy_j": compute,
        "baseline_fp_j": baseline_j,
        "energy_ratio": _ratio(total, baseline_j),
        "compute_energy_ratio": _ratio(compute, baseline_j),
        "compute_energy_reduction": reduction,
        "energy_split_j": {"edge_compute": edge_compute, "radio": radio, "cloud": energy.get(CLOUD, 0.0),
                           "total": total},
        "energy_vs_all_device": _ratio(total, baseline_j),
        "energy_vs_all_cloud": _ratio(total, all_cloud_j) if all_cloud_j is not None else None,
    }


def _stats(values: list[float | None]) -> dict[str, float] | None:
    xs = np.array([np.nan if v is None else float(v) for v in values], dtype=np.float64)
    xs = xs[~np.isnan(xs)]
    if xs.size == 0:
        return None
    std = float(xs.std(ddof=1)) if xs.size > 1 else 0.0
    return {"mean": float(xs.mean()), "std": std}


def aggregate(per_chip: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and sample standard deviation of every numeric metric over chips (same structure,
    each number replaced by ``{"mean", "std"}``; a metric absent on a chip (an exit nobody
    reached) is averaged over the chips that have it)."""

    def merge(items: list[Any]) -> Any:
        first = next((x for x in items if x is not None), None)
        if isinstance(first, dict):
            keys = list(dict.fromkeys(k for x in items if isinstance(x, dict) for k in x))
            return {k: merge([x.get(k) if isinstance(x, dict) else None for x in items]) for k in keys}
        if first is None or isinstance(first, (int, float)) and not isinstance(first, bool):
            return _stats(items)
        return first

    return merge(per_chip)


def json_safe(obj: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python, so ``json.dumps`` writes strict JSON."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj

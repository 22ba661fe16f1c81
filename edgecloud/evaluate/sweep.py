"""Threshold sweeps from an :class:`OutputCache`: rows, ``sweep.csv`` and ``sweep.png``.

One row per threshold value: that value is applied to every swept exit (by default every exit
whose manifest threshold is a number; exits the manifest leaves at ``None`` always answer and
stay so), the other exits keep the manifest's thresholds.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from edgecloud.evaluate.cache import OutputCache
from edgecloud.exits import ExitPolicy


def default_grid(kind: str, num_classes: int, points: int) -> list[float]:
    """``points`` thresholds covering the policy's whole range: entropy 0..ln(C) nats
    (0 = nothing exits, ln C = everything but perfectly uniform outputs exits), max-prob 0..1."""
    if points < 2:
        raise ValueError(f"--grid needs at least 2 points, got {points}")
    top = math.log(num_classes) if kind == "entropy" else 1.0
    return [round(float(v), 6) for v in np.linspace(0.0, top, points)]


def parse_thresholds(text: str) -> list[float]:
    """``"0,0.1,0.5"`` -> floats (each checked finite and >= 0)."""
    values = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            v = float(item)
        except ValueError as exc:
            raise ValueError(f"--thresholds: {item!r} is not a number") from exc
        if not math.isfinite(v) or v < 0:
            raise ValueError(f"--thresholds: {item!r} must be a finite number >= 0")
        values.append(v)
    if not values:
        raise ValueError("--thresholds: no values given")
    return values


def swept_exits(cache: OutputCache, exit_index: int | None = None) -> list[int]:
    """Exits a sweep moves: ``exit_index`` alone, or every exit with a numeric manifest threshold."""
    manifest = cache.source.manifest
    if exit_index is not None:
        if not 0 <= exit_index < cache.num_exits:
            raise ValueError(f"exit {exit_index} does not exist; exits are 0..{cache.num_exits - 1}")
        return [exit_index]
    tunable = [i for i, e in enumerate(manifest.exits) if e.threshold is not None]
    return tunable or list(range(cache.num_exits))


def policy_at(cache: OutputCache, value: float, exits: Sequence[int]) -> ExitPolicy:
    manifest = cache.source.manifest
    thresholds: list[float | None] = [e.threshold for e in manifest.exits]
    for i in exits:
        thresholds[i] = value
    return ExitPolicy(kind=manifest.policy, thresholds=thresholds)


def manifest_policy(cache: OutputCache) -> ExitPolicy:
    m = cache.source.manifest
    return ExitPolicy(kind=m.policy, thresholds=[e.threshold for e in m.exits])


def flat_row(threshold: float | None, metrics: dict[str, Any], exit_names: list[str]) -> dict[str, Any]:
    """One CSV row: shares per exit, accuracy, energies, ratios."""
    row: dict[str, Any] = {"threshold": threshold}
    for name in [*exit_names, "cloud"]:
        row[f"share_{name}"] = metrics["exit_share"][name]
    row["edge_share"] = metrics["edge_exit_share"]
    row["accuracy"] = metrics["accuracy"]
    for name in [*exit_names, "cloud"]:
        row[f"accuracy_{name}"] = metrics["exit_accuracy"][name]
    row["energy_j"] = metrics["energy_total_j"]
    row["compute_energy_j"] = metrics["compute_energy_j"]
    for comp, joules in metrics["energy_j"].items():
        row[f"energy_{comp}_j"] = joules
    row["baseline_fp_j"] = metrics["baseline_fp_j"]
    row["energy_ratio"] = metrics["energy_ratio"]
    row["compute_energy_ratio"] = metrics["compute_energy_ratio"]
    return row


def sweep(cache: OutputCache, thresholds: Sequence[float], exit_index: int | None = None
          ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """(one flat row per threshold, the operating point = the manifest thresholds' row)."""
    exits = swept_exits(cache, exit_index)
    rows = [flat_row(float(t), cache.metrics(policy_at(cache, float(t), exits)), cache.exit_names)
            for t in thresholds]
    manifest = cache.source.manifest
    op_value = manifest.exits[exits[0]].threshold
    operating = flat_row(op_value, cache.metrics(manifest_policy(cache)), cache.exit_names)
    return rows, operating


def write_csv(rows: list[dict[str, Any]], path: Path) -> Path:
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=columns)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    return path


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.4g}"


def write_plot(rows: list[dict[str, Any]], operating: dict[str, Any], path: Path, title: str) -> Path:
    """Accuracy vs edge-exit share and energy per sample vs edge-exit share; the bundle's
    operating point (its manifest thresholds) marked with a star."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = sorted(range(len(rows)), key=lambda i: rows[i]["edge_share"])
    share = np.array([rows[i]["edge_share"] for i in order]) * 100
    acc = np.array([rows[i]["accuracy"] for i in order]) * 100
    total = np.array([rows[i]["energy_j"] for i in order])
    compute = np.array([rows[i]["compute_energy_j"] for i in order])
    op_share = operating["edge_share"] * 100
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax1.plot(share, acc, "o-", ms=3, label="sweep")
    ax1.plot(op_share, operating["accuracy"] * 100, "r*", ms=14,
             label=f"operating point (T={_fmt(operating['threshold'])})")
    ax1.set_xlabel("samples answered at the edge (%)")
    ax1.set_ylabel("accuracy (%)")
    ax1.grid(alpha=0.3)
    ax1.legend(loc="best", fontsize=8)
    ax2.plot(share, total, "o-", ms=3, label="total (incl. radio)")
    ax2.plot(share, compute, "s--", ms=3, label="compute only (edge + cloud)")
    baseline = operating.get("baseline_fp_j") or 0.0
    if baseline > 0:
        ax2.axhline(baseline, color="gray", ls=":", label="full-precision network")
    ax2.plot(op_share, operating["energy_j"], "r*", ms=14)
    ax2.plot(op_share, operating["compute_energy_j"], "r*", ms=14)
    if (total > 0).all() and (compute > 0).all():
        ax2.set_yscale("log")
    ax2.set_xlabel("samples answered at the edge (%)")
    ax2.set_ylabel("energy per sample (J)")
    ax2.grid(alpha=0.3, which="both")
    ax2.legend(loc="best", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

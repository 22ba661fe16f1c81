"""Robustness results as a table (mean +- std over chips), a CSV and a plot of accuracy vs eps."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from edgecloud.robust.runner import Row


def eps_label(eps: float) -> str:
    """0.00784 -> '2/255' (budgets are read in grey levels); other values as numbers."""
    levels = eps * 255.0
    if abs(levels - round(levels)) < 1e-6:
        return f"{round(levels)}/255"
    return f"{eps:g}"


def summarise(rows: Sequence[Row]) -> list[dict[str, object]]:
    """One line per (backend, threat, attack, eps): mean and std of accuracy over chips."""
    groups: dict[tuple[str, str, str, float], list[float]] = defaultdict(list)
    samples: dict[tuple[str, str, str, float], int] = {}
    for r in rows:
        key = (r.backend, r.threat, r.attack, r.eps)
        groups[key].append(r.accuracy)
        samples[key] = r.samples
    out = []
    for key, accs in groups.items():
        mean = sum(accs) / len(accs)
        std = math.sqrt(sum((a - mean) ** 2 for a in accs) / (len(accs) - 1)) if len(accs) > 1 else 0.0
        out.append({"backend": key[0], "threat": key[1], "attack": key[2], "eps": key[3], "chips": len(accs),
                    "samples": samples[key], "accuracy_mean": mean, "accuracy_std": std})
    return out


def format_table(rows: Sequence[Row]) -> str:
    lines = [f"{'backend':<10} {'threat':<17} {'attack':<9} {'eps':>7} {'chips':>5} {'accuracy %':>14}"]
    for s in summarise(rows):
        acc = f"{100 * s['accuracy_mean']:.2f}"  # type: ignore[operator]
        if s["chips"] > 1:  # type: ignore[operator]
            acc += f" ± {100 * s['accuracy_std']:.2f}"  # type: ignore[operator]
        lines.append(f"{s['backend']:<10} {s['threat']:<17} {s['attack']:<9} {eps_label(s['eps']):>7} "  # type: ignore[arg-type]
                     f"{s['chips']:>5} {acc:>14}")
    return "\n".join(lines)


def write_csv(rows: Sequence[Row], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(Row.__dataclass_fields__))
        writer.writeheader()
        for r in rows:
            writer.writerow(asdict(r))
    return path


def plot(rows: Sequence[Row], path: str | Path, title: str = "") -> Path:
    """Accuracy against eps, one panel per attack, one line per (backend, threat), mean +- std
    over chips as error bars; each line starts at the clean accuracy of its backend (eps 0)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = summarise(rows)
    clean = {s["backend"]: s for s in summary if s["threat"] == "clean"}
    attacks = sorted({str(s["attack"]) for s in summary if s["threat"] != "clean"})
    if not attacks:
        attacks = ["none"]
    fig, axes = plt.subplots(1, len(attacks), figsize=(5.2 * len(attacks), 4.0), squeeze=False)
    for ax, attack in zip(axes[0], attacks):
        lines: dict[tuple[str, str], list[dict[str, object]]] = defaultdict(list)
        for s in summary:
            if s["attack"] == attack and s["threat"] != "clean":
                lines[(str(s["backend"]), str(s["threat"]))].append(s)
        for (backend, threat), pts in sorted(lines.items()):
            if backend in clean:
                pts = [clean[backend], *pts]
            pts.sort(key=lambda s: s["eps"])  # type: ignore[arg-type, return-value]
            xs = [255 * float(s["eps"]) for s in pts]  # type: ignore[arg-type]
            ys = [100 * float(s["accuracy_mean"]) for s in pts]  # type: ignore[arg-type]
            es = [100 * float(s["accuracy_std"]) for s in pts]  # type: ignore[arg-type]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=f"{backend}, {threat}")
        ax.set_title(attack)
        ax.set_xlabel("eps (grey levels, x/255)")
        ax.set_ylabel("accuracy %")
        ax.set_ylim(0, 100)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path

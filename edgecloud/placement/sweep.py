"""``edgecloud placement sweep``: every primitive at RF and SMEM (iso-area counts) against the baseline."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from edgecloud.placement.model import CIM_TYPES, gemm, load_constants
from edgecloud.placement.workloads import WORKLOADS

FIELDS = ["group", "workload", "M", "N", "K", "macs", "arch", "cim", "banks", "energy_uj", "energy_per_mac_fj",
          "cycles", "cycles_with_cim_latency", "energy_vs_baseline", "speedup_vs_baseline",
          "speedup_vs_baseline_timeloop_cycles"]


def configs(c: dict[str, Any]) -> list[tuple[str, str | None, int | None]]:
    out: list[tuple[str, str | None, int | None]] = [("baseline", None, None)]
    for arch in ("rf", "smem"):
        out += [(arch, cim, c["iso_area_banks"][arch][cim]) for cim in CIM_TYPES]
    return out


def run_sweep(m_values: list[int], n: int, k: int, constants: dict[str, Any] | None = None,
              workloads: bool = True, search: bool = False) -> list[dict[str, Any]]:
    """Rows: per GEMM (the M sweep at N x K, and every workload GEMM) and per workload total, for the
    baseline and the 8 CiM configurations. Throughput uses the CiM latency (``cycles_with_cim_latency``).
    ``search``: CiM mappings by :func:`~edgecloud.placement.model.search_mapping` (EDP) instead of the
    repository's priority algorithm."""
    c = constants or load_constants()
    jobs = [("M-sweep", f"M={m}", [(m, n, k)]) for m in m_values]
    if workloads:
        for name, shapes in WORKLOADS.items():
            jobs += [(name, f"{name} #{i}", [s]) for i, s in enumerate(shapes)]
            jobs.append((name, f"{name} total", shapes))
    cache: dict[tuple, Any] = {}
    rows = []
    for group, label, shapes in jobs:
        base = None
        for arch, cim, banks in configs(c):
            e = cyc = cyc_lat = macs = 0
            for s in shapes:
                key = (s, arch, cim, banks)
                if key not in cache:
                    cache[key] = gemm(*s, arch=arch, cim=cim, banks=banks, constants=c,
                                      search=search and arch != "baseline")
                r = cache[key]
                e, cyc, macs = e + r.energy_uj, cyc + r.cycles, macs + r.macs
                cyc_lat += r.cycles_with_cim_latency
            if base is None:
                base = (e, cyc)
            m, nn, kk = shapes[0] if len(shapes) == 1 else ("", "", "")
            rows.append({"group": group, "workload": label, "M": m, "N": nn, "K": kk, "macs": macs, "arch": arch,
                         "cim": cim or "", "banks": banks or "", "energy_uj": round(e, 6),
                         "energy_per_mac_fj": round(e * 1e9 / macs, 4), "cycles": cyc,
                         "cycles_with_cim_latency": cyc_lat, "energy_vs_baseline": round(e / base[0], 5),
                         "speedup_vs_baseline": round(base[1] / cyc_lat, 5),
                         "speedup_vs_baseline_timeloop_cycles": round(base[1] / cyc, 5)})
    return rows


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, FIELDS)
        w.writeheader()
        w.writerows(rows)


def plot(rows: list[dict[str, Any]], path: Path, mapping: str = "priority") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 8))
    sweep = [r for r in rows if r["group"] == "M-sweep" and r["arch"] != "baseline"]
    totals = [r for r in rows if r["workload"].endswith(" total") and r["arch"] != "baseline"]
    labels = sorted({(r["arch"], r["cim"]) for r in sweep}, key=lambda x: (x[0], CIM_TYPES.index(x[1])))
    for col, key, title in ((0, "energy_vs_baseline", "energy / baseline (lower is better)"),
                            (1, "speedup_vs_baseline", "throughput / baseline (CiM latency included)")):
        ax = axes[0][col]
        for arch, cim in labels:
            pts = [(r["M"], r[key]) for r in sweep if (r["arch"], r["cim"]) == (arch, cim)]
            ax.plot(*zip(*pts), marker="o", ls="-" if arch == "rf" else "--", label=f"{cim} @ {arch}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(f"M (N = {sweep[0]['N']}, K = {sweep[0]['K']})")
        ax.set_title(title)
        ax = axes[1][col]
        groups = list(dict.fromkeys(r["group"] for r in totals))
        width = 0.8 / max(len(labels), 1)
        for i, (arch, cim) in enumerate(labels):
            vals = [next(r[key] for r in totals if r["group"] == g and (r["arch"], r["cim"]) == (arch, cim))
                    for g in groups]
            ax.bar([j + i * width for j in range(len(groups))], vals, width, label=f"{cim} @ {arch}")
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))], groups)
        ax.set_title(f"{title}: whole workloads")
    axes[0][0].legend(fontsize=7, ncol=2)
    fig.suptitle("WWW analytic model: CiM at RF / SMEM (iso-area primitive counts, "
                 f"{mapping} mapping) vs tensor-core-like baseline")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

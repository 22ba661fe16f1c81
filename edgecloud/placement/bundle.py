"""``edgecloud placement bundle``: where to compute a bundle's edge part in memory.

Every conv / linear layer the edge runs (backbone blocks and exit branches, one sample through the
whole edge: no early exit) becomes a GEMM at batch 1 — a conv as im2col, M = output pixels,
N = output channels per group, K = input channels per group x kernel area, one GEMM per group — and
is placed on the WWW architectures (:mod:`edgecloud.placement.model`): the tensor-core-like baseline
and the four SRAM-CiM primitives at the register file or the shared memory (iso-area counts).

The WWW model prices INT8 operands; a binary or 4-bit layer is priced as INT8 (stated per layer).
Beside it, the same edge on edgecloud's own backends (digital, crossbar, SRAM), from their energy
meters: those price array, converters and digital glue but no memory hierarchy, while the WWW model
prices every level from DRAM down, so the two columns answer different questions (see
``docs/placement.md``).
"""

from __future__ import annotations

import csv
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgecloud.placement.model import CIM_TYPES, gemm, load_constants
from edgecloud.placement.sweep import configs

LAYER_FIELDS = ["layer", "kind", "groups", "M", "N", "K", "macs", "weight_bits", "act_bits", "arch", "cim", "banks",
                "energy_uj", "cycles_with_cim_latency", "energy_vs_baseline", "speedup_vs_baseline"]


@dataclass(frozen=True)
class LayerGemm:
    """One conv / linear call of the edge as a GEMM (batch 1)."""
    layer: str
    kind: str                 # conv | linear
    M: int
    N: int
    K: int
    groups: int = 1           # a grouped conv is ``groups`` GEMMs of this shape
    weight_bits: int | None = None   # None: full precision (priced as INT8 all the same)
    act_bits: int | None = None

    @property
    def macs(self) -> int:
        return self.M * self.N * self.K * self.groups


def edge_gemms(model: Any, sample_shape: tuple[int, ...], exits: int) -> list[LayerGemm]:
    """The GEMMs of one sample through ``model``'s whole edge (every exit computed, none taken)."""
    import torch
    from torch import nn

    from edgecloud.exits import ExitPolicy

    calls: list[LayerGemm] = []
    names = {m: n for n, m in model.named_modules()}

    def hook(module: nn.Module, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        wb, ab = getattr(module, "weight_bits", None), getattr(module, "act_bits", None)
        if isinstance(module, nn.Conv2d):
            g = int(module.groups)
            kh, kw = module.kernel_size
            calls.append(LayerGemm(names[module], "conv", int(output.shape[-2] * output.shape[-1]),
                                   module.out_channels // g, module.in_channels // g * kh * kw, g, wb, ab))
        elif isinstance(module, nn.Linear):
            rows = int(math.prod(output.shape[1:-1])) if output.dim() > 2 else 1
            calls.append(LayerGemm(names[module], "linear", rows, module.out_features, module.in_features, 1, wb, ab))

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    # entropy < 0 never holds: every sample runs every edge exit and is offloaded ("None" exits
    # answer always, so the layers up to them still run)
    policy = ExitPolicy("entropy", [0.0] * exits)
    try:
        with torch.inference_mode():
            model.route(torch.zeros(1, *sample_shape), policy)
    finally:
        for h in handles:
            h.remove()
    if not calls:
        raise ValueError("the edge part ran no conv or linear layer: nothing to place")
    return calls


@dataclass
class Placement:
    arch: str
    cim: str | None
    banks: int | None
    energy_uj: float
    cycles_with_cim_latency: int
    cycles: int
    breakdown_uj: dict[str, float] = field(default_factory=dict)   # per storage level / compute

    def scaled(self, times: int) -> "Placement":
        return Placement(self.arch, self.cim, self.banks, self.energy_uj * times, self.cycles_with_cim_latency * times,
                         self.cycles * times, {k: v * times for k, v in self.breakdown_uj.items()})

    @property
    def label(self) -> str:
        return "baseline" if self.arch == "baseline" else f"{self.cim} @ {self.arch} x{self.banks}"


@dataclass
class LayerPlacement:
    gemm: LayerGemm
    options: list[Placement]                       # baseline first

    def best(self, key: str = "energy") -> Placement:
        return min(self.options, key=lambda p: _objective(p, key))


@dataclass
class BundlePlacement:
    bundle: str
    mapping: str
    layers: list[LayerPlacement]
    backends: dict[str, dict[str, Any]] = field(default_factory=dict)

    def totals(self) -> list[Placement]:
        """One placement for the whole edge: every layer on the same configuration."""
        out = []
        for i, first in enumerate(self.layers[0].options):
            opts = [lp.options[i] for lp in self.layers]
            parts: dict[str, float] = {}
            for p in opts:
                for k, v in p.breakdown_uj.items():
                    parts[k] = parts.get(k, 0.0) + v
            out.append(Placement(first.arch, first.cim, first.banks, sum(p.energy_uj for p in opts),
                                 sum(p.cycles_with_cim_latency for p in opts), sum(p.cycles for p in opts), parts))
        return out

    def per_layer_best(self, key: str = "energy") -> dict[str, float]:
        """Each layer on its own best configuration (a bound: a chip holding every option)."""
        picks = [lp.best(key) for lp in self.layers]
        return {"energy_uj": sum(p.energy_uj for p in picks),
                "cycles_with_cim_latency": sum(p.cycles_with_cim_latency for p in picks)}

    def summary(self) -> dict[str, Any]:
        totals = self.totals()
        base = totals[0]
        whole = [{"placement": t.label, "arch": t.arch, "cim": t.cim, "banks": t.banks,
                  "energy_uj": t.energy_uj, "cycles_with_cim_latency": t.cycles_with_cim_latency,
                  "energy_vs_baseline": t.energy_uj / base.energy_uj,
                  "speedup_vs_baseline": base.cycles_with_cim_latency / t.cycles_with_cim_latency,
                  "breakdown_uj": t.breakdown_uj}
                 for t in totals]
        best_e = min(totals, key=lambda p: _objective(p, "energy"))
        best_edp = min(totals, key=lambda p: _objective(p, "edp"))
        layers = []
        for lp in self.layers:
            b, be, bt = lp.options[0], lp.best("energy"), lp.best("edp")
            layers.append({**asdict(lp.gemm), "macs": lp.gemm.macs,
                           "best_energy": be.label, "best_energy_vs_baseline": be.energy_uj / b.energy_uj,
                           "best_edp": bt.label,
                           "best_edp_speedup": b.cycles_with_cim_latency / bt.cycles_with_cim_latency,
                           "baseline_energy_uj": b.energy_uj})
        mixed = self.per_layer_best("energy")
        return {"bundle": self.bundle, "mapping": self.mapping, "macs": sum(lp.gemm.macs for lp in self.layers),
                "layers": layers, "whole_edge": whole, "best_energy": best_e.label, "best_edp": best_edp.label,
                "per_layer_best_energy_uj": mixed["energy_uj"],
                "per_layer_best_energy_vs_baseline": mixed["energy_uj"] / base.energy_uj,
                "backends": self.backends}


def _objective(p: Placement, key: str) -> float:
    return p.energy_uj if key == "energy" else p.energy_uj * p.cycles_with_cim_latency


def place_gemms(gemms: list[LayerGemm], constants: dict[str, Any] | None = None,
                search: bool = False) -> list[LayerPlacement]:
    """Every GEMM on the baseline and on the 8 iso-area CiM configurations."""
    c = constants or load_constants()
    cache: dict[tuple, Placement] = {}
    out = []
    for g in gemms:
        options = []
        for arch, cim, banks in configs(c):
            key = (g.M, g.N, g.K, arch, cim, banks)
            if key not in cache:
                r = gemm(g.M, g.N, g.K, arch=arch, cim=cim, banks=banks, constants=c,
                         search=search and arch != "baseline")
                cache[key] = Placement(arch, cim, banks, r.energy_uj, r.cycles_with_cim_latency, r.cycles,
                                       dict(r.breakdown_uj))
            options.append(cache[key].scaled(g.groups))
        out.append(LayerPlacement(g, options))
    return out


def backend_energy(bundle: Any, backends: list[str], samples: int = 8, seed: int = 0,
                   images: Any = None) -> dict[str, dict[str, Any]]:
    """Edge compute energy per inference (µJ, by component) of the whole edge (no early exit) on
    edgecloud's own backends, from their energy meters; the crossbar also with its analytic latency.

    ``images``: uint8 [N, C, H, W] to run (default: ``samples`` seeded random images)."""
    import numpy as np

    from edgecloud.edge.runner import EdgeRunner
    from edgecloud.evaluate.evaluator import crossbar_cost
    from edgecloud.exits import ExitPolicy

    if images is None:
        shape = tuple(int(d) for d in bundle.manifest.input.shape)
        images = np.random.default_rng(seed).integers(0, 256, size=(samples, *shape), dtype=np.uint8)
    out: dict[str, dict[str, Any]] = {}
    for name in backends:
        policy = ExitPolicy("entropy", [0.0] * len(bundle.manifest.exits))  # no exit: the whole edge runs
        runner = EdgeRunner(bundle, name, policy, seed=seed)
        result = runner.run(images)
        parts = {k: float(np.mean(v)) * 1e6 for k, v in result.energy.items()}
        row: dict[str, Any] = {"energy_uj": sum(parts.values()), "breakdown_uj": parts, "samples": len(images)}
        if name == "crossbar":
            cost = crossbar_cost(runner, runner.meter)
            row["latency_s"] = cost["latency_s"]
        out[name] = row
    return out


def place_bundle(bundle: Any, constants: dict[str, Any] | None = None, search: bool = False,
                 backends: list[str] | None = None, samples: int = 8, seed: int = 0) -> BundlePlacement:
    model = bundle.build_model()
    shape = tuple(int(d) for d in bundle.manifest.input.shape)
    gemms = edge_gemms(model, shape, len(bundle.manifest.exits))
    result = BundlePlacement(bundle.name, "search" if search else "priority", place_gemms(gemms, constants, search))
    if backends:
        result.backends = backend_energy(bundle, backends, samples, seed)
    return result


def write_csv(result: BundlePlacement, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, LAYER_FIELDS)
        w.writeheader()
        rows = [(lp.gemm, lp.options) for lp in result.layers]
        rows.append((LayerGemm("(whole edge)", "", 0, 0, 0, 0), result.totals()))
        for g, options in rows:
            base = options[0]
            for p in options:
                w.writerow({"layer": g.layer, "kind": g.kind, "groups": g.groups or "", "M": g.M or "",
                            "N": g.N or "", "K": g.K or "",
                            "macs": g.macs if g.M else sum(lp.gemm.macs for lp in result.layers),
                            "weight_bits": g.weight_bits or "", "act_bits": g.act_bits or "",
                            "arch": p.arch, "cim": p.cim or "", "banks": p.banks or "",
                            "energy_uj": round(p.energy_uj, 6), "cycles_with_cim_latency": p.cycles_with_cim_latency,
                            "energy_vs_baseline": round(p.energy_uj / base.energy_uj, 5),
                            "speedup_vs_baseline": round(base.cycles_with_cim_latency / p.cycles_with_cim_latency, 5)})


def plot(result: BundlePlacement, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [p.label for p in result.layers[0].options[1:]]
    short = [lp.gemm.layer.replace("blocks.", "b").replace("exits.", "x") for lp in result.layers]
    fig, axes = plt.subplots(2, 1, figsize=(max(10, 0.45 * len(short) + 4), 8), sharex=True)
    width = 0.8 / len(labels)
    for ax, key, title in ((axes[0], "energy", "energy / baseline (lower is better)"),
                           (axes[1], "speed", "throughput / baseline (CiM latency included)")):
        for i, label in enumerate(labels):
            vals = []
            for lp in result.layers:
                base, p = lp.options[0], lp.options[i + 1]
                vals.append(p.energy_uj / base.energy_uj if key == "energy"
                            else base.cycles_with_cim_latency / p.cycles_with_cim_latency)
            ax.bar([j + i * width for j in range(len(short))], vals, width, label=label)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(title)
    axes[1].set_xticks([j + 0.4 - width / 2 for j in range(len(short))], short, rotation=70, fontsize=7)
    axes[0].legend(fontsize=7, ncol=4)
    fig.suptitle(f"{result.bundle}: edge layers as batch-1 INT8 GEMMs, WWW model ({result.mapping} mapping, "
                 "iso-area primitive counts)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(summary: dict[str, Any]) -> str:
    """Text tables: per layer, whole edge, and edgecloud's backends."""
    lines = [f"{summary['bundle']}: {len(summary['layers'])} edge GEMMs, {summary['macs']} MACs per inference "
             f"({summary['mapping']} mapping; INT8 operands)",
             f"{'layer':<28} {'M':>5} {'N':>5} {'K':>5} {'bits':>5}  {'best energy':<22} {'E/base':>7}  "
             f"{'best EDP':<22} {'speedup':>7}"]
    for r in summary["layers"]:
        bits = f"{r['weight_bits'] or 'fp'}/{r['act_bits'] or 'fp'}"
        lines.append(f"{r['layer']:<28} {r['M']:>5} {r['N']:>5} {r['K']:>5} {bits:>5}  {r['best_energy']:<22} "
                     f"{r['best_energy_vs_baseline']:>7.3f}  {r['best_edp']:<22} {r['best_edp_speedup']:>7.3f}")
    lines += ["", f"{'whole edge on':<24} {'energy uJ':>10} {'E/base':>7} {'speedup':>8}  {'DRAM uJ':>8}"]
    for r in summary["whole_edge"]:
        lines.append(f"{r['placement']:<24} {r['energy_uj']:>10.3f} {r['energy_vs_baseline']:>7.3f} "
                     f"{r['speedup_vs_baseline']:>8.3f}  {r['breakdown_uj'].get('DRAM', 0.0):>8.3f}")
    lines.append(f"{'each layer its best':<24} {summary['per_layer_best_energy_uj']:>10.3f} "
                 f"{summary['per_layer_best_energy_vs_baseline']:>7.3f}")
    if summary["backends"]:
        lines += ["", "edgecloud backends, same edge (compute only, no memory hierarchy):"]
        for name, r in summary["backends"].items():
            parts = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r["breakdown_uj"].items()))
            lat = f"; latency {r['latency_s'] * 1e6:.1f} us" if r.get("latency_s") else ""
            lines.append(f"  {name:<9} {r['energy_uj']:>10.3f} uJ  ({parts}){lat}")
    return "\n".join(lines)


__all__ = ["BundlePlacement", "LayerGemm", "LayerPlacement", "Placement", "backend_energy", "edge_gemms",
           "place_bundle", "place_gemms", "plot", "report", "write_csv", "CIM_TYPES"]

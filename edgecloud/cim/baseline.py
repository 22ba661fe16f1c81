"""Von Neumann baseline vs the SRAM-CiM backend: energy and delay per inference (IMAC comparison).

IMAC (Ali et al., TCAS-I 2020) reports 6.24x less energy and 9.42x less delay than a von Neumann
processor. Its ``System`` script models the von Neumann machine as weights read from SRAM +
digital MACs + an output register, and IMAC as per-MAC compute + ADC + DAC with column/bank
parallelism. This module applies the same structure to a bundle, layer by layer, with the event
counts the ``sram`` backend records (:meth:`SramBackend.events`, the same function the
evaluator's energy comes from) and the constants of an energy table (``events`` for joules,
``latency`` for seconds; every row carries its source).

Per quantized layer mapped on SRAM (K rows, O outputs, P output positions, b_w-bit weights,
MACs = K O P, outputs = O P):

SRAM-CiM
  energy  sum over the backend's events of count x table price: ``sram_cim_4b_op`` (one per
          product), ``adc_conversion_<B>b`` (one per group of G rows, column and input cycle; a
          sign + magnitude word has a positive and a negative line, so 2 per word and group),
          ``sram_wl_dac_<v>b`` (word lines x cycles x macros), ``shift_add`` (one per conversion),
          ``mac_fp32`` (output rescaling, one per output).
  delay   reads R = conversions / 2 (both lines of a word are converted at once), each taking
          t_dac + t_compute + t_adc (``accumulate="bitline"``: the G rows of a group develop on
          the bit line together, as the backend models them) or t_dac + t_adc per read plus
          t_compute per product (``accumulate="sequential"``: one product per compute cycle, the
          IMAC System script's convention). Reads run in parallel on W = banks x cols / (k + 1)
          words (k + 1 cells per sign + magnitude word; fractional, as IMAC's Ncol Nbank / Bw).
          ``replicate=True`` (IMAC's assumption): a small layer's idle words hold copies of its
          weights and serve other output positions, so all W words are busy; ``False``: at most
          the layer's own words (groups x O x slices) work at once.
Von Neumann (same precision, same banks)
  energy  weight fetch: K O b_w / 64 reads of 64 bits (``memory``: "auto" = the smallest SRAM row
          of the table (8 KB, 32 KB, 1 MB) that holds all mapped weights, each weight read once
          per inference as in IMAC) + MACs x ``mac_int<b>`` (the digital backend's event) +
          outputs x ``register_access_16b`` (IMAC's per-output register) + outputs x ``mac_fp32``
          (the same output rescaling the CiM path pays).
  delay   K O b_w / (io_bits x banks) SRAM accesses x t_sram_read + MACs / multipliers x t_mac
          (fetch and compute not overlapped; IMAC's script).
Layers that stay digital on both machines (full-precision stem/classifier, unsupported layers)
cost MACs x their digital event and MACs / multipliers x t_mac on both sides; activation traffic
and leakage are left out on both sides (IMAC's script adds a leakage term that is negligible).
Ratios are von Neumann / CiM for the whole network and for the SRAM-mapped layers only.

Defaults of :class:`Hardware` are IMAC's ``System/result.py`` ``arch_hard``: 4 banks of 256
columns, a 16-bit SRAM port per bank, 175 digital multipliers. :func:`imac_system_script` is
IMAC's own formula (used to check this model against the published 9.42x delay).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from torch import nn

from edgecloud.cim.energy import EnergyTable
from edgecloud.nn.quant import QuantLayerMixin

PUBLISHED = {"energy_ratio": 6.24, "delay_ratio": 9.42,
             "source": "IMAC, Ali et al., IEEE TCAS-I 67(8) 2020, abstract (vs a von Neumann baseline)"}
LATENCY_KEYS = ("cim_compute", "adc_conversion", "dac_settle", "sram_read", "mac")
# SRAM rows of the energy table by capacity (Horowitz): the smallest that holds the weights is used.
SRAM_ROWS = (("sram_read_64b", 8 << 10), ("sram_read_64b_32kb", 32 << 10), ("sram_read_64b_1mb", 1 << 20))
MEMORIES = ("auto", "sram_8kb", "sram_32kb", "sram_1mb", "dram")


@dataclass(frozen=True)
class Hardware:
    """Machine assumptions shared by both sides (defaults: IMAC System/result.py arch_hard)."""

    banks: int = 4                 # Nbank: SRAM(-CiM) banks working in parallel
    cols: int | None = None        # Ncol: bit cells per word line; None = the sram backend's ``cols``
    io_bits: int = 16              # Bio: von Neumann SRAM port width per bank
    multipliers: int = 175         # Nmult: von Neumann digital MAC units
    accumulate: Literal["bitline", "sequential"] = "bitline"
    replicate: bool = True
    memory: str = "auto"           # von Neumann weight memory, one of MEMORIES

    def __post_init__(self) -> None:
        if self.banks < 1 or self.io_bits < 1 or self.multipliers < 1 or (self.cols is not None and self.cols < 1):
            raise ValueError("banks, cols, io_bits and multipliers must be >= 1")
        if self.accumulate not in ("bitline", "sequential"):
            raise ValueError(f"accumulate must be 'bitline' or 'sequential', got {self.accumulate!r}")
        if self.memory not in MEMORIES:
            raise ValueError(f"memory must be one of {', '.join(MEMORIES)}, got {self.memory!r}")


@dataclass
class Latency:
    seconds: dict[str, float]
    sources: dict[str, str]

    @classmethod
    def load(cls, path: str | Path | None = None) -> "Latency":
        """The ``latency`` section of a table; keys it lacks come from the packaged table."""
        packaged = yaml.safe_load(resources.files("edgecloud.cim").joinpath("energy_table.yaml").read_text())
        rows = dict(packaged.get("latency") or {})
        if path is not None:
            rows.update((yaml.safe_load(Path(path).read_text()) or {}).get("latency") or {})
        seconds, sources = {}, {}
        for key in LATENCY_KEYS:
            row = rows.get(key)
            if not isinstance(row, dict) or "seconds" not in row:
                raise ValueError(f"latency table: missing {key!r} (seconds + source)")
            seconds[key], sources[key] = float(row["seconds"]), str(row.get("source", ""))
        return cls(seconds, sources)


@dataclass
class Layer:
    """One conv/linear layer of one inference: geometry and, if mapped on SRAM, its events."""

    name: str
    mapped: bool                 # on the SRAM arrays (else digital on both machines)
    k: int                       # rows (fan-in)
    out: int                     # outputs per position
    positions: int
    weight_bits: int
    digital_event: str           # the digital MAC event at this layer's precision
    cim_events: dict[tuple[str, str], float] = field(default_factory=dict)  # per inference
    words: int = 0               # distinct (group, output, slice) words the layer occupies
    cells_per_word: int = 0

    @property
    def macs(self) -> int:
        return self.k * self.out * self.positions

    @property
    def weights(self) -> int:
        return self.k * self.out

    @property
    def outputs(self) -> int:
        return self.out * self.positions

    def events_like(self, prefix: str) -> float:
        return sum(c for (_, e), c in self.cim_events.items() if e.startswith(prefix))


def inventory(model: nn.Module, sample_shape: tuple[int, ...], backend: Any | None = None) -> list[Layer]:
    """Every conv/linear layer of one inference of ``model`` (already prepared on ``backend``
    if given: an sram backend maps its supported quantized layers), in execution order.

    Geometry comes from one zero sample run on the digital path (the backend's arrays are not
    touched, so a calibrated ADC stays uncalibrated); the events of a mapped layer are the
    backend's own :meth:`events` x output positions, as its ``mvm`` records them.
    """
    found: list[tuple[nn.Module, str, int]] = []
    names = {id(m): n for n, m in model.named_modules()}

    def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if isinstance(mod, nn.Conv2d):
            positions = int(output.shape[2] * output.shape[3])
        else:
            positions = int(output[0].numel() // output.shape[-1])
        found.append((mod, names.get(id(mod), "?"), positions))

    saved = {}
    for _, layer in _quant(model):
        saved[id(layer)] = layer.mvm_fn
        layer.mvm_fn = None
    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        with torch.inference_mode():
            model(torch.zeros(1, *sample_shape))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
        for _, layer in _quant(model):
            layer.mvm_fn = saved[id(layer)]
    layers: list[Layer] = []
    for mod, name, positions in found:
        k = int(mod.weight[0].numel())
        out = int(mod.weight.shape[0])
        if isinstance(mod, QuantLayerMixin):
            layer = Layer(name, False, k, out, positions, int(mod.weight_bits), mod.digital_event())
            if backend is not None and getattr(backend, "name", "") == "sram" and backend.unsupported(mod) is None:
                with torch.no_grad():
                    w_int, _ = mod.quantize_weight()
                mapped = backend.mapped(mod, w_int)
                layer.mapped = True
                for component, event, per_position in backend.events(mapped, mod):
                    key = (component, event)
                    layer.cim_events[key] = layer.cim_events.get(key, 0.0) + per_position * positions
                slices = mapped.n_sub // 2 if not backend.is_xnor(mod) else 1
                layer.words = mapped.n_tiles * out * slices
                layer.cells_per_word = 1 if backend.is_xnor(mod) else backend.options.weight_cell_bits + 1
        else:
            layer = Layer(name, False, k, out, positions, 32, "mac_fp32")  # k = (C / groups) kh kw
        layers.append(layer)
    return layers


def _quant(model: nn.Module):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, QuantLayerMixin)]


def _price(table: EnergyTable, events: dict[tuple[str, str], float]) -> dict[str, float]:
    out: dict[str, float] = {}
    for (component, event), count in events.items():
        out[component] = out.get(component, 0.0) + count * table.per_event(event)
    return out


def memory_event(table: EnergyTable, weight_bytes: float, memory: str) -> tuple[str, str]:
    """(event, why) of the von Neumann weight memory."""
    if memory == "dram":
        return "dram_read_64b", "DRAM"
    rows = [(e, cap) for e, cap in SRAM_ROWS if e in table.joules]
    if memory != "auto":
        want = {"sram_8kb": "sram_read_64b", "sram_32kb": "sram_read_64b_32kb", "sram_1mb": "sram_read_64b_1mb"}[memory]
        if want not in table.joules:
            raise ValueError(f"energy table has no {want!r} row for memory {memory!r}")
        return want, f"{memory} (chosen)"
    if not rows:
        raise ValueError("energy table has no SRAM read row (sram_read_64b)")
    if len(rows) == 1:
        return rows[0][0], "the table's only SRAM row"
    for event, cap in rows:
        if weight_bytes <= cap:
            return event, f"smallest SRAM of the table holding the {weight_bytes / 1024:.1f} KiB of weights"
    return rows[-1][0], f"largest SRAM row of the table ({weight_bytes / 1024:.1f} KiB of weights exceed it)"


def compare_layers(layers: list[Layer], table: EnergyTable, latency: Latency, hw: Hardware,
                   cols: int) -> dict[str, Any]:
    """Energy (J) and delay (s) per inference of both machines, per layer and in total."""
    t = latency.seconds
    mapped_bytes = sum(lay.weights * lay.weight_bits for lay in layers if lay.mapped) / 8
    mem_event, mem_why = memory_event(table, mapped_bytes, hw.memory)
    e_mem, e_reg, e_post = table.per_event(mem_event), table.per_event("register_access_16b"), table.per_event("mac_fp32")
    rows: list[dict[str, Any]] = []
    tot = {"cim": {"energy_j": {}, "delay_s": 0.0}, "vn": {"energy_j": {}, "delay_s": 0.0}}
    mapped_tot = {"cim_j": 0.0, "vn_j": 0.0, "cim_s": 0.0, "vn_s": 0.0}

    def add(side: str, parts: dict[str, float], seconds: float) -> None:
        for k, v in parts.items():
            tot[side]["energy_j"][k] = tot[side]["energy_j"].get(k, 0.0) + v
        tot[side]["delay_s"] += seconds

    for lay in layers:
        row: dict[str, Any] = {"name": lay.name, "mapped": "sram" if lay.mapped else "digital", "k": lay.k,
                               "out": lay.out, "positions": lay.positions, "macs": lay.macs, "weights": lay.weights,
                               "weight_bits": lay.weight_bits}
        mac_s = lay.macs / hw.multipliers * t["mac"]
        if not lay.mapped:  # the same digital work on both machines
            parts = {"digital": lay.macs * table.per_event(lay.digital_event)}
            row["cim"] = row["vn"] = {"energy_j": parts, "delay_s": mac_s}
            add("cim", parts, mac_s)
            add("vn", parts, mac_s)
            rows.append(row)
            continue
        cim_parts = _price(table, lay.cim_events)
        conversions = lay.events_like("adc_conversion_")
        reads = conversions / 2.0
        products = lay.events_like("sram_cim_")
        words_total = hw.banks * cols / lay.cells_per_word
        parallel = words_total if hw.replicate else min(words_total, float(lay.words))
        if hw.accumulate == "bitline":
            cim_s = reads * (t["dac_settle"] + t["cim_compute"] + t["adc_conversion"]) / parallel
        else:
            cim_s = (products * t["cim_compute"] + reads * (t["dac_settle"] + t["adc_conversion"])) / parallel
        bits = lay.weights * lay.weight_bits
        vn_parts = {"weight_fetch": bits / 64 * e_mem, "mac": lay.macs * table.per_event(lay.digital_event),
                    "register": lay.outputs * e_reg, "output_scaling": lay.outputs * e_post}
        fetch_s = bits / (hw.io_bits * hw.banks) * t["sram_read"]
        vn_s = fetch_s + mac_s
        row.update(reads=reads, products=products, parallel_words=parallel,
                   cim={"energy_j": cim_parts, "delay_s": cim_s},
                   vn={"energy_j": vn_parts, "delay_s": vn_s, "fetch_s": fetch_s, "mac_s": mac_s})
        add("cim", cim_parts, cim_s)
        add("vn", vn_parts, vn_s)
        mapped_tot["cim_j"] += sum(cim_parts.values())
        mapped_tot["vn_j"] += sum(vn_parts.values())
        mapped_tot["cim_s"] += cim_s
        mapped_tot["vn_s"] += vn_s
        rows.append(row)
    e_cim = sum(tot["cim"]["energy_j"].values())
    e_vn = sum(tot["vn"]["energy_j"].values())
    ratio = lambda a, b: a / b if b > 0 else None  # noqa: E731
    return {
        "layers": rows,
        "cim": {**tot["cim"], "energy_total_j": e_cim},
        "von_neumann": {**tot["vn"], "energy_total_j": e_vn, "memory": mem_event, "memory_choice": mem_why,
                        "mapped_weight_bytes": mapped_bytes},
        "energy_ratio": ratio(e_vn, e_cim),
        "delay_ratio": ratio(tot["vn"]["delay_s"], tot["cim"]["delay_s"]),
        "edp_ratio": ratio(e_vn * tot["vn"]["delay_s"], e_cim * tot["cim"]["delay_s"]),
        "mapped_layers_only": {
            "energy_ratio": ratio(mapped_tot["vn_j"], mapped_tot["cim_j"]),
            "delay_ratio": ratio(mapped_tot["vn_s"], mapped_tot["cim_s"]),
            **mapped_tot,
        },
    }


def compare(source: Any, backend_options: dict[str, Any] | None = None, *, seed: int = 0,
            table: str | Path | None = None, hardware: Hardware | None = None, adc_law: str | None = None,
            bundle_hardware: bool = True) -> dict[str, Any]:
    """The von Neumann vs SRAM-CiM report of a bundle (or InMemoryBundle) on the sram backend.

    The backend runs with the bundle's manifest ``hardware.sram`` defaults under ``backend_options``
    (``bundle_hardware=False``: without them); ``adc_law`` overrides the energy table's ADC law.
    """
    from edgecloud.bundle import bundle_backend_options
    from edgecloud.cim.backend import create_backend

    hw = hardware or Hardware()
    if not source.manifest.edge_only:
        raise ValueError(f"model {source.name!r}: the von Neumann comparison covers edge-only bundles "
                         "(a classifier run wholly on the edge), not edge-cloud split models")
    backend = create_backend("sram", bundle_backend_options(source.manifest, "sram", backend_options,
                                                            use_bundle=bundle_hardware), seed)
    model = backend.prepare(source.build_model())
    shape = tuple(int(d) for d in source.manifest.input.shape)
    layers = inventory(model, shape, backend)
    if not any(lay.mapped for lay in layers):
        raise ValueError(f"model {source.name!r}: no layer is mapped on the SRAM arrays")
    energy_table = EnergyTable.load(table).with_adc_law(adc_law)
    latency = Latency.load(table)
    cols = hw.cols or int(backend.options.cols)
    report = compare_layers(layers, energy_table, latency, hw, cols)
    report["hardware"] = {**asdict(hw), "cols": cols}
    report["latency_s"] = dict(latency.seconds)
    report["latency_sources"] = dict(latency.sources)
    report["energy_table"] = str(table) if table else "packaged"
    report["adc_law"] = energy_table.adc_law
    report["published"] = dict(PUBLISHED)
    return report


# ---- IMAC's own system model (System/system_analysis.py), for checking ---------------------------

IMAC_SCRIPT = {
    "delay_ns": {"comp": 1.0, "adc": 5.0 / 10, "dac": 0.0, "mult": 4.0, "read": 4.0},
    "energy_pj": {"comp": 0.2798224, "adc": 0.1, "dac": 0.0, "mult": 0.9, "read": 5.2, "reg": 4.0},
    "arch": {"Bio": 16, "Bw": 5, "Ncol": 256, "Nbank": 4, "Nmult": 175},
}


def imac_system_script(layers: list[tuple[int, int, int, int]], params: dict[str, Any] | None = None) -> dict[str, float]:
    """IMAC's closed-form model for layers given as (weights, macs, outputs, _) per inference:
    T_imac = MACs Bw / (Ncol Nbank) (comp + adc + dac), T_vn = weights Bw / (Bio Nbank) read +
    MACs / Nmult mult; E_imac = MACs (comp + adc + dac), E_vn = weights read + MACs mult +
    outputs reg (ns, pJ; leakage left out)."""
    p = params or IMAC_SCRIPT
    d, e, a = p["delay_ns"], p["energy_pj"], p["arch"]
    t = tv = en = ev = 0.0
    for weights, macs, outputs, _ in layers:
        t += macs * a["Bw"] / (a["Ncol"] * a["Nbank"]) * (d["comp"] + d["adc"] + d["dac"])
        tv += weights * a["Bw"] / (a["Bio"] * a["Nbank"]) * d["read"] + macs / a["Nmult"] * d["mult"]
        en += macs * (e["comp"] + e["adc"] + e["dac"])
        ev += weights * e["read"] + macs * e["mult"] + outputs * e["reg"]
    return {"imac_ns": t, "vn_ns": tv, "imac_pj": en, "vn_pj": ev, "delay_ratio": tv / t, "energy_ratio": ev / en}

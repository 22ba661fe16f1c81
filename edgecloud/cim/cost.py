"""Analytic cost model of the analog crossbar accelerator: energy, delay, area and EDAP per inference.

The model prices a layer from its *layout* alone (no data), so a search over kernel and array
sizes can score candidates cheaply, and ``eval`` can report latency, area and EDAP next to the
event-based energy of :mod:`edgecloud.cim.energy`.

Mapping (the same as :mod:`edgecloud.cim.crossbar`): a layer's weights are a (K, O) matrix. The K
rows are cut into ``n_row_tiles = ceil(K / rows)`` row tiles (the last may be shorter). Each signed
weight of ``b_mag`` magnitude bits is split into ``S = ceil(b_mag / cell_bits)`` slices, each held by
a differential pair of physical columns, so there are ``J = S * O`` pair-columns. An array has
``rows x cols`` cells, i.e. ``cols / 2`` pairs, so a layer needs ``n_col_tiles = ceil(2 J / cols)``
column tiles and ``n_row_tiles * n_col_tiles`` arrays. Inputs are streamed ``dac_bits`` per cycle,
``n_cycles = ceil(act_bits / dac_bits)``. Per output position (one MVM; a conv has oh*ow of them,
a linear layer one) and cycle:

- one ADC conversion per pair-column per row tile (``t * J`` per row tile), at the resolution of
  the array it sits in (per-array bits; D.U.B. pruning lowers some arrays' bits). With
  ``adc_bits=None`` each row tile uses the lossless resolution of its active rows, as the backend
  prices an ideal ADC;
- one sample & hold and one shift-and-add per conversion;
- one DAC row-cycle per driven row per column tile (``t * K * n_col_tiles``);
- ``2 J`` cell reads per driven row (``t * K * 2 J``).

These are exactly the per-sample events of ``CrossbarBackend.events`` times the positions (the
digital output scaling, one ``mac_fp32`` per output, is left out: it is the same for every array
choice and belongs to the digital side).

Modelling choices:

- **Energy** uses the *energy* table (:class:`~edgecloud.cim.energy.EnergyTable`, the packaged
  ``energy_table.yaml`` by default) for every per-event constant, so for the same counts the cost
  model and the event meter agree to the last bit when both price ADCs under the same law (the
  meter's is its table's ``adc_law``, walden by default: FoM * 2^B; ``edgecloud eval`` passes the
  meter's law to the cost model). Only delay and area constants live in ``cost_table.yaml``.
- **ADC law** (named, pluggable: :data:`ADC_LAWS`, :func:`register_adc_law`): ADC energy per
  conversion and ADC area versus bits B scale as ``law(B, B_ref)`` from the ISAAC 8-bit point:
  ``walden`` 2^(B - 8) (default), ``schreier`` 4^(B - 8), ``linear`` B / 8. Every :class:`Cost`
  names its law (``adc_law``).
- **Delay**: weights are stationary (programming is one-off, not per inference); every layer has
  its own arrays; the arrays of a layer work in parallel; layers run one after another (no
  inter-layer pipelining), so ``latency = sum_layers positions * n_cycles * cycle_time``. The
  cycle of a layer is set by its slowest array: ``max(read_time, ceil(pairs / adcs) * t_conv(B))``
  with ``adcs = ceil(cols / columns_per_adc)`` ADCs per array and a SAR conversion time
  proportional to bits, ``t_conv(B) = t_conv(8) * B / 8``. ISAAC: one 8-bit 1.28 GS/s ADC per 128
  columns, 128 x 0.78 ns = 100 ns = the read cycle. Here one conversion serves a differential pair,
  so a 128-column array needs 64 conversions (50 ns) and the 100 ns read sets the pace. Digital
  shift-and-add, DAC settling and S&H are assumed to keep up (pipelined behind the array read).
- **Area** per layer: arrays (``rows * cols`` cells each) + ADCs (``ceil(cols / columns_per_adc)``
  per array, at least one, area by the law at that array's bits) + one DAC per row per array
  (x2 per extra input bit) + one S&H per pair per array + ``shift_add_units_per_adc`` shift-and-add
  units per ADC + an optional activation buffer (``include_buffer``: the layer's whole output
  feature map for one sample, at ``buffer_word_bits`` per value; its energy is one access per
  ``buffer_access_bits`` bits read, ``K * act_bits`` per position, or written, ``O * word_bits``
  per position). Excluded: routers, buses, ISAAC's shared tile eDRAM and output registers,
  instruction memory, activation/pooling units, chip I/O (architecture-level, shared by layers
  and not a function of the per-layer array choice) and leakage (idle arrays of other layers).
- **EDAP** = energy (J) x latency (s) x area (mm^2). For a model it is the product of the totals
  (not the sum of the layers' EDAPs).

Where layouts come from: :func:`layouts_from_backend` (a prepared ``CrossbarBackend`` plus each
layer's output positions per sample, ``Geometry.positions`` of its call), :func:`layout_from` (one
programmed ``MappedLayer`` plus ``rows``, ``cols``, ``cell_bits``, positions and per-array ADC
bits), or :meth:`LayerLayout.plan` (shapes alone, for a search). Then
``CostModel().cost(layouts).to_dict()``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edgecloud.cim.adc import lossless_adc_bits
from edgecloud.cim.energy import ADC_LAWS, AdcLaw, EnergyTable, register_adc_law  # noqa: F401
from edgecloud.cim.energy import adc_law as _adc_law
from edgecloud.cim.energy import read_table

ENERGY_COMPONENTS = ("array", "adc", "dac", "sample_hold", "shift_add", "buffer")
AREA_COMPONENTS = ("array", "adc", "dac", "sample_hold", "shift_add", "buffer")

# ADC_LAWS, AdcLaw and register_adc_law are defined once, in edgecloud.cim.energy (the event meter
# prices conversions with them too; it cannot import this module, which imports it) and
# re-exported here: the same objects.


def magnitude_bits_of(weight_bits: int) -> int:
    """Magnitude bits of a signed ``weight_bits`` weight (as ``tiling.magnitude_bits``): 1 for binary."""
    levels = 1 if weight_bits == 1 else 2 ** (weight_bits - 1) - 1
    return int(levels).bit_length()


# ---- layout ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class LayerLayout:
    """How one layer sits on crossbar arrays: every count the cost model needs, no weights.

    ``adc_bits``: ``None`` (lossless per row tile, as the backend's ideal ADC), one int for every
    array, or per-array bits of shape (n_row_tiles, n_col_tiles) as a nested list, tensor or array.
    It is stored as a tuple of tuples of ints. ``act_bits`` (only for the buffer term) defaults to
    ``n_cycles * dac_bits``.
    """

    name: str
    k_rows: int
    outputs: int
    slices: int
    rows: int
    cols: int
    n_cycles: int
    dac_bits: int = 1
    cell_bits: int = 2
    positions: int = 1
    adc_bits: Any = None
    act_bits: int | None = None

    def __post_init__(self) -> None:
        for key in ("k_rows", "outputs", "slices", "rows", "cols", "n_cycles", "dac_bits", "cell_bits", "positions"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"layer {self.name!r}: {key} must be a positive int, got {value!r}")
        if self.cols % 2:
            raise ValueError(f"layer {self.name!r}: cols must be even (differential pairs), got {self.cols}")
        if self.act_bits is None:
            object.__setattr__(self, "act_bits", self.n_cycles * self.dac_bits)
        object.__setattr__(self, "adc_bits", self._per_array_bits(self.adc_bits))

    def _per_array_bits(self, bits: Any) -> tuple[tuple[int, ...], ...]:
        n_r, n_c = self.n_row_tiles, self.n_col_tiles
        if hasattr(bits, "tolist"):  # tensor / numpy array or scalar
            bits = bits.tolist()
        if bits is None:
            grid = [[lossless_adc_bits(h, self.cell_bits, self.dac_bits)] * n_c for h in self.row_tile_rows]
        elif isinstance(bits, (int, float)) and not isinstance(bits, bool):
            grid = [[bits] * n_c for _ in range(n_r)]
        else:
            grid = [list(row) if isinstance(row, (list, tuple)) else row for row in bits]
            if len(grid) != n_r or any(not isinstance(row, (list, tuple)) or len(row) != n_c for row in grid):
                raise ValueError(f"layer {self.name!r}: adc_bits must have shape (n_row_tiles, n_col_tiles) = "
                                 f"({n_r}, {n_c}), got {bits!r}")
        out = []
        for row in grid:
            for b in row:
                if float(b) != int(b) or not 1 <= int(b) <= 32:
                    raise ValueError(f"layer {self.name!r}: ADC bits must be integers in 1..32, got {b!r}")
            out.append(tuple(int(b) for b in row))
        return tuple(out)

    @classmethod
    def plan(cls, name: str, k_rows: int, outputs: int, *, weight_bits: int, act_bits: int,
             rows: int = 128, cols: int = 128, cell_bits: int = 2, dac_bits: int = 1, positions: int = 1,
             adc_bits: Any = None) -> "LayerLayout":
        """A layout from layer shapes alone (for a search): K = C * kh * kw for a conv, positions = oh * ow."""
        slices = -(-magnitude_bits_of(weight_bits) // cell_bits)
        return cls(name=name, k_rows=k_rows, outputs=outputs, slices=slices, rows=rows, cols=cols,
                   n_cycles=-(-act_bits // dac_bits), dac_bits=dac_bits, cell_bits=cell_bits,
                   positions=positions, adc_bits=adc_bits, act_bits=act_bits)

    # ---- derived geometry ---------------------------------------------------------------------
    @property
    def n_row_tiles(self) -> int:
        return -(-self.k_rows // self.rows)

    @property
    def row_tile_rows(self) -> list[int]:
        """Driven rows of each row tile (the last may be shorter)."""
        return [min(self.rows, self.k_rows - a) for a in range(0, self.k_rows, self.rows)]

    @property
    def pair_columns(self) -> int:
        """J = S * O differential pair-columns."""
        return self.slices * self.outputs

    @property
    def pairs_per_array(self) -> int:
        return self.cols // 2

    @property
    def n_col_tiles(self) -> int:
        return -(-2 * self.pair_columns // self.cols)

    @property
    def col_tile_pairs(self) -> list[int]:
        """Used pairs of each column tile (the last may be partly empty)."""
        p, j = self.pairs_per_array, self.pair_columns
        return [min(p, j - c * p) for c in range(self.n_col_tiles)]

    @property
    def arrays(self) -> int:
        return self.n_row_tiles * self.n_col_tiles

    # ---- event counts per sample (one inference) ----------------------------------------------
    @property
    def conversions(self) -> int:
        """ADC conversions per sample: positions * n_cycles * J per row tile."""
        return self.positions * self.n_cycles * self.n_row_tiles * self.pair_columns

    def conversions_by_bits(self) -> dict[int, int]:
        """ADC conversions per sample, by the resolution of the array that makes them."""
        out: dict[int, int] = {}
        per = self.positions * self.n_cycles
        for bits_row in self.adc_bits:
            for bits, pairs in zip(bits_row, self.col_tile_pairs):
                out[bits] = out.get(bits, 0) + per * pairs
        return dict(sorted(out.items()))

    @property
    def dac_row_cycles(self) -> int:
        return self.positions * self.n_cycles * self.k_rows * self.n_col_tiles

    @property
    def cell_reads(self) -> int:
        return self.positions * self.n_cycles * self.k_rows * 2 * self.pair_columns

    def events(self) -> list[tuple[str, str, float]]:
        """(component, event, count per sample) as ``CrossbarBackend.events`` x positions (no mac_fp32)."""
        conv = float(self.conversions)
        out = [("adc", f"adc_conversion_{b}b", float(n)) for b, n in self.conversions_by_bits().items()]
        return out + [
            ("adc", "sample_hold", conv),
            ("dac", f"dac_row_cycle_{self.dac_bits}b", float(self.dac_row_cycles)),
            ("crossbar", "crossbar_cell_read", float(self.cell_reads)),
            ("digital", "shift_add", conv),
        ]


def layout_from(mapped: Any, *, rows: int, cols: int, cell_bits: int, positions: int,
                adc_bits: Any = None, name: str | None = None) -> LayerLayout:
    """The layout of a programmed ``MappedLayer`` of the crossbar backend.

    ``rows``, ``cols``, ``cell_bits``: the layer's crossbar options (``CrossbarOptions``, after any
    per-layer override: ``options.for_layer(name)``); ``positions``: output positions per sample of
    the layer's call (``Geometry.positions``: oh * ow, 1 for a linear layer). ``adc_bits``: per-array
    bits (n_row_tiles, n_col_tiles) or one int; for the crossbar backend pass
    ``backend.array_bits[name]`` (what its events price). Without it: the per-column
    ``mapped.site_bits`` read per array when set, else ``mapped.adc_bits`` (None: lossless per row
    tile, as ``CrossbarBackend.events`` prices an ideal ADC). Everything else comes from ``mapped``:
    K (``tiles``), O (``out_features``), S (``n_sub``), ``n_cycles`` and ``bits_per_cycle``.
    """
    k_rows = int(mapped.tiles[-1][1])
    expect = [(a, min(a + rows, k_rows)) for a in range(0, k_rows, rows)]
    if [tuple(t) for t in mapped.tiles] != expect:
        raise ValueError(f"layer {mapped.name!r}: its row tiles {mapped.tiles} are not {rows}-row tiles")
    if adc_bits is None:
        site = getattr(mapped, "site_bits", None)
        adc_bits = mapped.adc_bits if site is None else site[:, :: cols // 2]
    return LayerLayout(
        name=name or mapped.name, k_rows=k_rows, outputs=int(mapped.out_features), slices=int(mapped.n_sub),
        rows=rows, cols=cols, n_cycles=int(mapped.n_cycles), dac_bits=int(mapped.bits_per_cycle),
        cell_bits=cell_bits, positions=int(positions), adc_bits=adc_bits,
    )


def layouts_from_backend(backend: Any, positions: Mapping[str, int] | None = None) -> list[LayerLayout]:
    """Layouts of every layer a ``CrossbarBackend`` has programmed, in programming order.

    ``positions`` maps each layer name (``MappedLayer.name``, the module path) to its output
    positions per sample (default: what each layer saw in its last call, ``MappedLayer.positions``).
    Per-layer options (``options.for_layer``) and per-array ADC bits
    (``backend.array_bits``) are used where the backend has them. Layers that stayed digital are
    not programmed and so not listed.
    """
    out = []
    for _, mapped in backend._chips.values():
        name = mapped.name
        seen = positions[name] if positions is not None and name in positions else getattr(mapped, "positions", None)
        if seen is None:
            raise KeyError(f"no output positions for layer {name!r}: run one batch through the model first, "
                           "or pass positions")
        opt = backend.options.for_layer(name) if hasattr(backend.options, "for_layer") else backend.options
        bits = getattr(backend, "array_bits", {}).get(name)
        out.append(layout_from(mapped, rows=opt.rows, cols=opt.cols, cell_bits=opt.cell_bits,
                               positions=int(seen), adc_bits=bits))
    return out


# ---- table -----------------------------------------------------------------------------------------
CONSTANTS = (
    "crossbar_read_time_s", "crossbar_cell_area_mm2", "adc_ref_bits", "adc_conversion_time_s",
    "adc_area_mm2", "adc_columns_per_adc", "dac_area_mm2", "sample_hold_area_mm2", "shift_add_area_mm2",
    "shift_add_units_per_adc", "buffer_area_mm2_per_kib", "buffer_word_bits", "buffer_access_bits",
)
_POSITIVE = {"crossbar_read_time_s", "adc_ref_bits", "adc_columns_per_adc", "buffer_word_bits", "buffer_access_bits"}


@dataclass(frozen=True)
class CostTable:
    """Delay and area constants (``cost_table.yaml``), each with its source; energy is in EnergyTable."""

    values: dict[str, float]
    sources: dict[str, str]
    adc_law: str = "walden"
    include_buffer: bool = False
    buffer_energy_event: str = "sram_read_64b"
    technology: str = ""
    where: str = "packaged cost_table.yaml"

    def __getitem__(self, key: str) -> float:
        return self.values[key]

    def with_values(self, **values: float) -> "CostTable":
        """A copy with some constants replaced (source: "override")."""
        unknown = set(values) - set(CONSTANTS)
        if unknown:
            raise KeyError(f"unknown cost constants {sorted(unknown)}; known: {list(CONSTANTS)}")
        return replace(self, values={**self.values, **values},
                       sources={**self.sources, **{k: "override" for k in values}})

    @classmethod
    def load(cls, path: str | Path | None = None) -> "CostTable":
        """The packaged table, or a user table with the same schema (every key required)."""
        data, where = read_table("cost table", "cost_table.yaml", path)
        rows = data.get("constants")
        if not isinstance(rows, dict):
            raise ValueError(f"cost table {where}: needs a 'constants' mapping of name -> {{value, source}}")
        unknown = sorted(set(rows) - set(CONSTANTS))
        if unknown:
            raise ValueError(f"cost table {where}: unknown constant(s) {unknown}; known: {list(CONSTANTS)}")
        values, sources = {}, {}
        for key in CONSTANTS:
            row = rows.get(key)
            if not isinstance(row, dict) or "value" not in row or "source" not in row:
                raise ValueError(f"cost table {where}: constant {key!r} is missing or lacks 'value' and 'source'")
            try:
                value = float(row["value"])
            except (TypeError, ValueError):
                raise ValueError(f"cost table {where}: constant {key!r} has a non-numeric value "
                                 f"{row['value']!r}") from None
            if not math.isfinite(value) or value < 0 or (key in _POSITIVE and value == 0):
                need = "> 0" if key in _POSITIVE else ">= 0"
                raise ValueError(f"cost table {where}: constant {key!r} must be finite and {need}, got {value}")
            values[key], sources[key] = value, str(row["source"])
        law = data.get("adc_law", "walden")
        if law not in ADC_LAWS:
            raise ValueError(f"cost table {where}: 'adc_law' is {law!r}; choose one of {sorted(ADC_LAWS)}")
        include = data.get("include_buffer", False)
        if not isinstance(include, bool):
            raise ValueError(f"cost table {where}: 'include_buffer' must be true or false, got {include!r}")
        event = data.get("buffer_energy_event", "sram_read_64b")
        if not isinstance(event, str) or not event:
            raise ValueError(f"cost table {where}: 'buffer_energy_event' must be an energy-table event name")
        return cls(values, sources, law, include, event, str(data.get("technology", "")), where)


# ---- result ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Cost:
    """Cost of one inference (one sample) of a layer or a model."""

    name: str
    energy_breakdown_j: dict[str, float]
    latency_s: float
    area_breakdown_mm2: dict[str, float]
    adc_law: str
    counts: dict[str, float] = field(default_factory=dict)  # events per sample
    resources: dict[str, float] = field(default_factory=dict)  # arrays, adcs, cycles, cycle_time_s
    layers: tuple["Cost", ...] = ()

    @property
    def energy_j(self) -> float:
        return float(sum(self.energy_breakdown_j.values()))

    @property
    def area_mm2(self) -> float:
        return float(sum(self.area_breakdown_mm2.values()))

    @property
    def edap(self) -> float:
        """Energy x delay x area, J * s * mm^2."""
        return self.energy_j * self.latency_s * self.area_mm2

    def to_dict(self, layers: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "adc_law": self.adc_law,
            "energy_j": self.energy_j,
            "energy_breakdown_j": dict(self.energy_breakdown_j),
            "latency_s": self.latency_s,
            "area_mm2": self.area_mm2,
            "area_breakdown_mm2": dict(self.area_breakdown_mm2),
            "edap": self.edap,
            "edap_units": "J*s*mm^2",
            "counts": dict(self.counts),
            "resources": dict(self.resources),
        }
        if layers and self.layers:
            out["layers"] = [c.to_dict(layers=False) for c in self.layers]
        return out


def _ratio(a: float, b: float) -> float:
    if b == 0:
        return 1.0 if a == 0 else math.inf
    return a / b


def compare(cost_a: Cost, cost_b: Cost) -> dict[str, Any]:
    """Ratios a / b of energy, latency, area, EDAP and each component (< 1: a is cheaper).

    A component both lack gives 1.0; one only b lacks gives inf. Both ADC laws are reported.
    """
    def parts(x: dict[str, float], y: dict[str, float]) -> dict[str, float]:
        return {k: _ratio(x.get(k, 0.0), y.get(k, 0.0)) for k in dict.fromkeys([*x, *y])}

    return {
        "a": cost_a.name, "b": cost_b.name,
        "adc_law": {"a": cost_a.adc_law, "b": cost_b.adc_law},
        "energy_j": _ratio(cost_a.energy_j, cost_b.energy_j),
        "latency_s": _ratio(cost_a.latency_s, cost_b.latency_s),
        "area_mm2": _ratio(cost_a.area_mm2, cost_b.area_mm2),
        "edap": _ratio(cost_a.edap, cost_b.edap),
        "energy_breakdown_j": parts(cost_a.energy_breakdown_j, cost_b.energy_breakdown_j),
        "area_breakdown_mm2": parts(cost_a.area_breakdown_mm2, cost_b.area_breakdown_mm2),
    }


# ---- model -----------------------------------------------------------------------------------------
class CostModel:
    """Energy, latency, area and EDAP of layouts, from a :class:`CostTable` and an EnergyTable.

    ``adc_law`` overrides the table's law (a name in :data:`ADC_LAWS`).
    """

    def __init__(self, table: CostTable | str | Path | None = None, energy: EnergyTable | str | Path | None = None,
                 adc_law: str | None = None) -> None:
        self.table = table if isinstance(table, CostTable) else CostTable.load(table)
        self.energy = energy if isinstance(energy, EnergyTable) else EnergyTable.load(energy)
        self.adc_law = adc_law or self.table.adc_law
        self._law = _adc_law(self.adc_law)
        if self.table.include_buffer:
            try:
                self.energy.per_event(self.table.buffer_energy_event)
            except KeyError:
                raise ValueError(f"cost table {self.table.where}: 'buffer_energy_event' "
                                 f"{self.table.buffer_energy_event!r} is not in the energy table") from None

    # ---- per-bit ADC figures ------------------------------------------------------------------
    def adc_factor(self, bits: int) -> float:
        return float(self._law(float(bits), self.table["adc_ref_bits"]))

    def adc_energy(self, bits: int) -> float:
        """Joules per conversion at ``bits``: the energy table's reference-bit price x the law."""
        ref = int(self.table["adc_ref_bits"])
        return self.energy.per_event(f"adc_conversion_{ref}b") * self.adc_factor(bits)

    def adc_area(self, bits: int) -> float:
        return self.table["adc_area_mm2"] * self.adc_factor(bits)

    def adc_time(self, bits: int) -> float:
        """Seconds per conversion (SAR: proportional to bits, for every law)."""
        return self.table["adc_conversion_time_s"] * bits / self.table["adc_ref_bits"]

    def adcs_per_array(self, layout: LayerLayout) -> int:
        return max(1, math.ceil(layout.cols / self.table["adc_columns_per_adc"]))

    def cycle_time(self, layout: LayerLayout) -> float:
        """One input cycle of the layer: its slowest array's max(read, conversions per ADC x t_conv)."""
        adcs = self.adcs_per_array(layout)
        worst = 0.0
        for bits_row in layout.adc_bits:
            for bits, pairs in zip(bits_row, layout.col_tile_pairs):
                worst = max(worst, math.ceil(pairs / adcs) * self.adc_time(bits))
        return max(self.table["crossbar_read_time_s"], worst)

    # ---- costs --------------------------------------------------------------------------------
    def layer_cost(self, layout: LayerLayout) -> Cost:
        t, e = self.table, self.energy.per_event
        conv = float(layout.conversions)
        by_bits = layout.conversions_by_bits()
        act_bits = layout.act_bits or layout.n_cycles * layout.dac_bits
        buffer_bits_moved = layout.positions * (layout.k_rows * act_bits + layout.outputs * t["buffer_word_bits"])
        energy = {
            "array": layout.cell_reads * e("crossbar_cell_read"),
            "adc": float(sum(n * self.adc_energy(b) for b, n in by_bits.items())),
            "dac": layout.dac_row_cycles * e(f"dac_row_cycle_{layout.dac_bits}b"),
            "sample_hold": conv * e("sample_hold"),
            "shift_add": conv * e("shift_add"),
            "buffer": (buffer_bits_moved / t["buffer_access_bits"] * e(t.buffer_energy_event)
                       if t.include_buffer else 0.0),
        }
        adcs = self.adcs_per_array(layout)
        n_adcs = layout.arrays * adcs
        buffer_kib = layout.positions * layout.outputs * t["buffer_word_bits"] / 8 / 1024
        area = {
            "array": layout.arrays * layout.rows * layout.cols * t["crossbar_cell_area_mm2"],
            "adc": float(sum(adcs * self.adc_area(b) for row in layout.adc_bits for b in row)),
            "dac": layout.arrays * layout.rows * t["dac_area_mm2"] * 2.0 ** (layout.dac_bits - 1),
            "sample_hold": layout.arrays * layout.pairs_per_array * t["sample_hold_area_mm2"],
            "shift_add": n_adcs * t["shift_add_units_per_adc"] * t["shift_add_area_mm2"],
            "buffer": buffer_kib * t["buffer_area_mm2_per_kib"] if t.include_buffer else 0.0,
        }
        cycle = self.cycle_time(layout)
        cycles = layout.positions * layout.n_cycles
        counts = {f"adc_conversion_{b}b": float(n) for b, n in by_bits.items()}
        counts.update(adc_conversions=conv, sample_hold=conv, shift_add=conv,
                      dac_row_cycles=float(layout.dac_row_cycles), cell_reads=float(layout.cell_reads))
        if t.include_buffer:
            counts["buffer_bits"] = float(buffer_bits_moved)
        resources = {"arrays": float(layout.arrays), "adcs": float(n_adcs), "cycles": float(cycles),
                     "cycle_time_s": cycle}
        return Cost(layout.name, energy, cycles * cycle, area, self.adc_law, counts, resources)

    def cost(self, layouts: LayerLayout | Iterable[LayerLayout], name: str = "model") -> Cost:
        """One layout's cost, or a model's: sums over layers (latency too: layers run in sequence)."""
        if isinstance(layouts, LayerLayout):
            return self.layer_cost(layouts)
        layers = tuple(self.layer_cost(lay) for lay in layouts)
        return total(layers, name)


def total(layers: Sequence[Cost], name: str = "model") -> Cost:
    """A model's cost from its layers' costs (energy, latency, area and counts summed)."""
    if not layers:
        raise ValueError("no layers to total")
    laws = {c.adc_law for c in layers}
    if len(laws) > 1:
        raise ValueError(f"layers priced with different ADC laws {sorted(laws)}")

    def add(dicts: Iterable[dict[str, float]], skip: tuple[str, ...] = ()) -> dict[str, float]:
        out: dict[str, float] = {}
        for d in dicts:
            for k, v in d.items():
                if k not in skip:
                    out[k] = out.get(k, 0.0) + v
        return out

    return Cost(
        name=name,
        energy_breakdown_j=add(c.energy_breakdown_j for c in layers),
        latency_s=float(sum(c.latency_s for c in layers)),
        area_breakdown_mm2=add(c.area_breakdown_mm2 for c in layers),
        adc_law=laws.pop(),
        counts=add(c.counts for c in layers),
        resources=add((c.resources for c in layers), skip=("cycle_time_s",)),
        layers=tuple(layers),
    )

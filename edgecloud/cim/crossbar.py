"""Analog NVM crossbar backend: bit-sliced weights on differential conductance pairs.

Mapping (ISAAC/PUMA style). A layer's K weight rows are cut into tiles of ``rows`` rows. Each
signed integer weight w is split into S = ceil(b_mag / k) slices of k = ``cell_bits`` bits of
|w| (shift-and-add weight 2^(k s)); slice s of w is held by a differential pair of cells, level
slice_s on the positive cell if w > 0 (else on the negative one) and level 0 on the other.
Pairs sit side by side, ``cols`` physical columns per tile (cols/2 pairs). Inputs are streamed
``dac_bits`` bits per cycle (bit-serial by default; a binary activation is one cycle). Each
pair's differential current is read by one ADC per cycle, so the partial sum per conversion is
sum_i x_i,t (G+_i - G-_i) / g_unit; digital shift-and-add combines cycles, slices and row
tiles. Conductances: G(level) = G_min + level (G_max - G_min) / (2^k - 1), G_max = 1,
G_min = 1 / ``on_off_ratio``; G_min cancels in each pair up to variation.

Non-idealities (all off in the ``ideal`` preset, where the result equals digital exactly):
programming variation (once per chip; models in :mod:`edgecloud.cim.noise`), stuck-at-on/off
faults, per-read noise (independent per cell and read, sigma = ``read_noise`` G_max, output
referred as sigma sqrt(2 sum_i x_i^2)), first-order IR drop (relative error ~ r G N^2 / 2),
ADC resolution / range / noise (:mod:`edgecloud.cim.adc`).

Options (``BackendConfig.options``; default in brackets):

- ``preset`` ["ideal"]: "ideal" or "typical" (defaults for every option not given; "typical"
  = notes 6.1: on/off 10, PCM state-dependent variation, 0.1 % stuck-on and stuck-off, 1 %
  read noise, 1 ohm wires, 8-bit ADC calibrated at the 99.9th percentile, 0.5 LSB ADC noise).
- ``rows`` [128], ``cols`` [128]: tile size (cols even: pairs of columns).
- ``cell_bits`` [2]: bits per cell k (1..7). ``dac_bits`` [1]: input bits per cycle v (1..8).
- ``on_off_ratio`` [None = unlimited]: G_max / G_min (> 1).
- ``programming_noise`` ["none"]: "none" | "state" | "proportional" | "lognormal";
  ``programming_sigma`` [0.0]: scale of the aihwkit PCM fit ("state") or sigma.
- ``p_stuck_on`` [0.0], ``p_stuck_off`` [0.0]: per-cell fault probabilities.
- ``read_noise`` [0.0]: per-read cell-current sigma as a fraction of G_max.
- ``wire_resistance`` [0.0]: ohms per wire segment (0 = no IR drop); ``g_max_siemens``
  [25e-6]: physical G_max for IR drop; ``ir_drop_activity`` [1.0]: fraction of rows driven.
- ``adc_bits`` [None = ideal ADC]: 1..16; ``adc_range`` ["max"]: "max" | "calibrated";
  ``adc_percentile`` [99.9]; ``calib_batches`` [1]; ``adc_noise_lsb`` [0.0].
- ``adc_reduce`` ["none"]: per-array ADC resolution (one ADC setting per physical array of
  ``rows`` x ``cols`` cells). "sparsity" (D.U.B., Ibrayev et al.): an array whose densest column
  has n non-zero cells of R rows needs k = floor(log2(R / n)) fewer bits than the full
  resolution (``adc_bits``, or the lossless bits of R rows for an ideal ADC): sparsity pays only
  in discrete steps 1 - 2^-k. "reach": the fewest bits that cover the widest column range of
  the array as programmed (``max`` range; never more than the full resolution). Cells are
  counted per slice column (a zero high slice of a small weight is a zero cell).
- ``layers`` [{}]: per-layer overrides by layer name (as in the model's ``named_modules``):
  ``rows``, ``cols``, ``adc_reduce`` and ``adc_bits`` (one number, or a list per row tile of a
  list per column tile: the bits of each array). A bundle stores these in its manifest
  (``hardware: {crossbar: {layers: ...}}``): NAX picks the crossbar size per layer, D.U.B. the
  bits per array.
- ``gemm`` ["int8"]: "int8" (exact int8 GEMM; non-integer conductances on a 2^-f grid of about
  1/100 of the cell range) or "float32". ``fresh_noise`` [False]: fresh Gaussian per read
  instead of the seeded pool (slower). ``block_kib`` [8192]: rows per block of partial sums
  (and per noise draw). ``fused_kernel`` [True]: the C kernels of :mod:`edgecloud.cim.kernel`.
- ``device`` ["cpu"]: where the array pass runs, "cpu", "cuda" or "cuda:N" (the torch path on
  the GPU, no C kernels: equal to the CPU at ideal settings, the same noise samples otherwise;
  results return to the input's device). "cuda" without CUDA is an error.

Each conversion's read noise and ADC noise are independent Gaussians and are drawn as one
(:mod:`edgecloud.cim.engine`).

With an ideal ADC (``adc_bits`` None) per-array resolutions only price the conversions (the
reduced ADC is lossless by construction, so the values are those of the ideal ADC); with
``adc_bits`` set every column converts at its array's resolution and clips at its own top code.

Events per sample: ``adc/adc_conversion_<B>b`` (one per pair, cycle and row tile at its array's
resolution; B = the lossless formula per tile for an ideal ADC), ``adc/sample_hold`` (one per conversion),
``dac/dac_row_cycle_<v>b`` (rows x cycles x column tiles), ``crossbar/crossbar_cell_read``
(programmed cells of driven rows per cycle), ``digital/shift_add`` (one per conversion) and
``digital/mac_fp32`` (output scaling, one per output).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from edgecloud.cim.adc import bits_to_cover, lossless_adc_bits
from edgecloud.cim.backend import register_backend
from edgecloud.cim.engine import MappedLayer
from edgecloud.cim.noise import chip_generator, ir_drop_factors, program_conductances
from edgecloud.cim.simulated import ArrayOptions, SimulatedBackend
from edgecloud.cim.tiling import cycles, magnitude_bits, magnitude_slices, row_tiles, weight_matrix
from edgecloud.nn.quant import QuantLayerMixin, quant_layers

TYPICAL: dict[str, Any] = {
    "on_off_ratio": 10.0,
    "programming_noise": "state",
    "programming_sigma": 1.0,
    "p_stuck_on": 0.001,
    "p_stuck_off": 0.001,
    "read_noise": 0.01,
    "wire_resistance": 1.0,
    "adc_bits": 8,
    "adc_range": "calibrated",
    "adc_noise_lsb": 0.5,
}


class LayerHardware(BaseModel):
    """One layer's own crossbar configuration (overrides the backend-wide option)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rows: int | None = Field(None, ge=1, le=4096)
    cols: int | None = Field(None, ge=2, le=4096)
    adc_reduce: Literal["none", "sparsity", "reach"] | None = None
    adc_bits: int | list[list[int]] | None = None  # one resolution, or [row tile][column tile]

    @model_validator(mode="after")
    def _check(self) -> "LayerHardware":
        if self.cols is not None and self.cols % 2:
            raise ValueError(f"cols must be even (differential pairs), got {self.cols}")
        bits = self.adc_bits
        flat = [bits] if isinstance(bits, int) else [b for row in bits or [] for b in row]
        if any(not 1 <= b <= 16 for b in flat):
            raise ValueError(f"adc_bits must lie in 1..16, got {bits}")
        return self


class CrossbarOptions(ArrayOptions):
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"ideal": {}, "typical": TYPICAL}

    rows: int = Field(128, ge=1, le=4096)
    cols: int = Field(128, ge=2, le=4096)
    cell_bits: int = Field(2, ge=1, le=7)
    dac_bits: int = Field(1, ge=1, le=8)
    on_off_ratio: float | None = Field(None, gt=1.0)
    programming_noise: Literal["none", "state", "proportional", "lognormal"] = "none"
    programming_sigma: float = Field(0.0, ge=0.0)
    p_stuck_on: float = Field(0.0, ge=0.0, le=1.0)
    p_stuck_off: float = Field(0.0, ge=0.0, le=1.0)
    read_noise: float = Field(0.0, ge=0.0)
    wire_resistance: float = Field(0.0, ge=0.0)
    g_max_siemens: float = Field(25e-6, gt=0.0)
    ir_drop_activity: float = Field(1.0, gt=0.0, le=1.0)
    gemm: Literal["int8", "float32"] = "int8"
    adc_reduce: Literal["none", "sparsity", "reach"] = "none"
    layers: dict[str, LayerHardware] = Field(default_factory=dict)

    def for_layer(self, name: str) -> "CrossbarOptions":
        """These options with the layer's own overrides applied (explicit per-array bits aside)."""
        own = self.layers.get(name)
        if own is None:
            return self
        update = own.model_dump(exclude_none=True, exclude={"adc_bits"})
        if isinstance(own.adc_bits, int):
            update["adc_bits"] = own.adc_bits
        return self.model_copy(update=update)

    @model_validator(mode="after")
    def _check(self) -> "CrossbarOptions":
        if self.cols % 2:
            raise ValueError(f"cols must be even (differential pairs), got {self.cols}")
        if self.p_stuck_on + self.p_stuck_off > 1.0:
            raise ValueError("p_stuck_on + p_stuck_off must not exceed 1")
        return self


@register_backend("crossbar")
class CrossbarBackend(SimulatedBackend):
    """Analog crossbar tiles with differential pairs, bit slicing and bit-serial inputs."""

    name = "crossbar"
    Options = CrossbarOptions
    options: CrossbarOptions

    @property
    def array_bits(self) -> dict[str, torch.Tensor]:
        """Layer name -> (row tiles, column tiles) ADC bits of each programmed array."""
        return {m.name: m.array_bits for _, m in self._chips.values() if m.array_bits is not None}

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        names = {n for n, _ in quant_layers(model)}
        unknown = sorted(set(self.options.layers) - names)
        if unknown:
            raise ValueError(f"crossbar option layers: no quantized layer named {', '.join(unknown)}; "
                             f"the model's are {', '.join(sorted(names)) or '(none)'}")
        return super().prepare(model)

    def program(self, layer: QuantLayerMixin, w_int: torch.Tensor, name: str) -> MappedLayer:
        opt = self.options.for_layer(name)
        w = weight_matrix(layer, w_int)  # (K, O)
        k_rows, n_out = w.shape
        k, v = opt.cell_bits, opt.dac_bits
        n_slices = -(-magnitude_bits(layer) // k)
        slices = magnitude_slices(w, k, n_slices)  # (S, K, O)
        to_cols = lambda t: t.permute(1, 0, 2).reshape(k_rows, n_slices * n_out)  # noqa: E731
        pos, neg = to_cols(slices * (w > 0)), to_cols(slices * (w < 0))
        d_nom = (pos - neg).double()  # nominal differential levels, (K, J)
        tiles = row_tiles(k_rows, opt.rows)
        g_min = 0.0 if opt.on_off_ratio is None else 1.0 / opt.on_off_ratio
        g_unit = (1.0 - g_min) / (2**k - 1)
        deviates = (
            (opt.programming_noise != "none" and opt.programming_sigma > 0)
            or opt.p_stuck_on > 0 or opt.p_stuck_off > 0 or opt.wire_resistance > 0
        )
        d_eff = d_nom
        if deviates:
            gen = chip_generator(self.seed, name)
            target_p, target_n = g_min + pos.double() * g_unit, g_min + neg.double() * g_unit
            args = (g_min, opt.programming_noise, opt.programming_sigma, opt.p_stuck_on, opt.p_stuck_off, gen)
            g_p, g_n = program_conductances(target_p, *args), program_conductances(target_n, *args)
            if opt.wire_resistance > 0:
                g_p, g_n = self._ir_drop(g_p, g_n, tiles, opt)
            d_eff = d_nom + ((g_p - target_p) - (g_n - target_n)) / g_unit
        weights, unit, int_gemm = _gemm_weights(d_eff, tiles, integral=not deviates,
                                                 want_int=opt.gemm == "int8" and v <= 7)
        top_x = 2**v - 1
        reach_lo = torch.stack([d_nom[a:b].clamp(max=0).sum(0) for a, b in tiles]) * top_x
        reach_hi = torch.stack([d_nom[a:b].clamp(min=0).sum(0) for a, b in tiles]) * top_x
        array_bits = self._array_bits(name, opt, d_nom, tiles, reach_hi - reach_lo)
        adc_bits, site_bits = opt.adc_bits, None
        explicit = isinstance(self.options.layers.get(name, LayerHardware()).adc_bits, list)
        if explicit and adc_bits is None:
            adc_bits = int(array_bits.max())  # bits given per array: the arrays quantize at them
        if adc_bits is not None and bool((array_bits != adc_bits).any()):
            pairs = opt.cols // 2
            site_bits = array_bits.repeat_interleave(pairs, dim=1)[:, :n_slices * n_out].contiguous()
        mapped = MappedLayer(
            name=name, tiles=tiles, weights=weights, weight_unit=unit, int_gemm=int_gemm,
            n_sub=n_slices, out_features=n_out,
            coef=torch.pow(2.0, k * torch.arange(n_slices, dtype=torch.float64)),
            bits_per_cycle=v, n_cycles=cycles(layer.act_bits, v),
            reach_lo=reach_lo, reach_hi=reach_hi,
            adc_bits=adc_bits, site_bits=site_bits, array_bits=array_bits, adc_range=opt.adc_range, adc_percentile=opt.adc_percentile,
            calib_batches=opt.calib_batches, adc_noise_lsb=opt.adc_noise_lsb,
            row_noise=math.sqrt(2.0) * opt.read_noise / g_unit,
        )
        mapped.finalize()
        return mapped

    def _array_bits(self, name: str, opt: CrossbarOptions, d_nom: torch.Tensor, tiles: list[tuple[int, int]],
                    span: torch.Tensor) -> torch.Tensor:
        """(row tiles, column tiles) int64: the ADC resolution of each physical array."""
        pairs = opt.cols // 2
        j = d_nom.shape[1]
        col_tiles = -(-j // pairs)
        explicit = self.options.layers.get(name, LayerHardware()).adc_bits
        if isinstance(explicit, list):
            shape = (len(tiles), col_tiles)
            if len(explicit) != shape[0] or any(len(row) != shape[1] for row in explicit):
                raise ValueError(f"crossbar option layers.{name}.adc_bits: needs {shape[0]} lists (row tiles) of "
                                 f"{shape[1]} numbers (column tiles of {opt.cols} columns), got {explicit}")
            return torch.tensor(explicit, dtype=torch.int64)
        out = torch.empty(len(tiles), col_tiles, dtype=torch.int64)
        for r, (a, b) in enumerate(tiles):
            full = opt.adc_bits or lossless_adc_bits(b - a, opt.cell_bits, opt.dac_bits)
            nnz = (d_nom[a:b] != 0).sum(0) if opt.adc_reduce == "sparsity" else None
            need = bits_to_cover(span[r]).long() if opt.adc_reduce == "reach" else None
            for g in range(col_tiles):
                cols = slice(g * pairs, min((g + 1) * pairs, j))
                bits = full
                if opt.adc_reduce == "sparsity":
                    assert nnz is not None
                    densest = int(nnz[cols].max())
                    saved = (b - a).bit_length()  # an empty array: its sums are all 0
                    if densest > 0:  # levels 1 - 2^-k: nnz <= R / 2^k saves k bits
                        saved = ((b - a) // densest).bit_length() - 1
                    bits = max(1, full - saved)
                elif opt.adc_reduce == "reach":
                    assert need is not None
                    bits = max(1, min(full, int(need[cols].max())))
                out[r, g] = bits
        return out

    def _ir_drop(self, g_p: torch.Tensor, g_n: torch.Tensor, tiles: list[tuple[int, int]], opt: CrossbarOptions
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale each cell by its distributed-load IR-drop factor, tile by tile."""
        pairs_per_tile = opt.cols // 2
        j = g_p.shape[1]
        out_p, out_n = g_p.clone(), g_n.clone()
        for a, b in tiles:
            for c0 in range(0, j, pairs_per_tile):
                c1 = min(c0 + pairs_per_tile, j)
                block_p, block_n = g_p[a:b, c0:c1], g_n[a:b, c0:c1]
                mean_g = float(torch.cat([block_p.flatten(), block_n.flatten()]).mean())
                r_g = opt.wire_resistance * mean_g * opt.g_max_siemens * opt.ir_drop_activity
                pair = torch.arange(c1 - c0, dtype=torch.float64)
                used = torch.full((c1 - c0,), 2.0 * (c1 - c0), dtype=torch.float64)
                out_p[a:b, c0:c1] = block_p * ir_drop_factors(b - a, 2 * pair + 1, used, r_g)
                out_n[a:b, c0:c1] = block_n * ir_drop_factors(b - a, 2 * pair + 2, used, r_g)
        return out_p, out_n

    def events(self, mapped: MappedLayer, layer: QuantLayerMixin) -> list[tuple[str, str, float]]:
        opt = self.options.for_layer(mapped.name)
        t, j = mapped.n_cycles, mapped.columns
        pairs = opt.cols // 2
        col_tiles = -(-2 * j // opt.cols)
        out: list[tuple[str, str, float]] = []
        conversions = 0.0
        by_bits: dict[int, float] = {}
        array_bits = mapped.array_bits
        assert array_bits is not None
        for r in range(len(mapped.tiles)):
            for g in range(col_tiles):
                bits = int(array_bits[r, g])
                n = t * (min((g + 1) * pairs, j) - g * pairs)
                by_bits[bits] = by_bits.get(bits, 0.0) + n
                conversions += n
        out += [("adc", f"adc_conversion_{bits}b", n) for bits, n in sorted(by_bits.items())]
        rows = sum(b - a for a, b in mapped.tiles)
        out += [
            ("adc", "sample_hold", conversions),
            ("dac", f"dac_row_cycle_{opt.dac_bits}b", float(t * rows * col_tiles)),
            ("crossbar", "crossbar_cell_read", float(t * rows * 2 * j)),
            ("digital", "shift_add", conversions),
            ("digital", "mac_fp32", float(mapped.out_features)),
        ]
        return out


def _gemm_weights(d: torch.Tensor, tiles: list[tuple[int, int]], integral: bool, want_int: bool
                  ) -> tuple[list[torch.Tensor], float, bool]:
    """Per-tile GEMM weights, the integer units per GEMM unit, and whether they are int8.

    Integer levels go to int8 as they are. Non-integer effective levels go on the finest
    power-of-two grid 2^-f that keeps every |value| within int8 (for 2-bit cells 1/32 of a
    level, ~1 % of the conductance range): exact integer GEMMs, small representation error.
    """
    peak = float(d.abs().max()) if d.numel() else 0.0
    if want_int and integral and peak <= 127:
        return [d[a:b].to(torch.int8).contiguous() for a, b in tiles], 1.0, True
    if want_int and not integral and peak > 0:
        f = math.floor(math.log2(127.0 / peak))
        if f >= 0:
            q = torch.round(d * 2.0**f).to(torch.int8)
            return [q[a:b].contiguous() for a, b in tiles], 2.0**-f, True
    return [d[a:b].float().contiguous() for a, b in tiles], 1.0, False

"""6T-SRAM in-memory MAC backend (IMAC-style), with a binary XNOR mode.

Multi-bit mode (IMAC, Ali et al. TCAS-I 2020). Inputs drive the word lines through a DAC
(``dac_bits`` bits at once; wider activations take several cycles, shift-and-added). Weights
are sign + magnitude: |w| is stored as ``weight_cell_bits``-bit words (4 cells, binary
weighted; wider weights are split into slices), and positive and negative weights sit on
separate column sets that are read separately, so every partial sum is non-negative. The
products of ``group_size`` rows are accumulated on the bit line and read by one ADC per
column; group results are added digitally (positive minus negative, slices and cycles shifted).

XNOR mode (binary layers: 1-bit weights and activations; ``xnor_binary``): each cell computes
XNOR(x, w) and a bit line counts the matches of ``xnor_group_size`` rows (XNOR-SRAM style);
sum_i x_i w_i = popcount - #(w = -1) is recovered digitally, exactly for an ideal array.

Non-idealities (all off in the ``ideal`` preset, where results equal digital exactly):

- bit-line saturation: y -> V_sat (1 - exp(-y / V_sat)) (``exp``) or V_sat tanh(y / V_sat),
  V_sat set so the group's full scale G (2^v - 1)(2^k - 1) is compressed by
  ``saturation_compression``; not undone digitally.
- fixed per-instance error from Vt variation, either
  ``vt_sigma_mv``: per-cell current mismatch, sigma_I / I = 1.3 sigma_Vt / ``overdrive_mv``
  (alpha-power law above threshold), drawn once per cell; or
  ``vt_sigma_lsb``: IMAC's lumped error, a fixed Gaussian offset of sigma LSB per ADC read site
  (group, column), drawn once (the IMAC circuit Monte-Carlo fit is 0.6 LSB).
- per-read noise ``read_noise_lsb`` (and ``adc_noise_lsb``), in LSB, drawn per conversion.
- ADC resolution / range (:mod:`edgecloud.cim.adc`; lossless bits for a group of G rows:
  ceil(log2(G (2^k - 1)(2^v - 1) + 1))).

``accuracy_model`` ["arrays"]: "arrays" simulates the groups, ADCs and errors above. "imac" is
instead the IMAC paper's own application-level error model (its ``add_variations``), for
comparison with the published accuracy: the exact integer output y of the layer is mapped to
L = (2^B - 1) K / G levels of the layer's max |y| (B = ``adc_bits``, default 4; max |y| taken
on the first ``calib_batches`` batches, IMAC takes it per batch), a fixed rounded Gaussian
error of ``vt_sigma_lsb`` sqrt(K / G) levels per output element (channel and position, drawn
once per chip) is added to the magnitude, clamped to [0, L] and scaled back. Groups are not
clipped one by one, so this is much milder than the arrays model; events are the same.

Options (``BackendConfig.options``; default in brackets):

- ``preset`` ["ideal"]: "ideal", "typical" (4-bit ADC calibrated at the 99.9th percentile,
  exp saturation compressing full scale by 15 %, vt_sigma_lsb 0.6, 0.5 LSB read noise) or
  "imac" (IMAC's accuracy configuration: 4-bit ADC calibrated at the 99.9th percentile and the
  fixed 0.6 LSB per-site error only; set ``group_size`` 25 for LeNet-5, 10 for VGG).
- ``group_size`` [10]: rows accumulated per ADC read (IMAC used 10 for VGG, 25 for LeNet-5).
- ``xnor_binary`` [True]: run binary layers in XNOR mode; ``xnor_group_size`` [64].
- ``dac_bits`` [4]: word-line DAC resolution (input bits per cycle, 1..7).
- ``weight_cell_bits`` [4]: magnitude bits per sign + magnitude word (1..7).
- ``cols`` [256]: bit cells per word line of one macro (for DAC event counts).
- ``saturation`` ["none"]: "none" | "exp" | "tanh"; ``saturation_compression`` [0.15].
- ``vt_sigma_mv`` [0.0], ``overdrive_mv`` [300.0]; ``vt_sigma_lsb`` [0.0].
- ``read_noise_lsb`` [0.0]; ``adc_bits`` [None = ideal ADC]; ``adc_range`` ["max"];
  ``adc_percentile`` [99.9]; ``calib_batches`` [1]; ``adc_noise_lsb`` [0.0];
  ``fresh_noise`` [False]; ``block_kib`` [8192]; ``fused_kernel`` [True]; ``device`` ["cpu"]:
  "cpu", "cuda" or "cuda:N" (as for the crossbar; the "imac" accuracy model stays digital on
  the input's device).

Events per sample: ``sram/sram_cim_4b_op`` (one per product per cycle and slice) or
``sram/sram_cim_binary_op`` (XNOR), ``adc/adc_conversion_<B>b`` (one per group, column and
cycle), ``dac/sram_wl_dac_<v>b`` (word-line DAC conversions: word lines x cycles x macros; priced
per ~1 ns SRAM read cycle, not per 100 ns crossbar cycle as ``dac_row_cycle``),
``digital/shift_add`` (one per conversion) and ``digital/mac_fp32`` (output scaling, one per output).
"""

from __future__ import annotations

import math
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field

from edgecloud.cim.adc import lossless_adc_bits
from edgecloud.cim.backend import register_backend
from edgecloud.cim.engine import MappedLayer
from edgecloud.cim.events import record
from edgecloud.cim.noise import chip_generator, saturation_vsat, vt_current_sigma
from edgecloud.cim.simulated import ArrayOptions, SimulatedBackend
from edgecloud.cim.tiling import cycles, magnitude_bits, magnitude_slices, row_tiles, weight_matrix
from edgecloud.nn.quant import QuantLayerMixin

TYPICAL: dict[str, Any] = {
    "adc_bits": 4,
    "adc_range": "calibrated",
    "saturation": "exp",
    "saturation_compression": 0.15,
    "vt_sigma_lsb": 0.6,
    "read_noise_lsb": 0.5,
}
# IMAC (Ali et al. TCAS-I 2020) accuracy study: 4-bit ADC per group, sigma = 0.6 LSB fixed error.
IMAC: dict[str, Any] = {"adc_bits": 4, "adc_range": "calibrated", "vt_sigma_lsb": 0.6}


class SramOptions(ArrayOptions):
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {"ideal": {}, "typical": TYPICAL, "imac": IMAC}

    group_size: int = Field(10, ge=1, le=1024)
    xnor_binary: bool = True
    xnor_group_size: int = Field(64, ge=1, le=4096)
    dac_bits: int = Field(4, ge=1, le=7)
    weight_cell_bits: int = Field(4, ge=1, le=7)
    cols: int = Field(256, ge=1)
    saturation: Literal["none", "exp", "tanh"] = "none"
    saturation_compression: float = Field(0.15, gt=0.0, lt=1.0)
    vt_sigma_mv: float = Field(0.0, ge=0.0)
    overdrive_mv: float = Field(300.0, gt=0.0)
    vt_sigma_lsb: float = Field(0.0, ge=0.0)
    read_noise_lsb: float = Field(0.0, ge=0.0)
    accuracy_model: Literal["arrays", "imac"] = "arrays"


@register_backend("sram")
class SramBackend(SimulatedBackend):
    """6T-SRAM groups: word-line DAC inputs, sign + magnitude weights, per-group ADC reads."""

    name = "sram"
    Options = SramOptions
    options: SramOptions

    def __init__(self, seed: int = 0, **options: Any) -> None:
        super().__init__(seed, **options)
        self._imac: dict[int, dict[str, Any]] = {}  # accuracy_model "imac": per-layer max |y| and error map

    def mvm(self, layer: QuantLayerMixin, x_int: torch.Tensor, w_int: torch.Tensor) -> torch.Tensor:
        if self.options.accuracy_model == "arrays" or self.is_xnor(layer):
            return super().mvm(layer, x_int, w_int)
        mapped = self.mapped(layer, w_int)  # programmed as usual: the events are the arrays'
        y = layer.integer_mvm(x_int, w_int)
        positions = y[0, 0].numel() if y.dim() > 2 else 1
        for component, event, per_position in self.events(mapped, layer):
            record(component, event, per_position * positions)
        return self._imac_variations(layer, y)

    def _imac_variations(self, layer: QuantLayerMixin, y: torch.Tensor) -> torch.Tensor:
        """IMAC's add_variations on an exact integer output (see the module docstring)."""
        opt = self.options
        fan_in = layer.weight[0].numel()
        levels = (2 ** (opt.adc_bits or 4) - 1) * fan_in / opt.group_size
        with self._lock:
            state = self._imac.setdefault(id(layer), {"max": 0.0, "seen": 0, "error": None})
            if state["seen"] < opt.calib_batches:
                state["max"] = max(state["max"], float(y.abs().max()))
                state["seen"] += 1
            if state["error"] is None:
                gen = chip_generator(self.seed, self._names.get(id(layer), "layer"), "imac")
                sigma = opt.vt_sigma_lsb * math.sqrt(fan_in / opt.group_size)
                state["error"] = torch.round(sigma * torch.randn(y.shape[1:], generator=gen))
            top, error = state["max"], state["error"]
        if top <= 0:
            return y
        magnitude = torch.round(y.abs() * (levels / top)) + error.to(y.device)
        return torch.sign(y) * magnitude.clamp_(0.0, levels) * (top / levels)

    def is_xnor(self, layer: QuantLayerMixin) -> bool:
        return self.options.xnor_binary and layer.weight_bits == 1 and layer.act_bits == 1

    def program(self, layer: QuantLayerMixin, w_int: torch.Tensor, name: str) -> MappedLayer:
        opt = self.options
        w = weight_matrix(layer, w_int)  # (K, O)
        gen = chip_generator(self.seed, name)
        mismatch = vt_current_sigma(opt.vt_sigma_mv, opt.overdrive_mv) if opt.vt_sigma_mv > 0 else 0.0
        if self.is_xnor(layer):
            return self._program_xnor(w, name, gen, mismatch)
        k_rows, n_out = w.shape
        k, v = opt.weight_cell_bits, opt.dac_bits
        n_slices = -(-magnitude_bits(layer) // k)
        slices = magnitude_slices(w, k, n_slices)  # (S, K, O) nominal magnitude words
        eff = slices.double()
        if mismatch > 0:  # each binary-weighted cell of a word carries its own current factor
            bits = torch.stack([(slices >> b) & 1 for b in range(k)]).double()  # (k, S, K, O)
            factor = 1.0 + mismatch * torch.randn(bits.shape, generator=gen, dtype=torch.float64)
            weight = torch.pow(2.0, torch.arange(k, dtype=torch.float64)).view(-1, 1, 1, 1)
            eff = (bits * factor * weight).sum(0)
        pos, neg = (w > 0).double(), (w < 0).double()
        to_cols = lambda t: t.permute(1, 0, 2).reshape(k_rows, n_slices * n_out)  # noqa: E731
        d_nom = torch.cat([to_cols(slices.double() * pos), to_cols(slices.double() * neg)], dim=1)
        d_eff = torch.cat([to_cols(eff * pos), to_cols(eff * neg)], dim=1)  # (K, 2 S O), sub = p S + s
        shifts = torch.pow(2.0, k * torch.arange(n_slices, dtype=torch.float64))
        coef = torch.cat([shifts, -shifts])
        full_scale = opt.group_size * (2**v - 1) * (2**k - 1)
        return self._finish(layer, name, w, d_nom, d_eff, 2 * n_slices, coef, opt.group_size, v,
                            full_scale, gen, offset=None, removed=None)

    def _program_xnor(self, w: torch.Tensor, name: str, gen: torch.Generator, mismatch: float) -> MappedLayer:
        opt = self.options
        group = opt.xnor_group_size
        tiles = row_tiles(w.shape[0], group)
        d_nom = w.double()
        factor = torch.ones_like(d_nom)
        if mismatch > 0:
            factor = 1.0 + mismatch * torch.randn(d_nom.shape, generator=gen, dtype=torch.float64)
        # a (w = -1) row counts a match when x = 0: (1 - x)(1 + delta) = (1 + delta) - x (1 + delta)
        neg = (w < 0).double()
        offset = torch.stack([(neg[a:b] * factor[a:b]).sum(0) for a, b in tiles])
        removed = torch.stack([neg[a:b].sum(0) for a, b in tiles])
        return self._finish(None, name, w, d_nom, d_nom * factor, 1, torch.ones(1, dtype=torch.float64),
                            group, 1, float(group), gen, offset=offset, removed=removed)

    def _finish(self, layer: QuantLayerMixin | None, name: str, w: torch.Tensor, d_nom: torch.Tensor,
                d_eff: torch.Tensor, n_sub: int, coef: torch.Tensor, group: int, v: int, full_scale: float,
                gen: torch.Generator, offset: torch.Tensor | None, removed: torch.Tensor | None) -> MappedLayer:
        opt = self.options
        tiles = row_tiles(w.shape[0], group)
        exact = torch.equal(d_eff, d_nom)
        peak = float(d_eff.abs().max()) if d_eff.numel() else 0.0
        weights: list[torch.Tensor]
        unit, int_gemm = 1.0, True
        if exact:
            weights = [d_eff[a:b].to(torch.int8).contiguous() for a, b in tiles]
        elif peak > 0 and math.floor(math.log2(127.0 / peak)) >= 0:
            f = math.floor(math.log2(127.0 / peak))
            q = torch.round(d_eff * 2.0**f).to(torch.int8)
            weights, unit = [q[a:b].contiguous() for a, b in tiles], 2.0**-f
        else:
            weights, int_gemm = [d_eff[a:b].float().contiguous() for a, b in tiles], False
        top_x = 2**v - 1
        base = offset if offset is not None else torch.zeros(len(tiles), d_nom.shape[1], dtype=torch.float64)
        nominal_off = removed if removed is not None else base
        lo = nominal_off + torch.stack([d_nom[a:b].clamp(max=0).sum(0) for a, b in tiles]) * top_x
        hi = nominal_off + torch.stack([d_nom[a:b].clamp(min=0).sum(0) for a, b in tiles]) * top_x
        saturation, v_sat = None, 0.0
        if opt.saturation != "none":
            saturation = opt.saturation
            v_sat = saturation_vsat(full_scale, opt.saturation_compression, saturation)
            sat = lambda t: torch.sign(t) * v_sat * -torch.expm1(-t.abs() / v_sat) if saturation == "exp" \
                else v_sat * torch.tanh(t / v_sat)  # noqa: E731
            lo, hi = sat(lo), sat(hi)
        fixed = None
        if opt.vt_sigma_lsb > 0:
            fixed = opt.vt_sigma_lsb * torch.randn(lo.shape, generator=gen, dtype=torch.float64)
        n_cycles = 1 if layer is None else cycles(layer.act_bits, v)
        mapped = MappedLayer(
            name=name, tiles=tiles, weights=weights, weight_unit=unit, int_gemm=int_gemm,
            n_sub=n_sub, out_features=w.shape[1], coef=coef, bits_per_cycle=v, n_cycles=n_cycles,
            reach_lo=lo, reach_hi=hi, offset=offset, removed_offset=removed,
            adc_bits=opt.adc_bits, adc_range=opt.adc_range, adc_percentile=opt.adc_percentile,
            calib_batches=opt.calib_batches,
            adc_noise_lsb=math.hypot(opt.adc_noise_lsb, opt.read_noise_lsb),
            fixed_lsb=fixed, saturation=saturation, v_sat=v_sat,
        )
        mapped.finalize()
        return mapped

    def events(self, mapped: MappedLayer, layer: QuantLayerMixin) -> list[tuple[str, str, float]]:
        opt = self.options
        k_rows = mapped.tiles[-1][1]
        o, t = mapped.out_features, mapped.n_cycles
        conversions = float(t * mapped.n_tiles * mapped.columns)
        by_bits: dict[int, float] = {}
        xnor = self.is_xnor(layer)
        cell_bits = 1 if xnor else opt.weight_cell_bits
        for a, b in mapped.tiles:
            bits = opt.adc_bits or lossless_adc_bits(b - a, cell_bits, mapped.bits_per_cycle)
            by_bits[bits] = by_bits.get(bits, 0.0) + t * mapped.columns
        out = [("adc", f"adc_conversion_{bits}b", n) for bits, n in sorted(by_bits.items())]
        if xnor:
            macros = -(-o // opt.cols)
            out.append(("sram", "sram_cim_binary_op", float(k_rows * o)))
        else:
            n_slices = mapped.n_sub // 2
            macros = -(-(o * n_slices * (opt.weight_cell_bits + 1)) // opt.cols)
            out.append(("sram", "sram_cim_4b_op", float(k_rows * o * n_slices * t)))
        out += [
            ("dac", f"sram_wl_dac_{mapped.bits_per_cycle}b", float(t * k_rows * macros)),
            ("digital", "shift_add", conversions),
            ("digital", "mac_fp32", float(o)),
        ]
        return out

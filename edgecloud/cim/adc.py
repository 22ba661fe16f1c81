"""Column ADCs: resolution, range, and the quantizer applied to every analog partial sum.

All values are in *integer units*: one unit is the partial sum of one input LSB times one
weight (cell) LSB, so an ideal array produces integers and the ADC sees integers plus errors.

Range modes (one range per column of each array, as with a per-column reference DAC):

- ``max``: the range is every value the programmed column can reach,
  ``[lo, hi] = off + (2^v - 1) * [sum_i min(0, d_i), sum_i max(0, d_i)]`` for nominal cell
  values ``d_i`` (differential for a crossbar pair, unsigned for an SRAM polarity).
  Its width is at most ``N (2^k - 1)(2^v - 1)``, hence the lossless resolution
  ``B_lossless = ceil(log2(N_active (2^k - 1)(2^v - 1) + 1))`` (:func:`lossless_adc_bits`).
  With fewer bits the step becomes ``2^(bits_needed - B)`` units (the ADC drops LSBs), so the
  column is still covered and outputs stay on an integer grid.
- ``calibrated``: the range is the [100 - p, p] percentile of the analog partial sums seen on
  the first batch(es) (CrossSim CALIBRATED, aihwkit ``out_bound``); step = width / (2^B - 1),
  never finer than one unit. Values outside the range are clipped.

The quantizer is ``q = clamp(floor((y - lo) / step + 0.5 + noise), 0, 2^B - 1)`` and the
digital side reconstructs ``lo + step * q``. ``floor(. + 0.5)`` (not round-half-even) makes two
values with the same fractional part round the same way. ADC noise is input-referred Gaussian
with sigma in LSB (steps).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def lossless_adc_bits(n_active: int, cell_bits: int, input_bits: int) -> int:
    """Fewest bits that resolve every sum of ``n_active`` products of k-bit cells and v-bit inputs."""
    top = n_active * (2**cell_bits - 1) * (2**input_bits - 1)
    return max(1, math.ceil(math.log2(top + 1)))


def bits_to_cover(span: torch.Tensor) -> torch.Tensor:
    """ceil(log2(span + 1)) elementwise, for non-negative integer-valued spans."""
    return torch.ceil(torch.log2(span.double().clamp_min(0) + 1.0) - 1e-12).clamp_min(1.0)


@dataclass
class AdcRanges:
    """Per-(array, column) ranges: ``lo`` and ``step`` are (n_tiles, J) float64 tensors.

    ``site_bits`` (n_tiles, J), when given, is the resolution of each column's ADC (arrays with
    different ADC resolutions, e.g. after D.U.B. pruning); ``bits`` is then the highest of them.
    """

    bits: int
    lo: torch.Tensor
    step: torch.Tensor
    site_bits: torch.Tensor | None = None

    @property
    def top_code(self) -> int:
        return 2**self.bits - 1

    def top_codes(self) -> torch.Tensor | None:
        """(n_tiles, J) highest code per column where resolutions differ; None when uniform."""
        if self.site_bits is None:
            return None
        return torch.pow(2.0, self.site_bits.double()) - 1.0

    def to(self, device: torch.device) -> "AdcRanges":
        move = None if self.site_bits is None else self.site_bits.to(device)
        return AdcRanges(self.bits, self.lo.to(device), self.step.to(device), move)


Bits = int | torch.Tensor  # one resolution, or one per (array, column)


def _split_bits(bits: Bits) -> tuple[int, torch.Tensor | None]:
    """(highest bits, per-site bits or None when every site has the same resolution)."""
    if isinstance(bits, torch.Tensor):
        top = int(bits.max())
        return top, (None if bool((bits == top).all()) else bits.to(torch.int64))
    return int(bits), None


def max_ranges(lo: torch.Tensor, hi: torch.Tensor, bits: Bits) -> AdcRanges:
    """``max`` mode: cover [lo, hi]; power-of-two steps once the span needs more than ``bits``."""
    top, site = _split_bits(bits)
    lo = torch.floor(lo.double() + 1e-9)
    span = torch.ceil(hi.double() - 1e-9) - lo
    have = float(top) if site is None else site.double().to(span.device)
    drop = (bits_to_cover(span) - have).clamp_min(0.0)
    return AdcRanges(top, lo, torch.pow(2.0, drop), site)


def tail_quantiles(tile: torch.Tensor, q_lo: float, q_hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.quantile(tile, [q_lo, q_hi], dim=0)`` (linear interpolation) bit for bit, from two
    partial selections (``topk`` of the few order statistics each tail needs) instead of a full sort
    of every column: about 10x faster at the 99.9th percentile, which made the first (calibrating)
    batch of a chip cost several times a whole evaluation."""
    n = tile.shape[0]
    cols = tile.t().contiguous()
    out = []
    for q, largest in ((q_lo, False), (q_hi, True)):
        rank = torch.tensor(q, dtype=torch.float64) * (n - 1)  # as torch.quantile: q * (n - 1) in float64
        below, above = int(rank.floor()), int(rank.ceil())
        weight = (rank - below).to(tile.dtype)
        if largest:  # descending: the i-th largest is the (n - 1 - i)-th smallest
            vals = torch.topk(cols, n - below, dim=1, largest=True, sorted=True).values
            low, high = vals[:, n - 1 - below], vals[:, n - 1 - above]
        else:
            vals = torch.topk(cols, above + 1, dim=1, largest=False, sorted=True).values
            low, high = vals[:, below], vals[:, above]
        out.append(torch.lerp(low, high, weight))
    return out[0], out[1]


def calibrated_ranges(samples: torch.Tensor, bits: Bits, percentile: float) -> AdcRanges:
    """``calibrated`` mode from analog samples (n_tiles, n, J): [100 - p, p] percentiles."""
    top, site = _split_bits(bits)
    lo_list, hi_list = [], []
    for tile in samples.double():  # one array at a time
        lo_t, hi_t = tail_quantiles(tile, 1.0 - percentile / 100.0, percentile / 100.0)
        lo_list.append(lo_t)
        hi_list.append(hi_t)
    lo, hi = torch.stack(lo_list), torch.stack(hi_list)
    codes = float(2**top - 1) if site is None else torch.pow(2.0, site.double().to(lo.device)) - 1.0
    step = (hi - lo) / codes
    # a range narrower than 2^B units gets unit steps from an integer start: integers stay exact
    narrow = step <= 1.0
    return AdcRanges(top, torch.where(narrow, torch.floor(lo), lo), torch.where(narrow, 1.0, step), site)

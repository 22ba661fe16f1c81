"""The simulated array pass shared by the crossbar and SRAM backends.

A backend *programs* a layer into a :class:`MappedLayer` (effective per-cell weights of every
array, in integer units, with the chip's variation already applied) and then runs
:func:`run_mapped` on each call. One call does, per block of patch rows:

1. split the uint8 inputs into bit-planes (``n_cycles`` cycles of ``bits_per_cycle`` bits);
2. one GEMM per array over all planes at once (all slices / polarities are columns of the
   same GEMM): exact int8 x int8 -> int32 with ``torch._int_mm`` when planes and weights fit
   int8 (non-integer weights are put on a 2^-f fixed-point grid, ~1/100 of the cell range),
   otherwise float32 (exact for integers below 2^24); planes that are all zero skip the GEMM;
3. the analog stage on every partial sum: analog offset, bit-line saturation, per-read noise
   (read noise ~ sqrt(sum x^2), ADC noise in LSB), fixed per-site errors, ADC quantization;
4. digital shift-and-add over cycles, arrays and sub-columns (slices, polarities).

Blocks are sized so a block of partial sums stays around ``block_bytes`` (cache-sized), so
memory stays flat in the batch size. With every non-ideality off and an ideal or lossless ADC
the result equals the integer product exactly.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from edgecloud.cim import kernel
from edgecloud.cim.adc import AdcRanges, calibrated_ranges, max_ranges
from edgecloud.cim.noise import ReadNoise, saturate
from edgecloud.cim.tiling import bit_planes

CALIBRATION_SAMPLES = 4096  # analog samples kept per array and calibration batch


@dataclass
class MappedLayer:
    """One layer programmed onto arrays. Column j of every array is ``sub * O + o``."""

    name: str
    tiles: list[tuple[int, int]]
    weights: list[torch.Tensor]  # per array: (rows, J), int8 (int GEMM) or float32, in GEMM units
    weight_unit: float  # integer units per GEMM unit (2^-f), 1.0 for integer weights
    int_gemm: bool
    n_sub: int
    out_features: int
    coef: torch.Tensor  # (n_sub,) digital weight of each sub-column (+-2^(k s))
    bits_per_cycle: int
    n_cycles: int
    reach_lo: torch.Tensor  # (n_tiles, J) lowest / highest nominal analog value (after offset
    reach_hi: torch.Tensor  # and saturation): the ``max`` ADC range
    offset: torch.Tensor | None = None  # (n_tiles, J) analog offset added before the ADC
    removed_offset: torch.Tensor | None = None  # (n_tiles, J) subtracted digitally; None = offset
    adc_bits: int | None = None  # None: ideal ADC (no quantization)
    adc_range: str = "max"
    adc_percentile: float = 99.9
    calib_batches: int = 1
    adc_noise_lsb: float = 0.0
    row_noise: float = 0.0  # read-noise sigma per sqrt(sum_i x_i^2), integer units
    fixed_lsb: torch.Tensor | None = None  # (n_tiles, J) fixed per-site error, in LSB
    saturation: str | None = None
    v_sat: float = 0.0
    ranges: AdcRanges | None = None
    calib_seen: int = 0
    calib_samples: list[torch.Tensor] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    stacked: torch.Tensor | None = None  # (n_full, rows, J) float32 for the batched GEMM

    @property
    def n_tiles(self) -> int:
        return len(self.tiles)

    @property
    def columns(self) -> int:
        return self.n_sub * self.out_features

    def needs_calibration(self) -> bool:
        return self.adc_bits is not None and self.adc_range == "calibrated" and self.calib_seen < self.calib_batches

    def finalize(self) -> None:
        """Set ``max`` ranges and the batched-GEMM weights once the arrays are programmed."""
        if self.adc_bits is not None and self.adc_range == "max":
            self.ranges = max_ranges(self.reach_lo, self.reach_hi, self.adc_bits)
        full = [w for (a, b), w in zip(self.tiles, self.weights) if b - a == self.tiles[0][1] - self.tiles[0][0]]
        if not self._loop_tiles() and len(full) > 1:
            self.stacked = torch.stack([w.float() for w in full])

    def _loop_tiles(self) -> bool:
        """One int8 GEMM per array (few, tall arrays) vs. one batched float GEMM (many small ones)."""
        return self.int_gemm and self.n_tiles <= 16


def _gemm(mapped: MappedLayer, planes: torch.Tensor) -> torch.Tensor:
    """Partial sums (n_tiles, T' m, J) in GEMM units for planes (T', m, K) uint8."""
    t, m, _ = planes.shape
    rows_total = t * m
    j = mapped.columns
    if mapped._loop_tiles():
        src = planes.view(torch.int8)
        out = torch.empty(mapped.n_tiles, rows_total, j, dtype=torch.int32)
        for r, ((a, b), w) in enumerate(zip(mapped.tiles, mapped.weights)):
            torch._int_mm(src[:, :, a:b].reshape(rows_total, b - a), w, out=out[r])
        return out
    src = planes.float() if planes.dtype != torch.float32 else planes
    out = torch.empty(mapped.n_tiles, rows_total, j, dtype=torch.float32)
    n_full = 0
    if mapped.stacked is not None:
        n_full, rows = mapped.stacked.shape[0], mapped.stacked.shape[1]
        lhs = src[:, :, : n_full * rows].reshape(rows_total, n_full, rows).transpose(0, 1)
        torch.bmm(lhs, mapped.stacked, out=out[:n_full])
    for r in range(n_full, mapped.n_tiles):
        a, b = mapped.tiles[r]
        w = mapped.weights[r]
        torch.mm(src[:, :, a:b].reshape(rows_total, b - a), w if w.dtype == torch.float32 else w.float(), out=out[r])
    return out


def _row_sq_sums(mapped: MappedLayer, planes: torch.Tensor) -> torch.Tensor:
    """(n_tiles, T' m) float32 sum_i x_i^2 over each array's rows, for read noise."""
    t, m, _ = planes.shape
    if mapped.bits_per_cycle <= 3:  # x^2 <= 49 fits int8: exact int8 GEMMs against ones
        src = planes if mapped.bits_per_cycle == 1 else planes * planes
        src = src.view(torch.int8)
        sums = []
        for a, b in mapped.tiles:
            ones = torch.ones(b - a, 8, dtype=torch.int8)
            sums.append(torch._int_mm(src[:, :, a:b].reshape(t * m, b - a), ones)[:, 0])
        return torch.stack(sums).float()
    sq = planes.float().square_()
    return torch.stack([sq[:, :, a:b].sum(-1).reshape(t * m) for a, b in mapped.tiles])


def _analog(mapped: MappedLayer, partial: torch.Tensor) -> torch.Tensor:
    """Noiseless analog values in integer units (float32): unit * P + offset, saturated."""
    y = partial.float() if partial.dtype != torch.float32 else partial.clone()
    if mapped.weight_unit != 1.0:
        y.mul_(mapped.weight_unit)
    if mapped.offset is not None:
        y.add_(mapped.offset.float().unsqueeze(1))
    if mapped.saturation:
        saturate(y, mapped.v_sat, mapped.saturation)
    return y


@dataclass
class _Stage:
    """Per-call constants of the ADC stage; (n_tiles, J) float32 contiguous unless noted."""

    scale: torch.Tensor  # multiplies the raw GEMM output (no saturation)
    shift: torch.Tensor
    inv_step: torch.Tensor
    step: torch.Tensor
    offset: torch.Tensor  # analog offset (used before saturation)
    const: torch.Tensor  # (J,) digital constant per unit of sum_t 2^(v t)
    top: float | None  # highest code; None = ideal ADC (no quantization)


def _stage(mapped: MappedLayer) -> _Stage:
    n_tiles, j = mapped.n_tiles, mapped.columns
    zeros = torch.zeros(n_tiles, j, dtype=torch.float64)
    quantize = mapped.adc_bits is not None
    if quantize:
        assert mapped.ranges is not None
        lo, step = mapped.ranges.lo, mapped.ranges.step
    else:
        lo, step = zeros, torch.ones_like(zeros)
    off = mapped.offset if mapped.offset is not None else zeros
    fixed = mapped.fixed_lsb if mapped.fixed_lsb is not None else zeros
    inv = 1.0 / step
    half = 0.5 if quantize else 0.0
    if mapped.saturation:  # the offset is applied before the non-linearity
        scale, shift = inv, -lo * inv + fixed + half
    else:
        scale, shift = mapped.weight_unit * inv, (off - lo) * inv + fixed + half
    removed = mapped.removed_offset if mapped.removed_offset is not None else off
    const = (lo - removed).sum(0)
    f32 = lambda t: t.float().contiguous()  # noqa: E731
    return _Stage(f32(scale), f32(shift), f32(inv), f32(step), f32(off), f32(const),
                  float(mapped.ranges.top_code) if quantize and mapped.ranges else None)


def _adc_torch(mapped: MappedLayer, st: _Stage, partial: torch.Tensor, noise1: torch.Tensor | None,
               noise2: torch.Tensor | None, row_sigma: torch.Tensor | None) -> torch.Tensor:
    """ADC codes (or ideal analog values) in normalised units, (n_tiles, T m, J) float32."""
    if mapped.saturation:
        u = _analog(mapped, partial)
        u.mul_(st.inv_step.unsqueeze(1)).add_(st.shift.unsqueeze(1))
    else:
        u = torch.addcmul(st.shift.unsqueeze(1), partial, st.scale.unsqueeze(1))
    if noise1 is not None:
        u.view(-1).add_(noise1, alpha=mapped.adc_noise_lsb)
    if noise2 is not None and row_sigma is not None:
        u.addcmul_(noise2.view(u.shape) * row_sigma.unsqueeze(-1), st.inv_step.unsqueeze(1))
    if st.top is not None:
        u.floor_().clamp_(0.0, st.top)
    return u


def _convert_torch(mapped: MappedLayer, st: _Stage, partial: torch.Tensor, weights: torch.Tensor,
                   noise1: torch.Tensor | None, noise2: torch.Tensor | None,
                   row_sigma: torch.Tensor | None) -> torch.Tensor:
    """(m, J): sum over arrays and cycles of step * cycle weight * code (torch ops)."""
    codes = _adc_torch(mapped, st, partial, noise1, noise2, row_sigma)
    n_tiles, rows, j = codes.shape
    t = weights.numel()
    m = rows // t
    if t > 1:
        codes = torch.matmul(weights.view(1, 1, -1), codes.view(n_tiles, t, m * j)).view(n_tiles, m, j)
    else:
        codes = codes.view(n_tiles, m, j)
    if n_tiles == 1:
        return codes[0].mul_(st.step[0])
    return (codes * st.step.unsqueeze(1)).sum(0)


def _calibrate(mapped: MappedLayer, patches: torch.Tensor, block_rows: int) -> None:
    """Collect analog partial sums of one batch and set percentile ranges from all seen so far."""
    gen = torch.Generator()
    gen.manual_seed(len(mapped.calib_samples) + 1)
    per_block = max(1, CALIBRATION_SAMPLES * block_rows // max(patches.shape[0], 1))
    for start in range(0, patches.shape[0], block_rows):
        planes = bit_planes(patches[start:start + block_rows], mapped.bits_per_cycle, mapped.n_cycles)
        y = _analog(mapped, _gemm(mapped, planes))
        if y.shape[1] > per_block:
            y = y[:, torch.randperm(y.shape[1], generator=gen)[:per_block]]
        mapped.calib_samples.append(y)
    assert mapped.adc_bits is not None
    mapped.ranges = calibrated_ranges(torch.cat(mapped.calib_samples, dim=1), mapped.adc_bits, mapped.adc_percentile)
    mapped.calib_seen += 1


def block_rows_for(mapped: MappedLayer, block_bytes: int) -> int:
    per_row = mapped.n_tiles * mapped.n_cycles * mapped.columns * 4
    return max(64, block_bytes // max(per_row, 1))


def _live_planes(mapped: MappedLayer, chunk: torch.Tensor, lib: object | None) -> torch.Tensor:
    """(T,) bool: planes with at least one non-zero input bit in this block."""
    v, n_cycles = mapped.bits_per_cycle, mapped.n_cycles
    if lib is not None and chunk.stride(1) == 1:
        present = kernel.or_reduce(lib, chunk)  # type: ignore[arg-type]
    else:
        present = 0
        for bit in range(8):
            if bool((chunk & (1 << bit)).any()):
                present |= 1 << bit
    mask = (1 << v) - 1
    return torch.tensor([(present >> (v * t)) & mask != 0 for t in range(n_cycles)])


def run_mapped(mapped: MappedLayer, patches: torch.Tensor, noise: ReadNoise | None,
               block_bytes: int = 8 << 20, use_kernel: bool = True) -> torch.Tensor:
    """(M, O) float32 integer-unit results of the programmed layer for uint8 patches (M, K)."""
    block = block_rows_for(mapped, block_bytes)
    with mapped.lock:
        if mapped.needs_calibration():
            _calibrate(mapped, patches, block)
    st = _stage(mapped)
    lib = kernel.load() if use_kernel else None
    v, n_cycles, j, n_tiles = mapped.bits_per_cycle, mapped.n_cycles, mapped.columns, mapped.n_tiles
    cycle_w = torch.pow(2.0, v * torch.arange(n_cycles, dtype=torch.float32))
    noisy = noise is not None and (mapped.adc_noise_lsb > 0 or mapped.row_noise > 0)
    row_noise = mapped.row_noise if noisy and mapped.row_noise > 0 else None
    const = (st.const * cycle_w.sum()).contiguous()
    coef = mapped.coef.float().contiguous()
    zero_sum: torch.Tensor | None = None  # (J,) one conversion of an all-zero plane: sum_r step * code(0)
    int_planes = lib is not None and mapped._loop_tiles()
    bounds = torch.tensor([a for a, _ in mapped.tiles] + [mapped.tiles[-1][1]], dtype=torch.int64)
    m_total, o = patches.shape[0], mapped.out_features
    out = torch.empty(m_total, o, dtype=torch.float32)
    for start in range(0, m_total, block):
        chunk = patches[start:start + block]
        m = chunk.shape[0]
        live = None
        if n_cycles > 1 and not noisy:  # an all-zero plane converts to the fixed code of 0: skip it
            live = _live_planes(mapped, chunk, lib)
            if bool(live.all()):
                live = None
        weights, block_const = cycle_w, const
        if live is not None:
            if zero_sum is None:
                zeros = torch.zeros(n_tiles, 1, j, dtype=torch.float32)
                zero_sum = _convert_torch(mapped, st, zeros, torch.ones(1), None, None, None)[0]
            weights = cycle_w[live].contiguous()
            block_const = (const + zero_sum * cycle_w[~live].sum()).contiguous()
        dest = out[start:start + m]
        if weights.numel() == 0:
            dest.copy_((block_const.view(mapped.n_sub, o) * coef.view(-1, 1)).sum(0).expand(m, o))
            continue
        emitted = torch.arange(n_cycles)[live] if live is not None else torch.arange(n_cycles)
        t_used = emitted.numel()
        row_sigma = None
        if int_planes:
            shifts = (emitted * v).to(torch.int32)
            flat, row_sigma = kernel.planes_tiled(lib, chunk, bounds, shifts, (1 << v) - 1, row_noise)  # type: ignore[arg-type]
            partial = torch.empty(n_tiles, t_used * m, j, dtype=torch.int32)
            for r, ((a, b), w) in enumerate(zip(mapped.tiles, mapped.weights)):
                lhs = flat[t_used * m * a: t_used * m * b].view(t_used * m, b - a)
                torch._int_mm(lhs, w, out=partial[r])
        else:
            planes = bit_planes(chunk, v, n_cycles)
            if live is not None:
                planes = planes[live]
            partial = _gemm(mapped, planes)
            if row_noise is not None:
                row_sigma = _row_sq_sums(mapped, planes).sqrt_().mul_(row_noise).contiguous()
        n = partial.numel()
        noise1 = noise.draw(n) if noisy and noise is not None and mapped.adc_noise_lsb > 0 else None
        noise2 = noise.draw(n) if noisy and noise is not None and row_sigma is not None else None
        if lib is not None:
            kernel.adc_accumulate(
                lib, partial, t_used, st.scale, st.shift, st.step, st.inv_step, weights, st.top,  # type: ignore[arg-type]
                noise1, mapped.adc_noise_lsb, noise2, row_sigma, mapped.saturation, mapped.weight_unit,
                st.offset, mapped.v_sat, block_const, coef, dest,
            )
            continue
        acc = _convert_torch(mapped, st, partial, weights, noise1, noise2, row_sigma)
        acc += block_const
        if mapped.n_sub == 1:
            dest.copy_(acc.view(m, o).mul_(coef[0]))
        else:
            dest.copy_((acc.view(m, mapped.n_sub, o) * coef.view(1, -1, 1)).sum(1))
    return out

"""The simulated array pass shared by the crossbar and SRAM backends.

A backend *programs* a layer into a :class:`MappedLayer` (effective per-cell weights of every
array, in integer units, with the chip's variation already applied) and then runs
:func:`run_mapped` on each call. Every call does, for each patch row:

1. split the uint8 inputs into bit-planes (``n_cycles`` cycles of ``bits_per_cycle`` bits);
2. one GEMM per array over all planes (all slices / polarities are columns of the same GEMM):
   exact int8 x int8 -> int32 when planes and weights fit int8 (non-integer weights are put on
   a 2^-f fixed-point grid, ~1/100 of the cell range), otherwise float32 (exact for integers
   below 2^24);
3. the analog stage on every partial sum (one conversion per column, array, cycle and row):
   analog offset, bit-line saturation, noise, fixed per-site errors, ADC quantization;
4. digital shift-and-add over cycles, arrays and sub-columns (slices, polarities).

Noise per conversion: ADC noise (``adc_noise_lsb``) and read noise (``row_noise`` integer units
per sqrt(sum x^2) of the array's inputs in that cycle) are independent zero-mean Gaussians, so
their sum is drawn as one Gaussian, sigma = sqrt(s1^2 + rn^2 sum x^2 / step^2) LSB, from one
N(0, 1) sample of :class:`~edgecloud.cim.noise.ReadNoise` (drawn per block of rows).

With a compiled kernel (:mod:`edgecloud.cim.kernel`: AVX-512 VNNI, AVX2 or portable C, picked
from the CPU), integer layers run *fused*: one kernel call per layer builds each row's bit-planes
in L1, multiplies them with the packed int8 weights and converts and accumulates every partial
sum in registers, reading conv patches straight from the padded NHWC input (no patch matrix, no
bit-plane or partial-sum tensors). Layers with float weights run, per block of rows, float GEMMs
into a block of partial sums sized ~``block_bytes`` and the kernel's ADC over them. Without a
kernel (the ``torch`` path, the reference) the same blocks run as torch ops: exact int8 GEMMs
(``torch._int_mm``) where the CPU has VNNI, exact fp32 GEMMs elsewhere (``_int_mm`` is a slow
reference loop without it). Planes that are zero in a whole block (whole input, fused) skip the
work when there is no noise. All paths use the same noise samples in the same places. With every
non-ideality off and an ideal or lossless ADC the result equals the integer product exactly.

On an accelerator (a backend's ``device`` option, e.g. ``cuda``) the torch path runs there, with
the layer's arrays moved once after programming on the CPU (same chip), float GEMMs that are exact
for integers below 2^24 (never TF32: float64 where TF32 is enabled), the same pooled noise samples
(a device copy of the pool, same offsets) and the same calibration percentiles (taken on the CPU).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from edgecloud.cim import kernel
from edgecloud.cim.adc import AdcRanges, calibrated_ranges, max_ranges
from edgecloud.cim.noise import ReadNoise, saturate
from edgecloud.cim.tiling import PatchSource, bit_planes

CALIBRATION_SAMPLES = 4096  # analog samples kept per array and calibration batch
CPU = torch.device("cpu")


def _on_accelerator(device: torch.device) -> bool:
    """Whether tensors on ``device`` take the accelerator variant of the torch path (float GEMMs,
    no ``torch._int_mm``, device-side reductions). Tests patch this to run those variants on the CPU."""
    return device.type != "cpu"


def _tf32_matmul(device: torch.device) -> bool:
    """Whether float32 matmuls on ``device`` may run in TF32 (10-bit mantissa: not exact)."""
    if device.type != "cuda":
        return False
    matmul = torch.backends.cuda.matmul
    try:  # torch >= 2.9; reading it is safe whichever API set the flag
        return matmul.fp32_precision == "tf32"
    except (AttributeError, RuntimeError):
        return bool(matmul.allow_tf32)


def _gemm_dtype(device: torch.device) -> torch.dtype:
    """float32 (exact for integer sums below 2^24), or float64 where float32 GEMMs may use TF32."""
    return torch.float64 if _on_accelerator(device) and _tf32_matmul(device) else torch.float32


def _int8_gemm(device: torch.device) -> bool:
    """Whether to use exact int8 GEMMs (``torch._int_mm``): on a CPU where they are fast only."""
    return not _on_accelerator(device) and kernel.int8_gemm_is_fast()


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
    site_bits: torch.Tensor | None = None  # (n_tiles, J) int64 ADC bits per column where arrays differ
    array_bits: torch.Tensor | None = None  # (n_tiles, column tiles) int64 ADC bits of each array (for costs)
    positions: int | None = None  # output positions per sample of the last call (for costs)
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
    packed: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = field(default_factory=dict)  # per kernel layout
    device: torch.device = CPU  # where every tensor above lives (:meth:`to`)
    _int16_rows: int | None = None  # cache of :meth:`int16_rows`

    @property
    def n_tiles(self) -> int:
        return len(self.tiles)

    @property
    def columns(self) -> int:
        return self.n_sub * self.out_features

    def needs_calibration(self) -> bool:
        return self.adc_bits is not None and self.adc_range == "calibrated" and self.calib_seen < self.calib_batches

    def resolution(self) -> int | torch.Tensor:
        """The ADC bits: one number, or (n_tiles, J) where arrays have different resolutions."""
        assert self.adc_bits is not None
        return self.adc_bits if self.site_bits is None else self.site_bits

    def finalize(self) -> None:
        """Set ``max`` ranges and the batched-GEMM weights once the arrays are programmed."""
        if self.adc_bits is not None and self.adc_range == "max":
            self.ranges = max_ranges(self.reach_lo, self.reach_hi, self.resolution())
        self._stack()

    def _stack(self) -> None:
        full = [w for (a, b), w in zip(self.tiles, self.weights) if b - a == self.tiles[0][1] - self.tiles[0][0]]
        self.stacked = None
        if not self._loop_tiles() and len(full) > 1:
            self.stacked = torch.stack([w.float() for w in full])

    def to(self, device: torch.device) -> "MappedLayer":
        """Move the programmed arrays to ``device`` (in place, once after programming on the CPU, so
        the chip's random draws are those of the CPU generators). On an accelerator the GEMM
        weights become float32 (the same values: int8 fits exactly); the C kernels are not used."""
        if device == self.device:
            return self
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        with self.lock:
            self.weights = [w.to(device, torch.float32 if _on_accelerator(device) else w.dtype)
                            for w in self.weights]
            self.coef, self.reach_lo, self.reach_hi = move(self.coef), move(self.reach_lo), move(self.reach_hi)
            self.offset, self.removed_offset = move(self.offset), move(self.removed_offset)
            self.fixed_lsb, self.site_bits = move(self.fixed_lsb), move(self.site_bits)
            if self.ranges is not None:
                self.ranges = self.ranges.to(device)
            self.calib_samples = [s.to(device) for s in self.calib_samples]
            self.packed = {}
            self.device = device
            self._stack()
        return self

    def _loop_tiles(self) -> bool:
        """One int8 GEMM per array (few, tall arrays, and a CPU where ``torch._int_mm`` is fast)
        vs. one batched float GEMM (many small arrays, no VNNI, or an accelerator)."""
        return self.int_gemm and self.n_tiles <= 16 and _int8_gemm(self.device)

    def int16_rows(self) -> int:
        """Rows whose plane x weight products sum in int16 without overflow (for the kernels);
        computed once per programmed layer, not per call."""
        if self._int16_rows is None:
            peak = max(int(w.abs().max()) if w.numel() else 0 for w in self.weights)
            self._int16_rows = max(2, 32767 // max(1, ((1 << self.bits_per_cycle) - 1) * peak))
        return self._int16_rows


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
    dtype = _gemm_dtype(planes.device)
    src = planes.to(dtype) if planes.dtype != dtype else planes
    out = torch.empty(mapped.n_tiles, rows_total, j, dtype=dtype, device=planes.device)
    n_full = 0
    if mapped.stacked is not None:
        n_full, rows = mapped.stacked.shape[0], mapped.stacked.shape[1]
        lhs = src[:, :, : n_full * rows].reshape(rows_total, n_full, rows).transpose(0, 1)
        torch.bmm(lhs, mapped.stacked.to(dtype), out=out[:n_full])
    for r in range(n_full, mapped.n_tiles):
        a, b = mapped.tiles[r]
        w = mapped.weights[r]
        torch.mm(src[:, :, a:b].reshape(rows_total, b - a), w if w.dtype == dtype else w.to(dtype), out=out[r])
    return out if dtype == torch.float32 else out.float()  # float64 (no TF32): integers, exact in float32


def _row_sq_sums(mapped: MappedLayer, planes: torch.Tensor) -> torch.Tensor:
    """(n_tiles, T' m) float32 sum_i x_i^2 over each array's rows, for read noise."""
    t, m, _ = planes.shape
    if mapped.bits_per_cycle <= 3 and _int8_gemm(planes.device):  # x^2 <= 49 fits int8: exact int8 GEMMs
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
    inv_step2: torch.Tensor  # inv_step^2, for the read-noise sigma in LSB
    tops: torch.Tensor | None = None  # (n_tiles, J) highest code per column where resolutions differ


def _stage(mapped: MappedLayer) -> _Stage:
    n_tiles, j = mapped.n_tiles, mapped.columns
    zeros = torch.zeros(n_tiles, j, dtype=torch.float64, device=mapped.device)
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
    tops = mapped.ranges.top_codes() if quantize and mapped.ranges else None
    return _Stage(f32(scale), f32(shift), f32(inv), f32(step), f32(off), f32(const),
                  float(mapped.ranges.top_code) if quantize and mapped.ranges else None, f32(inv * inv),
                  None if tops is None else f32(tops))


def _noise_sigma(sq: torch.Tensor, inv_step2: torch.Tensor, rn2: float, s1sq: float) -> torch.Tensor:
    """(n_tiles, N, J) per-conversion noise sigma in LSB for sums of squares sq (n_tiles, N).

    ADC noise (s1 LSB) and read noise (rn sqrt(sq) integer units) are independent Gaussians:
    sigma = sqrt(s1^2 + rn^2 sq inv^2). Three separately rounded float32 ops (mul, mul, add) and
    a sqrt, exactly as the fused kernel evaluates it.
    """
    var = (sq * rn2).unsqueeze(-1) * inv_step2.unsqueeze(1)
    return var.add_(s1sq).sqrt_()


def _noise_view(noise: torch.Tensor, shape: torch.Size, t: int) -> torch.Tensor:
    """Row-major noise samples (m, n_tiles, T, J) laid out like the partial sums (n_tiles, T m, J)."""
    n_tiles, rows, j = shape
    return noise.view(rows // t, n_tiles, t, j).permute(1, 2, 0, 3).reshape(shape)


def _adc_torch(mapped: MappedLayer, st: _Stage, partial: torch.Tensor, noise: torch.Tensor | None,
               sigma: torch.Tensor | None, t: int = 1) -> torch.Tensor:
    """ADC codes (or ideal analog values) in normalised units, (n_tiles, T m, J) float32."""
    if mapped.saturation:
        u = _analog(mapped, partial)
        u.mul_(st.inv_step.unsqueeze(1)).add_(st.shift.unsqueeze(1))
    else:
        u = torch.addcmul(st.shift.unsqueeze(1), partial, st.scale.unsqueeze(1))
    if noise is not None:
        if sigma is not None:
            u.addcmul_(_noise_view(noise, u.shape, t), sigma)
        else:
            u.add_(_noise_view(noise, u.shape, t), alpha=mapped.adc_noise_lsb)
    if st.tops is not None:  # arrays with different resolutions: each column clips at its own top code
        u.floor_().clamp_(min=0.0)
        torch.minimum(u, st.tops.unsqueeze(1), out=u)
    elif st.top is not None:
        u.floor_().clamp_(0.0, st.top)
    return u


def _convert_torch(mapped: MappedLayer, st: _Stage, partial: torch.Tensor, weights: torch.Tensor,
                   noise: torch.Tensor | None, sigma: torch.Tensor | None) -> torch.Tensor:
    """(m, J): sum over arrays of step * sum over cycles of cycle weight * code (torch ops)."""
    t = weights.numel()
    codes = _adc_torch(mapped, st, partial, noise, sigma, t)
    n_tiles, rows, j = codes.shape
    m = rows // t
    if t > 1 and _on_accelerator(codes.device):  # no matmul: TF32 could round the codes
        codes = (codes.view(n_tiles, t, m * j) * weights.view(1, t, 1)).sum(1).view(n_tiles, m, j)
    elif t > 1:
        codes = torch.matmul(weights.view(1, 1, -1), codes.view(n_tiles, t, m * j)).view(n_tiles, m, j)
    else:
        codes = codes.view(n_tiles, m, j)
    if n_tiles == 1:
        return codes[0].mul_(st.step[0])
    return (codes * st.step.unsqueeze(1)).sum(0)


def _calibrate(mapped: MappedLayer, source: PatchSource, block_rows: int) -> None:
    """Collect analog partial sums of one batch and set percentile ranges from all seen so far.

    Per block of rows, a random subset of its (cycle, row) conversions is kept; only those
    plane-rows are built and multiplied (the values are those of the full block's partial sums).
    The subsets are drawn on the CPU and the percentiles taken there, so every device gets the
    same ranges from the same samples.
    """
    gen = torch.Generator()
    gen.manual_seed(len(mapped.calib_samples) + 1)
    v, n_cycles = mapped.bits_per_cycle, mapped.n_cycles
    per_block = max(1, CALIBRATION_SAMPLES * block_rows // max(source.m, 1))
    for start in range(0, source.m, block_rows):
        m = min(block_rows, source.m - start)
        pick = torch.arange(n_cycles * m)
        if pick.numel() > per_block:
            pick = torch.randperm(pick.numel(), generator=gen)[:per_block]
        t, i = pick // m, pick % m  # plane-row t m + i of bit_planes(block)
        if mapped.device != CPU:
            t, i = t.to(mapped.device), i.to(mapped.device)
        rows = source.take(start + i).long()
        planes = ((rows >> (v * t).unsqueeze(1)) & ((1 << v) - 1)).to(torch.uint8)
        mapped.calib_samples.append(_analog(mapped, _gemm(mapped, planes.unsqueeze(0))))
    assert mapped.adc_bits is not None
    bits = mapped.resolution()
    ranges = calibrated_ranges(torch.cat(mapped.calib_samples, dim=1).cpu(),
                               bits.cpu() if isinstance(bits, torch.Tensor) else bits, mapped.adc_percentile)
    if mapped.device != CPU:
        ranges = ranges.to(mapped.device)
    mapped.ranges = ranges
    mapped.calib_seen += 1


def block_rows_for(mapped: MappedLayer, block_bytes: int) -> int:
    per_row = mapped.n_tiles * mapped.n_cycles * mapped.columns * 4
    return max(64, block_bytes // max(per_row, 1))


def _live_planes(mapped: MappedLayer, chunk: torch.Tensor, kern: kernel.Kernel | None) -> torch.Tensor:
    """(T,) bool: planes with at least one non-zero input bit in this block."""
    v, n_cycles = mapped.bits_per_cycle, mapped.n_cycles
    if kern is not None and chunk.stride(1) == 1:
        present = kern.or_reduce(chunk)
    elif _on_accelerator(chunk.device):  # one device sync per block, not one per bit
        hits = torch.stack([(chunk & (1 << bit)).any() for bit in range(8)]).tolist()
        present = sum(1 << bit for bit, hit in enumerate(hits) if hit)
    else:
        present = 0
        for bit in range(8):
            if bool((chunk & (1 << bit)).any()):
                present |= 1 << bit
    mask = (1 << v) - 1
    return torch.tensor([(present >> (v * t)) & mask != 0 for t in range(n_cycles)])


def _read_noise_args(mapped: MappedLayer, st: _Stage, rn2: float, s1sq: float
                     ) -> tuple[torch.Tensor | None, float, float, torch.Tensor]:
    """(table, rn2, s1sq, inv^2) for the fused kernel; table[r, q] = sigma for sum of squares q.

    With one-bit planes q is at most the array's row count, so a table (built with
    :func:`_noise_sigma`, the formula the kernel would otherwise evaluate) replaces a sqrt per
    conversion by a load; wider planes use the formula.
    """
    rows = max(b - a for a, b in mapped.tiles) + 1
    if mapped.bits_per_cycle != 1 or mapped.n_tiles * rows * mapped.columns > (4 << 20):
        return None, rn2, s1sq, st.inv_step2
    q = torch.arange(rows, dtype=torch.float32).expand(mapped.n_tiles, rows)
    return _noise_sigma(q, st.inv_step2, rn2, s1sq).contiguous(), rn2, s1sq, st.inv_step2


def _run_fused(mapped: MappedLayer, source: PatchSource, noise: ReadNoise | None, block: int, st: _Stage,
               kern: kernel.Kernel) -> torch.Tensor:
    """The fused kernel over all rows: one call (one parallel region) per layer where possible.

    Noise samples are drawn exactly as the block loop of :func:`run_mapped` would draw them
    (one pooled draw per block of ``block`` rows, in order); a pooled draw is read in place.
    """
    v, n_cycles, j, n_tiles = mapped.bits_per_cycle, mapped.n_cycles, mapped.columns, mapped.n_tiles
    m_total, o = source.m, mapped.out_features
    layout = kern.layout(v)
    with mapped.lock:
        if layout not in mapped.packed:
            mapped.packed[layout] = kern.pack_weights(mapped.weights, layout)
    packed = mapped.packed[layout]
    lim16 = mapped.int16_rows()
    noisy = noise is not None and (mapped.adc_noise_lsb > 0 or mapped.row_noise > 0)
    cycle_w = torch.pow(2.0, v * torch.arange(n_cycles, dtype=torch.float32))
    const = st.const * cycle_w.sum()
    coef = mapped.coef.float().contiguous()
    out = torch.empty(m_total, o, dtype=torch.float32)
    live = torch.ones(n_cycles, dtype=torch.bool)
    if n_cycles > 1 and not noisy:  # a plane that is zero in every input converts to code(0): skip it
        present = source.byte_or()
        live = torch.tensor([(present >> (v * t)) & ((1 << v) - 1) != 0 for t in range(n_cycles)])
        if not bool(live.all()):
            zeros = torch.zeros(n_tiles, 1, j, dtype=torch.float32)
            zero_sum = _convert_torch(mapped, st, zeros, torch.ones(1), None, None)[0]
            const = const + zero_sum * cycle_w[~live].sum()
        if not bool(live.any()):
            out.copy_((const.view(mapped.n_sub, o) * coef.view(-1, 1)).sum(0).expand(m_total, o))
            return out
    emitted = torch.arange(n_cycles)[live]
    weights, const = cycle_w[live].contiguous(), const.contiguous()
    shifts = (emitted * v).to(torch.int32)
    s1 = mapped.adc_noise_lsb
    read_noise = _read_noise_args(mapped, st, mapped.row_noise ** 2, s1 * s1) if noisy and mapped.row_noise > 0 else None
    x = source.nhwc if source.conv is not None else source.rows()
    assert x is not None
    bounds = torch.tensor([a for a, _ in mapped.tiles] + [mapped.tiles[-1][1]], dtype=torch.int64)
    per_row = n_tiles * emitted.numel() * j

    def call(row0: int, m: int, samples: tuple[torch.Tensor, torch.Tensor, int] | None) -> None:
        kern.fused_block(
            x, m, source.conv, bounds, packed, lim16, shifts, (1 << v) - 1, j,
            st.scale, st.shift, st.step, st.inv_step, weights, st.top, samples, s1, read_noise,
            mapped.saturation, mapped.weight_unit, st.offset, mapped.v_sat, const, coef,
            out[row0:row0 + m], row0=row0,
        )

    starts = range(0, m_total, block)
    if not noisy or noise is None:
        call(0, m_total, None)
    elif all(noise.pooled(min(block, m_total - a) * per_row) for a in starts):
        noff = torch.tensor([noise.offset(min(block, m_total - a) * per_row) for a in starts], dtype=torch.int64)
        call(0, m_total, (noise.pool(), noff, block))
    else:  # fresh samples: one call per block
        for a in starts:
            m = min(block, m_total - a)
            call(a, m, (noise.draw_half(m * per_row), torch.zeros(1, dtype=torch.int64), m))
    return out


def run_mapped(mapped: MappedLayer, patches: torch.Tensor | PatchSource, noise: ReadNoise | None,
               block_bytes: int = 8 << 20, kern: kernel.Kernel | None = None) -> torch.Tensor:
    """(M, O) float32 integer-unit results of the programmed layer for uint8 patches (M, K).

    ``patches`` may be a :class:`PatchSource` (an implicit conv im2col, read in place by the
    fused kernel and materialised only for the other paths). ``kern``: the compiled kernel to
    use (:func:`edgecloud.cim.kernel.resolve`), None for the torch path. The result lives on
    ``mapped.device``; the patches are moved there if they are elsewhere.
    """
    source = patches if isinstance(patches, PatchSource) else PatchSource(patches.shape[0], patches.shape[1], patches)
    dev = mapped.device
    source = source.to(dev)
    if _on_accelerator(dev):
        kern = None  # the C kernels read host memory: the torch path runs on the device
    block = block_rows_for(mapped, block_bytes)
    with mapped.lock:
        if mapped.needs_calibration():
            _calibrate(mapped, source, block)
    st = _stage(mapped)
    if st.tops is not None:
        kern = None  # the C kernels clip at one top code per layer: mixed resolutions take the torch path
    if kern is not None and mapped.int_gemm:
        return _run_fused(mapped, source, noise, block, st, kern)
    v, n_cycles, j, n_tiles = mapped.bits_per_cycle, mapped.n_cycles, mapped.columns, mapped.n_tiles
    cycle_w = torch.pow(2.0, v * torch.arange(n_cycles, dtype=torch.float32)).to(dev)  # powers of 2 made on the CPU
    noisy = noise is not None and (mapped.adc_noise_lsb > 0 or mapped.row_noise > 0)
    # one N(0, 1) sample per conversion, scaled by sigma = sqrt(s1^2 + rn^2 sum x^2 inv^2) (LSB)
    s1, rn2 = mapped.adc_noise_lsb, mapped.row_noise ** 2
    read_noise = noisy and mapped.row_noise > 0
    const = (st.const * cycle_w.sum()).contiguous()
    coef = mapped.coef.float().contiguous()
    zero_sum: torch.Tensor | None = None  # (J,) one conversion of an all-zero plane: sum_r step * code(0)
    patches = source.rows()
    m_total, o = source.m, mapped.out_features
    out = torch.empty(m_total, o, dtype=torch.float32, device=dev)
    for start in range(0, m_total, block):
        chunk = patches[start:start + block]
        m = chunk.shape[0]
        live = None
        if n_cycles > 1 and not noisy:  # an all-zero plane converts to the fixed code of 0: skip it
            live = _live_planes(mapped, chunk, kern)
            if bool(live.all()):
                live = None
            else:
                live = live.to(dev)  # a CPU mask: decisions above need no device sync
        weights, block_const = cycle_w, const
        if live is not None:
            if zero_sum is None:
                zeros = torch.zeros(n_tiles, 1, j, dtype=torch.float32, device=dev)
                zero_sum = _convert_torch(mapped, st, zeros, torch.ones(1, device=dev), None, None)[0]
            weights = cycle_w[live].contiguous()
            block_const = (const + zero_sum * cycle_w[~live].sum()).contiguous()
        dest = out[start:start + m]
        if weights.numel() == 0:
            dest.copy_((block_const.view(mapped.n_sub, o) * coef.view(-1, 1)).sum(0).expand(m, o))
            continue
        t_used = weights.numel()
        planes = bit_planes(chunk, v, n_cycles)
        if live is not None:
            planes = planes[live]
        partial = _gemm(mapped, planes)
        row_sq = _row_sq_sums(mapped, planes) if read_noise else None
        samples = noise.draw(partial.numel(), dev) if noisy and noise is not None else None
        sigma = _noise_sigma(row_sq, st.inv_step2, rn2, s1 * s1) if row_sq is not None else None
        if kern is not None:
            kern.adc_accumulate(
                partial, t_used, st.scale, st.shift, st.step, st.inv_step, weights, st.top,
                samples, s1, sigma, mapped.saturation, mapped.weight_unit,
                st.offset, mapped.v_sat, block_const, coef, dest,
            )
            continue
        acc = _convert_torch(mapped, st, partial, weights, samples, sigma)
        acc += block_const
        if mapped.n_sub == 1:
            dest.copy_(acc.view(m, o).mul_(coef[0]))
        else:
            dest.copy_((acc.view(m, mapped.n_sub, o) * coef.view(1, -1, 1)).sum(1))
    return out

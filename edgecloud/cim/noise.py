"""Non-ideality models of in-memory arrays, and the seeded random sources they draw from.

Two kinds of randomness, kept apart:

- **chip** (drawn once per programmed layer, :func:`chip_generator`): programming variation,
  stuck-at faults, SRAM cell mismatch. Seeded by (backend seed, layer name): the same seed
  gives the same chip, in any process.
- **reads** (drawn per conversion, :class:`ReadNoise`): read and ADC noise, in bulk per block of
  partial sums. By default the samples come from a seeded pool of iid N(0, 1) values read at a
  fresh random offset per block: every read in a block gets a distinct sample, samples recur
  only across blocks at unrelated positions, and the cost is one add per read instead of
  ~5 ns per fresh Gaussian on this CPU. ``fresh=True`` draws every sample anew. Samples are
  kept at half precision (N(0, 1) rounded to float16: 11 significant bits, far finer than any
  noise level they scale) so that streaming them costs 2 bytes per conversion. A conversion
  draws one sample: its ADC noise and read noise are independent Gaussians, so their sum is
  one Gaussian with the summed variance (see :mod:`edgecloud.cim.engine`). A draw for another
  device (CUDA) reads a copy of the same pool there at an offset from the same CPU generator
  (fresh samples are drawn on the CPU and moved), so every device sees the same samples.

Device and circuit models (conductances normalised to G_max = 1):

- programming variation (:func:`program_conductances`):
  ``state``: additive Gaussian with the state-dependent sigma of aihwkit's PCM fit
  (Nandakumar et al. 2019), sigma(g)/g_max = s (0.26348 + 1.9650 g - 1.1731 g^2) / 25,
  s = ``sigma`` (1.0 = the fit: 1.1 % of g_max at g = 0, 4.2 % at g = 1);
  ``proportional``: G (1 + sigma xi); ``lognormal``: G exp(sigma xi). Results are clipped at 0.
- stuck-at faults: Bernoulli per cell at programming, stuck-on -> G_max, stuck-off -> G_min.
- IR drop (:func:`ir_drop_factors`): first-order distributed-load model. Along a wire of n
  cells each drawing the mean current I = V G_mean a, the drop at the p-th cell from the driven
  end is r I (p n - p (p - 1) / 2) (r I n (n + 1) / 2 at the far end). A cell's effective
  conductance is scaled by 1 - r G_mean a (h_row + h_col), with h the bracket above for its row
  wire (distance from the row driver) and column wire (distance from the sense amplifier).
  The relative error therefore grows as r G N^2 / 2 with tile size N. Static (the mean
  conductance of the programmed tile, activity ``a`` = fraction of rows driven, 1 = worst
  case), so it is folded into the programmed conductances; the exact nodal solve is omitted.
- bit-line saturation (:func:`saturate`): ``exp`` V_sat (1 - exp(-y / V_sat)) or ``tanh``
  V_sat tanh(y / V_sat), with V_sat set so the array's full scale is compressed by a fraction c
  (:func:`saturation_vsat`).
- SRAM cell-current mismatch from Vt variation (:func:`vt_current_sigma`): above threshold
  sigma_I / I = alpha sigma_Vt / (V_GS - V_t) (alpha-power law, alpha = 1.3).
"""

from __future__ import annotations

import threading
import zlib

import numpy as np
import torch

POOL_SIZE = 1 << 22  # 4 Mi samples, 8 MiB (float16)


def chip_generator(seed: int, layer_name: str, purpose: str = "program") -> torch.Generator:
    """A generator for one layer's chip draws; depends only on (seed, layer name, purpose)."""
    seq = np.random.SeedSequence([seed & 0xFFFFFFFF, zlib.crc32(layer_name.encode()), zlib.crc32(purpose.encode())])
    gen = torch.Generator()
    gen.manual_seed(int(seq.generate_state(1, dtype=np.uint64)[0] & 0x7FFF_FFFF_FFFF_FFFF))
    return gen


class ReadNoise:
    """Standard-normal samples for per-read noise, in bulk (see module docstring)."""

    def __init__(self, seed: int, fresh: bool = False, pool_size: int = POOL_SIZE) -> None:
        self.fresh = fresh
        self.pool_size = pool_size
        self.seed = int(seed)
        self._gen = torch.Generator()
        self._gen.manual_seed(int(np.random.SeedSequence([seed & 0xFFFFFFFF, 0x5EAD]).generate_state(1)[0]))
        self._rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed & 0xFFFFFFFF, 0x0FF5])))
        self._pool: torch.Tensor | None = None
        self._device_pools: dict[torch.device, torch.Tensor] = {}
        self._lock = threading.Lock()

    def restart(self, stream: int) -> None:
        """Continue with the draws of sub-stream ``stream`` of this seed (the pool stays): a job
        that restarts each unit of work on its own stream gets the same draws whether or not
        earlier units ran (e.g. resumed from a cache)."""
        with self._lock:
            self._rng = np.random.Generator(np.random.PCG64(
                np.random.SeedSequence([self.seed & 0xFFFFFFFF, 0x0FF5, stream & 0xFFFFFFFF])))
            if self.fresh:
                self._gen.manual_seed(int(np.random.SeedSequence(
                    [self.seed & 0xFFFFFFFF, 0x5EAD, stream & 0xFFFFFFFF]).generate_state(1)[0]))
        if not self.fresh:
            self.pool()  # the pool comes from the seed alone, whatever the stream

    def state(self) -> dict:
        """Where the draws stand (saved with a checkpoint so that a resumed job repeats the
        uninterrupted one exactly)."""
        with self._lock:
            return {"rng": self._rng.bit_generator.state, "gen": self._gen.get_state()}

    def set_state(self, state: dict) -> None:
        """Continue from a :meth:`state` (the pool stays: it comes from the seed alone)."""
        if not self.fresh:
            self.pool()
        with self._lock:
            self._rng.bit_generator.state = state["rng"]
            self._gen.set_state(state["gen"])

    def pool(self, device: torch.device | None = None) -> torch.Tensor:
        """The float16 sample pool (on the CPU, or its copy on ``device``)."""
        with self._lock:
            if self._pool is None:
                self._pool = torch.randn(self.pool_size, generator=self._gen).half()
            if device is None or device.type == "cpu":
                return self._pool
            if device not in self._device_pools:
                self._device_pools[device] = self._pool.to(device)
            return self._device_pools[device]

    def pooled(self, n: int) -> bool:
        """Whether a draw of n samples is a view of the pool (at a fresh :meth:`offset`)."""
        return not self.fresh and n <= self.pool_size // 2

    def draw_half(self, n: int, device: torch.device | None = None) -> torch.Tensor:
        """n N(0, 1) samples as float16 on ``device`` (default: CPU); the same samples on every
        device (a read-only view when pooled: do not modify in place)."""
        if not self.pooled(n):
            with self._lock:
                fresh = torch.randn(n, generator=self._gen).half()
            return fresh if device is None else fresh.to(device)
        pool = self.pool(device)
        start = self.offset(n)
        return pool[start:start + n]

    def draw(self, n: int, device: torch.device | None = None) -> torch.Tensor:
        """The same n samples as :meth:`draw_half` would give, as float32."""
        return self.draw_half(n, device).float()

    def offset(self, n: int) -> int:
        """A random start into :meth:`pool` for a block of n samples: the start a pooled
        :meth:`draw_half` of n would use (fused kernels read the pool in place)."""
        with self._lock:
            return int(self._rng.integers(0, self.pool_size - n + 1))


# ---- programming ------------------------------------------------------------------------------
def pcm_state_sigma(g: torch.Tensor) -> torch.Tensor:
    """aihwkit PCM programming-noise sigma at normalised conductance g, in units of g_max."""
    return (0.26348 + 1.9650 * g - 1.1731 * g * g) / 25.0


def program_conductances(
    target: torch.Tensor,
    g_min: float,
    model: str,
    sigma: float,
    p_stuck_on: float,
    p_stuck_off: float,
    gen: torch.Generator,
) -> torch.Tensor:
    """Programmed conductances (float64) for nominal ``target`` conductances in [g_min, 1]."""
    g = target.double()
    if model != "none" and sigma > 0:
        xi = torch.randn(g.shape, generator=gen, dtype=torch.float64)
        if model == "state":
            g = g + sigma * pcm_state_sigma(g) * xi
        elif model == "proportional":
            g = g * (1.0 + sigma * xi)
        elif model == "lognormal":
            g = g * torch.exp(sigma * xi)
        else:
            raise ValueError(f"unknown programming noise model {model!r}")
        g = g.clamp_min(0.0)
    if p_stuck_on > 0 or p_stuck_off > 0:
        u = torch.rand(g.shape, generator=gen, dtype=torch.float64)
        g = torch.where(u < p_stuck_on, torch.ones_like(g), g)
        g = torch.where((u >= p_stuck_on) & (u < p_stuck_on + p_stuck_off), torch.full_like(g, g_min), g)
    return g


def _load_positions(n: int) -> torch.Tensor:
    """h(p, n) = p n - p (p - 1) / 2 for p = 1..n: summed wire segments times downstream cells."""
    p = torch.arange(1, n + 1, dtype=torch.float64)
    return p * n - p * (p - 1) / 2


def ir_drop_factors(
    rows: int, col_positions: torch.Tensor, cols_used: torch.Tensor, r_g: float
) -> torch.Tensor:
    """(rows, J) attenuation of each cell's current in one tile.

    ``col_positions`` (J,) is each column's 1-based distance from the row driver and
    ``cols_used`` (J,) how many columns share that row wire; ``r_g`` = r * G_mean * activity
    (dimensionless). Row i = 0 is the farthest from the column's sense amplifier.
    """
    h_col = _load_positions(rows).flip(0)  # row 0: p = rows (farthest)
    h_row = col_positions.double() * cols_used.double() - col_positions.double() * (col_positions.double() - 1) / 2
    return (1.0 - r_g * (h_col.view(-1, 1) + h_row.view(1, -1))).clamp_min(0.0)


# ---- analog transfer ---------------------------------------------------------------------------
def saturation_vsat(full_scale: float, compression: float, kind: str) -> float:
    """V_sat such that saturate(full_scale) = (1 - compression) * full_scale."""
    if not 0.0 < compression < 1.0:
        raise ValueError(f"saturation compression must be in (0, 1), got {compression}")
    target = 1.0 - compression

    def ratio(z: float) -> float:  # saturate(FS)/FS with z = FS / V_sat; decreasing in z
        return float(-np.expm1(-z) / z) if kind == "exp" else float(np.tanh(z) / z)

    lo, hi = 1e-9, 1e3
    for _ in range(200):
        mid = (lo + hi) / 2
        if ratio(mid) > target:
            lo = mid
        else:
            hi = mid
    return full_scale / ((lo + hi) / 2)


def saturate(y: torch.Tensor, v_sat: float, kind: str) -> torch.Tensor:
    """Bit-line compression of non-negative analog sums (odd extension below 0), in place."""
    if kind == "exp":
        sign = torch.sign(y)
        return y.abs_().mul_(-1.0 / v_sat).expm1_().mul_(-v_sat).mul_(sign)
    if kind == "tanh":
        return y.mul_(1.0 / v_sat).tanh_().mul_(v_sat)
    raise ValueError(f"unknown saturation {kind!r}")


def vt_current_sigma(sigma_vt_mv: float, overdrive_mv: float, alpha: float = 1.3) -> float:
    """Relative cell-current sigma from Vt mismatch above threshold: alpha sigma_Vt / V_ov."""
    return alpha * sigma_vt_mv / overdrive_mv

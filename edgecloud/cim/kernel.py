"""Fused ADC + shift-and-add kernel: one pass over each block of partial sums.

The torch version of the ADC stage (:mod:`edgecloud.cim.engine`) takes ~6 elementwise passes
plus the cycle reduction over every partial sum; on this CPU that, not the GEMM, is most of
a bit-sliced layer's time. This C kernel does the same arithmetic in one pass (scale + shift,
pooled noise, optional bit-line saturation, floor, clamp, weighted accumulation over arrays
and cycles), in the same element order and with the same noise samples as the torch path.

It is compiled once per machine with the system C compiler (``cc -O3 -march=native -fopenmp``,
about a second) into a cache folder (``$EDGECLOUD_CACHE`` or ``~/.cache/edgecloud``) and
loaded with ctypes. Without a compiler :func:`load` returns None and the engine uses torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* ---- bit-planes ------------------------------------------------------------------------------
   x: (m, K) uint8 rows with row stride `stride`. For each array r (rows bounds[r]..bounds[r+1])
   and emitted plane e (bits shifts[e]..+v), out holds an (n_emit m, R_r) int8 block at offset
   n_emit m bounds[r]; row e m + i = (x[i, k] >> shifts[e]) & mask. row_sigma (n_tiles, n_emit, m),
   if given, gets row_noise * sqrt(sum_k plane^2) over the array's rows. */
void planes_tiled(const uint8_t *x, int64_t m, int64_t K, int64_t stride, const int64_t *bounds,
                  int64_t n_tiles, const int32_t *shifts, int64_t n_emit, int32_t mask, int8_t *out,
                  float *row_sigma, float row_noise, int n_threads)
{
    (void)K;
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t i = 0; i < m; i++) {
        const uint8_t *__restrict__ xi = x + i * stride;
        for (int64_t r = 0; r < n_tiles; r++) {
            const int64_t k0 = bounds[r], R = bounds[r + 1] - k0;
            for (int64_t e = 0; e < n_emit; e++) {
                const int s = shifts[e];
                int8_t *__restrict__ o = out + n_emit * m * k0 + (e * m + i) * R;
                int32_t sq = 0;
                for (int64_t k = 0; k < R; k++) {
                    const int32_t v = (xi[k0 + k] >> s) & mask;
                    o[k] = (int8_t)v;
                    sq += v * v;
                }
                if (row_sigma) row_sigma[(r * n_emit + e) * m + i] = row_noise * sqrtf((float)sq);
            }
        }
    }
}

/* bitwise OR of all m x K bytes: which input bits occur at all (all-zero planes are skipped) */
int32_t or_reduce(const uint8_t *x, int64_t m, int64_t K, int64_t stride, int n_threads)
{
    uint32_t acc = 0;
    #pragma omp parallel for num_threads(n_threads) reduction(|:acc) schedule(static)
    for (int64_t i = 0; i < m; i++) {
        const uint8_t *__restrict__ xi = x + i * stride;
        uint32_t a = 0;
        for (int64_t k = 0; k < K; k++) a |= xi[k];
        acc |= a;
    }
    return (int32_t)acc;
}

/* ---- ADC + shift-and-add ---------------------------------------------------------------------
   acc[i, j] = const[j] + sum_r step[r, j] * sum_t tw[t] * q(r, t, i, j), with
   u = sat ? sat(P unit + off[r, j]) * inv[r, j] + shift[r, j] : P * scale[r, j] + shift[r, j]
       + sigma1 * n1[idx] + row_sigma[r, t, i] * n2[idx] * inv[r, j],  idx = ((r T + t) m + i) J + j
   q = quantize ? clamp(floor(u), 0, top) : u;  P is (n_tiles, T, m, J) int32 or float32;
   out[i, o] = sum_s coef[s] * acc[i, s O + o]  (J = n_sub O).
   The flags are compile-time constants in each specialised driver, so the j loop vectorises. */

typedef struct {
    const void *P; int64_t n_tiles, T, m, J;
    const float *scale, *shift, *step, *inv, *tw; float top;
    const float *n1; float sigma1; const float *n2, *row_sigma;
    float unit; const float *off; float vsat;
    const float *cst, *coef; int64_t n_sub, O;
    float *out; int n_threads;
} args_t;

static inline __attribute__((always_inline)) void row(const args_t *A, const int64_t i, float *__restrict__ acc,
                                                      const int ISF, const int HA, const int HB,
                                                      const int QZ, const int SAT)
{
    const int64_t n_tiles = A->n_tiles, T = A->T, m = A->m, J = A->J;
    memcpy(acc, A->cst, J * sizeof(float));
    for (int64_t r = 0; r < n_tiles; r++) {
        const float *__restrict__ sc = A->scale + r * J;
        const float *__restrict__ sh = A->shift + r * J;
        const float *__restrict__ st = A->step + r * J;
        const float *__restrict__ iv = A->inv + r * J;
        const float *__restrict__ of = A->off + r * J;
        for (int64_t t = 0; t < T; t++) {
            const int64_t base = ((r * T + t) * m + i) * J;
            const float w = A->tw[t], top = A->top, s1 = A->sigma1, unit = A->unit, vsat = A->vsat;
            const float rs = HB ? A->row_sigma[(r * T + t) * m + i] : 0.0f;
            const int32_t *__restrict__ pi = (const int32_t *)A->P + base;
            const float *__restrict__ pf = (const float *)A->P + base;
            const float *__restrict__ a = HA ? A->n1 + base : 0;
            const float *__restrict__ b = HB ? A->n2 + base : 0;
            for (int64_t j = 0; j < J; j++) {
                const float p = ISF ? pf[j] : (float)pi[j];
                float u;
                if (SAT == 1) {
                    float y = p * unit + of[j];
                    float sg = y < 0.0f ? -1.0f : 1.0f;
                    u = -sg * vsat * expm1f(-fabsf(y) / vsat) * iv[j] + sh[j];
                } else if (SAT == 2) {
                    u = vsat * tanhf((p * unit + of[j]) / vsat) * iv[j] + sh[j];
                } else {
                    u = p * sc[j] + sh[j];
                }
                if (HA) u += s1 * a[j];
                if (HB) u += rs * b[j] * iv[j];
                if (QZ) {  /* ternaries, not fminf/fmaxf: those are library calls */
                    u = floorf(u);
                    u = u < 0.0f ? 0.0f : u;
                    u = u > top ? top : u;
                }
                acc[j] += st[j] * w * u;
            }
        }
    }
    float *__restrict__ o = A->out + i * A->O;
    for (int64_t k = 0; k < A->O; k++) o[k] = A->coef[0] * acc[k];
    for (int64_t s = 1; s < A->n_sub; s++) {
        const float c = A->coef[s];
        const float *__restrict__ as = acc + s * A->O;
        for (int64_t k = 0; k < A->O; k++) o[k] += c * as[k];
    }
}

#define BODY(AP, ISF, HA, HB, QZ, SAT) {                                                  \
    const args_t *A_ = (AP); const int nthr_ = A_->n_threads; const int64_t m_ = A_->m;  \
    _Pragma("omp parallel num_threads(nthr_)")                                           \
    {                                                                                     \
        float *acc_ = (float *)malloc(A_->J * sizeof(float));                             \
        _Pragma("omp for schedule(static)")                                               \
        for (int64_t i = 0; i < m_; i++) row(A_, i, acc_, ISF, HA, HB, QZ, SAT);          \
        free(acc_);                                                                       \
    } }
#define DRIVER(ISF, HA, HB, QZ) static void d_##ISF##HA##HB##QZ(const args_t *A) { BODY(A, ISF, HA, HB, QZ, 0) }
DRIVER(0,0,0,0) DRIVER(0,0,0,1) DRIVER(0,0,1,0) DRIVER(0,0,1,1) DRIVER(0,1,0,0) DRIVER(0,1,0,1)
DRIVER(0,1,1,0) DRIVER(0,1,1,1) DRIVER(1,0,0,0) DRIVER(1,0,0,1) DRIVER(1,0,1,0) DRIVER(1,0,1,1)
DRIVER(1,1,0,0) DRIVER(1,1,0,1) DRIVER(1,1,1,0) DRIVER(1,1,1,1)
static void (*const drivers[16])(const args_t *) = {
    d_0000, d_0001, d_0010, d_0011, d_0100, d_0101, d_0110, d_0111,
    d_1000, d_1001, d_1010, d_1011, d_1100, d_1101, d_1110, d_1111};

void adc_accumulate(const void *P, int p_is_float, int64_t n_tiles, int64_t T, int64_t m, int64_t J,
                    const float *scale, const float *shift, const float *step, const float *inv,
                    const float *tw, int quantize, float top,
                    const float *n1, float sigma1, const float *n2, const float *row_sigma,
                    int sat_kind, float unit, const float *off, float vsat,
                    const float *cst, const float *coef, int64_t n_sub, float *out, int n_threads)
{
    args_t A = {P, n_tiles, T, m, J, scale, shift, step, inv, tw, top, n1, sigma1, n2, row_sigma,
                unit, off, vsat, cst, coef, n_sub, J / n_sub, out, n_threads};
    const int ha = n1 != 0, hb = n2 != 0 && row_sigma != 0;
    const int isf = p_is_float != 0, qz = quantize != 0;
    if (sat_kind == 0) {
        drivers[(isf ? 8 : 0) | (ha ? 4 : 0) | (hb ? 2 : 0) | (qz ? 1 : 0)](&A);
    } else if (sat_kind == 1) {
        BODY(&A, isf, ha, hb, qz, 1)
    } else {
        BODY(&A, isf, ha, hb, qz, 2)
    }
}
"""

# -fno-trapping-math lets floorf vectorise (we never enable FP traps)
FLAGS = ["-O3", "-march=native", "-fno-trapping-math", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared"]
_lock = threading.Lock()
_loaded: ctypes.CDLL | None = None
_tried = False


def _cache_dir() -> Path:
    root = os.environ.get("EDGECLOUD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edgecloud")
    return Path(root) / "kernels"


def _cpu_tag() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _build(target: Path) -> None:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        raise RuntimeError("no C compiler")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        src = Path(tmp) / "adc_kernel.c"
        src.write_text(SOURCE)
        out = Path(tmp) / target.name
        cmd = [compiler, *FLAGS, str(src), "-o", str(out), "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr[-2000:]}")
        os.replace(out, target)  # atomic: concurrent builders race harmlessly


def load() -> ctypes.CDLL | None:
    """The compiled kernel (built on first use), or None where it cannot be built."""
    global _loaded, _tried
    with _lock:
        if _tried:
            return _loaded
        _tried = True
        digest = hashlib.sha256((SOURCE + " ".join(FLAGS) + _cpu_tag()).encode()).hexdigest()[:16]
        target = _cache_dir() / f"adc_kernel_{digest}.so"
        try:
            if not target.exists():
                _build(target)
            lib = ctypes.CDLL(str(target))
        except (OSError, RuntimeError) as exc:
            log.info("fused ADC kernel unavailable, using torch ops: %s", exc)
            return None
        p, i64, i32, flt = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
        lib.adc_accumulate.argtypes = [p, i32, i64, i64, i64, i64, p, p, p, p, p, i32, flt, p, flt, p, p,
                                       i32, flt, p, flt, p, p, i64, p, i32]
        lib.adc_accumulate.restype = None
        lib.planes_tiled.argtypes = [p, i64, i64, i64, p, i64, p, i64, ctypes.c_int32, p, p, flt, i32]
        lib.planes_tiled.restype = None
        lib.or_reduce.argtypes = [p, i64, i64, i64, i32]
        lib.or_reduce.restype = ctypes.c_int32
        _loaded = lib
        return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _threads() -> int:
    return max(1, torch.get_num_threads())


def or_reduce(lib: ctypes.CDLL, x: torch.Tensor) -> int:
    """Bitwise OR of every byte of a uint8 (m, K) matrix with unit column stride."""
    assert x.dtype == torch.uint8 and x.dim() == 2 and x.stride(1) == 1
    return int(lib.or_reduce(x.data_ptr(), x.shape[0], x.shape[1], x.stride(0), _threads()))


def planes_tiled(lib: ctypes.CDLL, x: torch.Tensor, bounds: torch.Tensor, shifts: torch.Tensor, mask: int,
                 row_noise: float | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(planes, row_sigma): int8 bit-planes, array-major (see SOURCE), and read-noise sigmas."""
    assert x.dtype == torch.uint8 and x.dim() == 2 and x.stride(1) == 1
    assert bounds.dtype == torch.int64 and shifts.dtype == torch.int32
    m, k = x.shape
    n_tiles, n_emit = bounds.numel() - 1, shifts.numel()
    out = torch.empty(n_emit * m * k, dtype=torch.int8)
    sig = torch.empty(n_tiles, n_emit * m, dtype=torch.float32) if row_noise is not None else None
    lib.planes_tiled(x.data_ptr(), m, k, x.stride(0), bounds.data_ptr(), n_tiles, shifts.data_ptr(), n_emit,
                     mask, out.data_ptr(), _ptr(sig), float(row_noise or 0.0), _threads())
    return out, sig


def adc_accumulate(
    lib: ctypes.CDLL,
    partial: torch.Tensor,  # (n_tiles, T m, J) int32 / float32, contiguous
    n_cycles: int,
    scale: torch.Tensor, shift: torch.Tensor, step: torch.Tensor, inv: torch.Tensor,  # (n_tiles, J) f32
    cycle_w: torch.Tensor,  # (T,) f32
    top: float | None,
    noise1: torch.Tensor | None, sigma1: float,
    noise2: torch.Tensor | None, row_sigma: torch.Tensor | None,  # (n_tiles, T m) f32
    saturation: str | None, unit: float, offset: torch.Tensor, v_sat: float,
    const: torch.Tensor, coef: torch.Tensor,  # (J,), (n_sub,) f32
    out: torch.Tensor,  # (m, O) f32, contiguous rows: written
) -> None:
    """out[i, o] = sum_s coef[s] (const + sum over arrays and cycles of step * weight * code)[i, s O + o]."""
    n_tiles, rows, j = partial.shape
    m = rows // n_cycles
    for t in (partial, scale, shift, step, inv, cycle_w, offset, noise1, noise2, row_sigma, const, coef, out):
        assert t is None or t.is_contiguous()
    assert out.shape == (m, j // coef.numel()) and out.dtype == torch.float32
    lib.adc_accumulate(
        partial.data_ptr(), int(partial.dtype == torch.float32), n_tiles, n_cycles, m, j,
        scale.data_ptr(), shift.data_ptr(), step.data_ptr(), inv.data_ptr(), cycle_w.data_ptr(),
        int(top is not None), float(top or 0.0),
        _ptr(noise1), float(sigma1), _ptr(noise2), _ptr(row_sigma),
        {None: 0, "exp": 1, "tanh": 2}[saturation], float(unit), offset.data_ptr(), float(v_sat),
        const.data_ptr(), coef.data_ptr(), coef.numel(), out.data_ptr(), _threads(),
    )

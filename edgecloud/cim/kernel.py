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
#include <stddef.h>

/* out[i, j] = sum_r step[r, j] * sum_t tw[t] * q(r, t, i, j), with
   u = sat ? sat(P unit + off[r, j]) * inv[r, j] + shift[r, j] : P * scale[r, j] + shift[r, j]
       + sigma1 * n1[idx] + row_sigma[r, t, i] * n2[idx] * inv[r, j],  idx = ((r T + t) m + i) J + j
   q = quantize ? clamp(floor(u), 0, top) : u.  P is (n_tiles, T, m, J) int32 or float32.
   The flags are compile-time constants in each specialised driver, so the j loop vectorises. */

typedef struct {
    const void *P; int64_t n_tiles, T, m, J;
    const float *scale, *shift, *step, *inv, *tw; float top;
    const float *n1; float sigma1; const float *n2, *row_sigma;
    int sat_kind; float unit; const float *off; float vsat;
    float *out; int n_threads;
} args_t;

static inline __attribute__((always_inline)) void row(const args_t *A, const int64_t i, const int ISF,
                                                      const int HA, const int HB, const int QZ, const int SAT)
{
    const int64_t n_tiles = A->n_tiles, T = A->T, m = A->m, J = A->J;
    {
        float *__restrict__ o = A->out + i * J;
        for (int64_t j = 0; j < J; j++) o[j] = 0.0f;
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
                        float s = y < 0.0f ? -1.0f : 1.0f;
                        u = -s * vsat * expm1f(-fabsf(y) / vsat) * iv[j] + sh[j];
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
                    o[j] += st[j] * w * u;
                }
            }
        }
    }
}

#define BODY(AP, ISF, HA, HB, QZ, SAT) {                                            \
    const args_t *A_ = (AP); const int nthr_ = A_->n_threads; const int64_t m_ = A_->m;  \
    _Pragma("omp parallel for num_threads(nthr_) schedule(static)")                    \
    for (int64_t i = 0; i < m_; i++) row(A_, i, ISF, HA, HB, QZ, SAT); }
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
                    float *out, int n_threads)
{
    args_t A = {P, n_tiles, T, m, J, scale, shift, step, inv, tw, top, n1, sigma1, n2, row_sigma,
                sat_kind, unit, off, vsat, out, n_threads};
    const int ha = n1 != 0, hb = n2 != 0 && row_sigma != 0;
    if (sat_kind == 0) {
        drivers[(p_is_float ? 8 : 0) | (ha ? 4 : 0) | (hb ? 2 : 0) | (quantize ? 1 : 0)](&A);
    } else if (sat_kind == 1) {
        const int isf = p_is_float != 0, qz = quantize != 0;
        BODY(&A, isf, ha, hb, qz, 1)
    } else {
        const int isf = p_is_float != 0, qz = quantize != 0;
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
        f = lib.adc_accumulate
        p, i64, i32, flt = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
        f.argtypes = [p, i32, i64, i64, i64, i64, p, p, p, p, p, i32, flt, p, flt, p, p, i32, flt, p, flt, p, i32]
        f.restype = None
        _loaded = lib
        return lib


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


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
) -> torch.Tensor:
    """(m, J) float32: sum over arrays and cycles of step * cycle weight * ADC code."""
    n_tiles, rows, j = partial.shape
    m = rows // n_cycles
    out = torch.empty(m, j, dtype=torch.float32)
    for t in (partial, scale, shift, step, inv, cycle_w, offset, noise1, noise2, row_sigma):
        assert t is None or t.is_contiguous()
    lib.adc_accumulate(
        partial.data_ptr(), int(partial.dtype == torch.float32), n_tiles, n_cycles, m, j,
        scale.data_ptr(), shift.data_ptr(), step.data_ptr(), inv.data_ptr(), cycle_w.data_ptr(),
        int(top is not None), float(top or 0.0),
        _ptr(noise1), float(sigma1), _ptr(noise2), _ptr(row_sigma),
        {None: 0, "exp": 1, "tanh": 2}[saturation], float(unit), offset.data_ptr(), float(v_sat),
        out.data_ptr(), max(1, torch.get_num_threads()),
    )
    return out

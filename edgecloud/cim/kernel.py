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
   q = quantize ? clamp(floor(u), 0, top) : u.  P is (n_tiles, T, m, J) int32 or float32. */
void adc_accumulate(const void *P, int p_is_float, int64_t n_tiles, int64_t T, int64_t m, int64_t J,
                    const float *scale, const float *shift, const float *step, const float *inv,
                    const float *tw, int quantize, float top,
                    const float *n1, float sigma1, const float *n2, const float *row_sigma,
                    int sat_kind, float unit, const float *off, float vsat,
                    float *out, int n_threads)
{
    #pragma omp parallel for num_threads(n_threads) schedule(static)
    for (int64_t i = 0; i < m; i++) {
        float *o = out + i * J;
        for (int64_t j = 0; j < J; j++) o[j] = 0.0f;
        for (int64_t r = 0; r < n_tiles; r++) {
            const float *sc = scale + r * J, *sh = shift + r * J, *st = step + r * J;
            const float *iv = inv + r * J, *of = off + r * J;
            for (int64_t t = 0; t < T; t++) {
                const int64_t base = ((r * T + t) * m + i) * J;
                const float w = tw[t];
                const float rs = row_sigma ? row_sigma[(r * T + t) * m + i] : 0.0f;
                const int32_t *pi = (const int32_t *)P + base;
                const float *pf = (const float *)P + base;
                const float *a = n1 ? n1 + base : NULL;
                const float *b = n2 ? n2 + base : NULL;
                for (int64_t j = 0; j < J; j++) {
                    float p = p_is_float ? pf[j] : (float)pi[j];
                    float u;
                    if (sat_kind) {
                        float y = p * unit + of[j];
                        if (sat_kind == 1) {
                            float s = y < 0.0f ? -1.0f : 1.0f;
                            y = -s * vsat * expm1f(-fabsf(y) / vsat);
                        } else {
                            y = vsat * tanhf(y / vsat);
                        }
                        u = y * iv[j] + sh[j];
                    } else {
                        u = p * sc[j] + sh[j];
                    }
                    if (a) u += sigma1 * a[j];
                    if (b) u += rs * b[j] * iv[j];
                    if (quantize) {
                        u = floorf(u);
                        u = u < 0.0f ? 0.0f : (u > top ? top : u);
                    }
                    o[j] += st[j] * w * u;
                }
            }
        }
    }
}
"""

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
        cmd = [compiler, "-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", str(src), "-o", str(out), "-lm"]
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
        digest = hashlib.sha256((SOURCE + _cpu_tag()).encode()).hexdigest()[:16]
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

"""C kernels of the array pass: the fused VNNI pass, and the ADC over materialised partial sums.

- ``fused_block`` (AVX-512 VNNI machines): the whole array pass of a layer in one call. Per
  group of rows it cuts the bit-planes from the input bytes into an L1 buffer (reading conv
  patches from the padded NHWC input), multiplies them with the arrays' packed int8 weights
  by ``vpdpbusd`` (exact int32 partial sums, never written to memory), and puts each partial
  sum through the ADC (scale + shift, noise, floor, clamp) and the shift-and-add. The torch
  ADC stage takes ~6 elementwise passes over every partial sum, and materialised partial
  sums are 4 bytes per conversion of memory traffic; here a conversion costs a few vector
  instructions next to its ``K/64`` multiply-add instructions.
- ``adc_accumulate``: the same ADC arithmetic in one pass over a block of partial sums that a
  GEMM (``torch._int_mm`` or float) has written, for the other cases.

Both do the arithmetic of the torch path (:mod:`edgecloud.cim.engine`) with the same noise
samples, in the same places; results differ from it only by float rounding. Compiled once per
machine with the system C compiler (``cc -O3 -march=native -fopenmp``, a few seconds) into a
cache folder (``$EDGECLOUD_CACHE`` or ``~/.cache/edgecloud``) and loaded with ctypes. Without
a compiler :func:`load` returns None and the engine uses torch.
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
#include <omp.h>

/* Noise model shared by every path: each conversion gets one N(0, 1) sample n (row-major per
   block: idx = ((i n_tiles + r) T + t) J + j) scaled by its sigma in LSB,
       sigma = sqrt(s1sq + (rn2 sq) inv^2)  (ADC noise and read noise, independent Gaussians),
   with sq = sum_k plane^2 over the array's rows; sigma = sigma1 without read noise. */

/* ---- bit-planes ------------------------------------------------------------------------------
   x: (m, K) uint8 rows with row stride `stride`. For each array r (rows bounds[r]..bounds[r+1])
   and emitted plane e (bits shifts[e]..+v), out holds an (n_emit m, R_r) int8 block at offset
   n_emit m bounds[r]; row e m + i = (x[i, k] >> shifts[e]) & mask. row_sq (n_tiles, n_emit, m),
   if given, gets sum_k plane^2 over the array's rows (for read noise). */
void planes_tiled(const uint8_t *x, int64_t m, int64_t K, int64_t stride, const int64_t *bounds,
                  int64_t n_tiles, const int32_t *shifts, int64_t n_emit, int32_t mask, int8_t *out,
                  float *row_sq, int n_threads)
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
                if (row_sq) row_sq[(r * n_emit + e) * m + i] = (float)sq;
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

/* ---- ADC + shift-and-add over materialised partial sums -------------------------------------
   acc[i, j] = const[j] + sum_r step[r, j] * sum_t tw[t] * q(r, t, i, j), with
   u = sat ? sat(P unit + off[r, j]) * inv[r, j] + shift[r, j] : P * scale[r, j] + shift[r, j]
       + (sig ? sig[r, t, i, j] : sigma1) * n[((i n_tiles + r) T + t) J + j]
   q = quantize ? clamp(floor(u), 0, top) : u;  P and sig are (n_tiles, T, m, J), P int32 or
   float32; out[i, o] = sum_s coef[s] * acc[i, s O + o]  (J = n_sub O).
   The flags are compile-time constants in each specialised driver, so the j loop vectorises. */

typedef struct {
    const void *P; int64_t n_tiles, T, m, J;
    const float *scale, *shift, *step, *inv, *tw; float top;
    const float *n1; float sigma1; const float *sig;
    float unit; const float *off; float vsat;
    const float *cst, *coef; int64_t n_sub, O;
    float *out; int n_threads;
} args_t;

static inline __attribute__((always_inline)) void row(const args_t *A, const int64_t i, float *__restrict__ acc,
                                                      float *__restrict__ tacc, const int ISF, const int HA,
                                                      const int HB, const int QZ, const int SAT)
{
    const int64_t n_tiles = A->n_tiles, T = A->T, m = A->m, J = A->J;
    memcpy(acc, A->cst, J * sizeof(float));
    for (int64_t r = 0; r < n_tiles; r++) {
        const float *__restrict__ sc = A->scale + r * J;
        const float *__restrict__ sh = A->shift + r * J;
        const float *__restrict__ st = A->step + r * J;
        const float *__restrict__ iv = A->inv + r * J;
        const float *__restrict__ of = A->off + r * J;
        memset(tacc, 0, J * sizeof(float));
        for (int64_t t = 0; t < T; t++) {
            const int64_t base = ((r * T + t) * m + i) * J, nbase = ((i * n_tiles + r) * T + t) * J;
            const float w = A->tw[t], top = A->top, s1 = A->sigma1, unit = A->unit, vsat = A->vsat;
            const int32_t *__restrict__ pi = (const int32_t *)A->P + base;
            const float *__restrict__ pf = (const float *)A->P + base;
            const float *__restrict__ a = HA ? A->n1 + nbase : 0;
            const float *__restrict__ sg = HB ? A->sig + base : 0;
            for (int64_t j = 0; j < J; j++) {
                const float p = ISF ? pf[j] : (float)pi[j];
                float u;
                if (SAT == 1) {
                    float y = p * unit + of[j];
                    float sgn = y < 0.0f ? -1.0f : 1.0f;
                    u = -sgn * vsat * expm1f(-fabsf(y) / vsat) * iv[j] + sh[j];
                } else if (SAT == 2) {
                    u = vsat * tanhf((p * unit + of[j]) / vsat) * iv[j] + sh[j];
                } else {
                    u = p * sc[j] + sh[j];
                }
                if (HB) u += sg[j] * a[j];
                else if (HA) u += s1 * a[j];
                if (QZ) {  /* ternaries, not fminf/fmaxf: those are library calls */
                    u = floorf(u);
                    u = u < 0.0f ? 0.0f : u;
                    u = u > top ? top : u;
                }
                tacc[j] += w * u;
            }
        }
        for (int64_t j = 0; j < J; j++) acc[j] += st[j] * tacc[j];
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
        float *acc_ = (float *)malloc(2 * A_->J * sizeof(float));                         \
        _Pragma("omp for schedule(static)")                                               \
        for (int64_t i = 0; i < m_; i++) row(A_, i, acc_, acc_ + A_->J, ISF, HA, HB, QZ, SAT); \
        free(acc_);                                                                       \
    } }
#define DRIVER(ISF, HA, HB, QZ) static void d_##ISF##HA##HB##QZ(const args_t *A) { BODY(A, ISF, HA, HB, QZ, 0) }
DRIVER(0,0,0,0) DRIVER(0,0,0,1) DRIVER(0,1,0,0) DRIVER(0,1,0,1) DRIVER(0,1,1,0) DRIVER(0,1,1,1)
DRIVER(1,0,0,0) DRIVER(1,0,0,1) DRIVER(1,1,0,0) DRIVER(1,1,0,1) DRIVER(1,1,1,0) DRIVER(1,1,1,1)
static void (*const drivers[16])(const args_t *) = {
    d_0000, d_0001, 0, 0, d_0100, d_0101, d_0110, d_0111,
    d_1000, d_1001, 0, 0, d_1100, d_1101, d_1110, d_1111};

void adc_accumulate(const void *P, int p_is_float, int64_t n_tiles, int64_t T, int64_t m, int64_t J,
                    const float *scale, const float *shift, const float *step, const float *inv,
                    const float *tw, int quantize, float top, const float *n1, float sigma1, const float *sig,
                    int sat_kind, float unit, const float *off, float vsat,
                    const float *cst, const float *coef, int64_t n_sub, float *out, int n_threads)
{
    args_t A = {P, n_tiles, T, m, J, scale, shift, step, inv, tw, top, n1, sigma1, sig,
                unit, off, vsat, cst, coef, n_sub, J / n_sub, out, n_threads};
    const int ha = n1 != 0, hb = ha && sig != 0;
    const int isf = p_is_float != 0, qz = quantize != 0;
    if (sat_kind == 0) {
        drivers[(isf ? 8 : 0) | (ha ? 4 : 0) | (hb ? 2 : 0) | (qz ? 1 : 0)](&A);
    } else if (sat_kind == 1) {
        BODY(&A, isf, ha, hb, qz, 1)
    } else {
        BODY(&A, isf, ha, hb, qz, 2)
    }
}

/* ---- fused array pass: bit-planes + int8 GEMM + ADC + shift-and-add (AVX-512 VNNI) ------------
   One block of rows without materialising bit-planes or partial sums. Per group of G input rows
   (G T <= 8 plane-rows) and array r: the planes are cut from the input bytes into an L1 buffer
   (zero-padded to whole 4-row groups), multiplied with the array's packed int8 weights by
   vpdpbusd (u8 planes x s8 weights -> exact s32 partial sums), and each partial sum goes
   straight through the ADC arithmetic of adc_accumulate (codes summed over cycles per array,
   then scaled by the step, as in the torch path), with the same noise samples (float16 here).
   Packed weights of array r (at wp + wp_off[r]): [ceil(R/4)][Jv][16][4] int8, byte b of lane l
   of vector q in group g = W[4 g + b, 16 q + l], zero beyond R rows and J columns.
   Rows row0..row0+m of x: (M, K) uint8 patch rows with row stride `stride`, or, when conv is
   given, an implicit im2col of a zero-padded NHWC uint8 input (no patch matrix in memory):
   conv = {OH, OW, KH, KW, C, SH, SW, DH, DW, Hp, Wp}, patch row i = (n, oh, ow), K index =
   (kh, kw, c). out holds the m rows. Noise: row i's samples start at noise + noff[i / nblock]
   + (i % nblock) n_tiles T J (blocks of nblock rows, each at its own pool offset).
   Read-noise sigma: from sig_tab[r, sq, :] ((n_tiles, tab_rows, J), sigma per sum of squares,
   built by the caller with the formula above) when sq < tab_rows, else by the formula. */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__)
#include <immintrin.h>

typedef struct {
    const uint8_t *x; int64_t m, row0, stride; const int64_t *conv; const int64_t *seg;
    int64_t n_tiles; const int64_t *bounds; const int8_t *wp; const int64_t *wp_off; int64_t Jv;
    int64_t T; const int32_t *shifts; int32_t mask; int64_t J;
    const float *scale, *shift, *step, *inv, *tw; float top;
    const uint16_t *noise; const int64_t *noff; int64_t nblock; float sigma1; const float *sig_tab; int64_t tab_rows; float rn2, s1sq; const float *iv2;
    float unit; const float *off; float vsat;
    const float *cst, *coef; int64_t n_sub, O;
    float *out; int n_threads;
} fargs_t;

static inline __attribute__((always_inline)) void mk(const uint8_t *pl, int64_t ps, const int8_t *w, int64_t n4,
                                                     int64_t Jv, int64_t q0, int32_t *o, int64_t os,
                                                     const int P, const int C)
{
    __m512i acc[8][3];
    #pragma GCC unroll 8
    for (int p = 0; p < P; p++) {
        #pragma GCC unroll 3
        for (int c = 0; c < C; c++) acc[p][c] = _mm512_setzero_si512();
    }
    const int8_t *wg = w + q0 * 64;
    for (int64_t g = 0; g < n4; g++, wg += Jv * 64) {
        __m512i wv[3];
        #pragma GCC unroll 3
        for (int c = 0; c < C; c++) wv[c] = _mm512_loadu_si512(wg + 64 * c);
        #pragma GCC unroll 8
        for (int p = 0; p < P; p++) {
            int32_t xv;
            memcpy(&xv, pl + p * ps + 4 * g, 4);
            const __m512i xb = _mm512_set1_epi32(xv);
            #pragma GCC unroll 3
            for (int c = 0; c < C; c++) acc[p][c] = _mm512_dpbusd_epi32(acc[p][c], xb, wv[c]);
        }
    }
    #pragma GCC unroll 8
    for (int p = 0; p < P; p++) {
        #pragma GCC unroll 3
        for (int c = 0; c < C; c++) _mm512_storeu_si512(o + p * os + (q0 + c) * 16, acc[p][c]);
    }
}

#define MK_CASES(C_)                                                                        \
    switch (P) {                                                                            \
    case 1: mk(pl, ps, w, n4, Jv, q, o, os, 1, C_); break;                                  \
    case 2: mk(pl, ps, w, n4, Jv, q, o, os, 2, C_); break;                                  \
    case 3: mk(pl, ps, w, n4, Jv, q, o, os, 3, C_); break;                                  \
    case 4: mk(pl, ps, w, n4, Jv, q, o, os, 4, C_); break;                                  \
    case 5: mk(pl, ps, w, n4, Jv, q, o, os, 5, C_); break;                                  \
    case 6: mk(pl, ps, w, n4, Jv, q, o, os, 6, C_); break;                                  \
    case 7: mk(pl, ps, w, n4, Jv, q, o, os, 7, C_); break;                                  \
    default: mk(pl, ps, w, n4, Jv, q, o, os, 8, C_); break;                                 \
    }

/* partial sums o[p, 0:16 Jv] (row stride os) of P <= 8 plane-rows against one packed array */
static void gemm_planes(const uint8_t *pl, int64_t ps, int P, const int8_t *w, int64_t n4, int64_t Jv,
                        int32_t *o, int64_t os)
{
    int64_t q = 0;  /* column vectors in passes of 3 (24 accumulators), ending 2 + 2 rather than 3 + 1 */
    for (; Jv - q > 4 || Jv - q == 3; q += 3) MK_CASES(3)
    for (; Jv - q >= 2; q += 2) MK_CASES(2)
    if (Jv - q == 1) { MK_CASES(1) }
}

/* position of a patch row in the conv output, advanced row by row */
typedef struct { int64_t n, oh, ow; } pos_t;

static inline void pos_next(const int64_t *cv, pos_t *p)
{
    if (++p->ow == cv[1]) {
        p->ow = 0;
        if (++p->oh == cv[0]) { p->oh = 0; p->n++; }
    }
}

/* conv patch row at p gathered into buf: KH KW pieces of C input bytes (seg[s]: offset of
   piece s = kh KW + kw from the patch origin), copied with masked 64-byte moves */
static inline void gather_row(const fargs_t *A, const pos_t *p, uint8_t *buf)
{
    const int64_t *cv = A->conv;
    const int64_t KH = cv[2], KW = cv[3], C = cv[4];
    const uint8_t *origin = A->x + ((p->n * cv[9] + p->oh * cv[5]) * cv[10] + p->ow * cv[6]) * C;
    for (int64_t s = 0; s < KH * KW; s++) {
        const uint8_t *src = origin + A->seg[s];
        uint8_t *dst = buf + s * C;
        for (int64_t c = 0; c < C; c += 64) {
            const __mmask64 lm = C - c >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (C - c)) - 1);
            _mm512_mask_storeu_epi8(dst + c, lm, _mm512_maskz_loadu_epi8(lm, src + c));
        }
    }
}

static inline __attribute__((always_inline)) __mmask16 tail16(int64_t left)
{
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
}

static inline __attribute__((always_inline)) void fused_rows(
    const fargs_t *A, int64_t i_begin, int64_t i_end, uint8_t *xbuf, int64_t xs, uint8_t *pl, int64_t ps,
    int32_t *part, int64_t os, float *acc, float *sgbuf, const int HA, const int HB, const int QZ, const int SAT)
{
    const int64_t T = A->T, J = A->J, nt = A->n_tiles;
    const int64_t G = T >= 8 ? 1 : 8 / T;
    const float top = A->top, s1 = A->sigma1, unit = A->unit, vsat = A->vsat;
    /* row counters, advanced row by row: noise block and row in it, conv output position */
    int64_t nb = i_begin / A->nblock, nl = i_begin % A->nblock;
    pos_t pos = {0, 0, 0};
    if (A->conv) {
        const int64_t i = A->row0 + i_begin, OH = A->conv[0], OW = A->conv[1];
        pos.ow = i % OW;
        pos.oh = (i / OW) % OH;
        pos.n = i / (OW * OH);
    }
    for (int64_t i0 = i_begin; i0 < i_end; i0 += G) {
        const int64_t gn = (i_end - i0 < G) ? i_end - i0 : G;
        const uint8_t *xr[8];
        const uint16_t *nrows[8];
        for (int64_t g = 0; g < gn; g++) {
            memcpy(acc + g * J, A->cst, J * sizeof(float));
            if (A->conv) {
                gather_row(A, &pos, xbuf + g * xs);
                xr[g] = xbuf + g * xs;
                pos_next(A->conv, &pos);
            } else {
                xr[g] = A->x + (A->row0 + i0 + g) * A->stride;
            }
            nrows[g] = HA ? A->noise + A->noff[nb] + nl * nt * T * J : 0;
            if (++nl == A->nblock) { nl = 0; nb++; }
        }
        for (int64_t r = 0; r < nt; r++) {
            const int64_t k0 = A->bounds[r], R = A->bounds[r + 1] - k0, n4 = (R + 3) / 4;
            int32_t sqs[8];
            for (int64_t g = 0; g < gn; g++) {
                const uint8_t *xi = xr[g] + k0;
                for (int64_t t = 0; t < T; t++) {
                    const int s = A->shifts[t];
                    /* bytes shifted as 16-bit lanes: keep only bits that came from the same byte */
                    const __m512i msk = _mm512_set1_epi8((char)(A->mask & (0xFF >> s)));
                    const __m128i cnt = _mm_cvtsi32_si128(s);
                    uint8_t *o = pl + (g * T + t) * ps;
                    __m512i sq = _mm512_setzero_si512();
                    int64_t ones = 0;
                    for (int64_t k = 0; k < R; k += 64) {
                        const __mmask64 lm = R - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (R - k)) - 1);
                        const __m512i v = _mm512_and_si512(_mm512_srl_epi16(_mm512_maskz_loadu_epi8(lm, xi + k), cnt), msk);
                        _mm512_storeu_si512(o + k, v);
                        if (HB && A->mask == 1) {  /* one-bit planes: sum x^2 = number of ones */
                            ones += __builtin_popcountll(_mm512_test_epi8_mask(v, v));
                        } else if (HB) {
                            const __m512i lo = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(v));
                            const __m512i hi = _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(v, 1));
                            sq = _mm512_add_epi32(sq, _mm512_add_epi32(_mm512_madd_epi16(lo, lo), _mm512_madd_epi16(hi, hi)));
                        }
                    }
                    sqs[g * T + t] = HB ? (A->mask == 1 ? (int32_t)ones : _mm512_reduce_add_epi32(sq)) : 0;
                }
            }
            gemm_planes(pl, ps, (int)(gn * T), A->wp + A->wp_off[r], n4, A->Jv, part, os);
            const float *__restrict__ sc = A->scale + r * J;
            const float *__restrict__ sh = A->shift + r * J;
            const float *__restrict__ st = A->step + r * J;
            const float *__restrict__ iv = A->inv + r * J;
            const float *__restrict__ of = A->off + r * J;
            for (int64_t g = 0; g < gn; g++) {
                float *__restrict__ ac = acc + g * J;
                const uint16_t *nrow = nrows[g];
                /* read-noise sigma rows (LSB) of this row's planes: table rows, or the formula */
                const float *sgrow[8];
                if (HB) {
                    for (int64_t t = 0; t < T; t++) {
                        const int32_t q = sqs[g * T + t];
                        if (q < A->tab_rows) {
                            sgrow[t] = A->sig_tab + (r * A->tab_rows + q) * J;
                            continue;
                        }
                        float *sb = sgbuf + t * J;
                        const __m512 c = _mm512_set1_ps((float)q * A->rn2), s1q = _mm512_set1_ps(A->s1sq);
                        for (int64_t j = 0; j < J; j += 16) {
                            const __mmask16 km = tail16(J - j);
                            const __m512 var = _mm512_add_ps(_mm512_mul_ps(c, _mm512_maskz_loadu_ps(km, A->iv2 + r * J + j)), s1q);
                            _mm512_mask_storeu_ps(sb + j, km, _mm512_sqrt_ps(var));
                        }
                        sgrow[t] = sb;
                    }
                }
                if (SAT == 0) {
                    for (int64_t j = 0; j < J; j += 16) {
                        const __mmask16 km = tail16(J - j);
                        const __m512 scv = _mm512_maskz_loadu_ps(km, sc + j), shv = _mm512_maskz_loadu_ps(km, sh + j);
                        __m512 tacc = _mm512_setzero_ps();
                        for (int64_t t = 0; t < T; t++) {
                            const __m512i pv = _mm512_loadu_si512(part + (g * T + t) * os + j);
                            __m512 u = _mm512_fmadd_ps(_mm512_cvtepi32_ps(pv), scv, shv);
                            if (HA) {
                                const __m512 nv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(km, nrow + (r * T + t) * J + j));
                                const __m512 sgv = HB ? _mm512_maskz_loadu_ps(km, sgrow[t] + j) : _mm512_set1_ps(s1);
                                u = _mm512_fmadd_ps(sgv, nv, u);
                            }
                            if (QZ) u = _mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(u, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC),
                                                                    _mm512_setzero_ps()), _mm512_set1_ps(top));
                            tacc = _mm512_fmadd_ps(_mm512_set1_ps(A->tw[t]), u, tacc);
                        }
                        _mm512_mask_storeu_ps(ac + j, km, _mm512_fmadd_ps(_mm512_maskz_loadu_ps(km, st + j), tacc,
                                                                         _mm512_maskz_loadu_ps(km, ac + j)));
                    }
                    continue;
                }
                float *__restrict__ tacc = sgbuf + 8 * J;
                memset(tacc, 0, J * sizeof(float));
                for (int64_t t = 0; t < T; t++) {
                    const float w = A->tw[t];
                    const int32_t *__restrict__ pi = part + (g * T + t) * os;
                    const uint16_t *__restrict__ a = HA ? nrow + (r * T + t) * J : 0;
                    const float *__restrict__ sg = HB ? sgrow[t] : 0;
                    for (int64_t j = 0; j < J; j++) {
                        const float p = (float)pi[j];
                        float u;
                        if (SAT == 1) {
                            float y = p * unit + of[j];
                            float sgn = y < 0.0f ? -1.0f : 1.0f;
                            u = -sgn * vsat * expm1f(-fabsf(y) / vsat) * iv[j] + sh[j];
                        } else {
                            u = vsat * tanhf((p * unit + of[j]) / vsat) * iv[j] + sh[j];
                        }
                        if (HA) u += (HB ? sg[j] : s1) * _cvtsh_ss(a[j]);
                        if (QZ) {
                            u = floorf(u);
                            u = u < 0.0f ? 0.0f : u;
                            u = u > top ? top : u;
                        }
                        tacc[j] += w * u;
                    }
                }
                for (int64_t j = 0; j < J; j++) ac[j] += st[j] * tacc[j];
            }
        }
        for (int64_t g = 0; g < gn; g++) {
            const float *__restrict__ ac = acc + g * J;
            float *__restrict__ o = A->out + (i0 + g) * A->O;
            for (int64_t k = 0; k < A->O; k++) o[k] = A->coef[0] * ac[k];
            for (int64_t s = 1; s < A->n_sub; s++) {
                const float c = A->coef[s];
                const float *__restrict__ as = ac + s * A->O;
                for (int64_t k = 0; k < A->O; k++) o[k] += c * as[k];
            }
        }
    }
}

static size_t up64(size_t n) { return (n + 63) / 64 * 64; }

#define FBODY(AP, HA, HB, QZ, SAT) {                                                           \
    const fargs_t *A_ = (AP);                                                                    \
    const int nthr_ = A_->n_threads;                                                             \
    int64_t kmax_ = 0;                                                                           \
    for (int64_t r_ = 0; r_ < A_->n_tiles; r_++)                                                 \
        if (A_->bounds[r_ + 1] - A_->bounds[r_] > kmax_) kmax_ = A_->bounds[r_ + 1] - A_->bounds[r_]; \
    const int64_t ps_ = (kmax_ + 64 + 63) / 64 * 64, os_ = A_->Jv * 16;                         \
    const int64_t xs_ = A_->conv ? (int64_t)up64(A_->conv[2] * A_->conv[3] * A_->conv[4] + 64) : 0; \
    const int64_t G_ = A_->T >= 8 ? 1 : 8 / A_->T;                                               \
    _Pragma("omp parallel num_threads(nthr_)")                                                  \
    {                                                                                            \
        const int nt_ = omp_get_num_threads(), id_ = omp_get_thread_num();                       \
        const int64_t groups_ = (A_->m + G_ - 1) / G_, per_ = (groups_ + nt_ - 1) / nt_;           \
        const int64_t b_ = id_ * per_ * G_, e0_ = (id_ + 1) * per_ * G_;                          \
        const int64_t e_ = e0_ < A_->m ? e0_ : A_->m;                                            \
        uint8_t *xbuf_ = aligned_alloc(64, xs_ ? 8 * xs_ : 64);                                  \
        uint8_t *pl_ = aligned_alloc(64, 8 * ps_);                                               \
        int32_t *part_ = aligned_alloc(64, up64(8 * os_ * sizeof(int32_t)));                     \
        float *acc_ = aligned_alloc(64, up64(8 * A_->J * sizeof(float)));                        \
        float *sg_ = aligned_alloc(64, up64(9 * A_->J * sizeof(float)));                         \
        if (b_ < e_) fused_rows(A_, b_, e_, xbuf_, xs_, pl_, ps_, part_, os_, acc_, sg_, HA, HB, QZ, SAT); \
        free(xbuf_); free(pl_); free(part_); free(acc_); free(sg_);                              \
    } }
#define FDRIVER(HA, HB, QZ) static void f_##HA##HB##QZ(const fargs_t *A) { FBODY(A, HA, HB, QZ, 0) }
FDRIVER(0,0,0) FDRIVER(0,0,1) FDRIVER(1,0,0) FDRIVER(1,0,1) FDRIVER(1,1,0) FDRIVER(1,1,1)
static void (*const fdrivers[8])(const fargs_t *) = {f_000, f_001, 0, 0, f_100, f_101, f_110, f_111};

int fused_available(void) { return 1; }

void fused_block(const uint8_t *x, int64_t m, int64_t row0, int64_t stride, const int64_t *conv,
                 int64_t n_tiles, const int64_t *bounds, const int8_t *wp, const int64_t *wp_off, int64_t Jv,
                 int64_t T, const int32_t *shifts, int32_t mask, int64_t J,
                 const float *scale, const float *shift, const float *step, const float *inv,
                 const float *tw, int quantize, float top,
                 const uint16_t *noise, const int64_t *noff, int64_t nblock, float sigma1, const float *sig_tab, int64_t tab_rows, float rn2, float s1sq,
                 const float *iv2, int sat_kind, float unit, const float *off, float vsat,
                 const float *cst, const float *coef, int64_t n_sub, float *out, int n_threads)
{
    int64_t *seg = 0;
    if (conv) {  /* offset of piece (kh, kw) from a patch origin */
        seg = malloc((size_t)(conv[2] * conv[3]) * sizeof(int64_t));
        for (int64_t kh = 0; kh < conv[2]; kh++)
            for (int64_t kw = 0; kw < conv[3]; kw++)
                seg[kh * conv[3] + kw] = (kh * conv[7] * conv[10] + kw * conv[8]) * conv[4];
    }
    fargs_t A = {x, m, row0, stride, conv, seg, n_tiles, bounds, wp, wp_off, Jv, T, shifts, mask, J,
                 scale, shift, step, inv, tw, top, noise, noff, nblock, sigma1, sig_tab, sig_tab ? tab_rows : 0, rn2, s1sq, iv2,
                 unit, off, vsat, cst, coef, n_sub, J / n_sub, out, n_threads};
    const int ha = noise != 0, hb = ha && iv2 != 0, qz = quantize != 0;
    if (sat_kind == 0) {
        fdrivers[(ha ? 4 : 0) | (hb ? 2 : 0) | (qz ? 1 : 0)](&A);
    } else if (sat_kind == 1) {
        FBODY(&A, ha, hb, qz, 1)
    } else {
        FBODY(&A, ha, hb, qz, 2)
    }
    free(seg);
}
#else
int fused_available(void) { return 0; }
void fused_block(void) {}
#endif
"""

# -fno-trapping-math lets floorf vectorise (we never enable FP traps)
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fno-trapping-math", "-fno-math-errno", "-fopenmp", "-fPIC", "-shared"]
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
        lib.adc_accumulate.argtypes = [p, i32, i64, i64, i64, i64, p, p, p, p, p, i32, flt, p, flt, p,
                                       i32, flt, p, flt, p, p, i64, p, i32]
        lib.adc_accumulate.restype = None
        lib.planes_tiled.argtypes = [p, i64, i64, i64, p, i64, p, i64, ctypes.c_int32, p, p, i32]
        lib.planes_tiled.restype = None
        lib.or_reduce.argtypes = [p, i64, i64, i64, i32]
        lib.or_reduce.restype = ctypes.c_int32
        lib.fused_available.argtypes = []
        lib.fused_available.restype = i32
        lib.fused_block.argtypes = [p, i64, i64, i64, p, i64, p, p, p, i64, i64, p, ctypes.c_int32, i64,
                                    p, p, p, p, p, i32, flt, p, p, i64, flt, p, i64, flt, flt, p, i32, flt, p, flt,
                                    p, p, i64, p, i32]
        lib.fused_block.restype = None
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
                 want_sq: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(planes, row_sq): int8 bit-planes, array-major (see SOURCE), and (n_tiles, T m) sums of plane^2."""
    assert x.dtype == torch.uint8 and x.dim() == 2 and x.stride(1) == 1
    assert bounds.dtype == torch.int64 and shifts.dtype == torch.int32
    m, k = x.shape
    n_tiles, n_emit = bounds.numel() - 1, shifts.numel()
    out = torch.empty(n_emit * m * k, dtype=torch.int8)
    sq = torch.empty(n_tiles, n_emit * m, dtype=torch.float32) if want_sq else None
    lib.planes_tiled(x.data_ptr(), m, k, x.stride(0), bounds.data_ptr(), n_tiles, shifts.data_ptr(), n_emit,
                     mask, out.data_ptr(), _ptr(sq), _threads())
    return out, sq


def adc_accumulate(
    lib: ctypes.CDLL,
    partial: torch.Tensor,  # (n_tiles, T m, J) int32 / float32, contiguous
    n_cycles: int,
    scale: torch.Tensor, shift: torch.Tensor, step: torch.Tensor, inv: torch.Tensor,  # (n_tiles, J) f32
    cycle_w: torch.Tensor,  # (T,) f32
    top: float | None,
    noise: torch.Tensor | None,  # (m n_tiles T J,) f32, row-major (see SOURCE)
    sigma1: float,
    sigma: torch.Tensor | None,  # (n_tiles, T m, J) f32 per-conversion sigma (read noise), or sigma1
    saturation: str | None, unit: float, offset: torch.Tensor, v_sat: float,
    const: torch.Tensor, coef: torch.Tensor,  # (J,), (n_sub,) f32
    out: torch.Tensor,  # (m, O) f32, contiguous rows: written
) -> None:
    """out[i, o] = sum_s coef[s] (const + sum over arrays of step * sum over cycles of weight * code)[i, s O + o]."""
    n_tiles, rows, j = partial.shape
    m = rows // n_cycles
    for t in (partial, scale, shift, step, inv, cycle_w, offset, noise, sigma, const, coef, out):
        assert t is None or t.is_contiguous()
    assert noise is None or (noise.dtype == torch.float32 and noise.numel() == partial.numel())
    assert sigma is None or sigma.shape == partial.shape
    assert out.shape == (m, j // coef.numel()) and out.dtype == torch.float32
    lib.adc_accumulate(
        partial.data_ptr(), int(partial.dtype == torch.float32), n_tiles, n_cycles, m, j,
        scale.data_ptr(), shift.data_ptr(), step.data_ptr(), inv.data_ptr(), cycle_w.data_ptr(),
        int(top is not None), float(top or 0.0), _ptr(noise), float(sigma1), _ptr(sigma),
        {None: 0, "exp": 1, "tanh": 2}[saturation], float(unit), offset.data_ptr(), float(v_sat),
        const.data_ptr(), coef.data_ptr(), coef.numel(), out.data_ptr(), _threads(),
    )


def fused_available(lib: ctypes.CDLL | None) -> bool:
    """Whether the kernel was built with the fused AVX-512 VNNI array pass."""
    return lib is not None and bool(lib.fused_available())


def pack_weights(weights: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(packed, offsets, Jv): int8 (R, J) array weights in the fused kernel's vpdpbusd layout."""
    j = weights[0].shape[1]
    jv = -(-j // 16)
    parts, offsets, at = [], [], 0
    for w in weights:
        r = w.shape[0]
        n4 = -(-r // 4)
        pad = torch.zeros(n4 * 4, jv * 16, dtype=torch.int8)
        pad[:r, :j] = w
        parts.append(pad.view(n4, 4, jv, 16).permute(0, 2, 3, 1).reshape(-1))
        offsets.append(at)
        at += parts[-1].numel()
    return torch.cat(parts).contiguous(), torch.tensor(offsets, dtype=torch.int64), jv


def fused_block(
    lib: ctypes.CDLL,
    x: torch.Tensor,  # (M, K) uint8 rows with unit column stride, or the padded NHWC input (conv)
    m: int,
    conv: torch.Tensor | None,  # int64 (OH, OW, KH, KW, C, SH, SW, DH, DW, Hp, Wp) or None
    bounds: torch.Tensor, packed: torch.Tensor, offsets: torch.Tensor, jv: int,
    shifts: torch.Tensor, mask: int, j: int,
    scale: torch.Tensor, shift: torch.Tensor, step: torch.Tensor, inv: torch.Tensor,  # (n_tiles, J) f32
    cycle_w: torch.Tensor, top: float | None,
    noise: tuple[torch.Tensor, torch.Tensor, int] | None,  # (float16 samples, int64 block offsets, block rows)
    sigma1: float,
    read_noise: tuple[torch.Tensor | None, float, float, torch.Tensor] | None,  # (table, rn2, s1sq, inv^2)
    saturation: str | None, unit: float, offset: torch.Tensor, v_sat: float,
    const: torch.Tensor, coef: torch.Tensor, out: torch.Tensor,
    row0: int = 0,
) -> None:
    """out (m, O) = the array pass of patch rows row0..row0+m: planes, int8 GEMM, ADC, shift-and-add.

    Noise samples of row i (counted from row0) start at ``samples[offs[i // block] + (i % block) n_tiles T J]``.
    """
    assert x.dtype == torch.uint8 and x.stride(-1) == 1 and packed.dtype == torch.int8
    assert bounds.dtype == torch.int64 and shifts.dtype == torch.int32 and offsets.dtype == torch.int64
    n_tiles, t = bounds.numel() - 1, shifts.numel()
    table, rn2, s1sq, iv2 = read_noise if read_noise is not None else (None, 0.0, 0.0, None)
    samples, noff, block = noise if noise is not None else (None, None, 1)
    for ten in (packed, scale, shift, step, inv, cycle_w, offset, samples, noff, const, coef, out, conv, table, iv2):
        assert ten is None or ten.is_contiguous()
    if samples is not None:
        assert noff is not None and samples.dtype == torch.float16 and noff.dtype == torch.int64
        per_row = n_tiles * t * j
        n_blocks = -(-m // block)
        assert noff.numel() >= n_blocks
        rows = (m - block * torch.arange(n_blocks)).clamp(max=block)
        first = noff[:n_blocks]  # every block's samples lie inside the sample tensor
        assert bool(((first >= 0) & (first + rows * per_row <= samples.numel())).all())
    assert read_noise is None or noise is not None
    assert table is None or (table.dim() == 3 and table.shape[0] == n_tiles and table.shape[2] == j)
    assert out.shape == (m, j // coef.numel()) and out.dtype == torch.float32
    if conv is None:
        assert x.dim() == 2 and x.shape[0] >= row0 + m
    else:
        assert conv.dtype == torch.int64 and conv.numel() == 11 and x.is_contiguous()
        assert row0 + m <= x.shape[0] * int(conv[0]) * int(conv[1])
    lib.fused_block(
        x.data_ptr(), m, row0, x.stride(0) if conv is None else 0, _ptr(conv), n_tiles, bounds.data_ptr(),
        packed.data_ptr(), offsets.data_ptr(), jv, t, shifts.data_ptr(), mask, j,
        scale.data_ptr(), shift.data_ptr(), step.data_ptr(), inv.data_ptr(), cycle_w.data_ptr(),
        int(top is not None), float(top or 0.0), _ptr(samples), _ptr(noff), int(block), float(sigma1),
        _ptr(table), 0 if table is None else table.shape[1], float(rn2), float(s1sq), _ptr(iv2),
        {None: 0, "exp": 1, "tanh": 2}[saturation], float(unit), offset.data_ptr(), float(v_sat),
        const.data_ptr(), coef.data_ptr(), coef.numel(), out.data_ptr(), _threads(),
    )

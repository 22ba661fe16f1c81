/* Array-pass kernels for AVX2 CPUs without AVX-512 VNNI (built with -mavx2 -mfma -mf16c).
 *
 * One-bit planes (bit-serial inputs, binary activations) x weights by table lookup: per group of 4
 * rows the 16 subset sums of the weights are precomputed (int16, layout 2), so 4 rows x 16 columns
 * cost one vpaddw with a memory operand; groups whose 4 plane bits are all zero are skipped.
 * Wider planes x weights by vpmaddubsw: u8 planes x s8 weights, adjacent pairs summed into int16 (32
 * products per instruction); the int16 sums are accumulated while they provably stay below 2^15
 * (lim16 rows per lane, from the layer's largest plane and weight) and then widened to int32 by
 * vpmaddwd against ones, which also adds each lane's two halves: a column's exact partial sum.
 * Weights use the VNNI layout (4 rows x 16 columns per 64 bytes), read as two 8-column halves.
 * The ADC runs on 8 conversions per vector, the tail of a row in scalar code. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#define ISA_NAME "avx2"
#define ISA_HAS_ADC_LINEAR 1
#define ISA_WEIGHT_LAYOUT(mask) ((mask) == 1 ? 2 : 0)

static inline __attribute__((always_inline)) void isa_copy(uint8_t *dst, const uint8_t *src, int64_t n)
{
    memcpy(dst, src, (size_t)n);
}

/* one plane, zero-padded to a multiple of 32 bytes; sum of squares for read noise */
static inline __attribute__((always_inline)) int32_t isa_cut(const uint8_t *xi, int64_t R, int s, int32_t mask,
                                                             uint8_t *o, const int want_sq)
{
    const uint8_t mb = (uint8_t)(mask & (0xFF >> s));
    const __m256i msk = _mm256_set1_epi8((char)mb);
    const __m128i cnt = _mm_cvtsi32_si128(s);
    __m256i sq = _mm256_setzero_si256();
    int32_t total = 0;
    int64_t k = 0;
    for (; k + 32 <= R; k += 32) {  /* bytes shifted as 16-bit lanes: keep the bits of the same byte */
        const __m256i v = _mm256_and_si256(_mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)(xi + k)), cnt), msk);
        _mm256_storeu_si256((__m256i *)(o + k), v);
        if (want_sq) {
            const __m256i lo = _mm256_cvtepu8_epi16(_mm256_castsi256_si128(v));
            const __m256i hi = _mm256_cvtepu8_epi16(_mm256_extracti128_si256(v, 1));
            sq = _mm256_add_epi32(sq, _mm256_add_epi32(_mm256_madd_epi16(lo, lo), _mm256_madd_epi16(hi, hi)));
        }
    }
    for (int64_t e = k + 32; k < e; k++) {
        const int32_t v = k < R ? (xi[k] >> s) & mb : 0;
        o[k] = (uint8_t)v;
        total += v * v;
    }
    if (!want_sq) return 0;
    const __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sq), _mm256_extracti128_si256(sq, 1));
    const __m128i s2 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    return total + _mm_cvtsi128_si32(_mm_add_epi32(s2, _mm_shuffle_epi32(s2, 0xB1)));
}

/* P plane-rows x C column halves (8 columns each, starting at half h0): int16 sums over chunks of
   glim 4-row groups, widened into o */
static inline __attribute__((always_inline)) void mk(const uint8_t *pl, int64_t ps, const int8_t *w, int64_t n4,
                                                     int64_t Jv, int64_t h0, int64_t glim, int32_t *o, int64_t os,
                                                     const int P, const int C)
{
    const __m256i ones = _mm256_set1_epi16(1);
    for (int64_t g0 = 0; g0 < n4; g0 += glim) {
        const int64_t g1 = n4 - g0 < glim ? n4 : g0 + glim;
        __m256i acc[4][3];
        #pragma GCC unroll 4
        for (int p = 0; p < P; p++) {
            #pragma GCC unroll 3
            for (int c = 0; c < C; c++) acc[p][c] = _mm256_setzero_si256();
        }
        const int8_t *wg = w + g0 * Jv * 64 + h0 * 32;
        for (int64_t g = g0; g < g1; g++, wg += Jv * 64) {
            __m256i wv[3];
            #pragma GCC unroll 3
            for (int c = 0; c < C; c++) wv[c] = _mm256_loadu_si256((const __m256i *)(wg + 32 * c));
            #pragma GCC unroll 4
            for (int p = 0; p < P; p++) {
                int32_t xv;
                memcpy(&xv, pl + p * ps + 4 * g, 4);
                const __m256i xb = _mm256_set1_epi32(xv);
                #pragma GCC unroll 3
                for (int c = 0; c < C; c++) acc[p][c] = _mm256_add_epi16(acc[p][c], _mm256_maddubs_epi16(xb, wv[c]));
            }
        }
        #pragma GCC unroll 4
        for (int p = 0; p < P; p++) {
            #pragma GCC unroll 3
            for (int c = 0; c < C; c++) {
                __m256i *dst = (__m256i *)(o + p * os + (h0 + c) * 8);
                const __m256i wide = _mm256_madd_epi16(acc[p][c], ones);
                _mm256_storeu_si256(dst, g0 == 0 ? wide : _mm256_add_epi32(_mm256_loadu_si256(dst), wide));
            }
        }
    }
}

#define MK_CASES(C_)                                                                        \
    switch (P) {                                                                            \
    case 1: mk(pl + p0 * ps, ps, w, n4, Jv, h, glim, o + p0 * os, os, 1, C_); break;        \
    case 2: mk(pl + p0 * ps, ps, w, n4, Jv, h, glim, o + p0 * os, os, 2, C_); break;        \
    case 3: mk(pl + p0 * ps, ps, w, n4, Jv, h, glim, o + p0 * os, os, 3, C_); break;        \
    default: mk(pl + p0 * ps, ps, w, n4, Jv, h, glim, o + p0 * os, os, 4, C_); break;       \
    }

/* One plane-row of one-bit planes x C vectors of 16 columns (from vector c0) by lookup of the
   4-row subset sums L[g][pat] (layout 2); int16 sums over chunks of glim groups (lim16 rows),
   widened into o. */
static inline __attribute__((always_inline)) void lut_row(const uint8_t *x, const int16_t *L, int64_t n4, int64_t Jp,
                                                          int64_t glim, int64_t c0, int32_t *o, const int C)
{
  for (int64_t g0 = 0; g0 < n4; g0 += glim) {
    const int64_t g1 = n4 - g0 < glim ? n4 : g0 + glim;
    __m256i acc[12];
    #pragma GCC unroll 12
    for (int c = 0; c < C; c++) acc[c] = _mm256_setzero_si256();
    const int16_t *Lc = L + c0 * 16;
    for (int64_t g = g0; g < g1; g++) {
        uint32_t v;
        memcpy(&v, x + 4 * g, 4);
        if (!v) continue;
        const uint32_t pat = (v * 0x08040201u) >> 24 & 15;  /* bytes b0..b3 in {0, 1} -> b0 b1 b2 b3 (MSB first) */
        const __m256i *row = (const __m256i *)(Lc + (g * 16 + pat) * Jp);
        #pragma GCC unroll 12
        for (int c = 0; c < C; c++) acc[c] = _mm256_add_epi16(acc[c], _mm256_loadu_si256(row + c));
    }
    #pragma GCC unroll 12
    for (int c = 0; c < C; c++) {
        __m256i *dst = (__m256i *)(o + (c0 + c) * 16);
        __m256i lo = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc[c]));
        __m256i hi = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc[c], 1));
        if (g0) {
            lo = _mm256_add_epi32(lo, _mm256_loadu_si256(dst));
            hi = _mm256_add_epi32(hi, _mm256_loadu_si256(dst + 1));
        }
        _mm256_storeu_si256(dst, lo);
        _mm256_storeu_si256(dst + 1, hi);
    }
  }
}

#define LUT_CASE(C_) case C_: lut_row(pl + p * ps, L, n4, Jp, glim4, c, o + p * os, C_); break;

/* partial sums o[p, 0:16 Jv] (row stride os) of Pn <= 8 plane-rows against one packed array */
static void isa_gemm(const uint8_t *pl, int64_t ps, int Pn, const int8_t *w, int64_t R, int64_t Jv, int64_t lim16,
                     int32_t mask, int32_t *o, int64_t os, void *scratch)
{
    (void)scratch;
    const int64_t n4 = (R + 3) / 4, nh = 2 * Jv;
    if (mask == 1) {  /* layout 2 */
        const int16_t *L = (const int16_t *)w;
        const int64_t glim4 = lim16 / 4 > 0 ? lim16 / 4 : 1;  /* each int16 lane takes four rows per group */
        const int64_t Jp = 16 * Jv, passes = (Jv + 7) / 8;
        for (int64_t k = 0, c = 0; k < passes; k++) {  /* column vectors in passes of at most 8, as even as possible */
            const int C = (int)((Jv - c) / (passes - k));
            for (int p = 0; p < Pn; p++) {
                switch (C) {
                LUT_CASE(1) LUT_CASE(2) LUT_CASE(3) LUT_CASE(4) LUT_CASE(5) LUT_CASE(6) LUT_CASE(7) default: LUT_CASE(8)
                }
            }
            c += C;
        }
        return;
    }
    const int64_t glim = lim16 / 2;  /* each int16 lane takes two rows per group */
    for (int p0 = 0; p0 < Pn; p0 += 4) {
        const int P = Pn - p0 < 4 ? Pn - p0 : 4;
        int64_t h = 0;  /* column halves in passes of 3 (12 accumulators), ending 2 + 2 rather than 3 + 1 */
        for (; nh - h > 4 || nh - h == 3; h += 3) MK_CASES(3)
        for (; nh - h >= 2; h += 2) MK_CASES(2)
        if (nh - h == 1) { MK_CASES(1) }
    }
}

/* the ADC of one row on one array (no saturation): 8 conversions per vector, scalar tail */
static inline __attribute__((always_inline)) void isa_adc_linear(
    const int32_t *part, int64_t os, int64_t T, int64_t J, const float *sc, const float *sh, const float *st,
    const float *tw, const uint16_t *nrow, const float *const *sgrow, float s1, float top, float *tmp, float *ac,
    const int HA, const int HB, const int QZ)
{
    (void)tmp;
    const __m256 zero = _mm256_setzero_ps(), topv = _mm256_set1_ps(top), s1v = _mm256_set1_ps(s1);
    int64_t j = 0;
    for (; j + 8 <= J; j += 8) {
        const __m256 scv = _mm256_loadu_ps(sc + j), shv = _mm256_loadu_ps(sh + j);
        __m256 tacc = zero;
        for (int64_t t = 0; t < T; t++) {
            const __m256i pv = _mm256_loadu_si256((const __m256i *)(part + t * os + j));
            __m256 u = _mm256_fmadd_ps(_mm256_cvtepi32_ps(pv), scv, shv);
            if (HA) {
                const __m256 nv = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(nrow + t * J + j)));
                const __m256 sgv = HB ? _mm256_loadu_ps(sgrow[t] + j) : s1v;
                u = _mm256_fmadd_ps(sgv, nv, u);
            }
            if (QZ) u = _mm256_min_ps(_mm256_max_ps(_mm256_floor_ps(u), zero), topv);
            tacc = _mm256_fmadd_ps(_mm256_set1_ps(tw[t]), u, tacc);
        }
        _mm256_storeu_ps(ac + j, _mm256_fmadd_ps(_mm256_loadu_ps(st + j), tacc, _mm256_loadu_ps(ac + j)));
    }
    for (; j < J; j++) {
        float tacc = 0.0f;
        for (int64_t t = 0; t < T; t++) {
            float u = fmaf((float)part[t * os + j], sc[j], sh[j]);
            if (HA) u = fmaf(HB ? sgrow[t][j] : s1, _cvtsh_ss(nrow[t * J + j]), u);
            if (QZ) {
                u = floorf(u);
                u = u < 0.0f ? 0.0f : (u > top ? top : u);
            }
            tacc = fmaf(tw[t], u, tacc);
        }
        ac[j] = fmaf(st[j], tacc, ac[j]);
    }
}

#include "cim_common.h"

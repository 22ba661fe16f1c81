/* Array-pass kernels for AVX-512 VNNI CPUs (built with -mavx512f -mavx512bw -mavx512vl -mavx512vnni
 * -mf16c -mfma). Planes x weights by vpdpbusd: u8 planes x s8 weights -> exact s32 partial sums,
 * 64 products per instruction; the ADC on 16 conversions per vector, tails by mask. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define ISA_NAME "vnni"
#define ISA_HAS_ADC_LINEAR 1
#define ISA_WEIGHT_LAYOUT(mask) 0

static inline __attribute__((always_inline)) void isa_copy(uint8_t *dst, const uint8_t *src, int64_t n)
{
    for (int64_t c = 0; c < n; c += 64) {
        const __mmask64 lm = n - c >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (n - c)) - 1);
        _mm512_mask_storeu_epi8(dst + c, lm, _mm512_maskz_loadu_epi8(lm, src + c));
    }
}

/* one plane, zero-padded to a multiple of 64 bytes; sum of squares for read noise */
static inline __attribute__((always_inline)) int32_t isa_cut(const uint8_t *xi, int64_t R, int s, int32_t mask,
                                                             uint8_t *o, const int want_sq)
{
    /* bytes shifted as 16-bit lanes: keep only bits that came from the same byte */
    const __m512i msk = _mm512_set1_epi8((char)(mask & (0xFF >> s)));
    const __m128i cnt = _mm_cvtsi32_si128(s);
    __m512i sq = _mm512_setzero_si512();
    int64_t ones = 0;
    for (int64_t k = 0; k < R; k += 64) {
        const __mmask64 lm = R - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (R - k)) - 1);
        const __m512i v = _mm512_and_si512(_mm512_srl_epi16(_mm512_maskz_loadu_epi8(lm, xi + k), cnt), msk);
        _mm512_storeu_si512(o + k, v);
        if (want_sq && mask == 1) {  /* one-bit planes: sum x^2 = number of ones */
            ones += __builtin_popcountll(_mm512_test_epi8_mask(v, v));
        } else if (want_sq) {
            const __m512i lo = _mm512_cvtepu8_epi16(_mm512_castsi512_si256(v));
            const __m512i hi = _mm512_cvtepu8_epi16(_mm512_extracti64x4_epi64(v, 1));
            sq = _mm512_add_epi32(sq, _mm512_add_epi32(_mm512_madd_epi16(lo, lo), _mm512_madd_epi16(hi, hi)));
        }
    }
    if (!want_sq) return 0;
    return mask == 1 ? (int32_t)ones : _mm512_reduce_add_epi32(sq);
}

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
static void isa_gemm(const uint8_t *pl, int64_t ps, int P, const int8_t *w, int64_t R, int64_t Jv, int64_t lim16,
                     int32_t mask, int32_t *o, int64_t os, void *scratch)
{
    (void)lim16; (void)scratch; (void)mask;
    const int64_t n4 = (R + 3) / 4;
    int64_t q = 0;  /* column vectors in passes of 3 (24 accumulators), ending 2 + 2 rather than 3 + 1 */
    for (; Jv - q > 4 || Jv - q == 3; q += 3) MK_CASES(3)
    for (; Jv - q >= 2; q += 2) MK_CASES(2)
    if (Jv - q == 1) { MK_CASES(1) }
}

static inline __attribute__((always_inline)) __mmask16 tail16(int64_t left)
{
    return left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1);
}

/* the ADC of one row on one array (no saturation): 16 conversions per vector */
static inline __attribute__((always_inline)) void isa_adc_linear(
    const int32_t *part, int64_t os, int64_t T, int64_t J, const float *sc, const float *sh, const float *st,
    const float *tw, const uint16_t *nrow, const float *const *sgrow, float s1, float top, float *tmp, float *ac,
    const int HA, const int HB, const int QZ)
{
    (void)tmp;
    for (int64_t j = 0; j < J; j += 16) {
        const __mmask16 km = tail16(J - j);
        const __m512 scv = _mm512_maskz_loadu_ps(km, sc + j), shv = _mm512_maskz_loadu_ps(km, sh + j);
        __m512 tacc = _mm512_setzero_ps();
        for (int64_t t = 0; t < T; t++) {
            const __m512i pv = _mm512_loadu_si512(part + t * os + j);
            __m512 u = _mm512_fmadd_ps(_mm512_cvtepi32_ps(pv), scv, shv);
            if (HA) {
                const __m512 nv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(km, nrow + t * J + j));
                const __m512 sgv = HB ? _mm512_maskz_loadu_ps(km, sgrow[t] + j) : _mm512_set1_ps(s1);
                u = _mm512_fmadd_ps(sgv, nv, u);
            }
            if (QZ) u = _mm512_min_ps(_mm512_max_ps(_mm512_roundscale_ps(u, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC),
                                                    _mm512_setzero_ps()), _mm512_set1_ps(top));
            tacc = _mm512_fmadd_ps(_mm512_set1_ps(tw[t]), u, tacc);
        }
        _mm512_mask_storeu_ps(ac + j, km, _mm512_fmadd_ps(_mm512_maskz_loadu_ps(km, st + j), tacc,
                                                         _mm512_maskz_loadu_ps(km, ac + j)));
    }
}

#include "cim_common.h"

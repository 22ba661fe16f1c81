/* Array-pass kernels in plain C for any CPU (aarch64 included): built with -O3 and no instruction-set
 * flags, so they rely on the compiler's auto-vectorisation (SSE2 on x86-64, NEON on aarch64).
 *
 * One-bit planes x weights by table lookup (layout 2: per group of 4 rows the 16 subset sums of the
 * weights), one int16 add per 4 rows and column; groups whose 4 plane bits are zero are skipped.
 * Wider planes row by row against row-major int16 weights (layout 1), zero plane bytes skipped.
 * Column loops accumulate in int16 for up to lim16 rows (no overflow: see cim_common.h), then
 * widen to int32. */
#include <stdint.h>
#include <string.h>

#define ISA_NAME "portable"
#define ISA_WEIGHT_LAYOUT(mask) ((mask) == 1 ? 2 : 1)

static inline __attribute__((always_inline)) void isa_copy(uint8_t *dst, const uint8_t *src, int64_t n)
{
    memcpy(dst, src, (size_t)n);
}

/* one plane, zero-padded to a multiple of 4 bytes; sum of squares for read noise */
static inline __attribute__((always_inline)) int32_t isa_cut(const uint8_t *xi, int64_t R, int s, int32_t mask,
                                                             uint8_t *o, const int want_sq)
{
    int32_t sq = 0;
    for (int64_t k = 0; k < R; k++) {
        const uint8_t v = (uint8_t)((xi[k] >> s) & mask);
        o[k] = v;
        sq += (int32_t)v * v;
    }
    for (int64_t k = R; k < (R + 3) / 4 * 4; k++) o[k] = 0;  /* whole 4-row groups for the lookup */
    return want_sq ? sq : 0;
}

static void isa_gemm(const uint8_t *pl, int64_t ps, int P, const int8_t *w, int64_t R, int64_t Jv, int64_t lim16,
                     int32_t mask, int32_t *o, int64_t os, void *scratch)
{
    const int64_t Jp = 16 * Jv, n4 = (R + 3) / 4;
    const int16_t *W = (const int16_t *)w;
    int16_t *__restrict__ a16 = (int16_t *)scratch;
    for (int p = 0; p < P; p++) {
        const uint8_t *__restrict__ x = pl + p * ps;
        int32_t *__restrict__ op = o + p * os;
        memset(a16, 0, (size_t)Jp * sizeof(int16_t));
        memset(op, 0, (size_t)Jp * sizeof(int32_t));
        if (mask == 1) {  /* layout 2: four rows per group and lane */
            const int64_t glim = lim16 / 4 > 0 ? lim16 / 4 : 1;
            for (int64_t g0 = 0; g0 < n4; g0 += glim) {
                const int64_t g1 = n4 - g0 < glim ? n4 : g0 + glim;
                for (int64_t g = g0; g < g1; g++) {
                    const int pat = x[4 * g] << 3 | x[4 * g + 1] << 2 | x[4 * g + 2] << 1 | x[4 * g + 3];
                    if (!pat) continue;
                    const int16_t *__restrict__ row = W + (g * 16 + pat) * Jp;
                    for (int64_t j = 0; j < Jp; j++) a16[j] = (int16_t)(a16[j] + row[j]);
                }
                for (int64_t j = 0; j < Jp; j++) {
                    op[j] += a16[j];
                    a16[j] = 0;
                }
            }
            continue;
        }
        for (int64_t k0 = 0; k0 < R; k0 += lim16) {
            const int64_t k1 = R - k0 < lim16 ? R : k0 + lim16;
            for (int64_t k = k0; k < k1; k++) {
                const int16_t xv = x[k];
                if (!xv) continue;
                const int16_t *__restrict__ wk = W + k * Jp;
                for (int64_t j = 0; j < Jp; j++) a16[j] = (int16_t)(a16[j] + xv * wk[j]);
            }
            for (int64_t j = 0; j < Jp; j++) {
                op[j] += a16[j];
                a16[j] = 0;
            }
        }
    }
}

#include "cim_common.h"

/* Array-pass kernels of the simulated in-memory backends: the parts every instruction set shares.
 *
 * Each of cim_vnni.c, cim_avx2.c and cim_portable.c defines its instruction-set hooks and then
 * includes this header, which builds the exported functions on top of them:
 *
 *   fused_block     the whole array pass of a layer in one call: per group of patch rows, cut the
 *                   bit-planes into an L1 buffer (conv patches read from the padded NHWC input),
 *                   multiply them with the arrays' packed int8 weights (exact int32 partial sums,
 *                   never written to memory), put every partial sum through the ADC (scale and
 *                   shift, bit-line saturation, noise, floor, clamp) and shift-and-add.
 *   adc_accumulate  the same ADC arithmetic over a block of partial sums that a GEMM (float, for
 *                   layers whose weights are not int8) has already written.
 *   or_reduce       which input bits occur at all (all-zero planes are skipped).
 *
 * Hooks (static functions of the including file):
 *   ISA_NAME                                   "vnni" | "avx2" | "portable"
 *   isa_cut(xi, R, s, mask, out, want_sq)      plane (xi[k] >> s) & mask for k < R into out, zero
 *                                              up to a multiple of 4 (more is fine); returns
 *                                              sum_k plane^2 when want_sq (read noise), else 0
 *   isa_gemm(pl, ps, P, w, R, Jv, lim16, mask, o, os, scratch)
 *                                              o[p, 0:16 Jv] = plane-row p (of P) x array weights
 *   isa_adc_linear(...)                        the ADC of one row on one array without saturation
 *                                              (with ISA_HAS_ADC_LINEAR; else the plain-C adc_plain)
 *   ISA_WEIGHT_LAYOUT(mask)                    how the caller packs each array's weights for planes
 *                                              of `mask` (J columns padded to 16 Jv, rows to 4 n4):
 *     0  int8 [n4][Jv][16][4]: byte b of lane l of vector q in group g = W[4 g + b, 16 q + l]
 *     1  int16 [R][16 Jv]: row-major
 *     2  int16 [n4][16][16 Jv]: per group of 4 rows, the 16 subset sums of one-bit planes,
 *        entry [g][pat][j] = sum_b W[4 g + b, j] ((pat >> (3 - b)) & 1)  (lookup instead of multiply)
 * lim16: rows whose |plane x weight| products may be summed in int16 without overflow
 * (32767 / (max plane * max |w|), at least 2), for kernels that accumulate in int16.
 *
 * Noise model shared by every path: each conversion gets one N(0, 1) sample n (float16; row-major
 * per block of rows: idx = ((i n_tiles + r) T + t) J + j) scaled by its sigma in LSB,
 *     sigma = sqrt(s1sq + (rn2 sq) inv^2)  (ADC noise and read noise, independent Gaussians),
 * with sq = sum_k plane^2 over the array's rows; sigma = sigma1 without read noise.
 *
 * ADC of one conversion with partial sum P (GEMM units):
 *     u = sat ? sat(P unit + off) inv + shift : P scale + shift;   u += sigma n;
 *     q = quantize ? floor(clamp(u, 0, top)) : u   (= clamp(floor(u), 0, top): 0 and top are codes)
 * codes are summed over cycles with weights tw[t], times the array's step, over arrays; then
 * out[i, o] = sum_s coef[s] acc[s O + o]. The torch path (engine.py) does the same arithmetic;
 * results differ from it by float rounding only (and equal it exactly at ideal settings, where
 * every value is an integer below 2^24).
 */
#ifndef EDGECLOUD_CIM_COMMON_H
#define EDGECLOUD_CIM_COMMON_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#ifndef EC_SOURCE_HASH
#define EC_SOURCE_HASH "unknown"
#endif

#define EC_INLINE static inline __attribute__((always_inline))

/* ---- scalar helpers that vectorise (no library calls, no branches) -------------------------- */

/* float16 bits -> float, exact for finite values (normals and subnormals) */
EC_INLINE float ec_h2f(uint16_t h)
{
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)(h & 0x7FFF) << 13;
    v.f *= 0x1p112f;
    v.u |= (uint32_t)(h & 0x8000) << 16;
    return v.f;
}

/* expm1(x) for x <= 0, within ~1 ulp: x = n ln2 + r (Cody-Waite), expm1 = 2^n expm1(r) + 2^n - 1 */
EC_INLINE float ec_expm1_neg(float x)
{
    x = x < -87.0f ? -87.0f : x;                              /* expm1(-87) rounds to -1 */
    const int32_t n = -(int32_t)(-x * 1.44269504088896341f + 0.5f);
    const float nf = (float)n;
    const float r = (x - nf * 0.693145751953125f) - nf * 1.428606765330187045e-06f;
    const float p = r + r * r * (0.5f + r * (1.0f / 6 + r * (1.0f / 24 + r * (1.0f / 120 + r * (1.0f / 720 + r * (1.0f / 5040))))));
    union { uint32_t u; float f; } two;
    two.u = (uint32_t)(n + 127) << 23;
    return two.f * p + (two.f - 1.0f);
}

/* bit-line saturation of an analog value y: 1 = V (1 - exp(-y / V)) (odd), 2 = V tanh(y / V) */
EC_INLINE float ec_saturate(float y, float vsat, const int kind)
{
    const float a = y < 0.0f ? -y : y, sgn = y < 0.0f ? -1.0f : 1.0f;
    if (kind == 1) return -sgn * vsat * ec_expm1_neg(-a / vsat);
    const float e = ec_expm1_neg(-2.0f * a / vsat);           /* tanh(z) = -e / (e + 2), e = expm1(-2 z) */
    return sgn * vsat * (-e / (e + 2.0f));
}

/* q = floor(clamp(u, 0, top)): truncation is floor on [0, top] */
EC_INLINE float ec_quantize(float u, float top)
{
    u = u < 0.0f ? 0.0f : u;
    u = u > top ? top : u;
    return (float)(int32_t)u;
}

/* ---- bitwise OR of all m x K bytes ----------------------------------------------------------- */
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

const char *kernel_isa(void) { return ISA_NAME; }
const char *kernel_source_hash(void) { return EC_SOURCE_HASH; }

/* ---- ADC + shift-and-add over materialised partial sums -------------------------------------
   acc[i, j] = const[j] + sum_r step[r, j] * sum_t tw[t] * q(r, t, i, j); P and sig are
   (n_tiles, T, m, J), P int32 or float32; n1 the samples as float32, row-major as above.
   The flags are compile-time constants in each specialised driver, so the j loop vectorises. */
typedef struct {
    const void *P; int64_t n_tiles, T, m, J;
    const float *scale, *shift, *step, *inv, *tw; float top;
    const float *n1; float sigma1; const float *sig;
    float unit; const float *off; float vsat;
    const float *cst, *coef; int64_t n_sub, O;
    float *out; int n_threads;
} args_t;

EC_INLINE void shift_add_out(const float *__restrict__ acc, const float *coef, int64_t n_sub, int64_t O,
                             float *__restrict__ o)
{
    for (int64_t k = 0; k < O; k++) o[k] = coef[0] * acc[k];
    for (int64_t s = 1; s < n_sub; s++) {
        const float c = coef[s];
        const float *__restrict__ as = acc + s * O;
        for (int64_t k = 0; k < O; k++) o[k] += c * as[k];
    }
}

EC_INLINE void acc_row(const args_t *A, const int64_t i, float *__restrict__ acc, float *__restrict__ tacc,
                       const int ISF, const int HA, const int HB, const int QZ, const int SAT)
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
                float u = SAT ? ec_saturate(p * unit + of[j], vsat, SAT) * iv[j] + sh[j] : p * sc[j] + sh[j];
                if (HB) u += sg[j] * a[j];
                else if (HA) u += s1 * a[j];
                if (QZ) u = ec_quantize(u, top);
                tacc[j] += w * u;
            }
        }
        for (int64_t j = 0; j < J; j++) acc[j] += st[j] * tacc[j];
    }
    shift_add_out(acc, A->coef, A->n_sub, A->O, A->out + i * A->O);
}

#define EC_ACC_BODY(AP, ISF, HA, HB, QZ, SAT) {                                               \
    const args_t *A_ = (AP); const int nthr_ = A_->n_threads; const int64_t m_ = A_->m;      \
    _Pragma("omp parallel num_threads(nthr_)")                                               \
    {                                                                                         \
        float *acc_ = (float *)malloc(2 * A_->J * sizeof(float));                             \
        _Pragma("omp for schedule(static)")                                                   \
        for (int64_t i = 0; i < m_; i++) acc_row(A_, i, acc_, acc_ + A_->J, ISF, HA, HB, QZ, SAT); \
        free(acc_);                                                                           \
    } }
#define EC_ACC_DRIVER(ISF, HA, HB, QZ, SAT) \
    static void d_##ISF##HA##HB##QZ##SAT(const args_t *A) { EC_ACC_BODY(A, ISF, HA, HB, QZ, SAT) }
#define EC_ACC_DRIVERS(SAT) \
    EC_ACC_DRIVER(0,0,0,0,SAT) EC_ACC_DRIVER(0,0,0,1,SAT) EC_ACC_DRIVER(0,1,0,0,SAT) EC_ACC_DRIVER(0,1,0,1,SAT) \
    EC_ACC_DRIVER(0,1,1,0,SAT) EC_ACC_DRIVER(0,1,1,1,SAT) EC_ACC_DRIVER(1,0,0,0,SAT) EC_ACC_DRIVER(1,0,0,1,SAT) \
    EC_ACC_DRIVER(1,1,0,0,SAT) EC_ACC_DRIVER(1,1,0,1,SAT) EC_ACC_DRIVER(1,1,1,0,SAT) EC_ACC_DRIVER(1,1,1,1,SAT)
EC_ACC_DRIVERS(0) EC_ACC_DRIVERS(1) EC_ACC_DRIVERS(2)
#define EC_ACC_TABLE(SAT) {                                                                   \
    d_0000##SAT, d_0001##SAT, 0, 0, d_0100##SAT, d_0101##SAT, d_0110##SAT, d_0111##SAT,       \
    d_1000##SAT, d_1001##SAT, 0, 0, d_1100##SAT, d_1101##SAT, d_1110##SAT, d_1111##SAT}
static void (*const acc_drivers[3][16])(const args_t *) = {EC_ACC_TABLE(0), EC_ACC_TABLE(1), EC_ACC_TABLE(2)};

void adc_accumulate(const void *P, int p_is_float, int64_t n_tiles, int64_t T, int64_t m, int64_t J,
                    const float *scale, const float *shift, const float *step, const float *inv,
                    const float *tw, int quantize, float top, const float *n1, float sigma1, const float *sig,
                    int sat_kind, float unit, const float *off, float vsat,
                    const float *cst, const float *coef, int64_t n_sub, float *out, int n_threads)
{
    args_t A = {P, n_tiles, T, m, J, scale, shift, step, inv, tw, top, n1, sigma1, sig,
                unit, off, vsat, cst, coef, n_sub, J / n_sub, out, n_threads};
    const int ha = n1 != 0, hb = ha && sig != 0;
    acc_drivers[sat_kind][(p_is_float ? 8 : 0) | (ha ? 4 : 0) | (hb ? 2 : 0) | (quantize ? 1 : 0)](&A);
}

/* ---- fused array pass ------------------------------------------------------------------------
   One block of rows without materialising bit-planes or partial sums. Per group of G input rows
   (G T <= 8 plane-rows) and array r: the planes are cut from the input bytes into an L1 buffer,
   multiplied with the array's packed int8 weights (isa_gemm), and each partial sum goes straight
   through the ADC (codes summed over cycles per array, then scaled by the step, as in the torch
   path), with the same noise samples.
   Rows row0..row0+m of x: (M, K) uint8 patch rows with row stride `stride`, or, when conv is
   given, an implicit im2col of a zero-padded NHWC uint8 input (no patch matrix in memory):
   conv = {OH, OW, KH, KW, C, SH, SW, DH, DW, Hp, Wp}, patch row i = (n, oh, ow), K index =
   (kh, kw, c). out holds the m rows. Noise: row i's samples start at noise + noff[i / nblock]
   + (i % nblock) n_tiles T J (blocks of nblock rows, each at its own pool offset).
   Read-noise sigma: from sig_tab[r, sq, :] ((n_tiles, tab_rows, J), sigma per sum of squares,
   built by the caller with the formula above) when sq < tab_rows, else by the formula. */
typedef struct {
    const uint8_t *x; int64_t m, row0, stride; const int64_t *conv; const int64_t *seg;
    int64_t n_tiles; const int64_t *bounds; const int8_t *wp; const int64_t *wp_off; /* byte offsets */ int64_t Jv, lim16;
    int64_t T; const int32_t *shifts; int32_t mask; int64_t J;
    const float *scale, *shift, *step, *inv, *tw; float top;
    const uint16_t *noise; const int64_t *noff; int64_t nblock; float sigma1; const float *sig_tab; int64_t tab_rows; float rn2, s1sq; const float *iv2;
    float unit; const float *off; float vsat;
    const float *cst, *coef; int64_t n_sub, O;
    float *out; int n_threads;
} fargs_t;

/* one row's ADC on array r in plain C (ec_saturate vectorises): every ISA's path with bit-line
   saturation, and the portable one's without (SAT == 0: u = P scale + shift) */
EC_INLINE void adc_plain(const int32_t *part, int64_t os, int64_t T, int64_t J, const float *sc, const float *sh,
                         const float *st, const float *iv, const float *of, float unit, float vsat, const float *tw,
                         const uint16_t *nrow, const float *const *sgrow, float s1, float top, float *__restrict__ tacc,
                         float *__restrict__ ac, const int HA, const int HB, const int QZ, const int SAT)
{
    memset(tacc, 0, J * sizeof(float));
    for (int64_t t = 0; t < T; t++) {
        const float w = tw[t];
        const int32_t *__restrict__ pi = part + t * os;
        const uint16_t *__restrict__ a = HA ? nrow + t * J : 0;
        const float *__restrict__ sg = HB ? sgrow[t] : 0;
        for (int64_t j = 0; j < J; j++) {
            float u = SAT ? ec_saturate((float)pi[j] * unit + of[j], vsat, SAT) * iv[j] + sh[j]
                          : (float)pi[j] * sc[j] + sh[j];
            if (HA) u += (HB ? sg[j] : s1) * ec_h2f(a[j]);
            if (QZ) u = ec_quantize(u, top);
            tacc[j] += w * u;
        }
    }
    for (int64_t j = 0; j < J; j++) ac[j] += st[j] * tacc[j];
}

#ifndef ISA_HAS_ADC_LINEAR  /* no hand-written ADC: the plain-C one, vectorised by the compiler */
#define isa_adc_linear(part, os, T, J, sc, sh, st, tw, nrow, sgrow, s1, top, tmp, ac, HA, HB, QZ) \
    adc_plain(part, os, T, J, sc, sh, st, 0, 0, 0.0f, 0.0f, tw, nrow, sgrow, s1, top, tmp, ac, HA, HB, QZ, 0)
#endif

/* read-noise sigma (LSB) for a sum of squares q: sqrt(q rn2 inv^2 + s1^2), as the torch path rounds it */
EC_INLINE void sigma_row(float q_rn2, const float *__restrict__ iv2, float s1sq, int64_t J, float *__restrict__ out)
{
    for (int64_t j = 0; j < J; j++) {
        const float prod = q_rn2 * iv2[j];
        out[j] = sqrtf(prod + s1sq);
    }
}

/* position of a patch row in the conv output, advanced row by row */
typedef struct { int64_t n, oh, ow; } pos_t;

EC_INLINE void pos_next(const int64_t *cv, pos_t *p)
{
    if (++p->ow == cv[1]) {
        p->ow = 0;
        if (++p->oh == cv[0]) { p->oh = 0; p->n++; }
    }
}

/* conv patch row at p gathered into buf: KH KW pieces of C input bytes (seg[s]: offset of piece
   s = kh KW + kw from the patch origin) */
EC_INLINE void gather_row(const fargs_t *A, const pos_t *p, uint8_t *buf)
{
    const int64_t *cv = A->conv;
    const int64_t C = cv[4];
    const uint8_t *origin = A->x + ((p->n * cv[9] + p->oh * cv[5]) * cv[10] + p->ow * cv[6]) * C;
    for (int64_t s = 0; s < cv[2] * cv[3]; s++) isa_copy(buf + s * C, origin + A->seg[s], C);
}

EC_INLINE void fused_rows(
    const fargs_t *A, int64_t i_begin, int64_t i_end, uint8_t *xbuf, int64_t xs, uint8_t *pl, int64_t ps,
    int32_t *part, int64_t os, float *acc, float *sgbuf, void *scratch, const int HA, const int HB, const int QZ,
    const int SAT)
{
    const int64_t T = A->T, J = A->J, nt = A->n_tiles;
    const int64_t G = T >= 8 ? 1 : 8 / T;
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
            const int64_t k0 = A->bounds[r], R = A->bounds[r + 1] - k0;
            int32_t sqs[8];
            for (int64_t g = 0; g < gn; g++)
                for (int64_t t = 0; t < T; t++)
                    sqs[g * T + t] = isa_cut(xr[g] + k0, R, A->shifts[t], A->mask, pl + (g * T + t) * ps, HB);
            isa_gemm(pl, ps, (int)(gn * T), A->wp + A->wp_off[r], R, A->Jv, A->lim16, A->mask, part, os, scratch);
            const float *sc = A->scale + r * J, *sh = A->shift + r * J, *st = A->step + r * J;
            for (int64_t g = 0; g < gn; g++) {
                float *ac = acc + g * J;
                const uint16_t *nrow = HA ? nrows[g] + r * T * J : 0;
                /* read-noise sigma rows (LSB) of this row's planes: table rows, or the formula */
                const float *sgrow[8];
                if (HB) {
                    for (int64_t t = 0; t < T; t++) {
                        const int32_t q = sqs[g * T + t];
                        if (q < A->tab_rows) {
                            sgrow[t] = A->sig_tab + (r * A->tab_rows + q) * J;
                        } else {
                            sigma_row((float)q * A->rn2, A->iv2 + r * J, A->s1sq, J, sgbuf + t * J);
                            sgrow[t] = sgbuf + t * J;
                        }
                    }
                }
                if (SAT == 0)
                    isa_adc_linear(part + g * T * os, os, T, J, sc, sh, st, A->tw, nrow, sgrow, A->sigma1, A->top,
                                   sgbuf + 8 * J, ac, HA, HB, QZ);
                else
                    adc_plain(part + g * T * os, os, T, J, sc, sh, st, A->inv + r * J, A->off + r * J, A->unit, A->vsat,
                              A->tw, nrow, sgrow, A->sigma1, A->top, sgbuf + 8 * J, ac, HA, HB, QZ, SAT);
            }
        }
        for (int64_t g = 0; g < gn; g++) shift_add_out(acc + g * J, A->coef, A->n_sub, A->O, A->out + (i0 + g) * A->O);
    }
}

static size_t up64(size_t n) { return (n + 63) / 64 * 64; }

#define EC_FUSED_BODY(AP, HA, HB, QZ, SAT) {                                                    \
    const fargs_t *A_ = (AP);                                                                    \
    const int nthr_ = A_->n_threads;                                                             \
    int64_t kmax_ = 0;                                                                           \
    for (int64_t r_ = 0; r_ < A_->n_tiles; r_++)                                                 \
        if (A_->bounds[r_ + 1] - A_->bounds[r_] > kmax_) kmax_ = A_->bounds[r_ + 1] - A_->bounds[r_]; \
    const int64_t ps_ = (kmax_ + 64 + 63) / 64 * 64, os_ = A_->Jv * 16;                         \
    const int64_t xs_ = A_->conv ? (int64_t)up64(A_->conv[2] * A_->conv[3] * A_->conv[4] + 64) : 0; \
    const int64_t G_ = A_->T >= 8 ? 1 : 8 / A_->T;                                               \
    const int64_t chunk_ = 16 * G_, nchunks_ = (A_->m + chunk_ - 1) / chunk_;                   \
    _Pragma("omp parallel num_threads(nthr_)")                                                  \
    {                                                                                            \
        uint8_t *xbuf_ = aligned_alloc(64, xs_ ? 8 * xs_ : 64);                                  \
        uint8_t *pl_ = aligned_alloc(64, 8 * ps_);                                               \
        int32_t *part_ = aligned_alloc(64, up64(8 * os_ * sizeof(int32_t)));                     \
        float *acc_ = aligned_alloc(64, up64(8 * A_->J * sizeof(float)));                        \
        float *sg_ = aligned_alloc(64, up64(9 * A_->J * sizeof(float)));                         \
        void *scr_ = aligned_alloc(64, up64((8 * os_ + ps_) * sizeof(int32_t)));                 \
        /* dynamic chunks: a thread slowed by another process on its core does not hold up the rest */ \
        _Pragma("omp for schedule(dynamic, 1)")                                                  \
        for (int64_t c_ = 0; c_ < nchunks_; c_++) {                                              \
            const int64_t b_ = c_ * chunk_, e_ = b_ + chunk_ < A_->m ? b_ + chunk_ : A_->m;       \
            fused_rows(A_, b_, e_, xbuf_, xs_, pl_, ps_, part_, os_, acc_, sg_, scr_, HA, HB, QZ, SAT); \
        }                                                                                        \
        free(xbuf_); free(pl_); free(part_); free(acc_); free(sg_); free(scr_);                   \
    } }
#define EC_FUSED_DRIVER(HA, HB, QZ, SAT) \
    static void f_##HA##HB##QZ##SAT(const fargs_t *A) { EC_FUSED_BODY(A, HA, HB, QZ, SAT) }
#define EC_FUSED_DRIVERS(SAT) \
    EC_FUSED_DRIVER(0,0,0,SAT) EC_FUSED_DRIVER(0,0,1,SAT) EC_FUSED_DRIVER(1,0,0,SAT) \
    EC_FUSED_DRIVER(1,0,1,SAT) EC_FUSED_DRIVER(1,1,0,SAT) EC_FUSED_DRIVER(1,1,1,SAT)
EC_FUSED_DRIVERS(0) EC_FUSED_DRIVERS(1) EC_FUSED_DRIVERS(2)
#define EC_FUSED_TABLE(SAT) {f_000##SAT, f_001##SAT, 0, 0, f_100##SAT, f_101##SAT, f_110##SAT, f_111##SAT}
static void (*const fused_drivers[3][8])(const fargs_t *) = {EC_FUSED_TABLE(0), EC_FUSED_TABLE(1), EC_FUSED_TABLE(2)};

int weight_layout(int32_t mask) { return ISA_WEIGHT_LAYOUT(mask); }

void fused_block(const uint8_t *x, int64_t m, int64_t row0, int64_t stride, const int64_t *conv,
                 int64_t n_tiles, const int64_t *bounds, const int8_t *wp, const int64_t *wp_off, int64_t Jv,
                 int64_t lim16, int64_t T, const int32_t *shifts, int32_t mask, int64_t J,
                 const float *scale, const float *shift, const float *step, const float *inv,
                 const float *tw, int quantize, float top,
                 const uint16_t *noise, const int64_t *noff, int64_t nblock, float sigma1, const float *sig_tab,
                 int64_t tab_rows, float rn2, float s1sq, const float *iv2, int sat_kind, float unit,
                 const float *off, float vsat, const float *cst, const float *coef, int64_t n_sub, float *out,
                 int n_threads)
{
    int64_t *seg = 0;
    if (conv) {  /* offset of piece (kh, kw) from a patch origin */
        seg = malloc((size_t)(conv[2] * conv[3]) * sizeof(int64_t));
        for (int64_t kh = 0; kh < conv[2]; kh++)
            for (int64_t kw = 0; kw < conv[3]; kw++)
                seg[kh * conv[3] + kw] = (kh * conv[7] * conv[10] + kw * conv[8]) * conv[4];
    }
    fargs_t A = {x, m, row0, stride, conv, seg, n_tiles, bounds, wp, wp_off, Jv, lim16 < 2 ? 2 : lim16, T, shifts,
                 mask, J, scale, shift, step, inv, tw, top, noise, noff, nblock, sigma1, sig_tab,
                 sig_tab ? tab_rows : 0, rn2, s1sq, iv2, unit, off, vsat, cst, coef, n_sub, J / n_sub, out, n_threads};
    const int ha = noise != 0, hb = ha && iv2 != 0;
    fused_drivers[sat_kind][(ha ? 4 : 0) | (hb ? 2 : 0) | (quantize ? 1 : 0)](&A);
    free(seg);
}

#endif

/* small_linear.c's decode-batch product for CPUs with AVX2 and FMA but no AVX-512 (AMD's
 * Zen 2 and 3, Intel before Skylake-X): y = x @ w.T (+ bias) for up to 4 rows of x, bf16 in
 * and out, float32 accumulation, from the same blocked weight, [out / 16][in / 2][16][2].
 * There oneDNN cannot take bf16 at all, and the linear layers otherwise run on float32
 * copies of their weights (linear.py): at one to four rows that reads twice the bytes this
 * kernel reads. A 32-byte load holds one input pair for 8 outputs; the even and odd inputs
 * are widened (a shift, a mask) and multiplied into 8 float32 sums each, so no horizontal
 * sums are needed. Built on its own, as the other kernels need AVX-512. */
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

typedef uint16_t bf16;

#define FL_LINEAR_PAR_MIN (1 << 18) /* weight elements (512 KiB); below, one thread */
#define MAX_NB 4                    /* output blocks of 16 per tile */

/* 8 floats rounded to bf16 as torch rounds (nearest even, NaN kept quiet), stored. */
static inline void store8(bf16 *p, __m256 f) {
    __m256i u = _mm256_castps_si256(f);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    __m256i quiet = _mm256_or_si256(u, _mm256_set1_epi32(0x00400000));
    __m256 nan = _mm256_cmp_ps(f, f, _CMP_UNORD_Q);
    r = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(r),
                                             _mm256_castsi256_ps(quiet), nan));
    r = _mm256_srli_epi32(r, 16);
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128((__m128i *)p, packed);
}

static inline __m256 load8(const bf16 *p) {
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

/* NB blocks of 16 outputs (from wb, each block in * 16 values apart) against NR rows. */
static inline __attribute__((always_inline)) void tile(const bf16 *x, int64_t x_stride,
                                                       const int nr, const bf16 *wb,
                                                       const int nb, int64_t in,
                                                       const bf16 *bias, bf16 *y,
                                                       int64_t out) {
    __m256 acc[MAX_NB][2][4];
    const __m256i high = _mm256_set1_epi32(-65536);
    for (int b = 0; b < nb; b++)
        for (int h = 0; h < 2; h++)
            for (int r = 0; r < nr; r++) acc[b][h][r] = _mm256_setzero_ps();
    for (int64_t p = 0; p < in / 2; p++) {
        __m256 xe[4], xo[4];
        for (int r = 0; r < nr; r++) {
            int32_t pair;
            memcpy(&pair, x + r * x_stride + 2 * p, 4);
            __m256i x2 = _mm256_set1_epi32(pair);
            xe[r] = _mm256_castsi256_ps(_mm256_slli_epi32(x2, 16));
            xo[r] = _mm256_castsi256_ps(_mm256_and_si256(x2, high));
        }
        for (int b = 0; b < nb; b++)
            for (int h = 0; h < 2; h++) {
                __m256i w = _mm256_loadu_si256((const __m256i *)(wb + b * in * 16 + p * 32 +
                                                                  h * 16));
                __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
                __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(w, high));
                for (int r = 0; r < nr; r++)
                    acc[b][h][r] = _mm256_fmadd_ps(wo, xo[r],
                                                   _mm256_fmadd_ps(we, xe[r], acc[b][h][r]));
            }
    }
    for (int b = 0; b < nb; b++)
        for (int h = 0; h < 2; h++) {
            __m256 bv = bias ? load8(bias + b * 16 + h * 8) : _mm256_setzero_ps();
            for (int r = 0; r < nr; r++)
                store8(y + r * out + b * 16 + h * 8, _mm256_add_ps(acc[b][h][r], bv));
        }
}

/* Up to 4 rows against nb (1..4) blocks: 4 blocks (8 independent sums) for one row, 2 for
 * two, 1 for three or four, so the sums stay in the 16 registers. */
static void rows_by_blocks(const bf16 *x, int64_t x_stride, int nr, const bf16 *wb, int nb,
                           int64_t in, const bf16 *bias, bf16 *y, int64_t out) {
    int step = nr == 1 ? 4 : nr == 2 ? 2 : 1;
    for (int b0 = 0; b0 < nb;) {
        int n = nb - b0 >= step ? step : 1;
        const bf16 *w0 = wb + b0 * in * 16, *b = bias ? bias + b0 * 16 : NULL;
        bf16 *y0 = y + b0 * 16;
#define T(NR, NB) tile(x, x_stride, NR, w0, NB, in, b, y0, out)
        if (n == 4) T(1, 4);
        else if (n == 2) T(2, 2);
        else switch (nr) {
            case 1: T(1, 1); break;
            case 2: T(2, 1); break;
            case 3: T(3, 1); break;
            default: T(4, 1); break;
            }
#undef T
        b0 += n;
    }
}

/* x: rows (any number; 4 at a time) of `in` bf16 values, x_stride apart; w: the blocked
 * weight (out a multiple of 16, in of 2); bias: out values or NULL; y: [rows, out]. */
void fl_small_linear_avx2(const bf16 *x, int64_t x_stride, int64_t rows, const bf16 *w,
                          int64_t out, int64_t in, const bf16 *bias, bf16 *y) {
    int64_t blocks = out / 16, groups = (blocks + MAX_NB - 1) / MAX_NB;
#pragma omp parallel for if (out * in >= FL_LINEAR_PAR_MIN) schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        int64_t b0 = g * MAX_NB;
        int nb = blocks - b0 < MAX_NB ? (int)(blocks - b0) : MAX_NB;
        for (int64_t r0 = 0; r0 < rows; r0 += 4)
            rows_by_blocks(x + r0 * x_stride, x_stride, rows - r0 < 4 ? (int)(rows - r0) : 4,
                           w + b0 * in * 16, nb, in, bias ? bias + b0 * 16 : NULL,
                           y + r0 * out + b0 * 16, out);
    }
}

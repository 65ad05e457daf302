/* y = x @ w.T (+ bias) for a decode batch's rows of x, bf16 in and out, float32
 * accumulation. oneDNN's packed linear costs ~20 us a call whatever the size (primitive
 * lookup, threading), which is most of a small matrix's time at batch 1; this kernel has no
 * set-up. The weight is held in blocks of 16 output rows with the inputs paired,
 * [out / 16][in / 2][16][2], so one 64-byte load holds two inputs for 16 outputs: each load
 * feeds one multiply-add per input row, and no horizontal sums are needed. It is also the
 * layout AMX's tile multiply takes for its second operand, so on CPUs with AMX the tiles do
 * the work (16 rows at a time, as fast at 16 rows as at one). Threads split the output
 * blocks only when the matrix is large enough to pay for waking them. */
#include "kernels.h"

#define FL_LINEAR_PAR_MIN (1 << 18) /* weight elements (512 KiB); below, one thread */
#define MAX_NB 8                    /* output blocks of 16 per tile */

/* acc[b][r] += the pair (x[r][2p], x[r][2p + 1]) against block b's pair p. With AVX512-BF16
 * one instruction multiplies the 32 bf16 pairs exactly and adds them in float32; without it
 * the even and odd inputs are widened and added one after the other. */
#ifdef __AVX512BF16__
static inline __m512 madd_pair(__m512 acc, __m512i w, __m512i x2) {
    return _mm512_dpbf16_ps(acc, (__m512bh)w, (__m512bh)x2);
}
#else
static inline __m512 madd_pair(__m512 acc, __m512i w, __m512i x2) {
    __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
    __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(w, _mm512_set1_epi32(-65536)));
    __m512 xe = _mm512_castsi512_ps(_mm512_slli_epi32(x2, 16));
    __m512 xo = _mm512_castsi512_ps(_mm512_and_si512(x2, _mm512_set1_epi32(-65536)));
    return _mm512_fmadd_ps(wo, xo, _mm512_fmadd_ps(we, xe, acc));
}
#endif

/* NB blocks of 16 outputs (from wb, each block in * 16 values apart) against NR input rows,
 * written to y (rows `out` apart) with the bias added. */
static inline __attribute__((always_inline)) void tile(const bf16 *x, int64_t x_stride,
                                                       const int nr, const bf16 *wb,
                                                       const int nb, int64_t in,
                                                       const bf16 *bias, bf16 *y,
                                                       int64_t out) {
    __m512 acc[MAX_NB][4];
    for (int b = 0; b < nb; b++)
        for (int r = 0; r < nr; r++) acc[b][r] = _mm512_setzero_ps();
    for (int64_t p = 0; p < in / 2; p++) {
        __m512i xv[4];
        for (int r = 0; r < nr; r++) {
            int32_t pair;
            memcpy(&pair, x + r * x_stride + 2 * p, 4);
            xv[r] = _mm512_set1_epi32(pair);
        }
        for (int b = 0; b < nb; b++) {
            __m512i wv = _mm512_loadu_si512(wb + b * in * 16 + p * 32);
            for (int r = 0; r < nr; r++) acc[b][r] = madd_pair(acc[b][r], wv, xv[r]);
        }
    }
    for (int b = 0; b < nb; b++) {
        __m512 bv = bias ? load16(bias + b * 16) : _mm512_setzero_ps();
        for (int r = 0; r < nr; r++) store16(y + r * out + b * 16, _mm512_add_ps(acc[b][r], bv));
    }
}

/* Up to 4 rows against nb (1..8) blocks, with tiles the compiler keeps in registers: 8
 * blocks for 1-2 rows (enough independent sums to hide the multiply-add's latency), 4 for
 * 3-4 rows. */
static void rows_by_blocks(const bf16 *x, int64_t x_stride, int nr, const bf16 *wb, int nb,
                           int64_t in, const bf16 *bias, bf16 *y, int64_t out) {
#define T(NR, NB) tile(x, x_stride, NR, wb, NB, in, bias, y, out)
    if (nb == MAX_NB && nr <= 2) {
        if (nr == 1) T(1, 8); else T(2, 8);
        return;
    }
    for (int b0 = 0; b0 < nb;) {
        int n = nb - b0 >= 4 ? 4 : 1;
        const bf16 *w0 = wb + b0 * in * 16, *b = bias ? bias + b0 * 16 : NULL;
        bf16 *y0 = y + b0 * 16;
#undef T
#define T(NR, NB) tile(x, x_stride, NR, w0, NB, in, b, y0, out)
        if (n == 4) {
            switch (nr) {
            case 1: T(1, 4); break;
            case 2: T(2, 4); break;
            case 3: T(3, 4); break;
            default: T(4, 4); break;
            }
        } else {
            switch (nr) {
            case 1: T(1, 1); break;
            case 2: T(2, 1); break;
            case 3: T(3, 1); break;
            default: T(4, 1); break;
            }
        }
#undef T
        b0 += n;
    }
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <sys/syscall.h>
#include <unistd.h>

/* Asks Linux for the AMX tile state (once per process; torch's oneDNN asks too). -> 1 when
 * the tiles may be used, 0 when not (no AMX, or a kernel that refuses). */
int fl_amx_init(void) {
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
}

struct tile_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
};

/* Up to 16 rows against 4 blocks of 16 outputs on the AMX tiles: C in tiles 0-3 (rows x 16
 * float32), a 32-input slice of x in tile 4, each block's matching 16 pairs x 16 outputs in
 * tiles 5 and 6, which is the blocked layout as it is (64 bytes a pair row). */
static void amx_group(const bf16 *x, int64_t x_stride, int nr, const bf16 *wb, int nb,
                      int64_t in, const bf16 *bias, bf16 *y, int64_t out) {
    float c[4][16 * 16];
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int64_t k = 0; k < in; k += 32) {
        _tile_loadd(4, x + k, x_stride * 2);
        const bf16 *wk = wb + k * 16;  /* pair row k / 2 of block 0 */
        _tile_loadd(5, wk, 64);
        _tile_dpbf16ps(0, 4, 5);
        if (nb > 1) { _tile_loadd(6, wk + in * 16, 64); _tile_dpbf16ps(1, 4, 6); }
        if (nb > 2) { _tile_loadd(5, wk + 2 * in * 16, 64); _tile_dpbf16ps(2, 4, 5); }
        if (nb > 3) { _tile_loadd(6, wk + 3 * in * 16, 64); _tile_dpbf16ps(3, 4, 6); }
    }
    _tile_stored(0, c[0], 64); _tile_stored(1, c[1], 64);
    _tile_stored(2, c[2], 64); _tile_stored(3, c[3], 64);
    for (int b = 0; b < nb; b++) {
        __m512 bv = bias ? load16(bias + b * 16) : _mm512_setzero_ps();
        for (int r = 0; r < nr; r++)
            store16(y + r * out + b * 16, _mm512_add_ps(_mm512_loadu_ps(c[b] + r * 16), bv));
    }
}

static void amx_configure(int nr) {
    struct tile_config cfg = {0};
    cfg.palette = 1;
    for (int t = 0; t < 5; t++) { cfg.rows[t] = (uint8_t)nr; cfg.colsb[t] = 64; }
    cfg.rows[5] = cfg.rows[6] = 16;
    cfg.colsb[5] = cfg.colsb[6] = 64;
    _tile_loadconfig(&cfg);
}

/* fl_small_linear on the tiles (in a multiple of 32): each thread takes groups of 4 output
 * blocks and runs every 16-row slice of x against a group while its weights are in cache. */
static void amx_linear(const bf16 *x, int64_t x_stride, int64_t rows, const bf16 *w,
                       int64_t out, int64_t in, const bf16 *bias, bf16 *y) {
    int64_t blocks = out / 16, groups = (blocks + 3) / 4;
#pragma omp parallel if (out * in >= FL_LINEAR_PAR_MIN)
    {
        int configured = -1;
#pragma omp for schedule(static)
        for (int64_t g = 0; g < groups; g++) {
            int64_t b0 = g * 4;
            int nb = blocks - b0 < 4 ? (int)(blocks - b0) : 4;
            for (int64_t r0 = 0; r0 < rows; r0 += 16) {
                int nr = rows - r0 < 16 ? (int)(rows - r0) : 16;
                if (nr != configured) {
                    amx_configure(nr);
                    configured = nr;
                }
                amx_group(x + r0 * x_stride, x_stride, nr, w + b0 * in * 16, nb, in,
                          bias ? bias + b0 * 16 : NULL, y + r0 * out + b0 * 16, out);
            }
        }
        if (configured >= 0) _tile_release();
    }
}
#else
int fl_amx_init(void) { return 0; }
#endif

/* x: rows of `in` bf16 values, x_stride apart; w: the blocked weight above (out a multiple
 * of 16, in of 2); bias: out values or NULL; y: [rows, out] contiguous. use_amx (after
 * fl_amx_init said yes): with in a multiple of 32, the AMX tiles do it. */
void fl_small_linear(const bf16 *x, int64_t x_stride, int64_t rows, const bf16 *w, int64_t out,
                     int64_t in, const bf16 *bias, bf16 *y, int use_amx) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    if (use_amx && in % 32 == 0) {
        amx_linear(x, x_stride, rows, w, out, in, bias, y);
        return;
    }
#else
    (void)use_amx;
#endif
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

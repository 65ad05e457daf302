/* The small per-layer ops of a bf16 decoder, fused: residual add + RMSNorm, SiLU-and-mul and
 * rotary embedding, each one pass over its rows instead of 4-12 torch ops. Every bf16
 * intermediate that torch's own ops round to is rounded here too, in the same order, so the
 * results match torch's except where a float32 sum (RMSNorm's mean) or exp (SiLU) lands on
 * the other side of a bf16 rounding boundary. Rows are spread over OpenMP threads only when
 * there is enough work to pay for it. */
#include "kernels.h"

#define FL_PAR_MIN 32768 /* elements; below this the calling thread does it all */

/* out = bf16(bf16(s * r) * w) with r = 1 / sqrt(mean(s^2) + eps), as
 * w * F.rms_norm(s) rounds. */
static void norm_row(const bf16 *s, const bf16 *w, int64_t n, float eps, bf16 *out) {
    __m512 acc = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        __m512 v = load16(s + i);
        acc = _mm512_fmadd_ps(v, v, acc); /* a bf16 square is exact in float32 */
    }
    float ss = _mm512_reduce_add_ps(acc);
    for (; i < n; i++) ss += from_bf16(s[i]) * from_bf16(s[i]);
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    __m512 vr = _mm512_set1_ps(r);
    for (i = 0; i + 16 <= n; i += 16)
        store16(out + i, _mm512_mul_ps(round16(_mm512_mul_ps(load16(s + i), vr)), load16(w + i)));
    for (; i < n; i++) out[i] = to_bf16(round1(from_bf16(s[i]) * r) * from_bf16(w[i]));
}

/* rows of n: sum = bf16(x + delta) (skipped when delta is NULL: the rows of x are normed),
 * out = RMSNorm(sum) * w. x and delta rows at the given strides; sum and out contiguous. */
void fl_add_rms_norm(const bf16 *x, int64_t x_stride, const bf16 *delta, int64_t delta_stride,
                     const bf16 *w, int64_t rows, int64_t n, float eps, bf16 *sum, bf16 *out) {
#pragma omp parallel for if (rows * n >= FL_PAR_MIN) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const bf16 *xr = x + r * x_stride, *s = xr;
        if (delta != NULL) {
            const bf16 *dr = delta + r * delta_stride;
            bf16 *sr = sum + r * n;
            int64_t i = 0;
            for (; i + 16 <= n; i += 16)
                store16(sr + i, _mm512_add_ps(load16(xr + i), load16(dr + i)));
            for (; i < n; i++) sr[i] = to_bf16(from_bf16(xr[i]) + from_bf16(dr[i]));
            s = sr;
        }
        norm_row(s, w, n, eps, out + r * n);
    }
}

/* x: rows of [gate (n) | up (n)] at x_stride; out = bf16(bf16(silu(gate)) * up), [rows, n],
 * silu(g) = g / (1 + exp(-g)) in float32 as torch computes it. */
void fl_silu_and_mul(const bf16 *x, int64_t x_stride, int64_t rows, int64_t n, bf16 *out) {
#pragma omp parallel for if (rows * n >= FL_PAR_MIN) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const bf16 *g = x + r * x_stride, *u = g + n;
        bf16 *o = out + r * n;
        int64_t i = 0;
        for (; i + 16 <= n; i += 16) {
            __m512 v = load16(g + i);
            __m512 neg = _mm512_sub_ps(_mm512_setzero_ps(), v);
            /* exp16 saturates at exp(88); torch's exp overflows to inf, so silu(-100) is -0 */
            __m512 e = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(neg, _mm512_set1_ps(88.7228f),
                                                               _CMP_GT_OQ),
                                            exp16(neg), _mm512_set1_ps(INFINITY));
            __m512 silu = round16(_mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.0f), e)));
            store16(o + i, _mm512_mul_ps(silu, load16(u + i)));
        }
        for (; i < n; i++) {
            float v = from_bf16(g[i]);
            o[i] = to_bf16(round1(v / (1.0f + expf(-v))) * from_bf16(u[i]));
        }
    }
}

/* In place, each head of each token: x = bf16(bf16(x * cos) + bf16(roll(x, d/2) * sin)), the
 * rotate-half form with the sign in sin (rotary.py). x: [tokens, heads, d] with rows at
 * row_stride and heads d apart; cos, sin: [tokens, d], contiguous. d even, at most 512. */
void fl_rotate(bf16 *x, int64_t tokens, int64_t row_stride, int64_t heads, int64_t d,
               const bf16 *cos, const bf16 *sin) {
    int64_t half = d / 2;
#pragma omp parallel for if (tokens * heads * d >= FL_PAR_MIN) schedule(static)
    for (int64_t th = 0; th < tokens * heads; th++) {
        int64_t t = th / heads;
        bf16 *p = x + t * row_stride + (th % heads) * d, buf[512];
        const bf16 *c = cos + t * d, *s = sin + t * d;
        memcpy(buf, p, sizeof(bf16) * d);
        if (half % 16 == 0) {
            for (int64_t i = 0; i < d; i += 16) {
                __m512 a = round16(_mm512_mul_ps(load16(buf + i), load16(c + i)));
                __m512 b = round16(_mm512_mul_ps(load16(buf + (i + half) % d), load16(s + i)));
                store16(p + i, _mm512_add_ps(a, b));
            }
        } else {
            for (int64_t i = 0; i < d; i++) {
                float a = round1(from_bf16(buf[i]) * from_bf16(c[i]));
                float b = round1(from_bf16(buf[(i + half) % d]) * from_bf16(s[i]));
                p[i] = to_bf16(a + b);
            }
        }
    }
}

/* Each token's new K and V (row = kv_heads * d values, contiguous; tokens k_stride and
 * v_stride apart, as the fused qkv projection leaves them) to its cache slot, rows of `row`
 * values; and, for the first `staged` tokens (the decodes), each head's d values to its
 * staging row too (stage_rows[token * kv_heads + head], rows of d). One call for the four
 * index_copy_ calls torch needs. Every index is checked first: -> 0, or 1 + the first
 * out-of-range position (slots first, then stage rows), nothing written. */
int64_t fl_store_kv(const bf16 *k, const bf16 *v, int64_t k_stride, int64_t v_stride,
                    int64_t tokens, int64_t kv_heads, int64_t d, const int64_t *slots,
                    int64_t num_slots,
                    bf16 *k_cache, bf16 *v_cache, int64_t staged, const int64_t *stage_rows,
                    int64_t num_stage_rows, bf16 *k_stage, bf16 *v_stage) {
    int64_t row = kv_heads * d;
    for (int64_t t = 0; t < tokens; t++)
        if (slots[t] < 0 || slots[t] >= num_slots) return t + 1;
    for (int64_t i = 0; i < staged * kv_heads; i++)
        if (stage_rows[i] < 0 || stage_rows[i] >= num_stage_rows) return tokens + i + 1;
/* Its writes land on cold cache lines and pages, far apart (~1 us a token in a real step,
 * against ~0.1 us on warm ones), so two threads pay from a few tokens up. */
#pragma omp parallel for if (tokens >= 8) schedule(static)
    for (int64_t t = 0; t < tokens; t++) {
        const bf16 *kt = k + t * k_stride, *vt = v + t * v_stride;
        memcpy(k_cache + slots[t] * row, kt, sizeof(bf16) * row);
        memcpy(v_cache + slots[t] * row, vt, sizeof(bf16) * row);
        if (t < staged)
            for (int64_t h = 0; h < kv_heads; h++) {
                int64_t dst = stage_rows[t * kv_heads + h] * d;
                memcpy(k_stage + dst, kt + h * d, sizeof(bf16) * d);
                memcpy(v_stage + dst, vt + h * d, sizeof(bf16) * d);
            }
    }
    return 0;
}

/* Each row's argmax as torch's argmax picks it: the first index of the largest value, or of
 * the first NaN where a row has one. rows of n float32 values, `stride` apart. torch's own
 * CPU argmax runs at ~5 GB/s on [64, 49,152] (4 ms a step at batch 64); this is one
 * vectorised max pass and one search for its first index. */
void fl_argmax(const float *x, int64_t rows, int64_t n, int64_t stride, int64_t *out) {
#pragma omp parallel for if (rows * n >= FL_PAR_MIN) schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * stride;
        __m512 m = _mm512_set1_ps(-INFINITY);
        __mmask16 nan = 0;
        int64_t i = 0;
        for (; i + 16 <= n && !nan; i += 16) {
            __m512 v = _mm512_loadu_ps(row + i);
            nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            m = _mm512_max_ps(m, v);
        }
        int64_t found = -1;
        if (nan) {
            found = i - 16 + __builtin_ctz(nan);
        } else {
            float best = _mm512_reduce_max_ps(m);
            for (int64_t j = i; j < n; j++) {
                if (row[j] != row[j]) { found = j; break; }
                if (row[j] > best) best = row[j];
            }
            if (found < 0) {
                __m512 b = _mm512_set1_ps(best);
                for (int64_t j = 0; j < n && found < 0; j += 16) {
                    __mmask16 lanes = n - j >= 16 ? 0xffff : (__mmask16)((1u << (n - j)) - 1);
                    __m512 v = _mm512_maskz_loadu_ps(lanes, row + j);
                    __mmask16 hit = _mm512_mask_cmp_ps_mask(lanes, v, b, _CMP_EQ_OQ);
                    if (hit) found = j + __builtin_ctz(hit);
                }
            }
        }
        out[r] = found < 0 ? 0 : found;
    }
}

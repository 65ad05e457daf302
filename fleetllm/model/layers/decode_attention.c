/* Decode attention on CPU: one query token per sequence against its keys in the decode
 * staging copy ([num_seqs, kv_heads, capacity, d], contiguous), in one pass over K and V.
 * Scores, softmax and the weighted sum are float32; q, K, V and the output bf16. Built by
 * fleetllm/model/layers/cpu_kernels.py with the host's cc (-O3 -march=native -fopenmp) and
 * called through ctypes; the OpenMP runtime is the one torch has loaded (libgomp.so.1). */
#include "kernels.h"

/* Keys and values stream from memory, each (sequence, kv head) a few KiB to tens of KiB
 * across page boundaries, where the hardware prefetcher stops: they are prefetched this many
 * rows ahead. */
#define PREFETCH_ROWS 32
static inline void prefetch_rows(const bf16 *p, int64_t values) {
    for (int64_t i = 0; i < values; i += 32) _mm_prefetch((const char *)(p + i), _MM_HINT_T0);
}

/* Sums each of four vectors: lane i of the result's low 128 bits is the sum of vector i. */
static inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
    __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
    __m512 abcd = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88),
                                _mm512_shuffle_f32x4(ab, cd, 0xDD));
    /* 128-bit lanes now hold partial sums of a, b, c, d; finish within lanes */
    __m512 t = _mm512_add_ps(_mm512_unpacklo_ps(abcd, abcd), _mm512_unpackhi_ps(abcd, abcd));
    /* lanes: [a0+a2, a0+a2, a1+a3, a1+a3] per 128-bit group */
    __m512 s = _mm512_add_ps(t, _mm512_permute_ps(t, 0x4E));
    /* each 128-bit group j now has its vector's total in every lane; gather lane 0 of each */
    __m512i idx = _mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0);
    return _mm512_castps512_ps128(_mm512_permutexvar_ps(idx, s));
}

/* acc[j] += sum_t p[j][t] * V[t] for GB query rows at a time, the accumulators in registers. */
#define WEIGHTED_SUM(NC, GB)                                                                   \
    static void wsum_##NC##_##GB(const bf16 *v, int64_t n, const float *p, int64_t pstride,  \
                                 float *acc, int64_t d) {                                     \
        __m512 a[GB][NC];                                                                      \
        for (int jj = 0; jj < GB; jj++)                                                        \
            for (int c = 0; c < NC; c++) a[jj][c] = _mm512_setzero_ps();                       \
        for (int64_t t = 0; t < n; t++) {                                                      \
            const bf16 *vr = v + t * d;                                                        \
            prefetch_rows(vr + PREFETCH_ROWS * d, d);                                          \
            __m512 w[GB];                                                                      \
            for (int jj = 0; jj < GB; jj++) w[jj] = _mm512_set1_ps(p[jj * pstride + t]);       \
            for (int c = 0; c < NC; c++) {                                                     \
                __m512 vv = load16(vr + 16 * c);                                               \
                for (int jj = 0; jj < GB; jj++) a[jj][c] = _mm512_fmadd_ps(w[jj], vv, a[jj][c]); \
            }                                                                                  \
        }                                                                                      \
        for (int jj = 0; jj < GB; jj++)                                                        \
            for (int c = 0; c < NC; c++) _mm512_storeu_ps(acc + jj * d + 16 * c, a[jj][c]);    \
    }
WEIGHTED_SUM(1, 1) WEIGHTED_SUM(1, 2) WEIGHTED_SUM(1, 3) WEIGHTED_SUM(1, 4)
WEIGHTED_SUM(2, 1) WEIGHTED_SUM(2, 2) WEIGHTED_SUM(2, 3) WEIGHTED_SUM(2, 4)
WEIGHTED_SUM(4, 1) WEIGHTED_SUM(4, 2) WEIGHTED_SUM(4, 3) WEIGHTED_SUM(4, 4)
WEIGHTED_SUM(8, 1) WEIGHTED_SUM(8, 2)

typedef void (*wsum_fn)(const bf16 *, int64_t, const float *, int64_t, float *, int64_t);

static void weighted_sum(const bf16 *v, int64_t n, const float *p, int64_t g, int64_t d,
                         float *acc) {
    static const wsum_fn table[9][4] = {
        [1] = {wsum_1_1, wsum_1_2, wsum_1_3, wsum_1_4},
        [2] = {wsum_2_1, wsum_2_2, wsum_2_3, wsum_2_4},
        [4] = {wsum_4_1, wsum_4_2, wsum_4_3, wsum_4_4},
        [8] = {wsum_8_1, wsum_8_2, NULL, NULL},
    };
    int64_t nc = d / 16, most = nc == 8 ? 2 : 4;
    for (int64_t j = 0; j < g;) {
        int64_t gb = g - j < most ? g - j : most;
        table[nc][gb - 1](v, n, p + j * n, n, acc + j * d, d);
        j += gb;
    }
}

/* One (sequence, kv head, key range) item: g query rows (bf16 qb and float32 qf, d each)
 * against the n keys and values at k and v (rows of d). Leaves unnormalised acc[g][d],
 * max m[g] and sum l[g]. */
static void attend(const bf16 *k, const bf16 *v, int64_t n, const bf16 *qb, const float *qf,
                   float scale, int64_t g, int64_t d, float *scores, float *acc, float *m,
                   float *l) {
    int64_t nc = d / 16;
    /* scores[j][t]: four keys at a time, reduced together */
    int64_t t = 0;
#ifdef __AVX512BF16__
    /* bf16 pairs multiplied exactly and summed in float32: the same dot products as
     * converting to float32 first, in fewer instructions; q is scaled after. Whole 32-wide
     * rows only: masked 16-bit loads are slower than the float32 path below. */
    int64_t n32 = d / 32;
    __m128 sc = _mm_set1_ps(scale);
    for (; d % 32 == 0 && t + 4 <= n; t += 4) {
        const bf16 *kr[4] = {k + t * d, k + (t + 1) * d, k + (t + 2) * d, k + (t + 3) * d};
        prefetch_rows(k + (t + PREFETCH_ROWS) * d, 4 * d);
        prefetch_rows(v + (t + PREFETCH_ROWS) * d, 4 * d);
        for (int64_t j = 0; j < g; j++) {
            __m512 a[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(),
                           _mm512_setzero_ps()};
            for (int64_t c = 0; c < n32; c++) {
                __m512bh qv = (__m512bh)_mm512_loadu_si512(qb + j * d + 32 * c);
                a[0] = _mm512_dpbf16_ps(a[0], qv, (__m512bh)_mm512_loadu_si512(kr[0] + 32 * c));
                a[1] = _mm512_dpbf16_ps(a[1], qv, (__m512bh)_mm512_loadu_si512(kr[1] + 32 * c));
                a[2] = _mm512_dpbf16_ps(a[2], qv, (__m512bh)_mm512_loadu_si512(kr[2] + 32 * c));
                a[3] = _mm512_dpbf16_ps(a[3], qv, (__m512bh)_mm512_loadu_si512(kr[3] + 32 * c));
            }
            _mm_storeu_ps(scores + j * n + t, _mm_mul_ps(sum4(a[0], a[1], a[2], a[3]), sc));
        }
    }
#endif
    for (; t + 4 <= n; t += 4) {
        const bf16 *k0 = k + t * d, *k1 = k0 + d, *k2 = k1 + d, *k3 = k2 + d;
        for (int64_t j = 0; j < g; j++) {
            const float *qj = qf + j * d;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int64_t c = 0; c < nc; c++) {
                __m512 qv = _mm512_loadu_ps(qj + 16 * c);
                a0 = _mm512_fmadd_ps(qv, load16(k0 + 16 * c), a0);
                a1 = _mm512_fmadd_ps(qv, load16(k1 + 16 * c), a1);
                a2 = _mm512_fmadd_ps(qv, load16(k2 + 16 * c), a2);
                a3 = _mm512_fmadd_ps(qv, load16(k3 + 16 * c), a3);
            }
            _mm_storeu_ps(scores + j * n + t, _mm_mul_ps(sum4(a0, a1, a2, a3), _mm_set1_ps(scale)));
        }
    }
    for (; t < n; t++) {
        const bf16 *k0 = k + t * d;
        for (int64_t j = 0; j < g; j++) {
            __m512 a0 = _mm512_setzero_ps();
            for (int64_t c = 0; c < nc; c++)
                a0 = _mm512_fmadd_ps(_mm512_loadu_ps(qf + j * d + 16 * c), load16(k0 + 16 * c), a0);
            scores[j * n + t] = _mm512_reduce_add_ps(a0) * scale;
        }
    }
    /* softmax numerators, in place */
    for (int64_t j = 0; j < g; j++) {
        float *s = scores + j * n;
        __m512 vmx = _mm512_set1_ps(-INFINITY);
        int64_t i = 0;
        for (; i + 16 <= n; i += 16) vmx = _mm512_max_ps(vmx, _mm512_loadu_ps(s + i));
        float mx = _mm512_reduce_max_ps(vmx);
        for (; i < n; i++) mx = s[i] > mx ? s[i] : mx;
        __m512 vm = _mm512_set1_ps(mx), vs = _mm512_setzero_ps();
        for (i = 0; i + 16 <= n; i += 16) {
            __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + i), vm));
            _mm512_storeu_ps(s + i, e);
            vs = _mm512_add_ps(vs, e);
        }
        if (i < n) {
            __mmask16 mask = (__mmask16)((1u << (n - i)) - 1u);
            __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(mask, s + i), vm));
            _mm512_mask_storeu_ps(s + i, mask, e);
            vs = _mm512_add_ps(vs, _mm512_maskz_mov_ps(mask, e));
        }
        m[j] = mx;
        l[j] = _mm512_reduce_add_ps(vs);
    }
    weighted_sum(v, n, scores, g, d, acc);
}

/* q: [num_seqs, kv_heads * g, d] with the given strides (elements); k, v: [num_seqs,
 * kv_heads, capacity, d], contiguous; out: [num_seqs, kv_heads * g * d], contiguous. lo/hi:
 * each sequence's key range. Each (sequence, kv head) is cut into `splits` key ranges,
 * merged by their maxima and sums. Returns 0, or -1 when scratch memory could not be had. */
int fl_decode_attention(const bf16 *q, int64_t q_seq_stride, int64_t q_head_stride,
                        const bf16 *k, const bf16 *v, int64_t capacity, const int64_t *lo,
                        const int64_t *hi, int64_t num_seqs, int64_t kv_heads, int64_t g,
                        int64_t d, float scale, int64_t splits, bf16 *out) {
    int64_t items = num_seqs * kv_heads * splits, longest = 0;
    for (int64_t s = 0; s < num_seqs; s++)
        longest = hi[s] - lo[s] > longest ? hi[s] - lo[s] : longest;
    int64_t chunk = (longest + splits - 1) / splits;
    float *part = malloc(sizeof(float) * items * g * (d + 2));
    if (part == NULL) return -1;
    int failed = 0;
#pragma omp parallel
    {
        float *scores = malloc(sizeof(float) * (g * (chunk + 16) + g * d) +
                               sizeof(bf16) * g * d);
        if (scores == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            if (scores == NULL) continue;
            int64_t s = it / (kv_heads * splits), h = (it / splits) % kv_heads, p = it % splits;
            int64_t a = lo[s] + p * chunk, b = a + chunk < hi[s] ? a + chunk : hi[s];
            float *acc = part + it * g * (d + 2), *m = acc + g * d, *l = m + g;
            if (a >= b) { /* an empty range: contributes nothing */
                for (int64_t j = 0; j < g; j++) { m[j] = -INFINITY; l[j] = 0.0f; }
                memset(acc, 0, sizeof(float) * g * d);
                continue;
            }
            float *qf = scores + g * (chunk + 16);
            bf16 *qb = (bf16 *)(qf + g * d);
            for (int64_t j = 0; j < g; j++) {
                const bf16 *qr = q + s * q_seq_stride + (h * g + j) * q_head_stride;
                memcpy(qb + j * d, qr, sizeof(bf16) * d);
                for (int64_t c = 0; c < d / 16; c++)
                    _mm512_storeu_ps(qf + j * d + 16 * c, load16(qr + 16 * c));
            }
            int64_t first = ((s * kv_heads + h) * capacity + a) * d;
            attend(k + first, v + first, b - a, qb, qf, scale, g, d, scores, acc, m, l);
        }
        free(scores);
        /* merge the splits of each (sequence, kv head, query row) */
#pragma omp for
        for (int64_t sh = 0; sh < num_seqs * kv_heads; sh++) {
            for (int64_t j = 0; j < g; j++) {
                float mx = -INFINITY, sum = 0.0f;
                for (int64_t p = 0; p < splits; p++) {
                    float mp = part[(sh * splits + p) * g * (d + 2) + g * d + j];
                    mx = mp > mx ? mp : mx;
                }
                float w[64];
                for (int64_t p = 0; p < splits; p++) {
                    float *base = part + (sh * splits + p) * g * (d + 2);
                    float mp = base[g * d + j];
                    w[p] = mp == -INFINITY ? 0.0f : expf(mp - mx);
                    sum += w[p] * base[g * d + g + j];
                }
                bf16 *o = out + (sh * g + j) * d;
                for (int64_t e = 0; e < d; e++) {
                    float x = 0.0f;
                    for (int64_t p = 0; p < splits; p++)
                        x += w[p] * part[(sh * splits + p) * g * (d + 2) + j * d + e];
                    o[e] = to_bf16(x / sum);
                }
            }
        }
    }
    free(part);
    return failed ? -1 : 0;
}

/* Float32 GEMMs as split-bfloat16 ("bf16x3") GEMMs with a float32 result, for CPUs with AMX (see
 * gemm_bf16x3.py). Each GEMM input a is split into hi = bf16(a), lo = bf16(a - hi) and written as
 * [hi | lo | hi] per row; the packed weights are [W_hi; W_hi; W_lo] (3K x N), so one bf16 GEMM with float32
 * accumulation and a float32 output (MKL's cblas_gemm_bf16bf16f32, passed in as `gemm`) sums
 * hi W_hi + lo W_hi + hi W_lo.
 *
 * bf16x3_convnext_mlp: the ConvNeXt block MLP, y <- x + b2 + gelu(layernorm(y) @ W1 + b1) @ W2 (rows x C,
 * channels-last, in place). Rows go in chunks of `chunk`; each chunk is LayerNorm + split (one pass, which
 * also sets the chunk's output rows to x + b2), GEMM 1, bias + GELU + split (one pass), GEMM 2
 * accumulating onto the output (beta = 1). The chunk's workspaces (a1: chunk x 3C bf16, h: chunk x N
 * float32, a2: chunk x 3N bf16) stay in cache.
 *
 * bf16x3_linear: out = relu?(a @ W + bias) over rows (a 1x1 conv on a channels-last map): per chunk, split,
 * GEMM, then bias + ReLU on the chunk's output rows.
 *
 * The passes are OpenMP-parallel over rows; MKL threads the GEMMs itself.
 *
 * GELU is the erf form, with erf from Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7) and exp from a
 * Cephes-style polynomial: the formula of PyTorch's vectorised CPU GELU; its result is split to 16
 * significand bits anyway.
 */
#include <math.h>

#include "bf16.h"

#ifdef _OPENMP
#include <omp.h>
static inline int omp_thread(void) { return omp_get_thread_num(); }
#else
static inline int omp_thread(void) { return 0; }
#endif

typedef void (*gemm_bf16bf16f32_t)(int layout, int transa, int transb, int m, int n, int k, float alpha,
                                   const uint16_t *a, int lda, const uint16_t *b, int ldb, float beta,
                                   float *c, int ldc);
enum { ROW_MAJOR = 101, NO_TRANS = 111 };

static inline float exp_poly(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x); /* (fminf/fmaxf would not vectorise) */
    const float shifter = 12582912.0f; /* 1.5 * 2^23: adding it rounds to an integer (round to nearest) */
    float t = fmaf(x, 1.44269504088896341f, shifter);
    float n = t - shifter;
    float r = fmaf(n, -0.693359375f, x); /* x - n ln2 in two steps (Cephes) */
    r = fmaf(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p, r * r, r) + 1.0f;
    union { float f; int32_t i; } bits = {t}, scale;
    scale.i = (bits.i - 0x4b400000 + 127) << 23; /* 2^n: n sits in t's low mantissa bits */
    return p * scale.f;
}

static inline float gelu_erf(float v) {
    float z = fabsf(v) * 0.70710678118654752f;
    float t = 1.0f / fmaf(0.3275911f, z, 1.0f);
    float q = fmaf(1.061405429f, t, -1.453152027f);
    q = fmaf(q, t, 1.421413741f);
    q = fmaf(q, t, -0.284496736f);
    q = fmaf(q, t, 0.254829592f);
    float e = 1.0f - q * t * exp_poly(-z * z); /* erf(|v| / sqrt 2) */
    e = v < 0.0f ? -e : e;
    return 0.5f * v * (1.0f + e);
}

/* [hi | lo | hi] of one row of n values. */
static inline void split_row(const float *v, int n, uint16_t *a) {
#pragma omp simd
    for (int i = 0; i < n; i++) {
        uint16_t h = to_bf16(v[i]);
        a[i] = h;
        a[2 * n + i] = h;
        a[n + i] = to_bf16(v[i] - from_bf16(h));
    }
}

static void layernorm_split(float *y, const float *x, const float *b2, long m, int C, float eps, float *tmp,
                            uint16_t *a1, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < m; r++) {
        float *yr = y + r * C, *v = tmp + (long)omp_thread() * C;
        const float *xr = x + r * C;
        float s = 0.0f;
#pragma omp simd reduction(+ : s)
        for (int c = 0; c < C; c++) s += yr[c];
        float mean = s / C, q = 0.0f;
#pragma omp simd reduction(+ : q)
        for (int c = 0; c < C; c++) q += (yr[c] - mean) * (yr[c] - mean);
        float rstd = 1.0f / sqrtf(q / C + eps);
#pragma omp simd
        for (int c = 0; c < C; c++) {
            v[c] = (yr[c] - mean) * rstd;
            yr[c] = xr[c] + b2[c]; /* the output row starts as residual + bias; GEMM 2 adds onto it */
        }
        split_row(v, C, a1 + r * 3 * C);
    }
}

static void gelu_split(const float *h, const float *b1, long m, int N, float *tmp, uint16_t *a2, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < m; r++) {
        const float *hr = h + r * N;
        float *v = tmp + (long)omp_thread() * N;
#pragma omp simd
        for (int i = 0; i < N; i++) v[i] = gelu_erf(hr[i] + b1[i]);
        split_row(v, N, a2 + r * 3 * N);
    }
}

/* y: (rows, C) dwconv output, overwritten with the block output; x: (rows, C) block input; w1: (3C, N),
 * w2: (3N, C) packed as above; a1, h, a2: chunk workspaces; tmp: threads x N floats. */
void bf16x3_convnext_mlp(float *y, const float *x, long rows, int C, int N, float eps, const uint16_t *w1,
                         const float *b1, const uint16_t *w2, const float *b2, long chunk, uint16_t *a1,
                         float *h, uint16_t *a2, float *tmp, void *gemm, int threads) {
    gemm_bf16bf16f32_t mm = (gemm_bf16bf16f32_t)gemm;
    for (long s = 0; s < rows; s += chunk) {
        long m = rows - s < chunk ? rows - s : chunk;
        float *ys = y + s * C;
        layernorm_split(ys, x + s * C, b2, m, C, eps, tmp, a1, threads);
        mm(ROW_MAJOR, NO_TRANS, NO_TRANS, (int)m, N, 3 * C, 1.0f, a1, 3 * C, w1, N, 0.0f, h, N);
        gelu_split(h, b1, m, N, tmp, a2, threads);
        mm(ROW_MAJOR, NO_TRANS, NO_TRANS, (int)m, C, 3 * N, 1.0f, a2, 3 * N, w2, C, 1.0f, ys, C);
    }
}

void bf16x3_linear(const float *a, long rows, int K, int N, const uint16_t *w, const float *bias, int relu,
                   float *out, long chunk, uint16_t *abuf, void *gemm, int threads) {
    gemm_bf16bf16f32_t mm = (gemm_bf16bf16f32_t)gemm;
    for (long s = 0; s < rows; s += chunk) {
        long m = rows - s < chunk ? rows - s : chunk;
        float *o = out + s * N;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (long r = 0; r < m; r++) split_row(a + (s + r) * K, K, abuf + r * 3 * K);
        mm(ROW_MAJOR, NO_TRANS, NO_TRANS, (int)m, N, 3 * K, 1.0f, abuf, 3 * K, w, N, 0.0f, o, N);
        if (bias || relu) {
#pragma omp parallel for num_threads(threads) schedule(static)
            for (long r = 0; r < m; r++) {
                float *orow = o + r * N;
#pragma omp simd
                for (int i = 0; i < N; i++) {
                    float v = orow[i] + (bias ? bias[i] : 0.0f);
                    orow[i] = relu && v < 0.0f ? 0.0f : v;
                }
            }
        }
    }
}

/* The GELU above over n floats, for the tests (against F.gelu). */
void gelu_erf_reference(const float *x, float *y, long n) {
    for (long i = 0; i < n; i++) y[i] = gelu_erf(x[i]);
}

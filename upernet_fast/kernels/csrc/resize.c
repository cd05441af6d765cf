/* Bilinear resize of float32 planes to a contiguous NCHW output (see resize.py).
 *
 * Separable: each input row is resized horizontally once into a per-thread buffer (h x W), then every output
 * row blends two of those rows, a contiguous pass that streams the output (non-temporal stores). Indices and
 * weights come from the caller (ATen's source-index rule, `_common.bilinear_indices`), so the sampling
 * positions are PyTorch's; the sums are evaluated in another order than ATen's per-pixel formula (which
 * the compiler may contract into FMAs), so results match F.interpolate to about an ulp, often bitwise. The input may have any strides (channels-last logits need no
 * copy); planes (b, c) are split across `threads` OpenMP threads.
 */
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"
#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#endif

/* o = t0 * a + t1 * b over a row of W floats, with non-temporal (streaming) stores where the ISA has them:
 * the logits output (150 x 512 x 512 floats: 157 MB) is written once and not read back by this pass, and
 * ordinary stores first read every output line into the cache (read-for-ownership), doubling the memory
 * traffic of a pass that is bound by it. */
static inline void blend_row(float *o, const float *t0, const float *t1, float a, float b, int W) {
    int X = 0;
#if defined(__AVX512F__)
    for (; X < W && ((uintptr_t)(o + X) & 63); X++) o[X] = t0[X] * a + t1[X] * b;
    const __m512 va = _mm512_set1_ps(a), vb = _mm512_set1_ps(b);
    for (; X + 16 <= W; X += 16)
        _mm512_stream_ps(o + X, _mm512_fmadd_ps(_mm512_loadu_ps(t0 + X), va,
                                                _mm512_mul_ps(_mm512_loadu_ps(t1 + X), vb)));
#elif defined(__AVX__)
    for (; X < W && ((uintptr_t)(o + X) & 31); X++) o[X] = t0[X] * a + t1[X] * b;
    const __m256 va = _mm256_set1_ps(a), vb = _mm256_set1_ps(b);
    for (; X + 8 <= W; X += 8)
        _mm256_stream_ps(o + X, _mm256_add_ps(_mm256_mul_ps(_mm256_loadu_ps(t0 + X), va),
                                              _mm256_mul_ps(_mm256_loadu_ps(t1 + X), vb)));
#endif
    for (; X < W; X++) o[X] = t0[X] * a + t1[X] * b;
}

int resize_bilinear_planes(const float *x, long B, long C, long sb, long sc, long sh, long sw, int h, int w,
                           float *y, int H, int W, const long *i0, const long *i1, const float *l0h,
                           const float *l1h, const long *j0, const long *j1, const float *l0w,
                           const float *l1w, int threads) {
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *rows = malloc(sizeof(float) * (size_t)h * (size_t)W);
        if (rows == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (long p = 0; p < B * C; p++) {
            if (rows == NULL) continue;
            const float *xp = x + (p / C) * sb + (p % C) * sc;
            for (int i = 0; i < h; i++) {
                const float *r = xp + i * sh;
                float *o = rows + (long)i * W;
                for (int X = 0; X < W; X++) o[X] = r[j0[X] * sw] * l0w[X] + r[j1[X] * sw] * l1w[X];
            }
            float *yp = y + p * (long)H * W;
            for (int Y = 0; Y < H; Y++)
                blend_row(yp + (long)Y * W, rows + i0[Y] * W, rows + i1[Y] * W, l0h[Y], l1h[Y], W);
        }
#if defined(__AVX512F__) || defined(__AVX__)
        _mm_sfence(); /* the streaming stores are visible before the caller reads y */
#endif
        free(rows);
    }
    return failed;
}

/* topdown_add for bfloat16 channels-last maps: y = hi + resize_bilinear(lo) (UPerNet's top-down path),
 * computed in float32 and rounded to bfloat16 once (PyTorch's resize-then-add rounds twice). Shapes: hi, y
 * (B, H, W, C) and lo (B, h, w, C), each with its own (b, y, x) strides and unit channel stride; indices and
 * weights as in resize_bilinear_planes. OpenMP over output rows. */
void topdown_add_nhwc_bf16(const uint16_t *hi, long hb, long hh, long hw, const uint16_t *lo, long lb, long lh,
                           long lw, uint16_t *y, long yb, long yh, long yw, long B, int C, int H, int W,
                           const long *i0, const long *i1, const float *l0h, const float *l1h, const long *j0,
                           const long *j1, const float *l0w, const float *l1w, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long row = 0; row < B * H; row++) {
        long b = row / H;
        int Y = (int)(row % H);
        const uint16_t *r0 = lo + b * lb + i0[Y] * lh, *r1 = lo + b * lb + i1[Y] * lh;
        float a0 = l0h[Y], a1 = l1h[Y];
        for (int X = 0; X < W; X++) {
            const uint16_t *p00 = r0 + j0[X] * lw, *p01 = r0 + j1[X] * lw;
            const uint16_t *p10 = r1 + j0[X] * lw, *p11 = r1 + j1[X] * lw;
            const uint16_t *h = hi + b * hb + (long)Y * hh + (long)X * hw;
            uint16_t *o = y + b * yb + (long)Y * yh + (long)X * yw;
            float w0 = l0w[X], w1 = l1w[X];
            for (int c = 0; c < C; c++) {
                float up = a0 * (w0 * from_bf16(p00[c]) + w1 * from_bf16(p01[c])) +
                           a1 * (w0 * from_bf16(p10[c]) + w1 * from_bf16(p11[c]));
                o[c] = to_bf16(from_bf16(h[c]) + up);
            }
        }
    }
}

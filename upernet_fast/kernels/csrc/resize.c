/* Bilinear resize of float32 planes to a contiguous NCHW output (see resize.py).
 *
 * Separable: each input row is resized horizontally once into a per-thread buffer (h x W), then every output
 * row blends two of those rows, a contiguous pass that vectorises (-O3) and streams the output. Indices and
 * weights come from the caller (ATen's source-index rule, `_common.bilinear_indices`), so the sampling
 * positions are PyTorch's; the sums are evaluated in another order than ATen's per-pixel formula (which
 * the compiler may contract into FMAs), so results match F.interpolate to about an ulp, often bitwise. The input may have any strides (channels-last logits need no
 * copy); planes (b, c) are split across `threads` OpenMP threads.
 */
#include <stdlib.h>

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
            for (int Y = 0; Y < H; Y++) {
                const float *t0 = rows + i0[Y] * W, *t1 = rows + i1[Y] * W;
                float a = l0h[Y], b = l1h[Y];
                float *o = yp + (long)Y * W;
                for (int X = 0; X < W; X++) o[X] = t0[X] * a + t1[X] * b;
            }
        }
        free(rows);
    }
    return failed;
}

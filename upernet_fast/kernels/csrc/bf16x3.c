/* Split-bfloat16 ("bf16x3") glue for float32 convolutions on AMX (see bf16x3.py).
 *
 * bf16x3_split: a channels-last float32 map x (pixels x C) becomes hi = bf16(x) (pixels x C) and
 * x3 = [hi, hi, lo] per pixel (pixels x 3C), lo = bf16(x - hi); hi + lo carries 16 of float32's 24
 * significand bits. One pass over x; the conversion is round-to-nearest-even, as PyTorch's .to(bfloat16).
 *
 * bf16x3_combine: y = relu?(float(y_hi) + float(r) + bias[c]) over channels-last (pixels x C) maps.
 *
 * Both take maps of `rows` rows of W pixels; the bf16 ones (hi, x3, y_hi, r) may be stored with rows of
 * Wp >= W pixels, split writing zeros into the extra columns: the convs then run at width Wp, where
 * oneDNN may pick a faster kernel (bf16x3.py), and the zeros stand in for the conv's own zero padding.
 *
 * Both are OpenMP-parallel over pixel blocks with `threads` threads; the inner loops vectorise (-O3).
 */
#include "bf16.h"

void bf16x3_split(const float *x, uint16_t *hi, uint16_t *x3, long rows, int W, int Wp, int C, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long p = 0; p < rows * Wp; p++) {
        long row = p / Wp;
        int col = (int)(p % Wp);
        uint16_t *h = hi + p * C, *t = x3 + p * 3 * C;
        if (col >= W) {
            memset(h, 0, sizeof(uint16_t) * (size_t)C);
            memset(t, 0, sizeof(uint16_t) * 3 * (size_t)C);
            continue;
        }
        const float *xp = x + (row * W + col) * C;
        for (int c = 0; c < C; c++) {
            uint16_t b = to_bf16(xp[c]);
            h[c] = b;
            t[c] = b;
            t[C + c] = b;
            t[2 * C + c] = to_bf16(xp[c] - from_bf16(b));
        }
    }
}

void bf16x3_combine(const uint16_t *y_hi, const uint16_t *r, const float *bias, float *y, long rows, int W, int Wp,
                    int C, int relu, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long p = 0; p < rows * W; p++) {
        long q = (p / W) * Wp + p % W; /* the pixel in the rows of Wp */
        const uint16_t *a = y_hi + q * C, *b = r + q * C;
        float *o = y + p * C;
        for (int c = 0; c < C; c++) {
            float v = from_bf16(a[c]) + from_bf16(b[c]) + (bias ? bias[c] : 0.0f);
            o[c] = relu && v < 0.0f ? 0.0f : v;
        }
    }
}

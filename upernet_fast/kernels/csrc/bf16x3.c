/* Split-bfloat16 ("bf16x3") glue for float32 convolutions on AMX (see bf16x3.py).
 *
 * bf16x3_split: a channels-last float32 map x (pixels x C) becomes hi = bf16(x) (pixels x C) and
 * x3 = [hi, hi, lo] per pixel (pixels x 3C), lo = bf16(x - hi); hi + lo carries 16 of float32's 24
 * significand bits. One pass over x; the conversion is round-to-nearest-even, as PyTorch's .to(bfloat16).
 *
 * bf16x3_combine: y = relu?(float(y_hi) + float(r) + bias[c]) over channels-last (pixels x C) maps.
 *
 * Both are OpenMP-parallel over pixel blocks with `threads` threads; the inner loops vectorise (-O3).
 */
#include "bf16.h"

void bf16x3_split(const float *x, uint16_t *hi, uint16_t *x3, long pixels, int C, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long p = 0; p < pixels; p++) {
        const float *xp = x + p * C;
        uint16_t *h = hi + p * C, *t = x3 + p * 3 * C;
        for (int c = 0; c < C; c++) {
            uint16_t b = to_bf16(xp[c]);
            h[c] = b;
            t[c] = b;
            t[C + c] = b;
            t[2 * C + c] = to_bf16(xp[c] - from_bf16(b));
        }
    }
}

void bf16x3_combine(const uint16_t *y_hi, const uint16_t *r, const float *bias, float *y, long pixels, int C,
                    int relu, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long p = 0; p < pixels; p++) {
        const uint16_t *a = y_hi + p * C, *b = r + p * C;
        float *o = y + p * C;
        for (int c = 0; c < C; c++) {
            float v = from_bf16(a[c]) + from_bf16(b[c]) + (bias ? bias[c] : 0.0f);
            o[c] = relu && v < 0.0f ? 0.0f : v;
        }
    }
}

/* upsample_shift_add into a channels-last float32 map (see fpn.py):
 *
 *   out[b, Y, X, :] (+)= sum_dy sum_(i, ly)  ly * R_dy[b, i][X, :]
 *   R_dy[b, i][X, :]  =  sum_dx sum_(j, lx)  lx * taps[b, i, j, 3 * (dy + 1) + (dx + 1), :]
 *
 * where (i, ly) / (j, lx) are the 2 bilinear source rows / columns of the shifted output row Y + dy /
 * column X + dx under ATen's index rule, weight 0 off the output (the conv's zero padding); the caller
 * passes them as tables (3, H) / (3, W), row k for shift k - 1 (`fpn._shifted_indices`). Separable: the
 * width pass R_dy[b, i] is computed once per low-resolution row and kept in a small per-thread cache (two
 * rows per dy: output rows go in order, so each is computed about once), and each output pixel then sums
 * its (up to 6) rows' vectors in one pass. The taps are float32 or bfloat16 (widened exactly), with unit
 * channel stride. OpenMP over output rows (contiguous chunks per thread).
 */
#include "bf16.h"
#ifdef _OPENMP
#include <omp.h>
#endif

static inline void axpy_f32(float *restrict o, const float *restrict s, float a, int C) {
    for (int c = 0; c < C; c++) o[c] += a * s[c];
}

static inline void axpy_bf16(float *restrict o, const uint16_t *restrict s, float a, int C) {
    for (int c = 0; c < C; c++) o[c] += a * from_bf16(s[c]);
}

typedef struct {
    long b, i, stamp;
    float *data;
} slot_t;

/* out (B, H, W, C), strides ob, oh, ow; taps (B, h, w, 9C), strides tb, th, tw, float32 or (bf16) bfloat16;
 * ytab = i0, i1 (long), l0, l1 (float) each (3, H); xtab likewise (3, W). `workspace`: threads * 6 * W * C
 * floats for the cached rows (the caller reuses it between calls: a fresh buffer would page-fault on every
 * call). */
void usa_nhwc(float *out, long ob, long oh, long ow, int B, int H, int W, int C, int accumulate, const void *taps,
             int bf16, long tb, long th, long tw, const long *yi0, const long *yi1, const float *yl0,
             const float *yl1, const long *xj0, const long *xj1, const float *xl0, const float *xl1,
             float *workspace, int threads) {
    const long *yi[2] = {yi0, yi1}, *xj[2] = {xj0, xj1};
    const float *yl[2] = {yl0, yl1}, *xl[2] = {xl0, xl1};
#pragma omp parallel num_threads(threads)
    {
        int t = 0;
#ifdef _OPENMP
        t = omp_get_thread_num();
#endif
        slot_t slots[6];
        const float *rows[6];
        float weights[6];
        for (int s = 0; s < 6; s++) {
            slots[s].b = slots[s].i = -1;
            slots[s].stamp = 0;
            slots[s].data = workspace + ((size_t)t * 6 + s) * W * C;
        }
        long clock = 0;
#pragma omp for schedule(static)
        for (long row = 0; row < (long)B * H; row++) {
            long b = row / H;
            int Y = (int)(row % H), n = 0;
            for (int dy = 0; dy < 3; dy++) {
                for (int ky = 0; ky < 2; ky++) {
                    float ly = yl[ky][dy * H + Y];
                    if (ly == 0.0f) continue;
                    long i = yi[ky][dy * H + Y];
                    slot_t *pair = slots + 2 * dy, *s = NULL;
                    if (pair[0].b == b && pair[0].i == i)
                        s = pair;
                    else if (pair[1].b == b && pair[1].i == i)
                        s = pair + 1;
                    if (s == NULL) { /* width pass of low-res row i into the less recently used slot */
                        s = pair[0].stamp <= pair[1].stamp ? pair : pair + 1;
                        s->b = b;
                        s->i = i;
                        memset(s->data, 0, sizeof(float) * (size_t)W * C);
                        for (int X = 0; X < W; X++) {
                            float *r = s->data + (size_t)X * C;
                            for (int dx = 0; dx < 3; dx++) {
                                for (int kx = 0; kx < 2; kx++) {
                                    float lx = xl[kx][dx * W + X];
                                    if (lx == 0.0f) continue;
                                    long off = b * tb + i * th + xj[kx][dx * W + X] * tw + (long)(3 * dy + dx) * C;
                                    if (bf16)
                                        axpy_bf16(r, (const uint16_t *)taps + off, lx, C);
                                    else
                                        axpy_f32(r, (const float *)taps + off, lx, C);
                                }
                            }
                        }
                    }
                    s->stamp = ++clock;
                    rows[n] = s->data;
                    weights[n++] = ly;
                }
            }
            for (int X = 0; X < W; X++) {
                float *o = out + b * ob + (long)Y * oh + (long)X * ow;
                if (!accumulate) memset(o, 0, sizeof(float) * (size_t)C);
                for (int k = 0; k < n; k++) axpy_f32(o, rows[k] + (size_t)X * C, weights[k], C);
            }
        }
    }
}

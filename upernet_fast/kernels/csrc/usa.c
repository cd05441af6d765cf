/* upsample_shift_add of channels-last maps (see fpn.py), summed over G groups of taps onto a base:
 *
 *   out[b, Y, X, :] = relu?( base[b, Y, X, :] + sum_g usa(taps_g)[b, Y, X, :] )
 *   usa(taps)[b, Y, X, :] = sum_dy sum_(i, ly)  ly * R_dy[b, i][X, :]
 *   R_dy[b, i][X, :]      = sum_dx sum_(j, lx)  lx * taps[b, i, j, 3 * (dy + 1) + (dx + 1), :]
 *
 * where (i, ly) / (j, lx) are the 2 bilinear source rows / columns of the shifted output row Y + dy /
 * column X + dx under ATen's index rule, weight 0 off the output (the conv's zero padding); the caller
 * passes them as tables (3, H) / (3, W), row k for shift k - 1 (`fpn._shifted_indices`). Separable: the
 * width pass R_dy[b, i] is computed once per low-resolution row and kept in a small per-thread cache (two
 * rows per dy and group: output rows go in order, so each is computed about once), and each output pixel
 * then sums its (up to 6 per group) rows' vectors and its base in registers and is written once: for a
 * split bottleneck (fpn.upsample_shift_add_sum) that replaces the base's widening copy, a read-modify-write
 * of the whole map per group and a ReLU pass. The taps are float32 or bfloat16 (widened exactly), with
 * unit channel stride.
 */
#include "bf16.h"
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

typedef struct {
    long b, i, stamp;
    float *data;
} slot_t;

/* usa_sum_nhwc: out (B, H, W, C) float32, strides ob, oh, ow. Work goes in tiles of output rows (a
 * contiguous range per OpenMP thread) x USA_COLS columns, so the width-pass rows of all groups (G x 6 slots
 * of USA_COLS x C floats) stay in L2 while the tile's rows are summed.
 * `groups`: G rows of 15 longs: taps address (B, h, w, 9C), is-bf16, tb, th, tw, h, w, then the addresses
 * of the tables yi0, yi1 (long), yl0, yl1 (float) ((3, H) each) and xj0, xj1, xl0, xl1 ((3, W) each).
 * `base_kind`: 0 none (zero), 1 float32, 2 bfloat16; base has unit channel stride. out may alias base
 * (float32, same strides: each pixel's base is read before it is written). workspace:
 * usa_sum_workspace(G, C) floats per thread.
 */
#define USA_COLS 8
/* Vectors of the build's width (GCC vector extensions, one register each): AVX-512 16 floats, AVX2 8, else 4. */
#if defined(__AVX512F__)
#define VL 16
#elif defined(__AVX2__)
#define VL 8
#else
#define VL 4
#endif
#define CHUNK 64 /* channels summed at a time, in CHUNK / VL accumulators */
typedef float vf __attribute__((vector_size(4 * VL)));
typedef float vfu __attribute__((vector_size(4 * VL), aligned(4)));
typedef uint16_t vhu __attribute__((vector_size(2 * VL), aligned(2)));
typedef uint32_t vu __attribute__((vector_size(4 * VL)));

static inline vf load_f32(const float *p) { return *(const vfu *)p; }

static inline vf load_bf16(const uint16_t *p) { /* exact widening: the bits shifted into the high half */
#if defined(__AVX512F__)
    return (vf)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
#elif defined(__AVX2__)
    return (vf)_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
#else
    vu u = __builtin_convertvector(*(const vhu *)p, vu) << 16;
    vf f;
    memcpy(&f, &u, sizeof f);
    return f;
#endif
}

static inline vf relu_v(vf v) {
    const vf zero = {0};
    vu bits, negative = (vu)(v < zero); /* NaN compares false: kept, as F.relu does */
    memcpy(&bits, &v, sizeof v);
    bits &= ~negative;
    memcpy(&v, &bits, sizeof v);
    return v;
}

/* o[0:len] = relu?(init + sum_k w[k] * rows[k][0:len]), rows float32 or (rows_bf16) bfloat16; CHUNK channels
 * at a time in vector registers, so o is written once and never read. */
static void sum_rows(float *o, const void *init, int init_kind, const void *const *rows, int rows_bf16,
                     const float *w, int n, int len, int relu) {
    enum { NV = CHUNK / VL };
    int c = 0;
    for (; c + CHUNK <= len; c += CHUNK) {
        vf a[NV];
        for (int q = 0; q < NV; q++) {
            a[q] = (vf){0};
            if (init_kind == 1) a[q] = load_f32((const float *)init + c + VL * q);
            if (init_kind == 2) a[q] = load_bf16((const uint16_t *)init + c + VL * q);
        }
        for (int k = 0; k < n; k++) {
            vf wk = (vf){0} + w[k];
            if (rows_bf16)
                for (int q = 0; q < NV; q++) a[q] += wk * load_bf16((const uint16_t *)rows[k] + c + VL * q);
            else
                for (int q = 0; q < NV; q++) a[q] += wk * load_f32((const float *)rows[k] + c + VL * q);
        }
        for (int q = 0; q < NV; q++) *(vfu *)(o + c + VL * q) = relu ? relu_v(a[q]) : a[q];
    }
    for (; c < len; c++) {
        float a = init_kind == 1 ? ((const float *)init)[c] : init_kind == 2 ? from_bf16(((const uint16_t *)init)[c]) : 0.0f;
        for (int k = 0; k < n; k++)
            a += w[k] * (rows_bf16 ? from_bf16(((const uint16_t *)rows[k])[c]) : ((const float *)rows[k])[c]);
        o[c] = relu && a < 0.0f ? 0.0f : a;
    }
}

long usa_sum_workspace(int G, int C) { return (long)G * 6 * USA_COLS * C; }

void usa_sum_nhwc(float *out, long ob, long oh, long ow, int B, int H, int W, int C, const void *base,
                  int base_kind, long bb, long bh, long bw, int G, const long *groups, int relu,
                  float *workspace, int threads) {
#pragma omp parallel num_threads(threads)
    {
        int t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        long total = (long)B * H, r0 = total * t / nt, r1 = total * (t + 1) / nt;
        slot_t slots[G * 6];
        const float *rows[G * 6];
        float weights[G * 6];
        long clock = 0;
        for (int s = 0; s < G * 6; s++) slots[s].data = workspace + ((size_t)t * G * 6 + s) * USA_COLS * C;
        for (int X0 = 0; X0 < W; X0 += USA_COLS) {
            int X1 = X0 + USA_COLS < W ? X0 + USA_COLS : W;
            for (int s = 0; s < G * 6; s++) {
                slots[s].b = slots[s].i = -1;
                slots[s].stamp = 0;
            }
            for (long row = r0; row < r1; row++) {
                long b = row / H;
                int Y = (int)(row % H), n = 0;
                for (int g = 0; g < G; g++) {
                    const long *gr = groups + 15 * g;
                    const void *taps = (const void *)gr[0];
                    int bf16 = (int)gr[1];
                    long tb = gr[2], th = gr[3], tw = gr[4];
                    const long *yi[2] = {(const long *)gr[7], (const long *)gr[8]};
                    const float *yl[2] = {(const float *)gr[9], (const float *)gr[10]};
                    const long *xj[2] = {(const long *)gr[11], (const long *)gr[12]};
                    const float *xl[2] = {(const float *)gr[13], (const float *)gr[14]};
                    for (int dy = 0; dy < 3; dy++) {
                        for (int ky = 0; ky < 2; ky++) {
                            float ly = yl[ky][dy * H + Y];
                            if (ly == 0.0f) continue;
                            long i = yi[ky][dy * H + Y];
                            slot_t *pair = slots + 6 * g + 2 * dy, *s = NULL;
                            if (pair[0].b == b && pair[0].i == i)
                                s = pair;
                            else if (pair[1].b == b && pair[1].i == i)
                                s = pair + 1;
                            if (s == NULL) { /* width pass of low-res row i, columns X0..X1 */
                                s = pair[0].stamp <= pair[1].stamp ? pair : pair + 1;
                                s->b = b;
                                s->i = i;
                                for (int X = X0; X < X1; X++) {
                                    const void *src[6];
                                    float lw[6];
                                    int m = 0;
                                    for (int dx = 0; dx < 3; dx++) {
                                        for (int kx = 0; kx < 2; kx++) {
                                            float lx = xl[kx][dx * W + X];
                                            if (lx == 0.0f) continue;
                                            long off = b * tb + i * th + xj[kx][dx * W + X] * tw + (long)(3 * dy + dx) * C;
                                            src[m] = bf16 ? (const void *)((const uint16_t *)taps + off)
                                                          : (const void *)((const float *)taps + off);
                                            lw[m++] = lx;
                                        }
                                    }
                                    sum_rows(s->data + (size_t)(X - X0) * C, NULL, 0, src, bf16, lw, m, C, 0);
                                }
                            }
                            s->stamp = ++clock;
                            rows[n] = s->data;
                            weights[n++] = ly;
                        }
                    }
                }
                for (int X = X0; X < X1; X++) {
                    const void *at[G * 6];
                    for (int k = 0; k < n; k++) at[k] = rows[k] + (size_t)(X - X0) * C;
                    const void *init = NULL;
                    if (base_kind == 1) init = (const float *)base + b * bb + (long)Y * bh + (long)X * bw;
                    if (base_kind == 2) init = (const uint16_t *)base + b * bb + (long)Y * bh + (long)X * bw;
                    sum_rows(out + b * ob + (long)Y * oh + (long)X * ow, init, base_kind, at, 0, weights, n, C, relu);
                }
            }
        }
    }
}

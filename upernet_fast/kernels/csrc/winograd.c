/* Winograd F(4x4, 3x3) and F(6x6, 3x3) input and output transforms, fused with the tile gather/scatter
 * (see winograd.py for the algorithm and the matrices).
 *
 * Layouts (float32, element strides): the input x and output y are NHWC with unit channel stride; the
 * transformed tiles V are (A*A, n, ldv) (the C channels of x at V's start: callers transform several
 * inputs into one V, each at its channel offset, i.e. a channel concatenation that never exists in
 * memory) and the filter products M are (A*A, n, Cout), A = m + 2 points per
 * axis, n = tiles in the block, tile t = (b * rows + i) * tw + j covering output rows m * (row0 + i) ..
 * +m-1 and columns m * j .. +m-1 (edge tiles clipped on output, zero-padded on input).
 * Tiles are split across `threads` OpenMP threads: built with -fopenmp after PyTorch is loaded, this binds
 * to PyTorch's own libgomp (same soname), so it shares PyTorch's thread pool instead of fighting it.
 * Channels are processed in blocks of CB so a tile's vectors stay in L1; the loops over channels
 * vectorise (-O3). No -ffast-math: the transforms are evaluated as written.
 * F(6x6) (BUFFERED): a tile's 64 points are rows 1 MB apart in V / M, and touching 64 of them CB floats at a
 * time overwhelmed the CPU's streams (Xeon, 512 channels at 128², one block: input transform 10.0 ms, output
 * 3.9 ms); a per-thread buffer of the tile's A*A channel vectors, copied out / in one whole row at a time,
 * made them 3.9 and 2.7 ms, bitwise the same. F(4x4)'s 36 streams measured the same either way.
 */
#include <stdlib.h>
#include <string.h>

#define CB 64

static inline int min_int(int a, int b) { return a < b ? a : b; }

/* One axis of Bᵀ d (A inputs -> A outputs) and of Aᵀ m (A inputs -> m outputs) on CB-vectors at strides
 * is / os. F(4x4): points 0, ±1, ±2, ∞ (Lavin & Gray 2015). F(6x6): points 0, ±1, ±2, ±1/2, ∞. */
static inline void bt_4(const float *in, long is, float *out, long os, int cb) {
    for (int c = 0; c < cb; c++) {
        float d0 = in[c], d1 = in[is + c], d2 = in[2 * is + c], d3 = in[3 * is + c], d4 = in[4 * is + c],
              d5 = in[5 * is + c];
        out[c] = 4.0f * d0 - 5.0f * d2 + d4;
        out[os + c] = -4.0f * (d1 + d2) + d3 + d4;
        out[2 * os + c] = 4.0f * (d1 - d2) - d3 + d4;
        out[3 * os + c] = 2.0f * (d3 - d1) - d2 + d4;
        out[4 * os + c] = 2.0f * (d1 - d3) - d2 + d4;
        out[5 * os + c] = 4.0f * d1 - 5.0f * d3 + d5;
    }
}

static inline void at_4(const float *in, long is, float *out, long os, int cb) {
    for (int c = 0; c < cb; c++) {
        float m0 = in[c], m1 = in[is + c], m2 = in[2 * is + c], m3 = in[3 * is + c], m4 = in[4 * is + c],
              m5 = in[5 * is + c];
        float s12 = m1 + m2, d12 = m1 - m2, s34 = m3 + m4, d34 = m3 - m4;
        out[c] = m0 + s12 + s34;
        out[os + c] = d12 + 2.0f * d34;
        out[2 * os + c] = s12 + 4.0f * s34;
        out[3 * os + c] = d12 + 8.0f * d34 + m5;
    }
}

static inline void bt_6(const float *in, long is, float *out, long os, int cb) {
    for (int c = 0; c < cb; c++) {
        float d0 = in[c], d1 = in[is + c], d2 = in[2 * is + c], d3 = in[3 * is + c], d4 = in[4 * is + c],
              d5 = in[5 * is + c], d6 = in[6 * is + c], d7 = in[7 * is + c];
        float t1 = d2 + d6 - 4.25f * d4, t2 = d1 + d5 - 4.25f * d3;
        float t3 = 0.25f * d2 - 1.25f * d4 + d6, t4 = 0.5f * d1 - 2.5f * d3 + 2.0f * d5;
        float t5 = 4.0f * d2 - 5.0f * d4 + d6, t6 = 2.0f * d1 - 2.5f * d3 + 0.5f * d5;
        out[c] = d0 - d6 + 5.25f * (d4 - d2);
        out[os + c] = t1 + t2;
        out[2 * os + c] = t1 - t2;
        out[3 * os + c] = t3 + t4;
        out[4 * os + c] = t3 - t4;
        out[5 * os + c] = t5 + t6;
        out[6 * os + c] = t5 - t6;
        out[7 * os + c] = d7 - d1 + 5.25f * (d3 - d5);
    }
}

static inline void at_6(const float *in, long is, float *out, long os, int cb) {
    for (int c = 0; c < cb; c++) {
        float m0 = in[c], m1 = in[is + c], m2 = in[2 * is + c], m3 = in[3 * is + c], m4 = in[4 * is + c],
              m5 = in[5 * is + c], m6 = in[6 * is + c], m7 = in[7 * is + c];
        float s12 = m1 + m2, d12 = m1 - m2, s34 = m3 + m4, d34 = m3 - m4, s56 = m5 + m6, d56 = m5 - m6;
        out[c] = m0 + s12 + s34 + s56;
        out[os + c] = d12 + 2.0f * d34 + 0.5f * d56;
        out[2 * os + c] = s12 + 4.0f * s34 + 0.25f * s56;
        out[3 * os + c] = d12 + 8.0f * d34 + 0.125f * d56;
        out[4 * os + c] = s12 + 16.0f * s34 + 0.0625f * s56;
        out[5 * os + c] = d12 + 32.0f * d34 + 0.03125f * d56 + m7;
    }
}

/* dst[c] += resize_bilinear(lo)[yy, xx, c] for c < cb (UPerNet's top-down add, fused into the gather): lo
 * (h, w, C) at row / column strides lh / lw; ij = {i0, i1, j0, j1} (long), lam = {l0h, l1h, l0w, l1w} (float),
 * ATen's source indices and weights per output row / column (`_common.bilinear_indices`), evaluated in
 * ATen's order. */
static inline void add_upsampled(float *dst, const float *lo, long lh, long lw, const long *const *ij,
                                 const float *const *lam, int yy, int xx, int cb) {
    const float *r0 = lo + ij[0][yy] * lh, *r1 = lo + ij[1][yy] * lh;
    const float *p00 = r0 + ij[2][xx] * lw, *p01 = r0 + ij[3][xx] * lw;
    const float *p10 = r1 + ij[2][xx] * lw, *p11 = r1 + ij[3][xx] * lw;
    float a0 = lam[0][yy], a1 = lam[1][yy], w0 = lam[2][xx], w1 = lam[3][xx];
    for (int c = 0; c < cb; c++) dst[c] += a0 * (w0 * p00[c] + w1 * p01[c]) + a1 * (w0 * p10[c] + w1 * p11[c]);
}

/* wino_f{M}3_input: gather + Bᵀ d B of tiles [0, n) into V; with `lo`, the input is x + resize(lo)
 * (add_upsampled), so the top-down sum is never written.
 * wino_f{M}3_output: Aᵀ m A of tiles [0, n) of M, + bias, ReLU, scattered into y (clipped at the edges). */
#define WINOGRAD(M, BT, AT, BUFFERED)                                                                       \
    void wino_f##M##3_input(const float *x, long sb, long sh, long sw, int H, int W, int C, int row0,       \
                            int rows, int tw, long n, int threads, float *V, long ldv, const float *lo,     \
                            long lb, long lh, long lw, const long *const *ij, const float *const *lam) {    \
        enum { A = M + 2 };                                                                                 \
        _Pragma("omp parallel num_threads(threads)") {                                                      \
            /* one tile's A*A transformed channel vectors, then copied out point by point: each row of V */ \
            /* gets C contiguous floats at once instead of CB at a time from A*A interleaved streams */     \
            float *tile = BUFFERED ? malloc(sizeof(float) * A * A * (size_t)C) : NULL;                       \
            _Pragma("omp for schedule(static)")                                                             \
            for (long t = 0; t < n; t++) {                                                                  \
                float d[A * A * CB], tmp[A * A * CB];                                                      \
                int j = (int)(t % tw), i = (int)((t / tw) % rows), b = (int)(t / ((long)tw * rows));        \
                int y0 = M * (row0 + i) - 1, x0 = M * j - 1;                                                \
                float *dst0 = tile != NULL ? tile : V + t * ldv; /* point p of tile t at dst0 + p * ps */   \
                long ps = tile != NULL ? C : n * ldv;                                                       \
                for (int c0 = 0; c0 < C; c0 += CB) {                                                        \
                    int cb = min_int(CB, C - c0);                                                           \
                    for (int u = 0; u < A; u++) {                                                           \
                        int yy = y0 + u;                                                                    \
                        for (int v = 0; v < A; v++) {                                                       \
                            int xx = x0 + v;                                                                \
                            float *dst = d + (u * A + v) * CB;                                              \
                            if (yy < 0 || yy >= H || xx < 0 || xx >= W)                                     \
                                memset(dst, 0, sizeof(float) * cb);                                         \
                            else {                                                                          \
                                memcpy(dst, x + b * sb + yy * sh + xx * sw + c0, sizeof(float) * cb);       \
                                if (lo != NULL) add_upsampled(dst, lo + b * lb + c0, lh, lw, ij, lam, yy, xx, cb); \
                            }                                                                               \
                        }                                                                                   \
                    }                                                                                       \
                    /* along the rows u of each column v: tmp[k][v] */                                      \
                    for (int v = 0; v < A; v++) BT(d + v * CB, A * CB, tmp + v * CB, A * CB, cb);           \
                    /* along the columns of each row k: point (k, l) at dst0 + (k * A + l) * ps */          \
                    for (int k = 0; k < A; k++) BT(tmp + k * A * CB, CB, dst0 + (k * A) * ps + c0, ps, cb); \
                }                                                                                           \
                if (tile != NULL)                                                                           \
                    for (int p = 0; p < A * A; p++)                                                         \
                        memcpy(V + ((long)p * n + t) * ldv, tile + (size_t)p * C, sizeof(float) * C);       \
            }                                                                                               \
            free(tile);                                                                                     \
        }                                                                                                   \
    }                                                                                                       \
                                                                                                            \
    void wino_f##M##3_output(const float *Mp, long n, int Co, int row0, int rows, int tw, int threads,      \
                             const float *bias, int relu, float *y, long ob, long oh, long ow, int H,       \
                             int W) {                                                                       \
        enum { A = M + 2 };                                                                                 \
        _Pragma("omp parallel num_threads(threads)") {                                                      \
            float *tile = BUFFERED ? malloc(sizeof(float) * A * A * (size_t)Co) : NULL;                     \
            _Pragma("omp for schedule(static)")                                                             \
            for (long t = 0; t < n; t++) {                                                                  \
                float tmp[M * A * CB], o[M * M * CB];                                                      \
                int j = (int)(t % tw), i = (int)((t / tw) % rows), b = (int)(t / ((long)tw * rows));        \
                int y0 = M * (row0 + i), x0 = M * j;                                                        \
                int nh = min_int(M, H - y0), nw = min_int(M, W - x0);                                       \
                const float *src0 = Mp + t * Co; /* point p of tile t at src0 + p * ps */                   \
                long ps = n * Co;                                                                           \
                if (tile != NULL) {                                                                         \
                    for (int p = 0; p < A * A; p++)                                                         \
                        memcpy(tile + (size_t)p * Co, src0 + p * ps, sizeof(float) * Co);                   \
                    src0 = tile;                                                                            \
                    ps = Co;                                                                                \
                }                                                                                           \
                for (int c0 = 0; c0 < Co; c0 += CB) {                                                       \
                    int cb = min_int(CB, Co - c0);                                                          \
                    /* for each point row a: the A points (a, b) -> M values tmp[q][a] */                   \
                    for (int a = 0; a < A; a++)                                                             \
                        AT(src0 + (long)(a * A) * ps + c0, ps, tmp + a * CB, A * CB, cb);                   \
                    for (int q = 0; q < M; q++) AT(tmp + q * A * CB, CB, o + q * CB, M * CB, cb);           \
                    for (int r = 0; r < nh; r++) {                                                          \
                        for (int q = 0; q < nw; q++) {                                                      \
                            const float *src = o + (r * M + q) * CB;                                        \
                            float *dst = y + b * ob + (y0 + r) * oh + (x0 + q) * ow + c0;                   \
                            for (int c = 0; c < cb; c++) {                                                  \
                                float v = src[c] + (bias ? bias[c0 + c] : 0.0f);                            \
                                dst[c] = relu && v < 0.0f ? 0.0f : v;                                       \
                            }                                                                               \
                        }                                                                                   \
                    }                                                                                       \
                }                                                                                           \
            }                                                                                               \
            free(tile);                                                                                     \
        }                                                                                                   \
    }

WINOGRAD(4, bt_4, at_4, 0)
WINOGRAD(6, bt_6, at_6, 1)

/* Transformed filters U = G g Gᵀ of every (Cout, Cin) 3x3 filter g, evaluated in float64 and rounded once:
 * w (Cout, Cin, 3, 3) float32 -> u (P2, Cin, Cout) float32, given kron = kron(G, G) as (P2, 9) float64
 * (U[(a, b)] = sum over (k, l) of G[a, k] G[b, l] g[k, l]). A model's first call makes these for its large
 * head convs: ATen's float64 einsum and layout copy took 0.22 s for a 512 x 1024 filter bank; here each
 * thread owns a block of OB output channels, so every write is a whole run of U's rows. */
#define OB 64
void wino_weight(const float *w, long cout, long cin, const double *kron, int p2, float *u, int threads) {
    _Pragma("omp parallel for num_threads(threads) schedule(dynamic)")
    for (long o0 = 0; o0 < cout; o0 += OB) {
        int nb = (int)(cout - o0 < OB ? cout - o0 : OB);
        double g[9][OB];
        for (long i = 0; i < cin; i++) {
            for (int o = 0; o < nb; o++)
                for (int k = 0; k < 9; k++) g[k][o] = w[((o0 + o) * cin + i) * 9 + k];
            for (int p = 0; p < p2; p++) {
                const double *kp = kron + p * 9;
                float *dst = u + ((long)p * cin + i) * cout + o0;
                double acc[OB];
                for (int o = 0; o < nb; o++) acc[o] = kp[0] * g[0][o];
                for (int k = 1; k < 9; k++)
                    for (int o = 0; o < nb; o++) acc[o] += kp[k] * g[k][o];
                for (int o = 0; o < nb; o++) dst[o] = (float)acc[o];
            }
        }
    }
}

/* Winograd F(4x4, 3x3) input and output transforms, fused with the tile gather/scatter (see winograd.py).
 *
 * Layouts (float32, element strides): the input x and output y are NHWC with unit channel stride; the
 * transformed tiles V are (36, n, C) and the filter products M are (36, n, Cout), n = tiles in the block,
 * tile t = (b * rows + i) * tw + j covering output rows 4 * (row0 + i) .. +3 and columns 4 * j .. +3.
 * Tiles are split across `threads` OpenMP threads: built with -fopenmp after PyTorch is loaded, this binds
 * to PyTorch's own libgomp (same soname), so it shares PyTorch's thread pool instead of fighting it.
 * Channels are processed in blocks of CB so a tile's 36 vectors stay in L1; the inner loops over channels
 * vectorise (-O3).
 */
#include <string.h>

#define CB 64

static inline int min_int(int a, int b) { return a < b ? a : b; }

/* Bᵀ d along one axis: out[k] = sum_u BT[k][u] in[u], six CB-vectors at stride `is` / `os`. */
static inline void bt6(const float *in, long is, float *out, long os, int cb) {
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

/* Aᵀ m along one axis: four outputs from six inputs. */
static inline void at6(const float *in, long is, float *out, long os, int cb) {
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

void wino_f43_input(const float *x, long sb, long sh, long sw, int H, int W, int C, int row0, int rows,
                    int tw, long n, int threads, float *V) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long t = 0; t < n; t++) {
        float d[36 * CB], tmp[36 * CB];
        int j = (int)(t % tw), i = (int)((t / tw) % rows), b = (int)(t / ((long)tw * rows));
        int y0 = 4 * (row0 + i) - 1, x0 = 4 * j - 1;
        for (int c0 = 0; c0 < C; c0 += CB) {
            int cb = min_int(CB, C - c0);
            for (int u = 0; u < 6; u++) {
                int yy = y0 + u;
                for (int v = 0; v < 6; v++) {
                    int xx = x0 + v;
                    float *dst = d + (u * 6 + v) * CB;
                    if (yy < 0 || yy >= H || xx < 0 || xx >= W)
                        memset(dst, 0, sizeof(float) * cb);
                    else
                        memcpy(dst, x + b * sb + yy * sh + xx * sw + c0, sizeof(float) * cb);
                }
            }
            for (int v = 0; v < 6; v++) bt6(d + v * CB, 6 * CB, tmp + v * CB, 6 * CB, cb); /* columns */
            for (int k = 0; k < 6; k++) /* rows: write the 6 points of row k straight into V */
                bt6(tmp + k * 6 * CB, CB, V + ((long)(k * 6) * n + t) * C + c0, n * C, cb);
        }
    }
}

void wino_f43_output(const float *M, long n, int Co, int row0, int rows, int tw, int threads,
                     const float *bias, int relu, float *y, long ob, long oh, long ow, int H, int W) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long t = 0; t < n; t++) {
        float tmp[24 * CB], o[16 * CB];
        int j = (int)(t % tw), i = (int)((t / tw) % rows), b = (int)(t / ((long)tw * rows));
        int y0 = 4 * (row0 + i), x0 = 4 * j;
        int nh = min_int(4, H - y0), nw = min_int(4, W - x0);
        for (int c0 = 0; c0 < Co; c0 += CB) {
            int cb = min_int(CB, Co - c0);
            /* for each point row a: the 6 points (a, b) -> 4 values tmp[q][a] */
            for (int a = 0; a < 6; a++)
                at6(M + ((long)(a * 6) * n + t) * Co + c0, n * Co, tmp + a * CB, 6 * CB, cb);
            for (int q = 0; q < 4; q++) at6(tmp + q * 6 * CB, CB, o + q * CB, 4 * CB, cb); /* o[r][q] */
            for (int r = 0; r < nh; r++) {
                for (int q = 0; q < nw; q++) {
                    const float *src = o + (r * 4 + q) * CB;
                    float *dst = y + b * ob + (y0 + r) * oh + (x0 + q) * ow + c0;
                    for (int c = 0; c < cb; c++) {
                        float v = src[c] + (bias ? bias[c0 + c] : 0.0f);
                        dst[c] = relu && v < 0.0f ? 0.0f : v;
                    }
                }
            }
        }
    }
}

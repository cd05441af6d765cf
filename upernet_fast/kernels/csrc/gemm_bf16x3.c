/* Float32 GEMMs as split-bfloat16 ("bf16x3") GEMMs with a float32 result, for CPUs with AMX (see
 * gemm_bf16x3.py). Each GEMM input a is split into hi = bf16(a), lo = bf16(a - hi), the weights W likewise,
 * and bf16 GEMMs with float32 accumulation sum hi W_hi + lo W_hi + hi W_lo. On MKL's GEMM
 * (cblas_gemm_bf16bf16f32, passed in as `gemm`) that is one GEMM of [hi | lo | hi] rows and [W_hi; W_hi;
 * W_lo] (3K x N, row-major); on our AMX kernel (`gemm` NULL), [hi | lo] rows and [W_hi; W_lo] in tiles.
 *
 * bf16x3_convnext_mlp: the ConvNeXt block MLP, y <- x + b2 + gelu(layernorm(y) @ W1 + b1) @ W2 (rows x C,
 * channels-last, in place). Rows go in chunks of `chunk`; each chunk is LayerNorm + split (one pass, which
 * also sets the chunk's output rows to x + b2), GEMM 1, bias + GELU + split (one pass), GEMM 2
 * accumulating onto the output (beta = 1). The chunk's workspaces (a1: chunk x 3C bf16, h: chunk x N
 * float32, a2: chunk x 3N bf16; 2C and 2N for amx_gemm) stay in cache.
 *
 * bf16x3_linear: out = relu?(a @ W + bias) over rows (a 1x1 conv on a channels-last map): per chunk, split,
 * GEMM, then bias + ReLU on the chunk's output rows.
 *
 * amx_gemm (below) takes weights packed once (gemm_bf16x3.py pack_weight) where MKL repacks them on every
 * call, and stores nothing twice: measured 1.2-2x faster than MKL on these shapes, same products (sums
 * differ from MKL's in order only).
 *
 * The passes are OpenMP-parallel over rows; the GEMMs thread themselves.
 *
 * GELU is the erf form, with erf from Abramowitz & Stegun 7.1.28, 1 - 1 / (1 + a1 z + ... + a6 z^6)^16
 * (|error| < 3e-7; no exp, one division): measured 8.6e-7 from float64 GELU over [-12, 12], far below the
 * split of its result to 16 significand bits (2^-17 relative). PyTorch's vectorised CPU GELU uses A&S
 * 7.1.26, which needs an exp too: the pass took 1.4x as long (decisions.md, "Own AMX GEMM").
 */
#include <math.h>
#include <string.h>

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

/* ---- AMX-BF16 GEMM -------------------------------------------------------------------------------------
 * C (m x n float32, row stride n) = C (if accumulate) + hi Wh + lo Wh + hi Wl, with A = [hi | lo] per row (m x
 * 2k bf16, row stride 2k) and B = [Wh; Wl] (2k x n) packed as tiles: tile (nb, kb) is 16 rows of 32 bf16
 * (1 KB) holding B[kb*32 + 2r + e][nb*16 + c] at [r][2c + e] (the VNNI pairs TDPBF16PS takes), tiles
 * (nb, 0..2k/32-1) contiguous (Wh's k/32, then Wl's). k and n are multiples of 32. Unlike MKL's operands
 * ([hi | lo | hi] and [Wh; Wh; Wl]) nothing is stored twice: each k step loads a B tile once for two products
 * and reloads A tiles from L1 instead, so a third less weight traffic, memory and split output.
 * Register blocking 2x2 tiles (32 x 32 outputs per step; tmm0-3 accumulate, tmm4-5 A, tmm6-7 B); cache
 * blocking: the B panel of AMX_KC k values (both pieces) x AMX_NC columns (512 KB) stays in L2 while each
 * thread sweeps its 32-row blocks of A under it (a 32-row block of A over the panel's k, 32 KB, stays in L1
 * across the panel's columns). Partial sums over k panels live in C. A last block of fewer than 32 rows
 * runs with tiles of that many rows. */
#if defined(__x86_64__) && defined(__linux__) &&                                                            \
    ((defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11) || (defined(__clang__) && __clang_major__ >= 12))
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
enum { AMX_KC = 256, AMX_NC = 512 };

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Tiles 0-7 all 64 bytes wide; tiles 0, 1, 4 (first 16 rows) get r0 rows, tiles 2, 3, 5 (next 16) r1. */
__attribute__((target("amx-tile"))) static void amx_configure(int r0, int r1) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    static const int second[8] = {0, 0, 1, 1, 0, 1, 0, 0};
    for (int i = 0; i < 8; i++) {
        cfg.colsb[i] = 64;
        cfg.rows[i] = (uint8_t)(i >= 6 ? 16 : (second[i] ? r1 : r0));
    }
    _tile_loadconfig(&cfg);
}

/* One 32 x 32 output block (`two` row tiles, else one) at c over k in [k0, k1): a = the block's first A row,
 * b = its first column tile's (Wh) tiles, kbs = 2k/32 tiles per column tile. */
__attribute__((target("amx-tile,amx-bf16"))) static inline void amx_block(const uint16_t *a, long k,
                                                                           const uint16_t *b, long kbs, float *c,
                                                                           long ldc, int k0, int k1, int load,
                                                                           int two) {
    const long lda = 4 * k; /* bytes per A row: 2k bf16 */
    const uint16_t *wh0 = b, *wh1 = b + kbs * 512, *wl0 = wh0 + (k / 32) * 512, *wl1 = wh1 + (k / 32) * 512;
    if (load) {
        _tile_loadd(0, c, ldc * 4);
        _tile_loadd(1, c + 16, ldc * 4);
        if (two) {
            _tile_loadd(2, c + 16 * ldc, ldc * 4);
            _tile_loadd(3, c + 16 * ldc + 16, ldc * 4);
        }
    } else {
        _tile_zero(0);
        _tile_zero(1);
        if (two) {
            _tile_zero(2);
            _tile_zero(3);
        }
    }
    const uint16_t *a1 = a + 32 * k; /* row 16 */
/* One product of the A piece at column OFF (rows 0-15 in tile 4, rows 16-31 in tile 5) with the two W tiles
 * in 6 and 7, into the 2x2 accumulators 0-3. Tile numbers must be constants: hence a macro. */
#define AMX_PRODUCT(OFF)                     \
    do {                                     \
        _tile_loadd(4, a + (OFF), lda);      \
        _tile_dpbf16ps(0, 4, 6);             \
        _tile_dpbf16ps(1, 4, 7);             \
        if (two) {                           \
            _tile_loadd(5, a1 + (OFF), lda); \
            _tile_dpbf16ps(2, 5, 6);         \
            _tile_dpbf16ps(3, 5, 7);         \
        }                                    \
    } while (0)
    for (int i = k0; i < k1; i += 32) {
        long t = (i / 32) * 512;
        _tile_loadd(6, wh0 + t, 64);
        _tile_loadd(7, wh1 + t, 64);
        AMX_PRODUCT(i);     /* hi Wh */
        AMX_PRODUCT(k + i); /* lo Wh */
        _tile_loadd(6, wl0 + t, 64);
        _tile_loadd(7, wl1 + t, 64);
        AMX_PRODUCT(i); /* hi Wl */
    }
#undef AMX_PRODUCT
    _tile_stored(0, c, ldc * 4);
    _tile_stored(1, c + 16, ldc * 4);
    if (two) {
        _tile_stored(2, c + 16 * ldc, ldc * 4);
        _tile_stored(3, c + 16 * ldc + 16, ldc * 4);
    }
}

__attribute__((target("amx-tile,amx-bf16"))) static void amx_gemm(int m, int n, int k, const uint16_t *A,
                                                                   const uint16_t *B, float *C, int accumulate,
                                                                   int threads) {
    long kbs = 2 * (long)k / 32;
    int full = m / 32, tail = m % 32;
#pragma omp parallel num_threads(threads)
    {
#ifdef _OPENMP
        int nt = omp_get_num_threads(), id = omp_get_thread_num();
#else
        int nt = 1, id = 0;
#endif
        int lo = (int)((long)full * id / nt), hi = (int)((long)full * (id + 1) / nt);
        amx_configure(16, 16);
        for (int n0 = 0; n0 < n; n0 += AMX_NC) {
            int n1 = n0 + AMX_NC < n ? n0 + AMX_NC : n;
            for (int k0 = 0; k0 < k; k0 += AMX_KC) {
                int k1 = k0 + AMX_KC < k ? k0 + AMX_KC : k;
                for (int mb = lo; mb < hi; mb++)
                    for (int nb = n0 / 32; nb < n1 / 32; nb++)
                        amx_block(A + (long)mb * 64 * k, k, B + 2 * nb * kbs * 512, kbs, C + (long)mb * 32 * n + nb * 32,
                                  n, k0, k1, accumulate || k0 > 0, 1);
            }
        }
        if (tail && id == nt - 1) { /* the last rows, with tiles of that many rows */
            int two = tail > 16;
            amx_configure(two ? 16 : tail, two ? tail - 16 : 16);
            for (int nb = 0; nb < n / 32; nb++)
                amx_block(A + (long)full * 64 * k, k, B + 2 * nb * kbs * 512, kbs, C + (long)full * 32 * n + nb * 32, n,
                          0, k, accumulate, two);
        }
        _tile_release();
    }
}

/* 1 when this process may use AMX tiles (asks Linux for the tile state; fails on CPUs without AMX). */
int amx_request(void) { return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0; }
#else
static void amx_gemm(int m, int n, int k, const uint16_t *A, const uint16_t *B, float *C, int accumulate,
                     int threads) {
    (void)m, (void)n, (void)k, (void)A, (void)B, (void)C, (void)accumulate, (void)threads;
}
int amx_request(void) { return 0; }
#endif

/* Split pieces per GEMM input row: [hi | lo | hi] for MKL's GEMM at `mkl`, [hi | lo] for amx_gemm (NULL). */
static inline int pieces(const void *mkl) { return mkl == NULL ? 2 : 3; }

/* C (m x n) = C (if accumulate) + the bf16x3 product of split rows a (pieces(mkl) x k per row) and packed
 * weights b: MKL's GEMM at `mkl` (b row-major 3k x n), or amx_gemm (mkl NULL, b in tiles). */
static void gemm_bf16(void *mkl, int m, int n, int k, const uint16_t *a, const uint16_t *b, float *c, int accumulate,
                      int threads) {
    if (mkl == NULL)
        amx_gemm(m, n, k, a, b, c, accumulate, threads);
    else
        ((gemm_bf16bf16f32_t)mkl)(ROW_MAJOR, NO_TRANS, NO_TRANS, m, n, 3 * k, 1.0f, a, 3 * k, b, n, accumulate ? 1.0f : 0.0f,
                                   c, n);
}

static inline float gelu_erf(float v) {
    float z = fabsf(v) * 0.70710678118654752f;
    float p = fmaf(0.0000430638f, z, 0.0002765672f);
    p = fmaf(p, z, 0.0001520143f);
    p = fmaf(p, z, 0.0092705272f);
    p = fmaf(p, z, 0.0422820123f);
    p = fmaf(p, z, 0.0705230784f);
    p = fmaf(p, z, 1.0f);
    p = p * p;
    p = p * p;
    p = p * p;
    p = p * p;
    float e = 1.0f - 1.0f / p; /* erf(|v| / sqrt 2) = 1 - 1 / p^16 (A&S 7.1.28) */
    e = v < 0.0f ? -e : e;
    return 0.5f * v * (1.0f + e);
}

/* [hi | lo | hi] (three) or [hi | lo] of one row of n values. */
static inline void split_row(const float *v, int n, uint16_t *a, int three) {
    if (three) {
#pragma omp simd
        for (int i = 0; i < n; i++) {
            uint16_t h = to_bf16(v[i]);
            a[i] = h;
            a[2 * n + i] = h;
            a[n + i] = to_bf16(v[i] - from_bf16(h));
        }
    } else {
#pragma omp simd
        for (int i = 0; i < n; i++) {
            uint16_t h = to_bf16(v[i]);
            a[i] = h;
            a[n + i] = to_bf16(v[i] - from_bf16(h));
        }
    }
}

static void layernorm_split(float *y, const float *x, const float *b2, long m, int C, float eps, float *tmp,
                            uint16_t *a1, int p, int threads) {
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
        split_row(v, C, a1 + r * p * C, p == 3);
    }
}

static void gelu_split(const float *h, const float *b1, long m, int N, float *tmp, uint16_t *a2, int p,
                       int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < m; r++) {
        const float *hr = h + r * N;
        float *v = tmp + (long)omp_thread() * N;
#pragma omp simd
        for (int i = 0; i < N; i++) v[i] = gelu_erf(hr[i] + b1[i]);
        split_row(v, N, a2 + r * p * N, p == 3);
    }
}

/* y: (rows, C) dwconv output, overwritten with the block output; x: (rows, C) block input; w1: (3C, N),
 * w2: (3N, C) packed as above; a1, h, a2: chunk workspaces; tmp: threads x N floats. */
void bf16x3_convnext_mlp(float *y, const float *x, long rows, int C, int N, float eps, const uint16_t *w1,
                         const float *b1, const uint16_t *w2, const float *b2, long chunk, uint16_t *a1,
                         float *h, uint16_t *a2, float *tmp, void *gemm, int threads) {
    int p = pieces(gemm);
    for (long s = 0; s < rows; s += chunk) {
        long m = rows - s < chunk ? rows - s : chunk;
        float *ys = y + s * C;
        layernorm_split(ys, x + s * C, b2, m, C, eps, tmp, a1, p, threads);
        gemm_bf16(gemm, (int)m, N, C, a1, w1, h, 0, threads);
        gelu_split(h, b1, m, N, tmp, a2, p, threads);
        gemm_bf16(gemm, (int)m, C, N, a2, w2, ys, 1, threads);
    }
}

void bf16x3_linear(const float *a, long rows, int K, int N, const uint16_t *w, const float *bias, int relu,
                   float *out, long chunk, uint16_t *abuf, void *gemm, int threads) {
    int p = pieces(gemm);
    for (long s = 0; s < rows; s += chunk) {
        long m = rows - s < chunk ? rows - s : chunk;
        float *o = out + s * N;
#pragma omp parallel for num_threads(threads) schedule(static)
        for (long r = 0; r < m; r++) split_row(a + (s + r) * K, K, abuf + r * p * K, p == 3);
        gemm_bf16(gemm, (int)m, N, K, abuf, w, o, 0, threads);
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


/* y = x @ w.T (+ bias) in fp32 on the CPU for an fp32 weight (a weight of bf16 numbers takes cpu_packed.c),
 * row-invariant: every output element is the same bits whatever the number of rows of x (1, a decode step;
 * k + 1, a verification pass; hundreds, a prefill chunk).
 *
 * Each output y[m, n] is the dot product of x's row m and w's row n, summed in one fixed order that depends on
 * nothing but K: sixteen lanes, lane j accumulating x[m, j + 16 i] * w[n, j + 16 i] over i in turn, then the
 * sixteen lanes added pairwise (8 + 8, 4 + 4, 2 + 2, 1 + 1), then the K % 16 leftover terms one by one, then
 * the bias. Tiling (how many rows of x and of w one tile takes, how tiles are split among threads) changes which
 * products are computed together, never the order of one sum, so the bits do not change with it. A tile of
 * sixteen outputs adds their lanes all at once (cpu_simd.h's sums16: the same order, one transposing tree).
 *
 * Memory-bound for a few rows: a tile of four rows of w is streamed once and used for up to eight rows of x while
 * it sits in L1 (four rows of w against four of x, or two against eight), and while one tile is computed the
 * next is prefetched into L2. Without the prefetch the core waits for memory and computes in turn: four rows
 * cost 1.36x one row and eight 1.5x (all of SmolLM2-135M's layers on this project's 2-core Xeon); with it
 * 1.06x and 1.15x, and one row itself 10% less.
 *
 * Compiled by specserve/kernels/cpu_build.py at first use (cc -O3 -march=native -fopenmp); GCC's vector
 * extension is used instead of intrinsics so the same source builds for AVX-512, AVX2 or NEON.
 */
#include "cpu_simd.h"

#define W_TILE 4 /* rows of w per tile */
#if defined(__AVX512F__)
/* rows of x per tile: four rows of w against up to four of x, or two against five to eight (at most 16
 * accumulators in 32 zmm registers) */
#define X_TILE 8
#else
#define X_TILE 2 /* 8 accumulators, 16 ymm registers */
#endif
#define SERIAL_WORK (1L << 16) /* multiply-adds below which one thread does it all */
#define X_BLOCK 64 /* rows of x kept in cache while every tile of w passes over them (a prefill chunk) */
#define PREFETCH_LOCALITY 2 /* __builtin_prefetch's: 2 = into L2 (measured best; 3, into L1, 4% slower at 8 rows) */

/* y[m, n] for mb rows of x and nb rows of w (compile-time constants after inlining). When `next` is not NULL,
 * the nb rows of w there are prefetched alongside the loads. */
static inline __attribute__((always_inline)) void tile(const float *restrict x, long ldx, const float *restrict w,
                                                       long K, const float *restrict bias, float *restrict y,
                                                       long ldy, const int mb, const int nb, const float *next) {
    const long row_bytes = K * 4;
    v16 acc[W_TILE][X_TILE > 4 ? X_TILE : 4];
    for (int n = 0; n < nb; n++)
        for (int m = 0; m < mb; m++) acc[n][m] = (v16){0};
    const long k16 = K & ~15L;
    for (long k = 0; k < k16; k += 16) {
        v16 xv[X_TILE];
        for (int m = 0; m < mb; m++) xv[m] = load16(x + m * ldx + k);
        if (next)
            for (int n = 0; n < nb; n++)
                __builtin_prefetch((const char *)next + n * row_bytes + k * 4, 0, PREFETCH_LOCALITY);
        for (int n = 0; n < nb; n++) {
            const v16 wv = load16(w + n * K + k);
            for (int m = 0; m < mb; m++) acc[n][m] += wv * xv[m];
        }
    }
    float sums[W_TILE][X_TILE > 4 ? X_TILE : 4];
#ifdef HAVE_SUMS16
    if (nb * mb == 16) { /* the 2 x 8 and 4 x 4 tiles: all sixteen lane sums by one transposing tree */
        v16 flat[16];
        for (int n = 0; n < nb; n++)
            for (int m = 0; m < mb; m++) flat[n * mb + m] = acc[n][m];
        float all[16];
        store16(all, sums16(flat));
        for (int n = 0; n < nb; n++)
            for (int m = 0; m < mb; m++) sums[n][m] = all[n * mb + m];
    } else
#endif
        for (int n = 0; n < nb; n++)
            for (int m = 0; m < mb; m++) sums[n][m] = lanes_sum(acc[n][m]);
    for (int n = 0; n < nb; n++) {
        for (int m = 0; m < mb; m++) {
            float s = sums[n][m];
            for (long k = k16; k < K; k++) s = __builtin_fmaf(x[m * ldx + k], w[n * K + k], s); /* spelled out */
            if (bias) s += bias[n];
            y[m * ldy + n] = s;
        }
    }
}

/* One tile of w (nb rows) against mb rows of x, mb and nb at most their tile sizes; `next` as for tile(). */
static void tile_any(const float *x, long ldx, const float *w, long K, const float *bias, float *y, long ldy, int mb,
                     int nb, const float *next) {
    if (nb == W_TILE) {
        switch (mb) {
#if X_TILE >= 8
#define HALVES(mb_)                                                                                                    \
    case mb_:                                                                                                          \
        tile(x, ldx, w, K, bias, y, ldy, mb_, 2, next);                                                                \
        tile(x, ldx, w + 2 * K, K, bias ? bias + 2 : 0, y + 2, ldy, mb_, 2, next ? next + 2 * K : 0);                  \
        return;
            HALVES(8)
            HALVES(7)
            HALVES(6)
            HALVES(5)
#undef HALVES
#endif
#if X_TILE >= 4
        case 4: tile(x, ldx, w, K, bias, y, ldy, 4, W_TILE, next); return;
        case 3: tile(x, ldx, w, K, bias, y, ldy, 3, W_TILE, next); return;
#endif
        case 2: tile(x, ldx, w, K, bias, y, ldy, 2, W_TILE, next); return;
        default: tile(x, ldx, w, K, bias, y, ldy, 1, W_TILE, next); return;
        }
    }
    for (int n = 0; n < nb; n++) /* the last rows of w */
        for (int m = 0; m < mb; m++)
            tile(x + m * ldx, ldx, w + n * K, K, bias ? bias + n : 0, y + m * ldy + n, ldy, 1, 1, 0);
}

/* x [M, K], w [N, K], bias [N] or NULL, y [M, N]; all row-major and contiguous. */
void specserve_linear_f32(const float *x, long M, long K, const float *w, long N, const float *bias, float *y,
                          int threads) {
    const long tiles = (N + W_TILE - 1) / W_TILE;
    if (M * N * K < SERIAL_WORK) threads = 1; /* waking a second thread costs more than it saves */
    for (long m0 = 0; m0 < M; m0 += X_BLOCK) {
        const long m1 = M < m0 + X_BLOCK ? M : m0 + X_BLOCK;
        /* the 2 x 8 tile where all rows fit one (verification: weight-bound); more rows (a prefill chunk:
         * compute-bound) take 4 x 4 tiles, fewer loads per multiply-add */
        const long x_tile = m1 - m0 <= X_TILE || X_TILE < 4 ? X_TILE : 4;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
        for (long t = 0; t < tiles; t++) {
            const long n0 = t * W_TILE;
            const int nb = (int)(N - n0 < W_TILE ? N - n0 : W_TILE);
            const float *rows = w + n0 * K;
            /* the next full tile of w, fetched while this one is computed with the first rows of x */
            const float *next = N - n0 >= 2 * W_TILE ? rows + W_TILE * K : 0;
            for (long m = m0; m < m1; m += x_tile) {
                const int mb = (int)(m1 - m < x_tile ? m1 - m : x_tile);
                tile_any(x + m * K, K, rows, K, bias ? bias + n0 : 0, y + m * N + n0, N, mb, nb, m == m0 ? next : 0);
            }
        }
    }
}

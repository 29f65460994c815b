/* y = x @ w.T (+ bias) in fp32 on the CPU, row-invariant: every output element is the same bits whatever the
 * number of rows of x (1, a decode step; k + 1, a verification pass; hundreds, a prefill chunk).
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
 * specserve_linear_f32_bf16w takes w in bf16 where every fp32 weight is a bf16 number (a bf16 checkpoint run in
 * fp32): widening is exact, so it gives the same bits from half the bytes (one row: 9.0 against 15.8 ms).
 *
 * Compiled by specserve/kernels/cpu_build.py at first use (cc -O3 -march=native -fopenmp); GCC's vector
 * extension is used instead of intrinsics (but for one widening load) so the same source builds for AVX-512,
 * AVX2 or NEON.
 */
#include "cpu_simd.h"

#define W_TILE 4 /* rows of w per tile */
#if defined(__AVX512F__)
/* rows of x per tile: four rows of w against up to four of x, or two against five to eight (at most 16
 * accumulators in 32 zmm registers); the wider tile converts each bf16 weight once for eight rows */
#define X_TILE 8
#else
#define X_TILE 2 /* 8 accumulators, 16 ymm registers */
#endif
#define SERIAL_WORK (1L << 16) /* multiply-adds below which one thread does it all */
#define X_BLOCK 64 /* rows of x kept in cache while every tile of w passes over them (a prefill chunk) */
#define PREFETCH_LOCALITY 2 /* __builtin_prefetch's: 2 = into L2 (measured best; 3, into L1, 4% slower at 8 rows) */
#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 1 /* tiles of w ahead of the one being computed that are prefetched */
#endif

/* A weight stored as bf16 holds numbers that fp32 holds exactly: widened (the 16 bits moved up, zeros below)
 * they are the very fp32 values, so the products and sums below are the same bits as with the fp32 weight. */
typedef unsigned short h16 __attribute__((vector_size(32)));
typedef unsigned int u16 __attribute__((vector_size(64)));

static inline v16 load16_bf16(const unsigned short *p) {
#if defined(__AVX512F__)
    /* one zero-extending load (GCC's generic form widens each half apart and joins them: three shuffles more) */
    const __m512i u = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16);
    return (v16)_mm512_castsi512_ps(u);
#else
    h16 h;
    memcpy(&h, p, sizeof h);
    const u16 u = __builtin_convertvector(h, u16) << 16;
    v16 v;
    memcpy(&v, &u, sizeof v);
    return v;
#endif
}

static inline float bf16_value(unsigned short h) {
    const unsigned u = (unsigned)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* y[m, n] for mb rows of x and nb rows of w (compile-time constants after inlining); w holds fp32 numbers, or
 * bf16 ones when `half`. When `next` is not NULL, the nb rows of w there are prefetched alongside the loads. */
static inline __attribute__((always_inline)) void tile(const float *restrict x, long ldx, const void *restrict w,
                                                       long K, const float *restrict bias, float *restrict y,
                                                       long ldy, const int mb, const int nb, const void *next,
                                                       const int half) {
    const float *w32 = w;
    const unsigned short *w16 = w;
    const long row_bytes = K * (half ? 2 : 4);
    v16 acc[W_TILE][X_TILE > 4 ? X_TILE : 4];
    for (int n = 0; n < nb; n++)
        for (int m = 0; m < mb; m++) acc[n][m] = (v16){0};
    const long k16 = K & ~15L;
    for (long k = 0; k < k16; k += 16) {
        v16 xv[X_TILE];
        for (int m = 0; m < mb; m++) xv[m] = load16(x + m * ldx + k);
        if (next)
            for (int n = 0; n < nb; n++)
                __builtin_prefetch((const char *)next + n * row_bytes + k * (half ? 2 : 4), 0, PREFETCH_LOCALITY);
        for (int n = 0; n < nb; n++) {
            const v16 wv = half ? load16_bf16(w16 + n * K + k) : load16(w32 + n * K + k);
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
            /* fused multiply-adds, spelled out: left to contraction, GCC multiplies a bf16 tail as a vector first */
            for (long k = k16; k < K; k++)
                s = __builtin_fmaf(x[m * ldx + k], half ? bf16_value(w16[n * K + k]) : w32[n * K + k], s);
            if (bias) s += bias[n];
            y[m * ldy + n] = s;
        }
    }
}

/* One tile of w (nb rows) against mb rows of x, mb and nb at most their tile sizes; `next` and `half` as for
 * tile(). */
static inline __attribute__((always_inline)) void tile_any(const float *x, long ldx, const void *w, long K,
                                                           const float *bias, float *y, long ldy, int mb, int nb,
                                                           const void *next, const int half) {
    const long row_bytes = K * (half ? 2 : 4);
    if (nb == W_TILE) {
        switch (mb) {
#if X_TILE >= 8
#define HALVES(mb_)                                                                                                    \
    case mb_:                                                                                                          \
        tile(x, ldx, w, K, bias, y, ldy, mb_, 2, next, half);                                                          \
        tile(x, ldx, (const char *)w + 2 * row_bytes, K, bias ? bias + 2 : 0, y + 2, ldy, mb_, 2,                      \
             next ? (const char *)next + 2 * row_bytes : 0, half);                                                     \
        return;
            HALVES(8)
            HALVES(7)
            HALVES(6)
            HALVES(5)
#undef HALVES
#endif
#if X_TILE >= 4
        case 4: tile(x, ldx, w, K, bias, y, ldy, 4, W_TILE, next, half); return;
        case 3: tile(x, ldx, w, K, bias, y, ldy, 3, W_TILE, next, half); return;
#endif
        case 2: tile(x, ldx, w, K, bias, y, ldy, 2, W_TILE, next, half); return;
        default: tile(x, ldx, w, K, bias, y, ldy, 1, W_TILE, next, half); return;
        }
    }
    for (int n = 0; n < nb; n++) /* the last rows of w */
        for (int m = 0; m < mb; m++)
            tile(x + m * ldx, ldx, (const char *)w + n * row_bytes, K, bias ? bias + n : 0, y + m * ldy + n, ldy, 1,
                 1, 0, half);
}

typedef void tile_fn(const float *, long, const void *, long, const float *, float *, long, int, int, const void *);

static void tile_f32(const float *x, long ldx, const void *w, long K, const float *bias, float *y, long ldy, int mb,
                     int nb, const void *next) {
    tile_any(x, ldx, w, K, bias, y, ldy, mb, nb, next, 0);
}

static void tile_bf16(const float *x, long ldx, const void *w, long K, const float *bias, float *y, long ldy, int mb,
                      int nb, const void *next) {
    tile_any(x, ldx, w, K, bias, y, ldy, mb, nb, next, 1);
}

static void run(const float *x, long M, long K, const void *w, long N, const float *bias, float *y, int threads,
                const int half) {
    tile_fn *const fn = half ? tile_bf16 : tile_f32;
    const long row_bytes = K * (half ? 2 : 4);
    const long tiles = (N + W_TILE - 1) / W_TILE;
    if (M * N * K < SERIAL_WORK) threads = 1; /* waking a second thread costs more than it saves */
    for (long m0 = 0; m0 < M; m0 += X_BLOCK) {
        const long m1 = M < m0 + X_BLOCK ? M : m0 + X_BLOCK;
        /* the 2 x 8 tile for bf16 weights (each converted once for eight rows) and where all rows fit one
         * (verification: weight-bound); more rows of an fp32 weight (a prefill chunk: compute-bound) take
         * 4 x 4 tiles, fewer loads per multiply-add */
        const long x_tile = half || m1 - m0 <= X_TILE || X_TILE < 4 ? X_TILE : 4;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
        for (long t = 0; t < tiles; t++) {
            const long n0 = t * W_TILE;
            const int nb = (int)(N - n0 < W_TILE ? N - n0 : W_TILE);
            const char *rows = (const char *)w + n0 * row_bytes;
            /* the next full tile of w, fetched while this one is computed with the first rows of x */
            const char *next =
                N - n0 >= (PREFETCH_AHEAD + 1) * W_TILE ? rows + PREFETCH_AHEAD * W_TILE * row_bytes : 0;
            for (long m = m0; m < m1; m += x_tile) {
                const int mb = (int)(m1 - m < x_tile ? m1 - m : x_tile);
                fn(x + m * K, K, rows, K, bias ? bias + n0 : 0, y + m * N + n0, N, mb, nb, m == m0 ? next : 0);
            }
        }
    }
}

/* x [M, K], w [N, K], bias [N] or NULL, y [M, N]; all row-major and contiguous. */
void specserve_linear_f32(const float *x, long M, long K, const float *w, long N, const float *bias, float *y,
                          int threads) {
    run(x, M, K, w, N, bias, y, threads, 0);
}

/* The same with w [N, K] in bf16 (the upper 16 bits of each fp32 number): the same bits as
 * specserve_linear_f32 on the widened weight, from half the bytes. */
void specserve_linear_f32_bf16w(const float *x, long M, long K, const unsigned short *w, long N, const float *bias,
                                float *y, int threads) {
    run(x, M, K, w, N, bias, y, threads, 1);
}

/* ---- packed bf16 weights: one multiply-add chain per output, in k order -------------------------------------
 *
 * For a weight of bf16 numbers (cpu_linear.py's `pack_bf16`), the copy is laid out in groups of GROUP outputs:
 * packed[g][k][j] = w[g * GROUP + j][k] (zeros past N), so each k of a group is one contiguous run of GROUP
 * numbers. Each output y[m, n] is then one chain of fused multiply-adds, acc = fma(x[m, k], w[n, k], acc) for
 * k = 0, 1, ..., K - 1 from acc = 0, then + bias: its bits depend on x's row m and the weight alone, whatever
 * the number of rows, the tiling or the threads. The kernel broadcasts one x[m, k] against GROUP weights
 * (an outer product: no horizontal sums, the weights widened once for up to ROW_TILE rows), which keeps the FMA
 * units busy where the dot-product form above was bound by its shuffles and reloads: the linear layers of a
 * verification pass over 8 tokens or of a prefill cost less for the same bytes. */
#if defined(__AVX512F__)
#define GROUP_VECTORS 3 /* 48 outputs a group */
#define ROW_TILE 8      /* 24 accumulators of 32 zmm registers: a verification pass of k <= 7 in one tile */
#else
#define GROUP_VECTORS 2 /* 32 outputs */
#define ROW_TILE 2
#endif
#define GROUP (16 * GROUP_VECTORS)
#define PACKED_PREFETCH 4096 /* bytes of the group ahead of the loads that are prefetched */

long specserve_packed_group(void) { return GROUP; }

static inline __attribute__((always_inline)) void packed_tile(const float *restrict x, long K,
                                                              const unsigned short *restrict blk,
                                                              const float *restrict bias, float *restrict y, long N,
                                                              long n_valid, const int mt, const int prefetch) {
    v16 acc[ROW_TILE][GROUP_VECTORS];
    for (int m = 0; m < mt; m++)
        for (int v = 0; v < GROUP_VECTORS; v++) acc[m][v] = (v16){0};
    for (long k = 0; k < K; k++) {
        const unsigned short *wk = blk + k * GROUP;
        if (prefetch)
            for (int b = 0; b < GROUP * 2; b += 64) __builtin_prefetch((const char *)wk + PACKED_PREFETCH + b, 0, 2);
        v16 w[GROUP_VECTORS];
        for (int v = 0; v < GROUP_VECTORS; v++) w[v] = load16_bf16(wk + 16 * v);
        for (int m = 0; m < mt; m++) {
            const v16 xb = splat16(x[m * K + k]);
            for (int v = 0; v < GROUP_VECTORS; v++) acc[m][v] += xb * w[v];
        }
    }
    for (int m = 0; m < mt; m++) {
        float out[GROUP];
        for (int v = 0; v < GROUP_VECTORS; v++) store16(out + 16 * v, acc[m][v]);
        for (long j = 0; j < n_valid; j++) y[m * N + j] = bias ? out[j] + bias[j] : out[j];
    }
}

static void packed_rows(const float *x, long K, const unsigned short *blk, const float *bias, float *y, long N,
                        long n_valid, int mt, int prefetch) {
    switch (mt) {
#if ROW_TILE >= 8
    case 8: packed_tile(x, K, blk, bias, y, N, n_valid, 8, prefetch); return;
    case 7: packed_tile(x, K, blk, bias, y, N, n_valid, 7, prefetch); return;
    case 6: packed_tile(x, K, blk, bias, y, N, n_valid, 6, prefetch); return;
    case 5: packed_tile(x, K, blk, bias, y, N, n_valid, 5, prefetch); return;
    case 4: packed_tile(x, K, blk, bias, y, N, n_valid, 4, prefetch); return;
    case 3: packed_tile(x, K, blk, bias, y, N, n_valid, 3, prefetch); return;
#endif
    case 2: packed_tile(x, K, blk, bias, y, N, n_valid, 2, prefetch); return;
    default: packed_tile(x, K, blk, bias, y, N, n_valid, 1, prefetch); return;
    }
}

/* x [M, K] fp32; wp [ceil(N / GROUP), K, GROUP] bf16 (pack_bf16); bias [N] or NULL; y [M, N]. */
void specserve_linear_f32_packed(const float *x, long M, long K, const unsigned short *wp, long N,
                                 const float *bias, float *y, int threads) {
    const long groups = (N + GROUP - 1) / GROUP;
    if (M * N * K < SERIAL_WORK) threads = 1;
    for (long m0 = 0; m0 < M; m0 += X_BLOCK) {
        const long m1 = M < m0 + X_BLOCK ? M : m0 + X_BLOCK;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
        for (long g = 0; g < groups; g++) {
            const long n0 = g * GROUP, n_valid = N - n0 < GROUP ? N - n0 : GROUP;
            const unsigned short *blk = wp + g * K * GROUP;
            for (long m = m0; m < m1; m += ROW_TILE) {
                const int mt = (int)(m1 - m < ROW_TILE ? m1 - m : ROW_TILE);
                packed_rows(x + m * K, K, blk, bias ? bias + n0 : 0, y + m * N + n0, N, n_valid, mt, m == m0);
            }
        }
    }
}

/* y = x @ w.T (+ bias) in fp32 on the CPU for a weight of bf16 numbers (a bf16 checkpoint run in fp32, as the
 * default verifier is), read from a packed bf16 copy: half the bytes of the fp32 weight, the same numbers
 * (widening a bf16 number to fp32 is exact: its 16 bits moved up, zeros below).
 *
 * Layout (cpu_linear.py's `pack_bf16`): groups of GROUP outputs, packed[g][k][j] = w[g * GROUP + j][k] (zeros
 * past N), so each k of a group is one contiguous run of GROUP numbers and a group is read front to back.
 *
 * Row-invariant by construction: each output y[m, n] is one chain of fused multiply-adds, acc = fma(x[m, k],
 * w[n, k], acc) for k = 0, 1, ..., K - 1 from acc = 0, then + bias. Its bits depend on x's row m and the weight
 * alone, whatever the number of rows (1, a decode step; k + 1, a verification pass; hundreds, a prefill), the
 * tiling or the threads. Every row count reads the packed copy, so there is one order per weight.
 *
 * The kernel broadcasts x[m, k] against GROUP weights (an outer product: no horizontal sums; each weight widened
 * once for up to ROW_TILE rows), which keeps the FMA units busy where cpu_linear.c's dot-product form is bound
 * by its shuffles and reloads. SmolLM2-135M's layers on this project's 2-core Xeon over 1, 8, 64 rows: 6.7,
 * 9.9, 51 ms (the dot-product kernel on a bf16 copy: 7.4, 11.7, 64 ms).
 */
#include "cpu_simd.h"

#define SERIAL_WORK (1L << 16) /* multiply-adds below which one thread does it all */
#define X_BLOCK 64             /* rows of x kept in cache while every group of w passes over them */

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

#if defined(__AVX512F__)
#define GROUP_VECTORS 3 /* 48 outputs a group */
#define ROW_TILE 8      /* 24 accumulators of 32 zmm registers: a verification pass of k <= 7 in one tile */
#else
#define GROUP_VECTORS 2 /* 32 outputs */
#define ROW_TILE 2
#endif
#define GROUP (16 * GROUP_VECTORS)
#define PACKED_PREFETCH 4096 /* bytes of the group ahead of the loads that are prefetched */

int specserve_amx_on(void);
long specserve_amx_group(void);
int specserve_linear_f32_amx(const float *x, long M, long K, const unsigned short *wp, long N, const float *bias,
                             float *y, int threads);

/* Outputs a group of the packed layout in use: cpu_amx.c's where the tile unit is on, else this kernel's. */
long specserve_packed_group(void) { return specserve_amx_on() ? specserve_amx_group() : GROUP; }

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

/* x [M, K] fp32; wp [ceil(N / GROUP), K, GROUP] bf16 (pack_bf16); bias [N] or NULL; y [M, N]. Where AMX is on
 * (cpu_amx.c), wp is in that kernel's layout and the call is its. */
void specserve_linear_f32_packed(const float *x, long M, long K, const unsigned short *wp, long N,
                                 const float *bias, float *y, int threads) {
    if (specserve_amx_on()) { /* the weight was packed in cpu_amx.c's layout: the tile unit takes every call */
        if (specserve_linear_f32_amx(x, M, K, wp, N, bias, y, threads) != 0)
            for (long i = 0; i < M * N; i++) y[i] = __builtin_nanf(""); /* out of memory: poison, not garbage */
        return;
    }
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

/* y = x @ w.T (+ bias) in fp32 for a weight of bf16 numbers, on the tile unit of an Intel CPU with AMX
 * (Sapphire Rapids on), read from a packed bf16 copy; cpu_packed.c hands every call to it where it is on.
 *
 * The tile unit multiplies bf16 numbers and sums their products in fp32. The weight's numbers are bf16 already;
 * x is not, so each x is split into three bf16 pieces that sum to it exactly, x = hi + mid + lo (a float's 24
 * significant bits are three times bf16's 8: hi is x cut to bf16, mid the rest cut to bf16, lo what remains).
 * Each piece times a weight is exact in fp32 (8 x 8 bits), so y = sum_k hi_k w_k + sum_k mid_k w_k +
 * sum_k lo_k w_k holds x's full value: no rounding of x, as the fp32 kernels; the three sums are fp32 sums,
 * added at the end small to large, ((lo + mid) + hi) + bias. Tested within K * 2^-23 of float64, and closer
 * to it than the outer-product kernel's one FMA chain (the small pieces' sums are not rounded at hi's scale).
 * The tile unit treats bf16 denormals as zero and flushes denormal results: a piece or weight below ~1e-38 in
 * magnitude counts as 0 (x itself loses nothing above ~2^-110). Weights must be finite (`exact_bf16` refuses
 * others: inf times a zero piece would be NaN).
 *
 * Row-invariant: the pieces of row m are tile rows 3r, 3r + 1, 3r + 2 of a 16-row tile of five source rows,
 * and the tile unit computes each row of its result from that row of A and all of B, in its one fixed order, so
 * a row's bits depend on the row and the weight alone: whatever the number of rows, their place in a tile, the
 * tiling or the threads (tests: rows alone = among 8 = among 70, on 1 or 2 threads).
 *
 * Layout (cpu_linear.py's `pack_bf16` when `amx_on()`): groups of GROUP outputs, K padded to KC with zeros;
 * packed[g][k / 2][j][k % 2] = w[g * GROUP + j][k], so the 16 pairs of k of a KC-chunk for 16 outputs are one
 * B tile (16 rows of 64 bytes, row stride GROUP * 4 bytes), and a group is read front to back.
 *
 * Speed: the tile unit does a 16 x 16 x 32 multiply in about 16 cycles, so a tile of five rows costs the
 * weight's streaming and little more. SmolLM2-135M's linear layers and output layer on this project's 2-core
 * Xeon, packed on 2 MB pages (bench/figures/2026-12-03-amx/linear_ab.py) over 1, 2, 4, 8, 16, 64 rows: 11.0,
 * 11.1, 11.8, 14.1, 17.6, 35.7 ms; the outer-product kernel 10.8, 11.2, 12.8, 15.2, 22.7, 68.5. What bounds it
 * is moving tiles (a tile load takes about as long as a multiply) and memory:
 * - a call of up to five rows configures tiles of its rows only (a decode step's three) and streams each group
 *   once: one pass over K with two accumulators; passes alternate between two sets of accumulator tiles, so
 *   storing one pass's results waits on nothing while the next runs (storing at once stalled the stream: +12%
 *   at one row); a group's first pass loads its weights with the non-temporal tile load (-5% at one row);
 * - 6 to 10 rows take two tiles of pieces against each weight tile loaded (a pair pass, four accumulators): all
 *   eight tiles in use, so its results are stored before the next group starts, and that wait makes 6-10 rows
 *   ~20% dearer than 5 (two single passes a group, or one per output half, were slower still);
 * - more rows: pair passes over the group from cache, the first streaming it.
 */
#include "cpu_simd.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512F__) && defined(__linux__)
#define HAVE_AMX 1
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define GROUP 32 /* outputs a group: two B tiles */
#define KC 32    /* k a tile */
#define SOURCE_ROWS 5
#define SERIAL_WORK (1L << 16) /* multiply-adds below which one thread does it all */
#define PREFETCH 2048 /* bytes of the group ahead of its first pass's tile loads that are prefetched (into L2) */

static int amx_on; /* set by specserve_amx_enable */

int specserve_amx_on(void) { return amx_on; }

long specserve_amx_group(void) { return GROUP; }

long specserve_amx_kc(void) { return KC; }

#ifdef HAVE_AMX
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* Ask Linux for the tile registers (a process asks once) and turn the kernel on; want = 0 turns it off. Returns
 * whether it is on. */
int specserve_amx_enable(int want) {
    amx_on = want && syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return amx_on;
}

typedef struct {
    unsigned char palette, start_row, reserved[14];
    unsigned short colsb[16];
    unsigned char rows[16];
} __attribute__((packed)) tile_config;

/* Tiles of 64-byte rows: A (pieces) 0 and 1 and the accumulators 4, 5 and 6, 7 of `rows` rows (fewer than 16
 * where a call has fewer rows of pieces: a decode step's one row is 3), B (weights) 2 and 3 of 16. */
static void configure_tiles(int rows) {
    tile_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) c.colsb[t] = 64, c.rows[t] = (unsigned char)(t == 2 || t == 3 ? 16 : rows);
    _tile_loadconfig(&c);
}

/* Row m of x as its three pieces, rows 3r, 3r + 1, 3r + 2 (r = m % 5) of tile m / 5 of `pieces` [tiles][16][Kp]
 * (zeros elsewhere). A piece is its float's top 16 bits: cut, not rounded, so the rest is exact. */
static void split_row(const float *x, long K, long Kp, unsigned short *hi) {
    unsigned short *mid = hi + Kp, *lo = hi + 2 * Kp;
    const __m512i top = _mm512_set1_epi32((int)0xffff0000u), exponent = _mm512_set1_epi32(0x7f800000);
    long k = 0;
    for (; k + 16 <= K; k += 16) {
        const __m512i u = _mm512_loadu_si512(x + k), h = _mm512_and_si512(u, top);
        __m512 rest = _mm512_sub_ps(_mm512_castsi512_ps(u), _mm512_castsi512_ps(h));
        /* an infinity or NaN is all hi (inf - inf would make the rest NaN) */
        rest = _mm512_mask_mov_ps(rest, _mm512_cmpeq_epi32_mask(_mm512_and_si512(u, exponent), exponent),
                                  _mm512_setzero_ps());
        const __m512i r = _mm512_castps_si512(rest), rh = _mm512_and_si512(r, top);
        const __m512i l = _mm512_castps_si512(_mm512_sub_ps(rest, _mm512_castsi512_ps(rh)));
        /* a NaN whose payload lies in the low 16 bits alone would be cut to an infinity: keep it a NaN */
        const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), exponent);
        const __m512i hu = _mm512_mask_or_epi32(u, nan, u, _mm512_set1_epi32(0x00400000));
        _mm256_storeu_si256((__m256i *)(hi + k), _mm512_cvtepi32_epi16(_mm512_srli_epi32(hu, 16)));
        _mm256_storeu_si256((__m256i *)(mid + k), _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
        _mm256_storeu_si256((__m256i *)(lo + k), _mm512_cvtepi32_epi16(_mm512_srli_epi32(l, 16)));
    }
    for (; k < K; k++) {
        uint32_t u, r, l;
        memcpy(&u, x + k, 4);
        const uint32_t h = u & 0xffff0000u;
        float hf, rest, rf;
        memcpy(&hf, &h, 4);
        rest = (u & 0x7f800000u) == 0x7f800000u ? 0.0f : x[k] - hf;
        memcpy(&r, &rest, 4);
        const uint32_t rh = r & 0xffff0000u;
        memcpy(&rf, &rh, 4);
        const float lf = rest - rf;
        memcpy(&l, &lf, 4);
        const uint32_t hu = (u & 0x7fffffffu) > 0x7f800000u ? u | 0x00400000u : u; /* a NaN stays a NaN */
        hi[k] = (unsigned short)(hu >> 16), mid[k] = (unsigned short)(r >> 16), lo[k] = (unsigned short)(l >> 16);
    }
    for (; k < Kp; k++) hi[k] = mid[k] = lo[k] = 0;
}

/* A KC-chunk of a group's weights ahead of its tile loads, into L2. */
static inline void prefetch_chunk(const char *p) {
    for (int l = 0; l < (KC / 2) * GROUP * 2 * 2; l += 64) __builtin_prefetch(p + l, 0, 2);
}

/* A KC-chunk of a group's weights into B tiles 2 and 3: on the group's first pass (streaming it from memory, used
 * again only from cache) with the non-temporal tile load. */
#define LOAD_WEIGHTS(b, first)                                                                                         \
    do {                                                                                                               \
        if (first) {                                                                                                   \
            _tile_stream_loadd(2, b, GROUP * 4);                                                                       \
            _tile_stream_loadd(3, (b) + 32, GROUP * 4);                                                                \
        } else {                                                                                                       \
            _tile_loadd(2, b, GROUP * 4);                                                                              \
            _tile_loadd(3, (b) + 32, GROUP * 4);                                                                       \
        }                                                                                                              \
    } while (0)

/* One pass: a tile of pieces (A) times a group's two B tiles over all of K, into accumulators C0, C1. */
#define PASS(A, C0, C1)                                                                                                \
    do {                                                                                                               \
        _tile_zero(C0);                                                                                                \
        _tile_zero(C1);                                                                                                \
        for (long kc = 0; kc < chunks; kc++) {                                                                         \
            const unsigned short *b = group + kc * (KC / 2) * GROUP * 2;                                               \
            if (ahead)                                                                                                 \
                prefetch_chunk((const char *)b + ahead);                                                               \
            _tile_loadd(A, a + kc * KC, Kp * 2);                                                                       \
            LOAD_WEIGHTS(b, ahead);                                                                                    \
            _tile_dpbf16ps(C0, A, 2);                                                                                  \
            _tile_dpbf16ps(C1, A, 3);                                                                                  \
        }                                                                                                              \
    } while (0)

/* Two tiles of pieces (A 0 and 1) times a group's two B tiles: accumulators 4, 5 (tile 0) and 6, 7 (tile 1). */
#define PAIR_PASS()                                                                                                    \
    do {                                                                                                               \
        _tile_zero(4);                                                                                                 \
        _tile_zero(5);                                                                                                 \
        _tile_zero(6);                                                                                                 \
        _tile_zero(7);                                                                                                 \
        for (long kc = 0; kc < chunks; kc++) {                                                                         \
            const unsigned short *b = group + kc * (KC / 2) * GROUP * 2;                                               \
            if (ahead)                                                                                                 \
                prefetch_chunk((const char *)b + ahead);                                                               \
            _tile_loadd(0, a + kc * KC, Kp * 2);                                                                       \
            LOAD_WEIGHTS(b, ahead);                                                                                    \
            _tile_dpbf16ps(4, 0, 2);                                                                                   \
            _tile_dpbf16ps(5, 0, 3);                                                                                   \
            _tile_loadd(1, a1 + kc * KC, Kp * 2);                                                                      \
            _tile_dpbf16ps(6, 1, 2);                                                                                   \
            _tile_dpbf16ps(7, 1, 3);                                                                                   \
        }                                                                                                              \
    } while (0)

typedef struct {
    long m0, n0;
    int rows, set; /* rows < 0: nothing pending */
} pending_pass;

/* Store a finished pass's accumulators and write its rows of y: ((lo + mid) + hi) + bias. */
static void finish(pending_pass p, long N, const float *bias, float *y) {
    float c[2][16][16] __attribute__((aligned(64)));
    if (p.set == 0) {
        _tile_stored(4, c[0], 64);
        _tile_stored(5, c[1], 64);
    } else {
        _tile_stored(6, c[0], 64);
        _tile_stored(7, c[1], 64);
    }
    for (int h = 0; h < 2; h++) {
        const long n = p.n0 + 16 * h, left = N - n;
        if (left <= 0) break;
        const __mmask16 mask = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
        const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + n) : _mm512_setzero_ps();
        for (int r = 0; r < p.rows; r++) {
            __m512 v = _mm512_add_ps(_mm512_load_ps(c[h][3 * r + 2]), _mm512_load_ps(c[h][3 * r + 1]));
            v = _mm512_add_ps(v, _mm512_load_ps(c[h][3 * r]));
            if (bias) v = _mm512_add_ps(v, b);
            _mm512_mask_storeu_ps(y + (p.m0 + r) * N + n, mask, v);
        }
    }
}

static __thread unsigned short *scratch;
static __thread long scratch_size;

/* x [M, K] fp32; wp [ceil(N / GROUP), Kp / 2, GROUP, 2] bf16 (pack_bf16); bias [N] or NULL; y [M, N]. Returns
 * 0, or -1 where the pieces' scratch could not be had (nothing written). */
int specserve_linear_f32_amx(const float *x, long M, long K, const unsigned short *wp, long N, const float *bias,
                             float *y, int threads) {
    const long Kp = (K + KC - 1) / KC * KC, chunks = Kp / KC, groups = (N + GROUP - 1) / GROUP;
    const long tiles = (M + SOURCE_ROWS - 1) / SOURCE_ROWS, need = tiles * 16 * Kp;
    if (need > scratch_size) {
        free(scratch);
        scratch = aligned_alloc(64, ((size_t)need * 2 + 63) / 64 * 64);
        scratch_size = scratch ? need : 0;
        if (!scratch) return -1;
    }
    unsigned short *pieces = scratch;
    if (M * N * K < SERIAL_WORK) threads = 1;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#pragma omp for schedule(static)
        for (long t = 0; t < tiles; t++) {
            unsigned short *tile = pieces + t * 16 * Kp;
            const long rows = M - t * SOURCE_ROWS < SOURCE_ROWS ? M - t * SOURCE_ROWS : SOURCE_ROWS;
            for (long r = 0; r < rows; r++) split_row(x + (t * SOURCE_ROWS + r) * K, K, Kp, tile + 3 * r * Kp);
            memset(tile + 3 * rows * Kp, 0, (size_t)(16 - 3 * rows) * Kp * 2);
        }
        configure_tiles(tiles == 1 ? (int)(3 * M) : 16);
        pending_pass pending = {0, 0, -1, 0};
        int set = 0;
#pragma omp for schedule(static)
        for (long g = 0; g < groups; g++) {
            const unsigned short *group = wp + g * Kp * GROUP;
            for (long t = 0; t < tiles; t += 2) {
                const unsigned short *a = pieces + t * 16 * Kp, *a1 = a + 16 * Kp;
                const long ahead = t == 0 ? PREFETCH : 0; /* the first pass streams the group, the rest hit cache */
                const long rows = M - t * SOURCE_ROWS < SOURCE_ROWS ? M - t * SOURCE_ROWS : SOURCE_ROWS;
                if (t + 1 < tiles) { /* two tiles of rows: four accumulators, each weight tile loaded once */
                    if (pending.rows >= 0) finish(pending, N, bias, y);
                    PAIR_PASS();
                    const long rest = M - (t + 1) * SOURCE_ROWS < SOURCE_ROWS ? M - (t + 1) * SOURCE_ROWS : SOURCE_ROWS;
                    finish((pending_pass){t * SOURCE_ROWS, g * GROUP, (int)rows, 0}, N, bias, y);
                    finish((pending_pass){(t + 1) * SOURCE_ROWS, g * GROUP, (int)rest, 1}, N, bias, y);
                    pending.rows = -1;
                    continue;
                }
                if (set == 0) /* one tile: alternate accumulator sets, finishing each pass during the next */
                    PASS(0, 4, 5);
                else
                    PASS(1, 6, 7);
                if (pending.rows >= 0) finish(pending, N, bias, y);
                pending = (pending_pass){t * SOURCE_ROWS, g * GROUP, (int)rows, set};
                set ^= 1;
            }
        }
        if (pending.rows >= 0) finish(pending, N, bias, y);
        _tile_release();
    }
    return 0;
}
#else
int specserve_amx_enable(int want) {
    (void)want;
    return amx_on = 0;
}

int specserve_linear_f32_amx(const float *x, long M, long K, const unsigned short *wp, long N, const float *bias,
                             float *y, int threads) {
    (void)x, (void)M, (void)K, (void)wp, (void)N, (void)bias, (void)y, (void)threads;
    return -1;
}
#endif

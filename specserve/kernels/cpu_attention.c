/* Attention over the paged KV cache in fp32 on the CPU: every query row on its own, read through the slot table.
 *
 * Why in C: torch's path gathers each request's keys and values into a dense tensor, layer after layer, unless
 * its blocks happen to lie in order (a pool that has served a few requests hands them out in another), builds
 * a padded mask, and pays SDPA's dispatch for a few query rows (90 us a layer for one decode row of SmolLM2).
 * Here each query row reads its own context's slots directly: no gather, no padding, no mask.
 *
 * Row-invariant by construction: a query row's output depends on its own query, its context length and the
 * cache, never on the other rows or requests of the batch or on the thread count (work is split by row and KV
 * head, and each row's sums run in one fixed order): a verification pass attends exactly as the decode steps
 * it replaces, and a batch of requests exactly as each alone.
 *
 * Numerics: scores q.k * scale (sixteen lanes and cpu_simd.h's tree), softmax with the row's maximum subtracted,
 * exp by a degree-6 polynomial after exact range reduction (within 2 ulp of expf), probabilities summed in
 * context order, and sum_j p_j v_j / sum_j p_j. SDPA orders its sums otherwise: last-bit differences.
 */
#include <math.h>
#include <stdlib.h>

#include "cpu_simd.h"

#define SERIAL_WORK (1L << 17) /* multiply-adds below which one thread does it all */

static inline float dot(const float *a, const float *b, long D) {
    v16 acc = {0};
    const long d16 = D & ~15L;
    for (long d = 0; d < d16; d += 16) acc += load16(a + d) * load16(b + d);
    float s = lanes_sum(acc);
    for (long d = d16; d < D; d++) s = __builtin_fmaf(a[d], b[d], s);
    return s;
}

#ifdef HAVE_SUMS16
#define BLOCKED_SCORES 1
#endif

/* The largest of n numbers (order does not matter for a maximum). */
static float maximum_of(const float *s, long n) {
    v16 m = (v16){0} - INFINITY;
    const long n16 = n & ~15L;
    for (long j = 0; j < n16; j += 16) {
        const v16 v = load16(s + j);
        const i16v more = v > m;
        m = float_of((bits_of(v) & more) | (bits_of(m) & ~more));
    }
    float out = -INFINITY;
    for (int i = 0; i < 16; i++) out = m[i] > out ? m[i] : out;
    for (long j = n16; j < n; j++) out = s[j] > out ? s[j] : out;
    return out;
}

/* s[j] = exp(s[j] - shift) for j < n, returning their sum, summed in the linear kernel's order (sixteen lanes,
 * lanes_sum, the tail in turn). */
static float exp_and_sum(float *s, long n, float shift) {
    v16 acc = {0};
    const long n16 = n & ~15L;
    for (long j = 0; j < n16; j += 16) {
        const v16 e = exp16(load16(s + j) - shift);
        store16(s + j, e);
        acc += e;
    }
    float total = lanes_sum(acc);
    if (n16 < n) { /* the tail through a padded vector: the same polynomial */
        float tail[16] = {0};
        for (long j = n16; j < n; j++) tail[j - n16] = s[j] - shift;
        const v16 e = exp16(load16(tail));
        memcpy(tail, &e, sizeof tail);
        for (long j = n16; j < n; j++) {
            s[j] = tail[j - n16];
            total += s[j];
        }
    }
    return total;
}

/* The queries one work unit serves: some rows of one request (consecutive in the batch) and the query heads of one
 * KV head, so every block of keys and values is brought into L1 once and used by all of them (a decode step's
 * three heads per KV head, a verification pass's rows times three). Their sums run exactly as one query alone
 * would run them (the same operations in the same order per query; only the interleaving differs). */
typedef struct {
    const float *q;     /* the first query row's [H, D] */
    const long *slots;  /* the request's slot table */
    const long *length; /* per row: context positions it sees */
    long rows;          /* rows in this unit */
    long kvh;           /* the KV head */
    long g0, g1;        /* its query heads kvh * G + g for g0 <= g < g1 */
    float *out;         /* the first row's [H, D] output */
} unit_t;

#define KEY_BLOCK 16  /* keys per score block: sums16's width */
#define VALUE_BLOCK 64 /* values per block of sum_j p_j v_j: 16 KB at D = 64 */
#define MAX_ROWS 8    /* rows per unit: bounds the scratch, and splits a prefill into many units */
#define PREFETCH_BLOCKS 2 /* key blocks ahead whose keys a unit asks for (1, 2 or 4: the same) */

/* One position's D numbers into L2 (a hint: no fault, no change to any result). */
static inline void prefetch_row(const float *p, long D) {
    for (long d = 0; d < D; d += 16) __builtin_prefetch(p + d, 0, 2);
}

/* Scores of every query of the unit: scores[(r * G + g) * stride + j] for j below row r's length. */
static void unit_scores(const unit_t *u, const float *k_cache, const float *v_cache, long H, long G, long KVH,
                        long D, float scale, float *scores, long stride) {
    long longest = 0;
    for (long r = 0; r < u->rows; r++) longest = u->length[r] > longest ? u->length[r] : longest;
    long j = 0;
#ifdef BLOCKED_SCORES
    if ((D & 15) == 0) {
        for (; j + KEY_BLOCK <= longest; j += KEY_BLOCK) {
            const float *keys[KEY_BLOCK];
            for (int i = 0; i < KEY_BLOCK; i++) keys[i] = k_cache + (u->slots[j + i] * KVH + u->kvh) * D;
            /* the keys two blocks on, and this block's values (read after the softmax), asked into L2 while this
             * block's sums run: a forward's linear layers have pushed this layer's cache out to memory (8 rows after
             * 512 tokens, 30 layers: 17.17 -> 16.82 ms a forward; one row unchanged) */
            for (int i = 0; i < KEY_BLOCK; i++) {
                const long ahead = j + PREFETCH_BLOCKS * KEY_BLOCK + i;
                if (ahead < longest) prefetch_row(k_cache + (u->slots[ahead] * KVH + u->kvh) * D, D);
                prefetch_row(v_cache + (u->slots[j + i] * KVH + u->kvh) * D, D);
            }
            for (long r = 0; r < u->rows; r++) {
                if (j + KEY_BLOCK > u->length[r]) continue; /* this row's tail: below, one key at a time */
                for (long g = u->g0; g < u->g1; g++) {
                    const float *q = u->q + (r * H + u->kvh * G + g) * D;
                    v16 acc[KEY_BLOCK];
                    for (int i = 0; i < KEY_BLOCK; i++) acc[i] = (v16){0};
                    for (long d = 0; d < D; d += 16) {
                        const v16 qv = load16(q + d);
                        for (int i = 0; i < KEY_BLOCK; i++) acc[i] += qv * load16(keys[i] + d);
                    }
                    store16(scores + (r * G + g) * stride + j, sums16(acc) * scale);
                }
            }
        }
    }
#endif
    for (long r = 0; r < u->rows; r++) {
        const long len = u->length[r];
        long start = 0;
#ifdef BLOCKED_SCORES
        if ((D & 15) == 0) start = len - len % KEY_BLOCK; /* the positions after this row's last whole block */
#endif
        for (long g = u->g0; g < u->g1; g++) {
            const float *q = u->q + (r * H + u->kvh * G + g) * D;
            float *s = scores + (r * G + g) * stride;
            for (long i = start; i < len; i++) s[i] = dot(q, k_cache + (u->slots[i] * KVH + u->kvh) * D, D) * scale;
        }
    }
}

#define HEAD_BLOCK 3

/* acc[h] += p[h][j] v for the nh heads, v the 64 values from d0 at position j's slot (loaded once for all). */
static inline __attribute__((always_inline)) void add_position(v16 (*acc)[4], const float *const *p, const int nh,
                                                               long j, const float *v) {
    const v16 v0 = load16(v), v1 = load16(v + 16), v2 = load16(v + 32), v3 = load16(v + 48);
    for (int h = 0; h < nh; h++) {
        const float pj = p[h][j];
        acc[h][0] += pj * v0;
        acc[h][1] += pj * v1;
        acc[h][2] += pj * v2;
        acc[h][3] += pj * v3;
    }
}

/* Accumulate sum_j p_j v_j over positions j0 <= j < stop for up to HEAD_BLOCK query heads of one row (the same
 * positions), 64 outputs from d0: per query the even positions in order into e, the odd ones into o (one chain of
 * four would wait on the adder). Each value vector is loaded once for all the heads. */
static inline __attribute__((always_inline)) void values_of_heads(const float *const *p, v16 *const *a, const int nh,
                                                                  const float *v_cache, const long *slots, long KVH,
                                                                  long kvh, long D, long d0, long j0, long stop) {
    v16 e[HEAD_BLOCK][4], o[HEAD_BLOCK][4];
    for (int h = 0; h < nh; h++)
        for (int c = 0; c < 4; c++) e[h][c] = a[h][c], o[h][c] = a[h][4 + c];
    long j = j0;
    for (; j + 1 < stop; j += 2) {
        add_position(e, p, nh, j, v_cache + (slots[j] * KVH + kvh) * D + d0);
        add_position(o, p, nh, j + 1, v_cache + (slots[j + 1] * KVH + kvh) * D + d0);
    }
    if (j < stop) /* the row's last position, an even one (blocks hold an even count) */
        add_position(e, p, nh, j, v_cache + (slots[j] * KVH + kvh) * D + d0);
    for (int h = 0; h < nh; h++)
        for (int c = 0; c < 4; c++) a[h][c] = e[h][c], a[h][4 + c] = o[h][c];
}

/* out = sum_j p_j v_j / total for each query of the unit, 64 outputs at a time (values_of_heads: per query the
 * even and the odd positions in two chains, then the two added). Values come in blocks of VALUE_BLOCK positions
 * used by every query; each query's accumulators are kept in `acc` between blocks, so its chains run in the same
 * order as over the whole context at once. */
static void unit_values(const unit_t *u, const float *v_cache, long H, long G, long KVH, long D, const float *scores,
                        long stride, const float *totals, v16 *acc) {
    long longest = 0;
    for (long r = 0; r < u->rows; r++) longest = u->length[r] > longest ? u->length[r] : longest;
    const long Q = u->rows * G;
    for (long d0 = 0; d0 + 64 <= D; d0 += 64) {
        for (long i = 0; i < 8 * Q; i++) acc[i] = (v16){0};
        for (long j0 = 0; j0 < longest; j0 += VALUE_BLOCK) {
            for (long r = 0; r < u->rows; r++) {
                const long len = u->length[r], stop = j0 + VALUE_BLOCK < len ? j0 + VALUE_BLOCK : len;
                if (j0 >= len) continue;
                for (long g = u->g0; g < u->g1; g += HEAD_BLOCK) {
                    const float *p[HEAD_BLOCK];
                    v16 *a[HEAD_BLOCK];
                    const int nh = (int)(u->g1 - g < HEAD_BLOCK ? u->g1 - g : HEAD_BLOCK);
                    for (int h = 0; h < nh; h++) p[h] = scores + (r * G + g + h) * stride, a[h] = acc + 8 * (r * G + g + h);
                    if (nh == 3)
                        values_of_heads(p, a, 3, v_cache, u->slots, KVH, u->kvh, D, d0, j0, stop);
                    else if (nh == 2)
                        values_of_heads(p, a, 2, v_cache, u->slots, KVH, u->kvh, D, d0, j0, stop);
                    else
                        values_of_heads(p, a, 1, v_cache, u->slots, KVH, u->kvh, D, d0, j0, stop);
                }
            }
        }
        for (long r = 0; r < u->rows; r++)
            for (long g = u->g0; g < u->g1; g++) {
                const v16 *a = acc + 8 * (r * G + g);
                const float total = totals[r * G + g];
                float *o = u->out + (r * H + u->kvh * G + g) * D + d0;
                store16(o, (a[0] + a[4]) / total);
                store16(o + 16, (a[1] + a[5]) / total);
                store16(o + 32, (a[2] + a[6]) / total);
                store16(o + 48, (a[3] + a[7]) / total);
            }
    }
    for (long d = D - D % 64; d < D; d++) /* dimensions past the last 64: one at a time, in context order */
        for (long r = 0; r < u->rows; r++)
            for (long g = u->g0; g < u->g1; g++) {
                const float *p = scores + (r * G + g) * stride;
                float sum = 0.0f;
                for (long j = 0; j < u->length[r]; j++)
                    sum = __builtin_fmaf(p[j], v_cache[(u->slots[j] * KVH + u->kvh) * D + d], sum);
                u->out[(r * H + u->kvh * G + g) * D + d] = sum / totals[r * G + g];
            }
}

/* Each thread's scratch (scores, totals, accumulators), kept from call to call and grown when a call needs more:
 * allocating it per call would map and fault fresh pages for every layer of a long context. */
static float *thread_scratch(size_t floats) {
    static __thread float *buffer;
    static __thread size_t capacity;
    if (floats > capacity) {
        free(buffer);
        capacity = 0;
        buffer = aligned_alloc(64, ((floats * sizeof(float) + 63) / 64) * 64);
        if (buffer) capacity = floats;
    }
    return buffer;
}

static void run_unit(const unit_t *u, const float *k_cache, const float *v_cache, long H, long G, long KVH, long D,
                     float scale, float *scores, long stride, float *totals, v16 *acc) {
    unit_scores(u, k_cache, v_cache, H, G, KVH, D, scale, scores, stride);
    for (long r = 0; r < u->rows; r++)
        for (long g = u->g0; g < u->g1; g++) {
            float *s = scores + (r * G + g) * stride;
            totals[r * G + g] = exp_and_sum(s, u->length[r], maximum_of(s, u->length[r]));
        }
    unit_values(u, v_cache, H, G, KVH, D, scores, stride, totals, acc);
}

/* q [T, H, D]; k_cache, v_cache [S, KVH, D]; slots [B, max_ctx]; row_request, row_length [T]: the request of
 * each query row (a request's rows consecutive) and how many context positions it sees (its position + 1);
 * out [T, H, D]. Returns 0, or -1 when no scratch memory could be had (out is then incomplete). */
int specserve_paged_attention_f32(const float *q, const float *k_cache, const float *v_cache, const long *slots,
                                   long max_ctx, const long *row_request, const long *row_length, long T, long H,
                                   long KVH, long D, float scale, float *out, int threads) {
    const long G = H / KVH;
    long work = 0;
    for (long t = 0; t < T; t++) work += row_length[t];
    if (work * H * D * 2 < SERIAL_WORK) threads = 1;
    /* units: runs of at most MAX_ROWS rows of one request, times the KV heads. Where that leaves a thread idle
     * or waiting, runs are cut shorter (a verification pass of one request on two threads: 2 x 3 units), and a
     * single row's query heads are split too (a decode step: 3 x 2 units) */
    long runs = 0;
    for (long t = 0; t < T; runs++) {
        const long first = t;
        while (t < T && row_request[t] == row_request[first] && t - first < MAX_ROWS) t++;
    }
    long rows_per_unit = MAX_ROWS, head_parts = 1;
    if (runs * KVH < 2L * threads) {
        if (T > 1)
            rows_per_unit = (T + 1) / 2 < MAX_ROWS ? (T + 1) / 2 : MAX_ROWS;
        else if (G > 1)
            head_parts = 2;
    }
    long n = 0;
    unit_t stack_units[64];
    unit_t *units = stack_units;
    const long most = T * KVH * head_parts; /* at most one unit per row, KV head and part of its heads */
    if (most > 64 && !(units = malloc(sizeof(unit_t) * (size_t)most))) return -1;
    /* a request's units KV head by KV head: the threads' static shares then hold whole KV heads where they can,
     * so a head's keys and values come from memory once and are read again from the same core's L2 */
    for (long t = 0; t < T;) {
        const long start = t;
        while (t < T && row_request[t] == row_request[start]) t++;
        for (long h = 0; h < KVH; h++)
            for (long first = start; first < t; first += rows_per_unit) {
                const long rows = t - first < rows_per_unit ? t - first : rows_per_unit;
                for (long part = 0; part < head_parts; part++)
                    units[n++] = (unit_t){q + first * H * D, slots + row_request[first] * max_ctx, row_length + first,
                                          rows, h, G * part / head_parts, G * (part + 1) / head_parts,
                                          out + first * H * D};
            }
    }
    int failed = 0;
    const long stride = (max_ctx > 0 ? max_ctx : 1) + 16, Q = rows_per_unit * G;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(| : failed)
    {
        float *scratch = thread_scratch((size_t)(stride * Q + Q + 16 * 8 * Q));
        failed |= scratch == NULL;
#pragma omp for schedule(static)
        for (long i = 0; i < n; i++)
            if (scratch)
                run_unit(units + i, k_cache, v_cache, H, G, KVH, D, scale, scratch + 16 * 8 * Q, stride,
                         scratch + 16 * 8 * Q + stride * Q, (v16 *)scratch);
    }
    if (units != stack_units) free(units);
    return failed ? -1 : 0;
}

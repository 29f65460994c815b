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
#define STACK_SCORES 4096      /* context positions whose scores fit on the stack (more: malloc) */

static inline float dot(const float *a, const float *b, long D) {
    v16 acc = {0};
    const long d16 = D & ~15L;
    for (long d = 0; d < d16; d += 16) acc += load16(a + d) * load16(b + d);
    float s = lanes_sum(acc);
    for (long d = d16; d < D; d++) s = __builtin_fmaf(a[d], b[d], s);
    return s;
}

#if defined(__GNUC__) && !defined(__clang__)
#define BLOCKED_SCORES 1
/* The sums of sixteen accumulators, lane i holding acc[i]'s, each summed exactly as lanes_sum sums it (pairwise:
 * lane j with j + 8, then j + 4, then j + 2, then j + 1): a transposing tree, 30 shuffles and adds instead of
 * sixteen trees. */
static inline v16 sums16(const v16 *acc) {
    const i16v l1a = {0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23};
    const i16v l1b = {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31};
    const i16v l2a = {0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27};
    const i16v l2b = {4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31};
    const i16v l3a = {0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29};
    const i16v l3b = {2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31};
    const i16v l4a = {0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30};
    const i16v l4b = {1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31};
    v16 b[8], c[4], d[2];
    for (int i = 0; i < 8; i++)
        b[i] = __builtin_shuffle(acc[2 * i], acc[2 * i + 1], l1a) + __builtin_shuffle(acc[2 * i], acc[2 * i + 1], l1b);
    for (int i = 0; i < 4; i++)
        c[i] = __builtin_shuffle(b[2 * i], b[2 * i + 1], l2a) + __builtin_shuffle(b[2 * i], b[2 * i + 1], l2b);
    for (int i = 0; i < 2; i++)
        d[i] = __builtin_shuffle(c[2 * i], c[2 * i + 1], l3a) + __builtin_shuffle(c[2 * i], c[2 * i + 1], l3b);
    return __builtin_shuffle(d[0], d[1], l4a) + __builtin_shuffle(d[0], d[1], l4b);
}
#endif

/* scores[j] = q . k_j * scale for the row's first `len` positions, each dot summed as dot() sums it. */
static void row_scores(const float *q, const float *k_cache, const long *slots, long len, long kvh, long KVH, long D,
                       float scale, float *scores) {
    long j = 0;
#ifdef BLOCKED_SCORES
    if ((D & 15) == 0) {
        for (; j + 16 <= len; j += 16) {
            const float *keys[16];
            for (int i = 0; i < 16; i++) keys[i] = k_cache + (slots[j + i] * KVH + kvh) * D;
            v16 acc[16];
            for (int i = 0; i < 16; i++) acc[i] = (v16){0};
            for (long d = 0; d < D; d += 16) {
                const v16 qv = load16(q + d);
                for (int i = 0; i < 16; i++) acc[i] += qv * load16(keys[i] + d);
            }
            store16(scores + j, sums16(acc) * scale);
        }
    }
#endif
    for (; j < len; j++) scores[j] = dot(q, k_cache + (slots[j] * KVH + kvh) * D, D) * scale;
}

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

/* One query row and one query head (of KV head kvh) against the row's first `len` context positions. */
static void row_head(const float *qh, const float *k_cache, const float *v_cache, const long *slots, long len,
                     long kvh, long KVH, long D, float scale, float *o, float *scores) {
    row_scores(qh, k_cache, slots, len, kvh, KVH, D, scale, scores);
    const float total = exp_and_sum(scores, len, maximum_of(scores, len));
    for (long d0 = 0; d0 < D; d0 += 64) {
        if (D - d0 >= 64) {
            /* sum_j p_j v_j, 64 outputs at a time: the even positions in order and the odd ones in order, in
             * eight registers (one chain of four would wait on the adder), then the two added */
            v16 e0 = {0}, e1 = {0}, e2 = {0}, e3 = {0}, o0 = {0}, o1 = {0}, o2 = {0}, o3 = {0};
            long j = 0;
            for (; j + 1 < len; j += 2) {
                const float *v = v_cache + (slots[j] * KVH + kvh) * D + d0;
                const float *w = v_cache + (slots[j + 1] * KVH + kvh) * D + d0;
                const float p = scores[j], r = scores[j + 1];
                e0 += p * load16(v);
                e1 += p * load16(v + 16);
                e2 += p * load16(v + 32);
                e3 += p * load16(v + 48);
                o0 += r * load16(w);
                o1 += r * load16(w + 16);
                o2 += r * load16(w + 32);
                o3 += r * load16(w + 48);
            }
            if (j < len) { /* the last, even position */
                const float *v = v_cache + (slots[j] * KVH + kvh) * D + d0;
                const float p = scores[j];
                e0 += p * load16(v);
                e1 += p * load16(v + 16);
                e2 += p * load16(v + 32);
                e3 += p * load16(v + 48);
            }
            store16(o + d0, (e0 + o0) / total);
            store16(o + d0 + 16, (e1 + o1) / total);
            store16(o + d0 + 32, (e2 + o2) / total);
            store16(o + d0 + 48, (e3 + o3) / total);
        } else {
            for (long d = d0; d < D; d++) {
                float acc = 0.0f;
                for (long j = 0; j < len; j++)
                    acc = __builtin_fmaf(scores[j], v_cache[(slots[j] * KVH + kvh) * D + d], acc);
                o[d] = acc / total;
            }
        }
    }
}

/* q [T, H, D]; k_cache, v_cache [S, KVH, D]; slots [B, max_ctx]; row_request, row_length [T]: the request of
 * each query row and how many context positions it sees (its position + 1); out [T, H, D]. Returns 0, or -1
 * when no scratch memory could be had (out is then incomplete). */
int specserve_paged_attention_f32(const float *q, const float *k_cache, const float *v_cache, const long *slots,
                                   long max_ctx, const long *row_request, const long *row_length, long T, long H,
                                   long KVH, long D, float scale, float *out, int threads) {
    const long G = H / KVH;
    long work = 0;
    for (long t = 0; t < T; t++) work += row_length[t];
    if (work * H * D * 2 < SERIAL_WORK) threads = 1;
    const long units = T * H; /* a row and a query head each: a decode step's 9 heads split 5 / 4 on 2 threads */
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1) reduction(| : failed)
    {
        float stack[STACK_SCORES];
        const long need = max_ctx > 0 ? max_ctx : 1;
        float *scores = need <= STACK_SCORES ? stack : malloc(sizeof(float) * (size_t)need);
        failed |= scores == NULL;
#pragma omp for schedule(static)
        for (long u = 0; u < units; u++) {
            const long t = u / H, h = u % H;
            if (scores)
                row_head(q + (t * H + h) * D, k_cache, v_cache, slots + row_request[t] * max_ctx, row_length[t],
                         h / G, KVH, D, scale, out + (t * H + h) * D, scores);
        }
        if (scores != stack) free(scores);
    }
    return failed ? -1 : 0;
}

/* What the CPU kernels share: sixteen fp32 lanes (GCC's vector extension: AVX-512, AVX2 or NEON) and the one
 * fixed order in which they are summed, so a reduction's bits depend on its length only. */
#ifndef SPECSERVE_CPU_SIMD_H
#define SPECSERVE_CPU_SIMD_H

#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

typedef float v16 __attribute__((vector_size(64)));

static inline v16 load16(const float *p) {
    v16 v;
    memcpy(&v, p, sizeof v); /* an unaligned load */
    return v;
}

static inline void store16(float *p, v16 v) { memcpy(p, &v, sizeof v); }

/* s in all sixteen lanes: one broadcast from memory (`(v16){0} + s` would add, and could not drop the add: it
 * turns -0 into +0). */
static inline v16 splat16(float s) {
#if defined(__AVX512F__)
    return (v16)_mm512_set1_ps(s);
#else
    v16 v;
    for (int i = 0; i < 16; i++) v[i] = s;
    return v;
#endif
}

/* The sixteen lanes in one fixed order: pairwise, 8 + 8, 4 + 4, 2 + 2, 1 + 1. */
static inline float lanes_sum(v16 a) {
    float t[16], h[8], q[4];
    memcpy(t, &a, sizeof t);
    for (int j = 0; j < 8; j++) h[j] = t[j] + t[j + 8];
    for (int j = 0; j < 4; j++) q[j] = h[j] + h[j + 4];
    float p0 = q[0] + q[2], p1 = q[1] + q[3];
    return p0 + p1;
}

typedef int32_t i16v __attribute__((vector_size(64)));

static inline i16v bits_of(v16 v) {
    i16v b;
    memcpy(&b, &v, sizeof b);
    return b;
}

static inline v16 float_of(i16v b) {
    v16 v;
    memcpy(&v, &b, sizeof v);
    return v;
}

#if defined(__GNUC__) && !defined(__clang__)
#define HAVE_SUMS16 1
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

/* exp(x), sixteen at a time, within 2 ulp of expf: x = n ln 2 + r exactly (ln 2 in two parts), a degree-6
 * polynomial for exp(r), times 2^n. Below -87.3 it is 0; above 88.7, +inf. One fixed sequence of operations, so
 * its bits depend on x alone. */
static inline v16 exp16(v16 x) {
    const v16 floor_ = (v16){0} - 87.3f, ceiling = (v16){0} + 88.7f;
    const i16v under = x < floor_, over = x > ceiling;                      /* -1 where out of range */
    x = float_of((bits_of(x) & ~(under | over)) | (bits_of(floor_) & under) | (bits_of(ceiling) & over));
    const v16 magic = (v16){0} + 12582912.0f;                              /* 1.5 * 2^23: + it rounds */
    const v16 n = (x * 1.44269504088896341f + magic) - magic;               /* round(x / ln 2) */
    v16 r = x - n * 0.693359375f;                                           /* ln 2, high part: exact */
    r = r - n * -2.12194440e-4f;                                            /* ln 2, low part */
    v16 p = (v16){0} + 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * (r * r) + r + 1.0f;
    /* 2^n in two halves (n up to 128 would overflow one exponent field) */
    const i16v n_int = __builtin_convertvector(n, i16v);
    const i16v half_n = n_int >> 1;
    const v16 scale_a = float_of((half_n + 127) << 23), scale_b = float_of((n_int - half_n + 127) << 23);
    const v16 inf = (v16){0} + __builtin_inff();
    const v16 out = (p * scale_a) * scale_b;
    return float_of((bits_of(out) & ~(under | over)) | (bits_of(inf) & over));
}

#endif

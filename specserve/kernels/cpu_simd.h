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

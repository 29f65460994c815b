/* What the CPU kernels share: sixteen fp32 lanes (GCC's vector extension: AVX-512, AVX2 or NEON) and the one
 * fixed order in which they are summed, so a reduction's bits depend on its length only. */
#ifndef SPECSERVE_CPU_SIMD_H
#define SPECSERVE_CPU_SIMD_H

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

#endif

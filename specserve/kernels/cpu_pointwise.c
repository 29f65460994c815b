/* The elementwise steps of an fp32 decoder layer on the CPU: rotary position embedding of the queries and keys
 * (in place, in the fused q/k/v projection's output) and SwiGLU's silu(gate) * up.
 *
 * Why in C: each is four or five torch calls on a few rows, whose cost is dispatch run with caches a linear layer
 * has just flushed (see cpu_norm.c); here each is one call.
 *
 * Numerics: rotary computes HF's x * cos + rotate_half(x) * sin as torch does, each product rounded and then
 * added (no fused multiply-add: the function is compiled without contraction), the same bits as torch's path.
 * silu(g) * u = g / (1 + exp(-g)) * u with cpu_simd.h's exp: within a few ulp of torch's, and of one fixed
 * sequence of operations per element, so a row's bits never depend on the rows beside it.
 */
#include "cpu_simd.h"

/* x [T, W] rows; in each, heads 0..H-1 of D numbers from column 0 (queries then keys) are rotated in place:
 * x_i * cos_i + x_{(i + D/2) % D} * ssin_i, with ssin the sine whose first half is negated (cos, ssin [T, D]). */
__attribute__((optimize("fp-contract=off"))) void specserve_rotary_f32(float *x, long T, long W, long H, long D,
                                                                        const float *cos, const float *ssin) {
#if defined(__clang__)
#pragma clang fp contract(off) /* clang ignores GCC's optimize attribute */
#endif
    float tmp[512];
    if (D > 512 || D % 2) return; /* the caller checks: never reached */
    const long half = D / 2;
    for (long t = 0; t < T; t++) {
        const float *c = cos + t * D, *s = ssin + t * D;
        for (long h = 0; h < H; h++) {
            float *xh = x + t * W + h * D;
            /* the partner of i is i + D/2 in the first half and i - D/2 in the second: two loops the compiler
             * vectorizes (one with `% D` it did not: 3 ns an element) */
            for (long i = 0; i < half; i++) tmp[i] = xh[i] * c[i] + xh[i + half] * s[i];
            for (long i = half; i < D; i++) tmp[i] = xh[i] * c[i] + xh[i - half] * s[i];
            memcpy(xh, tmp, sizeof(float) * (size_t)D);
        }
    }
}

/* gu [T, 2I] (gate then up in each row) -> out [T, I] = silu(gate) * up. */
void specserve_silu_mul_f32(const float *gu, long T, long I, float *out) {
    const long i16 = I & ~15L;
    for (long t = 0; t < T; t++) {
        const float *g = gu + t * 2 * I, *u = g + I;
        float *o = out + t * I;
        for (long i = 0; i < i16; i += 16) {
            const v16 gv = load16(g + i);
            store16(o + i, gv / (1.0f + exp16(-gv)) * load16(u + i));
        }
        if (i16 < I) { /* the tail through a padded vector: the same operations */
            float gt[16] = {0}, ut[16] = {0};
            memcpy(gt, g + i16, sizeof(float) * (size_t)(I - i16));
            memcpy(ut, u + i16, sizeof(float) * (size_t)(I - i16));
            const v16 gv = load16(gt);
            const v16 r = gv / (1.0f + exp16(-gv)) * load16(ut);
            memcpy(o + i16, &r, sizeof(float) * (size_t)(I - i16));
        }
    }
}

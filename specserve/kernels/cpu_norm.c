/* RMSNorm in fp32 on the CPU, row by row, alone or fused with the residual add before it.
 *
 * Why in C: a decoder layer's norms are tiny (one row of 576 numbers in a decode step), so torch's cost is its
 * dispatch, and right after a linear layer has streamed megabytes of weights through the caches that dispatch
 * runs cold: F.rms_norm on one row took 30 us inside a SmolLM2 decode step against 8 us in a loop of its own.
 * One call here replaces it, and the add before it.
 *
 * Numerics: y = w * (x * r), r = 1 / sqrt(mean(x^2) + eps), as HF's Llama computes it in fp32; the sum of
 * squares is taken in the linear kernel's fixed order (sixteen lanes, then cpu_simd.h's tree, then the tail), so
 * a row's bits never depend on the rows beside it. torch sums in another order: the result can differ from
 * F.rms_norm in the last bit.
 */
#include <math.h>

#include "cpu_simd.h"

static void norm_row(const float *restrict x, long K, const float *restrict w, float eps, float *restrict y) {
    v16 acc = {0};
    const long k16 = K & ~15L;
    for (long k = 0; k < k16; k += 16) {
        const v16 v = load16(x + k);
        acc += v * v;
    }
    float s = lanes_sum(acc);
    for (long k = k16; k < K; k++) s = __builtin_fmaf(x[k], x[k], s);
    const float r = 1.0f / sqrtf(s / (float)K + eps);
    for (long k = 0; k < K; k++) y[k] = w[k] * (x[k] * r);
}

/* x [M, K], w [K], y [M, K]; row-major, contiguous. */
void specserve_rms_norm_f32(const float *x, long M, long K, const float *w, float eps, float *y) {
    for (long m = 0; m < M; m++) norm_row(x + m * K, K, w, eps, y + m * K);
}

/* s = x + h (the residual stream), y = RMSNorm(s): x, h, s, y [M, K]. */
void specserve_add_rms_norm_f32(const float *x, const float *h, long M, long K, const float *w, float eps, float *s,
                                float *y) {
    for (long m = 0; m < M; m++) {
        const float *xm = x + m * K, *hm = h + m * K;
        float *sm = s + m * K;
        for (long k = 0; k < K; k++) sm[k] = xm[k] + hm[k];
        norm_row(sm, K, w, eps, y + m * K);
    }
}

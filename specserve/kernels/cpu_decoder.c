/* A Llama-family decoder's layers in fp32 on the CPU, in one call: the same C kernels, in the same order, that
 * llama.py calls one by one, without Python between them.
 *
 * Why: after the C kernels (cpu_linear, cpu_norm, cpu_attention, cpu_pointwise) took the arithmetic, a SmolLM2
 * decode step spent about a quarter of its time in Python between them: 10 calls a layer, each with its argument
 * checks, tensor allocations and views, 30 layers. Here the layer loop runs in C, on one scratch allocation.
 *
 * Numerics: every step is the kernel the Python path calls, on the same inputs, so the bits are the same (the
 * residual adds, the KV writes and the copies are exact); tests/test_cpu_decoder.py checks them equal.
 *
 * Weights come as a table of pointers, `WEIGHTS_PER_LAYER` a layer (see `enum`); a linear layer's packed bf16
 * copy (cpu_linear.pack_bf16), where it has one, is read instead of its fp32 weight, as linear_f32 does.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

void specserve_linear_f32(const float *x, long M, long K, const float *w, long N, const float *bias, float *y,
                          int threads);
void specserve_linear_f32_packed(const float *x, long M, long K, const unsigned short *wp, long N,
                                 const float *bias, float *y, int threads);
void specserve_rms_norm_f32(const float *x, long M, long K, const float *w, float eps, float *y);
void specserve_add_rms_norm_f32(const float *x, const float *h, long M, long K, const float *w, float eps, float *s,
                                float *y);
void specserve_rotary_f32(float *x, long T, long width, long heads, long head_dim, const float *cos,
                          const float *sin);
void specserve_silu_mul_f32(const float *gu, long T, long I, float *out);
int specserve_paged_attention_f32(const float *q, const float *k_cache, const float *v_cache, const long *slots,
                                  long max_ctx, const long *row_request, const long *row_length, long T, long H,
                                  long KVH, long D, float scale, float *out, int threads);

enum {
    INPUT_NORM,     /* [hidden] fp32 */
    QKV,            /* [(H + 2 KVH) D, hidden] fp32 */
    QKV_COMPACT,    /* the same packed in bf16 (cpu_linear.pack_bf16), or NULL */
    QKV_BIAS,       /* [(H + 2 KVH) D] fp32, or NULL */
    O,              /* [hidden, H D] */
    O_COMPACT,      /* or NULL */
    POST_NORM,      /* [hidden] */
    GATE_UP,        /* [2 inter, hidden] */
    GATE_UP_COMPACT,
    DOWN,           /* [hidden, inter] */
    DOWN_COMPACT,
    K_CACHE,        /* [slots, KVH, D] fp32 */
    V_CACHE,        /* [slots, KVH, D] fp32 */
    WEIGHTS_PER_LAYER
};

/* Where the time goes inside the call, for `specserve bench profile` (torch's profiler sees one opaque call):
 * seconds per kind of step, summed over calls while profiling is on. Off by default: one branch a step. */
enum { T_NORM, T_QKV, T_ROTARY, T_KV_WRITE, T_ATTENTION, T_O, T_GATE_UP, T_SILU, T_DOWN, T_KINDS };
static int profiling;
static double seconds[T_KINDS];

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

static double mark(int kind, double since) {
    const double t = now();
    seconds[kind] += t - since;
    return t;
}

/* Turn the timing on (1) or off (0), clearing what was summed. */
void specserve_decoder_profiling(int on) {
    profiling = on;
    memset(seconds, 0, sizeof seconds);
}

/* Copy the seconds summed since profiling was turned on into out[T_KINDS]; returns T_KINDS. */
int specserve_decoder_profile(double *out) {
    memcpy(out, seconds, sizeof seconds);
    return T_KINDS;
}

#define MARK(kind)                                                                                                     \
    if (profiling) t0 = mark(kind, t0)

static void linear(const float *x, long M, long K, void *const *w, int which, long N, const float *bias, float *y,
                   int threads) {
    if (w[which + 1]) /* the packed bf16 copy, for every row count (cpu_linear.linear_f32 does the same) */
        specserve_linear_f32_packed(x, M, K, w[which + 1], N, bias, y, threads);
    else
        specserve_linear_f32(x, M, K, w[which], N, bias, y, threads);
}

/* x [T, hidden]: the embedded tokens; cos, sin [T, D] (sin signed, as llama.RotaryEmbedding makes it);
 * slot_mapping [T]: where each token's key and value go; slots, max_ctx, row_request, row_length: as
 * cpu_attention reads them. out [T, hidden]: the last layer's output (the residual stream, before the final
 * norm). taps [ntaps] (layers 1 .. layers - 1), tapped [T, ntaps, hidden]: the residual stream entering each
 * of those layers (an EAGLE-3 head's low and middle features), or ntaps = 0. Returns 0, or -1 when scratch
 * memory could not be had. */
int specserve_decoder_f32(const float *x, long T, long hidden, long layers, long H, long KVH, long D, long inter,
                          void *const *weights, const float *cos, const float *sin, const long *slot_mapping,
                          const long *slots, long max_ctx, const long *row_request, const long *row_length,
                          float eps, float scale, float *out, const long *taps, long ntaps, float *tapped,
                          int threads) {
    if (layers <= 0) {
        memcpy(out, x, sizeof(float) * (size_t)(T * hidden));
        return 0;
    }
    const long q_size = H * D, kv_size = KVH * D, width = q_size + 2 * kv_size;
    const long floats = T * (3 * hidden + width + q_size + q_size + 2 * inter + inter + hidden);
    float *scratch = malloc(sizeof(float) * (size_t)(floats > 0 ? floats : 1));
    if (!scratch) return -1;
    float *resid = scratch, *normed = resid + T * hidden, *h = normed + T * hidden, *qkv = h + T * hidden;
    float *q = qkv + T * width, *attn = q + T * q_size, *gate_up = attn + T * q_size, *act = gate_up + T * 2 * inter;
    float *pending = act + T * inter;
    int status = 0;
    double t0 = profiling ? now() : 0.0;
    for (long l = 0; l < layers && status == 0; l++) {
        void *const *w = weights + l * WEIGHTS_PER_LAYER;
        if (l == 0) {
            memcpy(resid, x, sizeof(float) * (size_t)(T * hidden));
            specserve_rms_norm_f32(resid, T, hidden, w[INPUT_NORM], eps, normed);
        } else { /* the previous layer's MLP output, added here with the norm after it (llama.RMSNorm.add_norm) */
            specserve_add_rms_norm_f32(resid, pending, T, hidden, w[INPUT_NORM], eps, h, normed);
            memcpy(resid, h, sizeof(float) * (size_t)(T * hidden));
            for (long i = 0; i < ntaps; i++)
                if (taps[i] == l)
                    for (long t = 0; t < T; t++)
                        memcpy(tapped + (t * ntaps + i) * hidden, resid + t * hidden, sizeof(float) * (size_t)hidden);
        }
        MARK(T_NORM);
        linear(normed, T, hidden, w, QKV, width, w[QKV_BIAS], qkv, threads);
        MARK(T_QKV);
        specserve_rotary_f32(qkv, T, width, H + KVH, D, cos, sin);
        MARK(T_ROTARY);
        float *k_cache = w[K_CACHE], *v_cache = w[V_CACHE];
        for (long t = 0; t < T; t++) {
            memcpy(k_cache + slot_mapping[t] * kv_size, qkv + t * width + q_size, sizeof(float) * (size_t)kv_size);
            memcpy(v_cache + slot_mapping[t] * kv_size, qkv + t * width + q_size + kv_size,
                   sizeof(float) * (size_t)kv_size);
            memcpy(q + t * q_size, qkv + t * width, sizeof(float) * (size_t)q_size);
        }
        MARK(T_KV_WRITE);
        status = specserve_paged_attention_f32(q, k_cache, v_cache, slots, max_ctx, row_request, row_length, T, H,
                                               KVH, D, scale, attn, threads);
        MARK(T_ATTENTION);
        linear(attn, T, q_size, w, O, hidden, NULL, h, threads);
        MARK(T_O);
        specserve_add_rms_norm_f32(resid, h, T, hidden, w[POST_NORM], eps, out, normed);
        memcpy(resid, out, sizeof(float) * (size_t)(T * hidden));
        MARK(T_NORM);
        linear(normed, T, hidden, w, GATE_UP, 2 * inter, NULL, gate_up, threads);
        MARK(T_GATE_UP);
        specserve_silu_mul_f32(gate_up, T, inter, act);
        MARK(T_SILU);
        linear(act, T, inter, w, DOWN, hidden, NULL, pending, threads);
        MARK(T_DOWN);
    }
    for (long i = 0; i < T * hidden; i++) out[i] = resid[i] + pending[i];
    free(scratch);
    return status;
}

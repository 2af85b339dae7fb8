/* The decoder's element-wise steps for x86-64 CPUs with AVX-512, one pass each where torch takes several:
 * RMSNorm (optionally after a residual add), rotary embedding, and SiLU(gate) * up. Built into the same
 * library as attention.c by workers/model/fused_attention.py; workers/model/layers.py and rope.py call them
 * (fused_ops.py) and keep torch's ops as the reference and the fallback.
 *
 * Each rounds like the torch ops it replaces (transformers' numerics): bfloat16 results are computed in
 * float32 and rounded once per torch op (x * cos and rotate_half(x) * sin are each rounded before their sum;
 * SiLU's output is rounded before the multiply by up), and nothing is contracted into an FMA that torch
 * computes as a multiply and an add. Rotary embedding is therefore bit-identical to torch; RMSNorm and SiLU
 * differ from torch only by the order of the float32 sum of squares and by the exp polynomial (a last-bit
 * difference before the final rounding, rarely visible after it).
 */
#pragma GCC optimize("fp-contract=off")
#ifdef __clang__
#pragma clang fp contract(off)
#endif
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

typedef uint16_t bf16_t;

static inline __m512 load16(int bf16, const void *p, int64_t i, __mmask16 k) {
    if (!bf16) return _mm512_maskz_loadu_ps(k, (const float *)p + i);
    const __m256i h = _mm256_maskz_loadu_epi16(k, (const bf16_t *)p + i);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __m512 round_bf16(__m512 x) { /* to the nearest bfloat16 value, as float32 */
    return _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(x));
}

static inline void store16(int bf16, void *p, int64_t i, __m512 x, __mmask16 k) {
    if (!bf16) {
        _mm512_mask_storeu_ps((float *)p + i, k, x);
        return;
    }
    _mm256_mask_storeu_epi16((bf16_t *)p + i, k, (__m256i)_mm512_cvtneps_pbh(x));
}

static inline __mmask16 tail(int n) {
    return n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}

static inline int threads_for(int rows, int64_t row_elems, int num_threads) {
    const int64_t work = rows * row_elems;
    if (work < 32768) return 1; /* a decode step's rows: a parallel region costs more than it saves */
    return num_threads < 1 ? 1 : num_threads;
}

/* out[t] = weight * rmsnorm(x[t]) for T rows of N; with `residual`, x[t] + residual[t] (rounded to the
 * dtype, as torch's add) is normalized and also written to sum_out. Rows are x_stride / res_stride apart;
 * out and sum_out are contiguous. */
void pc_rmsnorm(int bf16, const void *x, int64_t x_stride, const void *residual, int64_t res_stride,
                void *sum_out, const void *weight, void *out, int T, int N, float eps, int num_threads) {
    const int esz = bf16 ? 2 : 4;
#pragma omp parallel for num_threads(threads_for(T, N, num_threads)) schedule(static)
    for (int t = 0; t < T; t++) {
        const char *xr = (const char *)x + (int64_t)t * x_stride * esz;
        if (residual) { /* the sum, rounded to the dtype, is what the norm reads */
            const char *rr = (const char *)residual + (int64_t)t * res_stride * esz;
            char *sr = (char *)sum_out + (int64_t)t * N * esz;
            for (int i = 0; i < N; i += 16) {
                const __mmask16 k = tail(N - i);
                store16(bf16, sr, i, _mm512_add_ps(load16(bf16, xr, i, k), load16(bf16, rr, i, k)), k);
            }
            xr = sr;
        }
        __m512 acc = _mm512_setzero_ps();
        for (int i = 0; i < N; i += 16) {
            const __m512 v = load16(bf16, xr, i, tail(N - i));
            acc = _mm512_add_ps(acc, _mm512_mul_ps(v, v));
        }
        const float inv = 1.0f / sqrtf(_mm512_reduce_add_ps(acc) / (float)N + eps);
        const __m512 iv = _mm512_set1_ps(inv);
        char *orow = (char *)out + (int64_t)t * N * esz;
        for (int i = 0; i < N; i += 16) {
            const __mmask16 k = tail(N - i);
            __m512 h = _mm512_mul_ps(load16(bf16, xr, i, k), iv);
            if (bf16) h = round_bf16(h); /* hidden_states.to(input_dtype) before the weight */
            store16(bf16, orow, i, _mm512_mul_ps(load16(bf16, weight, i, k), h), k);
        }
    }
}

/* Rotary embedding (rotate-half form): out[t][h] = x[t][h] * cos[t] + rotate_half(x[t][h]) * sin[t] for
 * H heads of D, where x's rows are x_stride apart (heads D apart: a slice of the fused q/k/v output) and
 * cos/sin are [T, D] in the dtype. out is [T, H, D] contiguous. */
void pc_rope(int bf16, const void *x, int64_t x_stride, const void *cos_t, const void *sin_t, void *out, int T,
             int H, int D, int num_threads) {
    const int esz = bf16 ? 2 : 4, half = D / 2;
    const __m512 neg = _mm512_set1_ps(-0.0f);
#pragma omp parallel for num_threads(threads_for(T, (int64_t)H * D, num_threads)) schedule(static)
    for (int t = 0; t < T; t++) {
        const char *c = (const char *)cos_t + (int64_t)t * D * esz, *s = (const char *)sin_t + (int64_t)t * D * esz;
        for (int h = 0; h < H; h++) {
            const char *xr = (const char *)x + ((int64_t)t * x_stride + (int64_t)h * D) * esz;
            char *orow = (char *)out + ((int64_t)t * H + h) * D * esz;
            for (int i = 0; i < D; i += 16) {
                const __mmask16 k = tail((i < half ? half : D) - i);
                const __m512 xv = load16(bf16, xr, i, k);
                /* rotate_half: (-x[half:], x[:half]) */
                const __m512 rv = i < half ? _mm512_xor_ps(load16(bf16, xr, i + half, k), neg)
                                           : load16(bf16, xr, i - half, k);
                __m512 a = _mm512_mul_ps(xv, load16(bf16, c, i, k));
                __m512 b = _mm512_mul_ps(rv, load16(bf16, s, i, k));
                if (bf16) {
                    a = round_bf16(a);
                    b = round_bf16(b);
                }
                store16(bf16, orow, i, _mm512_add_ps(a, b), k);
            }
        }
    }
}

static inline __m512 exp_ps(__m512 x) { /* exp(x) (Cephes' expf polynomial): 0 below -104, inf above 88.7 */
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_sub_ps(x, _mm512_mul_ps(n, _mm512_set1_ps(0.693359375f)));
    r = _mm512_sub_ps(r, _mm512_mul_ps(n, _mm512_set1_ps(-2.12194440e-4f)));
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r);
    p = _mm512_add_ps(p, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* out[t] = silu(gate) * up where x[t] = [gate | up] (I columns each, rows x_stride apart); out [T, I]. */
void pc_silu_mul(int bf16, const void *x, int64_t x_stride, void *out, int T, int I, int num_threads) {
    const int esz = bf16 ? 2 : 4;
    const __m512 one = _mm512_set1_ps(1.0f);
#pragma omp parallel for num_threads(threads_for(T, I, num_threads)) schedule(static)
    for (int t = 0; t < T; t++) {
        const char *g = (const char *)x + (int64_t)t * x_stride * esz, *u = g + (int64_t)I * esz;
        char *orow = (char *)out + (int64_t)t * I * esz;
        for (int i = 0; i < I; i += 16) {
            const __mmask16 k = tail(I - i);
            const __m512 gv = load16(bf16, g, i, k);
            __m512 a = _mm512_div_ps(gv, _mm512_add_ps(one, exp_ps(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
            if (bf16) a = round_bf16(a); /* silu's output in the dtype */
            store16(bf16, orow, i, _mm512_mul_ps(a, load16(bf16, u, i, k)), k);
        }
    }
}

/* Small-batch float32 GEMM (decode steps): y[M][N] = x[M][K] W^T (+ bias[N]) (+ residual[M][N]), for W
 * packed by pc_pack_f32 into column panels [ceil(N/32)][K][32] (zero past N). Each panel is one unit of
 * work: 8 rows of x at a time against its 32 columns, 16 accumulators, x broadcast from memory; the panel
 * (32 x K floats) stays in L1/L2 for the rows' second pass. oneDNN's kernels are built for tall x: at 16
 * rows they run at 100-140 GFLOP/s here against 250+ for this loop. Sums run over k in order, per lane. */
#ifndef PF_AHEAD
#define PF_AHEAD 16 /* panel rows (128 bytes each) */
#endif
void pc_pack_f32(const float *w, int N, int K, float *out) {
    const int NB = (N + 31) / 32;
    for (int nb = 0; nb < NB; nb++)
        for (int k = 0; k < K; k++)
            for (int c = 0; c < 32; c++) {
                const int n = nb * 32 + c;
                out[((int64_t)nb * K + k) * 32 + c] = n < N ? w[(int64_t)n * K + k] : 0.0f;
            }
}

void pc_gemm_small_f32(const float *x, int64_t x_stride, const float *wp, const float *bias, const float *res,
                       int64_t res_stride, float *y, int M, int N, int K, int num_threads) {
    const int NB = (N + 31) / 32;
    if (num_threads < 1) num_threads = 1;
    if (num_threads > NB) num_threads = NB;
#pragma omp parallel for num_threads(num_threads) schedule(static)
    for (int nb = 0; nb < NB; nb++) {
        const float *panel = wp + (int64_t)nb * K * 32;
        const int n0 = nb * 32;
        const __mmask16 k0 = tail(N - n0), k1 = tail(N - n0 - 16);
        const __m512 b0 = bias ? _mm512_maskz_loadu_ps(k0, bias + n0) : _mm512_setzero_ps();
        const __m512 b1 = bias ? _mm512_maskz_loadu_ps(k1, bias + n0 + 16) : _mm512_setzero_ps();
        for (int m0 = 0; m0 < M; m0 += 8) {
            const int mb = M - m0 < 8 ? M - m0 : 8;
            const float *xr[8];
            for (int i = 0; i < 8; i++) xr[i] = x + (int64_t)(m0 + (i < mb ? i : 0)) * x_stride;
            __m512 a[8][2];
            for (int i = 0; i < 8; i++) a[i][0] = a[i][1] = _mm512_setzero_ps();
            for (int k = 0; k < K; k++) {
                if (m0 == 0) { /* the panel's first pass streams it from memory or L3: fetch ahead */
                    _mm_prefetch((const char *)(panel + (int64_t)(k + PF_AHEAD) * 32), _MM_HINT_T0);
                    _mm_prefetch((const char *)(panel + (int64_t)(k + PF_AHEAD) * 32 + 16), _MM_HINT_T0);
                }
                const __m512 w0 = _mm512_load_ps(panel + (int64_t)k * 32), w1 = _mm512_load_ps(panel + (int64_t)k * 32 + 16);
                for (int i = 0; i < 8; i++) {
                    const __m512 xv = _mm512_set1_ps(xr[i][k]);
                    a[i][0] = _mm512_fmadd_ps(xv, w0, a[i][0]);
                    a[i][1] = _mm512_fmadd_ps(xv, w1, a[i][1]);
                }
            }
            for (int i = 0; i < mb; i++) {
                const int64_t m = m0 + i;
                __m512 y0 = _mm512_add_ps(a[i][0], b0), y1 = _mm512_add_ps(a[i][1], b1);
                if (res) {
                    y0 = _mm512_add_ps(y0, _mm512_maskz_loadu_ps(k0, res + m * res_stride + n0));
                    y1 = _mm512_add_ps(y1, _mm512_maskz_loadu_ps(k1, res + m * res_stride + n0 + 16));
                }
                _mm512_mask_storeu_ps(y + m * N + n0, k0, y0);
                _mm512_mask_storeu_ps(y + m * N + n0 + 16, k1, y1);
            }
        }
    }
}

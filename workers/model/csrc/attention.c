/* Fused attention with log-sum-exp for x86-64 CPUs with AVX-512 (float32; bfloat16 with AVX512_BF16).
 *
 * One call: queries q [T, H, D] against keys/values read from runs of rows of k, v ([rows, KVH, D], row
 * stride in elements), grouped-query (query head h*G+g reads KV head h), optionally causal with an offset
 * (query token t sees keys 0 .. offset + t). Writes out [T, H, D] (contiguous, the queries' dtype) and
 * lse [T, H] (float32). Built and loaded by workers/model/fused_attention.py; attention_kernels.py's torch
 * kernels are the reference it is tested against and the fallback where it cannot be built.
 *
 * Flash-style: per (KV head, tile of RB query rows) a loop over key blocks of BN keys with an online softmax,
 * so scores never leave the core's caches. Rows are (token, head-in-group) pairs, folded like repeat_kv.
 * float32: scores by FMAs on keys packed transposed per block ([D][BN]); P @ V by FMAs on V rows.
 * bfloat16: the same loops on VDPBF16PS, two products per lane (keys packed as [D/2][BN][2], values as
 * [BN/2][D][2]); scores, softmax and accumulation stay float32, P is rounded to bfloat16 for P @ V as the
 * GEMM path does. Within one work split (row tiles, or rows as lanes for at most 32 rows per KV head: decode
 * passes and short chunks) a row's result depends only on its own query and the keys it sees, never on which
 * other rows share its tile or on the thread count; the two splits sum in different orders (rounding only).
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BN 64  /* keys per block */
#define RB 32  /* query rows per work unit, a multiple of 4 */
#define DMAX 256

typedef uint16_t bf16_t;

static inline __m512 exp512(__m512 x) {
    /* exp(x) for x <= 0 (Cephes' expf polynomial; -150 and below give 0). */
    x = _mm512_max_ps(x, _mm512_set1_ps(-150.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
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

static inline float bf2f(bf16_t x) {
    uint32_t u = (uint32_t)x << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline bf16_t f2bf(float f) { /* round to nearest even, as torch's .to(bfloat16) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

static inline __mmask16 lanes(int n) { /* the first n (0..16) lanes */
    return n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1u);
}

typedef struct {
    int bf16;          /* element type of q, k, v, out */
    const void *q;     /* [T, H, D], rows of q_stride elements, heads D apart */
    int64_t q_stride;
    const void *k, *v; /* rows of kv_stride elements, KV heads D apart */
    int64_t kv_stride;
    const int64_t *key_rows; /* [S]: the row of k/v holding key j */
    void *out;         /* [T, H, D] contiguous */
    float *lse;        /* [T, H] */
    int T, H, KVH, S, D, G;
    float scale;
    int64_t causal;    /* -1: none */
    int nblk;
} Job;

/* Transpose a 16 x 16 matrix of 32-bit elements held in 16 registers (row i in r[i]). */
static inline void transpose16(__m512i r[16]) {
    __m512i t[16];
    for (int i = 0; i < 16; i += 2) {
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {
        r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 16; i += 8)
        for (int k = 0; k < 4; k++) {
            t[i + k] = _mm512_shuffle_i32x4(r[i + k], r[i + k + 4], 0x88);
            t[i + k + 4] = _mm512_shuffle_i32x4(r[i + k], r[i + k + 4], 0xDD);
        }
    for (int k = 0; k < 8; k++) {
        r[k] = _mm512_shuffle_i32x4(t[k], t[k + 8], 0x88);
        r[k + 8] = _mm512_shuffle_i32x4(t[k], t[k + 8], 0xDD);
    }
}

/* Key block `blk` of KV head h, packed: float32 kp [D][BN], vp [BN][D]; bfloat16 kp [D/2][BN][2], vp [BN/2][D][2].
 * Keys past S are zeros. K is a transpose of 32-bit elements (a float, or a bfloat16 pair of dimensions),
 * 16 keys x 16 elements at a time; bfloat16 V interleaves each pair of key rows. */
static void pack_block(const Job *J, int h, int blk, void *kp, void *vp) {
    const int D = J->D, j0 = blk * BN, esz = J->bf16 ? 2 : 4;
    const int n = (J->S - j0) < BN ? (J->S - j0) : BN;
    const int W = D * esz / 4; /* 32-bit elements per key row */
    const char *rows[BN];
    for (int j = 0; j < BN; j++)
        rows[j] = j < n ? (const char *)J->k + (J->key_rows[j0 + j] * J->kv_stride + (int64_t)h * D) * esz : NULL;
    uint32_t *K = (uint32_t *)kp;
    for (int j16 = 0; j16 < BN; j16 += 16)
        for (int w16 = 0; w16 < W; w16 += 16) {
            __m512i r[16];
            for (int i = 0; i < 16; i++)
                r[i] = rows[j16 + i] ? _mm512_loadu_si512(rows[j16 + i] + w16 * 4) : _mm512_setzero_si512();
            transpose16(r);
            for (int i = 0; i < 16; i++) _mm512_store_si512(K + (size_t)(w16 + i) * BN + j16, r[i]);
        }
    for (int j = 0; j < n; j++)
        rows[j] = (const char *)J->v + (J->key_rows[j0 + j] * J->kv_stride + (int64_t)h * D) * esz;
    if (!J->bf16) {
        float *V = (float *)vp;
        for (int j = 0; j < BN; j++) {
            if (j < n) memcpy(V + j * D, rows[j], sizeof(float) * D);
            else memset(V + j * D, 0, sizeof(float) * D);
        }
        return;
    }
    bf16_t *V = (bf16_t *)vp;
    static const uint16_t lo_idx[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                        8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
    const __m512i lo = _mm512_loadu_si512(lo_idx), hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
    for (int j = 0; j < BN; j += 2) {
        bf16_t *dst = V + (size_t)(j / 2) * D * 2;
        for (int d = 0; d < D; d += 32) {
            const __m512i a = j < n ? _mm512_loadu_si512(rows[j] + d * 2) : _mm512_setzero_si512();
            const __m512i b = j + 1 < n ? _mm512_loadu_si512(rows[j + 1] + d * 2) : _mm512_setzero_si512();
            _mm512_store_si512(dst + d * 2, _mm512_permutex2var_epi16(a, lo, b));
            _mm512_store_si512(dst + d * 2 + 32, _mm512_permutex2var_epi16(a, hi, b));
        }
    }
}

/* The micro-kernels: a[i][c] += sum_p x[i][p] * B[p][16c .. 16c+15] for 4 rows i and 64 columns, p < n.
 * float32: x rows xs apart, B rows bs apart. bfloat16: p runs over pairs (x[i][2p], x[i][2p+1]), each B row
 * holds 64 columns x 2 interleaved (VDPBF16PS). Scores: x = queries, B = packed keys; P @ V: x = probabilities,
 * B = values. */
static inline void mk4_f32(const float *x, int xs, const float *B, int bs, int n, __m512 a[4][4]) {
    for (int p = 0; p < n; p++) {
        const float *br = B + (size_t)p * bs;
        __m512 b0 = _mm512_load_ps(br), b1 = _mm512_load_ps(br + 16), b2 = _mm512_load_ps(br + 32),
               b3 = _mm512_load_ps(br + 48);
        for (int i = 0; i < 4; i++) {
            __m512 v = _mm512_set1_ps(x[i * xs + p]);
            a[i][0] = _mm512_fmadd_ps(v, b0, a[i][0]);
            a[i][1] = _mm512_fmadd_ps(v, b1, a[i][1]);
            a[i][2] = _mm512_fmadd_ps(v, b2, a[i][2]);
            a[i][3] = _mm512_fmadd_ps(v, b3, a[i][3]);
        }
    }
}

static inline void mk4_bf16(const bf16_t *x, int xs, const bf16_t *B, int bs, int npairs, __m512 a[4][4]) {
    for (int p = 0; p < npairs; p++) {
        const bf16_t *br = B + (size_t)p * bs;
        __m512bh b0 = (__m512bh)_mm512_load_si512(br), b1 = (__m512bh)_mm512_load_si512(br + 32);
        __m512bh b2 = (__m512bh)_mm512_load_si512(br + 64), b3 = (__m512bh)_mm512_load_si512(br + 96);
        for (int i = 0; i < 4; i++) {
            int32_t pair;
            memcpy(&pair, x + i * xs + 2 * p, 4);
            __m512bh v = (__m512bh)_mm512_set1_epi32(pair);
            a[i][0] = _mm512_dpbf16_ps(a[i][0], v, b0);
            a[i][1] = _mm512_dpbf16_ps(a[i][1], v, b1);
            a[i][2] = _mm512_dpbf16_ps(a[i][2], v, b2);
            a[i][3] = _mm512_dpbf16_ps(a[i][3], v, b3);
        }
    }
}

static inline void load4(__m512 a[4][4], const float *src, int stride) {
    for (int i = 0; i < 4; i++)
        for (int c = 0; c < 4; c++) a[i][c] = src ? _mm512_load_ps(src + i * stride + c * 16) : _mm512_setzero_ps();
}

static inline void store4(__m512 a[4][4], float *dst, int stride) {
    for (int i = 0; i < 4; i++)
        for (int c = 0; c < 4; c++) _mm512_store_ps(dst + i * stride + c * 16, a[i][c]);
}

/* scores s[i][0..BN) = q[i] . k[j] for 4 rows */
static inline void scores4_f32(const float *q, int D, const float *K, float *s, int ss) {
    __m512 a[4][4];
    load4(a, NULL, 0);
    mk4_f32(q, D, K, BN, D, a);
    store4(a, s, ss);
}

static inline void scores4_bf16(const bf16_t *q, int D, const bf16_t *K, float *s, int ss) {
    __m512 a[4][4];
    load4(a, NULL, 0);
    mk4_bf16(q, D, K, BN * 2, D / 2, a);
    store4(a, s, ss);
}

/* o[i][c0..c0+64) += p[i] @ V for 4 rows; the block's first `nk` keys (a multiple of 2) */
static inline void pv4_f32(const float *p, int ps, const float *V, int D, int c0, int nk, float *o) {
    __m512 a[4][4];
    load4(a, o + c0, D);
    mk4_f32(p, ps, V + c0, D, nk, a);
    store4(a, o + c0, D);
}

static inline void pv4_bf16(const bf16_t *p, int ps, const bf16_t *V, int D, int c0, int nk, float *o) {
    __m512 a[4][4];
    load4(a, o + c0, D);
    mk4_bf16(p, ps, V + c0 * 2, D * 2, nk / 2, a);
    store4(a, o + c0, D);
}

/* Query row r of KV head h (token r / G, head h*G + r % G): its accumulated output o[d * o_step] over l, and
 * its log-sum-exp m + log(l). */
static void write_row(const Job *J, int h, int r, const float *o, int o_step, float m, float l) {
    const int D = J->D, t = r / J->G, head = h * J->G + r % J->G;
    const float inv = 1.0f / l;
    J->lse[(int64_t)t * J->H + head] = m + logf(l);
    const int64_t off = ((int64_t)t * J->H + head) * D;
    if (!J->bf16) {
        float *dst = (float *)J->out + off;
        for (int d = 0; d < D; d++) dst[d] = o[d * o_step] * inv;
    } else {
        bf16_t *dst = (bf16_t *)J->out + off;
        for (int d = 0; d < D; d++) dst[d] = f2bf(o[d * o_step] * inv);
    }
}

/* Keys query row r sees: all S, or (causal) keys 0 .. causal + t for its token t = r / G. */
static inline int row_limit(const Job *J, int r) {
    const int64_t lim = J->causal < 0 ? J->S : J->causal + r / J->G + 1;
    return lim < J->S ? (int)lim : J->S;
}

/* Query row r of KV head h, scaled, into qf[0..D) (float32) or qb[0..D) (bfloat16, rounded as the GEMM path
 * rounds q * scale); returns row_limit. */
static inline int load_q_row(const Job *J, int h, int r, float *qf, bf16_t *qb) {
    const int D = J->D;
    const int64_t off = (int64_t)(r / J->G) * J->q_stride + (int64_t)(h * J->G + r % J->G) * D;
    if (!J->bf16) {
        const float *src = (const float *)J->q + off;
        for (int d = 0; d < D; d++) qf[d] = src[d] * J->scale;
    } else {
        const bf16_t *src = (const bf16_t *)J->q + off;
        for (int d = 0; d < D; d++) qb[d] = f2bf(bf2f(src[d]) * J->scale);
    }
    return row_limit(J, r);
}

/* One row's online-softmax step over a block: scores srow[0..nv) (the rest of the ncols masked), running max *m
 * and sum *l, accumulated output orow (rescaled). The probabilities go to pb (bfloat16, for VDPBF16PS P @ V)
 * or back into srow (float32; rounded to bfloat16 values for a bfloat16 model). The sum is over the
 * probabilities P @ V will read, so the output is normalized by exactly what it accumulated. */
static inline void softmax_row(const Job *J, float *srow, int nv, int ncols, float *m, float *l, float *orow,
                               bf16_t *pb) {
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int c = 0; c * 16 < nv; c++)
        mx = _mm512_mask_max_ps(mx, lanes(nv - c * 16), mx, _mm512_load_ps(srow + c * 16));
    const float bmax = _mm512_reduce_max_ps(mx);
    const float m_new = bmax > *m ? bmax : *m;
    const float alpha = *m == -INFINITY ? 0.0f : expf(*m - m_new);
    const __m512 mv = _mm512_set1_ps(m_new);
    __m512 sum = _mm512_setzero_ps();
    for (int c = 0; c < ncols / 16; c++) {
        __m512 p = _mm512_maskz_mov_ps(lanes(nv - c * 16), exp512(_mm512_sub_ps(_mm512_load_ps(srow + c * 16), mv)));
        if (pb) {
            __m256bh pr = _mm512_cvtneps_pbh(p);
            _mm256_store_si256((__m256i *)(pb + c * 16), (__m256i)pr);
            p = _mm512_cvtpbh_ps(pr);
        } else {
            if (J->bf16) p = _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(p));
            _mm512_store_ps(srow + c * 16, p);
        }
        sum = _mm512_add_ps(sum, p);
    }
    *l = *l * alpha + _mm512_reduce_add_ps(sum);
    if (alpha != 1.0f) {
        const __m512 av = _mm512_set1_ps(alpha);
        for (int d = 0; d < J->D; d += 16) _mm512_store_ps(orow + d, _mm512_mul_ps(av, _mm512_load_ps(orow + d)));
    }
    *m = m_new;
}

static inline int group_limit(const int *limit) {
    int a = limit[0] > limit[1] ? limit[0] : limit[1], b = limit[2] > limit[3] ? limit[2] : limit[3];
    return a > b ? a : b;
}

/* Per-thread scratch that grows to the largest size asked for and is kept for the thread's life (OpenMP's
 * pool threads are reused call after call): the key blocks a unit packs for itself. NULL if out of memory. */
static __thread char *tl_scratch;
static __thread size_t tl_scratch_size;
static char *scratch(size_t bytes) {
    if (tl_scratch_size < bytes) {
        free(tl_scratch);
        tl_scratch = (char *)aligned_alloc(64, bytes);
        tl_scratch_size = tl_scratch ? bytes : 0;
    }
    return tl_scratch;
}

#define SB (4 * BN) /* keys per softmax step of the row tiles: four packed blocks */

/* The packed blocks b0 .. b0+nb-1 of KV head h: shared ones (kp_all / vp_all), or packed now into `own`
 * (four K blocks, then four V blocks). */
static void step_blocks(const Job *J, int h, int b0, int nb, const char *kp_all, const char *vp_all, char *own,
                        const char **K, const char **V) {
    const size_t blk_bytes = (size_t)J->D * BN * (J->bf16 ? 2 : 4);
    for (int b = 0; b < nb; b++) {
        if (kp_all) {
            K[b] = kp_all + ((size_t)h * J->nblk + b0 + b) * blk_bytes;
            V[b] = vp_all + ((size_t)h * J->nblk + b0 + b) * blk_bytes;
        } else {
            char *kb = own + b * blk_bytes, *vb = own + (4 + b) * blk_bytes;
            pack_block(J, h, b0 + b, kb, vb);
            K[b] = kb;
            V[b] = vb;
        }
    }
}

/* One work unit: KV head h, query rows r0 .. r0+nr-1 (row r = token r / G, head h*G + r % G). `kp`/`vp`:
 * the head's packed blocks (shared), or NULL to pack each block into this thread's scratch. The softmax
 * runs over SB keys at a time (one horizontal max and sum, at most one rescale of the output per row per
 * step); the products run block by block. Returns 0, or 3 when scratch memory was not available. */
static int unit(const Job *J, int h, int r0, int nr, const char *kp_all, const char *vp_all) {
    const int D = J->D, esz = J->bf16 ? 2 : 4;
    const size_t blk_bytes = (size_t)D * BN * esz;
    float qf[RB * DMAX] __attribute__((aligned(64)));
    bf16_t qb[RB * DMAX] __attribute__((aligned(64)));
    float o[RB * DMAX] __attribute__((aligned(64)));
    float s[RB * SB] __attribute__((aligned(64)));
    bf16_t pb[RB * SB] __attribute__((aligned(64)));
    float m[RB], l[RB];
    int limit[RB];
    const int nr4 = (nr + 3) & ~3;
    int max_limit = 0;
    char *own = kp_all ? NULL : scratch(8 * blk_bytes);
    if (!kp_all && !own) return 3;
    for (int i = 0; i < nr4; i++) {
        if (i < nr) {
            limit[i] = load_q_row(J, h, r0 + i, qf + i * D, qb + i * D);
        } else {
            if (!J->bf16) memset(qf + i * D, 0, sizeof(float) * D);
            else memset(qb + i * D, 0, sizeof(bf16_t) * D);
            limit[i] = 0;
        }
        if (limit[i] > max_limit) max_limit = limit[i];
        m[i] = -INFINITY;
        l[i] = 0.0f;
        memset(o + i * D, 0, sizeof(float) * D);
    }
    const int nblk = (max_limit + BN - 1) / BN;
    /* bfloat16 keeps one block per step: the lanes and dot-product splits take their maxima per block, and P
     * rounded after the same maxima rounds a row alike in every split (see the note at g_amx) */
    const int step = J->bf16 ? 1 : 4;
    for (int b0 = 0; b0 < nblk; b0 += step) {
        const int nb = nblk - b0 < step ? nblk - b0 : step, j0 = b0 * BN;
        const char *K[4], *V[4];
        step_blocks(J, h, b0, nb, kp_all, vp_all, own, K, V);
        for (int b = 0; b < nb; b++)
            for (int i = 0; i < nr4; i += 4) {
                if (group_limit(limit + i) <= j0 + b * BN) continue; /* no row of the four sees this block */
                if (!J->bf16) scores4_f32(qf + i * D, D, (const float *)K[b], s + i * SB + b * BN, SB);
                else scores4_bf16(qb + i * D, D, (const bf16_t *)K[b], s + i * SB + b * BN, SB);
            }
        const int seen = max_limit - j0 < nb * BN ? max_limit - j0 : nb * BN;
        const int ncols = (seen + 15) & ~15;
        int nk_max = 0;
        for (int i = 0; i < nr4; i++) {
            const int nv = limit[i] - j0 < nb * BN ? limit[i] - j0 : nb * BN;
            float *srow = s + i * SB;
            if (nv <= 0) { /* no key of this step for this row */
                if (!J->bf16) memset(srow, 0, sizeof(float) * ncols);
                else memset(pb + i * SB, 0, sizeof(bf16_t) * ncols);
                continue;
            }
            if (nv > nk_max) nk_max = nv;
            softmax_row(J, srow, nv, ncols, m + i, l + i, o + i * D, J->bf16 ? pb + i * SB : NULL);
        }
        for (int b = 0; b < nb && b * BN < nk_max; b++) {
            const int left = nk_max - b * BN, nk = ((left < BN ? left : BN) + 1) & ~1;
            for (int i = 0; i < nr4; i += 4) {
                if (group_limit(limit + i) <= j0 + b * BN) continue;
                for (int c0 = 0; c0 < D; c0 += 64) {
                    if (!J->bf16) pv4_f32(s + i * SB + b * BN, SB, (const float *)V[b], D, c0, nk, o + i * D);
                    else pv4_bf16(pb + i * SB + b * BN, SB, (const bf16_t *)V[b], D, c0, nk, o + i * D);
                }
            }
        }
    }
    for (int i = 0; i < nr; i++) write_row(J, h, r0 + i, o + i * D, 1, m[i], l[i]);
    return 0;
}

#ifdef PC_AMX
/* bfloat16 row tiles on AMX (Intel's tile units, Sapphire Rapids and later): the same unit as above, with
 * both matrix products on TDPBF16PS. The packed layouts are already AMX's: keys [D/2][BN][2] are the B tile
 * of Q K^T (16 dimension pairs x 16 keys), values [BN/2][D][2] the B tile of P V (16 key pairs x 16 dims).
 * Four 16x16 float32 accumulators (tmm0-3) hold a 32 x 32 block: rows {0-15, 16-31} x columns {c, c+16};
 * tmm4-5 are the two row halves of A (queries or probabilities), tmm6-7 the two column groups of B. The
 * softmax between them is the row tiles' (softmax_row). Rows beyond nr are zero queries with no keys (zero
 * probabilities), so full 32-row tiles are computed and only nr rows written. */
#include <sys/syscall.h>
#include <unistd.h>

typedef struct {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} TileConfig;

static int g_amx = 0; /* AMX tiles granted to this process and not switched off */
/* With AMX every bfloat16 call of pc_attend_rows takes the AMX unit, whatever its row count: one work split
 * rounds a row alike however its context is cut into calls (a prefill of a whole prompt, a recomputation of
 * one block over its cached context: block_verifier.py's honest bfloat16 difference is 0 because of this).
 * Against the lanes and dot-product splits (2 threads, D 64): 4 rows x 2048 keys 1.2-1.4x, 32 x 2048 1.9x,
 * 8 x 256 1.05-1.2x, 4 x 256 about even, 64 keys 0.86x (about 5 us more a call: tile set-up, packing). */

/* Ask Linux for the AMX tile state (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA); returns whether AMX is on. */
int pc_amx_enable(int on) {
    if (!on) {
        g_amx = 0;
        return 0;
    }
    g_amx = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
    return g_amx;
}

/* 2^x for x <= 0, to bfloat16 accuracy (what P @ V reads): 2^n * p(f), n = round(x), f = x - n in
 * [-1/2, 1/2], p the degree-4 Taylor polynomial of 2^f (relative error below 5e-5, against bfloat16's 2e-3
 * rounding step); far below the maximum (x < -150 or -inf) gives 0. */
static inline __m512 exp2_bf16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-150.0f));
    const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 f = _mm512_sub_ps(x, n);
    __m512 p = _mm512_set1_ps(9.6181291e-3f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504109e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022651e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}


/* The AMX unit's softmax step for one row over scores srow[0..nv) (of a step of nk keys, nk a multiple of 32):
 * probabilities to pb (bfloat16, zero past nv), running max *m (in log2 units: scores times log2 e) and sum
 * *l of the bfloat16 probabilities (a VDPBF16PS against ones: exactly what P @ V reads), orow rescaled. One
 * horizontal max and one sum per 256 keys. */
static inline void softmax_row_amx(float *srow, int nv, int nk, float *m, float *l, float *orow, bf16_t *pb,
                                   int D) {
    const __m512 l2e = _mm512_set1_ps(1.44269504088896341f);
    __m512 mx = _mm512_set1_ps(-INFINITY);
    for (int c = 0; c * 16 < nv; c++)
        mx = _mm512_mask_max_ps(mx, lanes(nv - c * 16), mx, _mm512_load_ps(srow + c * 16));
    const float bmax = _mm512_reduce_max_ps(mx) * 1.44269504088896341f;
    const float m_new = bmax > *m ? bmax : *m;
    const __m512 mv = _mm512_set1_ps(m_new);
    const __m512bh ones = (__m512bh)_mm512_set1_epi16(0x3f80);
    __m512 sum = _mm512_setzero_ps();
    for (int c = 0; c < nk; c += 32) {
        const __m512 p0 = _mm512_maskz_mov_ps(lanes(nv - c), exp2_bf16(_mm512_fmsub_ps(_mm512_load_ps(srow + c), l2e, mv)));
        const __m512 p1 = _mm512_maskz_mov_ps(lanes(nv - c - 16),
                                              exp2_bf16(_mm512_fmsub_ps(_mm512_load_ps(srow + c + 16), l2e, mv)));
        const __m512bh pp = _mm512_cvtne2ps_pbh(p1, p0);
        _mm512_store_si512(pb + c, (__m512i)pp);
        sum = _mm512_dpbf16_ps(sum, pp, ones);
    }
    if (m_new != *m) {
        const float alpha = *m == -INFINITY ? 0.0f : exp2f(*m - m_new);
        const __m512 av = _mm512_set1_ps(alpha);
        for (int d = 0; d < D; d += 16) _mm512_store_ps(orow + d, _mm512_mul_ps(av, _mm512_load_ps(orow + d)));
        *l *= alpha;
        *m = m_new;
    }
    *l += _mm512_reduce_add_ps(sum);
}


/* One step of a 32 x 32 block product: accumulators tmm0-3 (rows {0-15, 16-31} x columns {b0, b1}) +=
 * A (16 or 32 rows from a, rows `as` bytes apart) times the B tiles at b0 and b1 (rows `bs` bytes apart).
 * `two`: both 16-row halves, or only the first (tmm2-3 untouched). */
static inline void amx_step(const void *a, int as, const void *b0, const void *b1, int bs, int two) {
    _tile_loadd(4, a, as);
    _tile_loadd(6, b0, bs);
    _tile_loadd(7, b1, bs);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if (two) {
        _tile_loadd(5, (const char *)a + 16 * as, as);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
    }
}

/* The accumulators from / to float32 c (16 columns per tile, rows cs bytes apart); NULL loads zeros. */
static inline void amx_acc_load(const float *c, int cs, int two) {
    if (!c) {
        _tile_zero(0);
        _tile_zero(1);
        if (two) {
            _tile_zero(2);
            _tile_zero(3);
        }
        return;
    }
    _tile_loadd(0, c, cs);
    _tile_loadd(1, c + 16, cs);
    if (two) {
        _tile_loadd(2, (const char *)c + 16 * cs, cs);
        _tile_loadd(3, (const char *)(c + 16) + 16 * cs, cs);
    }
}

static inline void amx_acc_store(float *c, int cs, int two) {
    _tile_stored(0, c, cs);
    _tile_stored(1, c + 16, cs);
    if (two) {
        _tile_stored(2, (char *)c + 16 * cs, cs);
        _tile_stored(3, (char *)(c + 16) + 16 * cs, cs);
    }
}

static int unit_amx(const Job *J, int h, int r0, int nr, const char *kp_all, const char *vp_all) {
    const int D = J->D, two = nr > 16; /* one 16-row half of the tiles, or both */
    const size_t blk_bytes = (size_t)D * BN * 2;
    bf16_t qb[RB * DMAX] __attribute__((aligned(64)));
    float o[RB * DMAX] __attribute__((aligned(64)));
    float s[RB * SB] __attribute__((aligned(64)));
    bf16_t pb[RB * SB] __attribute__((aligned(64)));
    float m[RB], l[RB];
    int limit[RB];
    int max_limit = 0;
    char *own = kp_all ? NULL : scratch(8 * blk_bytes);
    if (!kp_all && !own) return 3;
    for (int i = 0; i < RB; i++) {
        if (i < nr) {
            limit[i] = load_q_row(J, h, r0 + i, NULL, qb + i * D);
        } else {
            memset(qb + i * D, 0, sizeof(bf16_t) * D);
            limit[i] = 0;
        }
        if (limit[i] > max_limit) max_limit = limit[i];
        m[i] = -INFINITY;
        l[i] = 0.0f;
        memset(o + i * D, 0, sizeof(float) * D);
    }
    TileConfig cfg __attribute__((aligned(64)));
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    _tile_loadconfig(&cfg);
    const int nblk = (max_limit + BN - 1) / BN;
    for (int b0 = 0; b0 < nblk; b0 += 4) {
        const int nb = nblk - b0 < 4 ? nblk - b0 : 4, j0 = b0 * BN;
        const bf16_t *K[4], *V[4];
        step_blocks(J, h, b0, nb, kp_all, vp_all, own, (const char **)K, (const char **)V);
        /* keys of this step any row sees, rounded up to 32 (P is zero past each row's limit) */
        const int seen = (max_limit - j0 < nb * BN ? max_limit - j0 : nb * BN);
        const int nk = (seen + 31) & ~31;
        for (int kg = 0; kg < nk; kg += 32) { /* s[32][kg .. kg+32) = Q K^T */
            const bf16_t *Kb = K[kg / BN];
            const int kc = kg % BN;
            amx_acc_load(NULL, 0, two);
            for (int d = 0; d < D; d += 32)
                amx_step(qb + d, D * 2, Kb + (d / 2) * BN * 2 + kc * 2, Kb + (d / 2) * BN * 2 + (kc + 16) * 2, BN * 4,
                         two);
            amx_acc_store(s + kg, SB * 4, two);
        }
        for (int i = 0; i < (two ? RB : 16); i++) {
            const int nv = limit[i] - j0 < nk ? limit[i] - j0 : nk;
            if (nv <= 0) {
                memset(pb + i * SB, 0, sizeof(bf16_t) * nk);
                continue;
            }
            softmax_row_amx(s + i * SB, nv, nk, m + i, l + i, o + i * D, pb + i * SB, D);
        }
        for (int c = 0; c < D; c += 32) { /* o[32][c .. c+32) += P V */
            amx_acc_load(o + c, D * 4, two);
            for (int kk = 0; kk < nk; kk += 32) {
                const bf16_t *Vb = V[kk / BN];
                const int kc = kk % BN;
                amx_step(pb + kk, SB * 2, Vb + (kc / 2) * D * 2 + c * 2, Vb + (kc / 2) * D * 2 + (c + 16) * 2, D * 4, two);
            }
            amx_acc_store(o + c, D * 4, two);
        }
    }
    _tile_release();
    /* m is in log2 units: the log-sum-exp is m ln 2 + ln l */
    for (int i = 0; i < nr; i++) write_row(J, h, r0 + i, o + i * D, 1, m[i] * 0.69314718055994531f, l[i]);
    return 0;
}
#else
int pc_amx_enable(int on) {
    (void)on;
    return 0;
}
#endif

/* A unit of at most 32 query rows (decode steps, short chunks): rows are the lanes, keys the loop, so that
 * K and V are read in place, row by row, with no packing (each key block is read by this unit alone). Scores
 * are s[j][rows] = sum_d k[j][d] * qt[d][rows]; the softmax runs down the key axis, lane-wise per row;
 * ot[d][rows] += v[j][d] * p[j][rows]. NV: 16-row vectors (1 or 2). */
static inline __attribute__((always_inline)) void unit_lanes(const Job *J, int h, int nr, const int NV) {
    const int D = J->D, G = J->G;
    float qt[DMAX * 32] __attribute__((aligned(64)));   /* float32: [D][32] */
    bf16_t qp[DMAX * 32] __attribute__((aligned(64)));  /* bfloat16: [D/2][32][2] */
    float st[BN * 32] __attribute__((aligned(64)));     /* [BN][32] scores, then probabilities */
    float vf[BN * DMAX] __attribute__((aligned(64)));   /* bfloat16: the block's V rows in float32 */
    float ot[DMAX * 32] __attribute__((aligned(64)));   /* [D][32] */
    int lim[32] __attribute__((aligned(64)));
    int max_limit = 0;
    for (int r = 0; r < NV * 16; r++) {
        if (r < nr) {
            const int t = r / G, head = h * G + r % G;
            const int64_t off = (int64_t)t * J->q_stride + (int64_t)head * D;
            for (int d = 0; d < D; d++) {
                if (!J->bf16) qt[d * 32 + r] = ((const float *)J->q)[off + d] * J->scale;
                else qp[(d / 2) * 64 + r * 2 + (d & 1)] = f2bf(bf2f(((const bf16_t *)J->q)[off + d]) * J->scale);
            }
            lim[r] = row_limit(J, r);
        } else { /* padding lanes: zero queries, every key visible, never written out */
            for (int d = 0; d < D; d++) {
                if (!J->bf16) qt[d * 32 + r] = 0.0f;
                else qp[(d / 2) * 64 + r * 2 + (d & 1)] = 0;
            }
            lim[r] = J->S;
        }
        if (lim[r] > max_limit) max_limit = lim[r];
    }
    __m512 m[2], l[2];
    __m512i limv[2];
    for (int c = 0; c < NV; c++) {
        m[c] = _mm512_set1_ps(-INFINITY);
        l[c] = _mm512_setzero_ps();
        limv[c] = _mm512_load_si512(lim + c * 16);
    }
    for (int d = 0; d < D; d++)
        for (int c = 0; c < NV; c++) _mm512_store_ps(ot + d * 32 + c * 16, _mm512_setzero_ps());
    const int64_t hoff = (int64_t)h * D;
    for (int j0 = 0; j0 < max_limit; j0 += BN) {
        const int nk = max_limit - j0 < BN ? max_limit - j0 : BN;
        /* the next block's K and V rows are fetched while this one is computed (a decode pass streams them
         * from memory once: measured 1.7x slower cold than cached without this) */
        const int nn = max_limit - j0 - BN < BN ? max_limit - j0 - BN : BN;
        const int row_bytes = D * (J->bf16 ? 2 : 4);
        for (int j = 0; j < nn; j++) {
            const int64_t at = (J->key_rows[j0 + BN + j] * J->kv_stride + hoff) * (J->bf16 ? 2 : 4);
            for (int b = 0; b < row_bytes; b += 64) {
                _mm_prefetch((const char *)J->k + at + b, _MM_HINT_T0);
                _mm_prefetch((const char *)J->v + at + b, _MM_HINT_T0);
            }
        }
        /* scores, four keys at a time */
        for (int j = 0; j < nk; j += 4) {
            __m512 a[4][2];
            const int n4 = nk - j < 4 ? nk - j : 4;
            for (int i = 0; i < 4; i++)
                for (int c = 0; c < NV; c++) a[i][c] = _mm512_setzero_ps();
            if (!J->bf16) {
                const float *kr[4];
                for (int i = 0; i < 4; i++)
                    kr[i] = (const float *)J->k + J->key_rows[j0 + j + (i < n4 ? i : 0)] * J->kv_stride + hoff;
                for (int d = 0; d < D; d++) {
                    __m512 q0 = _mm512_load_ps(qt + d * 32), q1 = NV > 1 ? _mm512_load_ps(qt + d * 32 + 16) : q0;
                    for (int i = 0; i < 4; i++) {
                        __m512 x = _mm512_set1_ps(kr[i][d]);
                        a[i][0] = _mm512_fmadd_ps(x, q0, a[i][0]);
                        if (NV > 1) a[i][1] = _mm512_fmadd_ps(x, q1, a[i][1]);
                    }
                }
            } else {
                const bf16_t *kr[4];
                for (int i = 0; i < 4; i++)
                    kr[i] = (const bf16_t *)J->k + J->key_rows[j0 + j + (i < n4 ? i : 0)] * J->kv_stride + hoff;
                for (int d = 0; d < D; d += 2) {
                    __m512bh q0 = (__m512bh)_mm512_load_si512(qp + (d / 2) * 64);
                    __m512bh q1 = NV > 1 ? (__m512bh)_mm512_load_si512(qp + (d / 2) * 64 + 32) : q0;
                    for (int i = 0; i < 4; i++) {
                        int32_t pair;
                        memcpy(&pair, kr[i] + d, 4);
                        __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
                        a[i][0] = _mm512_dpbf16_ps(a[i][0], x, q0);
                        if (NV > 1) a[i][1] = _mm512_dpbf16_ps(a[i][1], x, q1);
                    }
                }
            }
            for (int i = 0; i < n4; i++)
                for (int c = 0; c < NV; c++) _mm512_store_ps(st + (j + i) * 32 + c * 16, a[i][c]);
        }
        /* online softmax down the key axis, one lane per row */
        __m512 mn[2], alpha[2], sum[2];
        for (int c = 0; c < NV; c++) {
            __m512 mx = _mm512_set1_ps(-INFINITY);
            for (int j = 0; j < nk; j++) {
                __mmask16 ok = _mm512_cmpgt_epi32_mask(limv[c], _mm512_set1_epi32(j0 + j));
                mx = _mm512_mask_max_ps(mx, ok, mx, _mm512_load_ps(st + j * 32 + c * 16));
            }
            mn[c] = _mm512_max_ps(m[c], mx);
            alpha[c] = exp512(_mm512_sub_ps(m[c], mn[c]));
            sum[c] = _mm512_setzero_ps();
            for (int j = 0; j < nk; j++) {
                __mmask16 ok = _mm512_cmpgt_epi32_mask(limv[c], _mm512_set1_epi32(j0 + j));
                __m512 p = _mm512_maskz_mov_ps(ok, exp512(_mm512_sub_ps(_mm512_load_ps(st + j * 32 + c * 16), mn[c])));
                if (J->bf16) p = _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(p)); /* P @ V reads P rounded to bfloat16 */
                sum[c] = _mm512_add_ps(sum[c], p);
                _mm512_store_ps(st + j * 32 + c * 16, p);
            }
            l[c] = _mm512_fmadd_ps(l[c], alpha[c], sum[c]);
            m[c] = mn[c];
        }
        /* ot = ot * alpha + V^T p, eight dimensions at a time */
        const float *vrow[BN];
        if (!J->bf16) {
            for (int j = 0; j < nk; j++) vrow[j] = (const float *)J->v + J->key_rows[j0 + j] * J->kv_stride + hoff;
        } else {
            for (int j = 0; j < nk; j++) {
                const bf16_t *src = (const bf16_t *)J->v + J->key_rows[j0 + j] * J->kv_stride + hoff;
                for (int d = 0; d < D; d += 16)
                    _mm512_store_ps(vf + j * D + d,
                                    _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256((const __m256i *)(src + d))));
                vrow[j] = vf + j * D;
            }
        }
        for (int d0 = 0; d0 < D; d0 += 8) {
            __m512 a[8][2];
            for (int e = 0; e < 8; e++)
                for (int c = 0; c < NV; c++)
                    a[e][c] = _mm512_mul_ps(alpha[c], _mm512_load_ps(ot + (d0 + e) * 32 + c * 16));
            for (int j = 0; j < nk; j++) {
                __m512 p0 = _mm512_load_ps(st + j * 32), p1 = NV > 1 ? _mm512_load_ps(st + j * 32 + 16) : p0;
                const float *vr = vrow[j] + d0;
                for (int e = 0; e < 8; e++) {
                    __m512 x = _mm512_set1_ps(vr[e]);
                    a[e][0] = _mm512_fmadd_ps(x, p0, a[e][0]);
                    if (NV > 1) a[e][1] = _mm512_fmadd_ps(x, p1, a[e][1]);
                }
            }
            for (int e = 0; e < 8; e++)
                for (int c = 0; c < NV; c++) _mm512_store_ps(ot + (d0 + e) * 32 + c * 16, a[e][c]);
        }
    }
    float lf[32] __attribute__((aligned(64))), mf[32] __attribute__((aligned(64)));
    for (int c = 0; c < NV; c++) {
        _mm512_store_ps(lf + c * 16, l[c]);
        _mm512_store_ps(mf + c * 16, m[c]);
    }
    for (int r = 0; r < nr; r++) write_row(J, h, r, ot + r, 32, mf[r], lf[r]);
}

/* Sums of 16 vectors: lane i of the result is the sum of v[i]'s 16 lanes (a transposing add tree). */
static inline __m512 hsum16(const __m512 *v) {
    __m512 t[8], w[4];
    for (int i = 0; i < 8; i++)
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++)
        w[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0x44),
                             _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], 0xEE));
    __m512 p = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x44), _mm512_shuffle_f32x4(w[0], w[1], 0xEE));
    __m512 q = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], 0x44), _mm512_shuffle_f32x4(w[2], w[3], 0xEE));
    return _mm512_add_ps(_mm512_shuffle_f32x4(p, q, 0x88), _mm512_shuffle_f32x4(p, q, 0xDD));
}

/* A unit of at most 8 query rows (a decode token's G heads): keys and values read in place in their natural
 * layout. Scores are dot products over D (16 keys at a time, reduced by hsum16), the softmax runs along each
 * row as in the row tiles, and o[r] += p[r][j] * v[j] row by row: no lane is wasted on absent rows. */
#define FEW 8
static void unit_few(const Job *J, int h, int nr) {
    const int D = J->D, DV = D / 16;
    float qf[FEW * DMAX] __attribute__((aligned(64)));
    bf16_t qb[FEW * DMAX] __attribute__((aligned(64)));
    float o[FEW * DMAX] __attribute__((aligned(64)));
    float s[FEW * BN] __attribute__((aligned(64)));
    float m[FEW], l[FEW];
    int limit[FEW];
    int max_limit = 0;
    for (int i = 0; i < nr; i++) {
        limit[i] = load_q_row(J, h, i, qf + i * D, qb + i * D);
        if (limit[i] > max_limit) max_limit = limit[i];
        m[i] = -INFINITY;
        l[i] = 0.0f;
        memset(o + i * D, 0, sizeof(float) * D);
    }
    const int64_t hoff = (int64_t)h * D;
    for (int j0 = 0; j0 < max_limit; j0 += BN) {
        const int nk = max_limit - j0 < BN ? max_limit - j0 : BN;
        for (int jj = 0; jj < nk; jj += 16) {
            const int n16 = nk - jj < 16 ? nk - jj : 16;
            for (int i = 0; i < nr; i++) {
                __m512 part[16];
                for (int x = 0; x < 16; x++) {
                    if (x >= n16) {
                        part[x] = _mm512_setzero_ps();
                        continue;
                    }
                    const int64_t row = J->key_rows[j0 + jj + x] * J->kv_stride + hoff;
                    __m512 acc = _mm512_setzero_ps();
                    if (!J->bf16) {
                        const float *kr = (const float *)J->k + row;
                        for (int c = 0; c < DV; c++)
                            acc = _mm512_fmadd_ps(_mm512_load_ps(qf + i * D + c * 16), _mm512_loadu_ps(kr + c * 16),
                                                  acc);
                    } else {
                        const bf16_t *kr = (const bf16_t *)J->k + row;
                        for (int c = 0; c < D; c += 32)
                            acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_load_si512(qb + i * D + c),
                                                   (__m512bh)_mm512_loadu_si512(kr + c));
                    }
                    part[x] = acc;
                }
                _mm512_store_ps(s + i * BN + jj, hsum16(part));
            }
        }
        for (int i = 0; i < nr; i++) {
            const int nv = limit[i] - j0 < nk ? limit[i] - j0 : nk;
            float *srow = s + i * BN;
            if (nv <= 0) {
                memset(srow, 0, sizeof(float) * BN);
                continue;
            }
            softmax_row(J, srow, nv, BN, m + i, l + i, o + i * D, NULL);
        }
        /* o[r] += p[r][j] * v[j], four rows x 64 dimensions at a time */
        for (int i0 = 0; i0 < nr; i0 += 4) {
            const int rn = nr - i0 < 4 ? nr - i0 : 4;
            for (int c0 = 0; c0 < D; c0 += 64) {
                __m512 a[4][4];
                for (int i = 0; i < rn; i++)
                    for (int c = 0; c < 4; c++) a[i][c] = _mm512_load_ps(o + (i0 + i) * D + c0 + c * 16);
                for (int j = 0; j < nk; j++) {
                    const int64_t row = J->key_rows[j0 + j] * J->kv_stride + hoff + c0;
                    __m512 vv[4];
                    if (!J->bf16) {
                        const float *vr = (const float *)J->v + row;
                        for (int c = 0; c < 4; c++) vv[c] = _mm512_loadu_ps(vr + c * 16);
                    } else {
                        const bf16_t *vr = (const bf16_t *)J->v + row;
                        for (int c = 0; c < 4; c++)
                            vv[c] = _mm512_cvtpbh_ps((__m256bh)_mm256_loadu_si256((const __m256i *)(vr + c * 16)));
                    }
                    for (int i = 0; i < rn; i++) {
                        const __m512 x = _mm512_set1_ps(s[(i0 + i) * BN + j]);
                        for (int c = 0; c < 4; c++) a[i][c] = _mm512_fmadd_ps(x, vv[c], a[i][c]);
                    }
                }
                for (int i = 0; i < rn; i++)
                    for (int c = 0; c < 4; c++) _mm512_store_ps(o + (i0 + i) * D + c0 + c * 16, a[i][c]);
            }
        }
    }
    for (int i = 0; i < nr; i++) write_row(J, h, i, o + i * D, 1, m[i], l[i]);
}

static void unit_lanes16(const Job *J, int h, int nr) { unit_lanes(J, h, nr, 1); }
static void unit_lanes32(const Job *J, int h, int nr) { unit_lanes(J, h, nr, 2); }

/* Keys j = 0 .. S-1 are rows key_rows[j] of k and v. Returns 0, or a positive code for an unsupported shape
 * (the caller falls back to torch). */
int pc_attend_rows(int bf16, const void *q, int64_t q_stride, const void *k, const void *v, int64_t kv_stride,
                   int64_t num_slots, const int64_t *key_rows, int64_t S, void *out, float *lse, int T, int H,
                   int KVH, int D, float scale, int64_t causal, int num_threads) {
    if (D % 64 != 0 || D > DMAX || KVH <= 0 || H % KVH != 0 || T <= 0) return 1;
    if (S <= 0 || S > (1 << 30)) return 2;
    for (int64_t j = 0; j < S; j++)
        if (key_rows[j] < 0 || key_rows[j] >= num_slots) return 4;
    Job J = {bf16, q, q_stride, k, v, kv_stride, key_rows, out, lse, T, H, KVH, (int)S, D, H / KVH, scale, causal,
             (int)((S + BN - 1) / BN)};
    const int rows = T * J.G;
    int failed = 0; /* a unit could not get its scratch memory (code 3) */
    if (rows <= 32) { /* one unit per KV head, K/V read in place */
        if (num_threads > KVH) num_threads = KVH;
        if (num_threads < 1) num_threads = 1;
#pragma omp parallel for num_threads(num_threads) schedule(static)
        for (int h = 0; h < KVH; h++) {
#ifdef PC_AMX
            if (bf16 && g_amx) {
                if (unit_amx(&J, h, 0, rows, NULL, NULL)) failed = 1;
                continue;
            }
#endif
            if (rows <= FEW) unit_few(&J, h, rows);
            else if (rows <= 16) unit_lanes16(&J, h, rows);
            else unit_lanes32(&J, h, rows);
        }
        return failed ? 3 : 0;
    }
    const int tiles = (rows + RB - 1) / RB;
    const int units = KVH * tiles;
    const size_t blk_bytes = (size_t)D * BN * (bf16 ? 2 : 4);
    /* Blocks read by several tiles are packed once for all; a head with one tile packs as it goes. */
    const int shared = tiles > 1;
    char *kp = NULL, *vp = NULL;
    if (shared) {
        kp = (char *)aligned_alloc(64, blk_bytes * KVH * J.nblk);
        vp = (char *)aligned_alloc(64, blk_bytes * KVH * J.nblk);
        if (!kp || !vp) {
            free(kp);
            free(vp);
            return 3;
        }
    }
    if (num_threads < 1) num_threads = 1;
    if (num_threads > units && !shared) num_threads = units;
#pragma omp parallel num_threads(num_threads)
    {
        if (shared) {
#pragma omp for schedule(static)
            for (int x = 0; x < KVH * J.nblk; x++)
                pack_block(&J, x / J.nblk, x % J.nblk, kp + (size_t)x * blk_bytes, vp + (size_t)x * blk_bytes);
        }
        /* Causal tiles further down see more keys: hand out the largest first. */
#pragma omp for schedule(dynamic, 1)
        for (int u = units - 1; u >= 0; u--) {
            const int h = u % KVH, tile = u / KVH;
            const int r0 = tile * RB;
            const int nr = rows - r0 < RB ? rows - r0 : RB;
#ifdef PC_AMX
            if (bf16 && g_amx) {
                if (unit_amx(&J, h, r0, nr, kp, vp)) failed = 1;
            } else
#endif
                if (unit(&J, h, r0, nr, kp, vp)) failed = 1;
        }
    }
    free(kp);
    free(vp);
    return failed ? 3 : 0;
}

/* Keys are the rows of runs [run_start[i], run_start[i] + run_len[i]) of k and v, in order. */
int pc_attend(int bf16, const void *q, int64_t q_stride, const void *k, const void *v, int64_t kv_stride,
              int64_t num_slots, const int64_t *run_start, const int64_t *run_len, int num_runs, void *out,
              float *lse, int T, int H, int KVH, int D, float scale, int64_t causal, int num_threads) {
    int64_t S = 0;
    for (int i = 0; i < num_runs; i++) {
        if (run_len[i] < 0) return 2;
        if (run_start[i] < 0 || run_start[i] + run_len[i] > num_slots) return 4;
        S += run_len[i];
    }
    if (S <= 0 || S > (1 << 30)) return 2;
    int64_t *key_rows = (int64_t *)malloc(sizeof(int64_t) * S);
    if (!key_rows) return 3;
    for (int i = 0, j = 0; i < num_runs; i++)
        for (int64_t x = 0; x < run_len[i]; x++) key_rows[j++] = run_start[i] + x;
    int rc = pc_attend_rows(bf16, q, q_stride, k, v, kv_stride, num_slots, key_rows, S, out, lse, T, H, KVH, D,
                            scale, causal, num_threads);
    free(key_rows);
    return rc;
}

/* A batch of sequences, one query token each (decode steps): sequence b's token q[b] ([H, D], rows of
 * q_stride elements) attends to its own keys, slots[b * slot_stride + 0 .. lens[b]-1] of k and v, all
 * visible. One unit per (sequence, KV head), K/V read in place. out [B, H, D] contiguous, lse [B, H]. */
int pc_attend_batch(int bf16, const void *q, int64_t q_stride, const void *k, const void *v, int64_t kv_stride,
                    int64_t num_slots, const int64_t *slots, int64_t slot_stride, const int64_t *lens, void *out,
                    float *lse, int B, int H, int KVH, int D, float scale, int num_threads) {
    if (D % 64 != 0 || D > DMAX || KVH <= 0 || H % KVH != 0 || B <= 0 || H / KVH > 32) return 1;
    for (int b = 0; b < B; b++)
    {
        if (lens[b] <= 0 || lens[b] > slot_stride) return 2;
        for (int64_t j = 0; j < lens[b]; j++)
            if (slots[b * slot_stride + j] < 0 || slots[b * slot_stride + j] >= num_slots) return 4;
    }
    const int G = H / KVH, esz = bf16 ? 2 : 4;
    if (num_threads < 1) num_threads = 1;
    if (num_threads > B * KVH) num_threads = B * KVH;
#pragma omp parallel for num_threads(num_threads) schedule(dynamic, 1)
    for (int u = 0; u < B * KVH; u++) {
        const int b = u / KVH, h = u % KVH;
        Job J = {bf16, (const char *)q + (size_t)b * q_stride * esz, q_stride, k, v, kv_stride,
                 slots + (size_t)b * slot_stride, (char *)out + (size_t)b * H * D * esz, lse + (size_t)b * H,
                 1, H, KVH, (int)lens[b], D, G, scale, -1, (int)((lens[b] + BN - 1) / BN)};
        if (G <= FEW) unit_few(&J, h, G);
        else if (G <= 16) unit_lanes16(&J, h, G);
        else unit_lanes32(&J, h, G);
    }
    return 0;
}

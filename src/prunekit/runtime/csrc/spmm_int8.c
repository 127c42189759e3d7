/* Sparse int8 weights times int8 activations, int32 accumulation, fp32 output (prunekit.runtime.int8).

   Y^T[o, b] = acc[o, b] * (ws[o] * xs[b]) + bias[o], acc = sum_k w[o, k] * xq[k, b] exactly in int32,
   every product and rescale rounded separately (no FMA), so the result equals the fp32 evaluation of
   that formula bit for bit.

   Activations (prunekit_i8_quantize): xq = clamp(rint(x / s), -127, 127), s = amax / 127 per tensor or
   per row of x (a zero scale becomes 1), or a given static s. They are stored as int16, transposed and
   batch-contiguous in chunks of 64 batch columns: chunk c (columns 64c ..) is an (N x W) block at
   offset 64 * c * N, W = the chunk's width rounded up to 16, padding columns zero. Inside every 16
   columns the order is b0-3, b8-11, b4-7, b12-15 (what _mm256_packs_epi32 of two 8-lane vectors
   gives, and what makes _mm256_unpack{lo,hi}_epi16 of two such rows yield b0-7 and b8-15 in order).
   Batch 1: a plain vector of N + 1 values (the last is 0).

   AVX2 path: two kept weights of one output row (CSR, N:M), or two kept columns of one row block, are a
   pair; the two activation rows are interleaved with unpacklo/hi and multiplied by the broadcast weight
   pair with _mm256_madd_epi16 (s16 x s16 -> s32 pair sums, exact) + vpaddd, or one vpdpwssd with AVX-VNNI
   / AVX-512 VNNI (I8_DPW256). 8-bit (not 7-bit) activations, no saturation. Without __AVX2__ (or with
   PRUNEKIT_I8_GENERIC defined) plain C loops compute the same integers.

   AVX-512 (BW + VL): the same pairs on 512-bit registers (32 columns per instruction, two accumulator
   sets); with VNNI the chunks of more than 32 real columns are u8 (see I8_U8): four kept weights per
   vpdpbusd, 64 bytes of activations per kept weight at 64 columns instead of 128. Batch 1 uses 16-lane
   gathers instead of scalar sums.

   Per kept weight at batch 64: AVX2 4 vpmaddwd + 4 vpunpck + 4 vpaddd + 4 loads (32 B each); AVX-512
   VNNI (u8) 1 vpdpbusd + 2 vpunpck + 1 load (64 B), plus one weight-quad broadcast per four. The kernel
   is bound by activation bytes from L2 (the rows of the kept columns are scattered), which is why u8
   chunks halve its time. Batch 1: one 16-lane gather + vpdpwssd per 16 kept weights (AVX-512), else
   scalar int32 dot products; one vpmaddwd per kept column for 8-row blocks.

   Overflow: |acc| <= 127 * 127 * N, exact in int32 for N < 133,000 inputs (the Python side checks). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <omp.h>
#include "transpose.h"

#if defined(__AVX2__) && !defined(PRUNEKIT_I8_GENERIC)
#include <immintrin.h>
#define I8_AVX2 1
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define I8_AVX512 1
#endif
#endif

/* acc + pair sums of a * b (s16 x s16 -> s32, exact, wrapping like every int32 add here): one vpdpwssd with
   VNNI, else vpmaddwd + vpaddd. The results are the same integers either way. */
#if defined(I8_AVX512) && defined(__AVX512VNNI__)
#define I8_DPW512(acc, a, b) _mm512_dpwssd_epi32(acc, a, b)
#define I8_DPW256(acc, a, b) _mm256_dpwssd_epi32(acc, a, b)
#define I8_SIMD "avx512-vnni"
#elif defined(I8_AVX512)
#define I8_DPW512(acc, a, b) _mm512_add_epi32(acc, _mm512_madd_epi16(a, b))
#define I8_DPW256(acc, a, b) _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
#define I8_SIMD "avx512"
#elif defined(I8_AVX2) && defined(__AVXVNNI__)
#define I8_DPW256(acc, a, b) _mm256_dpwssd_avx_epi32(acc, a, b)
#define I8_SIMD "avx2-vnni"
#elif defined(I8_AVX2)
#define I8_DPW256(acc, a, b) _mm256_add_epi32(acc, _mm256_madd_epi16(a, b))
#define I8_SIMD "avx2"
#else
#define I8_SIMD "generic"
#endif

#ifndef I8_CHUNK
#define I8_CHUNK 64
#endif
/* u8 chunks (AVX-512 VNNI): a chunk with more than 32 real columns is stored as 64 bytes q + 128 per input
   feature and multiplied four kept weights at a time with vpdpbusd (u8 x s8 quad sums): half the bytes of
   the int16 layout per kept weight. acc = sum w (q + 128) - 128 sum w, exact: int32 adds wrap, so the
   result is the exact sum whenever that fits int32 (the bound below). Byte p = 16 L + 4 j + e of a
   feature's 64 holds column 16 j + 4 L + e: unpacking four such rows (8-bit, then 16-bit, per 128-bit
   lane) gives the quads of columns 16 j .. 16 j + 15 in order in accumulator j. Other chunks (<= 32
   real columns, e.g. the tail of a batch) keep the int16 layout. */
#if defined(I8_AVX512) && defined(__AVX512VNNI__) && I8_CHUNK == 64
#define I8_U8 1
#endif
static inline int chunk_u8(int64_t B, int64_t c) {
#ifdef I8_U8
    return B - I8_CHUNK * c > 32;
#else
    (void)B; (void)c;
    return 0;
#endif
}
/* Row-major output (rm): output rows per tile of one chunk (64 x 64 floats, 16 KiB: in L1 until transposed). */
#define I8_TILE_ROWS 64
/* Input feature of entry k: CSR stores it; N:M stores its offset inside group (k - k0) >> sh of mm. */
#define COL_CSR(k) ((int64_t)col[k])
#define COL_NM(k) ((((int64_t)(k) - k0) >> sh) * mm + (int64_t)col[k])

/* Position of batch column b (relative to its chunk) in the stored order (see above). */
static inline int64_t lane_pos(int64_t b) {
    static const int8_t perm[16] = {0, 1, 2, 3, 8, 9, 10, 11, 4, 5, 6, 7, 12, 13, 14, 15};
    return (b & ~(int64_t)15) | perm[b & 15];
}

static inline int64_t chunk_width(int64_t B, int64_t c) {
    const int64_t r = B - I8_CHUNK * c;
    return r >= I8_CHUNK ? I8_CHUNK : (r + 15) / 16 * 16;
}

/* int16 values the quantized activations take (the caller allocates them). */
int64_t prunekit_i8_xq_size(int64_t B, int64_t N) { return B == 1 ? N + 1 : N * ((B + 15) / 16 * 16); }

/* Input features per transposed tile of the row-major quantizer (16 x QTILE floats: 16 KiB). */
#define QTILE 256

static inline int16_t quant1(float v, float s) {
    float q = rintf(v / s);
    q = q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q;
    return (int16_t)q;
}

/* Per-row (token) or whole (tensor) max |x| into xs[0..B), 0 ok, 1 if x holds NaN or inf. */
static int absmax_rows(int64_t B, int64_t N, const float *restrict x, int64_t sb, int64_t sn, float *restrict xs) {
    int bad = 0;
    if (sb == 1 && B > 1) { /* x^T contiguous (a previous kernel's output): vectorise over the batch */
        for (int64_t b = 0; b < B; ++b) xs[b] = 0.0f;
        for (int64_t n = 0; n < N; ++n) {
            const float *restrict p = x + n * sn;
            for (int64_t b = 0; b < B; ++b) {
                const float a = fabsf(p[b]);
                bad |= !(a <= 3.402823466e38f);
                xs[b] = a > xs[b] ? a : xs[b];
            }
        }
    } else {
        for (int64_t b = 0; b < B; ++b) {
            const float *restrict p = x + b * sb;
            float m = 0.0f;
            int64_t n0 = 0;
#ifdef I8_AVX2
            if (sn == 1) { /* the common case; the max of a set is exact in any order */
                const __m256 sign = _mm256_set1_ps(-0.0f), big = _mm256_set1_ps(3.402823466e38f);
                __m256 mv = _mm256_setzero_ps(), badv = _mm256_setzero_ps();
                for (; n0 + 8 <= N; n0 += 8) {
                    const __m256 a = _mm256_andnot_ps(sign, _mm256_loadu_ps(p + n0));
                    badv = _mm256_or_ps(badv, _mm256_cmp_ps(a, big, _CMP_NLE_UQ)); /* NaN or inf */
                    mv = _mm256_max_ps(mv, a);
                }
                float lanes[8];
                _mm256_storeu_ps(lanes, mv);
                for (int u = 0; u < 8; ++u) m = lanes[u] > m ? lanes[u] : m;
                bad |= _mm256_movemask_ps(badv) != 0;
            }
#endif
            if (sn == 1)
                for (int64_t n = n0; n < N; ++n) {
                    const float a = fabsf(p[n]);
                    bad |= !(a <= 3.402823466e38f);
                    m = a > m ? a : m;
                }
            else
                for (int64_t n = 0; n < N; ++n) {
                    const float a = fabsf(p[n * sn]);
                    bad |= !(a <= 3.402823466e38f);
                    m = a > m ? a : m;
                }
            xs[b] = m;
        }
    }
    return bad;
}

/* Quantize the 16 columns b0..b0+15 (r of them real) of input feature n into dst (stored order). */
static inline void quant16(const float *restrict p, int64_t r, const float *restrict s, int16_t *restrict dst) {
#ifdef I8_AVX2
    if (r == 16) {
        const __m256 lim = _mm256_set1_ps(127.0f), nlim = _mm256_set1_ps(-127.0f);
        __m256 a = _mm256_div_ps(_mm256_loadu_ps(p), _mm256_loadu_ps(s));
        __m256 c = _mm256_div_ps(_mm256_loadu_ps(p + 8), _mm256_loadu_ps(s + 8));
        a = _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        c = _mm256_round_ps(c, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        a = _mm256_max_ps(_mm256_min_ps(a, lim), nlim);
        c = _mm256_max_ps(_mm256_min_ps(c, lim), nlim);
        /* packs works per 128-bit lane: b0-3, b8-11, b4-7, b12-15, the stored order. */
        _mm256_storeu_si256((__m256i *)dst, _mm256_packs_epi32(_mm256_cvtps_epi32(a), _mm256_cvtps_epi32(c)));
        return;
    }
#endif
    for (int64_t t = 0; t < 16; ++t) dst[lane_pos(t)] = t < r ? quant1(p[t], s[t]) : 0;
}

#ifdef I8_U8
/* Quantize columns t .. t + 15 (r <= 16 of them real, r may be <= 0) of one input feature of a u8 chunk:
   q + 128 to bytes 16 L + 4 j + e of dst (j = t / 16), padding columns 128 (q = 0). */
static inline void quant16_u8(const float *restrict p, int64_t r, const float *restrict s, int64_t j,
                              uint8_t *restrict dst) {
    const __mmask16 m = r >= 16 ? 0xFFFF : r <= 0 ? 0 : (__mmask16)((1u << r) - 1);
    __m512 a = _mm512_div_ps(_mm512_maskz_loadu_ps(m, p), _mm512_mask_loadu_ps(_mm512_set1_ps(1.0f), m, s));
    a = _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    a = _mm512_max_ps(_mm512_min_ps(a, _mm512_set1_ps(127.0f)), _mm512_set1_ps(-127.0f));
    const __m128i b = _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(a), _mm512_set1_epi32(128)));
    uint32_t words[4];
    _mm_storeu_si128((__m128i *)words, b);
    for (int L = 0; L < 4; ++L) memcpy(dst + 16 * L + 4 * j, &words[L], 4);
}

#endif

/* Features n0 .. n0 + nn of rows b0 + t .. b0 + t + r of a row-major x, transposed into tmp[n * 16 + u]. */
static void gather_tile(const float *restrict x, int64_t sb, int64_t sn, int64_t row0, int64_t r, int64_t n0,
                        int64_t nn, float *restrict tmp) {
    int64_t n = 0;
#ifdef I8_AVX2
    if (sn == 1 && r == 16) /* 8 x 8 register transposes, both halves of the 16 rows */
        for (; n + 8 <= nn; n += 8) {
            pk_transpose8(x + row0 * sb + n0 + n, sb, tmp + n * 16, 16);
            pk_transpose8(x + (row0 + 8) * sb + n0 + n, sb, tmp + n * 16 + 8, 16);
        }
#endif
    for (int64_t u = 0; u < r; ++u) {
        const float *restrict p = x + (row0 + u) * sb + n0 * sn;
        for (int64_t m = n; m < nn; ++m) tmp[m * 16 + u] = p[m * sn];
    }
}

/* Quantize features n0 .. n0 + nn of chunk c (every 16-column group of it) into xq. */
static void quant_block(int64_t B, int64_t N, const float *restrict x, int64_t sb, int64_t sn,
                        const float *restrict xs, int16_t *restrict xq, int64_t c, int64_t n0, int64_t nn) {
    const int64_t b0 = c * I8_CHUNK, W = chunk_width(B, c);
    const int u8 = chunk_u8(B, c);
    int16_t *restrict base = xq + b0 * N;
    float tmp[QTILE * 16];
    for (int64_t t = 0; t < (u8 ? I8_CHUNK : W); t += 16) {
        const int64_t r = B - b0 - t < 16 ? B - b0 - t : 16; /* <= 0 only in the padding of a u8 chunk */
        const float *src = x + n0 * sn + b0 + t; /* sb == 1: x^T rows contiguous, 16 columns at a time */
        int64_t lds = sn;
        if (sb != 1) { /* rows of x: a tile of r rows x nn features transposed into tmp (L1) */
            if (r > 0) gather_tile(x, sb, sn, b0 + t, r, n0, nn, tmp);
            src = tmp;
            lds = 16;
        }
        for (int64_t n = 0; n < nn; ++n) {
#ifdef I8_U8
            if (u8) { /* it fits: the chunk's int16 space holds 2 N W >= 64 N bytes */
                quant16_u8(src + n * lds, r, xs + b0 + t, t / 16, (uint8_t *)base + (n0 + n) * I8_CHUNK);
                continue;
            }
#endif
            quant16(src + n * lds, r, xs + b0 + t, base + (n0 + n) * W + t);
        }
    }
}

/* x (B x N; element (b, n) at x[b * sb + n * sn]) -> xq (layout above) and xs[0 .. round16(B)) (scales,
   padding 0). mode 0: dynamic per tensor, 1: dynamic per row of x, 2: static scale `scale`. Blocks of
   QTILE features of each chunk are split across nthreads. Returns 0, or 1 if x holds NaN or inf (nothing
   useful is written then). */
int prunekit_i8_quantize(int64_t B, int64_t N, const float *restrict x, int64_t sb, int64_t sn, int mode,
                         float scale, int16_t *restrict xq, float *restrict xs, int nthreads) {
    const int64_t Bp = (B + 15) / 16 * 16;
    if (absmax_rows(B, N, x, sb, sn, xs)) return 1;
    if (mode == 0) {
        float m = 0.0f;
        for (int64_t b = 0; b < B; ++b) m = xs[b] > m ? xs[b] : m;
        scale = m / 127.0f;
    }
    for (int64_t b = 0; b < B; ++b) {
        float s = mode == 1 ? xs[b] / 127.0f : scale;
        xs[b] = s > 0.0f ? s : 1.0f;
    }
    for (int64_t b = B; b < Bp; ++b) xs[b] = 0.0f;
    if (B == 1) {
        for (int64_t n = 0; n < N; ++n) xq[n] = quant1(x[n * sn], xs[0]);
        xq[N] = 0;
        return 0;
    }
    const int64_t nb = (N + QTILE - 1) / QTILE, items = (B + I8_CHUNK - 1) / I8_CHUNK * nb;
    #pragma omp parallel for num_threads(nthreads > 1 && items > 1 ? nthreads : 1) schedule(static)
    for (int64_t it = 0; it < items; ++it) {
        const int64_t n0 = it % nb * QTILE;
        quant_block(B, N, x, sb, sn, xs, xq, it / nb, n0, N - n0 < QTILE ? N - n0 : QTILE);
    }
    return 0;
}

/* The fp32 rescale of one output value: acc * (ws * xs) + bias, each operation rounded. */
static inline float rescale1(int32_t acc, float ws, float xs, const float *bias, int64_t o) {
    const float y = (float)acc * (ws * xs);
    return bias ? y + bias[o] : y;
}

/* Int32 pair (lo = w0, hi = w1) for _mm256_madd_epi16. */
static inline int32_t wpair(int32_t w0, int32_t w1) {
    return (int32_t)((uint32_t)(uint16_t)(int16_t)w0 | ((uint32_t)(uint16_t)(int16_t)w1 << 16));
}

#ifdef I8_AVX2
/* Store 2*NV accumulators of output row o (columns b0 .. b0 + 16 NV, r of them real). */
static inline void store_row(const __m256i *acc, int NV, float ws, const float *restrict xs, const float *bias,
                             int64_t o, float *restrict y, int64_t r) {
    const __m256 w = _mm256_set1_ps(ws);
    const __m256 bb = _mm256_set1_ps(bias ? bias[o] : 0.0f);
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    _Pragma("GCC unroll 8")
    for (int h = 0; h < 2 * NV; ++h) {
        const int64_t left = r - 8 * h;
        if (left <= 0) continue;
        __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(acc[h]), _mm256_mul_ps(w, _mm256_loadu_ps(xs + 8 * h)));
        if (bias) v = _mm256_add_ps(v, bb);
        if (left >= 8) _mm256_storeu_ps(y + 8 * h, v);
        else _mm256_maskstore_ps(y + 8 * h, _mm256_cmpgt_epi32(_mm256_set1_epi32((int)left), iota), v);
    }
}

/* One output row of CSR (COL = col[k]) or N:M (COL from the 1-byte offset), chunk width 16 NV, stored to y.
   Nonzeros k0 .. k1 are taken in pairs; an odd last one is paired with itself at weight 0. The
   accumulators are locals of a fully unrolled loop so that they live in registers. */
#define PAIRROW(NAME, NV, IDXT, COL)                                                            \
static inline void NAME(const int8_t *restrict val, const IDXT *restrict col, int64_t k0, int64_t k1, \
                        const int16_t *restrict xq, int sh, int64_t mm, float ws, const float *restrict xs, \
                        const float *bias, int64_t o, float *restrict y, int64_t r) {           \
    (void)sh; (void)mm;                                                                        \
    __m256i acc[2 * NV];                                                                       \
    _Pragma("GCC unroll 8")                                                                    \
    for (int h = 0; h < 2 * NV; ++h) acc[h] = _mm256_setzero_si256();                          \
    int64_t k = k0;                                                                            \
    for (; k + 2 <= k1; k += 2) {                                                              \
        const __m256i w = _mm256_set1_epi32(wpair(val[k], val[k + 1]));                        \
        const int16_t *p0 = xq + COL(k) * (16 * NV), *p1 = xq + COL(k + 1) * (16 * NV);        \
        _Pragma("GCC unroll 4")                                                                \
        for (int v = 0; v < NV; ++v) {                                                         \
            const __m256i x0 = _mm256_loadu_si256((const __m256i *)(p0 + 16 * v));             \
            const __m256i x1 = _mm256_loadu_si256((const __m256i *)(p1 + 16 * v));             \
            acc[2 * v] = I8_DPW256(acc[2 * v], _mm256_unpacklo_epi16(x0, x1), w); \
            acc[2 * v + 1] = I8_DPW256(acc[2 * v + 1], _mm256_unpackhi_epi16(x0, x1), w); \
        }                                                                                      \
    }                                                                                          \
    if (k < k1) {                                                                              \
        const __m256i w = _mm256_set1_epi32(wpair(val[k], 0));                                 \
        const int16_t *p0 = xq + COL(k) * (16 * NV);                                           \
        _Pragma("GCC unroll 4")                                                                \
        for (int v = 0; v < NV; ++v) {                                                         \
            const __m256i x0 = _mm256_loadu_si256((const __m256i *)(p0 + 16 * v));             \
            acc[2 * v] = I8_DPW256(acc[2 * v], _mm256_unpacklo_epi16(x0, x0), w); \
            acc[2 * v + 1] = I8_DPW256(acc[2 * v + 1], _mm256_unpackhi_epi16(x0, x0), w); \
        }                                                                                      \
    }                                                                                          \
    store_row(acc, NV, ws, xs, bias, o, y, r);                                                 \
}
PAIRROW(csr_row1, 1, int32_t, COL_CSR)
PAIRROW(csr_row2, 2, int32_t, COL_CSR)
PAIRROW(csr_row3, 3, int32_t, COL_CSR)
PAIRROW(csr_row4, 4, int32_t, COL_CSR)
PAIRROW(nm_row1, 1, uint8_t, COL_NM)
PAIRROW(nm_row2, 2, uint8_t, COL_NM)
PAIRROW(nm_row3, 3, uint8_t, COL_NM)
PAIRROW(nm_row4, 4, uint8_t, COL_NM)

#ifdef I8_AVX512
/* 512-bit accumulators of 32 columns (two stored 16-column groups) as store_row's 256-bit ones: an unpack
   of 512-bit registers works per 128-bit lane, so lo holds columns 0-7 and 16-23, hi 8-15 and 24-31. */
static inline void split512(__m512i lo, __m512i hi, __m256i *restrict acc) {
    acc[0] = _mm512_castsi512_si256(lo);
    acc[1] = _mm512_castsi512_si256(hi);
    acc[2] = _mm512_extracti64x4_epi64(lo, 1);
    acc[3] = _mm512_extracti64x4_epi64(hi, 1);
}

/* One weight pair (broadcast wp) times the activation rows p0, p1 of a chunk of NZ 32-column and NY
   16-column groups, into accumulator set az/ay. */
static inline __attribute__((always_inline)) void pair_step512(__m512i *restrict az, __m256i *restrict ay, int NZ,
                                                               int NY, const int16_t *p0, const int16_t *p1,
                                                               int32_t wp) {
    const __m512i w = _mm512_set1_epi32(wp);
    _Pragma("GCC unroll 2")
    for (int v = 0; v < NZ; ++v) {
        const __m512i x0 = _mm512_loadu_si512(p0 + 32 * v), x1 = _mm512_loadu_si512(p1 + 32 * v);
        az[2 * v] = I8_DPW512(az[2 * v], _mm512_unpacklo_epi16(x0, x1), w);
        az[2 * v + 1] = I8_DPW512(az[2 * v + 1], _mm512_unpackhi_epi16(x0, x1), w);
    }
    if (NY) {
        const __m256i w2 = _mm512_castsi512_si256(w);
        const __m256i x0 = _mm256_loadu_si256((const __m256i *)(p0 + 32 * NZ));
        const __m256i x1 = _mm256_loadu_si256((const __m256i *)(p1 + 32 * NZ));
        ay[0] = I8_DPW256(ay[0], _mm256_unpacklo_epi16(x0, x1), w2);
        ay[1] = I8_DPW256(ay[1], _mm256_unpackhi_epi16(x0, x1), w2);
    }
}

/* PAIRROW with 512-bit registers for chunks of NZ 32-column groups and NY (0 or 1) 16-column groups. Two
   accumulator sets (pairs k/2 even and odd) hide the multiply-add latency; integer sums in any order are
   the same integers. */
#define PAIRROW512(NAME, NZ, NY, IDXT, COL)                                                     \
static inline void NAME(const int8_t *restrict val, const IDXT *restrict col, int64_t k0, int64_t k1, \
                        const int16_t *restrict xq, int sh, int64_t mm, float ws, const float *restrict xs, \
                        const float *bias, int64_t o, float *restrict y, int64_t r) {           \
    (void)sh; (void)mm;                                                                        \
    const int64_t W = 32 * NZ + 16 * NY;                                                       \
    __m512i az[2][2 * NZ];                                                                     \
    __m256i ay[2][2];                                                                          \
    for (int h = 0; h < 2 * NZ; ++h) az[0][h] = az[1][h] = _mm512_setzero_si512();             \
    ay[0][0] = ay[0][1] = ay[1][0] = ay[1][1] = _mm256_setzero_si256();                        \
    int64_t k = k0;                                                                            \
    for (; k + 4 <= k1; k += 4) {                                                              \
        pair_step512(az[0], ay[0], NZ, NY, xq + COL(k) * W, xq + COL(k + 1) * W, wpair(val[k], val[k + 1])); \
        pair_step512(az[1], ay[1], NZ, NY, xq + COL(k + 2) * W, xq + COL(k + 3) * W,        \
                     wpair(val[k + 2], val[k + 3]));                                           \
    }                                                                                          \
    if (k + 2 <= k1) {                                                                         \
        pair_step512(az[0], ay[0], NZ, NY, xq + COL(k) * W, xq + COL(k + 1) * W, wpair(val[k], val[k + 1])); \
        k += 2;                                                                                \
    }                                                                                          \
    if (k < k1) pair_step512(az[1], ay[1], NZ, NY, xq + COL(k) * W, xq + COL(k) * W, wpair(val[k], 0)); \
    __m256i acc[8];                                                                            \
    for (int v = 0; v < NZ; ++v)                                                               \
        split512(_mm512_add_epi32(az[0][2 * v], az[1][2 * v]),                                 \
                 _mm512_add_epi32(az[0][2 * v + 1], az[1][2 * v + 1]), acc + 4 * v);           \
    if (NY) {                                                                                  \
        acc[4 * NZ] = _mm256_add_epi32(ay[0][0], ay[1][0]);                                    \
        acc[4 * NZ + 1] = _mm256_add_epi32(ay[0][1], ay[1][1]);                                \
    }                                                                                          \
    store_row(acc, 2 * NZ + NY, ws, xs, bias, o, y, r);                                        \
}
PAIRROW512(csr_row2z, 1, 0, int32_t, COL_CSR)
PAIRROW512(csr_row3z, 1, 1, int32_t, COL_CSR)
PAIRROW512(csr_row4z, 2, 0, int32_t, COL_CSR)
PAIRROW512(nm_row2z, 1, 0, uint8_t, COL_NM)
PAIRROW512(nm_row3z, 1, 1, uint8_t, COL_NM)
PAIRROW512(nm_row4z, 2, 0, uint8_t, COL_NM)
#define I8_ROW(fmt, nv) fmt##_row##nv##z
#else
#define I8_ROW(fmt, nv) fmt##_row##nv
#endif

#ifdef I8_U8
/* Four u8 activation rows of a chunk interleaved into the byte quads of columns 0-15, 16-31, 32-47, 48-63. */
static inline __attribute__((always_inline)) void quad_unpack(const uint8_t *p0, const uint8_t *p1,
                                                              const uint8_t *p2, const uint8_t *p3,
                                                              __m512i *restrict u) {
    const __m512i r0 = _mm512_loadu_si512(p0), r1 = _mm512_loadu_si512(p1);
    const __m512i r2 = _mm512_loadu_si512(p2), r3 = _mm512_loadu_si512(p3);
    const __m512i t0 = _mm512_unpacklo_epi8(r0, r1), t1 = _mm512_unpackhi_epi8(r0, r1);
    const __m512i t2 = _mm512_unpacklo_epi8(r2, r3), t3 = _mm512_unpackhi_epi8(r2, r3);
    u[0] = _mm512_unpacklo_epi16(t0, t2);
    u[1] = _mm512_unpackhi_epi16(t0, t2);
    u[2] = _mm512_unpacklo_epi16(t1, t3);
    u[3] = _mm512_unpackhi_epi16(t1, t3);
}

/* Four kept weights (bytes of w4, in the order of p0..p3) times four u8 activation rows of a chunk, into
   the four accumulators of columns 0-15, 16-31, 32-47, 48-63 (layout above). */
static inline __attribute__((always_inline)) void quad_step(__m512i *restrict acc, const uint8_t *p0,
                                                            const uint8_t *p1, const uint8_t *p2,
                                                            const uint8_t *p3, int32_t w4) {
    __m512i u[4];
    quad_unpack(p0, p1, p2, p3, u);
    const __m512i w = _mm512_set1_epi32(w4);
    for (int j = 0; j < 4; ++j) acc[j] = _mm512_dpbusd_epi32(acc[j], u[j], w);
}

static inline int32_t wquad(int32_t w0, int32_t w1, int32_t w2, int32_t w3) {
    return (int32_t)((uint32_t)(uint8_t)(int8_t)w0 | (uint32_t)(uint8_t)(int8_t)w1 << 8 |
                     (uint32_t)(uint8_t)(int8_t)w2 << 16 | (uint32_t)(uint8_t)(int8_t)w3 << 24);
}

/* Subtract 128 * wsum (the u8 offset) and store the four accumulators of one row (r real columns). */
static inline void store_u8(const __m512i *a, int32_t wsum, float ws, const float *restrict xs, const float *bias,
                            int64_t o, float *restrict y, int64_t r) {
    const __m512i off = _mm512_set1_epi32((int32_t)((uint32_t)wsum * 128u));
    __m256i acc[8];
    for (int j = 0; j < 4; ++j) {
        const __m512i v = _mm512_sub_epi32(a[j], off);
        acc[2 * j] = _mm512_castsi512_si256(v);
        acc[2 * j + 1] = _mm512_extracti64x4_epi64(v, 1);
    }
    store_row(acc, 4, ws, xs, bias, o, y, r);
}

/* One output row of CSR or N:M over a u8 chunk: kept weights four at a time (two accumulator sets for
   latency), a last 1-3 padded with weight 0 on the first row of the quad. */
#define QUADROW(NAME, IDXT, COL)                                                                  \
static inline void NAME(const int8_t *restrict val, const IDXT *restrict col, int64_t k0, int64_t k1, \
                        const uint8_t *restrict x8, int sh, int64_t mm, float ws, const float *restrict xs, \
                        const float *bias, int64_t o, float *restrict y, int64_t r) {           \
    (void)sh; (void)mm;                                                                        \
    __m512i a[2][4];                                                                           \
    for (int j = 0; j < 4; ++j) a[0][j] = a[1][j] = _mm512_setzero_si512();                    \
    int32_t wsum = 0;                                                                          \
    for (int64_t k = k0; k < k1; ++k) wsum += val[k];                                          \
    int64_t k = k0;                                                                            \
    for (; k + 8 <= k1; k += 8) {                                                              \
        quad_step(a[0], x8 + COL(k) * 64, x8 + COL(k + 1) * 64, x8 + COL(k + 2) * 64, x8 + COL(k + 3) * 64, \
                  wquad(val[k], val[k + 1], val[k + 2], val[k + 3]));                          \
        quad_step(a[1], x8 + COL(k + 4) * 64, x8 + COL(k + 5) * 64, x8 + COL(k + 6) * 64,      \
                  x8 + COL(k + 7) * 64, wquad(val[k + 4], val[k + 5], val[k + 6], val[k + 7])); \
    }                                                                                          \
    if (k + 4 <= k1) {                                                                         \
        quad_step(a[0], x8 + COL(k) * 64, x8 + COL(k + 1) * 64, x8 + COL(k + 2) * 64, x8 + COL(k + 3) * 64, \
                  wquad(val[k], val[k + 1], val[k + 2], val[k + 3]));                          \
        k += 4;                                                                                \
    }                                                                                          \
    if (k < k1) {                                                                              \
        const uint8_t *q0 = x8 + COL(k) * 64;                                                  \
        const uint8_t *q1 = k + 1 < k1 ? x8 + COL(k + 1) * 64 : q0, *q2 = k + 2 < k1 ? x8 + COL(k + 2) * 64 : q0; \
        quad_step(a[1], q0, q1, q2, q0, wquad(val[k], k + 1 < k1 ? val[k + 1] : 0, k + 2 < k1 ? val[k + 2] : 0, 0)); \
    }                                                                                          \
    for (int j = 0; j < 4; ++j) a[0][j] = _mm512_add_epi32(a[0][j], a[1][j]);                  \
    store_u8(a[0], wsum, ws, xs, bias, o, y, r);                                               \
}
QUADROW(csr_quad, int32_t, COL_CSR)
QUADROW(nm_quad, uint8_t, COL_NM)
#endif

/* One output row i of CSR or N:M for one chunk (dispatch on the chunk's vector count). */
static inline void pair_row(int is_nm, int NV, const int8_t *val, const void *col, int64_t k0, int64_t k1,
                            const int16_t *xq, int sh, int64_t mm, float ws, const float *xs, const float *bias,
                            int64_t o, float *y, int64_t r) {
    if (is_nm) {
        const uint8_t *c = (const uint8_t *)col;
        if (NV == 4) I8_ROW(nm, 4)(val, c, k0, k1, xq, sh, mm, ws, xs, bias, o, y, r);
        else if (NV == 3) I8_ROW(nm, 3)(val, c, k0, k1, xq, sh, mm, ws, xs, bias, o, y, r);
        else if (NV == 2) I8_ROW(nm, 2)(val, c, k0, k1, xq, sh, mm, ws, xs, bias, o, y, r);
        else nm_row1(val, c, k0, k1, xq, sh, mm, ws, xs, bias, o, y, r);
    } else {
        const int32_t *c = (const int32_t *)col;
        if (NV == 4) I8_ROW(csr, 4)(val, c, k0, k1, xq, sh, mm, ws, xs, bias, o, y, r);
        else if (NV == 3) I8_ROW(csr, 3)(val, c, k0, k1, xq, sh, mm, ws, xs, bias, o, y, r);
        else if (NV == 2) I8_ROW(csr, 2)(val, c, k0, k1, xq, sh, mm, ws, xs, bias, o, y, r);
        else csr_row1(val, c, k0, k1, xq, sh, mm, ws, xs, bias, o, y, r);
    }
}
#endif

/* Exact sum_k val[k] * x[COL(k)] of one row at batch 1 (four partial sums for independent chains). */
#define DOT1(NAME, IDXT, COL)                                                                     \
static inline int32_t NAME(const int8_t *restrict val, const IDXT *restrict col, int64_t k0, int64_t k1, \
                           const int16_t *restrict x, int sh, int64_t mm) {                     \
    (void)sh; (void)mm;                                                                        \
    int32_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;                                                    \
    int64_t k = k0;                                                                            \
    for (; k + 4 <= k1; k += 4) {                                                              \
        s0 += (int32_t)val[k] * x[COL(k)];                                                     \
        s1 += (int32_t)val[k + 1] * x[COL(k + 1)];                                             \
        s2 += (int32_t)val[k + 2] * x[COL(k + 2)];                                             \
        s3 += (int32_t)val[k + 3] * x[COL(k + 3)];                                             \
    }                                                                                          \
    for (; k < k1; ++k) s0 += (int32_t)val[k] * x[COL(k)];                                     \
    return (s0 + s1) + (s2 + s3);                                                              \
}
DOT1(csr_dot1, int32_t, COL_CSR)
DOT1(nm_dot1, uint8_t, COL_NM)

#ifdef I8_AVX512
/* Batch 1 with 16-lane gathers: a 32-bit gather at x + 2 col reads (x[col], x[col + 1]) (x has N + 1
   values, so col = N - 1 stays inside) and the weight (w, 0) takes the first: pair sums of s16 products,
   exact. Two accumulators hide the multiply-add latency. */
static inline __m512i dot1_step(__m512i acc, __m512i idx, __m128i w8, const int16_t *x, __mmask16 m) {
    const __m512i g = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m, idx, x, 2);
    const __m512i w = _mm512_and_si512(_mm512_cvtepi8_epi32(w8), _mm512_set1_epi32(0xFFFF));
    return I8_DPW512(acc, g, w);
}

/* Column indices of entries k .. k + 15 (mask m) of an N:M row starting at k0. */
static inline __m512i nm_idx(const uint8_t *off, int64_t k, int64_t k0, int sh, int64_t mm, __mmask16 m) {
    const __m512i e = _mm512_add_epi32(_mm512_set1_epi32((int32_t)(k - k0)),
                                       _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    const __m512i grp = _mm512_mullo_epi32(_mm512_srli_epi32(e, (unsigned)sh), _mm512_set1_epi32((int32_t)mm));
    return _mm512_add_epi32(grp, _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, off + k)));
}

#define DOT1_512(NAME, IDXT, IDX)                                                                 \
static inline int32_t NAME(const int8_t *restrict val, const IDXT *restrict col, int64_t k0, int64_t k1, \
                           const int16_t *restrict x, int sh, int64_t mm) {                     \
    (void)sh; (void)mm;                                                                        \
    __m512i a0 = _mm512_setzero_si512(), a1 = _mm512_setzero_si512();                          \
    int64_t k = k0;                                                                            \
    for (; k + 32 <= k1; k += 32) {                                                            \
        a0 = dot1_step(a0, IDX(k, 0xFFFF), _mm_loadu_si128((const __m128i *)(val + k)), x, 0xFFFF); \
        a1 = dot1_step(a1, IDX(k + 16, 0xFFFF), _mm_loadu_si128((const __m128i *)(val + k + 16)), x, 0xFFFF); \
    }                                                                                          \
    for (; k < k1; k += 16) {                                                                  \
        const __mmask16 m = k1 - k >= 16 ? 0xFFFF : (__mmask16)((1u << (k1 - k)) - 1);         \
        a0 = dot1_step(a0, IDX(k, m), _mm_maskz_loadu_epi8(m, val + k), x, m);                \
    }                                                                                          \
    return _mm512_reduce_add_epi32(_mm512_add_epi32(a0, a1));                                  \
}
#define CSR_IDX(k, m) _mm512_maskz_loadu_epi32(m, col + (k))
#define NM_IDX(k, m) nm_idx(col, k, k0, sh, mm, m)
DOT1_512(csr_dot1z, int32_t, CSR_IDX)
DOT1_512(nm_dot1z, uint8_t, NM_IDX)
#define I8_DOT1(fmt) fmt##_dot1z
#else
#define I8_DOT1(fmt) fmt##_dot1
#endif

#ifndef I8_AVX2
/* Generic: one output row, one chunk of W columns (stored order), int32 accumulators per position. */
#define GENROW(NAME, IDXT, COL)                                                                   \
static void NAME(const int8_t *restrict val, const IDXT *restrict col, int64_t k0, int64_t k1,  \
                 const int16_t *restrict xq, int64_t W, int sh, int64_t mm, int32_t *restrict acc) { \
    (void)sh; (void)mm;                                                                        \
    for (int64_t t = 0; t < W; ++t) acc[t] = 0;                                                \
    for (int64_t k = k0; k < k1; ++k) {                                                        \
        const int32_t w = val[k];                                                              \
        const int16_t *restrict p = xq + COL(k) * W;                                           \
        for (int64_t t = 0; t < W; ++t) acc[t] += w * p[t];                                    \
    }                                                                                          \
}
GENROW(csr_gen, int32_t, COL_CSR)
GENROW(nm_gen, uint8_t, COL_NM)
#endif

/* CSR (is_nm = 0: row i has val/col[crow[i] .. crow[i+1]), int32 columns) or N:M (is_nm = 1: row i has
   the K entries i*K .., 1-byte offsets, n = 2^sh per group of mm) times the quantized activations. */
#define PAIR_ARGS int is_nm, int64_t M, int64_t N, int64_t B, const int32_t *crow, int64_t K, int sh, \
    int64_t mm, const void *col, const int8_t *val, const int16_t *xq, const float *ws, const float *xs, \
    const float *bias, float *yt, int rm
#define PAIR_PASS is_nm, M, N, B, crow, K, sh, mm, col, val, xq, ws, xs, bias, yt, rm
/* Part tid of nth (contiguous output rows) of pair_matmul. */
static void pair_part(int tid, int nth, PAIR_ARGS) {
    const int64_t lo = M * tid / nth, hi = M * (tid + 1) / nth;
    int32_t acc32[I8_CHUNK];
    for (int64_t i = lo; i < hi && B == 1; ++i) {
        const int64_t k0 = is_nm ? i * K : crow[i], k1 = is_nm ? k0 + K : crow[i + 1];
        const int32_t a = is_nm ? I8_DOT1(nm)(val, (const uint8_t *)col, k0, k1, xq, sh, mm)
                                : I8_DOT1(csr)(val, (const int32_t *)col, k0, k1, xq, sh, mm);
        yt[i] = rescale1(a, ws[i], xs[0], bias, i);
    }
    float tile[I8_TILE_ROWS * I8_CHUNK] __attribute__((aligned(64))); /* rm: a block of output rows of one chunk, then transposed into y */
    for (int64_t c = 0; B > 1 && c * I8_CHUNK < B; ++c) {
        const int64_t W = chunk_width(B, c), b0 = c * I8_CHUNK, r = B - b0 < W ? B - b0 : W;
        const int16_t *xc = xq + b0 * N;
        const int u8 = chunk_u8(B, c);
        const uint8_t *x8 = (const uint8_t *)xc;
        (void)u8; (void)x8;
        for (int64_t i0 = lo; i0 < hi; i0 += I8_TILE_ROWS) {
            const int64_t i1 = hi - i0 < I8_TILE_ROWS ? hi : i0 + I8_TILE_ROWS;
            for (int64_t i = i0; i < i1; ++i) {
                const int64_t k0 = is_nm ? i * K : crow[i], k1 = is_nm ? k0 + K : crow[i + 1];
                float *out = rm ? tile + (i - i0) * I8_CHUNK : yt + i * B + b0;
#ifdef I8_U8
                if (u8) {
                    if (is_nm) nm_quad(val, (const uint8_t *)col, k0, k1, x8, sh, mm, ws[i], xs + b0, bias, i, out, r);
                    else csr_quad(val, (const int32_t *)col, k0, k1, x8, sh, mm, ws[i], xs + b0, bias, i, out, r);
                    continue;
                }
#endif
#ifdef I8_AVX2
                pair_row(is_nm, (int)(W / 16), val, col, k0, k1, xc, sh, mm, ws[i], xs + b0, bias, i, out, r);
                (void)acc32;
#else
                if (is_nm) nm_gen(val, (const uint8_t *)col, k0, k1, xc, W, sh, mm, acc32);
                else csr_gen(val, (const int32_t *)col, k0, k1, xc, W, sh, mm, acc32);
                for (int64_t t = 0; t < r; ++t) out[t] = rescale1(acc32[lane_pos(t)], ws[i], xs[b0 + t], bias, i);
#endif
            }
            if (rm) pk_transpose_cols(tile, i1 - i0, 0, r, I8_CHUNK, yt + b0 * M + i0, M);
        }
    }
}

/* Output rows split into nthreads contiguous ranges; one thread skips OpenMP entirely (latency at batch 1). */
static void pair_matmul(PAIR_ARGS, int nthreads) {
    if (nthreads <= 1) {
        pair_part(0, 1, PAIR_PASS);
        return;
    }
    #pragma omp parallel num_threads(nthreads)
    pair_part(omp_get_thread_num(), omp_get_num_threads(), PAIR_PASS);
}

/* yt (M x B) from CSR int8 weights (crow, col int32, val int8), ws (M), xq/xs from prunekit_i8_quantize. */
void prunekit_i8_csr(int64_t M, int64_t N, int64_t B, const int32_t *crow, const int32_t *col, const int8_t *val,
                     const int16_t *xq, const float *ws, const float *xs, const float *bias, float *yt,
                     int rm, int nthreads) {
    pair_matmul(0, M, N, B, crow, 0, 0, 0, col, val, xq, ws, xs, bias, yt, rm, nthreads);
}

/* yt (M x B) from N:M int8 weights: K entries per row (off uint8 offsets in groups of mm, n = 2^sh). */
void prunekit_i8_nm(int64_t M, int64_t N, int64_t B, int64_t K, int sh, int64_t mm, const uint8_t *off,
                    const int8_t *val, const int16_t *xq, const float *ws, const float *xs, const float *bias,
                    float *yt, int rm, int nthreads) {
    pair_matmul(1, M, N, B, 0, K, sh, mm, off, val, xq, ws, xs, bias, yt, rm, nthreads);
}

/* ---- Row blocks: G groups of R consecutive output rows sharing the columns col[gptr[g] .. gptr[g+1]),
   values val[k * R + r]. ---- */

/* Batch 1, rows r0 .. r0 + S of a group: one loaded activation serves the S rows. */
static void rows_dot1(int64_t R, int64_t r0, int64_t S, const int32_t *restrict col, const int8_t *restrict val,
                      int64_t k0, int64_t k1, const int16_t *restrict x, int32_t *restrict acc) {
    for (int64_t s = 0; s < S; ++s) acc[s] = 0;
#ifdef I8_AVX2
    if (S == 8) { /* (w sign-extended to 32 bits) x (x, 0): madd's high halves multiply by 0 */
        __m256i a = _mm256_setzero_si256(), a2 = _mm256_setzero_si256();
        int64_t k = k0;
        for (; k + 2 <= k1; k += 2) {
            const __m256i w0 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(val + k * R + r0)));
            const __m256i w1 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(val + (k + 1) * R + r0)));
            a = I8_DPW256(a, w0, _mm256_set1_epi32((uint16_t)x[col[k]]));
            a2 = I8_DPW256(a2, w1, _mm256_set1_epi32((uint16_t)x[col[k + 1]]));
        }
        for (; k < k1; ++k) {
            const __m256i w0 = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(val + k * R + r0)));
            a = I8_DPW256(a, w0, _mm256_set1_epi32((uint16_t)x[col[k]]));
        }
        _mm256_storeu_si256((__m256i *)acc, _mm256_add_epi32(a, a2));
        return;
    }
#endif
    for (int64_t k = k0; k < k1; ++k) {
        const int32_t xv = x[col[k]];
        const int8_t *restrict w = val + k * R + r0;
        for (int64_t s = 0; s < S; ++s) acc[s] += w[s] * xv;
    }
}

#ifdef I8_AVX2
/* Batch > 1, S rows (S = 4, 2, 1) of a group, one 16-column vector at column offset t of a chunk of width W.
   wp[p * R + r] are the weight pairs of column pair p (built once per group). */
#define ROWSPAIR(S)                                                                               \
static inline void rows_pair##S(const int32_t *restrict col, const int32_t *restrict wp, int64_t R, \
                                int64_t k0, int64_t k1, const int16_t *restrict xc, int64_t W, __m256i *acc) { \
    for (int h = 0; h < 2 * S; ++h) acc[h] = _mm256_setzero_si256();                          \
    for (int64_t k = k0, p = 0; k < k1; k += 2, ++p) {                                        \
        const __m256i x0 = _mm256_loadu_si256((const __m256i *)(xc + (int64_t)col[k] * W));   \
        const __m256i x1 = k + 1 < k1 ? _mm256_loadu_si256((const __m256i *)(xc + (int64_t)col[k + 1] * W)) : x0; \
        const __m256i lo = _mm256_unpacklo_epi16(x0, x1), hi = _mm256_unpackhi_epi16(x0, x1); \
        _Pragma("GCC unroll 4")                                                                \
        for (int s = 0; s < S; ++s) {                                                          \
            const __m256i w = _mm256_set1_epi32(wp[p * R + s]);                                \
            acc[2 * s] = I8_DPW256(acc[2 * s], lo, w);               \
            acc[2 * s + 1] = I8_DPW256(acc[2 * s + 1], hi, w);       \
        }                                                                                      \
    }                                                                                          \
}
ROWSPAIR(4) ROWSPAIR(2) ROWSPAIR(1)

#ifdef I8_U8
/* Rows s .. s + S of a group over a u8 chunk: each quad of kept columns is unpacked once for the S rows;
   wq[p * R + s] are the rows' weight quads, wsr[s] their weight sums. */
#define ROWSQUAD(S)                                                                               \
static inline void rows_quad##S(const int32_t *restrict col, const int32_t *restrict wq, const int32_t *wsr, \
                                int64_t R, int64_t nk, const uint8_t *restrict x8, const float *ws,     \
                                const float *restrict xs, const float *bias, int64_t o0, float *restrict y, \
                                int64_t ldy, int64_t r) {                                      \
    __m512i acc[S][4];                                                                         \
    for (int q = 0; q < S; ++q) for (int j = 0; j < 4; ++j) acc[q][j] = _mm512_setzero_si512(); \
    for (int64_t k = 0, p = 0; k < nk; k += 4, ++p) {                                          \
        const uint8_t *q0 = x8 + (int64_t)col[k] * 64;                                         \
        __m512i u[4];                                                                          \
        quad_unpack(q0, k + 1 < nk ? x8 + (int64_t)col[k + 1] * 64 : q0,                       \
                    k + 2 < nk ? x8 + (int64_t)col[k + 2] * 64 : q0,                           \
                    k + 3 < nk ? x8 + (int64_t)col[k + 3] * 64 : q0, u);                       \
        _Pragma("GCC unroll 4")                                                                \
        for (int q = 0; q < S; ++q) {                                                          \
            const __m512i w = _mm512_set1_epi32(wq[p * R + q]);                                \
            for (int j = 0; j < 4; ++j) acc[q][j] = _mm512_dpbusd_epi32(acc[q][j], u[j], w);   \
        }                                                                                      \
    }                                                                                          \
    for (int q = 0; q < S; ++q)                                                                \
        store_u8(acc[q], wsr[q], ws[o0 + q], xs, bias, o0 + q, y + q * ldy, r);                \
}
ROWSQUAD(4) ROWSQUAD(2) ROWSQUAD(1)

/* All R rows of a group over a u8 chunk (columns b0 .., r real). */
static void rows_chunk_u8(int64_t R, const int32_t *col, const int32_t *wq, const int32_t *wsr, int64_t nk,
                          const uint8_t *x8, const float *ws, const float *xs, const float *bias, int64_t o0,
                          float *y, int64_t ldy, int64_t r) {
    for (int64_t s = 0; s < R;) {
        const int64_t left = R - s, S = left >= 4 ? 4 : left >= 2 ? 2 : 1;
        if (S == 4) rows_quad4(col, wq + s, wsr + s, R, nk, x8, ws, xs, bias, o0 + s, y + s * ldy, ldy, r);
        else if (S == 2) rows_quad2(col, wq + s, wsr + s, R, nk, x8, ws, xs, bias, o0 + s, y + s * ldy, ldy, r);
        else rows_quad1(col, wq + s, wsr + s, R, nk, x8, ws, xs, bias, o0 + s, y + s * ldy, ldy, r);
        s += S;
    }
}
#endif

/* All R rows of group g for one chunk (columns b0 .., r real, width W). */
static void rows_chunk(int64_t R, const int32_t *col, const int32_t *wp, int64_t k0, int64_t k1,
                       const int16_t *xc, int64_t W, const float *ws, const float *xs, const float *bias,
                       int64_t o0, float *y, int64_t ldy, int64_t b0, int64_t r) {
    __m256i acc[8];
    for (int64_t t = 0; t < W; t += 16) {
        const int64_t rt = r - t;
        if (rt <= 0) break;
        for (int64_t s = 0; s < R;) {
            const int64_t left = R - s, S = left >= 4 ? 4 : left >= 2 ? 2 : 1;
            if (S == 4) rows_pair4(col, wp + s, R, k0, k1, xc + t, W, acc);
            else if (S == 2) rows_pair2(col, wp + s, R, k0, k1, xc + t, W, acc);
            else rows_pair1(col, wp + s, R, k0, k1, xc + t, W, acc);
            for (int64_t q = 0; q < S; ++q)
                store_row(acc + 2 * q, 1, ws[o0 + s + q], xs + b0 + t, bias, o0 + s + q,
                          y + (s + q) * ldy + t, rt < 16 ? rt : 16);
            s += S;
        }
    }
}
#endif

#ifdef I8_U8
/* Weight quads wq[p * R + s] (kept columns 4p .. 4p + 3 of row s, zero-padded) and row sums wsr[s] of the
   group with values val[k * R + s], k0 <= k < k1. */
static void rows_weights_u8(int64_t R, const int8_t *val, int64_t k0, int64_t k1, int32_t *wq, int32_t *wsr) {
    for (int64_t s = 0; s < R; ++s) wsr[s] = 0;
    for (int64_t k = k0, p = 0; k < k1; k += 4, ++p)
        for (int64_t s = 0; s < R; ++s) {
            int32_t w[4] = {0, 0, 0, 0};
            for (int64_t u = 0; u < 4 && k + u < k1; ++u) w[u] = val[(k + u) * R + s];
            wq[p * R + s] = wquad(w[0], w[1], w[2], w[3]);
            wsr[s] += w[0] + w[1] + w[2] + w[3];
        }
}
#endif

#define ROWS_ARGS int64_t G, int64_t R, int64_t N, int64_t B, const int32_t *gptr, const int32_t *col, \
    const int8_t *val, const int16_t *xq, const float *ws, const float *xs, const float *bias, float *yt, int rm
#define ROWS_PASS G, R, N, B, gptr, col, val, xq, ws, xs, bias, yt, rm
static void rows_part(int tid, int nth, int64_t maxk, ROWS_ARGS);

void prunekit_i8_rows(ROWS_ARGS, int nthreads) {
    int64_t maxk = 0;
    for (int64_t g = 0; g < G; ++g) maxk = gptr[g + 1] - gptr[g] > maxk ? gptr[g + 1] - gptr[g] : maxk;
    if (nthreads <= 1) {
        rows_part(0, 1, maxk, ROWS_PASS);
        return;
    }
    #pragma omp parallel num_threads(nthreads)
    rows_part(omp_get_thread_num(), omp_get_num_threads(), maxk, ROWS_PASS);
}

/* Part tid of nth (contiguous groups) of prunekit_i8_rows. */
static void rows_part(int tid, int nth, int64_t maxk, ROWS_ARGS) {
    const int64_t lo = G * tid / nth, hi = G * (tid + 1) / nth;
    const int64_t npair = (maxk + 1) / 2 * R, nquad = (maxk + 3) / 4 * R;
    int32_t *scratch = (int32_t *)malloc(sizeof(int32_t) * (size_t)(npair + nquad + R + I8_CHUNK + 8));
    int32_t *acc = scratch; /* batch 1 and generic: up to I8_CHUNK (or 8 rows) accumulators */
    int32_t *wp = scratch + I8_CHUNK + 8; /* AVX2: weight pairs of the group */
    int32_t *wq = wp + npair, *wsr = wq + nquad; /* u8 chunks: weight quads and sums of the group's rows */
    (void)wq; (void)wsr;
    float *tile = rm && B > 1 ? (float *)aligned_alloc(64, sizeof(float) * (size_t)(R * I8_CHUNK)) : 0; /* rm */
    (void)wp;
    for (int64_t g = lo; g < hi && scratch && (tile || !rm || B == 1); ++g) {
        const int64_t k0 = gptr[g], k1 = gptr[g + 1], o0 = g * R;
        if (B == 1) {
            for (int64_t s = 0; s < R;) {
                const int64_t S = R - s >= 8 ? 8 : R - s;
                rows_dot1(R, s, S, col, val, k0, k1, xq, acc);
                for (int64_t q = 0; q < S; ++q) yt[o0 + s + q] = rescale1(acc[q], ws[o0 + s + q], xs[0], bias, o0 + s + q);
                s += S;
            }
            continue;
        }
#ifdef I8_AVX2
        for (int64_t k = k0, p = 0; k < k1; k += 2, ++p)
            for (int64_t s = 0; s < R; ++s)
                wp[p * R + s] = wpair(val[k * R + s], k + 1 < k1 ? val[(k + 1) * R + s] : 0);
#endif
#ifdef I8_U8
        if (chunk_u8(B, 0)) rows_weights_u8(R, val, k0, k1, wq, wsr);
#endif
        for (int64_t c = 0; c * I8_CHUNK < B; ++c) {
            const int64_t W = chunk_width(B, c), b0 = c * I8_CHUNK, r = B - b0 < W ? B - b0 : W;
            const int16_t *xc = xq + b0 * N;
#ifdef I8_U8
            if (chunk_u8(B, c)) {
                rows_chunk_u8(R, col + k0, wq, wsr, k1 - k0, (const uint8_t *)xc, ws, xs + b0, bias, o0,
                              rm ? tile : yt + o0 * B + b0, rm ? I8_CHUNK : B, r);
                if (rm) pk_transpose_cols(tile, R, 0, r, I8_CHUNK, yt + b0 * G * R + o0, G * R);
                continue;
            }
#endif
#ifdef I8_AVX2
            rows_chunk(R, col + k0, wp, 0, k1 - k0, xc, W, ws, xs, bias, o0, rm ? tile : yt + o0 * B + b0,
                       rm ? I8_CHUNK : B, b0, r);
#else
            for (int64_t s = 0; s < R; ++s) {
                for (int64_t t = 0; t < W; ++t) acc[t] = 0;
                for (int64_t k = k0; k < k1; ++k) {
                    const int32_t w = val[k * R + s];
                    const int16_t *restrict p = xc + (int64_t)col[k] * W;
                    for (int64_t t = 0; t < W; ++t) acc[t] += w * p[t];
                }
                for (int64_t t = 0; t < r; ++t)
                    (rm ? tile + s * I8_CHUNK : yt + (o0 + s) * B + b0)[t] =
                        rescale1(acc[lane_pos(t)], ws[o0 + s], xs[b0 + t], bias, o0 + s);
            }
#endif
            if (rm) pk_transpose_cols(tile, R, 0, r, I8_CHUNK, yt + b0 * G * R + o0, G * R);
        }
    }
    free(scratch);
    free(tile);
}

const char *prunekit_i8_simd(void) { return I8_SIMD; }

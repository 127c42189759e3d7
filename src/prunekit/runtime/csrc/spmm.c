/* prunekit's fp32 sparse x dense kernels: Y^T = W @ X^T + b with X^T (in x B) batch-contiguous, W in
   CSR (prunekit_spmm_t), row blocks (prunekit_rows_t) or N:M (prunekit_nm_t). One source, three builds
   selected at compile time by the target's flags (-march=native): AVX-512 (16 lanes, 32 registers),
   AVX2 + FMA (8 lanes, 16 registers) and plain C. Within a build, every output is computed by one
   thread in an order fixed by the shapes alone, so results do not depend on the thread count. */
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

#ifdef __AVX512F__
#include <immintrin.h>
/* Lane masks of the nvec vectors covering r batch columns (full, partial, empty); returns how
   many vectors hold columns. */
static inline int chunk_masks(int64_t r, __mmask16 *m, int nvec) {
    for (int v = 0; v < nvec; ++v) {
        const int64_t n = r - 16 * v;
        m[v] = n >= 16 ? (__mmask16)0xFFFF : n > 0 ? (__mmask16)((1u << n) - 1u) : (__mmask16)0;
    }
    return (int)((r + 15) / 16);
}
/* Columns b0..b0+16*NV of one output row: NV AVX-512 accumulators (four sets, nonzeros k mod 4,
   summed at the end), masks for a partial last vector. Fixed order: deterministic. */
#define CHUNKV(NAME, NV, COLT, COL)                                                          \
static inline void NAME(const COLT *restrict col, const float *restrict val,                   \
                              int64_t k0, int64_t k1, const float *restrict xt, int64_t ldx,  \
                              float *restrict out, float bias, const __mmask16 *m,            \
                              int first, int last, int sh, int64_t mm) {                      \
    (void)sh; (void)mm;                                                                      \
    __m512 a[NV], c[NV], d[NV], e[NV];                                                       \
    _Pragma("GCC unroll 4")                                                                  \
    for (int v = 0; v < NV; ++v) {                                                           \
        a[v] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(m[v], out + 16 * v);      \
        c[v] = _mm512_setzero_ps(); d[v] = _mm512_setzero_ps(); e[v] = _mm512_setzero_ps();  \
    }                                                                                        \
    int64_t k = k0;                                                                          \
    for (; k + 4 <= k1; k += 4) {                                                            \
        const __m512 w0 = _mm512_set1_ps(val[k]), w1 = _mm512_set1_ps(val[k + 1]);          \
        const __m512 w2 = _mm512_set1_ps(val[k + 2]), w3 = _mm512_set1_ps(val[k + 3]);      \
        const float *p0 = xt + COL(k) * ldx, *p1 = xt + COL(k + 1) * ldx;                    \
        const float *p2 = xt + COL(k + 2) * ldx, *p3 = xt + COL(k + 3) * ldx;                \
        _Pragma("GCC unroll 4")                                                              \
        for (int v = 0; v < NV; ++v) {                                                       \
            a[v] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m[v], p0 + 16 * v), a[v]);      \
            c[v] = _mm512_fmadd_ps(w1, _mm512_maskz_loadu_ps(m[v], p1 + 16 * v), c[v]);      \
            d[v] = _mm512_fmadd_ps(w2, _mm512_maskz_loadu_ps(m[v], p2 + 16 * v), d[v]);      \
            e[v] = _mm512_fmadd_ps(w3, _mm512_maskz_loadu_ps(m[v], p3 + 16 * v), e[v]);      \
        }                                                                                    \
    }                                                                                        \
    for (; k < k1; ++k) {                                                                    \
        const __m512 w0 = _mm512_set1_ps(val[k]);                                            \
        const float *p0 = xt + COL(k) * ldx;                                                 \
        _Pragma("GCC unroll 4")                                                              \
        for (int v = 0; v < NV; ++v)                                                         \
            a[v] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(m[v], p0 + 16 * v), a[v]);      \
    }                                                                                        \
    const __m512 bb = _mm512_set1_ps(bias);                                                  \
    _Pragma("GCC unroll 4")                                                                  \
    for (int v = 0; v < NV; ++v) {                                                           \
        const __m512 s = _mm512_add_ps(_mm512_add_ps(a[v], c[v]), _mm512_add_ps(d[v], e[v])); \
        _mm512_mask_storeu_ps(out + 16 * v, m[v], last ? _mm512_add_ps(s, bb) : s);          \
    }                                                                                        \
}
/* Batch columns per chunk of the row-block kernel (two vectors per row, up to 8 rows at once), and
   the smallest chunk of the CSR kernel (which takes 32, 48 or 64 from its caller). */
#define BCHUNK 32
/* CSR: the column index is stored. N:M: entry k of a row (local index k - k0) lies in group
   (k - k0) >> sh (n = 2^sh kept per group) at the stored 1-byte offset within its group of mm. */
#define COL_CSR(k) ((int64_t)col[k])
#define COL_NM(k) (((int64_t)((k) - k0) >> sh) * mm + (int64_t)col[k])
CHUNKV(chunkv4, 4, int32_t, COL_CSR)
CHUNKV(chunkv3, 3, int32_t, COL_CSR)
CHUNKV(chunkv2, 2, int32_t, COL_CSR)
CHUNKV(chunkv1, 1, int32_t, COL_CSR)
CHUNKV(nmv4, 4, uint8_t, COL_NM)
CHUNKV(nmv3, 3, uint8_t, COL_NM)
CHUNKV(nmv2, 2, uint8_t, COL_NM)
CHUNKV(nmv1, 1, uint8_t, COL_NM)
#define PRUNEKIT_SIMD "avx512"
#elif defined(__AVX2__) && defined(__FMA__)
#define PRUNEKIT_SIMD "avx2"
#define BCHUNK 32
#else
#define PRUNEKIT_SIMD "generic"
#define BCHUNK 32 /* batch columns per pass; the generic loops use it for the same chunking */
#endif

/* One batch column (b fixed): a sparse dot product, four fixed partial sums. */
static inline float dot1(const int32_t *restrict col, const float *restrict val,
                         int64_t k0, int64_t k1, const float *restrict x, int64_t ldx) {
    float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
    int64_t k = k0;
    for (; k + 4 <= k1; k += 4) {
        s0 += val[k] * x[(int64_t)col[k] * ldx];
        s1 += val[k + 1] * x[(int64_t)col[k + 1] * ldx];
        s2 += val[k + 2] * x[(int64_t)col[k + 2] * ldx];
        s3 += val[k + 3] * x[(int64_t)col[k + 3] * ldx];
    }
    for (; k < k1; ++k) s0 += val[k] * x[(int64_t)col[k] * ldx];
    return (s0 + s1) + (s2 + s3);
}

#ifdef __AVX512F__
/* Batch 1 with a unit-stride x: sparse dot product with 16-lane gathers, two fixed partial vectors. */
static inline float dot1g(const int32_t *restrict col, const float *restrict val,
                          int64_t k0, int64_t k1, const float *restrict x) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t k = k0;
    for (; k + 32 <= k1; k += 32) {
        const __m512 g0 = _mm512_i32gather_ps(_mm512_loadu_si512(col + k), x, 4);
        const __m512 g1 = _mm512_i32gather_ps(_mm512_loadu_si512(col + k + 16), x, 4);
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(val + k), g0, s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(val + k + 16), g1, s1);
    }
    for (; k < k1; k += 16) {
        const int64_t n = k1 - k;
        const __mmask16 m = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u);
        const __m512 g = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, _mm512_maskz_loadu_epi32(m, col + k), x, 4);
        s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, val + k), g, s0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}
#endif

#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
/* ---- AVX2 + FMA (8 lanes, 16 registers). Same structure as the AVX-512 paths; the register
   budget is half, so the accumulator layouts differ. Every output is computed by one thread in an
   order fixed by the shapes only (deterministic for any thread count). ---- */
#include <immintrin.h>
#define PK_AVX2 1

/* Lanes 0..n-1 set (n in 0..8): the mask of _mm256_maskload_ps / _mm256_maskstore_ps. */
static inline __m256i lanes8(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* Columns 0..8*NV of one output row (full vectors: plain loads): NS accumulator sets (nonzeros
   k mod NS, summed at the end) of NV vectors. NV*NS <= 12 keeps everything in the 16 registers;
   X^T is read as a memory operand of the FMA, so a nonzero costs NV loads + one broadcast + one
   index. first: start from zero (else from out, the previous tile's partial sums); last: add bias. */
#define CHUNK8(NAME, NV, NS, COLT, COL)                                                        \
static inline void NAME(const COLT *restrict col, const float *restrict val, int64_t k0,       \
                        int64_t k1, const float *restrict xt, int64_t ldx, float *restrict out, \
                        float bias, int first, int last, int sh, int64_t mm) {                  \
    (void)sh; (void)mm;                                                                        \
    __m256 a[NS][NV];                                                                          \
    _Pragma("GCC unroll 8")                                                                    \
    for (int v = 0; v < NV; ++v) {                                                             \
        a[0][v] = first ? _mm256_setzero_ps() : _mm256_loadu_ps(out + 8 * v);                  \
        _Pragma("GCC unroll 4")                                                                \
        for (int s = 1; s < NS; ++s) a[s][v] = _mm256_setzero_ps();                            \
    }                                                                                          \
    int64_t k = k0;                                                                            \
    for (; k + NS <= k1; k += NS) {                                                            \
        _Pragma("GCC unroll 4")                                                                \
        for (int s = 0; s < NS; ++s) {                                                         \
            const __m256 w = _mm256_broadcast_ss(val + k + s);                                 \
            const float *p = xt + COL(k + s) * ldx;                                            \
            _Pragma("GCC unroll 8")                                                            \
            for (int v = 0; v < NV; ++v) a[s][v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(p + 8 * v), a[s][v]); \
        }                                                                                      \
    }                                                                                          \
    for (; k < k1; ++k) {                                                                      \
        const __m256 w = _mm256_broadcast_ss(val + k);                                         \
        const float *p = xt + COL(k) * ldx;                                                    \
        _Pragma("GCC unroll 8")                                                                \
        for (int v = 0; v < NV; ++v) a[0][v] = _mm256_fmadd_ps(w, _mm256_loadu_ps(p + 8 * v), a[0][v]); \
    }                                                                                          \
    const __m256 bb = _mm256_set1_ps(bias);                                                    \
    _Pragma("GCC unroll 8")                                                                    \
    for (int v = 0; v < NV; ++v) {                                                             \
        __m256 t = a[0][v];                                                                    \
        if (NS == 2) t = _mm256_add_ps(a[0][v], a[NS - 1][v]);                                 \
        if (NS == 4) t = _mm256_add_ps(_mm256_add_ps(a[0][v], a[1 % NS][v]),                   \
                                       _mm256_add_ps(a[2 % NS][v], a[3 % NS][v]));             \
        _mm256_storeu_ps(out + 8 * v, last ? _mm256_add_ps(t, bb) : t);                        \
    }                                                                                          \
}
/* The last 1..7 columns of a chunk: one masked vector, four sets (k mod 4). Masked loads never
   read past the end of X^T; the masked store runs once per row. */
#define CHUNKTAIL(NAME, COLT, COL)                                                             \
static inline void NAME(const COLT *restrict col, const float *restrict val, int64_t k0,       \
                        int64_t k1, const float *restrict xt, int64_t ldx, float *restrict out, \
                        float bias, __m256i m, int first, int last, int sh, int64_t mm) {       \
    (void)sh; (void)mm;                                                                        \
    __m256 a[4] = {first ? _mm256_setzero_ps() : _mm256_maskload_ps(out, m), _mm256_setzero_ps(), \
                   _mm256_setzero_ps(), _mm256_setzero_ps()};                                  \
    int64_t k = k0;                                                                            \
    for (; k + 4 <= k1; k += 4)                                                                \
        _Pragma("GCC unroll 4")                                                                \
        for (int s = 0; s < 4; ++s)                                                            \
            a[s] = _mm256_fmadd_ps(_mm256_broadcast_ss(val + k + s),                           \
                                   _mm256_maskload_ps(xt + COL(k + s) * ldx, m), a[s]);        \
    for (; k < k1; ++k)                                                                        \
        a[0] = _mm256_fmadd_ps(_mm256_broadcast_ss(val + k), _mm256_maskload_ps(xt + COL(k) * ldx, m), a[0]); \
    const __m256 t = _mm256_add_ps(_mm256_add_ps(a[0], a[1]), _mm256_add_ps(a[2], a[3]));     \
    _mm256_maskstore_ps(out, m, last ? _mm256_add_ps(t, _mm256_set1_ps(bias)) : t);            \
}
#define COL_CSR(k) ((int64_t)col[k])
#define COL_NM(k) (((int64_t)((k) - k0) >> sh) * mm + (int64_t)col[k])
CHUNK8(csr8_1, 1, 4, int32_t, COL_CSR) CHUNK8(csr8_2, 2, 4, int32_t, COL_CSR)
CHUNK8(csr8_3, 3, 2, int32_t, COL_CSR) CHUNK8(csr8_4, 4, 2, int32_t, COL_CSR)
CHUNK8(csr8_5, 5, 2, int32_t, COL_CSR) CHUNK8(csr8_6, 6, 2, int32_t, COL_CSR)
CHUNK8(csr8_7, 7, 1, int32_t, COL_CSR) CHUNK8(csr8_8, 8, 1, int32_t, COL_CSR)
CHUNKTAIL(csr8_tail, int32_t, COL_CSR)
CHUNK8(nm8_1, 1, 4, uint8_t, COL_NM) CHUNK8(nm8_2, 2, 4, uint8_t, COL_NM)
CHUNK8(nm8_3, 3, 2, uint8_t, COL_NM) CHUNK8(nm8_4, 4, 2, uint8_t, COL_NM)
CHUNK8(nm8_5, 5, 2, uint8_t, COL_NM) CHUNK8(nm8_6, 6, 2, uint8_t, COL_NM)
CHUNK8(nm8_7, 7, 1, uint8_t, COL_NM) CHUNK8(nm8_8, 8, 1, uint8_t, COL_NM)
CHUNKTAIL(nm8_tail, uint8_t, COL_NM)

/* Batch columns per pass of the CSR and N:M kernels. Fixed, not the caller's bchunk: the number of
   accumulator sets depends on how many vectors a chunk has (registers), so a column's summation
   order depends on its chunk's width; a fixed width keeps the bits independent of bchunk. */
#ifndef AVX2_BC
#define AVX2_BC 64
#endif
/* One row's columns b..b+r (r <= 64): nf = r / 8 full vectors, then the r % 8 tail. */
#define CHUNKROW(NAME, PRE, COLT)                                                              \
static inline void NAME(int64_t r, const COLT *restrict col, const float *restrict val,        \
                        int64_t k0, int64_t k1, const float *restrict xt, int64_t ldx,         \
                        float *restrict out, float bias, __m256i m, int first, int last,       \
                        int sh, int64_t mm) {                                                  \
    switch (r / 8) {                                                                           \
    case 8: PRE##8_8(col, val, k0, k1, xt, ldx, out, bias, first, last, sh, mm); break;        \
    case 7: PRE##8_7(col, val, k0, k1, xt, ldx, out, bias, first, last, sh, mm); break;        \
    case 6: PRE##8_6(col, val, k0, k1, xt, ldx, out, bias, first, last, sh, mm); break;        \
    case 5: PRE##8_5(col, val, k0, k1, xt, ldx, out, bias, first, last, sh, mm); break;        \
    case 4: PRE##8_4(col, val, k0, k1, xt, ldx, out, bias, first, last, sh, mm); break;        \
    case 3: PRE##8_3(col, val, k0, k1, xt, ldx, out, bias, first, last, sh, mm); break;        \
    case 2: PRE##8_2(col, val, k0, k1, xt, ldx, out, bias, first, last, sh, mm); break;        \
    case 1: PRE##8_1(col, val, k0, k1, xt, ldx, out, bias, first, last, sh, mm); break;        \
    default: break;                                                                            \
    }                                                                                          \
    if (r % 8) {                                                                               \
        const int64_t o = r / 8 * 8;                                                           \
        PRE##8_tail(col, val, k0, k1, xt + o, ldx, out + o, bias, m, first, last, sh, mm);     \
    }                                                                                          \
}
CHUNKROW(csr_row8, csr, int32_t)
CHUNKROW(nm_row8, nm, uint8_t)

/* Rows lo..hi of the CSR kernel for B > 1: batch chunks of BC columns, input tiles of `tile`
   features (as the AVX-512 path: partial sums kept in yt between tiles). */
static void csr_avx2(int64_t lo, int64_t hi, int64_t N, int64_t B, const int32_t *restrict crow,
                     const int32_t *restrict col, const float *restrict val, const float *restrict xt,
                     int64_t ldx, const float *restrict bias, float *restrict yt, int64_t ldy,
                     int64_t tile, int64_t BC) {
    int64_t *cur = (int64_t *)malloc(sizeof(int64_t) * (size_t)(hi - lo));
    const int64_t ntile = N > 0 ? (N + tile - 1) / tile : 1;
    for (int64_t b = 0; b < B; b += BC) {
        const int64_t r = B - b < BC ? B - b : BC;
        const __m256i m = lanes8(r % 8);
        for (int64_t i = lo; i < hi; ++i) cur[i - lo] = crow[i];
        for (int64_t t = 0; t < ntile; ++t) {
            const int64_t cend = (t + 1) * tile;
            const int first = t == 0, last = t == ntile - 1;
            for (int64_t i = lo; i < hi; ++i) {
                const int64_t k0 = cur[i - lo], k1 = crow[i + 1];
                int64_t ke = k0;
                if (last) ke = k1;
                else while (ke < k1 && col[ke] < cend) ++ke;
                cur[i - lo] = ke;
                if (ke == k0 && !first && !last) continue;
                csr_row8(r, col, val, k0, ke, xt + b, ldx, yt + i * ldy + b, bias ? bias[i] : 0.0f, m,
                         first, last, 0, 0);
            }
        }
    }
    free(cur);
}

/* Batch-1 sparse dot products: 2 = vector of values times 8 scalar-loaded x (default), 1 = 8-lane
   gathers, 0 = plain scalar. On the AVX2 machine (Zen 2, 768x3072 and 3072x768 layers at 50-95%)
   2 measured ~2x faster than 0 and ~1.5x faster than 1 (its gathers are microcoded). */
#ifndef PRUNEKIT_AVX2_DOT1
#define PRUNEKIT_AVX2_DOT1 2
#endif
#ifndef PRUNEKIT_AVX2_NMWIN
#define PRUNEKIT_AVX2_NMWIN 1
#endif
/* Batch 1 with a unit-stride x: 8-lane gathers, two fixed partial vectors, the last k mod 8
   entries in a scalar sum added at the end. */
static inline float dot1g8(const int32_t *restrict col, const float *restrict val, int64_t k0, int64_t k1,
                           const float *restrict x) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t k = k0;
    for (; k + 16 <= k1; k += 16) {
        const __m256 g0 = _mm256_i32gather_ps(x, _mm256_loadu_si256((const __m256i *)(col + k)), 4);
        const __m256 g1 = _mm256_i32gather_ps(x, _mm256_loadu_si256((const __m256i *)(col + k + 8)), 4);
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k), g0, s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k + 8), g1, s1);
    }
    if (k + 8 <= k1) {
        const __m256 g0 = _mm256_i32gather_ps(x, _mm256_loadu_si256((const __m256i *)(col + k)), 4);
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k), g0, s0);
        k += 8;
    }
    float t = 0.0f;
    for (; k < k1; ++k) t += val[k] * x[col[k]];
    return hsum8(_mm256_add_ps(s0, s1)) + t;
}

/* Batch 1 with a unit-stride x: 8 values per vector load, the 8 x values picked by scalar loads
   into a vector (no gather), two fixed partial vectors (blocks of 8 entries alternate), the last
   k mod 8 entries in a scalar sum added at the end. */
static inline __m256 pick8(const int32_t *restrict c, const float *restrict x) {
    const __m128 lo = _mm_setr_ps(x[c[0]], x[c[1]], x[c[2]], x[c[3]]);
    const __m128 hi = _mm_setr_ps(x[c[4]], x[c[5]], x[c[6]], x[c[7]]);
    return _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
}
static inline float dot1p8(const int32_t *restrict col, const float *restrict val, int64_t k0, int64_t k1,
                           const float *restrict x) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t k = k0;
    for (; k + 16 <= k1; k += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k), pick8(col + k, x), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k + 8), pick8(col + k + 8, x), s1);
    }
    if (k + 8 <= k1) { s0 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k), pick8(col + k, x), s0); k += 8; }
    float t = 0.0f;
    for (; k < k1; ++k) t += val[k] * x[col[k]];
    return hsum8(_mm256_add_ps(s0, s1)) + t;
}

/* ---- Row blocks, B > 1: S rows (S <= 4) x NV vectors (NV <= 3) of accumulators, the NV loaded
   vectors of X^T in registers and one broadcast weight: S*NV + NV + 1 <= 16 registers; a column
   costs NV + S loads for S*NV multiply-adds. MK: one masked vector (NV == 1) for the last 1..7
   columns. ---- */
#define ROWS8(S, NV, MK)                                                                      \
static inline void rw##S##_##NV##_##MK(const int32_t *restrict col, const float *restrict val, \
                                       int64_t vs, int64_t k0, int64_t k1, const float *restrict xt, \
                                       int64_t ldx, float *restrict out, int64_t ldy,           \
                                       const float *restrict bias, __m256i m) {                \
    __m256 a[S][NV];                                                                          \
    _Pragma("GCC unroll 4")                                                                   \
    for (int r = 0; r < S; ++r)                                                               \
        for (int v = 0; v < NV; ++v) a[r][v] = _mm256_setzero_ps();                           \
    for (int64_t k = k0; k < k1; ++k) {                                                       \
        const float *p = xt + (int64_t)col[k] * ldx;                                          \
        __m256 x[NV];                                                                         \
        _Pragma("GCC unroll 4")                                                               \
        for (int v = 0; v < NV; ++v) x[v] = MK ? _mm256_maskload_ps(p, m) : _mm256_loadu_ps(p + 8 * v); \
        const float *w = val + k * vs;                                                        \
        _Pragma("GCC unroll 4")                                                               \
        for (int r = 0; r < S; ++r) {                                                         \
            const __m256 wr = _mm256_broadcast_ss(w + r);                                     \
            for (int v = 0; v < NV; ++v) a[r][v] = _mm256_fmadd_ps(wr, x[v], a[r][v]);        \
        }                                                                                     \
    }                                                                                         \
    _Pragma("GCC unroll 4")                                                                   \
    for (int r = 0; r < S; ++r) {                                                             \
        const __m256 bb = _mm256_set1_ps(bias ? bias[r] : 0.0f);                              \
        for (int v = 0; v < NV; ++v) {                                                        \
            const __m256 t = _mm256_add_ps(a[r][v], bb);                                      \
            if (MK) _mm256_maskstore_ps(out + r * ldy, m, t);                                 \
            else _mm256_storeu_ps(out + r * ldy + 8 * v, t);                                  \
        }                                                                                     \
    }                                                                                         \
}
ROWS8(4, 3, 0) ROWS8(2, 3, 0) ROWS8(1, 3, 0)
ROWS8(4, 2, 0) ROWS8(2, 2, 0) ROWS8(1, 2, 0)
ROWS8(4, 1, 0) ROWS8(2, 1, 0) ROWS8(1, 1, 0)
ROWS8(4, 1, 1) ROWS8(2, 1, 1) ROWS8(1, 1, 1)

#define RW_CALL(S, NV, MK) rw##S##_##NV##_##MK(col, vr, R, k0, k1, x, ldx, o, ldy, br, m)
/* All R rows of one group for the columns of x (nv full vectors, or the masked tail when mk):
   sub-blocks of 4, 2, 1 rows. */
static inline void rows_chunk8(int64_t R, const int32_t *restrict col, const float *restrict val, int64_t k0,
                               int64_t k1, const float *restrict x, int64_t ldx, float *restrict out, int64_t ldy,
                               const float *restrict bias, int nv, int mk, __m256i m) {
    for (int64_t r = 0; r < R;) {
        const int64_t left = R - r;
        const int s = left >= 4 ? 4 : left >= 2 ? 2 : 1;
        const float *vr = val + r;
        float *o = out + r * ldy;
        const float *br = bias ? bias + r : 0;
        if (mk) { if (s == 4) RW_CALL(4, 1, 1); else if (s == 2) RW_CALL(2, 1, 1); else RW_CALL(1, 1, 1); }
        else if (nv == 3) { if (s == 4) RW_CALL(4, 3, 0); else if (s == 2) RW_CALL(2, 3, 0); else RW_CALL(1, 3, 0); }
        else if (nv == 2) { if (s == 4) RW_CALL(4, 2, 0); else if (s == 2) RW_CALL(2, 2, 0); else RW_CALL(1, 2, 0); }
        else { if (s == 4) RW_CALL(4, 1, 0); else if (s == 2) RW_CALL(2, 1, 0); else RW_CALL(1, 1, 0); }
        r += s;
    }
}

/* Groups lo..hi, B > 1: per group (its weights stay in L1), the batch in chunks of 24 columns,
   then 16 or 8, then the masked tail. */
static void rows_avx2(int64_t lo, int64_t hi, int64_t R, int64_t B, const int32_t *restrict gptr,
                      const int32_t *restrict col, const float *restrict val, const float *restrict xt,
                      int64_t ldx, const float *restrict bias, float *restrict yt, int64_t ldy) {
    const __m256i m = lanes8(B % 8);
    for (int64_t g = lo; g < hi; ++g) {
        const int64_t k0 = gptr[g], k1 = gptr[g + 1];
        float *out = yt + g * R * ldy;
        const float *bg = bias ? bias + g * R : 0;
        int64_t b = 0;
        for (; b + 24 <= B; b += 24) rows_chunk8(R, col, val, k0, k1, xt + b, ldx, out + b, ldy, bg, 3, 0, m);
        if (B - b >= 8) {
            const int nv = (int)((B - b) / 8);
            rows_chunk8(R, col, val, k0, k1, xt + b, ldx, out + b, ldy, bg, nv, 0, m);
            b += 8 * nv;
        }
        if (b < B) rows_chunk8(R, col, val, k0, k1, xt + b, ldx, out + b, ldy, bg, 1, 1, m);
    }
}

/* Batch 1: the R rows of a group are R contiguous values per column, so one vector multiply-add
   per column serves 8 rows (four fixed partial vectors, columns k mod 4); a last partial vector of
   rows uses masked loads. */
static inline void rows_vec1_avx2(int64_t R, const int32_t *restrict col, const float *restrict val,
                                  int64_t k0, int64_t k1, const float *restrict x, float *restrict out,
                                  const float *restrict bias) {
    for (int64_t r = 0; r < R; r += 8) {
        const int64_t n = R - r;
        const __m256i m = lanes8(n >= 8 ? 8 : n);
        __m256 s[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
        int64_t k = k0;
        if (n >= 8) {
            for (; k + 4 <= k1; k += 4)
                for (int u = 0; u < 4; ++u)
                    s[u] = _mm256_fmadd_ps(_mm256_loadu_ps(val + (k + u) * R + r), _mm256_broadcast_ss(x + col[k + u]), s[u]);
            for (; k < k1; ++k)
                s[0] = _mm256_fmadd_ps(_mm256_loadu_ps(val + k * R + r), _mm256_broadcast_ss(x + col[k]), s[0]);
        } else {
            for (; k + 4 <= k1; k += 4)
                for (int u = 0; u < 4; ++u)
                    s[u] = _mm256_fmadd_ps(_mm256_maskload_ps(val + (k + u) * R + r, m), _mm256_broadcast_ss(x + col[k + u]), s[u]);
            for (; k < k1; ++k)
                s[0] = _mm256_fmadd_ps(_mm256_maskload_ps(val + k * R + r, m), _mm256_broadcast_ss(x + col[k]), s[0]);
        }
        __m256 t = _mm256_add_ps(_mm256_add_ps(s[0], s[1]), _mm256_add_ps(s[2], s[3]));
        if (bias) t = _mm256_add_ps(t, _mm256_maskload_ps(bias + r, m));
        if (n >= 8) _mm256_storeu_ps(out + r, t);
        else _mm256_maskstore_ps(out + r, m, t);
    }
}

/* ---- N:M ---- */
/* Rows lo..hi for B > 1: the CSR chunk kernels with the column computed from the group offsets. */
static void nm_avx2(int64_t lo, int64_t hi, int64_t B, int64_t K, int sh, int64_t mm, const uint8_t *restrict off,
                    const float *restrict val, const float *restrict xt, int64_t ldx, const float *restrict bias,
                    float *restrict yt, int64_t ldy, int64_t BC) {
    for (int64_t b = 0; b < B; b += BC) {
        const int64_t r = B - b < BC ? B - b : BC;
        const __m256i m = lanes8(r % 8);
        for (int64_t i = lo; i < hi; ++i)
            nm_row8(r, off, val, i * K, i * K + K, xt + b, ldx, yt + i * ldy + b, bias ? bias[i] : 0.0f, m, 1, 1,
                    sh, mm);
    }
}

/* Batch 1 when a window of 16 inputs holds exactly 8 entries (n:m = 1:2, 2:4, 4:8): the entries are
   picked from the window's two loaded vectors by two in-register permutes and a blend instead of
   a gather (lanes whose column is in the second vector take it from there). Entries past the last
   full window are summed in scalar. Two fixed partial vectors (windows alternate). */
/* The x values of the 8 entries at off (window of 16 inputs at x). */
static inline __m256 nm_win8(const uint8_t *restrict off, const float *restrict x, __m256i rel) {
    const __m256i idx = _mm256_add_epi32(rel, _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)off)));
    const __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x), idx);
    const __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(x + 8), idx);
    const __m256 g = _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_cmpgt_epi32(idx, _mm256_set1_epi32(7))));
    return g;
}
static inline float nm_dot1_win8(const uint8_t *restrict off, const float *restrict val, int64_t K, int sh,
                                 int64_t mm, const float *restrict x) {
    const __m256i rel = _mm256_mullo_epi32(_mm256_srli_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), sh),
                                           _mm256_set1_epi32((int)mm));
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t k = 0;
    /* Windows alternate between the two partial vectors (entries k..k+7 start at input 2k). */
    for (; k + 16 <= K; k += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k), nm_win8(off + k, x + 2 * k, rel), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k + 8), nm_win8(off + k + 8, x + 2 * k + 16, rel), s1);
    }
    if (k + 8 <= K) { s0 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k), nm_win8(off + k, x + 2 * k, rel), s0); k += 8; }
    float t = 0.0f;
    for (; k < K; ++k) t += val[k] * x[(k >> sh) * mm + off[k]];
    return hsum8(_mm256_add_ps(s0, s1)) + t;
}

/* Batch 1, any n:m: the columns ((k + j) >> sh) * mm + off[k + j] of 8 entries at a time computed in a
   vector, x picked by scalar loads (or gathers, see PRUNEKIT_AVX2_DOT1). */
static inline float nm_dot1g8(const uint8_t *restrict off, const float *restrict val, int64_t K, int sh,
                              int64_t mm, const float *restrict x) {
    const __m256i iota = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i step = _mm256_set1_epi32((int)((8 >> sh) * mm));
    __m256i base = _mm256_mullo_epi32(_mm256_srli_epi32(iota, sh), _mm256_set1_epi32((int)mm));
    __m256 s0 = _mm256_setzero_ps();
    int64_t k = 0;
    if (sh <= 3) /* 8 >> sh groups per 8 entries: only when n <= 8 */
        for (; k + 8 <= K; k += 8) {
            const __m256i c = _mm256_add_epi32(base, _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(off + k))));
            base = _mm256_add_epi32(base, step);
            if (PRUNEKIT_AVX2_DOT1 == 1) {
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k), _mm256_i32gather_ps(x, c, 4), s0);
            } else {  /* the 8 columns through memory, then scalar loads of x (see PRUNEKIT_AVX2_DOT1) */
                int32_t cs[8];
                _mm256_storeu_si256((__m256i *)cs, c);
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(val + k), pick8(cs, x), s0);
            }
        }
    float t = 0.0f;
    for (; k < K; ++k) t += val[k] * x[(k >> sh) * mm + off[k]];
    return hsum8(s0) + t;
}
#endif

/* yt (M x B, row stride ldy) = W (M x N, CSR) @ xt (N x B, row stride ldx, unit column stride) + bias.
   Rows are split into nthreads contiguous ranges, one per thread. For B > 1 (AVX-512) the batch is
   processed in chunks of BCHUNK columns and the input features in tiles of `tile` rows of xt (so a tile of
   xt stays in L1); a row's partial sums are kept in yt between tiles. The tiling depends only on B and
   N, never on the thread count, so results are identical for any nthreads. */
void prunekit_spmm_t(int64_t M, int64_t N, int64_t B, const int32_t *restrict crow,
                     const int32_t *restrict col, const float *restrict val, const float *restrict xt,
                     int64_t ldx, const float *restrict bias, float *restrict yt, int64_t ldy,
                     int64_t tile, int64_t bchunk, int nthreads) {
    if (nthreads < 1) nthreads = 1;
    const int64_t BC = bchunk >= 64 ? 64 : bchunk >= 48 ? 48 : BCHUNK; (void)BC;
    if (tile < 1) tile = N > 0 ? N : 1;
    #pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        const int nth = omp_get_num_threads(), tid = omp_get_thread_num();
        const int64_t lo = M * tid / nth, hi = M * (tid + 1) / nth;
#ifdef __AVX512F__
        if (B > 1 && hi > lo) {
            int64_t *cur = (int64_t *)malloc(sizeof(int64_t) * (size_t)(hi - lo));
            const int64_t ntile = N > 0 ? (N + tile - 1) / tile : 1;
            for (int64_t b = 0; b < B; b += BC) {
                const int64_t r = B - b < BC ? B - b : BC;
                __mmask16 m[4];
                const int nv = chunk_masks(r, m, 4);
                for (int64_t i = lo; i < hi; ++i) cur[i - lo] = crow[i];
                for (int64_t t = 0; t < ntile; ++t) {
                    const int64_t cend = (t + 1) * tile;
                    const int first = t == 0, last = t == ntile - 1;
                    for (int64_t i = lo; i < hi; ++i) {
                        const int64_t k0 = cur[i - lo], k1 = crow[i + 1];
                        int64_t ke = k0;
                        if (last) ke = k1;
                        else while (ke < k1 && col[ke] < cend) ++ke;
                        cur[i - lo] = ke;
                        if (ke == k0 && !first && !last) continue;
                        const float bi = bias ? bias[i] : 0.0f;
                        float *restrict yr = yt + i * ldy + b;
                        if (nv == 4) chunkv4(col, val, k0, ke, xt + b, ldx, yr, bi, m, first, last, 0, 0);
                        else if (nv == 3) chunkv3(col, val, k0, ke, xt + b, ldx, yr, bi, m, first, last, 0, 0);
                        else if (nv == 2) chunkv2(col, val, k0, ke, xt + b, ldx, yr, bi, m, first, last, 0, 0);
                        else chunkv1(col, val, k0, ke, xt + b, ldx, yr, bi, m, first, last, 0, 0);
                    }
                }
            }
            free(cur);
        } else
#elif defined(PK_AVX2)
        if (B > 1 && hi > lo) csr_avx2(lo, hi, N, B, crow, col, val, xt, ldx, bias, yt, ldy, tile, AVX2_BC);
        else
#endif
        for (int64_t i = lo; i < hi; ++i) {
            const int64_t k0 = crow[i], k1 = crow[i + 1];
            const float bi = bias ? bias[i] : 0.0f;
            float *restrict yr = yt + i * ldy;
#ifdef __AVX512F__
            if (B == 1 && ldx == 1) { yr[0] = dot1g(col, val, k0, k1, xt) + bi; continue; }
#elif defined(PK_AVX2)
            /* Batch 1: see PRUNEKIT_AVX2_DOT1. (A constant unit stride in dot1 was slower than its
               runtime stride: gcc then vectorizes it with gathers.) */
            if (B == 1 && ldx == 1) {
                yr[0] = (PRUNEKIT_AVX2_DOT1 == 1 ? dot1g8(col, val, k0, k1, xt) : PRUNEKIT_AVX2_DOT1 == 2
                         ? dot1p8(col, val, k0, k1, xt) : dot1(col, val, k0, k1, xt, ldx)) + bi;
                continue;
            }
#endif
            for (int64_t b = 0; b < B; ++b) yr[b] = dot1(col, val, k0, k1, xt + b, ldx) + bi;
        }
    }
}

/* ---- Row blocks: groups of R consecutive output rows that share one column list (R x C blocks,
   C >= 1, flattened to columns). Values are stored column by column: val[k * R + r]. One loaded
   vector of X^T serves R rows, so loads per multiply-add drop from ~2 to ~1 + 1/R. ---- */
#ifdef __AVX512F__
/* S rows (S <= 8) of one group, columns b0..b0+16*NV: S*NV accumulators (the S rows give the
   independent chains, so no k mod 4 split). vs: value stride between columns (the group's R). */
#define ROWSV(S, NV)                                                                          \
static inline void rows##S##_##NV(const int32_t *restrict col, const float *restrict val,     \
                                  int64_t vs, int64_t k0, int64_t k1, const float *restrict xt, \
                                  int64_t ldx, float *restrict out, int64_t ldy,               \
                                  const float *restrict bias, const __mmask16 *m) {           \
    __m512 a[S * NV];                                                                        \
    _Pragma("GCC unroll 16")                                                                 \
    for (int i = 0; i < S * NV; ++i) a[i] = _mm512_setzero_ps();                             \
    for (int64_t k = k0; k < k1; ++k) {                                                      \
        const float *p = xt + (int64_t)col[k] * ldx;                                         \
        __m512 x[NV];                                                                        \
        for (int v = 0; v < NV; ++v) x[v] = _mm512_maskz_loadu_ps(m[v], p + 16 * v);         \
        const float *w = val + k * vs;                                                       \
        _Pragma("GCC unroll 8")                                                              \
        for (int r = 0; r < S; ++r) {                                                        \
            const __m512 wr = _mm512_set1_ps(w[r]);                                          \
            for (int v = 0; v < NV; ++v) a[r * NV + v] = _mm512_fmadd_ps(wr, x[v], a[r * NV + v]); \
        }                                                                                    \
    }                                                                                        \
    _Pragma("GCC unroll 8")                                                                  \
    for (int r = 0; r < S; ++r) {                                                            \
        const __m512 bb = _mm512_set1_ps(bias ? bias[r] : 0.0f);                             \
        for (int v = 0; v < NV; ++v)                                                         \
            _mm512_mask_storeu_ps(out + r * ldy + 16 * v, m[v], _mm512_add_ps(a[r * NV + v], bb)); \
    }                                                                                        \
}
ROWSV(8, 2) ROWSV(4, 2) ROWSV(2, 2) ROWSV(1, 2)
ROWSV(8, 1) ROWSV(4, 1) ROWSV(2, 1) ROWSV(1, 1)

/* All R rows of one group for one batch chunk: sub-blocks of 8, 4, 2, 1 rows. */
static inline void rows_chunk(int64_t R, const int32_t *restrict col, const float *restrict val,
                              int64_t k0, int64_t k1, const float *restrict xt, int64_t ldx,
                              float *restrict out, int64_t ldy, const float *restrict bias,
                              const __mmask16 *m, int nv) {
    int64_t r = 0;
    while (r < R) {
        const int64_t left = R - r;
        const int s = left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1;
        const float *vr = val + r;
        float *o = out + r * ldy;
        const float *br = bias ? bias + r : 0;
        if (nv == 2) {
            if (s == 8) rows8_2(col, vr, R, k0, k1, xt, ldx, o, ldy, br, m);
            else if (s == 4) rows4_2(col, vr, R, k0, k1, xt, ldx, o, ldy, br, m);
            else if (s == 2) rows2_2(col, vr, R, k0, k1, xt, ldx, o, ldy, br, m);
            else rows1_2(col, vr, R, k0, k1, xt, ldx, o, ldy, br, m);
        } else {
            if (s == 8) rows8_1(col, vr, R, k0, k1, xt, ldx, o, ldy, br, m);
            else if (s == 4) rows4_1(col, vr, R, k0, k1, xt, ldx, o, ldy, br, m);
            else if (s == 2) rows2_1(col, vr, R, k0, k1, xt, ldx, o, ldy, br, m);
            else rows1_1(col, vr, R, k0, k1, xt, ldx, o, ldy, br, m);
        }
        r += s;
    }
}

/* w (16, 8 or 4) floats with a plain load, or the lanes of m with a masked one (w == 0). */
static inline __m512 load_lanes(const float *p, int w, __mmask16 m) {
    if (w == 16) return _mm512_loadu_ps(p);
    if (w == 8) return _mm512_castps256_ps512(_mm256_loadu_ps(p));
    if (w == 4) return _mm512_castps128_ps512(_mm_loadu_ps(p));
    return _mm512_maskz_loadu_ps(m, p);
}

/* Batch 1: the R rows of a group are R contiguous values per column, so one vector multiply-add
   per column serves up to 16 rows (four fixed partial vectors, columns k mod 4). */
static inline void rows_vec1(int64_t R, const int32_t *restrict col, const float *restrict val,
                             int64_t k0, int64_t k1, const float *restrict x, float *restrict out,
                             const float *restrict bias) {
    for (int64_t r = 0; r < R; r += 16) {
        const int64_t n = R - r;
        const __mmask16 m = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u);
        __m512 s[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
        int64_t k = k0;
        /* Plain loads of exactly the block's width where one exists (masked loads stream from memory
           markedly slower); lanes past it hold other values and are never stored. */
        const int w = n >= 16 ? 16 : n == 8 ? 8 : n == 4 ? 4 : 0;
        for (; k + 4 <= k1; k += 4)
            for (int u = 0; u < 4; ++u)
                s[u] = _mm512_fmadd_ps(load_lanes(val + (k + u) * R + r, w, m), _mm512_set1_ps(x[col[k + u]]), s[u]);
        for (; k < k1; ++k)
            s[0] = _mm512_fmadd_ps(load_lanes(val + k * R + r, w, m), _mm512_set1_ps(x[col[k]]), s[0]);
        __m512 t = _mm512_add_ps(_mm512_add_ps(s[0], s[1]), _mm512_add_ps(s[2], s[3]));
        if (bias) t = _mm512_add_ps(t, _mm512_maskz_loadu_ps(m, bias + r));
        _mm512_mask_storeu_ps(out + r, m, t);
    }
}
#endif

/* yt (G*R x B, row stride ldy) = W @ xt + bias, W given as G row blocks of R rows: block g has the
   columns col[gptr[g]:gptr[g+1]] and values val[k*R + r]. Groups are split into nthreads contiguous
   ranges; each output is computed by one thread in a fixed order (deterministic for any nthreads). */
void prunekit_rows_t(int64_t G, int64_t R, int64_t N, int64_t B, const int32_t *restrict gptr,
                     const int32_t *restrict col, const float *restrict val, const float *restrict xt,
                     int64_t ldx, const float *restrict bias, float *restrict yt, int64_t ldy, int nthreads) {
    (void)N;
    if (nthreads < 1) nthreads = 1;
    #pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        const int nth = omp_get_num_threads(), tid = omp_get_thread_num();
        const int64_t lo = G * tid / nth, hi = G * (tid + 1) / nth;
#ifdef __AVX512F__
        if (B > 1) {
            for (int64_t b = 0; b < B; b += BCHUNK) {
                const int64_t r = B - b < BCHUNK ? B - b : BCHUNK;
                __mmask16 m[2];
                const int nv = chunk_masks(r, m, 2);
                for (int64_t g = lo; g < hi; ++g)
                    rows_chunk(R, col, val, gptr[g], gptr[g + 1], xt + b, ldx, yt + g * R * ldy + b, ldy,
                               bias ? bias + g * R : 0, m, nv);
            }
        } else if (ldx == 1 && ldy == 1) {
            for (int64_t g = lo; g < hi; ++g)
                rows_vec1(R, col, val, gptr[g], gptr[g + 1], xt, yt + g * R, bias ? bias + g * R : 0);
        } else
#elif defined(PK_AVX2)
        if (B > 1) rows_avx2(lo, hi, R, B, gptr, col, val, xt, ldx, bias, yt, ldy);
        else if (ldx == 1 && ldy == 1) {
            for (int64_t g = lo; g < hi; ++g)
                rows_vec1_avx2(R, col, val, gptr[g], gptr[g + 1], xt, yt + g * R, bias ? bias + g * R : 0);
        } else
#endif
        for (int64_t g = lo; g < hi; ++g)
            for (int64_t r = 0; r < R; ++r)
                for (int64_t b = 0; b < B; ++b) {
                    float s = 0.0f;
                    for (int64_t k = gptr[g]; k < gptr[g + 1]; ++k)
                        s += val[k * R + r] * xt[(int64_t)col[k] * ldx + b];
                    yt[(g * R + r) * ldy + b] = s + (bias ? bias[g * R + r] : 0.0f);
                }
    }
}

/* ---- N:M along the input dimension: every row keeps exactly K = N / mm * n entries (n = 2^sh,
   zero-padded where a group keeps fewer), stored row after row: val[i * K + k] and a 1-byte offset
   off[i * K + k] within its group of mm inputs. No row pointers, no 4-byte indices: 5 bytes per kept
   weight instead of CSR's 8, and every row has the same length. ---- */
#ifdef __AVX512F__
/* Batch 1: 16 entries at a time; their columns are ((k + j) >> sh) * mm + off[k + j]. */
/* Batch 1 when m divides 32: the E = 32 / m * n entries of a 32-input window are picked from two
   loaded vectors of x with one in-register permute instead of a 16-load gather. */
static inline float nm_dot1_window(const uint8_t *restrict off, const float *restrict val, int64_t K, int sh,
                                   int64_t mm, const float *restrict x, int64_t N) {
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const int E = (int)(32 / mm) << sh;
    const __m512i rel = _mm512_mullo_epi32(_mm512_srli_epi32(iota, sh), _mm512_set1_epi32((int)mm));
    __m512 s[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    int64_t k = 0, c = 0;
    int u = 0;
    /* Full windows: plain loads (masked loads stream from memory markedly slower here). */
    const __mmask16 full = (__mmask16)((1u << E) - 1u);
    for (; k + 16 <= K && c + 32 <= N; k += E, c += 32, u ^= 1) {
        const __m512 x0 = _mm512_loadu_ps(x + c), x1 = _mm512_loadu_ps(x + c + 16);
        const __m512i idx = _mm512_add_epi32(rel, _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(off + k))));
        const __m512 g = _mm512_permutex2var_ps(x0, idx, x1);
        /* 16 entries are in bounds (k + 16 <= K); with E < 16 the lanes from E on belong to the next
           window and are zeroed in the weights (a register mask: no masked load). */
        const __m512 w = _mm512_loadu_ps(val + k);
        s[u] = _mm512_fmadd_ps(E == 16 ? w : _mm512_maskz_mov_ps(full, w), g, s[u]);
    }
    for (; k < K; k += E, c += 32, u ^= 1) {
        const int64_t left = K - k, xl = N - c;
        const __mmask16 me = left >= E ? (__mmask16)((1u << E) - 1u) : (__mmask16)((1u << left) - 1u);
        const __mmask16 m0 = xl >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << xl) - 1u);
        const __mmask16 m1 = xl >= 32 ? (__mmask16)0xFFFF : xl > 16 ? (__mmask16)((1u << (xl - 16)) - 1u) : 0;
        const __m512 x0 = _mm512_maskz_loadu_ps(m0, x + c), x1 = _mm512_maskz_loadu_ps(m1, x + c + 16);
        const __m512i idx = _mm512_add_epi32(rel, _mm512_maskz_cvtepu8_epi32(me, _mm_maskz_loadu_epi8(me, off + k)));
        const __m512 g = _mm512_permutex2var_ps(x0, idx, x1);
        s[u] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(me, val + k), g, s[u]);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s[0], s[1]));
}

static inline float nm_dot1(const uint8_t *restrict off, const float *restrict val, int64_t K, int sh,
                            int64_t mm, const float *restrict x) {
    /* Column of entry k + j: ((k + j) >> sh) * mm + off[k + j]. The group part advances by
       16 >> sh groups per 16 entries, so it is kept in a vector and bumped, not recomputed. */
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i step = _mm512_set1_epi32((int)((16 >> sh) * mm));
    __m512i base = _mm512_mullo_epi32(_mm512_srli_epi32(iota, sh), _mm512_set1_epi32((int)mm));
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        const __m512i c0 = _mm512_add_epi32(base, _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(off + k))));
        base = _mm512_add_epi32(base, step);
        const __m512i c1 = _mm512_add_epi32(base, _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(off + k + 16))));
        base = _mm512_add_epi32(base, step);
        s0 = _mm512_fmadd_ps(_mm512_loadu_ps(val + k), _mm512_i32gather_ps(c0, x, 4), s0);
        s1 = _mm512_fmadd_ps(_mm512_loadu_ps(val + k + 16), _mm512_i32gather_ps(c1, x, 4), s1);
    }
    for (; k < K; k += 16) {
        const int64_t n = K - k;
        const __mmask16 m = n >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << n) - 1u);
        const __m512i c = _mm512_add_epi32(base, _mm512_maskz_cvtepu8_epi32(m, _mm_maskz_loadu_epi8(m, off + k)));
        base = _mm512_add_epi32(base, step);
        const __m512 g = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, c, x, 4);
        s0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, val + k), g, s0);
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}
#endif

void prunekit_nm_t(int64_t M, int64_t N, int64_t B, int64_t K, int sh, int64_t mm,
                   const uint8_t *restrict off, const float *restrict val, const float *restrict xt, int64_t ldx,
                   const float *restrict bias, float *restrict yt, int64_t ldy, int64_t bchunk, int nthreads) {
    (void)N; (void)bchunk;
    if (nthreads < 1) nthreads = 1;
    #pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
        const int nth = omp_get_num_threads(), tid = omp_get_thread_num();
        const int64_t lo = M * tid / nth, hi = M * (tid + 1) / nth;
#ifdef __AVX512F__
        const int64_t BC = bchunk >= 64 ? 64 : bchunk >= 48 ? 48 : BCHUNK;
        if (B > 1) {
            for (int64_t b = 0; b < B; b += BC) {
                const int64_t r = B - b < BC ? B - b : BC;
                __mmask16 m[4];
                const int nv = chunk_masks(r, m, 4);
                for (int64_t i = lo; i < hi; ++i) {
                    const float bi = bias ? bias[i] : 0.0f;
                    float *restrict yr = yt + i * ldy + b;
                    const int64_t k0 = i * K, k1 = k0 + K;
                    if (nv == 4) nmv4(off, val, k0, k1, xt + b, ldx, yr, bi, m, 1, 1, sh, mm);
                    else if (nv == 3) nmv3(off, val, k0, k1, xt + b, ldx, yr, bi, m, 1, 1, sh, mm);
                    else if (nv == 2) nmv2(off, val, k0, k1, xt + b, ldx, yr, bi, m, 1, 1, sh, mm);
                    else nmv1(off, val, k0, k1, xt + b, ldx, yr, bi, m, 1, 1, sh, mm);
                }
            }
        } else if (ldx == 1 && mm <= 32 && 32 % mm == 0) {
            for (int64_t i = lo; i < hi; ++i)
                yt[i * ldy] = nm_dot1_window(off + i * K, val + i * K, K, sh, mm, xt, N) + (bias ? bias[i] : 0.0f);
        } else if (ldx == 1) {
            for (int64_t i = lo; i < hi; ++i)
                yt[i * ldy] = nm_dot1(off + i * K, val + i * K, K, sh, mm, xt) + (bias ? bias[i] : 0.0f);
        } else
#elif defined(PK_AVX2)
        if (B > 1) nm_avx2(lo, hi, B, K, sh, mm, off, val, xt, ldx, bias, yt, ldy, AVX2_BC);
        else if (PRUNEKIT_AVX2_NMWIN && ldx == 1 && mm <= 8 && mm == ((int64_t)2 << sh)) {
            for (int64_t i = lo; i < hi; ++i)
                yt[i * ldy] = nm_dot1_win8(off + i * K, val + i * K, K, sh, mm, xt) + (bias ? bias[i] : 0.0f);
        } else if (PRUNEKIT_AVX2_DOT1 && ldx == 1) {
            for (int64_t i = lo; i < hi; ++i)
                yt[i * ldy] = nm_dot1g8(off + i * K, val + i * K, K, sh, mm, xt) + (bias ? bias[i] : 0.0f);
        } else
#endif
        for (int64_t i = lo; i < hi; ++i)
            for (int64_t b = 0; b < B; ++b) {
                float s = 0.0f;
                for (int64_t k = 0; k < K; ++k)
                    s += val[i * K + k] * xt[((k >> sh) * mm + off[i * K + k]) * ldx + b];
                yt[i * ldy + b] = s + (bias ? bias[i] : 0.0f);
            }
    }
}

int prunekit_abi_version(void) { return 10; }
const char *prunekit_simd(void) { return PRUNEKIT_SIMD; }

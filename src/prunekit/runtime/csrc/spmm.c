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
    const int64_t BC = bchunk >= 64 ? 64 : bchunk >= 48 ? 48 : BCHUNK;
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
#endif
        for (int64_t i = lo; i < hi; ++i) {
            const int64_t k0 = crow[i], k1 = crow[i + 1];
            const float bi = bias ? bias[i] : 0.0f;
            float *restrict yr = yt + i * ldy;
#ifdef __AVX512F__
            if (B == 1 && ldx == 1) { yr[0] = dot1g(col, val, k0, k1, xt) + bi; continue; }
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

int prunekit_abi_version(void) { return 8; }
const char *prunekit_simd(void) { return PRUNEKIT_SIMD; }

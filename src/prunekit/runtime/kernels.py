"""prunekit's own CPU kernels: sparse weight (CSR or row blocks) times dense activations, fp32.

Computes ``Y^T = W @ X^T + b[:, None]`` with ``W`` (out x in) in CSR with int32
indices and ``X^T`` (in x B) stored so that the ``B`` batch values of each input
feature are contiguous. For each output row ``i`` the kernel accumulates
``sum_k w_ik * X^T[j_k, :]`` into accumulators for up to 64 batch columns held
in registers (four AVX-512 vectors, four sets for nonzeros k mod 4), so every
loaded weight is reused across them (larger batches are done in chunks of
:data:`BATCH_CHUNK`). Batch 1 is a sparse matrix-vector product with 16-lane
AVX-512 gathers.

N:M (:func:`nm_pack`, for ``NM(n, m)`` along the inputs): every row has the same
number of entries, each a value and a 1-byte offset inside its group of ``m``; at
batch 1, when ``m`` divides 32, the entries of a 32-input window are picked from
two loaded vectors of the input by one in-register permute instead of a gather.

Row blocks (:func:`row_blocks`, for ``(r, c)`` block sparsity with ``r > 1``):
groups of ``r`` consecutive output rows share one column list, and the kernel
keeps the accumulators of up to 8 rows at once, so every loaded activation
vector serves all of them (batch > 1); at batch 1 one vector multiply-add
serves up to 16 rows. Without AVX-512 the kernel
falls back to plain C (scalar dot products; slow for large batches, where
:func:`~prunekit.runtime.accelerate`'s timing then prefers another format). Output rows
are split across OpenMP threads (static schedule) and each row is computed by
exactly one thread in a fixed order, so results do not depend on the thread
count. Accumulation is fp32 (the compiler may contract ``a*b+c`` to FMA; the
order of the sum is fixed: nonzeros of a row in column order, bias added last).

The C source below is compiled at first use with the system C compiler
(``$CC`` or ``gcc``/``cc``; ``-O3 -march=native -fopenmp``) into a cache
directory (``$PRUNEKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/prunekit``, else
``~/.cache/prunekit``) keyed by a hash of the source, flags, compiler and CPU;
it is written to a temporary file and renamed into place, so concurrent first
uses are safe. Set ``PRUNEKIT_KERNEL=0`` to disable it. :func:`available`
reports whether it built, loaded and passed a self-test, and why not.

The OpenMP runtime is ``libgomp.so.1``; torch's CPU wheels ship the same soname
and load it first, so the kernel shares torch's thread pool rather than
starting a second one.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

__all__ = ["available", "spmm_t", "spmm", "spmm_rows", "row_blocks", "spmm_nm", "nm_pack"]

_SOURCE = r"""
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
"""

_FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fPIC", "-shared", "-std=c11",
          "-fno-fast-math"]
_ABI = 8
_lock = threading.Lock()
_state: tuple[bool, str, object] | None = None
# Below this many multiply-adds a call runs on one thread (thread start-up would dominate).
PARALLEL_MIN_WORK = 16384
# Bytes of X^T (input-feature tile x up to 32 batch columns) per tile; 0 = no tiling. Tiling keeps a
# tile of X^T in L1 but re-reads/writes the partial sums per tile; on the 2-core AVX-512 machine of
# bench/runtime.py it was slower for 768x3072 layers at batch 64 (8/16/24 KiB tiles: 0.43-0.98 ms vs
# 0.23 ms untiled at 90%), so it is off by default.
TILE_BYTES = int(os.environ.get("PRUNEKIT_KERNEL_TILE_BYTES", "0"))
# Batch columns per pass over the weights (32, 48 or 64). 64 (four vectors per nonzero, one index and one
# weight load per 64 multiply-adds) measured ~10% faster than 32 on 768x3072 and 3072x768 layers at 90%,
# batch 64, on the 2-core AVX-512 machine of bench/runtime.py.
BATCH_CHUNK = int(os.environ.get("PRUNEKIT_KERNEL_BATCH_CHUNK", "64"))


def _cache_dir() -> Path:
    if os.environ.get("PRUNEKIT_CACHE_DIR"):
        return Path(os.environ["PRUNEKIT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "prunekit"


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "gcc", "cc"):
        if cc and shutil.which(cc):
            return shutil.which(cc)
    return None


def _cpu_id() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build() -> Path:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found ($CC, gcc or cc)")
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RuntimeError(f"C compiler {cc} does not run: {exc}") from exc
    key = hashlib.sha256("\0".join([_SOURCE, *_FLAGS, cc, version, _cpu_id(), platform.machine()]).encode()
                         ).hexdigest()[:16]
    cache = _cache_dir()
    lib = cache / f"prunekit_spmm_{key}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".build-") as tmp:
        src = Path(tmp) / "spmm.c"
        src.write_text(_SOURCE)
        out = Path(tmp) / "spmm.so"
        try:
            proc = subprocess.run([cc, *_FLAGS, str(src), "-o", str(out)], capture_output=True, text=True,
                                  timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise RuntimeError(f"compiling the kernel failed: {exc}") from exc
        if proc.returncode != 0:
            msg = (proc.stderr or proc.stdout).strip().splitlines()
            raise RuntimeError(f"compiling the kernel failed: {msg[0] if msg else proc.returncode}")
        os.replace(out, lib)  # atomic: a concurrent builder's identical file is simply replaced
    return lib


def _load() -> object:
    lib = ctypes.CDLL(str(_build()))
    if lib.prunekit_abi_version() != _ABI:
        raise RuntimeError("stale kernel library in the cache")
    fn = lib.prunekit_spmm_t
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [i64, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, ptr, i64, i64, i64, ctypes.c_int]
    fn.restype = None
    fn._lib = lib  # keep the library alive with the function
    rows = lib.prunekit_rows_t
    rows.argtypes = [i64, i64, i64, i64, ptr, ptr, ptr, ptr, i64, ptr, ptr, i64, ctypes.c_int]
    rows.restype = None
    fn._rows = rows
    nm = lib.prunekit_nm_t
    nm.argtypes = [i64, i64, i64, i64, ctypes.c_int, i64, ptr, ptr, ptr, i64, ptr, ptr, i64, i64, ctypes.c_int]
    nm.restype = None
    fn._nm = nm
    return fn


def _self_test(fn: object) -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(37, 29, generator=g) * (torch.rand(37, 29, generator=g) > 0.7)
    w[3] = 0
    b = torch.randn(37, generator=g)
    for batch in (1, 5, 64, 75):
        x = torch.randn(batch, 29, generator=g)
        y = _call(fn, *_csr32(w), b, x.t().contiguous(), 2).t()
        ref = (x.double() @ w.double().t() + b.double()).float()
        if not torch.allclose(y, ref, rtol=1e-5, atol=1e-5):
            raise RuntimeError(f"self-test failed at batch {batch}")
        for r in (1, 4, 12, 36):
            y = _call_rows(fn._rows, *row_blocks(w[:36], r), r, b[:36], x.t().contiguous(), 2).t()
            if not torch.allclose(y, ref[:, :36], rtol=1e-5, atol=1e-5):
                raise RuntimeError(f"row-block self-test failed at batch {batch}, {r} rows per block")
        wnm = w[:, :28] * _nm_mask(w[:, :28], 2, 4)
        y = _call_nm(fn._nm, *nm_pack(wnm, 2, 4), 2, 4, b, x[:, :28].t().contiguous(), 2).t()
        if not torch.allclose(y, (x[:, :28].double() @ wnm.double().t() + b.double()).float(), rtol=1e-5, atol=1e-5):
            raise RuntimeError(f"N:M self-test failed at batch {batch}")


def _csr32(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = w.to_sparse_csr()
    return (m.crow_indices().to(torch.int32).contiguous(), m.col_indices().to(torch.int32).contiguous(),
            m.values().contiguous())


def row_blocks(w: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w`` (out x in) as row blocks of ``rows`` consecutive output rows sharing one column list.

    Returns ``(gptr, col, values)``: block ``g`` keeps the columns ``col[gptr[g]:gptr[g+1]]`` where
    any of its rows is nonzero, and ``values`` is ``(len(col), rows)``: the block's column of
    ``rows`` weights for each kept column (zeros included where only some rows are nonzero).
    ``rows`` must divide ``out``.

    Example:
        >>> w = torch.tensor([[1.0, 0.0, 2.0], [3.0, 0.0, 0.0]])
        >>> gptr, col, val = row_blocks(w, 2)
        >>> gptr.tolist(), col.tolist(), val.tolist()
        ([0, 2], [0, 2], [[1.0, 3.0], [2.0, 0.0]])
    """
    out_f, in_f = w.shape
    if rows < 1 or out_f % rows:
        raise ValueError(f"row_blocks: rows={rows} must be a positive divisor of the {out_f} output rows")
    grouped = w.detach().reshape(out_f // rows, rows, in_f).transpose(1, 2)  # (G, in, rows)
    alive = (grouped != 0).any(dim=2)
    counts = alive.sum(dim=1)
    gptr = torch.zeros(out_f // rows + 1, dtype=torch.int32)
    gptr[1:] = counts.cumsum(0).to(torch.int32)
    col = torch.nonzero(alive)[:, 1].to(torch.int32).contiguous()
    return gptr, col, grouped[alive].to(torch.float32).contiguous()


def _call_rows(fn, gptr, col, values, rows, bias, xt, nthreads) -> torch.Tensor:
    groups = gptr.numel() - 1
    n_in, batch = xt.shape
    yt = torch.empty(groups * rows, batch, dtype=torch.float32)
    if groups == 0 or batch == 0:
        return yt
    threads = nthreads if values.numel() * batch >= PARALLEL_MIN_WORK else 1
    fn(groups, rows, n_in, batch, gptr.data_ptr(), col.data_ptr(), values.data_ptr(), xt.data_ptr(),
       xt.stride(0) if n_in else batch, 0 if bias is None else bias.data_ptr(), yt.data_ptr(), batch, threads)
    return yt


def rows_linear_unchecked(gptr: torch.Tensor, col: torch.Tensor, values: torch.Tensor, rows: int,
                          bias: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W`` as :func:`row_blocks`, without argument checks (for
    :class:`~prunekit.runtime.SparseLinear`, which checked dtypes, devices and availability)."""
    xt = x.t()
    if xt.stride(1) != 1 and xt.shape[1] > 1 or xt.shape[1] == 1 and xt.stride(0) != 1:
        xt = xt.contiguous()
    return _call_rows(_state[2]._rows, gptr, col, values, rows, bias, xt, torch.get_num_threads()).t()


def spmm_rows(gptr: torch.Tensor, col: torch.Tensor, values: torch.Tensor, rows: int, bias: torch.Tensor | None,
              x: torch.Tensor, num_threads: int | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for ``W`` given as row blocks (:func:`row_blocks`); ``x`` is ``(B, in)`` float32.

    Each loaded activation serves ``rows`` output rows, which is what makes ``(r, c)`` block
    sparsity with ``r > 1`` faster than unstructured sparsity at the same density. Results are
    identical for every thread count. Raises ``RuntimeError`` if the kernel is not available.

    Example:
        >>> w = torch.randn(8, 6) * (torch.rand(8, 1) > 0.5)
        >>> y = spmm_rows(*row_blocks(w, 4), 4, None, torch.randn(3, 6))  # doctest: +SKIP
    """
    ok, why, fn = _get()
    if not ok:
        raise RuntimeError(f"prunekit kernel unavailable: {why}")
    if values.dim() != 2 or values.shape[1] != rows or values.shape[0] != col.numel():
        raise ValueError(f"spmm_rows: values must have shape ({col.numel()}, {rows}), got {tuple(values.shape)}")
    for name, t, dt in (("gptr", gptr, torch.int32), ("col", col, torch.int32), ("values", values, torch.float32),
                        ("x", x, torch.float32)) + ((("bias", bias, torch.float32),) if bias is not None else ()):
        if t.dtype != dt or t.device.type != "cpu" or (name != "x" and not t.is_contiguous()):
            raise TypeError(f"spmm_rows: {name} must be a contiguous {dt} CPU tensor, got {t.dtype} on {t.device}")
    if x.dim() != 2:
        raise ValueError(f"spmm_rows: x must be 2-D, got shape {tuple(x.shape)}")
    if bias is not None and bias.numel() != (gptr.numel() - 1) * rows:
        raise ValueError("spmm_rows: bias must have one value per output row")
    xt = x.t().contiguous()
    return _call_rows(fn._rows, gptr, col, values, rows, bias, xt, num_threads or torch.get_num_threads()).t()


def _nm_mask(w: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` largest |w| of every ``m`` consecutive inputs (for the self-test)."""
    groups = w.abs().reshape(w.shape[0], -1, m)
    idx = groups.topk(n, dim=2).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(2, idx, True).reshape(w.shape)


def nm_pack(w: torch.Tensor, n: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (out x in) with at most ``n`` nonzeros in every ``m`` consecutive inputs, packed for the N:M kernel.

    Returns ``(offsets, values)``, both ``(out, in // m * n)``: for every group
    of ``m`` inputs its ``n`` entries in column order, with their offsets
    (uint8) inside the group; a group with fewer than ``n`` nonzeros is padded
    with zeros at unused offsets. ``n`` must be a power of two dividing 16,
    ``m`` at most 256, and ``m`` must divide ``in``.

    Raises:
        ValueError: the pattern or the sizes do not allow it (the message says which).

    Example:
        >>> off, val = nm_pack(torch.tensor([[0.0, 5.0, 0.0, 7.0, 1.0, 0.0, 0.0, 0.0]]), 2, 4)
        >>> off.tolist(), val.tolist()
        ([[1, 3, 0, 1]], [[5.0, 7.0, 1.0, 0.0]])
    """
    out_f, in_f = w.shape
    if n < 1 or n > 16 or 16 % n or not 1 <= n < m <= 256 or in_f % m:
        raise ValueError(f"nm_pack: {n}:{m} needs n a power of two dividing 16, n < m <= 256 and m dividing "
                         f"in_features={in_f}")
    groups = w.detach().reshape(out_f, in_f // m, m)
    nonzero = groups != 0
    if nonzero.numel() and int(nonzero.sum(dim=2).max()) > n:
        raise ValueError(f"nm_pack: some group of {m} inputs has more than {n} nonzeros")
    # Stable sort puts nonzeros first in column order, then the unused offsets (padding, value 0).
    order = torch.sort((~nonzero).to(torch.uint8), dim=2, stable=True).indices[..., :n]
    order = order.sort(dim=2).values  # column order within the group: the CSR summation order
    values = torch.gather(groups, 2, order).to(torch.float32)
    return order.to(torch.uint8).reshape(out_f, -1).contiguous(), values.reshape(out_f, -1).contiguous()


def _call_nm(fn, offsets, values, n, m, bias, xt, nthreads) -> torch.Tensor:
    out_f, per_row = values.shape
    n_in, batch = xt.shape
    yt = torch.empty(out_f, batch, dtype=torch.float32)
    if out_f == 0 or batch == 0:
        return yt
    threads = nthreads if values.numel() * batch >= PARALLEL_MIN_WORK else 1
    fn(out_f, n_in, batch, per_row, n.bit_length() - 1, m, offsets.data_ptr(), values.data_ptr(), xt.data_ptr(),
       xt.stride(0) if n_in else batch, 0 if bias is None else bias.data_ptr(), yt.data_ptr(), batch, BATCH_CHUNK,
       threads)
    return yt


def nm_linear_unchecked(offsets: torch.Tensor, values: torch.Tensor, n: int, m: int, bias: torch.Tensor | None,
                        x: torch.Tensor) -> torch.Tensor:
    """``x @ W.T + bias`` with ``W`` as :func:`nm_pack`, without argument checks (for
    :class:`~prunekit.runtime.SparseLinear`, which checked dtypes, devices and availability)."""
    xt = x.t()
    if xt.stride(1) != 1 and xt.shape[1] > 1 or xt.shape[1] == 1 and xt.stride(0) != 1:
        xt = xt.contiguous()
    return _call_nm(_state[2]._nm, offsets, values, n, m, bias, xt, torch.get_num_threads()).t()


def spmm_nm(offsets: torch.Tensor, values: torch.Tensor, n: int, m: int, bias: torch.Tensor | None,
            x: torch.Tensor, num_threads: int | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for an N:M weight packed by :func:`nm_pack`; ``x`` is ``(B, in)`` float32.

    Every row has the same number of entries and each costs 5 bytes (value and
    a 1-byte offset) instead of CSR's 8. Results are identical for every thread
    count. Raises ``RuntimeError`` if the kernel is not available.

    Example:
        >>> w = torch.tensor([[0.0, 5.0, 0.0, 7.0]])
        >>> spmm_nm(*nm_pack(w, 2, 4), 2, 4, None, torch.ones(1, 4))  # doctest: +SKIP
        tensor([[12.]])
    """
    ok, why, fn = _get()
    if not ok:
        raise RuntimeError(f"prunekit kernel unavailable: {why}")
    for name, t, dt in (("offsets", offsets, torch.uint8), ("values", values, torch.float32), ("x", x, torch.float32)
                        ) + ((("bias", bias, torch.float32),) if bias is not None else ()):
        if t.dtype != dt or t.device.type != "cpu" or (name != "x" and not t.is_contiguous()):
            raise TypeError(f"spmm_nm: {name} must be a contiguous {dt} CPU tensor, got {t.dtype} on {t.device}")
    if x.dim() != 2 or values.dim() != 2 or offsets.shape != values.shape:
        raise ValueError("spmm_nm: x must be 2-D and offsets/values of one (out, in // m * n) shape")
    if n < 1 or n > 16 or 16 % n or not n < m <= 256 or x.shape[1] % m or values.shape[1] != x.shape[1] // m * n:
        raise ValueError(f"spmm_nm: {n}:{m} does not fit values {tuple(values.shape)} and inputs {tuple(x.shape)}")
    if bias is not None and bias.numel() != values.shape[0]:
        raise ValueError("spmm_nm: bias must have one value per output row")
    xt = x.t().contiguous()
    return _call_nm(fn._nm, offsets, values, n, m, bias, xt, num_threads or torch.get_num_threads()).t()


def _get() -> tuple[bool, str, object]:
    global _state
    if _state is None:
        with _lock:
            if _state is None:
                if os.environ.get("PRUNEKIT_KERNEL", "1") == "0":
                    _state = (False, "disabled by PRUNEKIT_KERNEL=0", None)
                else:
                    try:
                        fn = _load()
                        _self_test(fn)
                        fn._lib.prunekit_simd.restype = ctypes.c_char_p
                        simd = fn._lib.prunekit_simd().decode()
                        _state = (True, f"{simd} kernel built with {_compiler()} ({' '.join(_FLAGS[:2])})", fn)
                    except Exception as exc:  # any failure means: not available, with the reason
                        _state = (False, f"{type(exc).__name__}: {str(exc)[:200]}", None)
    return _state


def available() -> tuple[bool, str]:
    """``(True, how it was built)`` if the kernel is usable here, else ``(False, why not)``.

    The first call compiles (or loads from the cache) and self-tests the kernel; the result is cached.
    """
    ok, why, _ = _get()
    return ok, why


def _call(fn, crow, col, values, bias, xt, nthreads) -> torch.Tensor:
    m = crow.numel() - 1
    n_in, batch = xt.shape
    yt = torch.empty(m, batch, dtype=torch.float32)
    if m == 0 or batch == 0:
        return yt
    nnz = col.numel()
    threads = nthreads if nnz * batch >= PARALLEL_MIN_WORK else 1
    tile = max(16, TILE_BYTES // (4 * min(batch, 32))) if TILE_BYTES > 0 else 0
    fn(m, n_in, batch, crow.data_ptr(), col.data_ptr(), values.data_ptr(), xt.data_ptr(),
       xt.stride(0) if n_in else batch, 0 if bias is None else bias.data_ptr(), yt.data_ptr(), batch, tile,
       BATCH_CHUNK, threads)
    return yt


def spmm_t(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None,
           xt: torch.Tensor, num_threads: int | None = None) -> torch.Tensor:
    """``W @ xt + bias[:, None]`` as a new contiguous ``(out, B)`` float32 tensor.

    ``W`` is CSR (``crow`` int32 of length ``out + 1``, ``col`` int32, ``values``
    float32, all contiguous CPU tensors); ``xt`` is ``(in, B)`` float32 on the CPU
    (copied to a unit column stride if needed). ``num_threads`` defaults to
    ``torch.get_num_threads()``; results are identical for every thread count.
    Raises ``RuntimeError`` if the kernel is not available.
    """
    ok, why, fn = _get()
    if not ok:
        raise RuntimeError(f"prunekit kernel unavailable: {why}")
    for name, t, dt in (("crow", crow, torch.int32), ("col", col, torch.int32), ("values", values, torch.float32),
                        ("xt", xt, torch.float32)) + ((("bias", bias, torch.float32),) if bias is not None else ()):
        if t.dtype != dt or t.device.type != "cpu":
            raise TypeError(f"spmm_t: {name} must be a {dt} CPU tensor, got {t.dtype} on {t.device}")
    if xt.dim() != 2:
        raise ValueError(f"spmm_t: xt must be 2-D, got shape {tuple(xt.shape)}")
    if not (crow.is_contiguous() and col.is_contiguous() and values.is_contiguous()):
        raise ValueError("spmm_t: crow, col and values must be contiguous")
    if bias is not None and (not bias.is_contiguous() or bias.numel() != crow.numel() - 1):
        raise ValueError("spmm_t: bias must be contiguous with one value per output row")
    if xt.shape[1] > 1 and xt.stride(1) != 1 or xt.shape[1] == 1 and xt.shape[0] > 1 and xt.stride(0) < 1:
        xt = xt.contiguous()
    return _call(fn, crow, col, values, bias, xt, num_threads or torch.get_num_threads())


def linear_unchecked(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None,
                     x: torch.Tensor) -> torch.Tensor:
    """:func:`spmm` without argument checks, for :class:`~prunekit.runtime.SparseLinear` (which checked
    dtypes, devices and availability); ``x`` is ``(B, in)`` float32."""
    xt = x.t()
    if xt.stride(1) != 1 and xt.shape[1] > 1:
        xt = xt.contiguous()
    return _call(_state[2], crow, col, values, bias, xt, torch.get_num_threads()).t()


def spmm(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, bias: torch.Tensor | None,
         x: torch.Tensor, num_threads: int | None = None) -> torch.Tensor:
    """``x @ W.T + bias`` for ``x`` of shape ``(B, in)``; returns a ``(B, out)`` view of the kernel's ``Y^T``."""
    return spmm_t(crow, col, values, bias, x.t(), num_threads).t()

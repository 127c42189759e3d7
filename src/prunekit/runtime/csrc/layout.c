/* Row-major entry points of the fp32 kernels: Y (B x M, row stride ldy) = X (B x N, row stride ldx) W^T + b.

   The kernels of spmm.c read X^T and write Y^T with the batch contiguous, which suits a chain of
   sparse layers but not the rest of a model: layer norms, attention and residual adds want row-major
   tensors, and handing them transposed views made torch copy (and attention fall back to its slow
   path). Here each block of RM_BLOCK rows of X is transposed into a scratch X^T that stays in cache,
   multiplied by the transposed kernel, and its Y^T transposed back into Y.

   Blocks start at multiples of RM_BLOCK, a multiple of every build's batch chunk (64 on AVX2 and in
   plain C, 32/48/64 on AVX-512), and the input-feature tile is the caller's: every output is summed in
   the same order as by the transposed entry point on the whole batch, so the results are bit-identical
   to it, for any thread count. Batch 1 needs no transpose (a row is a column). */
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>
#include "transpose.h"

/* Rows of X per block: 64 (one AVX2 batch chunk: X^T and Y^T blocks stay in L2), 192 on AVX-512 (a
   multiple of its 32/48/64 chunks). */
#ifdef __AVX512F__
#define RM_BLOCK 192
#else
#define RM_BLOCK 64
#endif

void prunekit_spmm_t(int64_t M, int64_t N, int64_t B, const int32_t *crow, const int32_t *col, const float *val,
                     const float *xt, int64_t ldx, const float *bias, float *yt, int64_t ldy, int64_t tile,
                     int64_t bchunk, int nthreads);
void prunekit_rows_t(int64_t G, int64_t R, int64_t N, int64_t B, const int32_t *gptr, const int32_t *col,
                     const float *val, const float *xt, int64_t ldx, const float *bias, float *yt, int64_t ldy,
                     int nthreads);
void prunekit_nm_t(int64_t M, int64_t N, int64_t B, int64_t K, int sh, int64_t mm, const uint8_t *off,
                   const float *val, const float *xt, int64_t ldx, const float *bias, float *yt, int64_t ldy,
                   int64_t bchunk, int nthreads);

/* Which kernel a block runs, with its weight arguments. */
typedef struct {
    int kind; /* 0 CSR, 1 row blocks, 2 N:M */
    int64_t M, N, R, K, tile, bchunk, mm;
    int sh;
    const int32_t *ptr, *col;
    const uint8_t *off;
    const float *val, *bias;
} rm_weight;

static void rm_block(const rm_weight *w, int64_t r, const float *xt, float *yt, int nthreads) {
    if (w->kind == 0)
        prunekit_spmm_t(w->M, w->N, r, w->ptr, w->col, w->val, xt, r, w->bias, yt, r, w->tile, w->bchunk, nthreads);
    else if (w->kind == 1)
        prunekit_rows_t(w->M / w->R, w->R, w->N, r, w->ptr, w->col, w->val, xt, r, w->bias, yt, r, nthreads);
    else
        prunekit_nm_t(w->M, w->N, r, w->K, w->sh, w->mm, w->off, w->val, xt, r, w->bias, yt, r, w->bchunk, nthreads);
}

/* The rows lo .. hi of w (for row blocks: whole groups) as a weight of their own: index arrays keep
   absolute offsets, so only the row pointers, offsets, values and bias move. */
static rm_weight rm_rows(const rm_weight *w, int64_t lo, int64_t hi) {
    rm_weight s = *w;
    s.M = hi - lo;
    if (w->kind == 2) {
        s.off = w->off + lo * w->K;
        s.val = w->val + lo * w->K;
    } else {
        s.ptr = w->ptr + lo / w->R;
    }
    s.bias = w->bias ? w->bias + lo : 0;
    return s;
}

/* A thread's scratch, kept between calls: a fresh block of this size per call is a fresh mmap whose page
   faults cost more than the transposes (measured: +25% on BERT-FFN-4 at batch 64). OpenMP threads persist,
   so each holds at most (in + out) x (RM_BLOCK + 1) floats of the largest layer it ran. */
static _Thread_local float *scratch_buf;
static _Thread_local size_t scratch_cap;

static float *scratch(size_t floats) {
    if (floats > scratch_cap) {
        free(scratch_buf);
        /* 64-byte aligned: the kernels load whole rows of X^T; a row split across cache lines costs two loads. */
        scratch_buf = (float *)aligned_alloc(64, sizeof(float) * ((floats + 15) / 16 * 16));
        scratch_cap = scratch_buf ? floats : 0;
    }
    return scratch_buf;
}

/* One thread's share: output rows lo .. hi for every block of X, with its own scratch, so the threads
   never wait for each other (each transposes the X block itself: N x 64 values, against the block's
   nnz x 64 multiply-adds). Returns 0, or 1 if the scratch could not be allocated. */
static int rm_part(const rm_weight *w, int64_t lo, int64_t hi, int64_t B, const float *x, int64_t ldx, float *y,
                   int64_t ldy) {
    const int64_t blk = B < RM_BLOCK ? B : RM_BLOCK;
    const rm_weight part = rm_rows(w, lo, hi);
    /* A last block of one row would take the kernels' batch-1 path, which sums in another order than
       their chunk of one column: it joins the block before it (hence room for blk + 1 rows). */
    const size_t nx = (size_t)(w->N * (blk + 1) + 15) / 16 * 16, ny = (size_t)(part.M * (blk + 1) + 16);
    float *xt = scratch(nx + ny), *yt = xt ? xt + nx : 0;
    const int failed = !xt;
    for (int64_t b0 = 0, r; b0 < B && !failed; b0 += r) {
        r = B - b0 < blk ? B - b0 : blk;
        if (B - b0 - r == 1) r += 1;
        pk_transpose_cols(x + b0 * ldx, r, 0, w->N, ldx, xt, r);
        rm_block(&part, r, xt, yt, 1);
        pk_transpose_cols(yt, part.M, 0, r, r, y + b0 * ldy + lo, ldy);
    }
    return failed;
}

static int rm_run(const rm_weight *w, int64_t B, const float *x, int64_t ldx, float *y, int64_t ldy, int nthreads) {
    if (B == 1) {
        rm_block(w, 1, x, y, nthreads);
        return 0;
    }
    const int64_t units = w->M / w->R; /* rows, or groups of R rows */
    if (nthreads > units) nthreads = units > 0 ? (int)units : 1;
    if (nthreads <= 1) return rm_part(w, 0, w->M, B, x, ldx, y, ldy);
    int failed = 0;
    #pragma omp parallel num_threads(nthreads) reduction(| : failed)
    {
        const int nth = omp_get_num_threads(), tid = omp_get_thread_num();
        const int64_t lo = units * tid / nth * w->R, hi = units * (tid + 1) / nth * w->R;
        if (hi > lo) failed |= rm_part(w, lo, hi, B, x, ldx, y, ldy);
    }
    return failed;
}

int prunekit_spmm_rm(int64_t M, int64_t N, int64_t B, const int32_t *crow, const int32_t *col, const float *val,
                     const float *x, int64_t ldx, const float *bias, float *y, int64_t ldy, int64_t tile,
                     int64_t bchunk, int nthreads) {
    const rm_weight w = {0, M, N, 1, 0, tile, bchunk, 0, 0, crow, col, 0, val, bias};
    return rm_run(&w, B, x, ldx, y, ldy, nthreads);
}

int prunekit_rows_rm(int64_t G, int64_t R, int64_t N, int64_t B, const int32_t *gptr, const int32_t *col,
                     const float *val, const float *x, int64_t ldx, const float *bias, float *y, int64_t ldy,
                     int nthreads) {
    const rm_weight w = {1, G * R, N, R, 0, 0, 0, 0, 0, gptr, col, 0, val, bias};
    return rm_run(&w, B, x, ldx, y, ldy, nthreads);
}

int prunekit_nm_rm(int64_t M, int64_t N, int64_t B, int64_t K, int sh, int64_t mm, const uint8_t *off,
                   const float *val, const float *x, int64_t ldx, const float *bias, float *y, int64_t ldy,
                   int64_t bchunk, int nthreads) {
    const rm_weight w = {2, M, N, 1, K, 0, bchunk, mm, sh, 0, 0, off, val, bias};
    return rm_run(&w, B, x, ldx, y, ldy, nthreads);
}

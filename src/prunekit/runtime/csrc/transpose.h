/* Cache-sized fp32 transposes for the row-major entry points of the kernels (spmm.c, spmm_int8.c).

   The kernels compute Y^T = W X^T with the batch contiguous; the rest of a model (layer norms,
   attention, residual adds) works on row-major (batch, features) tensors. These helpers move one block
   between the two layouts while it is still in cache, so a row-major caller pays a pass over L1/L2
   data instead of two transposes through memory. A transpose only moves values: results are the same
   bits in either layout. */
#ifndef PRUNEKIT_TRANSPOSE_H
#define PRUNEKIT_TRANSPOSE_H
#include <stdint.h>
#if defined(__AVX2__)
#include <immintrin.h>
#endif

#if defined(__AVX2__)
/* One 8 x 8 block: dst[c * ldd + r] = src[r * lds + c], r, c < 8. */
static inline void pk_transpose8(const float *restrict src, int64_t lds, float *restrict dst, int64_t ldd) {
    __m256 r0 = _mm256_loadu_ps(src), r1 = _mm256_loadu_ps(src + lds), r2 = _mm256_loadu_ps(src + 2 * lds),
           r3 = _mm256_loadu_ps(src + 3 * lds), r4 = _mm256_loadu_ps(src + 4 * lds),
           r5 = _mm256_loadu_ps(src + 5 * lds), r6 = _mm256_loadu_ps(src + 6 * lds),
           r7 = _mm256_loadu_ps(src + 7 * lds);
    const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1), t2 = _mm256_unpacklo_ps(r2, r3),
                 t3 = _mm256_unpackhi_ps(r2, r3), t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5),
                 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
    const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE),
                 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE),
                 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE),
                 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r0 = _mm256_permute2f128_ps(s0, s4, 0x20); r1 = _mm256_permute2f128_ps(s1, s5, 0x20);
    r2 = _mm256_permute2f128_ps(s2, s6, 0x20); r3 = _mm256_permute2f128_ps(s3, s7, 0x20);
    r4 = _mm256_permute2f128_ps(s0, s4, 0x31); r5 = _mm256_permute2f128_ps(s1, s5, 0x31);
    r6 = _mm256_permute2f128_ps(s2, s6, 0x31); r7 = _mm256_permute2f128_ps(s3, s7, 0x31);
    _mm256_storeu_ps(dst, r0); _mm256_storeu_ps(dst + ldd, r1); _mm256_storeu_ps(dst + 2 * ldd, r2);
    _mm256_storeu_ps(dst + 3 * ldd, r3); _mm256_storeu_ps(dst + 4 * ldd, r4); _mm256_storeu_ps(dst + 5 * ldd, r5);
    _mm256_storeu_ps(dst + 6 * ldd, r6); _mm256_storeu_ps(dst + 7 * ldd, r7);
}
#endif

/* dst[c * ldd + r] = src[r * lds + c] for r < rows and columns c0 <= c < c1 (a thread's share).

   The loop order keeps the side with the long stride streaming. Source rows far apart (lds >= ldd, e.g.
   X: 64 x 3072 -> 3072 x 64): tiles of 64 columns, each read as short runs of 8 rows while its 64
   destination rows fill in L1 (going down all 64 rows per 8 columns made rows 12 KiB apart compete for
   one L1 set: 3.5x slower). Destination rows far apart (Y^T: 3072 x 64 -> 64 x 3072): 8 columns at a
   time down all rows, so each of the 8 destination rows is written sequentially (tiling it the other
   way: 3.8x slower). */
static inline void pk_transpose_cols(const float *restrict src, int64_t rows, int64_t c0, int64_t c1, int64_t lds,
                                     float *restrict dst, int64_t ldd) {
    const int64_t tile = lds >= ldd ? 64 : c1 - c0;
    for (int64_t t0 = c0; t0 < c1; t0 += tile) {
        const int64_t t1 = c1 - t0 < tile ? c1 : t0 + tile, tv = t0 + (t1 - t0) / 8 * 8;
        int64_t done = 0; /* rows handled by 8 x 8 blocks */
#if defined(__AVX2__)
        done = rows / 8 * 8;
        if (lds >= ldd) {
            for (int64_t r = 0; r < done; r += 8)
                for (int64_t c = t0; c < tv; c += 8) pk_transpose8(src + r * lds + c, lds, dst + c * ldd + r, ldd);
        } else {
            for (int64_t c = t0; c < tv; c += 8)
                for (int64_t r = 0; r < done; r += 8) pk_transpose8(src + r * lds + c, lds, dst + c * ldd + r, ldd);
        }
#endif
        for (int64_t q = done; q < rows; ++q)
            for (int64_t c = t0; c < tv; ++c) dst[c * ldd + q] = src[q * lds + c];
        for (int64_t c = tv; c < t1; ++c)
            for (int64_t q = 0; q < rows; ++q) dst[c * ldd + q] = src[q * lds + c];
    }
}

#endif

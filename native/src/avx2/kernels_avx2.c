/* kernels_avx2.c -- AVX2 versions of the hot loops; bit-identical to kernels_ref.c.
 * Compiled with -mavx2 only in this file; chosen at run time when the CPU has AVX2. */
#include <immintrin.h>
#include "../qes_internal.h"

static inline __m256i mix32_x8(__m256i x) {
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32((int)0x7feb352du));
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 15));
    x = _mm256_mullo_epi32(x, _mm256_set1_epi32((int)0x846ca68bu));
    return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}

static inline __m256i perm_x8(const qes_chunk_key *k, __m256i x) {
    const __m256i mask = _mm256_set1_epi32((int)QES_CHUNK_MASK);
    x = _mm256_and_si256(_mm256_add_epi32(_mm256_mullo_epi32(x, _mm256_set1_epi32((int)k->a)),
                                          _mm256_set1_epi32((int)k->b)), mask);
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 7));
    x = _mm256_and_si256(_mm256_add_epi32(_mm256_mullo_epi32(x, _mm256_set1_epi32((int)k->c)),
                                          _mm256_set1_epi32((int)k->d)), mask);
    x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 6));
    x = _mm256_and_si256(_mm256_mullo_epi32(x, _mm256_set1_epi32(0x2c1b3c6d)), mask);
    return _mm256_xor_si256(x, _mm256_srli_epi32(x, 7));
}

static uint32_t gen_chunk_avx2(const qes_chunk_key *k, uint32_t n_draws, uint32_t n_valid,
                               int seed_sign, uint16_t *off_out, int8_t *sign_out, uint16_t *slot_out) {
    uint32_t m = 0, j = 0;
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i skey = _mm256_set1_epi32((int)k->sign_key);
    /* signs: bit set -> +seed_sign, clear -> -seed_sign, written as 8 bytes from the mask */
    const int8_t pos = (int8_t)seed_sign, neg = (int8_t)-seed_sign;
    if (n_valid == QES_CHUNK) { /* every draw lands inside the tensor */
        for (; j + 16 <= n_draws; j += 16) {
            __m256i x0 = perm_x8(k, _mm256_add_epi32(lane, _mm256_set1_epi32((int)j)));
            __m256i x1 = perm_x8(k, _mm256_add_epi32(lane, _mm256_set1_epi32((int)j + 8)));
            __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(x0, x1), 0xD8);
            _mm256_storeu_si256((__m256i *)(off_out + m), packed);
            int b0 = _mm256_movemask_ps(_mm256_castsi256_ps(mix32_x8(_mm256_xor_si256(x0, skey))));
            int b1 = _mm256_movemask_ps(_mm256_castsi256_ps(mix32_x8(_mm256_xor_si256(x1, skey))));
            int bits = b0 | (b1 << 8);
            for (int l = 0; l < 16; ++l) {
                sign_out[m + l] = ((bits >> l) & 1) ? pos : neg;
                slot_out[m + l] = (uint16_t)(j + l);
            }
            m += 16;
        }
    }
    /* tail, and the partial last chunk */
    return qes_gen_draws(k, j, n_draws, n_valid, seed_sign, off_out, sign_out, slot_out, m);
}

static void scatter_chunk_avx2(const qes_chunk_key *k, uint32_t n_draws, uint32_t n_valid,
                               int32_t signed_coef, int32_t *acc) {
    uint32_t j = 0;
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i skey = _mm256_set1_epi32((int)k->sign_key);
    const __m256i pos = _mm256_set1_epi32(signed_coef), neg = _mm256_set1_epi32(-signed_coef);
    if (n_valid == QES_CHUNK) {
        for (; j + 8 <= n_draws; j += 8) {
            __m256i x = perm_x8(k, _mm256_add_epi32(lane, _mm256_set1_epi32((int)j)));
            __m256i h = mix32_x8(_mm256_xor_si256(x, skey));
            __m256i v = _mm256_blendv_epi8(neg, pos, _mm256_srai_epi32(h, 31)); /* top bit set -> +coef */
            int32_t xs[8], vs[8];
            _mm256_storeu_si256((__m256i *)xs, x);
            _mm256_storeu_si256((__m256i *)vs, v);
            for (int l = 0; l < 8; ++l) acc[xs[l]] += vs[l];
        }
    }
    qes_scatter_draws(k, j, n_draws, n_valid, signed_coef, acc);
}

static void dense_step_avx2(const qes_dense_args *a, int32_t *acc, int32_t *r, qes_update_stats *st) {
    const __m256i beta = _mm256_set1_epi32(a->beta_q14), half14 = _mm256_set1_epi32(1 << 13);
    const __m256i half16 = _mm256_set1_epi32(1 << 15);
    const __m256i hi = _mm256_set1_epi32(a->clamp_q16), lo = _mm256_set1_epi32(-a->clamp_q16);
    /* where every delta of 8 lanes is zero (nearly always), step lies in [-2^15, 2^15): with a
       clamp of at least 2^15 it needs no clamping, and r = step */
    const int no_clamp_when_zero = a->clamp_q16 >= (1 << 15);
    uint32_t i = 0;
    for (; i + 8 <= a->n; i += 8) {
        __m256i rv = _mm256_loadu_si256((const __m256i *)(r + i));
        __m256i step = _mm256_add_epi32(_mm256_loadu_si256((const __m256i *)(acc + i)),
            _mm256_srai_epi32(_mm256_add_epi32(_mm256_mullo_epi32(beta, rv), half14), 14));
        _mm256_storeu_si256((__m256i *)(acc + i), _mm256_setzero_si256()); /* ready for the next step */
        __m256i d = _mm256_srai_epi32(_mm256_add_epi32(step, half16), 16);
        int all_zero = _mm256_testz_si256(d, d);
        if (all_zero && no_clamp_when_zero) {
            _mm256_storeu_si256((__m256i *)(r + i), step);
            continue;
        }
        if (!all_zero) { /* rare: gate the nonzero deltas against the codes */
            int32_t dl[8];
            _mm256_storeu_si256((__m256i *)dl, d);
            qes_gate_lanes(a, a->base + i, dl, 8, st);
            d = _mm256_loadu_si256((const __m256i *)dl);
        }
        __m256i res = _mm256_sub_epi32(step, _mm256_slli_epi32(d, 16));
        res = _mm256_min_epi32(_mm256_max_epi32(res, lo), hi);
        _mm256_storeu_si256((__m256i *)(r + i), res);
    }
    if (i < a->n) { /* tail through the reference */
        qes_dense_args t = *a;
        t.base += i; t.n -= i;
        qes_kernels_ref.dense_step(&t, acc + i, r + i, st);
    }
}

const qes_kernels qes_kernels_avx2 = {"avx2", gen_chunk_avx2, scatter_chunk_avx2, dense_step_avx2};

/*
 * qes_noise.h -- the counter-based sparse noise of docs/noise-spec.md (spec version 1).
 *
 * Integer-only, keyed by (seed, tensor id, chunk, draw index).  Shared by every backend:
 * a backend may evaluate these functions in any order or width, never differently.
 *
 *   tensor id  = FNV-1a 64 of the tensor's name (UTF-8 bytes)
 *   chunk      = 2^14 consecutive elements of the tensor (the last one may be partial)
 *   K          = mix64(mix64(tid ^ (|seed| * GOLDEN)) + chunk)      L = mix64(K ^ GOLDEN)
 *   draws      = (p32 >> 18) + (mix32(hi32(L)) < (uint32)(p32 << 14))
 *   draw j     : x = perm(j) (a bijection of [0, 2^14) keyed by K and L),
 *                sign bit b = mix32(x ^ lo32(L)) >> 31,
 *                element chunk*2^14 + x (dropped when past the tensor's end) moves by
 *                (b ? +1 : -1) * sign(seed)
 * Draws within a chunk never collide (perm is a bijection), so every element moves by at
 * most one; each element moves with probability p32 / 2^32 (= sigma*sqrt(2/pi) rounded
 * down to 32 bits).
 */
#ifndef QES_NOISE_H
#define QES_NOISE_H

#include "qes_blocks.h"

#define QES_NOISE_SPEC_VERSION 1
#define QES_CHUNK_BITS 14
#define QES_CHUNK ((uint32_t)1 << QES_CHUNK_BITS)
#define QES_CHUNK_MASK (QES_CHUNK - 1u)
#define QES_GOLDEN64 0x9E3779B97F4A7C15ull
#define QES_SEED_MAX 2147483647ll /* |seed| in [1, 2^31-1]; the sign picks the mirror */

QES_INLINE uint32_t qes_mix32(uint32_t x) { /* "lowbias32" */
    x ^= x >> 16; x *= 0x7feb352du;
    x ^= x >> 15; x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

QES_INLINE uint64_t qes_mix64(uint64_t z) { /* splitmix64 finalizer */
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* The per-(seed, tensor, chunk) key words. */
typedef struct {
    uint32_t a, b, c, d; /* permutation: multipliers a, c (odd) and addends b, d */
    uint32_t sign_key;   /* lo32(L) */
    uint32_t count_key;  /* hi32(L) */
} qes_chunk_key;

QES_INLINE qes_chunk_key qes_make_chunk_key(uint64_t tensor_id, uint64_t abs_seed, uint64_t chunk) {
    uint64_t K = qes_mix64(qes_mix64(tensor_id ^ (abs_seed * QES_GOLDEN64)) + chunk);
    uint64_t L = qes_mix64(K ^ QES_GOLDEN64);
    qes_chunk_key k;
    k.a = (uint32_t)K | 1u;
    k.b = (uint32_t)(K >> 32);
    k.c = (uint32_t)(L >> 16) | 1u;
    k.d = (uint32_t)(L >> 40);
    k.sign_key = (uint32_t)L;
    k.count_key = (uint32_t)(L >> 32);
    return k;
}

/* Number of draws in a chunk: floor(p*2^14) plus one with probability frac(p*2^14). */
QES_INLINE uint32_t qes_chunk_draws(QES_THREAD const qes_chunk_key *k, uint32_t p32) {
    uint32_t base = p32 >> (32 - QES_CHUNK_BITS);
    uint32_t frac = p32 << QES_CHUNK_BITS;
    return base + (qes_mix32(k->count_key) < frac ? 1u : 0u);
}

/* Chunks of a tensor of n elements, and the elements of chunk c inside it (the last one's tail). */
QES_INLINE uint64_t qes_chunks(uint64_t n_elements) { return (n_elements + QES_CHUNK - 1) / QES_CHUNK; }
QES_INLINE uint32_t qes_chunk_valid(uint64_t n_elements, uint64_t c) {
    uint64_t left = n_elements - c * QES_CHUNK;
    return left < QES_CHUNK ? (uint32_t)left : QES_CHUNK;
}

/* Upper bound of qes_chunk_draws for a threshold: the stride of the perturbation mask. */
QES_INLINE uint32_t qes_max_draws(uint32_t p32) { return (p32 >> (32 - QES_CHUNK_BITS)) + 1u; }

/* A keyed bijection of [0, 2^14): every step is invertible modulo 2^14. */
QES_INLINE uint32_t qes_perm(QES_THREAD const qes_chunk_key *k, uint32_t j) {
    uint32_t x = j;
    x = (x * k->a + k->b) & QES_CHUNK_MASK;
    x ^= x >> 7;
    x = (x * k->c + k->d) & QES_CHUNK_MASK;
    x ^= x >> 6;
    x = (x * 0x2c1b3c6du) & QES_CHUNK_MASK;
    x ^= x >> 7;
    return x;
}

/* +1 or -1 for the draw landing on chunk offset x, before the seed's sign. */
QES_INLINE int qes_draw_sign(QES_THREAD const qes_chunk_key *k, uint32_t x) {
    return (qes_mix32(x ^ k->sign_key) >> 31) ? 1 : -1;
}

#if !defined(__METAL_VERSION__) /* names are hashed on the host */
/* FNV-1a 64 of a byte string. */
QES_INLINE uint64_t qes_fnv1a64(const uint8_t *s, uint64_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (uint64_t i = 0; i < n; ++i) { h ^= s[i]; h *= 0x100000001b3ull; }
    return h;
}
#endif

#endif /* QES_NOISE_H */

/* noise.c -- sigma to threshold, the noise listing (for tests and other implementations). */
#include <math.h>
#include "qes_internal.h"

/* sqrt(2/pi) as the nearest double: E|N(0,1)| */
#define QES_SQRT_2_OVER_PI 0.79788456080286535588

int qes_sigma_threshold(double sigma, uint32_t *p32_out) {
    if (!p32_out) return QES_ERR_NULL;
    if (!isfinite(sigma) || sigma <= 0.0 || sigma > QES_SIGMA_MAX) return QES_ERR_SIGMA;
    /* two correctly rounded IEEE multiplications and a floor: the same on every host */
    double p = sigma * QES_SQRT_2_OVER_PI;
    double scaled = p * 4294967296.0;
    uint32_t p32 = (uint32_t)floor(scaled);
    if (p32 == 0) return QES_ERR_SIGMA;
    *p32_out = p32;
    return QES_OK;
}

int qes_check_seed(int64_t seed) {
    if (seed == 0 || seed > QES_SEED_MAX || seed < -QES_SEED_MAX) return QES_ERR_SEED;
    return QES_OK;
}

int qes_check_threshold(uint32_t p32) {
    /* sigma <= 0.5 gives p32 < 0.4 * 2^32 */
    if (p32 == 0 || p32 > (uint32_t)(0.5 * QES_SQRT_2_OVER_PI * 4294967296.0)) return QES_ERR_SIGMA;
    return QES_OK;
}

uint64_t qes_mask_bytes(uint64_t n_elements, uint32_t p32) {
    uint64_t chunks = qes_chunks(n_elements);
    return (chunks * qes_max_draws(p32) + 7) / 8;
}

int qes_noise(uint64_t tensor_id, uint64_t n_elements, int64_t seed, uint32_t p32,
              uint64_t *pos_out, int8_t *sign_out, uint64_t cap, uint64_t *n_out) {
    int err;
    if (!n_out || (cap && (!pos_out || !sign_out))) return QES_ERR_NULL;
    if ((err = qes_check_seed(seed)) || (err = qes_check_threshold(p32))) return err;
    if (((uintptr_t)pos_out) % sizeof(uint64_t)) return QES_ERR_ALIGN;
    const qes_kernels *kern = &qes_kernels_ref;
    uint64_t abs_seed = (uint64_t)(seed < 0 ? -seed : seed), n = 0;
    uint64_t chunks = qes_chunks(n_elements);
    uint16_t off[QES_CHUNK], slot[QES_CHUNK];
    int8_t sg[QES_CHUNK];
    for (uint64_t c = 0; c < chunks; ++c) {
        qes_chunk_key k = qes_make_chunk_key(tensor_id, abs_seed, c);
        uint32_t valid = qes_chunk_valid(n_elements, c);
        uint32_t m = kern->gen_chunk(&k, qes_chunk_draws(&k, p32), valid, seed < 0 ? -1 : 1, off, sg, slot);
        for (uint32_t i = 0; i < m; ++i, ++n) {
            if (n < cap) { pos_out[n] = c * QES_CHUNK + off[i]; sign_out[n] = sg[i]; }
        }
    }
    *n_out = n;
    return QES_OK;
}

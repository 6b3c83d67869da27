/*
 * qes_metal_kernels.h -- what one Metal thread does, as plain functions over the shared block and
 * noise headers: compiled into the Metal kernels (qes_metal.metal) and, here, as C/C++ by
 * native/tests/metal_logic.c, which runs them in the kernels' grid order on the host and is
 * checked against the golden vectors (tests/test_metal_logic.py).  No Metal API in this file.
 *
 * Work split, chosen so that no two threads ever write the same byte:
 *   perturb/restore  one thread per group of 8 chunks of a tensor (the host driver's unit): a
 *                    group owns whole blocks and whole mask bytes (8 chunks x max_draws bits)
 *   update           one threadgroup per chunk; threads split a term's draws for the scatter
 *                    (draws of one term never collide: perm is a bijection), a barrier between
 *                    terms, then threads split the chunk's blocks for the dense step (blocks are
 *                    byte-disjoint; elements of one block share bytes, so one thread does them)
 */
#ifndef QES_METAL_KERNELS_H
#define QES_METAL_KERNELS_H

#include "qes_blocks.h"
#include "qes_noise.h"
#include "qes_perturb.h"
#include "qes_update.h"

/* Perturb (write = 1) or restore (write = 0) group g of a tensor; returns the codes changed.
 * *foreign is set when a restore meets a mask bit this seed did not write (a code would leave
 * its range): the host driver's QES_ERR_RANGE. */
QES_INLINE uint32_t qes_mtl_group(QES_THREAD const qes_type_traits *tr, QES_DEVICE uint8_t *data, uint64_t n_elements,
                                  uint64_t tensor_id, int64_t seed, uint32_t p32, QES_DEVICE uint8_t *mask,
                                  uint64_t mask_bytes, uint64_t g, int write, QES_THREAD uint32_t *foreign) {
    uint64_t chunks = qes_chunks(n_elements), stride = qes_max_draws(p32);
    uint64_t c0 = g * QES_GROUP_CHUNKS, c1 = c0 + QES_GROUP_CHUNKS < chunks ? c0 + QES_GROUP_CHUNKS : chunks;
    uint64_t abs_seed = (uint64_t)(seed < 0 ? -seed : seed);
    int sgn = seed < 0 ? -1 : 1;
    uint32_t applied = 0;
    if (write) {
        uint64_t b1 = (g + 1) * stride < mask_bytes ? (g + 1) * stride : mask_bytes;
        for (uint64_t b = g * stride; b < b1; ++b) mask[b] = 0;
    }
    for (uint64_t c = c0; c < c1; ++c) {
        qes_chunk_key k = qes_make_chunk_key(tensor_id, abs_seed, c);
        uint64_t base = c * QES_CHUNK;
        uint32_t valid = qes_chunk_valid(n_elements, c);
        uint32_t draws = qes_chunk_draws(&k, p32);
        for (uint32_t j = 0; j < draws; ++j) {
            uint32_t x = qes_perm(&k, j);
            if (x >= valid) continue;
            int sign = qes_draw_sign(&k, x) * sgn;
            uint64_t e = base + x, bit = c * stride + j;
            if (write) {
                if (qes_perturb_elem(tr, data, e, sign)) { qes_mask_set(mask, bit); ++applied; }
            } else if (qes_mask_test(mask, bit)) {
                if (qes_restore_elem(tr, data, e, sign)) ++applied;
                else *foreign = 1;
            }
        }
    }
    return applied;
}

/* Update, scatter: draw j of one merged term (|seed|, net coefficient) in chunk c. */
QES_INLINE void qes_mtl_scatter(uint64_t tensor_id, uint64_t abs_seed, int32_t coef, uint32_t p32, uint64_t c,
                                uint32_t valid, uint32_t j, QES_DEVICE int32_t *acc) {
    qes_chunk_key k = qes_make_chunk_key(tensor_id, abs_seed, c);
    if (j >= qes_chunk_draws(&k, p32)) return;
    uint32_t x = qes_perm(&k, j);
    if (x < valid) acc[x] += qes_draw_sign(&k, x) * coef;
}

/* Update, dense step: the elements [e0, e0 + n) of one block (e0 = chunk base + offset), with
 * their accumulators and residuals at the same offsets (qes_update.h's arithmetic). */
QES_INLINE void qes_mtl_dense(QES_THREAD const qes_type_traits *tr, QES_DEVICE uint8_t *data, uint64_t e0, uint32_t n,
                              QES_DEVICE int32_t *acc, QES_DEVICE int32_t *r, int32_t beta_q14, int32_t clamp_q16,
                              int anti_windup, int apply, QES_THREAD uint32_t *changed, QES_THREAD uint32_t *dropped) {
    for (uint32_t i = 0; i < n; ++i) {
        r[i] = qes_update_elem(tr, data, e0 + i, acc[i], r[i], beta_q14, clamp_q16, anti_windup, apply, changed,
                               dropped);
        acc[i] = 0;
    }
}

#endif /* QES_METAL_KERNELS_H */

/* metal_logic.c -- the Metal kernels' thread functions (native/src/metal/qes_metal_kernels.h)
 * run on the host in the kernels' grid order, built as C and as C++ into a small shared library
 * that tests/test_metal_logic.py checks against the golden vectors.  The Metal runtime is not
 * here (macOS only); what each GPU thread computes is. */
#include <stdlib.h>
#include <string.h>
#include "qes_metal_kernels.h"

#ifdef __cplusplus
#define API extern "C"
#else
#define API
#endif

/* Perturb (write 1) or restore (write 0) one tensor: one call per group of 8 chunks, as the
 * kernel's grid.  Returns 0, or -4 (QES_ERR_RANGE) when a restore met a foreign mask. */
API int mtl_perturb(int type, uint64_t n_elements, uint8_t *data, uint64_t tensor_id, int64_t seed, uint32_t p32,
                    uint8_t *mask, uint64_t mask_bytes, int write, uint64_t *applied) {
    qes_type_traits tr;
    if (!qes_traits(type, &tr)) return -2;
    uint64_t chunks = qes_chunks(n_elements), groups = (chunks + QES_GROUP_CHUNKS - 1) / QES_GROUP_CHUNKS;
    uint32_t foreign = 0;
    *applied = 0;
    for (uint64_t g = 0; g < groups; ++g)
        *applied += qes_mtl_group(&tr, data, n_elements, tensor_id, seed, p32, mask, mask_bytes, g, write, &foreign);
    return foreign ? -4 : 0;
}

/* Update: steps of merged terms (|seed| ascending, net coefficients), terms of step s at
 * [term_start[s], term_start[s+1]).  One threadgroup per chunk: the scatter of each term over
 * its draws, then the dense step block by block; only the last step applies. */
API int mtl_update(int type, uint64_t n_elements, uint8_t *data, uint64_t tensor_id, uint32_t n_steps,
                   const uint32_t *term_start, const uint64_t *term_seed, const int32_t *term_coef, const uint32_t *p32,
                   int32_t *residual, int32_t beta_q14, int32_t clamp_q16, int anti_windup, uint64_t *changed,
                   uint64_t *dropped) {
    qes_type_traits tr;
    if (!qes_traits(type, &tr)) return -2;
    int32_t *acc = (int32_t *)calloc(QES_CHUNK, sizeof(int32_t)), *scratch = (int32_t *)calloc(QES_CHUNK, sizeof(int32_t));
    uint64_t chunks = qes_chunks(n_elements);
    *changed = *dropped = 0;
    for (uint64_t c = 0; c < chunks; ++c) {
        uint64_t base = c * QES_CHUNK, left = n_elements - base;
        uint32_t valid = left < QES_CHUNK ? (uint32_t)left : QES_CHUNK, ch = 0, dr = 0;
        int32_t *r = residual ? residual + base : scratch;
        if (!residual) memset(scratch, 0, sizeof(int32_t) * QES_CHUNK);
        memset(acc, 0, sizeof(int32_t) * QES_CHUNK);
        for (uint32_t s = 0; s < n_steps; ++s) {
            for (uint32_t t = term_start[s]; t < term_start[s + 1]; ++t)
                for (uint32_t j = 0; j < qes_max_draws(p32[s]); ++j) /* the grid covers the largest count */
                    qes_mtl_scatter(tensor_id, term_seed[t], term_coef[t], p32[s], c, valid, j, acc);
            for (uint32_t b = 0; b < valid; b += (uint32_t)tr.block_elems)
                qes_mtl_dense(&tr, data, base + b, (uint32_t)tr.block_elems, acc + b, r + b, beta_q14, clamp_q16,
                              anti_windup, s + 1 == n_steps, &ch, &dr);
        }
        *changed += ch;
        *dropped += dr;
    }
    free(acc);
    free(scratch);
    return 0;
}

/* kernels_ref.c -- the portable reference of the two hot loops (see qes_internal.h). */
#include "qes_internal.h"

static uint32_t gen_chunk_ref(const qes_chunk_key *k, uint32_t n_draws, uint32_t n_valid,
                              int seed_sign, uint16_t *off_out, int8_t *sign_out, uint16_t *slot_out) {
    uint32_t m = 0;
    for (uint32_t j = 0; j < n_draws; ++j) {
        uint32_t x = qes_perm(k, j);
        if (x >= n_valid) continue;
        off_out[m] = (uint16_t)x;
        sign_out[m] = (int8_t)(qes_draw_sign(k, x) * seed_sign);
        slot_out[m] = (uint16_t)j;
        ++m;
    }
    return m;
}

static void scatter_chunk_ref(const qes_chunk_key *k, uint32_t n_draws, uint32_t n_valid,
                              int32_t signed_coef, int32_t *acc) {
    for (uint32_t j = 0; j < n_draws; ++j) {
        uint32_t x = qes_perm(k, j);
        if (x < n_valid) acc[x] += qes_draw_sign(k, x) * signed_coef;
    }
}

static void dense_step_ref(const qes_dense_args *a, int32_t *acc, int32_t *r, qes_update_stats *st) {
    uint32_t changed = 0, dropped = 0;
    for (uint32_t i = 0; i < a->n; ++i) {
        r[i] = qes_update_elem(a->tr, a->data, a->base + i, acc[i], r[i], a->beta_q14, a->clamp_q16, a->anti_windup,
                               a->apply, &changed, &dropped);
        acc[i] = 0; /* ready for the next step's scatter */
    }
    st->changed += changed;
    st->dropped += dropped;
}

const qes_kernels qes_kernels_ref = {"portable", gen_chunk_ref, scatter_chunk_ref, dense_step_ref};

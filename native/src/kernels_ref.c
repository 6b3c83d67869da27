/* kernels_ref.c -- the portable reference of the two hot loops (see qes_internal.h). */
#include "qes_internal.h"

static uint32_t gen_chunk_ref(const qes_chunk_key *k, uint32_t n_draws, uint32_t n_valid,
                              int seed_sign, uint16_t *off_out, int8_t *sign_out, uint16_t *slot_out) {
    return qes_gen_draws(k, 0, n_draws, n_valid, seed_sign, off_out, sign_out, slot_out, 0);
}

static void scatter_chunk_ref(const qes_chunk_key *k, uint32_t n_draws, uint32_t n_valid,
                              int32_t signed_coef, int32_t *acc) {
    qes_scatter_draws(k, 0, n_draws, n_valid, signed_coef, acc);
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

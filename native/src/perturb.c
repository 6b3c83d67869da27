/* perturb.c -- sparse perturbation with boundary gating, and its exact restore.
 *
 * Cost scales with the draws (about p32/2^32 of the elements), not with the tensor size.
 * Mask bit (chunk * max_draws + j) records whether draw j of a chunk was applied, so that
 * restore undoes exactly what perturb did, codes at the range ends included. */
#include <stdlib.h>
#include <string.h>
#include "qes_internal.h"

#define QES_BUCKET_BITS 8 /* 256 elements: a few cache lines of any type */
#define QES_BUCKETS (QES_CHUNK >> QES_BUCKET_BITS)

typedef struct {
    uint16_t off[QES_CHUNK], slot[QES_CHUNK];
    int8_t sign[QES_CHUNK];
    uint16_t order[QES_CHUNK];         /* draw entries by address bucket */
    uint32_t start[QES_BUCKETS + 1];   /* counting sort of the draws into buckets */
} chunk_draws;

static int check_args(const qes_tensor *t, qes_type_traits *tr, int64_t seed, uint32_t p32,
                      const uint8_t *mask, uint64_t mask_bytes) {
    int err;
    if ((err = qes_check_tensor_traits(t, tr))) return err;
    if ((err = qes_check_seed(seed)) || (err = qes_check_threshold(p32))) return err;
    if (!mask) return QES_ERR_NULL;
    if (mask_bytes < qes_mask_bytes(t->n_elements, p32)) return QES_ERR_SIZE;
    return QES_OK;
}

static int run(qes_tensor *t, int64_t seed, uint32_t p32, uint8_t *mask_w, const uint8_t *mask_r,
               uint64_t *applied_out) {
    qes_type_traits tr;
    qes_traits(t->type, &tr); /* arguments were checked by the caller */
    chunk_draws *cd = (chunk_draws *)malloc(sizeof *cd);
    if (!cd) return QES_ERR_NOMEM;
    const qes_kernels *kern = qes_active_kernels();
    uint64_t abs_seed = (uint64_t)(seed < 0 ? -seed : seed), applied = 0, foreign = 0;
    uint64_t chunks = (t->n_elements + QES_CHUNK - 1) / QES_CHUNK, stride = qes_max_draws(p32);
    int sgn = seed < 0 ? -1 : 1;
    if (mask_w) memset(mask_w, 0, (size_t)qes_mask_bytes(t->n_elements, p32));
    for (uint64_t c = 0; c < chunks; ++c) {
        qes_chunk_key k = qes_make_chunk_key(t->id, abs_seed, c);
        uint64_t base = c * QES_CHUNK, left = t->n_elements - base;
        uint32_t valid = left < QES_CHUNK ? (uint32_t)left : QES_CHUNK;
        uint32_t m = kern->gen_chunk(&k, qes_chunk_draws(&k, p32), valid, sgn, cd->off, cd->sign, cd->slot);
        /* the draws come in random order; visiting them bucket by bucket in address order lets
           the hardware prefetcher stream the tensor instead of missing at random.  Every element
           is drawn at most once, so the order changes nothing in the result. */
        memset(cd->start, 0, sizeof cd->start);
        for (uint32_t i = 0; i < m; ++i) cd->start[(cd->off[i] >> QES_BUCKET_BITS) + 1]++;
        for (uint32_t bkt = 0; bkt < QES_BUCKETS; ++bkt) cd->start[bkt + 1] += cd->start[bkt];
        for (uint32_t i = 0; i < m; ++i) cd->order[cd->start[cd->off[i] >> QES_BUCKET_BITS]++] = (uint16_t)i;
        for (uint32_t o = 0; o < m; ++o) {
            if (o + 16 < m) /* and run ahead of it */
                __builtin_prefetch(t->data + ((base + cd->off[cd->order[o + 16]]) >> tr.block_shift) * (uint64_t)tr.block_bytes, 1);
            uint32_t i = cd->order[o];
            uint64_t e = base + cd->off[i], bit = c * stride + cd->slot[i];
            int code = qes_elem_get(&tr, t->data, e);
            if (mask_w) { /* perturb: gate at the range ends */
                int nc = code + cd->sign[i];
                if (nc < tr.cmin || nc > tr.cmax) continue;
                qes_elem_set(&tr, t->data, e, nc);
                mask_w[bit >> 3] |= (uint8_t)(1u << (bit & 7));
                ++applied;
            } else if ((mask_r[bit >> 3] >> (bit & 7)) & 1) { /* restore what was applied */
                int oc = code - cd->sign[i];
                if (oc < tr.cmin || oc > tr.cmax) { ++foreign; continue; } /* not this seed's mask */
                qes_elem_set(&tr, t->data, e, oc);
                ++applied;
            }
        }
    }
    free(cd);
    if (applied_out) *applied_out = applied;
    return foreign ? QES_ERR_RANGE : QES_OK;
}

int qes_perturb(qes_tensor *t, int64_t seed, uint32_t p32, uint8_t *mask, uint64_t mask_bytes,
                uint64_t *applied_out) {
    qes_type_traits tr;
    int err = check_args(t, &tr, seed, p32, mask, mask_bytes);
    if (err) return err;
    return run(t, seed, p32, mask, NULL, applied_out);
}

int qes_restore(qes_tensor *t, int64_t seed, uint32_t p32, const uint8_t *mask, uint64_t mask_bytes) {
    qes_type_traits tr;
    int err = check_args(t, &tr, seed, p32, mask, mask_bytes);
    if (err) return err;
    return run(t, seed, p32, NULL, mask, NULL);
}

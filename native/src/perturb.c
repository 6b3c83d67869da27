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

int qes_check_perturb(const qes_tensor *t, qes_type_traits *tr, int64_t seed, uint32_t p32,
                      const uint8_t *mask, uint64_t mask_bytes) {
    int err;
    if ((err = qes_check_tensor_traits(t, tr))) return err;
    if ((err = qes_check_seed(seed)) || (err = qes_check_threshold(p32))) return err;
    if (!mask) return QES_ERR_NULL;
    if (mask_bytes < qes_mask_bytes(t->n_elements, p32)) return QES_ERR_SIZE;
    return QES_OK;
}

/* Work is split into groups of QES_GROUP_CHUNKS chunks (qes_perturb.h): threads never share a
 * mask byte, and every group is independent of the others. */

typedef struct {
    qes_tensor **ts;
    qes_type_traits *trs;
    uint64_t *group_end;          /* cumulative group count per tensor */
    uint32_t n;
    int64_t seed;
    uint32_t p32;
    uint8_t **masks;
    int write;                    /* 1: perturb (write the masks), 0: restore (read them) */
    const qes_kernels *kern;
    chunk_draws **cds;
    uint64_t *applied;            /* per tensor, may be NULL; added to atomically */
    uint32_t failed;              /* first tensor (lowest index) whose restore met a foreign mask */
} many_ctx;

static void run_group(void *vctx, uint64_t task, int thread) {
    many_ctx *u = (many_ctx *)vctx;
    uint32_t lo = 0, hi = u->n - 1;
    while (lo < hi) { /* the tensor whose groups contain this task */
        uint32_t mid = (lo + hi) / 2;
        if (u->group_end[mid] > task) hi = mid; else lo = mid + 1;
    }
    qes_tensor *t = u->ts[lo];
    const qes_type_traits tr = u->trs[lo];
    chunk_draws *cd = u->cds[thread];
    uint64_t g = task - (lo ? u->group_end[lo - 1] : 0);
    uint64_t chunks = qes_chunks(t->n_elements), stride = qes_max_draws(u->p32);
    uint64_t c0 = g * QES_GROUP_CHUNKS, c1 = c0 + QES_GROUP_CHUNKS < chunks ? c0 + QES_GROUP_CHUNKS : chunks;
    uint64_t abs_seed = (uint64_t)(u->seed < 0 ? -u->seed : u->seed), applied = 0, foreign = 0;
    int sgn = u->seed < 0 ? -1 : 1;
    uint8_t *mask = u->masks[lo];
    if (u->write) {
        uint64_t b0 = g * stride, b1 = qes_mask_bytes(t->n_elements, u->p32);
        if ((g + 1) * stride < b1) b1 = (g + 1) * stride;
        memset(mask + b0, 0, (size_t)(b1 - b0));
    }
    for (uint64_t c = c0; c < c1; ++c) {
        qes_chunk_key k = qes_make_chunk_key(t->id, abs_seed, c);
        uint64_t base = c * QES_CHUNK;
        uint32_t valid = qes_chunk_valid(t->n_elements, c);
        uint32_t m = u->kern->gen_chunk(&k, qes_chunk_draws(&k, u->p32), valid, sgn, cd->off, cd->sign, cd->slot);
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
            if (u->write) { /* perturb: gated at the range ends */
                if (qes_perturb_elem(&tr, t->data, e, cd->sign[i])) { qes_mask_set(mask, bit); ++applied; }
            } else if (qes_mask_test(mask, bit)) { /* restore what was applied */
                if (qes_restore_elem(&tr, t->data, e, cd->sign[i])) ++applied;
                else ++foreign; /* not this seed's mask */
            }
        }
    }
    if (u->applied && applied) __atomic_fetch_add(&u->applied[lo], applied, __ATOMIC_RELAXED);
    if (foreign) { /* keep the lowest index, whichever thread gets here first */
        uint32_t cur = __atomic_load_n(&u->failed, __ATOMIC_RELAXED);
        while (lo < cur && !__atomic_compare_exchange_n(&u->failed, &cur, lo, 0, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {}
    }
}

static int run_many(const qes_kernels *kern, qes_tensor **ts, uint32_t n, int64_t seed, uint32_t p32,
                    uint8_t **masks, const uint64_t *mask_bytes, int32_t n_threads, int write,
                    uint64_t *applied_out, uint32_t *failed_out) {
    int err = QES_OK, nt = 0;
    uint64_t groups = 0;
    if (failed_out) *failed_out = 0;
    if (n == 0) return QES_OK;
    if (!ts || !masks || !mask_bytes) return QES_ERR_NULL;
    if (n_threads > QES_MAX_THREADS) return QES_ERR_ARG;
    many_ctx u = {ts, NULL, NULL, n, seed, p32, masks, write, kern, NULL, applied_out, UINT32_MAX};
    u.trs = (qes_type_traits *)malloc(sizeof(qes_type_traits) * n);
    u.group_end = (uint64_t *)malloc(sizeof(uint64_t) * n);
    if (!u.trs || !u.group_end) { err = QES_ERR_NOMEM; goto out; }
    for (uint32_t i = 0; i < n; ++i) {
        if ((err = ts[i] ? qes_check_perturb(ts[i], &u.trs[i], seed, p32, masks[i], mask_bytes[i]) : QES_ERR_NULL)) {
            if (failed_out) *failed_out = i;
            goto out;
        }
        uint64_t chunks = qes_chunks(ts[i]->n_elements);
        groups += (chunks + QES_GROUP_CHUNKS - 1) / QES_GROUP_CHUNKS;
        u.group_end[i] = groups;
        if (applied_out) applied_out[i] = 0;
    }
    nt = n_threads > 0 ? n_threads : qes_default_threads();
    if ((uint64_t)nt > groups) nt = (int)groups;
    u.cds = (chunk_draws **)calloc((size_t)nt, sizeof(chunk_draws *));
    if (!u.cds) { err = QES_ERR_NOMEM; goto out; }
    for (int i = 0; i < nt; ++i)
        if (!(u.cds[i] = (chunk_draws *)malloc(sizeof(chunk_draws)))) { err = QES_ERR_NOMEM; goto out; }
    if ((err = qes_parallel_for(groups, nt, run_group, &u))) goto out;
    if (u.failed != UINT32_MAX) {
        err = QES_ERR_RANGE;
        if (failed_out) *failed_out = u.failed;
    }
out:
    if (u.cds)
        for (int i = 0; i < nt; ++i) free(u.cds[i]);
    free(u.cds);
    free(u.trs);
    free(u.group_end);
    return err;
}

int qes_host_perturb_many(const qes_kernels *kern, qes_tensor **ts, uint32_t n, int64_t seed, uint32_t p32,
                          uint8_t **masks, const uint64_t *mask_bytes, int32_t n_threads, uint64_t *applied_out,
                          uint32_t *failed_out) {
    return run_many(kern, ts, n, seed, p32, masks, mask_bytes, n_threads, 1, applied_out, failed_out);
}

int qes_host_restore_many(const qes_kernels *kern, qes_tensor **ts, uint32_t n, int64_t seed, uint32_t p32,
                          uint8_t **masks, const uint64_t *mask_bytes, int32_t n_threads, uint32_t *failed_out) {
    return run_many(kern, ts, n, seed, p32, masks, mask_bytes, n_threads, 0, NULL, failed_out);
}

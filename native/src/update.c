/* update.c -- one QES update with error feedback, over cache-sized tiles on all cores.
 *
 * For every chunk of 2^14 elements (the noise's own tiling, so each tile regenerates only
 * its own draws), for each step in order:
 *   acc[e]  = sum over members of coef_i * eps_i[e]                      (Q16, sparse scatter)
 *   step[e] = acc[e] + floor((beta_q14 * r[e] + 2^13) / 2^14)
 *   d[e]    = floor((step[e] + 2^15) / 2^16)                             (round half up)
 *   gate d against the current code (anti-windup: drop it; else cut it at the range end)
 *   r[e]    = clamp(step[e] - d[e] * 2^16, +-clamp_q16)
 * and only the last step writes d into the codes.  r starts at zero (seed replay) or at the
 * stored residual.  Tiles are independent, so threads change nothing in the result.
 *
 * Members +s and -s draw the same positions with opposite signs, so each step's members are
 * first merged by |seed| into one term with the net coefficient: a mirrored pair is scattered
 * once.  Integer sums are exact (|acc| <= sum |coef| <= 2^30), so the bits do not change. */
#include <stdlib.h>
#include <string.h>
#include "qes_internal.h"

typedef struct {
    int32_t acc[QES_CHUNK], r[QES_CHUNK];
    qes_update_stats stats;
} tile_buf;

typedef struct {
    const qes_term *terms;
    uint32_t n_terms;
    uint32_t threshold;
} merged_step;

typedef struct {
    qes_tensor *t;
    qes_type_traits tr;
    const merged_step *steps;
    uint32_t n_steps;
    int32_t *residual;
    const qes_update_params *p;
    const qes_kernels *kern;
    tile_buf **bufs;
} update_ctx;

static void update_tile(void *vctx, uint64_t c, int thread) {
    update_ctx *u = (update_ctx *)vctx;
    tile_buf *b = u->bufs[thread];
    uint64_t base = c * QES_CHUNK;
    uint32_t valid = qes_chunk_valid(u->t->n_elements, c);
    int32_t *r = u->residual ? u->residual + base : b->r;
    if (!u->residual) memset(r, 0, valid * sizeof(int32_t));
    qes_dense_args a = {&u->tr, u->t->data, base, valid, u->p->beta_q14, u->p->clamp_q16,
                        (u->p->flags & QES_UPDATE_ANTI_WINDUP) != 0, 0};
    memset(b->acc, 0, valid * sizeof(int32_t)); /* dense_step leaves it zeroed for the next step */
    for (uint32_t s = 0; s < u->n_steps; ++s) {
        const merged_step *st = &u->steps[s];
        for (uint32_t i = 0; i < st->n_terms; ++i) {
            qes_chunk_key k = qes_make_chunk_key(u->t->id, st->terms[i].seed, c);
            u->kern->scatter_chunk(&k, qes_chunk_draws(&k, st->threshold), valid, st->terms[i].coef, b->acc);
        }
        a.apply = (s + 1 == u->n_steps);
        u->kern->dense_step(&a, b->acc, r, &b->stats);
    }
}

int qes_check_update(const qes_tensor *t, qes_type_traits *tr, const qes_step *steps, uint32_t n_steps,
                     const int32_t *residual, const qes_update_params *p) {
    int err;
    if ((err = qes_check_tensor_traits(t, tr))) return err;
    if (!steps || !p) return QES_ERR_NULL;
    if (n_steps == 0 || n_steps > 100000) return QES_ERR_ARG;
    if (p->beta_q14 < 0 || p->beta_q14 > 16384) return QES_ERR_ARG;
    if (p->clamp_q16 < 0 || p->clamp_q16 > 131071) return QES_ERR_ARG;
    if (p->n_threads > QES_MAX_THREADS) return QES_ERR_ARG;
    for (uint32_t s = 0; s < n_steps; ++s) {
        const qes_step *st = &steps[s];
        if (st->n_members && (!st->seeds || !st->coefs)) return QES_ERR_NULL;
        if (((uintptr_t)st->seeds) % sizeof(int64_t) || ((uintptr_t)st->coefs) % sizeof(int32_t))
            return QES_ERR_ALIGN;
        if ((err = qes_check_threshold(st->threshold))) return err;
        int64_t total = 0;
        for (uint32_t i = 0; i < st->n_members; ++i) {
            if ((err = qes_check_seed(st->seeds[i]))) return err;
            int64_t c = st->coefs[i];
            total += c < 0 ? -c : c;
            if (total > ((int64_t)1 << 30)) return QES_ERR_COEF;
        }
    }
    if (residual) {
        if (((uintptr_t)residual) % sizeof(int32_t)) return QES_ERR_ALIGN;
        for (uint64_t i = 0; i < t->n_elements; ++i)
            if (residual[i] > p->clamp_q16 || residual[i] < -p->clamp_q16) return QES_ERR_RANGE;
    }
    return QES_OK;
}

static int by_seed(const void *a, const void *b) {
    uint64_t x = ((const qes_term *)a)->seed, y = ((const qes_term *)b)->seed;
    return (x > y) - (x < y);
}

uint32_t qes_merge_members(const qes_step *st, qes_term *out) {
    uint32_t n = 0, m = 0;
    for (uint32_t i = 0; i < st->n_members; ++i) {
        int64_t seed = st->seeds[i];
        if (st->coefs[i] == 0) continue;
        out[n].seed = (uint64_t)(seed < 0 ? -seed : seed);
        out[n++].coef = seed < 0 ? -st->coefs[i] : st->coefs[i];
    }
    qsort(out, n, sizeof(qes_term), by_seed);
    for (uint32_t i = 0; i < n; ++i) {
        if (m && out[m - 1].seed == out[i].seed) out[m - 1].coef += out[i].coef;
        else out[m++] = out[i];
    }
    n = 0;
    for (uint32_t i = 0; i < m; ++i)
        if (out[i].coef) out[n++] = out[i];
    return n;
}

int qes_host_update(const qes_kernels *kern, qes_tensor *t, const qes_step *steps, uint32_t n_steps,
                    int32_t *residual, const qes_update_params *params, qes_update_stats *stats) {
    update_ctx u;
    int err = qes_check_update(t, &u.tr, steps, n_steps, residual, params);
    if (err) return err;
    uint64_t chunks = qes_chunks(t->n_elements);
    int nt = params->n_threads > 0 ? params->n_threads : qes_default_threads();
    if ((uint64_t)nt > chunks) nt = (int)chunks;
    uint64_t n_members = 0;
    for (uint32_t s = 0; s < n_steps; ++s) n_members += steps[s].n_members;
    merged_step *merged = (merged_step *)calloc(n_steps, sizeof(merged_step));
    qes_term *terms = (qes_term *)malloc((size_t)(n_members ? n_members : 1) * sizeof(qes_term));
    if (!merged || !terms) { free(merged); free(terms); return QES_ERR_NOMEM; }
    uint64_t at = 0;
    for (uint32_t s = 0; s < n_steps; ++s) {
        merged[s].terms = terms + at;
        merged[s].n_terms = qes_merge_members(&steps[s], terms + at);
        merged[s].threshold = steps[s].threshold;
        at += steps[s].n_members;
    }
    u.t = t; u.steps = merged; u.n_steps = n_steps; u.residual = residual; u.p = params;
    u.kern = kern;
    u.bufs = (tile_buf **)calloc((size_t)nt, sizeof(tile_buf *));
    if (!u.bufs) { free(merged); free(terms); return QES_ERR_NOMEM; }
    for (int i = 0; i < nt; ++i)
        if (!(u.bufs[i] = (tile_buf *)calloc(1, sizeof(tile_buf)))) { err = QES_ERR_NOMEM; break; }
    if (!err) err = qes_parallel_for(chunks, nt, update_tile, &u);
    qes_update_stats total = {0, 0};
    for (int i = 0; i < nt; ++i) {
        if (u.bufs[i]) { total.changed += u.bufs[i]->stats.changed; total.dropped += u.bufs[i]->stats.dropped; }
        free(u.bufs[i]);
    }
    free(u.bufs);
    free(merged);
    free(terms);
    if (stats) *stats = total;
    return err;
}

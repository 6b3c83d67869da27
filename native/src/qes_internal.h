/*
 * qes_internal.h -- what the library's files share: argument checks and the kernel table.
 *
 * A kernel table holds the two hot loops of the engine.  kernels_ref.c is the portable
 * reference; every SIMD/GPU table must produce the same bytes (tests compare them).
 */
#ifndef QES_INTERNAL_H
#define QES_INTERNAL_H

#include "qes.h"
#include "qes_blocks.h"
#include "qes_noise.h"

/* The draws of one chunk: chunk offsets and signs (+-1, seed sign applied).
 * Returns the number of draws (entries written; entries past n_valid are dropped and
 * their mask slot stays 0 -- see slot_out).  slot_out[i] is the draw index j of entry i. */
typedef uint32_t (*qes_gen_chunk_fn)(const qes_chunk_key *k, uint32_t n_draws, uint32_t n_valid,
                                     int seed_sign, uint16_t *off_out, int8_t *sign_out,
                                     uint16_t *slot_out);

/* One error-feedback step over a tile of n elements starting at element base:
 *   step = acc + round(beta * r);  delta = round(step);  gate delta against the codes;
 *   r = clamp(step - delta);  apply delta to the codes when apply != 0;  acc is left zeroed. */
typedef struct {
    const qes_type_traits *tr;
    uint8_t *data;
    uint64_t base;
    uint32_t n;
    int32_t beta_q14, clamp_q16;
    int anti_windup;
    int apply;
} qes_dense_args;
typedef void (*qes_dense_step_fn)(const qes_dense_args *a, int32_t *acc, int32_t *r,
                                  qes_update_stats *stats);

/* acc[x] += eps * coef for every draw x of a chunk (eps with the seed's sign applied). */
typedef void (*qes_scatter_chunk_fn)(const qes_chunk_key *k, uint32_t n_draws, uint32_t n_valid,
                                     int32_t signed_coef, int32_t *acc);

typedef struct {
    const char *name;
    qes_gen_chunk_fn gen_chunk;
    qes_scatter_chunk_fn scatter_chunk;
    qes_dense_step_fn dense_step;
} qes_kernels;

extern const qes_kernels qes_kernels_ref;
#if defined(QES_HAVE_AVX2)
extern const qes_kernels qes_kernels_avx2;
#endif
const qes_kernels *qes_active_kernels(void);

/* shared checks */
int qes_check_tensor_traits(const qes_tensor *t, qes_type_traits *tr);
int qes_check_seed(int64_t seed);
int qes_check_threshold(uint32_t p32);

/* gate one delta: returns the delta actually applied (0 when dropped) */
static inline int32_t qes_gate(const qes_type_traits *tr, int code, int32_t d, int anti_windup) {
    int32_t nc = code + d;
    if (nc >= tr->cmin && nc <= tr->cmax) return d;
    if (anti_windup) return 0;
    return (nc < tr->cmin ? tr->cmin : tr->cmax) - code;
}

/* arithmetic shift right (floor division by 2^s).  C leaves >> of a negative value to the
   implementation; every compiler we build with shifts arithmetically, and this assert stops
   the build on one that does not (a branch here would cost a misprediction per element). */
_Static_assert((-7 >> 1) == -4, "signed >> must be an arithmetic shift");
static inline int32_t qes_asr(int32_t x, int s) { return x >> s; }

/* parallel for over [0, n) on nthreads threads; fn(ctx, i, thread_index) */
typedef void (*qes_task_fn)(void *ctx, uint64_t i, int thread);
int qes_parallel_for(uint64_t n, int nthreads, qes_task_fn fn, void *ctx);

#endif

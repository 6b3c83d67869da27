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
#include "qes_perturb.h" /* qes_perturb_elem, qes_restore_elem, the mask bits, QES_GROUP_CHUNKS */
#include "qes_update.h"  /* qes_gate, qes_update_elem: the update's per-element arithmetic */

/* the most threads a call may ask for (QES_ERR_ARG above it) */
#define QES_MAX_THREADS 1024

/* The draws of one chunk: chunk offsets and signs (+-1, seed sign applied).
 * Returns the number of draws (entries written; entries past n_valid are dropped and
 * their mask slot stays 0 -- see slot_out).  slot_out[i] is the draw index j of entry i. */
typedef uint32_t (*qes_gen_chunk_fn)(const qes_chunk_key *k, uint32_t n_draws, uint32_t n_valid,
                                     int seed_sign, uint16_t *off_out, int8_t *sign_out,
                                     uint16_t *slot_out);

/* The draws of a chunk from draw j on, written at entry m: the whole reference loop, and the
 * tail of every SIMD one (the last draws, and a partial last chunk).  Returns the new count. */
static inline uint32_t qes_gen_draws(const qes_chunk_key *k, uint32_t j, uint32_t n_draws, uint32_t n_valid,
                                     int seed_sign, uint16_t *off_out, int8_t *sign_out, uint16_t *slot_out,
                                     uint32_t m) {
    for (; j < n_draws; ++j) {
        uint32_t x = qes_perm(k, j);
        if (x >= n_valid) continue;
        off_out[m] = (uint16_t)x;
        sign_out[m] = (int8_t)(qes_draw_sign(k, x) * seed_sign);
        slot_out[m] = (uint16_t)j;
        ++m;
    }
    return m;
}

/* acc[x] += eps * coef for the draws of a chunk from draw j on (the reference loop, SIMD tails). */
static inline void qes_scatter_draws(const qes_chunk_key *k, uint32_t j, uint32_t n_draws, uint32_t n_valid,
                                     int32_t signed_coef, int32_t *acc) {
    for (; j < n_draws; ++j) {
        uint32_t x = qes_perm(k, j);
        if (x < n_valid) acc[x] += qes_draw_sign(k, x) * signed_coef;
    }
}

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

/* The SIMD dense steps' rare path: gate the nonzero deltas dl[0..n) of the elements from e0 on
 * against their codes (applying them when a->apply), leaving the deltas actually taken. */
static inline void qes_gate_lanes(const qes_dense_args *a, uint64_t e0, int32_t *dl, int n, qes_update_stats *st) {
    for (int l = 0; l < n; ++l) {
        if (!dl[l]) continue;
        int code = qes_elem_get(a->tr, a->data, e0 + l);
        int32_t g = qes_gate(a->tr, code, dl[l], a->anti_windup);
        if (a->apply) {
            if (g != dl[l]) st->dropped++;
            if (g) { qes_elem_set(a->tr, a->data, e0 + l, code + g); st->changed++; }
        }
        dl[l] = g;
    }
}

/* acc[x] += eps * coef for every draw x of a chunk (eps with the seed's sign applied). */
typedef void (*qes_scatter_chunk_fn)(const qes_chunk_key *k, uint32_t n_draws, uint32_t n_valid,
                                     int32_t signed_coef, int32_t *acc);

typedef struct {
    const char *name;
    qes_gen_chunk_fn gen_chunk;
    qes_scatter_chunk_fn scatter_chunk;
    qes_dense_step_fn dense_step;
} qes_kernels;

/* A device backend's whole operations (the GPU seam).  Tensor data, and the residual of a
 * stored-residual update, are in the backend's memory; masks, seeds and coefficients are host
 * memory (a mask is one bit a draw: kilobytes).  Each returns what the host driver returns for
 * the same arguments, and writes the same bytes. */
typedef struct {
    int (*perturb_many)(qes_tensor **ts, uint32_t n, int64_t seed, uint32_t p32, uint8_t **masks,
                        const uint64_t *mask_bytes, int32_t n_threads, uint64_t *applied_out, uint32_t *failed_out);
    int (*restore_many)(qes_tensor **ts, uint32_t n, int64_t seed, uint32_t p32, uint8_t **masks,
                        const uint64_t *mask_bytes, int32_t n_threads, uint32_t *failed_out);
    int (*update)(qes_tensor *t, const qes_step *steps, uint32_t n_steps, int32_t *residual,
                  const qes_update_params *params, qes_update_stats *stats);
    void *(*alloc)(uint64_t n_bytes);
    void (*free)(void *p);
    int (*upload)(void *dst, const void *src, uint64_t n_bytes);
    int (*download)(void *dst, const void *src, uint64_t n_bytes);
} qes_device_ops;

/* One row of the registry (backend.c): a host backend has kernels, a device backend ops; a
 * backend that was not compiled in has neither. */
typedef struct {
    const char *name;
    int is_device;
    int (*available)(void);          /* called only when compiled in */
    const qes_kernels *kernels;
    const qes_device_ops *ops;
} qes_backend_desc;

extern const qes_kernels qes_kernels_ref;
#if defined(QES_HAVE_AVX2)
extern const qes_kernels qes_kernels_avx2;
#endif
#if defined(QES_HAVE_NEON)
extern const qes_kernels qes_kernels_neon;
#endif
/* The CUDA backend is a plugin (libqes_cuda.so beside libqes, loaded by backend.c on first use)
 * exporting these two: */
const qes_device_ops *qes_cuda_ops(void);   /* its operations */
int qes_cuda_available(void);              /* 1 when a CUDA device is usable */
#if defined(QES_HAVE_METAL)
extern const qes_device_ops qes_ops_metal;
int qes_metal_available(void);
#endif
const qes_backend_desc *qes_active_backend(void);
const qes_kernels *qes_active_kernels(void);   /* the active host kernels (portable under a device backend) */

/* The host drivers, which run a kernel table over host memory (perturb.c, update.c). */
int qes_host_perturb_many(const qes_kernels *kern, qes_tensor **ts, uint32_t n, int64_t seed, uint32_t p32,
                          uint8_t **masks, const uint64_t *mask_bytes, int32_t n_threads, uint64_t *applied_out,
                          uint32_t *failed_out);
int qes_host_restore_many(const qes_kernels *kern, qes_tensor **ts, uint32_t n, int64_t seed, uint32_t p32,
                          uint8_t **masks, const uint64_t *mask_bytes, int32_t n_threads, uint32_t *failed_out);
int qes_host_update(const qes_kernels *kern, qes_tensor *t, const qes_step *steps, uint32_t n_steps,
                    int32_t *residual, const qes_update_params *params, qes_update_stats *stats);

/* Checks and preparation shared by the host driver and the device backends. */
int qes_check_update(const qes_tensor *t, qes_type_traits *tr, const qes_step *steps, uint32_t n_steps,
                     const int32_t *residual, const qes_update_params *p);
int qes_check_perturb(const qes_tensor *t, qes_type_traits *tr, int64_t seed, uint32_t p32,
                      const uint8_t *mask, uint64_t mask_bytes);
/* One term per distinct |seed| with a nonzero net coefficient, in |seed| order: a mirrored pair
 * is scattered once.  out needs st->n_members entries; returns the count. */
typedef struct {
    uint64_t seed;      /* |seed| */
    int32_t coef;       /* the net signed coefficient of every member with that |seed| */
} qes_term;
uint32_t qes_merge_members(const qes_step *st, qes_term *out);

/* SHA-256 (sha256.c), streamed */
typedef struct { uint32_t h[8]; uint64_t len; uint8_t buf[64]; uint32_t fill; } qes_sha256_ctx;
void qes_sha256_init(qes_sha256_ctx *c);
void qes_sha256_update(qes_sha256_ctx *c, const uint8_t *p, uint64_t n);
void qes_sha256_final(qes_sha256_ctx *c, uint8_t out[32]);

/* shared checks */
int qes_check_tensor_traits(const qes_tensor *t, qes_type_traits *tr);
int qes_check_seed(int64_t seed);
int qes_check_threshold(uint32_t p32);


/* qes_update.h divides by 2^s with >> (floor division).  C leaves >> of a negative value to the
   implementation; every compiler we build with shifts arithmetically, and this assert stops
   the build on one that does not (a branch there would cost a misprediction per element). */
_Static_assert((-7 >> 1) == -4, "signed >> must be an arithmetic shift");

/* parallel for over [0, n) on nthreads threads; fn(ctx, i, thread_index) */
typedef void (*qes_task_fn)(void *ctx, uint64_t i, int thread);
int qes_parallel_for(uint64_t n, int nthreads, qes_task_fn fn, void *ctx);

#endif

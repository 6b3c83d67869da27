/*
 * ops_cuda.cu -- the CUDA device backend, built as the plugin libqes_cuda.so beside libqes.
 *
 * backend.c dlopens this library on first use of the "cuda" backend and looks up
 * qes_cuda_ops() and qes_cuda_available().  Each operation runs on tensors whose data is in
 * device memory (llama.cpp's offloaded weights) and returns what the host driver (perturb.c,
 * update.c) returns for the same arguments: the same error codes, bytes, masks, residuals and
 * counts.  The per-element logic is the shared inline code of qes_noise.h and qes_blocks.h.
 *
 * Layout: one thread block per chunk of 2^14 elements (the noise's own tiling; chunks hold whole
 * quantization blocks, so two thread blocks never share a byte).  Inside a chunk several
 * elements share a byte (4-, 2- and 1-bit fields), so element writes are done by the thread
 * that owns the whole quantization block: a first phase marks, in shared memory, what happens
 * to each element of the chunk (element-parallel, no writes to the tensor); after a barrier,
 * thread b writes the elements of quantization blocks b, b+nt, ... in order.  No byte is
 * written by two threads, and no byte is read by one thread while another writes it.
 *
 * Each kernel is a sequence of phase functions separated by __syncthreads(); the phases are
 * __host__ __device__ so that a host emulation can run them thread by thread (in any order)
 * against the portable reference without a GPU.
 */
#include <cuda_runtime.h>
#include <stdlib.h>
#include <string.h>
#include <new>
#include <vector>

#define _Static_assert static_assert /* qes_internal.h's C11 asserts, read as C++ */
extern "C" {
#include "qes_internal.h"
}

#define QES_HD static __host__ __device__ __forceinline__

/* -- atomics (plain operations when a phase runs on the host, one thread at a time) ---------- */
QES_HD void at_add_i32(int32_t *p, int32_t v) {
#ifdef __CUDA_ARCH__
    atomicAdd((int *)p, (int)v);
#else
    *p += v;
#endif
}
QES_HD void at_or_u32(uint32_t *p, uint32_t v) {
#ifdef __CUDA_ARCH__
    atomicOr((unsigned int *)p, (unsigned int)v);
#else
    *p |= v;
#endif
}
QES_HD void at_add_u64(unsigned long long *p, unsigned long long v) {
#ifdef __CUDA_ARCH__
    atomicAdd(p, v);
#else
    *p += v;
#endif
}
QES_HD void at_min_u32(uint32_t *p, uint32_t v) {
#ifdef __CUDA_ARCH__
    atomicMin((unsigned int *)p, (unsigned int)v);
#else
    if (v < *p) *p = v;
#endif
}

/* the gate and the update's arithmetic are qes_update.h's (host and device alike) */

/* ============================== perturb / restore ============================================= */

typedef struct {
    uint8_t *data;
    uint64_t n_elements;
    uint64_t id;
    uint64_t mask_off;     /* byte offset of its mask in the device mask buffer (a multiple of 4) */
    qes_type_traits tr;
} pr_tensor;

typedef struct {
    const pr_tensor *ts;
    const uint64_t *chunk_end;   /* cumulative chunk count per tensor */
    uint32_t n;
    uint64_t abs_seed;
    int sgn;
    uint32_t p32, stride;        /* stride = qes_max_draws(p32): mask bits per chunk */
    uint8_t *mask;               /* device: every tensor's mask at its mask_off */
    int write;                   /* 1 perturb, 0 restore */
    unsigned long long *applied; /* device, n counters */
    uint32_t *failed;            /* device, lowest tensor index with a foreign mask, or UINT32_MAX */
} pr_args;

typedef struct {
    uint32_t ti;                 /* tensor index */
    uint64_t c;                  /* chunk within the tensor */
    uint32_t valid;              /* elements of the chunk inside the tensor */
    qes_chunk_key k;
} pr_chunk;

/* The tensor and chunk of flat chunk number task (the host's binary search over groups). */
QES_HD pr_chunk pr_locate(const pr_args *a, uint64_t task) {
    uint32_t lo = 0, hi = a->n - 1;
    while (lo < hi) {
        uint32_t mid = (lo + hi) / 2;
        if (a->chunk_end[mid] > task) hi = mid; else lo = mid + 1;
    }
    pr_chunk ch;
    ch.ti = lo;
    ch.c = task - (lo ? a->chunk_end[lo - 1] : 0);
    const pr_tensor *t = &a->ts[lo];
    ch.valid = qes_chunk_valid(t->n_elements, ch.c);
    ch.k = qes_make_chunk_key(t->id, a->abs_seed, ch.c);
    return ch;
}

/* phase 1: no draw anywhere yet */
QES_HD void pr_clear(uint16_t *slot, int tid, int nt) {
    for (uint32_t x = (uint32_t)tid; x < QES_CHUNK; x += (uint32_t)nt) slot[x] = 0;
}

/* phase 2: slot[x] = j + 1 for the draw j landing on chunk offset x (a bijection: no collision) */
QES_HD void pr_draws(const pr_args *a, const pr_chunk *ch, uint16_t *slot, int tid, int nt) {
    uint32_t draws = qes_chunk_draws(&ch->k, a->p32);
    for (uint32_t j = (uint32_t)tid; j < draws; j += (uint32_t)nt) {
        uint32_t x = qes_perm(&ch->k, j);
        if (x < ch->valid) slot[x] = (uint16_t)(j + 1); /* j < 2^14 */
    }
}

/* phase 3: thread tid owns quantization blocks tid, tid+nt, ... of the chunk and applies (perturb)
 * or undoes (restore) the draws on their elements, as perturb.c's run_group does per draw. */
QES_HD void pr_apply(const pr_args *a, const pr_chunk *ch, const uint16_t *slot, int tid, int nt) {
    const pr_tensor *t = &a->ts[ch->ti];
    const qes_type_traits tr = t->tr;
    uint64_t base = ch->c * QES_CHUNK, bit0 = ch->c * a->stride;
    uint32_t be = (uint32_t)tr.block_elems, nblocks = ch->valid >> tr.block_shift;
    uint8_t *mask = a->mask + t->mask_off;
    unsigned long long applied = 0, foreign = 0;
    for (uint32_t b = (uint32_t)tid; b < nblocks; b += (uint32_t)nt) {
        for (uint32_t x = b * be; x < (b + 1) * be; ++x) {
            uint32_t s = slot[x];
            if (!s) continue;
            uint64_t e = base + x, bit = bit0 + (s - 1);
            int sign = qes_draw_sign(&ch->k, x) * a->sgn;
            if (a->write) { /* perturb: gated at the range ends (qes_perturb.h) */
                if (!qes_perturb_elem(&tr, t->data, e, sign)) continue;
                /* bits of one mask word belong to other draws (other threads, other chunks):
                   atomic on the 32-bit word; bit & 31 of a little-endian word is bit & 7 of byte bit >> 3 */
                at_or_u32((uint32_t *)mask + (bit >> 5), 1u << (bit & 31));
                ++applied;
            } else if (qes_mask_test(mask, bit)) { /* restore what was applied */
                if (qes_restore_elem(&tr, t->data, e, sign)) ++applied;
                else ++foreign; /* not this seed's mask */
            }
        }
    }
    if (applied) at_add_u64(&a->applied[ch->ti], applied);
    if (foreign) at_min_u32(a->failed, ch->ti);
}

#define PR_THREADS 256

__global__ void __launch_bounds__(PR_THREADS) pr_kernel(pr_args a, uint64_t first) {
    __shared__ uint16_t slot[QES_CHUNK];
    __shared__ pr_chunk ch;
    int tid = (int)threadIdx.x, nt = (int)blockDim.x;
    if (tid == 0) ch = pr_locate(&a, first + blockIdx.x);
    pr_clear(slot, tid, nt);
    __syncthreads();
    pr_draws(&a, &ch, slot, tid, nt);
    __syncthreads();
    pr_apply(&a, &ch, slot, tid, nt);
}

/* ===================================== update ================================================= */

typedef struct {
    uint64_t seed;   /* |seed| */
    int32_t coef;    /* net signed coefficient */
    int32_t pad;
} up_term;

typedef struct {
    uint8_t *data;
    uint64_t n_elements;
    uint64_t id;
    qes_type_traits tr;
    const up_term *terms;
    const uint32_t *step_first;  /* n_steps + 1 offsets into terms */
    const uint32_t *threshold;   /* n_steps */
    uint32_t n_steps;
    int32_t *residual;           /* device, or NULL (seed replay) */
    int32_t beta_q14, clamp_q16;
    int anti_windup;
    unsigned long long *stats;   /* device: changed, dropped */
} up_args;

QES_HD uint32_t up_valid(const up_args *a, uint64_t c) { return qes_chunk_valid(a->n_elements, c); }

/* acc = 0, r = the stored residual or 0 */
QES_HD void up_init(const up_args *a, uint64_t c, int32_t *acc, int32_t *r, int tid, int nt) {
    uint32_t valid = up_valid(a, c);
    for (uint32_t x = (uint32_t)tid; x < valid; x += (uint32_t)nt) {
        acc[x] = 0;
        r[x] = a->residual ? a->residual[c * QES_CHUNK + x] : 0;
    }
}

/* acc[x] += draw sign * coef for every merged term of step s.  One term's draws never collide;
 * different terms may, and integer addition is exact in any order (|acc| <= 2^30): atomics. */
QES_HD void up_scatter(const up_args *a, uint64_t c, uint32_t s, int32_t *acc, int tid, int nt) {
    uint32_t valid = up_valid(a, c);
    for (uint32_t i = a->step_first[s]; i < a->step_first[s + 1]; ++i) {
        qes_chunk_key k = qes_make_chunk_key(a->id, a->terms[i].seed, c);
        uint32_t draws = qes_chunk_draws(&k, a->threshold[s]);
        int32_t coef = a->terms[i].coef;
        for (uint32_t j = (uint32_t)tid; j < draws; j += (uint32_t)nt) {
            uint32_t x = qes_perm(&k, j);
            if (x < valid) at_add_i32(&acc[x], qes_draw_sign(&k, x) * coef);
        }
    }
}

/* dense_step_ref of kernels_ref.c per element, reading codes only.  On the applied (last) step,
 * acc[x] keeps the gated delta for up_write; otherwise it is left zeroed for the next scatter. */
QES_HD void up_dense(const up_args *a, uint64_t c, int apply, int32_t *acc, int32_t *r, int tid, int nt) {
    uint32_t valid = up_valid(a, c);
    uint64_t base = c * QES_CHUNK;
    unsigned long long changed = 0, dropped = 0;
    for (uint32_t x = (uint32_t)tid; x < valid; x += (uint32_t)nt) {
        int32_t step = qes_update_step(acc[x], r[x], a->beta_q14);
        acc[x] = 0;
        int32_t d = qes_update_delta(step);
        if (d) {
            int code = qes_elem_get(&a->tr, a->data, base + x);
            int32_t g = qes_gate(&a->tr, code, d, a->anti_windup);
            if (apply) {
                if (g != d) dropped++;
                if (g) { acc[x] = g; changed++; }
            }
            d = g;
        }
        r[x] = qes_update_residual(step, d, a->clamp_q16);
        if (apply && a->residual) a->residual[base + x] = r[x];
    }
    if (changed) at_add_u64(&a->stats[0], changed);
    if (dropped) at_add_u64(&a->stats[1], dropped);
}

/* after the applied step: thread tid writes the deltas of quantization blocks tid, tid+nt, ... */
QES_HD void up_write(const up_args *a, uint64_t c, const int32_t *acc, int tid, int nt) {
    uint32_t valid = up_valid(a, c), be = (uint32_t)a->tr.block_elems, nblocks = valid >> a->tr.block_shift;
    uint64_t base = c * QES_CHUNK;
    for (uint32_t b = (uint32_t)tid; b < nblocks; b += (uint32_t)nt)
        for (uint32_t x = b * be; x < (b + 1) * be; ++x) {
            int32_t g = acc[x];
            if (!g) continue;
            int code = qes_elem_get(&a->tr, a->data, base + x);
            qes_elem_set(&a->tr, a->data, base + x, code + g);
        }
}

#define UP_THREADS 512
#define UP_SHARED (2 * QES_CHUNK * sizeof(int32_t)) /* acc and r of one chunk: 128 KiB */

__global__ void __launch_bounds__(UP_THREADS) up_kernel(up_args a, uint64_t first) {
    extern __shared__ int32_t up_smem[];
    int32_t *acc = up_smem, *r = up_smem + QES_CHUNK;
    int tid = (int)threadIdx.x, nt = (int)blockDim.x;
    uint64_t c = first + blockIdx.x;
    up_init(&a, c, acc, r, tid, nt);
    __syncthreads();
    for (uint32_t s = 0; s < a.n_steps; ++s) {
        up_scatter(&a, c, s, acc, tid, nt);
        __syncthreads();
        up_dense(&a, c, s + 1 == a.n_steps, acc, r, tid, nt);
        __syncthreads();
    }
    up_write(&a, c, acc, tid, nt);
}

/* flag = 1 when a stored residual is outside [-clamp, clamp] (qes_check_update's range check) */
__global__ void residual_check_kernel(const int32_t *r, uint64_t n, int32_t clamp, uint32_t *flag) {
    for (uint64_t i = blockIdx.x * (uint64_t)blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x)
        if (r[i] > clamp || r[i] < -clamp) *flag = 1;
}

/* ===================================== host side ============================================== */

/* The device holding p (device or managed memory), or -1: host memory, or unknown to CUDA. */
static int device_of(const void *p) {
    cudaPointerAttributes at;
    if (cudaPointerGetAttributes(&at, p) != cudaSuccess) {
        cudaGetLastError(); /* clear it: not a pointer the runtime knows */
        return -1;
    }
    if (at.type != cudaMemoryTypeDevice && at.type != cudaMemoryTypeManaged) return -1;
    return at.device >= 0 ? at.device : -1;
}

static int cuda_err(cudaError_t e) {
    if (e == cudaSuccess) return QES_OK;
    cudaGetLastError();
    return e == cudaErrorMemoryAllocation ? QES_ERR_NOMEM : QES_ERR_BACKEND;
}

static uint64_t align_up(uint64_t x, uint64_t a) { return (x + a - 1) / a * a; }

/* launches cover at most this many chunks (gridDim.x < 2^31) */
#define MAX_GRID ((uint64_t)1 << 30)

/* Runs the tensors idx[0..m) of a call, all on the current device.  pt, mb: per tensor of the
 * call.  Writes their masks (perturb) and applied counts; *failed: the lowest index of the call
 * whose restore met a foreign mask (kept when lower). */
static int run_subset(const std::vector<uint32_t> &idx, const std::vector<pr_tensor> &all, const std::vector<uint64_t> &mb,
                      int64_t seed, uint32_t p32, uint8_t **masks, int write, uint64_t *applied_out, uint32_t *failed) {
    uint32_t m = (uint32_t)idx.size();
    std::vector<pr_tensor> pt(m);
    std::vector<uint64_t> chunk_end(m);
    uint64_t chunks = 0, mask_total = 0;
    for (uint32_t i = 0; i < m; ++i) {
        pt[i] = all[idx[i]];
        pt[i].mask_off = mask_total;
        mask_total += align_up(mb[idx[i]], 4); /* words of the atomicOr stay inside the tensor's mask */
        chunks += qes_chunks(pt[i].n_elements);
        chunk_end[i] = chunks;
    }
    /* one device buffer: tensors | chunk_end | applied | failed | masks, staged through one host buffer */
    uint64_t o_ts = 0, o_end = align_up(o_ts + sizeof(pr_tensor) * m, 16);
    uint64_t o_app = align_up(o_end + 8 * (uint64_t)m, 16), o_fail = o_app + 8 * (uint64_t)m;
    uint64_t o_mask = align_up(o_fail + 4, 16), total = o_mask + mask_total;
    uint8_t *host = (uint8_t *)calloc(1, (size_t)total);
    if (!host) return QES_ERR_NOMEM;
    memcpy(host + o_ts, pt.data(), sizeof(pr_tensor) * m);
    memcpy(host + o_end, chunk_end.data(), 8 * (size_t)m);
    memset(host + o_fail, 0xff, 4);
    if (!write) /* restore reads the masks; perturb starts from zeros (perturb.c memsets them) */
        for (uint32_t i = 0; i < m; ++i) memcpy(host + o_mask + pt[i].mask_off, masks[idx[i]], (size_t)mb[idx[i]]);
    uint8_t *dev = NULL;
    /* work another library queued on its own streams (llama.cpp's) may still use the tensors */
    int err = cuda_err(cudaDeviceSynchronize());
    if (!err) err = cuda_err(cudaMalloc((void **)&dev, (size_t)total));
    if (err) { free(host); return err; }
    err = cuda_err(cudaMemcpy(dev, host, (size_t)total, cudaMemcpyHostToDevice));
    pr_args a;
    a.ts = (const pr_tensor *)(dev + o_ts);
    a.chunk_end = (const uint64_t *)(dev + o_end);
    a.n = m;
    a.abs_seed = (uint64_t)(seed < 0 ? -seed : seed);
    a.sgn = seed < 0 ? -1 : 1;
    a.p32 = p32;
    a.stride = qes_max_draws(p32);
    a.mask = dev + o_mask;
    a.write = write;
    a.applied = (unsigned long long *)(dev + o_app);
    a.failed = (uint32_t *)(dev + o_fail);
    for (uint64_t first = 0; !err && first < chunks; first += MAX_GRID) {
        uint64_t g = chunks - first < MAX_GRID ? chunks - first : MAX_GRID;
        pr_kernel<<<(unsigned)g, PR_THREADS>>>(a, first);
        err = cuda_err(cudaGetLastError());
    }
    if (!err) err = cuda_err(cudaDeviceSynchronize());
    uint64_t back = (write ? total : o_mask) - o_app; /* counts, failed, and the masks perturb wrote */
    if (!err) err = cuda_err(cudaMemcpy(host + o_app, dev + o_app, (size_t)back, cudaMemcpyDeviceToHost));
    cudaFree(dev);
    if (!err) {
        uint32_t f;
        memcpy(&f, host + o_fail, 4);
        for (uint32_t i = 0; i < m; ++i) {
            if (write) memcpy(masks[idx[i]], host + o_mask + pt[i].mask_off, (size_t)mb[idx[i]]);
            if (applied_out) memcpy(&applied_out[idx[i]], host + o_app + 8 * (uint64_t)i, 8);
        }
        if (f != UINT32_MAX && idx[f] < *failed) *failed = idx[f];
    }
    free(host);
    return err;
}

/* perturb.c's run_many: the same checks in the same order, then the tensors of each device
 * (llama.cpp may split a model over several GPUs) in one launch per device. */
static int run_many(qes_tensor **ts, uint32_t n, int64_t seed, uint32_t p32, uint8_t **masks,
                    const uint64_t *mask_bytes, int32_t n_threads, int write, uint64_t *applied_out,
                    uint32_t *failed_out) {
    if (failed_out) *failed_out = 0;
    if (n == 0) return QES_OK;
    if (!ts || !masks || !mask_bytes) return QES_ERR_NULL;
    if (n_threads > 1024) return QES_ERR_ARG;
    std::vector<pr_tensor> pt(n);
    std::vector<uint64_t> mb(n);
    std::vector<int> dev(n);
    for (uint32_t i = 0; i < n; ++i) {
        int err = ts[i] ? qes_check_perturb(ts[i], &pt[i].tr, seed, p32, masks[i], mask_bytes[i]) : QES_ERR_NULL;
        if (err) {
            if (failed_out) *failed_out = i;
            return err;
        }
        pt[i].data = ts[i]->data;
        pt[i].n_elements = ts[i]->n_elements;
        pt[i].id = ts[i]->id;
        pt[i].mask_off = 0;
        mb[i] = qes_mask_bytes(ts[i]->n_elements, p32);
        if (applied_out) applied_out[i] = 0;
    }
    /* then what only a device backend asks (so that bad arguments get the host driver's codes) */
    for (uint32_t i = 0; i < n; ++i)
        if ((dev[i] = device_of(ts[i]->data)) < 0) { /* not device memory */
            if (failed_out) *failed_out = i;
            return QES_ERR_ARG;
        }
    int prev = 0, err = QES_OK;
    uint32_t failed = UINT32_MAX;
    if ((err = cuda_err(cudaGetDevice(&prev)))) return err;
    std::vector<uint8_t> done(n, 0);
    for (uint32_t i = 0; i < n && !err; ++i) {
        if (done[i]) continue;
        std::vector<uint32_t> idx;
        for (uint32_t j = i; j < n; ++j)
            if (!done[j] && dev[j] == dev[i]) { idx.push_back(j); done[j] = 1; }
        if (!(err = cuda_err(cudaSetDevice(dev[i]))))
            err = run_subset(idx, pt, mb, seed, p32, masks, write, applied_out, &failed);
    }
    cudaSetDevice(prev);
    if (!err && failed != UINT32_MAX) {
        err = QES_ERR_RANGE;
        if (failed_out) *failed_out = failed;
    }
    return err;
}

static int cuda_perturb_many(qes_tensor **ts, uint32_t n, int64_t seed, uint32_t p32, uint8_t **masks,
                             const uint64_t *mask_bytes, int32_t n_threads, uint64_t *applied_out,
                             uint32_t *failed_out) {
    try {
        return run_many(ts, n, seed, p32, masks, mask_bytes, n_threads, 1, applied_out, failed_out);
    } catch (const std::bad_alloc &) { /* a std::vector: nothing may unwind into C */
        return QES_ERR_NOMEM;
    }
}

static int cuda_restore_many(qes_tensor **ts, uint32_t n, int64_t seed, uint32_t p32, uint8_t **masks,
                             const uint64_t *mask_bytes, int32_t n_threads, uint32_t *failed_out) {
    try {
        return run_many(ts, n, seed, p32, masks, mask_bytes, n_threads, 0, NULL, failed_out);
    } catch (const std::bad_alloc &) {
        return QES_ERR_NOMEM;
    }
}

static int update_on(qes_tensor *t, const qes_type_traits &tr, const qes_step *steps, uint32_t n_steps,
                     int32_t *residual, const qes_update_params *params, qes_update_stats *stats);

static int cuda_update(qes_tensor *t, const qes_step *steps, uint32_t n_steps, int32_t *residual,
                       const qes_update_params *params, qes_update_stats *stats) {
    qes_type_traits tr;
    /* every check of the host driver but the residual's range, which needs its device bytes */
    int err = qes_check_update(t, &tr, steps, n_steps, NULL, params);
    if (err) return err;
    if (residual && ((uintptr_t)residual) % sizeof(int32_t)) return QES_ERR_ALIGN;
    int device = device_of(t->data), prev = 0;
    if (device < 0 || (residual && device_of(residual) != device)) return QES_ERR_ARG;
    if ((err = cuda_err(cudaGetDevice(&prev)))) return err;
    if ((err = cuda_err(cudaSetDevice(device)))) return err;
    try {
        err = update_on(t, tr, steps, n_steps, residual, params, stats);
    } catch (const std::bad_alloc &) {
        err = QES_ERR_NOMEM;
    }
    cudaSetDevice(prev);
    return err;
}

/* the update of a checked tensor, on the current device (the one holding its data) */
static int update_on(qes_tensor *t, const qes_type_traits &tr, const qes_step *steps, uint32_t n_steps,
                     int32_t *residual, const qes_update_params *params, qes_update_stats *stats) {
    int err = QES_OK;
    uint64_t n_members = 0;
    for (uint32_t s = 0; s < n_steps; ++s) n_members += steps[s].n_members;
    std::vector<qes_term> merged((size_t)(n_members ? n_members : 1));
    std::vector<uint32_t> first(n_steps + 1), threshold(n_steps);
    std::vector<up_term> terms;
    terms.reserve((size_t)n_members);
    for (uint32_t s = 0; s < n_steps; ++s) {
        first[s] = (uint32_t)terms.size();
        uint32_t m = qes_merge_members(&steps[s], merged.data());
        for (uint32_t i = 0; i < m; ++i) terms.push_back(up_term{merged[i].seed, merged[i].coef, 0});
        threshold[s] = steps[s].threshold;
    }
    first[n_steps] = (uint32_t)terms.size();
    /* one device buffer: stats | flag | terms | first | threshold */
    uint64_t o_stats = 0, o_flag = 16, o_terms = 32, o_first = o_terms + sizeof(up_term) * terms.size();
    uint64_t o_thr = o_first + 4 * (uint64_t)(n_steps + 1), total = o_thr + 4 * (uint64_t)n_steps;
    uint8_t *host = (uint8_t *)calloc(1, (size_t)total);
    if (!host) return QES_ERR_NOMEM;
    if (!terms.empty()) memcpy(host + o_terms, terms.data(), sizeof(up_term) * terms.size());
    memcpy(host + o_first, first.data(), 4 * (size_t)(n_steps + 1));
    memcpy(host + o_thr, threshold.data(), 4 * (size_t)n_steps);
    uint8_t *dev = NULL;
    if (!(err = cuda_err(cudaDeviceSynchronize()))) /* as in run_subset */
        err = cuda_err(cudaMalloc((void **)&dev, (size_t)total));
    if (err) { free(host); return err; }
    err = cuda_err(cudaMemcpy(dev, host, (size_t)total, cudaMemcpyHostToDevice));
    if (!err && residual) { /* the range check of qes_check_update, before anything is written */
        uint64_t blocks = (t->n_elements + 255) / 256;
        residual_check_kernel<<<(unsigned)(blocks < 1024 ? blocks : 1024), 256>>>(
            residual, t->n_elements, params->clamp_q16, (uint32_t *)(dev + o_flag));
        uint32_t flag = 0;
        if (!(err = cuda_err(cudaGetLastError())))
            err = cuda_err(cudaMemcpy(&flag, dev + o_flag, 4, cudaMemcpyDeviceToHost));
        if (!err && flag) err = QES_ERR_RANGE;
    }
    if (!err) err = cuda_err(cudaFuncSetAttribute(up_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)UP_SHARED));
    up_args a;
    a.data = t->data;
    a.n_elements = t->n_elements;
    a.id = t->id;
    a.tr = tr;
    a.terms = (const up_term *)(dev + o_terms);
    a.step_first = (const uint32_t *)(dev + o_first);
    a.threshold = (const uint32_t *)(dev + o_thr);
    a.n_steps = n_steps;
    a.residual = residual;
    a.beta_q14 = params->beta_q14;
    a.clamp_q16 = params->clamp_q16;
    a.anti_windup = (params->flags & QES_UPDATE_ANTI_WINDUP) != 0;
    a.stats = (unsigned long long *)(dev + o_stats);
    uint64_t chunks = qes_chunks(t->n_elements);
    for (uint64_t c0 = 0; !err && c0 < chunks; c0 += MAX_GRID) {
        uint64_t g = chunks - c0 < MAX_GRID ? chunks - c0 : MAX_GRID;
        up_kernel<<<(unsigned)g, UP_THREADS, UP_SHARED>>>(a, c0);
        err = cuda_err(cudaGetLastError());
    }
    if (!err) err = cuda_err(cudaDeviceSynchronize());
    unsigned long long st[2] = {0, 0};
    if (!err) err = cuda_err(cudaMemcpy(st, dev + o_stats, sizeof st, cudaMemcpyDeviceToHost));
    cudaFree(dev);
    free(host);
    if (!err && stats) { stats->changed = st[0]; stats->dropped = st[1]; }
    return err;
}

static void *cuda_alloc(uint64_t n_bytes) {
    void *p = NULL;
    if (cudaMalloc(&p, (size_t)(n_bytes ? n_bytes : 1)) != cudaSuccess) { cudaGetLastError(); return NULL; }
    return p;
}

static void cuda_free(void *p) {
    if (p) cudaFree(p);
}

static int copy(void *dst, const void *src, uint64_t n_bytes, cudaMemcpyKind kind) {
    if (!n_bytes) return QES_OK;
    /* ordered after work queued on other streams (cudaMemcpy only waits for the legacy stream);
       without a device this fails, and so does the copy, which gives the code */
    if (cudaDeviceSynchronize() != cudaSuccess) cudaGetLastError();
    cudaError_t e = cudaMemcpy(dst, src, (size_t)n_bytes, kind);
    if (e == cudaSuccess) return QES_OK;
    cudaGetLastError();
    return e == cudaErrorMemoryAllocation ? QES_ERR_NOMEM : QES_ERR_ARG;
}

static int cuda_upload(void *dst, const void *src, uint64_t n_bytes) {
    return copy(dst, src, n_bytes, cudaMemcpyHostToDevice);
}

static int cuda_download(void *dst, const void *src, uint64_t n_bytes) {
    return copy(dst, src, n_bytes, cudaMemcpyDeviceToHost);
}

static const qes_device_ops ops = {cuda_perturb_many, cuda_restore_many, cuda_update,
                                   cuda_alloc, cuda_free, cuda_upload, cuda_download};

extern "C" __attribute__((visibility("default"))) const qes_device_ops *qes_cuda_ops(void) { return &ops; }

/* Usable: a device, the driver new enough for this runtime, code for the device's architecture
 * (cudaFuncGetAttributes fails without it), and the update's 128 KiB of shared memory a block.
 * Asked once per process (the first call creates the device's context). */
static int probe(void) {
    int n = 0, dev = 0, smem = 0;
    cudaFuncAttributes fa;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n <= 0 || cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess ||
        smem < (int)UP_SHARED || cudaFuncGetAttributes(&fa, pr_kernel) != cudaSuccess ||
        cudaFuncGetAttributes(&fa, up_kernel) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    return 1;
}

extern "C" __attribute__((visibility("default"))) int qes_cuda_available(void) {
    static const int usable = probe(); /* C++ runs it once, thread-safely */
    return usable;
}

// qes_metal.metal -- the Metal compute kernels of the Metal backend (Apple Silicon).
// Built at run time by ops_metal.m from one source string that cmake/metal.cmake assembles:
// qes_blocks.h, qes_noise.h, qes_perturb.h, qes_update.h, qes_metal_kernels.h, then this file (their quoted
// #include lines dropped).  Each thread calls the functions of qes_metal_kernels.h, which the
// host tests run as C and C++ against the golden vectors (tests/test_metal_logic.py).
#include <metal_stdlib>
using namespace metal;
#include "qes_metal_kernels.h"

struct qes_mtl_perturb_args {
    int type;
    int write;
    uint64_t n_elements;
    uint64_t tensor_id;
    int64_t seed;
    uint64_t mask_bytes;
    uint64_t n_groups;
    uint32_t p32;
};

// one thread per group of 8 chunks: its blocks and its mask bytes are its own
kernel void qes_perturb_groups(device uint8_t *data [[buffer(0)]],
                               device uint8_t *mask [[buffer(1)]],
                               constant qes_mtl_perturb_args &a [[buffer(2)]],
                               device uint32_t *applied [[buffer(3)]],
                               device uint32_t *foreign [[buffer(4)]],
                               uint g [[thread_position_in_grid]]) {
    if (g >= a.n_groups) return;
    qes_type_traits tr;
    qes_traits(a.type, &tr);
    uint32_t f = 0;
    applied[g] = qes_mtl_group(&tr, data, a.n_elements, a.tensor_id, a.seed, a.p32, mask, a.mask_bytes, g, a.write, &f);
    foreign[g] = f;
}

struct qes_mtl_update_args {
    int type;
    int anti_windup;
    int has_residual;
    int32_t beta_q14;
    int32_t clamp_q16;
    uint32_t n_steps;
    uint64_t n_elements;
    uint64_t tensor_id;
    uint64_t chunk0;        // the first chunk of this dispatch
};

// one threadgroup per chunk: the scatter of each term split over its draws (no collisions
// within a term), a barrier between terms, then the dense step split over whole blocks
kernel void qes_update_chunks(device uint8_t *data [[buffer(0)]],
                              device int32_t *acc_all [[buffer(1)]],
                              device int32_t *r_all [[buffer(2)]],
                              constant qes_mtl_update_args &a [[buffer(3)]],
                              device const uint32_t *term_start [[buffer(4)]],
                              device const uint64_t *term_seed [[buffer(5)]],
                              device const int32_t *term_coef [[buffer(6)]],
                              device const uint32_t *p32 [[buffer(7)]],
                              device uint32_t *counts [[buffer(8)]],
                              uint tg [[threadgroup_position_in_grid]],
                              uint tid [[thread_position_in_threadgroup]],
                              uint nt [[threads_per_threadgroup]]) {
    uint64_t c = a.chunk0 + tg;
    uint64_t base = c * QES_CHUNK;
    uint32_t valid = qes_chunk_valid(a.n_elements, c);
    device int32_t *acc = acc_all + (uint64_t)tg * QES_CHUNK;
    device int32_t *r = a.has_residual ? r_all + base : r_all + (uint64_t)tg * QES_CHUNK;
    for (uint32_t i = tid; i < valid; i += nt) {
        acc[i] = 0;
        if (!a.has_residual) r[i] = 0;
    }
    threadgroup_barrier(mem_flags::mem_device);
    qes_type_traits tr;
    qes_traits(a.type, &tr);
    uint32_t changed = 0, dropped = 0, be = (uint32_t)tr.block_elems;
    for (uint32_t s = 0; s < a.n_steps; ++s) {
        uint32_t md = qes_max_draws(p32[s]);
        for (uint32_t t = term_start[s]; t < term_start[s + 1]; ++t) {
            for (uint32_t j = tid; j < md; j += nt)
                qes_mtl_scatter(a.tensor_id, term_seed[t], term_coef[t], p32[s], c, valid, j, acc);
            threadgroup_barrier(mem_flags::mem_device);
        }
        for (uint32_t b = tid * be; b < valid; b += nt * be)
            qes_mtl_dense(&tr, data, base + b, be, acc + b, r + b, a.beta_q14, a.clamp_q16, a.anti_windup,
                          s + 1 == a.n_steps, &changed, &dropped);
        threadgroup_barrier(mem_flags::mem_device);
    }
    counts[2 * ((uint64_t)tg * nt + tid)] = changed;
    counts[2 * ((uint64_t)tg * nt + tid) + 1] = dropped;
}

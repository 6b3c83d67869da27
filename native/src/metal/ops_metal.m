/* ops_metal.m -- the Metal backend's host side (macOS, Apple Silicon; built only there by
 * cmake/metal.cmake): the device operations of the registry on tensors in unified memory.
 *
 * llama.cpp's Metal backend keeps the weights in shared-storage MTLBuffers whose contents are
 * ordinary host addresses, so "the backend's memory" here is page-granular host memory: each
 * call wraps the pages holding a tensor in an MTLBuffer without copying (newBufferWithBytesNoCopy)
 * and runs the kernels of qes_metal.metal on it.  alloc/upload/download are page-aligned
 * allocations and memcpy.  Masks are copied in and out (one bit a draw).  Arguments are checked
 * with the host driver's checks first, so bad input returns the same error and touches nothing.
 *
 * This file is compiled and run only on macOS; on Linux the tests check the kernels' per-thread
 * logic (qes_metal_kernels.h) as C and C++ against the golden vectors instead. */
#import <Foundation/Foundation.h>
#import <Metal/Metal.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include "qes_internal.h"
#include "qes_metal_source.h" /* generated: qes_metal_source[], the kernels and the shared headers */

#define QES_MTL_BATCH 256u      /* chunks per update dispatch: 2 x 16 MiB of int32 scratch */
#define QES_MTL_THREADS 256u    /* threads per update threadgroup */

typedef struct {
    int type, write;
    uint64_t n_elements, tensor_id;
    int64_t seed;
    uint64_t mask_bytes, n_groups;
    uint32_t p32;
} perturb_args;

typedef struct {
    int type, anti_windup, has_residual;
    int32_t beta_q14, clamp_q16;
    uint32_t n_steps;
    uint64_t n_elements, tensor_id, chunk0;
} update_args;

static id<MTLDevice> dev;
static id<MTLCommandQueue> queue;
static id<MTLComputePipelineState> perturb_pso, update_pso;
static dispatch_once_t once;
static int ready;

static void setup(void) {
    dispatch_once(&once, ^{
        @autoreleasepool {
            dev = MTLCreateSystemDefaultDevice();
            if (!dev) return;
            NSError *err = nil;
            NSString *src = [NSString stringWithUTF8String:qes_metal_source];
            MTLCompileOptions *opt = [MTLCompileOptions new];
            opt.fastMathEnabled = NO;
            id<MTLLibrary> lib = [dev newLibraryWithSource:src options:opt error:&err];
            if (!lib) { NSLog(@"qes-edge: Metal kernels did not compile: %@", err); return; }
            perturb_pso = [dev newComputePipelineStateWithFunction:[lib newFunctionWithName:@"qes_perturb_groups"] error:&err];
            update_pso = [dev newComputePipelineStateWithFunction:[lib newFunctionWithName:@"qes_update_chunks"] error:&err];
            queue = [dev newCommandQueue];
            ready = perturb_pso && update_pso && queue;
        }
    });
}

int qes_metal_available(void) {
    setup();
    return ready;
}

/* the pages holding [p, p + n) as a buffer, and p's offset in it */
static id<MTLBuffer> wrap(void *p, uint64_t n, NSUInteger *offset) {
    uintptr_t page = (uintptr_t)getpagesize(), start = (uintptr_t)p & ~(page - 1);
    uintptr_t end = ((uintptr_t)p + (uintptr_t)n + page - 1) & ~(page - 1);
    *offset = (NSUInteger)((uintptr_t)p - start);
    return [dev newBufferWithBytesNoCopy:(void *)start length:(NSUInteger)(end - start)
                                 options:MTLResourceStorageModeShared deallocator:nil];
}

static int run_groups(qes_tensor **ts, uint32_t n, int64_t seed, uint32_t p32, uint8_t **masks,
                      const uint64_t *mask_bytes, int write, uint64_t *applied_out, uint32_t *failed_out) {
    if (failed_out) *failed_out = 0;
    if (n == 0) return QES_OK;
    if (!ts || !masks || !mask_bytes) return QES_ERR_NULL;
    for (uint32_t i = 0; i < n; ++i) { /* every tensor checked before any is touched */
        qes_type_traits tr;
        int err = ts[i] ? qes_check_perturb(ts[i], &tr, seed, p32, masks[i], mask_bytes[i]) : QES_ERR_NULL;
        if (err) { if (failed_out) *failed_out = i; return err; }
    }
    setup();
    if (!ready) return QES_ERR_BACKEND;
    uint32_t failed = UINT32_MAX;
    @autoreleasepool {
        for (uint32_t i = 0; i < n; ++i) {
            qes_tensor *t = ts[i];
            uint64_t chunks = qes_chunks(t->n_elements);
            uint64_t groups = (chunks + QES_GROUP_CHUNKS - 1) / QES_GROUP_CHUNKS;
            uint64_t mb = qes_mask_bytes(t->n_elements, p32);
            NSUInteger off = 0;
            id<MTLBuffer> data = wrap(t->data, t->n_bytes, &off);
            id<MTLBuffer> mask = [dev newBufferWithLength:(NSUInteger)(mb ? mb : 1) options:MTLResourceStorageModeShared];
            id<MTLBuffer> applied = [dev newBufferWithLength:(NSUInteger)(groups * 4) options:MTLResourceStorageModeShared];
            id<MTLBuffer> foreign = [dev newBufferWithLength:(NSUInteger)(groups * 4) options:MTLResourceStorageModeShared];
            if (!data || !mask || !applied || !foreign) return QES_ERR_NOMEM;
            if (!write) memcpy(mask.contents, masks[i], (size_t)mb);
            perturb_args a = {t->type, write, t->n_elements, t->id, seed, mb, groups, p32};
            id<MTLCommandBuffer> cb = [queue commandBuffer];
            id<MTLComputeCommandEncoder> enc = [cb computeCommandEncoder];
            [enc setComputePipelineState:perturb_pso];
            [enc setBuffer:data offset:off atIndex:0];
            [enc setBuffer:mask offset:0 atIndex:1];
            [enc setBytes:&a length:sizeof a atIndex:2];
            [enc setBuffer:applied offset:0 atIndex:3];
            [enc setBuffer:foreign offset:0 atIndex:4];
            NSUInteger w = perturb_pso.threadExecutionWidth;
            [enc dispatchThreads:MTLSizeMake((NSUInteger)groups, 1, 1) threadsPerThreadgroup:MTLSizeMake(w, 1, 1)];
            [enc endEncoding];
            [cb commit];
            [cb waitUntilCompleted];
            if (cb.status != MTLCommandBufferStatusCompleted) return QES_ERR_BACKEND;
            uint64_t total = 0;
            const uint32_t *ap = (const uint32_t *)applied.contents, *fp = (const uint32_t *)foreign.contents;
            for (uint64_t g = 0; g < groups; ++g) {
                total += ap[g];
                if (fp[g] && i < failed) failed = i;
            }
            if (write) memcpy(masks[i], mask.contents, (size_t)mb);
            if (applied_out) applied_out[i] = total;
        }
    }
    if (failed != UINT32_MAX) {
        if (failed_out) *failed_out = failed;
        return QES_ERR_RANGE;
    }
    return QES_OK;
}

static int perturb_many(qes_tensor **ts, uint32_t n, int64_t seed, uint32_t p32, uint8_t **masks,
                        const uint64_t *mask_bytes, int32_t n_threads, uint64_t *applied_out, uint32_t *failed_out) {
    (void)n_threads;
    return run_groups(ts, n, seed, p32, masks, mask_bytes, 1, applied_out, failed_out);
}

static int restore_many(qes_tensor **ts, uint32_t n, int64_t seed, uint32_t p32, uint8_t **masks,
                        const uint64_t *mask_bytes, int32_t n_threads, uint32_t *failed_out) {
    (void)n_threads;
    return run_groups(ts, n, seed, p32, masks, mask_bytes, 0, NULL, failed_out);
}

static int update(qes_tensor *t, const qes_step *steps, uint32_t n_steps, int32_t *residual,
                  const qes_update_params *params, qes_update_stats *stats) {
    qes_type_traits tr;
    int err = qes_check_update(t, &tr, steps, n_steps, residual, params); /* unified memory: readable here */
    if (err) return err;
    setup();
    if (!ready) return QES_ERR_BACKEND;
    uint64_t n_members = 0;
    for (uint32_t s = 0; s < n_steps; ++s) n_members += steps[s].n_members;
    qes_term *terms = (qes_term *)malloc((size_t)(n_members ? n_members : 1) * sizeof(qes_term));
    uint32_t *start = (uint32_t *)malloc((n_steps + 1) * sizeof(uint32_t)), *p32 = (uint32_t *)malloc(n_steps * 4);
    if (!terms || !start || !p32) { free(terms); free(start); free(p32); return QES_ERR_NOMEM; }
    uint32_t at = 0;
    for (uint32_t s = 0; s < n_steps; ++s) {
        start[s] = at;
        at += qes_merge_members(&steps[s], terms + at);
        p32[s] = steps[s].threshold;
    }
    start[n_steps] = at;
    err = QES_OK;
    qes_update_stats total = {0, 0};
    @autoreleasepool {
        uint64_t *seeds = (uint64_t *)malloc((size_t)(at ? at : 1) * 8);
        int32_t *coefs = (int32_t *)malloc((size_t)(at ? at : 1) * 4);
        for (uint32_t i = 0; i < at; ++i) { seeds[i] = terms[i].seed; coefs[i] = terms[i].coef; }
        uint64_t chunks = qes_chunks(t->n_elements);
        uint32_t batch = chunks < QES_MTL_BATCH ? (uint32_t)chunks : QES_MTL_BATCH;
        NSUInteger off = 0, roff = 0;
        id<MTLBuffer> data = wrap(t->data, t->n_bytes, &off);
        id<MTLBuffer> acc = [dev newBufferWithLength:(NSUInteger)batch * QES_CHUNK * 4 options:MTLResourceStorageModePrivate];
        id<MTLBuffer> r = residual ? wrap(residual, t->n_elements * 4, &roff)
                                   : [dev newBufferWithLength:(NSUInteger)batch * QES_CHUNK * 4
                                                      options:MTLResourceStorageModePrivate];
        id<MTLBuffer> counts = [dev newBufferWithLength:(NSUInteger)batch * QES_MTL_THREADS * 8
                                                options:MTLResourceStorageModeShared];
        id<MTLBuffer> tstart = [dev newBufferWithBytes:start length:(n_steps + 1) * 4 options:MTLResourceStorageModeShared];
        id<MTLBuffer> tseed = [dev newBufferWithBytes:seeds length:(at ? at : 1) * 8 options:MTLResourceStorageModeShared];
        id<MTLBuffer> tcoef = [dev newBufferWithBytes:coefs length:(at ? at : 1) * 4 options:MTLResourceStorageModeShared];
        id<MTLBuffer> tp32 = [dev newBufferWithBytes:p32 length:n_steps * 4 options:MTLResourceStorageModeShared];
        free(seeds);
        free(coefs);
        if (!data || !acc || !r || !counts || !tstart || !tseed || !tcoef || !tp32) err = QES_ERR_NOMEM;
        for (uint64_t c0 = 0; !err && c0 < chunks; c0 += batch) {
            uint32_t nb = chunks - c0 < batch ? (uint32_t)(chunks - c0) : batch;
            update_args a = {t->type, (params->flags & QES_UPDATE_ANTI_WINDUP) != 0, residual != NULL,
                             params->beta_q14, params->clamp_q16, n_steps, t->n_elements, t->id, c0};
            id<MTLCommandBuffer> cb = [queue commandBuffer];
            id<MTLComputeCommandEncoder> enc = [cb computeCommandEncoder];
            [enc setComputePipelineState:update_pso];
            [enc setBuffer:data offset:off atIndex:0];
            [enc setBuffer:acc offset:0 atIndex:1];
            [enc setBuffer:r offset:roff atIndex:2];
            [enc setBytes:&a length:sizeof a atIndex:3];
            [enc setBuffer:tstart offset:0 atIndex:4];
            [enc setBuffer:tseed offset:0 atIndex:5];
            [enc setBuffer:tcoef offset:0 atIndex:6];
            [enc setBuffer:tp32 offset:0 atIndex:7];
            [enc setBuffer:counts offset:0 atIndex:8];
            [enc dispatchThreadgroups:MTLSizeMake(nb, 1, 1) threadsPerThreadgroup:MTLSizeMake(QES_MTL_THREADS, 1, 1)];
            [enc endEncoding];
            [cb commit];
            [cb waitUntilCompleted];
            if (cb.status != MTLCommandBufferStatusCompleted) { err = QES_ERR_BACKEND; break; }
            const uint32_t *cp = (const uint32_t *)counts.contents;
            for (uint64_t i = 0; i < (uint64_t)nb * QES_MTL_THREADS; ++i) {
                total.changed += cp[2 * i];
                total.dropped += cp[2 * i + 1];
            }
        }
    }
    free(terms);
    free(start);
    free(p32);
    if (!err && stats) *stats = total;
    return err;
}

static void *alloc_pages(uint64_t n) {
    void *p = NULL;
    size_t page = (size_t)getpagesize(), len = ((size_t)n + page - 1) / page * page;
    return posix_memalign(&p, page, len ? len : page) == 0 ? p : NULL;
}
static void free_pages(void *p) { free(p); }
static int copy_in(void *dst, const void *src, uint64_t n) { memcpy(dst, src, (size_t)n); return QES_OK; }

const qes_device_ops qes_ops_metal = {perturb_many, restore_many, update, alloc_pages, free_pages, copy_in, copy_in};

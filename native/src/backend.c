/* backend.c -- the backend registry: the one list of backends (name, host or device, whether
 * compiled in and available, its kernels or whole operations), the active one, and the
 * public operations' dispatch.  Chosen once, reported, never switched silently. */
#define _GNU_SOURCE /* dladdr */
#include <stdlib.h>
#include <string.h>
#if !defined(_WIN32)
#include <dlfcn.h>
#include <pthread.h>
#endif
#include "qes_internal.h"

static int always(void) { return 1; }
#if defined(QES_HAVE_AVX2)
static int avx2_cpu(void) { return __builtin_cpu_supports("avx2") ? 1 : 0; }
#endif

/* the stand-in device (qes.h): host memory behind the device interface */
static int standin_available(void) {
    const char *v = getenv("QES_EDGE_STANDIN_DEVICE");
    return v && strcmp(v, "1") == 0;
}
static int standin_perturb_many(qes_tensor **ts, uint32_t n, int64_t seed, uint32_t p32, uint8_t **masks,
                                const uint64_t *mask_bytes, int32_t n_threads, uint64_t *applied_out,
                                uint32_t *failed_out) {
    return qes_host_perturb_many(&qes_kernels_ref, ts, n, seed, p32, masks, mask_bytes, n_threads, applied_out,
                                 failed_out);
}
static int standin_restore_many(qes_tensor **ts, uint32_t n, int64_t seed, uint32_t p32, uint8_t **masks,
                                const uint64_t *mask_bytes, int32_t n_threads, uint32_t *failed_out) {
    return qes_host_restore_many(&qes_kernels_ref, ts, n, seed, p32, masks, mask_bytes, n_threads, failed_out);
}
static int standin_update(qes_tensor *t, const qes_step *steps, uint32_t n_steps, int32_t *residual,
                          const qes_update_params *params, qes_update_stats *stats) {
    return qes_host_update(&qes_kernels_ref, t, steps, n_steps, residual, params, stats);
}
static void *standin_alloc(uint64_t n_bytes) { return malloc(n_bytes ? (size_t)n_bytes : 1); }
static void standin_free(void *p) { free(p); }
static int standin_copy(void *dst, const void *src, uint64_t n_bytes) {
    memcpy(dst, src, (size_t)n_bytes);
    return QES_OK;
}
static const qes_device_ops standin_ops = {standin_perturb_many, standin_restore_many, standin_update,
                                           standin_alloc, standin_free, standin_copy, standin_copy};

static const qes_backend_desc registry[] = {
    [QES_BACKEND_PORTABLE] = {"portable", 0, always, &qes_kernels_ref, NULL},
#if defined(QES_HAVE_AVX2)
    [QES_BACKEND_AVX2] = {"avx2", 0, avx2_cpu, &qes_kernels_avx2, NULL},
#else
    [QES_BACKEND_AVX2] = {"avx2", 0, NULL, NULL, NULL},
#endif
#if defined(QES_HAVE_NEON)
    [QES_BACKEND_NEON] = {"neon", 0, always, &qes_kernels_neon, NULL}, /* every aarch64 core has NEON */
#else
    [QES_BACKEND_NEON] = {"neon", 0, NULL, NULL, NULL},
#endif
    /* a plugin beside libqes (libqes_cuda.so, built when CMake finds nvcc): loaded on first
       use, so that a process that never asks for CUDA never maps the CUDA runtime */
    [QES_BACKEND_CUDA] = {"cuda", 1, NULL, NULL, NULL},
#if defined(QES_HAVE_METAL)
    [QES_BACKEND_METAL] = {"metal", 1, qes_metal_available, NULL, &qes_ops_metal},
#else
    [QES_BACKEND_METAL] = {"metal", 1, NULL, NULL, NULL},
#endif
    [QES_BACKEND_STANDIN] = {"standin", 1, standin_available, NULL, &standin_ops},
};
#define N_BACKENDS ((int)(sizeof registry / sizeof registry[0]))
_Static_assert(sizeof registry / sizeof registry[0] == QES_BACKEND_STANDIN + 1, "one registry row per backend id");

/* auto: the fastest available host backend (a device backend needs the weights in its memory,
 * which the caller arranges and asks for by name) */
static const int auto_order[] = {QES_BACKEND_NEON, QES_BACKEND_AVX2, QES_BACKEND_PORTABLE};

static int current = QES_BACKEND_AUTO;

int qes_backend_count(void) { return N_BACKENDS; }

/* -- plugins: device backends built as their own shared library next to libqes ---------------- */

typedef struct {
    const char *file, *ops_symbol, *available_symbol;
    int loaded;                      /* 0: not tried, 1: tried */
    qes_backend_desc desc;           /* the registry row with the plugin's functions filled in */
} plugin;

static plugin plugins[] = {
    {"libqes_cuda.so", "qes_cuda_ops", "qes_cuda_available", 0, {"cuda", 1, NULL, NULL, NULL}},
};
static const int plugin_backend[] = {QES_BACKEND_CUDA};

#if !defined(_WIN32)
static pthread_mutex_t plugin_lock = PTHREAD_MUTEX_INITIALIZER;

static void load(plugin *p) {
    Dl_info self;
    if (!dladdr((void *)&qes_backend_count, &self) || !self.dli_fname) return;
    const char *slash = strrchr(self.dli_fname, '/');
    size_t dir = slash ? (size_t)(slash - self.dli_fname + 1) : 0;
    char path[4096];
    if (dir + strlen(p->file) + 1 > sizeof path) return;
    memcpy(path, self.dli_fname, dir);
    strcpy(path + dir, p->file);
    void *h = dlopen(path, RTLD_NOW | RTLD_LOCAL);
    if (!h) return;
    const qes_device_ops *(*ops)(void) = (const qes_device_ops *(*)(void))dlsym(h, p->ops_symbol);
    int (*avail)(void) = (int (*)(void))dlsym(h, p->available_symbol);
    if (!ops || !avail || !ops()) { dlclose(h); return; }
    p->desc.ops = ops();
    p->desc.available = avail;
}
#endif

static const qes_backend_desc *plugin_row(int backend) {
    for (size_t i = 0; i < sizeof plugin_backend / sizeof plugin_backend[0]; ++i) {
        if (plugin_backend[i] != backend) continue;
        plugin *p = &plugins[i];
#if !defined(_WIN32)
        pthread_mutex_lock(&plugin_lock);
        if (!p->loaded) { load(p); p->loaded = 1; }
        pthread_mutex_unlock(&plugin_lock);
#endif
        return p->desc.ops ? &p->desc : NULL;
    }
    return NULL;
}

static const qes_backend_desc *row(int backend) {
    if (backend < 0 || backend >= N_BACKENDS) return NULL;
    if (!registry[backend].kernels && !registry[backend].ops) {
        const qes_backend_desc *d = plugin_row(backend);
        if (d) return d;
    }
    return &registry[backend];
}

/* name and kind come from the table itself: listing the backends opens no plugin */
const char *qes_backend_name(int backend) {
    return backend >= 0 && backend < N_BACKENDS ? registry[backend].name : NULL;
}

int qes_backend_by_name(const char *name) {
    if (!name) return QES_ERR_NULL;
    for (int i = 0; i < N_BACKENDS; ++i)
        if (strcmp(registry[i].name, name) == 0) return i;
    return QES_ERR_BACKEND;
}

int qes_backend_compiled(int backend) {
    const qes_backend_desc *d = row(backend);
    return d && (d->kernels || d->ops) ? 1 : 0;
}

int qes_backend_available(int backend) {
    const qes_backend_desc *d = row(backend);
    return qes_backend_compiled(backend) && d->available() ? 1 : 0;
}

int qes_backend_is_device(int backend) {
    return backend >= 0 && backend < N_BACKENDS ? registry[backend].is_device : 0;
}

int qes_set_backend(int backend) {
    if (backend == QES_BACKEND_AUTO) {
        for (size_t i = 0; i < sizeof auto_order / sizeof auto_order[0]; ++i)
            if (qes_backend_available(auto_order[i])) { current = auto_order[i]; return QES_OK; }
        current = QES_BACKEND_PORTABLE;
        return QES_OK;
    }
    if (!qes_backend_available(backend)) return QES_ERR_BACKEND;
    current = backend;
    return QES_OK;
}

int qes_get_backend(void) {
    if (current == QES_BACKEND_AUTO) qes_set_backend(QES_BACKEND_AUTO);
    return current;
}

const qes_backend_desc *qes_active_backend(void) { return row(qes_get_backend()); }

const qes_kernels *qes_active_kernels(void) {
    const qes_backend_desc *d = qes_active_backend();
    return d->kernels ? d->kernels : &qes_kernels_ref;
}

/* -- memory ------------------------------------------------------------------------------ */

void *qes_backend_alloc(int backend, uint64_t n_bytes) {
    if (!qes_backend_available(backend)) return NULL;
    const qes_backend_desc *d = row(backend);
    if (d->ops) return d->ops->alloc(n_bytes);
    return malloc(n_bytes ? (size_t)n_bytes : 1);
}

void qes_backend_free(int backend, void *p) {
    if (!p || !qes_backend_available(backend)) return;
    const qes_backend_desc *d = row(backend);
    if (d->ops) d->ops->free(p); else free(p);
}

static int copy(int backend, void *dst, const void *src, uint64_t n_bytes, int to_backend) {
    if (!qes_backend_available(backend)) return QES_ERR_BACKEND;
    if (n_bytes && (!dst || !src)) return QES_ERR_NULL;
    const qes_backend_desc *d = row(backend);
    if (d->ops) return (to_backend ? d->ops->upload : d->ops->download)(dst, src, n_bytes);
    memcpy(dst, src, (size_t)n_bytes);
    return QES_OK;
}

int qes_backend_upload(int backend, void *dst, const void *src, uint64_t n_bytes) {
    return copy(backend, dst, src, n_bytes, 1);
}

int qes_backend_download(int backend, void *dst, const void *src, uint64_t n_bytes) {
    return copy(backend, dst, src, n_bytes, 0);
}

/* -- the public operations, dispatched to the active backend -------------------------------- */

int qes_perturb_many(qes_tensor **ts, uint32_t n, int64_t seed, uint32_t p32, uint8_t **masks,
                     const uint64_t *mask_bytes, int32_t n_threads, uint64_t *applied_out, uint32_t *failed_out) {
    const qes_backend_desc *d = qes_active_backend();
    if (d->ops) return d->ops->perturb_many(ts, n, seed, p32, masks, mask_bytes, n_threads, applied_out, failed_out);
    return qes_host_perturb_many(d->kernels, ts, n, seed, p32, masks, mask_bytes, n_threads, applied_out, failed_out);
}

int qes_restore_many(qes_tensor **ts, uint32_t n, int64_t seed, uint32_t p32, uint8_t **masks,
                     const uint64_t *mask_bytes, int32_t n_threads, uint32_t *failed_out) {
    const qes_backend_desc *d = qes_active_backend();
    if (d->ops) return d->ops->restore_many(ts, n, seed, p32, masks, mask_bytes, n_threads, failed_out);
    return qes_host_restore_many(d->kernels, ts, n, seed, p32, masks, mask_bytes, n_threads, failed_out);
}

int qes_perturb(qes_tensor *t, int64_t seed, uint32_t p32, uint8_t *mask, uint64_t mask_bytes,
                uint64_t *applied_out) {
    uint64_t applied = 0;
    int err = qes_perturb_many(&t, 1, seed, p32, &mask, &mask_bytes, 1, &applied, NULL);
    if (applied_out) *applied_out = applied;
    return err;
}

int qes_restore(qes_tensor *t, int64_t seed, uint32_t p32, const uint8_t *mask, uint64_t mask_bytes) {
    uint8_t *m = (uint8_t *)mask; /* read only: restore never writes the mask */
    return qes_restore_many(&t, 1, seed, p32, &m, &mask_bytes, 1, NULL);
}

int qes_update(qes_tensor *t, const qes_step *steps, uint32_t n_steps, int32_t *residual,
               const qes_update_params *params, qes_update_stats *stats) {
    const qes_backend_desc *d = qes_active_backend();
    if (d->ops) return d->ops->update(t, steps, n_steps, residual, params, stats);
    return qes_host_update(d->kernels, t, steps, n_steps, residual, params, stats);
}

/* -- the weights digest ------------------------------------------------------------------- */

#define QES_DIGEST_STAGE ((uint64_t)1 << 20)

int qes_digest(qes_tensor **ts, uint32_t n, const char **names, const uint64_t *name_lens, uint8_t *out32) {
    if (!out32 || (n && (!ts || !names || !name_lens))) return QES_ERR_NULL;
    for (uint32_t i = 0; i < n; ++i) {
        qes_type_traits tr;
        int err = ts[i] ? qes_check_tensor_traits(ts[i], &tr) : QES_ERR_NULL;
        if (!err && name_lens[i] && !names[i]) err = QES_ERR_NULL;
        if (err) return err;
    }
    const qes_backend_desc *d = qes_active_backend();
    uint8_t *stage = NULL;
    if (d->ops && !(stage = (uint8_t *)malloc((size_t)QES_DIGEST_STAGE))) return QES_ERR_NOMEM;
    qes_sha256_ctx c;
    qes_sha256_init(&c);
    for (uint32_t i = 0; i < n; ++i) {
        qes_sha256_update(&c, (const uint8_t *)names[i], name_lens[i]);
        if (!d->ops) { qes_sha256_update(&c, ts[i]->data, ts[i]->n_bytes); continue; }
        for (uint64_t at = 0; at < ts[i]->n_bytes; at += QES_DIGEST_STAGE) {
            uint64_t len = ts[i]->n_bytes - at < QES_DIGEST_STAGE ? ts[i]->n_bytes - at : QES_DIGEST_STAGE;
            int err = d->ops->download(stage, ts[i]->data + at, len);
            if (err) { free(stage); return err; }
            qes_sha256_update(&c, stage, len);
        }
    }
    free(stage);
    qes_sha256_final(&c, out32);
    return QES_OK;
}
